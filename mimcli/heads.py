"""Instance-discrimination heads (projector + predictor MLPs with BatchNorm) attached to chosen
encoder blocks, as in MIM-Refiner (Alkin et al., 2024, arXiv 2402.10093) and MAE-CT (Lehner et
al., 2023, arXiv 2304.10520); plus a BatchNorm that synchronises its batch statistics on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from mimcli.distributed import all_reduce_sum, backend, world_size
from mimcli.errors import MimcliError

PAPER_HIDDEN = 2048
PAPER_OUT = 256
PAPER_PREDICTOR_HIDDEN = 4096
MIN_WIDTH = 8
MAX_WIDTH = 65536  # 32x the paper's hidden width; larger is a typo (and a memory bomb)
ACTIVATIONS = ("gelu", "relu")


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over ``(N, C)`` or ``(N, C, L)`` with batch statistics from every rank.

    When the default process group is initialised with more than one rank (any backend, gloo on
    CPU included), training-mode mean and variance are all-reduced over all ranks, with gradients
    flowing back through the all-reduce, so each rank computes exactly what ``nn.BatchNorm1d``
    computes on the concatenated global batch. Otherwise, and in eval mode, it is plain
    ``nn.BatchNorm1d``: same constructor, same running-stat update (unbiased variance in the
    running stats, biased in the normalisation), same state-dict keys, so checkpoints are
    interchangeable. Ranks may hold different batch sizes.

    Every rank must call each layer's forward and backward in the same order (as DDP does); a
    rank that skips a step deadlocks the others. ``nn.SyncBatchNorm`` is faster on CUDA; use
    :func:`batch_norm` to pick.
    """

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input``.

        Args:
            input: ``(N, C)`` or ``(N, C, L)`` local batch.

        Returns:
            Tensor of the same shape and dtype.
        """
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch_stats or world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        return self._synced_forward(input)

    def _synced_forward(self, x: Tensor) -> Tensor:
        factor = 0.0
        update = self.training and self.track_running_stats
        if update and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = (1, channels) + (1,) * (x.dim() - 2)
        xf = x.float()
        # Two passes (mean, then centred squares) keep the variance exact in float32; the count
        # rides along with the first all-reduce so ranks may have different batch sizes.
        local_count = xf.new_tensor([x.numel() // max(channels, 1)])
        summed = all_reduce_sum(torch.cat([xf.sum(dims), local_count]))
        count = float(summed[channels].item())
        if count <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {int(count)} "
                "over all ranks"
            )
        mean = summed[:channels] / count
        centred = xf - mean.reshape(shape)
        var = all_reduce_sum(centred.square().sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        if update and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                unbiased = var * (count / (count - 1))
                self.running_mean.mul_(1 - factor).add_(
                    mean.to(self.running_mean.dtype), alpha=factor
                )
                self.running_var.mul_(1 - factor).add_(
                    unbiased.to(self.running_var.dtype), alpha=factor
                )
        return y.to(x.dtype)


def batch_norm(dim: int, affine: bool = True, sync: bool = False) -> nn.Module:
    """BatchNorm for head layers: plain, or synchronised across ranks under DDP.

    Decided when the layer is built, so build the heads after ``init_process_group``.

    Args:
        dim: number of channels ``C``.
        affine: learn a per-channel scale and shift.
        sync: synchronise batch statistics over the default process group.

    Returns:
        ``nn.BatchNorm1d`` when not ``sync``; ``nn.SyncBatchNorm`` when the default group runs
        NCCL (CUDA); :class:`SyncBatchNorm1d` otherwise (gloo/CPU, or not yet distributed).
    """
    if not sync:
        return nn.BatchNorm1d(dim, affine=affine)
    if backend() == "nccl":
        return nn.SyncBatchNorm(dim, affine=affine)
    return SyncBatchNorm1d(dim, affine=affine)


@dataclass(frozen=True)
class HeadWidths:
    """Widths of one head: projector hidden, projector output (= predictor in/out), predictor
    hidden."""

    hidden: int
    out: int
    predictor_hidden: int

    def macs(self, in_dim: int) -> int:
        """Multiply-adds of one head's Linear layers per sample per view."""
        projector = in_dim * self.hidden + self.hidden * self.hidden + self.hidden * self.out
        predictor = 2 * self.out * self.predictor_hidden
        return projector + predictor


