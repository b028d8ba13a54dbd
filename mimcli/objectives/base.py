"""What every refinement objective shares: the interface the training loop drives, and the
building blocks several objectives need (block taps for heads, random patch masks, masked and
visible-token encoder passes, frozen teachers on the student's patch grid).

The loop in :mod:`mimcli.refine` owns the encoder, its EMA, the optimiser, the data, runs,
resume and DDP. An :class:`Objective` owns everything else a method adds: heads, projectors,
decoders, mask tokens (trainable, in ``state_dict``), queues and momentum networks (not trained
by the optimiser, in ``state_dict``) and frozen teachers (neither: reloaded from ``--teacher`` on
resume, never written to checkpoints). Each step the loop calls::

    loss, metrics = objective.step(encoder, batch, stage, step)   # forward + losses
    ... backward, optimiser step ...
    objective.after_step(encoder, stage, step)                    # queues, momentum updates
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image
from torch import Tensor, nn

from mimcli.errors import MimcliError
from mimcli.views import MultiCropTransform, ViewBatch, ViewConfig

Transform = Callable[[Image.Image], list[Tensor]]


@dataclass
class ObjectiveContext:
    """What an objective is built from (all resolved by the loop before construction).

    Attributes:
        cfg: the run's ``RefineConfig`` (objective options: ``teacher``, ``mask_ratio``,
            ``momentum``, ``image_weight``, ``mimic_weight``, ``reconstruction``, ``decoder``,
            ``temperature``, ``topk``, ``queue_size``, ``head_width``, ``head_input``...; options
            left at None were already filled from the objective's :meth:`Objective.defaults`).
        encoder: the trainable encoder (timm ViT, ``dynamic_img_size`` where supported).
        loaded: the ``LoadedModel`` it came from (arch, pretrained_cfg, decoder weights, ...).
        blocks: 1-based blocks chosen for heads (objectives without per-block heads may ignore).
        views: crop sizes, scales, mean/std and interpolation of the training views.
        device: where training runs.
        dataset_size: number of training images (queue sizing).
        seed: run seed (objectives seed their own generators from it).
        sync_bn: build BatchNorms synchronised across ranks (True under DDP).
        totals: steps of each stage, ``{"heads": H, "refine": R}`` (momentum schedules).
        extra: loop-provided extras (``labels_by_id``: labels of the dataset ids, monitoring
            only, or None for unlabelled data).
    """

    cfg: Any
    encoder: nn.Module
    loaded: Any
    blocks: list[int]
    views: ViewConfig
    device: torch.device
    dataset_size: int
    seed: int
    sync_bn: bool = False
    totals: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class of refinement objectives (see the module docstring for the contract).

    Subclasses set ``name`` and implement :meth:`step`; most also override :meth:`defaults`,
    :meth:`transform`, :meth:`after_step` and :meth:`describe`.
    """

    name: ClassVar[str] = ""
    # whether --blocks means anything to this objective (per-block heads)
    uses_blocks: ClassVar[bool] = False

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__()
        self.ctx = ctx

    # -- options --
    @classmethod
    def defaults(cls, depth: int, embed_dim: int) -> dict[str, Any]:
        """Values for ``RefineConfig`` fields the user left at None (``blocks``, ``head_input``,
        ``local_crops``, ``freeze_blocks``, ``lr``, ``temperature``, ``photometric``,
        ``mask_ratio``, ``momentum``...). Anything not given here falls back to the NNA value."""
        return {}

    # -- data --
    def transform(self) -> Transform:
        """PIL image -> list of view tensors for one sample (default: the multi-crop views)."""
        return MultiCropTransform(self.ctx.views)

    # -- optimisation --
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser trains in both stages (heads, projectors, decoders, mask
        tokens). Momentum networks and queues hold no trainable parameters."""
        return [p for p in self.parameters() if p.requires_grad]

    def step(
        self, encoder: nn.Module, batch: ViewBatch, stage: str, step: int
    ) -> tuple[Tensor, dict[str, float]]:
        """Forward pass and loss of one step.

        Args:
            encoder: the trainable encoder; in the ``heads`` stage it is frozen (eval mode, not in
                the optimiser), so compute its features without gradient unless something
                trainable sits upstream of it (a mask token).
            batch: the views made by :meth:`transform` for this rank's samples, plus dataset
                indices (seeding, queue ids) and labels (monitoring only; never used for loss).
            stage: ``"heads"`` (warm-up) or ``"refine"``.
            step: step within the stage, counted from 0 (seed per-step randomness from it so a
                resumed run repeats the same masks).

        Returns:
            ``(loss, metrics)``: a scalar loss to minimise and floats to log.
        """
        raise NotImplementedError

    def after_step(self, encoder: nn.Module, stage: str, step: int) -> None:
        """Called after the optimiser step: enqueue, update momentum networks."""

    def rank_state(self) -> Any:
        """State that differs between ranks (a per-rank random generator), gathered from every
        rank into the checkpoint; None when there is none."""
        return None

    def load_rank_state(self, state: Any) -> None:
        """Restore what :meth:`rank_state` returned on this rank."""

    def describe(self) -> dict[str, Any]:
        """Resolved settings for ``config.json`` (key ``objective`` = the name)."""
        return {"objective": self.name}

    def views_summary(self) -> str:
        """How many views of which size each image gives (the refine banner)."""
        v = self.ctx.views
        text = f"2x{v.global_size}px"
        return text + (f" + {v.local_crops}x{v.local_size}px" if v.local_crops else "")

    def summary(self) -> str:
        """One line for the refine banner: what was built (heads, teachers, decoder...)."""
        return ", ".join(f"{k} {v}" for k, v in self.describe().items() if k != "objective")


# --- building blocks -------------------------------------------------------------------------


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


def step_generator(seed: int, stage: str, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator determined by (seed, stage, step, salt): masks and draws repeat exactly
    when a run resumes, without checkpointing generator state."""
    stage_id = {"heads": 1, "refine": 2}.get(stage, 3)
    return torch.Generator().manual_seed(((seed * 7_919 + stage_id) * 1_000_003 + step) * 31 + salt)


