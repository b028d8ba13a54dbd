"""Pieces several objectives share: the single-view transform, running a module outside
autograd (head warm-up behind a trainable mask token), and per-step generators that make masks
and draws repeat exactly on resume."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from PIL import Image
from torch import Tensor, nn

from mimcli.views import MultiCropTransform, ViewConfig


class SingleView:
    """PIL image -> ``[view]``: global view 0 of the multi-crop pipeline (random-resized crop at
    ``--global-scale`` + flip, plus BYOL's photometric augmentations when ``views.photometric``).
    A class, not a closure, so DataLoader workers can pickle it."""

    def __init__(self, views: ViewConfig) -> None:
        self.pipeline = MultiCropTransform(views).global0

    def __call__(self, img: Image.Image) -> list[Tensor]:
        return [self.pipeline(img)]


@contextmanager
def outside_autograd(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run ``module`` with its parameters out of autograd (``requires_grad`` False) and restore
    the flags afterwards. Inputs that need gradients (a mask token upstream) still get them; the
    parameters get none, because autograd only records what required gradients at forward time.
    Used for the head warm-up of objectives with a trainable mask token in front of the frozen
    encoder."""
    if not enabled:
        yield
        return
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def step_generator(seed: int, stage: str, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator determined by (seed, stage, step, salt): masks and draws repeat exactly
    when a run resumes, without checkpointing generator state."""
    stage_id = {"heads": 1, "refine": 2}.get(stage, 3)
    return torch.Generator().manual_seed(((seed * 7_919 + stage_id) * 1_000_003 + step) * 31 + salt)
