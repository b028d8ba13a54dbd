"""Rendering results: rich tables for the terminal and PNG plots (written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from mimcli.fileio import write_with

if TYPE_CHECKING:
    from mimcli.probe import ProbeResult


def probe_table(result: ProbeResult) -> Table:
    """Block | CLS k-NN | mean-patch k-NN, the best of each column and the heads marked."""
    table = Table(
        title=f"{result.k}-NN accuracy per block",
        caption=f"{result.model}\n{result.train_images} train / {result.val_images} val images, "
        f"{result.num_classes} classes, tau {result.tau:g}\n* best   H recommended ID head",
    )
    table.add_column("block", justify="right")
    table.add_column("CLS %", justify="right")
    table.add_column("mean-patch %", justify="right")
    table.add_column("", justify="left")
    best_cls = max(s.cls for s in result.blocks)
    best_patch = max(s.patch for s in result.blocks)
    heads = set(result.recommendation.blocks)
    for s in result.blocks:
        table.add_row(
            str(s.block),
            f"{s.cls:.2f}{' *' if s.cls == best_cls else '  '}",
            f"{s.patch:.2f}{' *' if s.patch == best_patch else '  '}",
            "H" if s.block in heads else "",
        )
    if result.final_norm is not None:
        f = result.final_norm
        table.add_row(f"{f.block}+norm", f"{f.cls:.2f}  ", f"{f.patch:.2f}  ", "")
    return table


def plot_probe(result: ProbeResult, path: Path) -> Path:
    """Accuracy against depth, CLS and mean-patch, recommended head blocks shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [s.block for s in result.blocks]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    ax.plot(blocks, [s.cls for s in result.blocks], marker="o", label="CLS")
    ax.plot(blocks, [s.patch for s in result.blocks], marker="s", label="mean patch")
    for b in result.recommendation.blocks:
        ax.axvspan(b - 0.5, b + 0.5, color="tab:green", alpha=0.12, lw=0)
    ax.set_xlabel("block")
    ax.set_ylabel(f"{result.k}-NN accuracy (%)")
    ax.set_title(
        f"{Path(result.model).name or result.model}: representation quality per block", fontsize=9
    )
    ax.set_xticks(blocks)
    ax.grid(alpha=0.3)
    ax.legend(title="shaded: ID heads", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
