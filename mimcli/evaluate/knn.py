"""Weighted k-NN classification of frozen features (METHOD §1.5, DINO-style votes).

Features are standardised per dimension with the train set's mean/std, L2-normalised, matched by
cosine similarity, and each of the k neighbours votes for its label with weight exp(sim / tau).
Standardisation runs in chunks, so memory-mapped float16 features are never copied whole at a
wider type: the only full copy is the float32 matrix the search needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from mimcli.index import topk_inner_product

if TYPE_CHECKING:
    from mimcli.features import FeatureSet

Array = torch.Tensor | np.ndarray
CHUNK_ROWS = 16_384


def _rows(x: Array, start: int, stop: int) -> torch.Tensor:
    part = x[start:stop]
    if isinstance(part, np.ndarray):
        part = torch.from_numpy(np.array(part))  # a chunk-sized copy (maps may be read-only)
    return part


def feature_stats(train: Array, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and (population) std of (N, D) features, accumulated in float64."""
    n = train.shape[0]
    total = torch.zeros(train.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, n, CHUNK_ROWS):
        part = _rows(train, start, start + CHUNK_ROWS).double().cpu()
        total += part.sum(dim=0)
        total_sq += (part * part).sum(dim=0)
    mean = total / n
    var = (total_sq / n - mean * mean).clamp_min(0.0)
    return mean, var.sqrt().clamp_min(eps)


def standardize_with(x: Array, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std, then L2-normalised rows; (N, D) float32, computed chunk by chunk."""
    out = torch.empty(x.shape[0], x.shape[1], dtype=torch.float32)
    for start in range(0, x.shape[0], CHUNK_ROWS):
        part = _rows(x, start, start + CHUNK_ROWS).double().cpu()
        z = ((part - mean) / std).float()
        out[start : start + part.shape[0]] = torch.nn.functional.normalize(z, dim=1)
    return out


def standardize(train: Array, *others: Array, eps: float = 1e-6) -> list[torch.Tensor]:
    """Standardise with train statistics, then L2-normalise each row.

    Args:
        train: (N, D) train features; its mean/std (float64) define the standardisation.
        others: further (M, D) arrays standardised with the same statistics.

    Returns:
        [train, *others] standardised and L2-normalised, float32 on CPU.
    """
    mean, std = feature_stats(train, eps)
    return [standardize_with(x, mean, std) for x in (train, *others)]


def weighted_votes(
    scores: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, tau: float
) -> torch.Tensor:
    """Class scores from neighbours.

    Args:
        scores: (Q, k) cosine similarities.
        neighbour_labels: (Q, k) int64 labels of the neighbours.

    Returns:
        (Q, C) summed exp(sim / tau) per class.
    """
    weights = torch.exp(scores.double() / tau)
    votes = torch.zeros(scores.shape[0], num_classes, dtype=torch.float64, device=scores.device)
    votes.scatter_add_(1, neighbour_labels, weights)
    return votes


def knn_predict(
    train: Array,
    train_labels: Array,
    query: Array,
    ks: Sequence[int] = (10,),
    tau: float = 0.07,
    num_classes: int | None = None,
    backend: str = "auto",
    device: torch.device | str = "cpu",
) -> dict[int, torch.Tensor]:
    """Predict labels of ``query`` by weighted k-NN over ``train``, for several k in one search.

    Args:
        device: where the search runs (CUDA: GPU FAISS or torch on the GPU).

    Returns:
        {k: (Q,) int64 predictions on CPU}; ties between classes go to the lowest class index.
    """
    labels = torch.as_tensor(np.asarray(train_labels)).long()
    if num_classes is None:
        num_classes = int(labels.max().item()) + 1
    train_n, query_n = standardize(train, query)
    train_n, query_n = train_n.to(device), query_n.to(device)
    scores, index = topk_inner_product(query_n, train_n, max(ks), backend=backend)
    del train_n
    neighbour_labels = labels.to(index.device)[index]
    predictions = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        votes = weighted_votes(scores[:, :kk], neighbour_labels[:, :kk], num_classes, tau)
        predictions[k] = votes.argmax(dim=1).cpu()
    return predictions


def knn_accuracy(
    train: Array,
    train_labels: Array,
    query: Array,
    query_labels: Array,
    ks: Sequence[int] = (10,),
    tau: float = 0.07,
    num_classes: int | None = None,
    backend: str = "auto",
    device: torch.device | str = "cpu",
) -> dict[int, float]:
    """Top-1 accuracy in percent of weighted k-NN, {k: accuracy}."""
    truth = torch.as_tensor(np.asarray(query_labels)).long()
    preds = knn_predict(train, train_labels, query, ks, tau, num_classes, backend, device)
    return {k: float((p == truth).double().mean().item() * 100.0) for k, p in preds.items()}


def last_block_knn_correct(
    train: FeatureSet,
    val: FeatureSet,
    ks: Sequence[int],
    tau: float,
    num_classes: int,
    backend: str = "auto",
    device: torch.device | str = "cpu",
) -> dict[str, dict[int, np.ndarray]]:
    """Per-query correctness (bool, val order) of weighted k-NN on the last tapped block, CLS
    and mean patch: ``{"cls": {k: correct}, "patch": {k: correct}}`` (for paired tests)."""
    last = train.blocks[-1]
    truth = torch.as_tensor(np.asarray(val.labels)).long()
    out: dict[str, dict[int, np.ndarray]] = {}
    for kind in ("cls", "patch"):
        preds = knn_predict(
            train.block(last, kind),
            train.labels,
            val.block(last, kind),
            ks,
            tau,
            num_classes,
            backend,
            device,
        )
        out[kind] = {k: (p == truth).numpy() for k, p in preds.items()}
    return out


def accuracy_of(correct: np.ndarray) -> float:
    """Accuracy in percent of per-query correctness (as :func:`knn_accuracy` computes it)."""
    return float(torch.as_tensor(correct).double().mean().item() * 100.0)


def last_block_knn(
    train: FeatureSet,
    val: FeatureSet,
    ks: Sequence[int],
    tau: float,
    num_classes: int,
    backend: str = "auto",
    device: torch.device | str = "cpu",
) -> dict[str, dict[int, float]]:
    """Weighted k-NN accuracy (%) of the last tapped block, CLS and mean patch: what ``eval``
    reports and what ``refine --val`` monitors. Returns ``{"cls": {k: acc}, "patch": {k: acc}}``."""
    correct = last_block_knn_correct(train, val, ks, tau, num_classes, backend, device)
    return {kind: {k: accuracy_of(c) for k, c in per_k.items()} for kind, per_k in correct.items()}
