"""The metric rows of an eval result, in the order the paper reports them: one list, read by the
terminal's eval table and by the model card's before/after table, so both name a metric alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mimcli.evaluate.stats import mcnemar, standard_error, unpack
from mimcli.results import EvalResult, ModelEval

# (key in ModelEval.cluster, label, decimals): ACC is in percent, the rest are fractions or scores
CLUSTER_METRICS = (
    ("acc", "k-means ACC %", 2),
    ("nmi", "k-means NMI", 4),
    ("ami", "k-means AMI", 4),
    ("ari", "k-means ARI", 4),
    ("silhouette", "silhouette", 4),
    ("davies_bouldin", "Davies-Bouldin (lower is better)", 4),
)


@dataclass(frozen=True)
class EvalRow:
    """One metric, read from each evaluated model.

    Attributes:
        label: the metric's name in every table.
        protocol: the eval protocol it comes from (``knn``, ``linear``, ``lowshot``, ``cluster``).
        read: ``read(model) -> (value, spread or None)``; raises ``KeyError``/``TypeError`` when
            the model has no such value.
        digits: decimals the model card shows (4 for fractions such as NMI, else 2).
    """

    label: str
    protocol: str
    read: Callable[[ModelEval], tuple[float, float | None]]
    digits: int = 2
    key: tuple[str, str] | None = None  # k-NN rows: (kind, k) of ModelEval.knn_correct
    lowshot_key: str | None = None  # low-shot rows: the setting's key in ModelEval.lowshot

    def cell(self, model: ModelEval) -> tuple[float, float | None] | None:
        """``(value, spread or None)`` of ``model``, or None when it has no such value."""
        try:
            return self.read(model)
        except (KeyError, TypeError):
            return None

    def correct(self, model: ModelEval) -> np.ndarray | None:
        """Per-query correctness behind a row, when the result kept it: k-NN (per kind and k),
        the linear probe's chosen cell, a low-shot setting (its splits' queries, one after the
        other: base and refined models see the same seeded splits)."""
        packed: Any = None
        if self.key is not None:
            packed = model.knn_correct.get(self.key[0], {}).get(self.key[1])
        elif self.protocol == "linear":
            packed = model.linear.get("best", {}).get("correct")
        elif self.protocol == "lowshot" and self.lowshot_key is not None:
            packed = model.lowshot.get(self.lowshot_key, {}).get("correct")
        if not packed:
            return None
        if isinstance(packed, list):
            return np.concatenate([unpack(p) for p in packed])
        return unpack(packed)

    def error(self, model: ModelEval, queries: int | None = None) -> float | None:
        """The binomial standard error (points) of an accuracy measured on single queries: a
        k-NN row (over its kept queries), the linear probe or k-means ACC (over ``queries``,
        the val images); None for other rows (low-shot rows carry their spread over splits)."""
        cell, correct = self.cell(model), self.correct(model)
        if cell is None:
            return None
        if correct is not None:
            return standard_error(cell[0], len(correct))
        if queries and (self.protocol == "linear" or self.label.startswith("k-means ACC")):
            return standard_error(cell[0], queries)
        return None

    def paired_p(self, a: ModelEval, b: ModelEval) -> float | None:
        """McNemar's p-value of the change from ``a`` to ``b`` on the same queries (k-NN rows
        whose results kept per-query correctness), else None."""
        ca, cb = self.correct(a), self.correct(b)
        if ca is None or cb is None or ca.shape != cb.shape:
            return None
        return mcnemar(ca, cb)


def _knn(kind: str, k: int) -> Callable[[ModelEval], tuple[float, float | None]]:
    return lambda m: (m.knn[kind][str(k)], None)


def _lowshot(key: str) -> Callable[[ModelEval], tuple[float, float | None]]:
    def read(m: ModelEval) -> tuple[float, float | None]:
        stats = m.lowshot[key]
        return stats["mean"], None if "split_file" in stats else stats["std"]  # a file: one split

    return read


def _cluster(key: str) -> Callable[[ModelEval], tuple[float, float | None]]:
    return lambda m: (m.cluster[key], None)


def headline(result: EvalResult, base: int, refined: int) -> tuple[float, float | None] | None:
    """The first k-NN row's change from ``base`` to ``refined`` and its McNemar p-value (None
    without per-query correctness); None without k-NN."""
    for row in eval_rows(result):
        if row.protocol == "knn":
            a, b = row.cell(result.models[base]), row.cell(result.models[refined])
            if a is None or b is None:
                return None
            return b[0] - a[0], row.paired_p(result.models[base], result.models[refined])
    return None


def eval_rows(result: EvalResult) -> list[EvalRow]:
    """The rows ``result``'s protocols produce: k-NN (CLS, then mean patch, per k), the linear
    probe's best grid cell, each low-shot setting (mean ± std over splits) and split file (one
    value, named ``split NAME``), the k-means metrics. Low-shot settings are those of the first
    model."""
    rows: list[EvalRow] = []
    if "knn" in result.protocols:
        for kind, label in (("cls", "CLS"), ("patch", "mean patch")):
            for k in result.ks:
                rows.append(
                    EvalRow(f"k-NN {label} k={k} %", "knn", _knn(kind, k), key=(kind, str(k)))
                )
    if "linear" in result.protocols:
        rows.append(
            EvalRow(
                "linear probe % (best grid cell)",
                "linear",
                lambda m: (m.linear["best"]["val_acc"], None),
            )
        )
    if "lowshot" in result.protocols and result.models and result.models[0].lowshot:
        for key, stats in result.models[0].lowshot.items():
            label = "1% of labels %" if key == "1%" else f"{key} %"
            if "split_file" in stats:
                label = f"split {key} %"
            rows.append(EvalRow(label, "lowshot", _lowshot(key), lowshot_key=key))
    if "cluster" in result.protocols:
        for key, label, digits in CLUSTER_METRICS:
            rows.append(EvalRow(label, "cluster", _cluster(key), digits))
    return rows
