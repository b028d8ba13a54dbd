"""Nearest Neighbour Alignment (NNA) loss of MIM-Refiner (Alkin et al., 2024, arXiv 2402.10093)
and the NNCLR loss used by MAE-CT (Lehner et al., 2023, arXiv 2304.10520; Dwibedi et al., 2021).

Pure functions: the queue lookup and any all-gather happen in the training loop. The released
reference code mis-indexes the local-view terms; :func:`multiview_loss` implements the intended
pairing (each global target against the other global view and every local view).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_KINDS = ("nna", "nnclr")


def _check(z: Tensor, nn: Tensor, p_all: Tensor, tau: float, offset: int) -> None:
    if z.dim() != 2 or nn.shape != z.shape:
        raise ValueError(f"z and nn must both be (B, D); got {tuple(z.shape)}, {tuple(nn.shape)}")
    if p_all.dim() != 2 or p_all.shape[1] != z.shape[1]:
        raise ValueError(f"p_all must be (M, {z.shape[1]}); got {tuple(p_all.shape)}")
    if offset < 0 or offset + z.shape[0] > p_all.shape[0]:
        raise ValueError(
            f"offset {offset} + batch {z.shape[0]} exceeds the {p_all.shape[0]} predictions"
        )
    if tau <= 0:
        raise ValueError(f"temperature must be positive, got {tau}")


def _cross_entropy(logits: Tensor, offset: int) -> Tensor:
    targets = torch.arange(logits.shape[0], device=logits.device) + offset
    return F.cross_entropy(logits, targets)


def nna_loss(z: Tensor, nn: Tensor, p_all: Tensor, tau: float, offset: int = 0) -> Tensor:
    """NNA loss of one (target view, prediction view) pair.

    Row ``i`` scores the local sample's prediction against all ``M`` predictions of the global
    batch: the positive ``<nn_i, p_{offset+i}>/tau`` uses the queue neighbour, every negative
    ``<z_i, p_j>/tau`` uses the sample's own projection. All vectors are L2-normalised in float32.

    Args:
        z: ``(B, D)`` projector outputs of the target view (detached here).
        nn: ``(B, D)`` queue neighbours of ``z`` (detached here).
        p_all: ``(M, D)`` predictor outputs of the prediction view for the whole global batch
            (all ranks, gathered with gradients); the only input that receives gradient.
        tau: temperature.
        offset: row of ``p_all`` holding this rank's first sample (``rank * B`` under DDP).

    Returns:
        Scalar loss: cross-entropy with target ``offset + i``, mean over the ``B`` rows.
    """
    _check(z, nn, p_all, tau, offset)
    batch = z.shape[0]
    z = F.normalize(z.detach().float(), dim=-1)
    nn = F.normalize(nn.detach().float(), dim=-1)
    p = F.normalize(p_all.float(), dim=-1)
    logits = z @ p.T / tau
    positives = (nn * p[offset : offset + batch]).sum(dim=-1) / tau
    is_positive = torch.zeros_like(logits, dtype=torch.bool)
    rows = torch.arange(batch, device=logits.device)
    is_positive[rows, rows + offset] = True
    logits = torch.where(is_positive, positives[:, None], logits)
    return _cross_entropy(logits, offset)


def nnclr_loss(z: Tensor, nn: Tensor, p_all: Tensor, tau: float, offset: int = 0) -> Tensor:
    """NNCLR loss of one (target view, prediction view) pair (MAE-CT).

    Like :func:`nna_loss` but every entry of row ``i`` uses the neighbour:
    ``logits[i, j] = <nn_i, p_j>/tau``. ``z`` only fixes the expected shapes.

    Args:
        z: ``(B, D)`` projector outputs of the target view (unused beyond shape checks).
        nn: ``(B, D)`` queue neighbours of ``z`` (detached here).
        p_all: ``(M, D)`` gathered predictions of the prediction view; receives the gradient.
        tau: temperature.
        offset: row of ``p_all`` holding this rank's first sample.

    Returns:
        Scalar loss: cross-entropy with target ``offset + i``, mean over the ``B`` rows.
    """
    _check(z, nn, p_all, tau, offset)
    nn = F.normalize(nn.detach().float(), dim=-1)
    p = F.normalize(p_all.float(), dim=-1)
    return _cross_entropy(nn @ p.T / tau, offset)


def multiview_loss(
    z_globals: Sequence[Tensor],
    nn_globals: Sequence[Tensor],
    p_views: Sequence[Tensor],
    tau: float,
    offset: int = 0,
    kind: str = "nna",
) -> tuple[Tensor, int]:
    """Mean loss of one head over all (global target, prediction view) pairs.

    Each global target ``a`` in {0, 1} is paired with the prediction of the other global view
    ``1 - a`` and with the prediction of every local view: ``2 + 2N`` terms for ``N`` local views.

    Args:
        z_globals: 2 tensors ``(B, D)``: projector outputs of global views 0 and 1.
        nn_globals: 2 tensors ``(B, D)``: their queue neighbours.
        p_views: predictions of every view, ordered ``[global0, global1, local0, ...]``, each
            ``(M, D)`` (already gathered across ranks).
        tau: temperature.
        offset: row of each ``p_views[v]`` holding this rank's first sample.
        kind: ``"nna"`` (MIM-Refiner) or ``"nnclr"`` (MAE-CT).

    Returns:
        ``(mean over the terms, number of terms)``.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; choose one of {', '.join(LOSS_KINDS)}")
    if len(z_globals) != 2 or len(nn_globals) != 2 or len(p_views) < 2:
        raise ValueError(
            "need 2 global targets, 2 neighbour sets and at least 2 prediction views; got "
            f"{len(z_globals)}, {len(nn_globals)}, {len(p_views)}"
        )
    loss_fn: Callable[..., Tensor] = nna_loss if kind == "nna" else nnclr_loss
    terms = []
    for a in (0, 1):
        for b in [1 - a, *range(2, len(p_views))]:
            terms.append(loss_fn(z_globals[a], nn_globals[a], p_views[b], tau, offset))
    return torch.stack(terms).mean(), len(terms)


def alignment(z: Tensor, p: Tensor) -> Tensor:
    """Mean cosine similarity of matched rows, a detached monitoring metric.

    Args:
        z: ``(B, D)``.
        p: ``(B, D)``.

    Returns:
        Scalar in ``[-1, 1]``.
    """
    if z.shape != p.shape:
        raise ValueError(
            f"z and p must have the same shape; got {tuple(z.shape)}, {tuple(p.shape)}"
        )
    return F.cosine_similarity(z.detach().float(), p.detach().float(), dim=-1).mean()