def head_widths(embed_dim: int, spec: str | int = "auto") -> HeadWidths:
    """Resolve the head-width option to concrete widths.

    ``"auto"`` scales the heads with the encoder, because the paper's heads (2048/256/4096, about
    7-9M multiply-adds per sample per view per head) cost far more than a tiny ViT itself:

    - ``hidden = 4 * embed_dim`` rounded up to a multiple of 64, clamped to ``[256, 2048]``;
    - ``predictor_hidden = 2 * hidden`` (at most 4096);
    - ``out = embed_dim`` clamped to ``[64, 256]``.

    So every encoder at least 512 wide (ViT-B/L/H) gets exactly the paper's sizes:

    ========= ====== ==== ================ ============
    embed_dim hidden out  predictor_hidden MACs / head
    ========= ====== ==== ================ ============
    32        256    64   512              0.16M
    128       512    128  1024             0.66M
    384       1536   256  3072             4.9M
    768       2048   256  4096             8.4M
    1024      2048   256  4096             8.9M
    ========= ====== ==== ================ ============

    An integer ``N`` (or its string) gives ``hidden = N``, ``predictor_hidden = 2N``,
    ``out = min(256, N)``.

    Args:
        embed_dim: encoder width ``D`` (the heads' input).
        spec: ``"auto"``, ``"paper"`` (always 2048/256/4096) or an integer ``N >= 8``.

    Returns:
        The resolved :class:`HeadWidths`.

    Raises:
        MimcliError: for an unknown string or ``N < 8``.
    """
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "auto":
            hidden = min(max(math.ceil(4 * embed_dim / 64) * 64, 256), PAPER_HIDDEN)
            return HeadWidths(
                hidden=hidden,
                out=min(max(embed_dim, 64), PAPER_OUT),
                predictor_hidden=min(2 * hidden, PAPER_PREDICTOR_HIDDEN),
            )
        if text == "paper":
            return HeadWidths(PAPER_HIDDEN, PAPER_OUT, PAPER_PREDICTOR_HIDDEN)
        if not (text.isascii() and text.isdigit()):
            raise MimcliError(
                f"--head-width {spec!r}: use 'auto', 'paper' or a whole number >= {MIN_WIDTH}"
            )
        spec = int(text)
    if isinstance(spec, bool) or not isinstance(spec, int):
        raise MimcliError(f"--head-width {spec!r}: use 'auto', 'paper' or a whole number")
    if not MIN_WIDTH <= spec <= MAX_WIDTH:
        raise MimcliError(f"--head-width {spec}: must lie in {MIN_WIDTH}..{MAX_WIDTH}")
    return HeadWidths(hidden=spec, out=min(PAPER_OUT, spec), predictor_hidden=2 * spec)


def _activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "relu":
        return nn.ReLU()
    raise MimcliError(f"unknown head activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")


