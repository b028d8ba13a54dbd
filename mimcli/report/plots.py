"""PNG plots of probe and eval results (written atomically): accuracy per block, k-NN accuracy
against k, low-shot accuracy. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mimcli.fileio import write_with

if TYPE_CHECKING:
    from mimcli.results import EvalResult, ProbeResult


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


def plot_knn(result: EvalResult, path: Path) -> Path:
    """k-NN accuracy against k, one line per model and feature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mimcli.evaluate.stats import standard_error

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    low, high = 100.0, 0.0
    for m in result.models:
        for kind, style in (("cls", "-o"), ("patch", "--s")):
            ys = [m.knn.get(kind, {}).get(str(k)) for k in result.ks]
            if all(y is not None for y in ys):
                # error bars: the binomial standard error over the val queries
                errs = [standard_error(y, result.val_images) for y in ys]
                ax.errorbar(result.ks, ys, yerr=errs, fmt=style, capsize=3,
                            label=f"{m.name} {kind}")  # fmt: skip
                low = min(low, *(y - e for y, e in zip(ys, errs, strict=True)))
                high = max(high, *(y + e for y, e in zip(ys, errs, strict=True)))
    if high > low:  # at least a 5-point window: sub-point differences are not blown up
        middle, half = (high + low) / 2, max(2.5, (high - low) / 2 + 0.5)
        ax.set_ylim(max(0.0, middle - half), min(100.0, middle + half))
    ax.set_xlabel("k")
    ax.set_ylabel("k-NN accuracy (%), ± standard error")
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
    if any(len(k) > 8 for k in keys):  # split-file names: slant them so they do not overlap
        ax.set_xticklabels(keys, rotation=20, ha="right", fontsize=8)
    else:
        ax.set_xticklabels(keys)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
