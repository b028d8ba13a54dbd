"""Nearest Neighbour Alignment (NNA) loss of MIM-Refiner (Alkin et al., 2024, arXiv 2402.10093)
and the NNCLR loss used by MAE-CT (Lehner et al., 2023, arXiv 2304.10520; Dwibedi et al., 2021).

Pure functions: the queue lookup and any all-gather happen in the training loop. The released
reference code mis-indexes the local-view terms; :func:`multiview_loss` implements the intended
pairing (each global target against the other global view and every local view).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimcli import distributed as dist
from mimcli.blocks import to_indices
from mimcli.heads import HeadEnsemble, head_widths
from mimcli.models.taps import tap_blocks
from mimcli.objectives.base import Objective, ObjectiveContext
from mimcli.queue import NeighbourQueue, neighbour_label_agreement, queue_size
from mimcli.runtime import autocast as runtime_autocast
from mimcli.views import ViewBatch

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


# --- the objective ---------------------------------------------------------------------------


def default_temperature(embed_dim: int) -> float:
    """METHOD §1.2: 0.2 for ViT-L and smaller, 0.3 for ViT-H (1280), 0.35 for wider models."""
    if embed_dim > 1280:
        return 0.35
    return 0.3 if embed_dim == 1280 else 0.2


def block_features(
    encoder: nn.Module, images: Tensor, blocks: Sequence[int], head_input: str
) -> dict[int, Tensor]:
    """(B, D) head inputs per 1-based block from one pass: the CLS token (raw residual stream;
    the last block after the final norm) or the mean patch token."""
    depth = len(encoder.blocks)  # type: ignore[arg-type]
    taps = tap_blocks(encoder, images, to_indices(blocks))
    source = taps.cls if head_input == "cls" else taps.patch
    normed = taps.cls_norm if head_input == "cls" else taps.patch_norm
    out = {b: source[:, k] for k, b in enumerate(blocks)}
    if blocks[-1] == depth and normed is not None:
        out[depth] = normed
    return out


class NNAObjective(Objective):
    """MIM-Refiner: an ID head (projector + predictor) per chosen block, each with a neighbour
    queue; NNA loss over 2 global + N local views; heads warm up on the frozen encoder with the
    nearest neighbour, refinement draws among the top-k."""

    name = "nna"
    uses_blocks = True
    loss_kind = "nna"
    activation = "gelu"
    predictor_final_bn = True

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        dim = int(ctx.loaded.embed_dim)
        self.blocks = list(ctx.blocks)
        self.head_input = cfg.head_input
        self.widths = head_widths(
            dim,
            int(cfg.head_width)
            if str(cfg.head_width).isascii() and str(cfg.head_width).isdigit()
            else cfg.head_width,
        )
        self.heads = HeadEnsemble(
            self.blocks,
            dim,
            self.widths,
            act=self.activation,
            predictor_final_bn=self.predictor_final_bn,
            sync_bn=ctx.sync_bn,
        )
        self.tau = float(cfg.temperature)
        self.topk = int(cfg.topk)
        self.knn_backend = cfg.knn_backend
        spec = cfg.queue_size
        self.qsize = queue_size(
            int(spec) if str(spec).isascii() and str(spec).isdigit() else spec, ctx.dataset_size
        )
        gen = torch.Generator().manual_seed(ctx.seed)
        self.queues = nn.ModuleDict(
            {str(b): NeighbourQueue(self.qsize, self.widths.out, gen) for b in self.blocks}
        )
        self.lookup_gen = torch.Generator().manual_seed(ctx.seed + 1 + dist.rank())
        self.labels_by_id: Tensor | None = ctx.extra.get("labels_by_id")
        self._labels_on_device: tuple[Tensor, Tensor] | None = None
        self._pending: dict[int, tuple[Tensor, Tensor]] = {}

    @classmethod
    def defaults(cls, depth: int, embed_dim: int) -> dict[str, Any]:
        return {"temperature": default_temperature(embed_dim)}

    # the lookup generator rides in state_dict so a resumed run draws the same neighbours
    def get_extra_state(self) -> Any:
        return {"lookup_gen": self.lookup_gen.get_state()}

    def set_extra_state(self, state: Any) -> None:
        self.lookup_gen.set_state(state["lookup_gen"])

    # each rank draws with its own generator; the checkpoint keeps every rank's
    rank_state = get_extra_state
    load_rank_state = set_extra_state

    def describe(self) -> dict[str, Any]:
        return {
            "objective": self.name,
            "loss": self.loss_kind,
            "head_widths": asdict(self.widths),
            "head_input": self.head_input,
            "temperature": self.tau,
            "queue_size": self.qsize,
            "topk": self.topk,
        }

    def summary(self) -> str:
        w = self.widths
        return (
            f"heads {w.hidden}/{w.out}/{w.predictor_hidden} on {self.head_input} tokens; "
            f"tau {self.tau}; queue {self.qsize}"
        )

    def targets(self, block: int, z: Tensor, x: Tensor) -> Tensor:
        """What is looked up in, and enqueued into, the queue (NNA: the projection itself)."""
        return z.detach()

    def step(
        self, encoder: nn.Module, batch: ViewBatch, stage: str, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Sum over heads of the multi-view loss; remembers what each queue receives after the
        optimiser step (global view 0's targets and ids, gathered over ranks). Metrics are
        0-dim tensors on the device (nothing is read back)."""
        warmup = stage == "heads"
        device = self.ctx.device
        views = [v.to(device, non_blocking=True) for v in batch.views]
        b = views[0].shape[0]
        ids = batch.indices.to(device, non_blocking=True)
        autocast = runtime_autocast(device)
        with autocast, torch.set_grad_enabled(not warmup):
            feats = block_features(encoder, torch.cat(views[:2]), self.blocks, self.head_input)
            if len(views) > 2:
                local = block_features(encoder, torch.cat(views[2:]), self.blocks, self.head_input)
                feats = {k: torch.cat([feats[k], local[k]]) for k in feats}
        if warmup:
            feats = {k: v.detach() for k, v in feats.items()}
        total = torch.zeros((), device=device)
        metrics: dict[str, Tensor] = {}
        self._pending = {}
        offset = dist.rank() * b
        gids = dist.gather(ids)
        labels = None
        if self.labels_by_id is not None:
            labels = batch.labels.to(device, non_blocking=True)
        for block in self.blocks:
            with autocast:
                z, p = self.heads.head(block)(feats[block])
            z, p = z.float(), p.float()
            with torch.no_grad():
                target = self.targets(block, z, feats[block]).float()
            z_globals = [z[:b], z[b : 2 * b]]
            t_globals = [target[:b], target[b : 2 * b]]
            queue: NeighbourQueue = self.queues[str(block)]  # type: ignore[assignment]
            with torch.no_grad():
                found = [
                    queue.lookup(
                        t,
                        ids,
                        topk=1 if warmup else self.topk,
                        generator=self.lookup_gen,
                        backend=self.knn_backend,
                    )
                    for t in t_globals
                ]
            p_views = [dist.gather_with_grad(p[i * b : (i + 1) * b]) for i in range(len(views))]
            loss, _ = multiview_loss(
                z_globals,
                [f.neighbours for f in found],
                p_views,
                self.tau,
                offset=offset,
                kind=self.loss_kind,
            )
            total = total + loss
            self._pending[block] = (dist.gather(t_globals[0]), gids)
            metrics[f"loss/{block}"] = loss.detach()
            metrics[f"align/{block}"] = alignment(t_globals[0], p[b : 2 * b])
            metrics[f"nn_sim/{block}"] = found[0].similarity.mean()
            if labels is not None:
                metrics[f"nn_agree/{block}"] = neighbour_label_agreement(
                    found[0].ids, labels, self.device_labels()
                )
        return total, metrics

    def device_labels(self) -> Tensor:
        """``labels_by_id`` on the device, copied once (and again if it is replaced)."""
        source = self.labels_by_id
        assert source is not None
        if self._labels_on_device is None or self._labels_on_device[0] is not source:
            copy = source.to(self.ctx.device, non_blocking=True)
            self._labels_on_device = (source, copy)
        return self._labels_on_device[1]

    def alarms(self) -> dict[str, Tensor]:
        """Look-ups that found only the query's own entries, summed over the queues."""
        queues: list[NeighbourQueue] = list(self.queues.values())  # type: ignore[arg-type]
        return {queues[0].starved_message(): torch.stack([q.starved for q in queues]).sum()}

    def after_step(self, encoder: nn.Module, stage: str, step: int) -> None:
        for block, (feats, ids) in self._pending.items():
            self.queues[str(block)].enqueue(feats, ids)  # type: ignore[operator]
        self._pending = {}