class IDHead(nn.Module):
    """Projector and predictor MLPs of one instance-discrimination head.

    projector: Linear(in→hidden) → BN → act → Linear(hidden→hidden) → BN → act →
    Linear(hidden→out) → BN; predictor: Linear(out→predictor_hidden) → BN → act →
    Linear(predictor_hidden→out) [→ BN]. Linears have no bias (BN follows each) and start
    Xavier-uniform, as in the official code.

    BN statistics come from whatever batch is passed, so the training loop should concatenate all
    views of a step (2 global + N local crops, ``(V*B, in_dim)``) into one call, as in the paper,
    and split ``z``/``p`` back into ``V`` chunks of ``B``.

    Args:
        in_dim: encoder width ``D``.
        widths: head widths (see :func:`head_widths`).
        act: ``"gelu"`` (MIM-Refiner) or ``"relu"`` (MAE-CT).
        predictor_final_bn: keep the predictor's final BN (False for MAE-CT).
        sync_bn: synchronise BN statistics across ranks (see :func:`batch_norm`).
    """

    def __init__(
        self,
        in_dim: int,
        widths: HeadWidths,
        act: str = "gelu",
        predictor_final_bn: bool = True,
        sync_bn: bool = False,
    ) -> None:
        super().__init__()
        _activation(act)  # fail early on a bad name
        self.in_dim = in_dim
        self.widths = widths
        hidden, out, pred_hidden = widths.hidden, widths.out, widths.predictor_hidden
        self.projector = nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False),
            batch_norm(hidden, sync=sync_bn),
            _activation(act),
            nn.Linear(hidden, hidden, bias=False),
            batch_norm(hidden, sync=sync_bn),
            _activation(act),
            nn.Linear(hidden, out, bias=False),
            batch_norm(out, sync=sync_bn),
        )
        predictor: list[nn.Module] = [
            nn.Linear(out, pred_hidden, bias=False),
            batch_norm(pred_hidden, sync=sync_bn),
            _activation(act),
            nn.Linear(pred_hidden, out, bias=False),
        ]
        if predictor_final_bn:
            predictor.append(batch_norm(out, sync=sync_bn))
        self.predictor = nn.Sequential(*predictor)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation (METHOD §1.1): Xavier-uniform Linear weights (zero biases,
        had they any); BatchNorm weight 1, bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def project(self, x: Tensor) -> Tensor:
        """Projector only.

        Args:
            x: ``(B, in_dim)`` pooled block features.

        Returns:
            ``z`` ``(B, out)``, not normalised.
        """
        return self.projector(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Projector and predictor.

        Args:
            x: ``(B, in_dim)`` pooled block features (all views concatenated).

        Returns:
            ``(z, p)``, each ``(B, out)`` and not normalised; ``p = predictor(z)``.
        """
        z = self.projector(x)
        return z, self.predictor(z)


class HeadEnsemble(nn.Module):
    """One :class:`IDHead` per chosen encoder block.

    Heads live in a ``ModuleDict`` keyed by the 1-based block number as a string (``"5"``), so
    state-dict keys read ``heads.5.projector.0.weight``.

    Args:
        blocks: 1-based block numbers, e.g. ``[17, ..., 24]`` for ViT-L.
        in_dim: encoder width ``D``.
        widths: head widths shared by all heads.
        act: ``"gelu"`` or ``"relu"``.
        predictor_final_bn: keep the predictor's final BN.
        sync_bn: synchronise BN statistics across ranks.

    Raises:
        MimcliError: for an empty, repeated or non-positive block list.
    """

    def __init__(
        self,
        blocks: Sequence[int],
        in_dim: int,
        widths: HeadWidths,
        act: str = "gelu",
        predictor_final_bn: bool = True,
        sync_bn: bool = False,
    ) -> None:
        super().__init__()
        blocks = list(blocks)
        if not blocks:
            raise MimcliError("choose at least one block for the heads")
        if len(set(blocks)) != len(blocks) or any(int(b) < 1 for b in blocks):
            raise MimcliError(
                f"head blocks {blocks}: use distinct block numbers counted from 1 (1 = first)"
            )
        self.heads = nn.ModuleDict(
            {
                str(int(b)): IDHead(in_dim, widths, act, predictor_final_bn, sync_bn)
                for b in sorted(blocks)
            }
        )

    @property
    def blocks(self) -> list[int]:
        """The 1-based block numbers that have a head, ascending."""
        return [int(k) for k in self.heads]

    def head(self, block: int) -> IDHead:
        """The head of 1-based ``block``."""
        return cast(IDHead, self.heads[str(block)])

    def forward(self, features: dict[int, Tensor]) -> dict[int, tuple[Tensor, Tensor]]:
        """Run every head on its block's features.

        Args:
            features: 1-based block number → ``(B, D)`` features (all views concatenated);
                blocks without a head are ignored.

        Returns:
            Block number → ``(z, p)``, each ``(B, out)``.

        Raises:
            KeyError: when a head's block is missing from ``features``.
        """
        missing = [b for b in self.blocks if b not in features]
        if missing:
            raise KeyError(f"no features for head blocks {missing}; got {sorted(features)}")
        return {b: self.heads[str(b)](features[b]) for b in self.blocks}
