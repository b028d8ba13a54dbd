"""Frozen teachers (``refine --teacher``): any MODEL the resolver reads, fed the student's images
re-normalised and resized for it, its patch features resampled to the student's patch grid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mimcli.errors import MimcliError
from mimcli.models.masked import patch_grid
from mimcli.models.sources import load_model
from mimcli.views import ViewConfig


@dataclass
class TeacherFeatures:
    """Frozen-teacher outputs for a batch, on the student's patch grid.

    Attributes:
        cls: (B, Dt) class token after the teacher's final norm.
        patches: (B, Hs * Ws, Dt) patch tokens after the final norm, resampled to the student's
            grid (bilinear) when the grids differ.
        pooled: (B, Dt) mean of the teacher's own patch tokens.
    """

    cls: Tensor
    patches: Tensor
    pooled: Tensor


class Teacher:
    """A frozen encoder loaded through the MODEL resolver (``--teacher``).

    Not an ``nn.Module`` attribute of the objective on purpose: its weights never enter
    checkpoints or the optimiser; a resumed run reloads it from the same source.

    Images arrive normalised for the student; they are mapped back to pixels, resized to the
    teacher's input size when it is fixed and different, and normalised with the teacher's own
    mean/std (e.g. CLIP's).
    """

    def __init__(self, source: str, student_views: ViewConfig, device: torch.device) -> None:
        try:
            loaded = load_model(source)
        except MimcliError as exc:
            if "attention-head count" in str(exc):  # --num-heads is MODEL's; a teacher: suffix
                advice = f"give the teacher's head count as --teacher {source}#heads=N"
            else:
                advice = (
                    "Pass --teacher with a model this machine can read: a local folder, a "
                    "checkpoint file, or a cached hf-hub:/timm name"
                )
            raise MimcliError(f"--teacher {source}: cannot load it ({exc}). {advice}") from None
        self.source = source
        self.loaded = loaded
        self.model = loaded.model.to(device).eval().requires_grad_(False)
        if getattr(self.model, "num_prefix_tokens", 0) < 1:
            raise MimcliError(f"--teacher {source}: needs a ViT with a class token")
        cfg = loaded.pretrained_cfg
        self.input_size = tuple(int(s) for s in cfg.get("input_size", (3, 224, 224))[-2:])
        self.dim = int(loaded.embed_dim)
        shape = (1, -1, 1, 1)
        self.student_mean = torch.tensor(student_views.mean, device=device).reshape(shape)
        self.student_std = torch.tensor(student_views.std, device=device).reshape(shape)
        self.mean = torch.tensor(cfg.get("mean", student_views.mean), device=device).reshape(shape)
        self.std = torch.tensor(cfg.get("std", student_views.std), device=device).reshape(shape)

    def describe(self) -> dict[str, Any]:
        """What the teacher is and how images reach it (for config.json and cards)."""
        patch = self.model.patch_embed.patch_size  # type: ignore[union-attr]
        return {
            "source": self.source,
            "arch": self.loaded.arch,
            "dim": self.dim,
            "depth": len(self.model.blocks),  # type: ignore[arg-type]
            "input_size": list(self.input_size),
            "patch_size": list(patch),
            "mean": [round(float(v), 4) for v in self.mean.flatten()],
            "std": [round(float(v), 4) for v in self.std.flatten()],
            "features": "final-norm tokens, patch grid resampled (bilinear) to the student's",
        }

    @torch.no_grad()
    def features(self, images: Tensor, grid: Sequence[int]) -> TeacherFeatures:
        """Teacher features of student-normalised ``images``; patches on ``grid`` (rows, cols)."""
        pixels = images.float() * self.student_std + self.student_mean
        if tuple(pixels.shape[-2:]) != self.input_size:
            pixels = F.interpolate(
                pixels, size=self.input_size, mode="bicubic", align_corners=False
            ).clamp(0, 1)
        x = (pixels - self.mean) / self.std
        tokens = self.model.forward_features(x)
        prefix = int(self.model.num_prefix_tokens)
        cls, patches = tokens[:, 0], tokens[:, prefix:]
        pooled = patches.mean(dim=1)
        th, tw = patch_grid(self.model, x)
        if (th, tw) != tuple(grid):
            b, _, d = patches.shape
            planes = patches.transpose(1, 2).reshape(b, d, th, tw)
            planes = F.interpolate(planes, size=tuple(grid), mode="bilinear", align_corners=False)
            patches = planes.flatten(2).transpose(1, 2)
        return TeacherFeatures(cls=cls.float(), patches=patches.float(), pooled=pooled.float())


def load_teachers(sources: Sequence[str], views: ViewConfig, device: torch.device) -> list[Teacher]:
    """One :class:`Teacher` per ``--teacher`` value, in order."""
    return [Teacher(s, views, device) for s in sources]
