"""How sure a measured accuracy is: the binomial standard error of one model's accuracy over its
queries, and McNemar's exact test of the change between two models on the same queries (only
the queries one gets right and the other wrong count). Per-query correctness travels in
``results.json`` as packed bits (base64), so a card or table can test a change later."""

from __future__ import annotations

import base64
import math

import numpy as np

SIGNIFICANT = 0.05  # the level a change must reach before a card calls it an improvement


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error, in percentage points, of ``accuracy`` (%) over ``n`` queries."""
    if n <= 0:
        return float("nan")
    p = accuracy / 100.0
    return 100.0 * math.sqrt(max(p * (1.0 - p), 0.0) / n)


def pack(correct: np.ndarray) -> str:
    """Per-query correctness (bool) as base64 of packed bits (what results.json keeps)."""
    bits = np.packbits(np.asarray(correct, dtype=bool))
    return f"{len(correct)}:" + base64.b64encode(bits.tobytes()).decode("ascii")


def unpack(text: str) -> np.ndarray:
    n, _, data = text.partition(":")
    bits = np.frombuffer(base64.b64decode(data), dtype=np.uint8)
    return np.unpackbits(bits)[: int(n)].astype(bool)


def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value of ``a`` vs ``b`` (per-query correctness on the same
    queries): a binomial test of the discordant pairs against 1/2; 1.0 when there are none."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired test on {a.shape} and {b.shape} queries")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(only_b, only_a + only_b, 0.5).pvalue)


def p_text(p: float) -> str:
    """A p-value as tables show it."""
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"
