"""Exponential moving averages of networks: the exported encoder EMA (with its warm-up
schedule) and the momentum networks of objectives (NNCLR's target projector, ConMIM's momentum
encoder). One update rule for both."""

from __future__ import annotations

import copy

import torch
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy to be moved by :func:`ema_update` (never trained by the optimiser)."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online`` for parameters; buffers (BN
    running stats) are copied."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o.detach(), 1.0 - momentum)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        t.copy_(o)


def ema_decay(step: int, decay: float) -> float:
    """The encoder EMA's decay at ``step``, timm ModelEmaV3-style warm-up:
    ``min(decay, 1 - (1 + step)^(-2/3))``, so short runs still move the EMA (after 100 steps it
    averages over roughly the last 20)."""
    return min(decay, 1.0 - (1.0 + step) ** (-2.0 / 3.0))
