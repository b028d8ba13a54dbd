"""Rendering results: rich tables for the terminal and PNG plots (written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from mimcli.fileio import write_with

if TYPE_CHECKING:
    from mimcli.results import EvalResult, ProbeResult


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


def _fmt(value: Any, spread: Any = None) -> str:
    if value is None:
        return "-"
    if spread is not None:
        return f"{value:.2f} ± {spread:.2f}"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def eval_rows(result: EvalResult) -> list[tuple[str, list[str]]]:
    """(metric, one value per model) rows, in the order the paper reports them."""
    rows: list[tuple[str, list[str]]] = []
    models = result.models
    if "knn" in result.protocols:
        for kind, label in (("cls", "CLS"), ("patch", "mean patch")):
            for k in result.ks:
                rows.append(
                    (
                        f"k-NN {label} k={k} %",
                        [_fmt(m.knn.get(kind, {}).get(str(k))) for m in models],
                    )
                )
    if "linear" in result.protocols:
        rows.append(
            ("linear probe %", [_fmt(m.linear.get("best", {}).get("val_acc")) for m in models])
        )
        rows.append(
            (
                "  chosen cell",
                [
                    f"{m.linear.get('best', {}).get('features', '-')} lr "
                    f"{m.linear.get('best', {}).get('lr', '-')}"
                    for m in models
                ],
            )
        )
    if "lowshot" in result.protocols:
        keys = list(models[0].lowshot) if models and models[0].lowshot else []
        for key in keys:
            rows.append(
                (
                    f"{key} %",
                    [
                        _fmt(m.lowshot.get(key, {}).get("mean"), m.lowshot.get(key, {}).get("std"))
                        for m in models
                    ],
                )
            )
    if "cluster" in result.protocols:
        for key, label in (
            ("acc", "cluster ACC %"),
            ("nmi", "cluster NMI"),
            ("ami", "AMI"),
            ("ari", "ARI"),
            ("silhouette", "silhouette"),
            ("davies_bouldin", "Davies-Bouldin"),
        ):
            rows.append((label, [_fmt(m.cluster.get(key)) for m in models]))
    return rows


def eval_table(result: EvalResult) -> Table:
    table = Table(
        title="Frozen-feature evaluation",
        caption=f"{result.train_images} train / {result.val_images} val images, "
        f"{result.num_classes} classes; last block, CLS before the final norm",
    )
    table.add_column("metric")
    for m in result.models:
        table.add_column(m.name, justify="right")
    for metric, values in eval_rows(result):
        table.add_row(metric, *values)
    return table


def plot_knn(result: EvalResult, path: Path) -> Path:
    """k-NN accuracy against k, one line per model and feature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    for m in result.models:
        for kind, style in (("cls", "-o"), ("patch", "--s")):
            ys = [m.knn.get(kind, {}).get(str(k)) for k in result.ks]
            if all(y is not None for y in ys):
                ax.plot(result.ks, ys, style, label=f"{m.name} {kind}")
    ax.set_xlabel("k")
    ax.set_ylabel("k-NN accuracy (%)")
    ax.set_xticks(result.ks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def plot_lowshot(result: EvalResult, path: Path) -> Path:
    """Low-shot accuracy bars (mean ± std over splits), grouped by setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(result.models[0].lowshot) if result.models else []
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    width = 0.8 / max(1, len(result.models))
    for i, m in enumerate(result.models):
        means = [m.lowshot[k]["mean"] for k in keys]
        stds = [m.lowshot[k]["std"] for k in keys]
        xs = [j + i * width for j in range(len(keys))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=m.name)
    ax.set_xticks([j + width * (len(result.models) - 1) / 2 for j in range(len(keys))])
    ax.set_xticklabels(keys)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
