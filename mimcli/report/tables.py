"""Rich tables for the terminal: the probe's accuracy per block and the eval's metrics with one
column per model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.table import Table

from mimcli.evaluate.stats import p_text
from mimcli.report.rows import eval_rows

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


def _fmt(value: Any, spread: Any = None) -> str:
    """``value`` with 2 decimals (``± spread`` when given), ``-`` for None."""
    if value is None:
        return "-"
    if spread is not None:
        return f"{value:.2f} ± {spread:.2f}"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def eval_table(result: EvalResult) -> Table:
    """Metric | one column per model, the rows of :func:`mimcli.report.rows.eval_rows` (values
    with 2 decimals, ``-`` where a model has none) and the linear probe's chosen grid cell."""
    table = Table(
        title="Frozen-feature evaluation",
        caption=f"{result.train_images} train / {result.val_images} val images, "
        f"{result.num_classes} classes; last block, CLS before the final norm; k-NN ± "
        "binomial standard error (k-NN, linear); changes tested by McNemar on the same queries",
    )
    table.add_column("metric")
    models = result.models
    for m in models:
        table.add_column(m.name, justify="right")
    paired = len(models) > 1
    if paired:
        table.add_column(f"change ({models[-1].name} - {models[0].name})", justify="right")
    for row in eval_rows(result):
        cells = []
        for m in models:
            cell = row.cell(m)
            spread = row.error(m, result.val_images) if cell and cell[1] is None else None
            cells.append(_fmt(cell[0], cell[1] if spread is None else spread) if cell else "-")
        if paired:
            a, b = row.cell(models[0]), row.cell(models[-1])
            change = "-" if a is None or b is None else f"{b[0] - a[0]:+.2f}"
            p = row.paired_p(models[0], models[-1])
            cells.append(change if p is None else f"{change} ({p_text(p)})")
        table.add_row(row.label, *cells)
        if row.protocol == "linear":
            best = [m.linear.get("best", {}) for m in models]
            table.add_row(
                "  chosen cell", *[f"{b.get('features', '-')} lr {b.get('lr', '-')}" for b in best]
            )
    return table
