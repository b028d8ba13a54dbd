"""Weighted k-NN classification of frozen features (METHOD §1.5, DINO-style votes).

Features are standardised per dimension with the train set's mean/std, L2-normalised, matched by
cosine similarity, and each of the k neighbours votes for its label with weight exp(sim / tau).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mimcli.index import topk_inner_product


def standardize(
    train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6
) -> list[torch.Tensor]:
    """Standardise with train statistics, then L2-normalise each row.

    Args:
        train: (N, D) train features; its mean/std (float64) define the standardisation.
        others: further (M, D) tensors standardised with the same statistics.

    Returns:
        [train, *others] standardised and L2-normalised, float32.
    """
    t64 = train.double()
    mean = t64.mean(dim=0)
    std = t64.std(dim=0, unbiased=False).clamp_min(eps)
    out = []
    for x in (train, *others):
        z = ((x.double() - mean) / std).float()
        out.append(torch.nn.functional.normalize(z, dim=1))
    return out


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
    train: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    query: torch.Tensor | np.ndarray,
    ks: Sequence[int] = (10,),
    tau: float = 0.07,
    num_classes: int | None = None,
    backend: str = "auto",
) -> dict[int, torch.Tensor]:
    """Predict labels of ``query`` by weighted k-NN over ``train``, for several k in one search.

    Ties between classes go to the lowest class index.

    Returns:
        {k: (Q,) int64 predictions}.
    """
    train_t = torch.as_tensor(np.asarray(train) if not torch.is_tensor(train) else train)
    query_t = torch.as_tensor(np.asarray(query) if not torch.is_tensor(query) else query)
    labels = torch.as_tensor(
        np.asarray(train_labels) if not torch.is_tensor(train_labels) else train_labels
    ).long()
    if num_classes is None:
        num_classes = int(labels.max().item()) + 1
    train_n, query_n = standardize(train_t.float(), query_t.float())
    kmax = max(ks)
    scores, index = topk_inner_product(query_n, train_n, kmax, backend=backend)
    neighbour_labels = labels.to(index.device)[index]
    predictions = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        votes = weighted_votes(scores[:, :kk], neighbour_labels[:, :kk], num_classes, tau)
        predictions[k] = votes.argmax(dim=1).cpu()
    return predictions


def knn_accuracy(
    train: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    query: torch.Tensor | np.ndarray,
    query_labels: torch.Tensor | np.ndarray,
    ks: Sequence[int] = (10,),
    tau: float = 0.07,
    num_classes: int | None = None,
    backend: str = "auto",
) -> dict[int, float]:
    """Top-1 accuracy in percent of weighted k-NN, {k: accuracy}."""
    truth = torch.as_tensor(np.asarray(query_labels)).long()
    preds = knn_predict(train, train_labels, query, ks, tau, num_classes, backend)
    return {k: float((p == truth).double().mean().item() * 100.0) for k, p in preds.items()}