def random_mask(batch: int, num_patches: int, ratio: float, generator: torch.Generator) -> Tensor:
    """``(batch, num_patches)`` bool, True = masked; exactly ``round(ratio * N)`` per row
    (at least 1, at most N - 1), positions uniform at random."""
    if not 0 < ratio < 1:
        raise MimcliError(f"--mask-ratio must lie strictly between 0 and 1, got {ratio}")
    n_mask = min(num_patches - 1, max(1, int(round(ratio * num_patches))))
    noise = torch.rand(batch, num_patches, generator=generator)
    order = noise.argsort(dim=1)
    mask = torch.zeros(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, order[:, :n_mask], True)
    return mask


def patch_grid(encoder: nn.Module, images: Tensor) -> tuple[int, int]:
    """Patch grid (rows, cols) the encoder makes of ``images``."""
    ph, pw = encoder.patch_embed.patch_size  # type: ignore[union-attr]
    return images.shape[-2] // ph, images.shape[-1] // pw


def _embed_patches(encoder: nn.Module, images: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Patch embeddings as (B, N, D) plus the shape ``_pos_embed`` expects back."""
    x = encoder.patch_embed(images)  # type: ignore[operator]
    shape = tuple(x.shape)
    return x.reshape(x.shape[0], -1, x.shape[-1]), shape


def run_blocks(encoder: nn.Module, x: Tensor) -> Tensor:
    """The encoder's blocks in order; with ``encoder.set_grad_checkpointing(True)``
    (``--grad-checkpointing``) each block is recomputed in backward (non-reentrant, so frozen
    parameters still get no gradient)."""
    # not while the blocks are out of autograd (head warm-up): the recompute in backward would
    # see the parameters back in autograd and record different tensors
    checkpointing = (
        bool(getattr(encoder, "grad_checkpointing", False))
        and torch.is_grad_enabled()
        and any(p.requires_grad for p in encoder.blocks.parameters())  # type: ignore[union-attr]
    )
    for block in encoder.blocks:  # type: ignore[union-attr]
        if checkpointing:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


def encode_masked(
    encoder: nn.Module, images: Tensor, mask: Tensor | None, mask_token: Tensor | None
) -> Tensor:
    """All tokens through the encoder with masked patch embeddings replaced by ``mask_token``
    (before position embeddings are added, as in BEiT/SimMIM/ConMIM).

    Args:
        encoder: timm ``VisionTransformer`` (or ``mimcli_vit_postnorm``).
        images: (B, 3, H, W) normalised.
        mask: (B, N) bool, True = replace; None = no masking.
        mask_token: (D,) or (1, 1, D) learned token (used when ``mask`` is given).

    Returns:
        (B, prefix + N, D) tokens after the final norm.
    """
    x, shape = _embed_patches(encoder, images)
    if mask is not None:
        if mask_token is None:
            raise ValueError("a mask needs a mask token")
        m = mask.to(x.device)[..., None]
        x = torch.where(m, mask_token.reshape(1, 1, -1).to(x.dtype), x)
    x = encoder._pos_embed(x.reshape(shape))  # type: ignore[operator]
    x = encoder.norm_pre(x)  # type: ignore[operator]
    return encoder.norm(run_blocks(encoder, x))  # type: ignore[operator]


def encode_visible(encoder: nn.Module, images: Tensor, keep: Tensor) -> Tensor:
    """MAE-style pass over the visible patches only (positions added before dropping).

    Args:
        encoder: timm ``VisionTransformer`` (or ``mimcli_vit_postnorm``).
        images: (B, 3, H, W) normalised.
        keep: (B, K) int64 indices of the visible patches (same K for every row).

    Returns:
        (B, prefix + K, D) tokens after the final norm, prefix tokens first.
    """
    x, shape = _embed_patches(encoder, images)
    x = encoder._pos_embed(x.reshape(shape))  # type: ignore[operator]
    prefix = int(getattr(encoder, "num_prefix_tokens", 1))
    index = keep.to(x.device)[..., None].expand(-1, -1, x.shape[-1])
    x = torch.cat([x[:, :prefix], torch.gather(x[:, prefix:], 1, index)], dim=1)
    x = encoder.norm_pre(x)  # type: ignore[operator]
    return encoder.norm(run_blocks(encoder, x))  # type: ignore[operator]


def check_maskable(encoder: nn.Module, objective: str) -> None:
    """Masked / visible-token passes need timm's ViT layout (patch_embed, _pos_embed, blocks)."""
    needed = ("patch_embed", "_pos_embed", "norm_pre", "blocks", "norm")
    if not all(hasattr(encoder, n) for n in needed):
        raise MimcliError(
            f"--objective {objective} needs a ViT in timm's VisionTransformer layout; "
            f"{type(encoder).__name__} is not supported (use --objective nna)"
        )


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
        from mimcli.models.sources import load_model

        try:
            loaded = load_model(source)
        except MimcliError as exc:
            raise MimcliError(
                f"--teacher {source}: cannot load it ({exc}). Pass --teacher with a model this "
                "machine can read: a local folder, a checkpoint file, or a cached hf-hub:/timm "
                "name"
            ) from None
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
