"""MimCo (Zhou et al., 2022, "MimCo: Masked Image Modeling Pre-training with Contrastive Teacher",
arXiv 2209.03063) as a refinement objective: a frozen contrastive teacher sees the unmasked view,
the student sees it masked and learns to pick the teacher's features with two InfoNCE losses.

What is implemented (METHOD §4):

- one view per image (crop + flip; the photometric augmentations of global view 0 with
  ``--photometric``); the frozen teacher (``--teacher``, exactly one) sees it unmasked, the student
  sees it with a random ``--mask-ratio`` of its patch embeddings replaced by a learned mask token
  (before position embeddings, all tokens through the encoder, BEiT/SimMIM style);
- a patch head (per token: Linear D -> H, LayerNorm, GELU, Linear H -> Dt) and an image head (same
  shape, on the student's class token after the final norm); ``H`` from ``--head-width``;
- teacher targets: its patch tokens after the final norm, resampled (bilinear) to the student's
  patch grid, and its class token after the final norm as the global feature;
- :func:`patch_contrastive_loss`: each masked student patch must pick the teacher feature at the
  same position among that image's teacher patch features (negatives from the same image only);
  :func:`image_contrastive_loss`: the student's global feature must pick its own image's teacher
  global feature among those of every image of the global batch (all ranks);
- total loss = patch + ``--image-weight`` × image; cosine similarities and softmax in float32.
- stages: ``heads`` trains the heads and the mask token with the encoder frozen (the mask token
  sits upstream of the encoder, so the encoder runs with its parameters switched out of autograd
  and only the token's path is recorded); ``refine`` trains everything.

Defaults: teacher ``vit_small_patch16_224.dino`` (timm; the paper used MoCo v3 / MoBY teachers),
tau 0.2 (unverified: METHOD gives 0.1-0.2), mask ratio 0.6 (unverified: 40-75%), image weight 1.0
(unverified), LayerNorm heads (unverified: BN would need synchronising over every token of every
rank; the targets come from a frozen teacher, so no normalisation is needed against collapse),
intra-image patch negatives (unverified), teacher global = class token (unverified; the mean patch
token is the alternative), no local crops, photometric augmentations off (MIM-style crop + flip;
unverified), blocks ``last1`` (the loss only reads the last block).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimcli import distributed as dist
from mimcli.errors import MimcliError
from mimcli.heads import head_widths
from mimcli.models.masked import check_maskable, encode_masked, patch_grid, random_mask
from mimcli.models.teacher import Teacher
from mimcli.objectives.base import Objective, ObjectiveContext, Transform
from mimcli.objectives.parts import SingleView, outside_autograd, step_generator
from mimcli.runtime import autocast as runtime_autocast
from mimcli.views import ViewBatch

DEFAULT_TEACHER = "vit_small_patch16_224.dino"


class Contrast(NamedTuple):
    """An InfoNCE loss and the top-1 accuracy of its rows (detached, in [0, 1])."""

    loss: Tensor
    accuracy: Tensor


def _check_tau(tau: float) -> None:
    if tau <= 0:
        raise ValueError(f"temperature must be positive, got {tau}")


def _contrast(logits: Tensor, targets: Tensor) -> Contrast:
    loss = F.cross_entropy(logits, targets)
    accuracy = (logits.detach().argmax(dim=-1) == targets).float().mean()
    return Contrast(loss, accuracy)


def patch_contrastive_loss(
    pred: Tensor, target: Tensor, mask: Tensor, tau: float, check_mask: bool = True
) -> Contrast:
    """Patch-level InfoNCE of MimCo with negatives from the same image.

    Row ``(b, i)`` for every masked position ``i`` of image ``b`` scores the student's prediction
    against all ``N`` teacher features of image ``b``: ``logits[j] = <p_bi, t_bj> / tau``
    (L2-normalised, float32); the target is ``j = i``.

    Every row is scored and the unmasked ones are weighted out (no boolean indexing, whose size
    depends on the mask: on a GPU it would wait for the device).

    Args:
        pred: ``(B, N, D)`` student patch-head outputs (receive the gradient).
        target: ``(B, N, D)`` teacher patch features on the student's grid (detached here).
        mask: ``(B, N)`` bool, True = masked; only masked positions are scored.
        tau: temperature.
        check_mask: raise if the mask selects no patch, which reads the mask's values; a step
            passes False for masks of :func:`mimcli.models.masked.random_mask` (at least one
            masked patch per row by construction).

    Returns:
        Cross-entropy averaged over all masked positions of the batch, and its top-1 accuracy.
    """
    if pred.dim() != 3 or target.shape != pred.shape or mask.shape != pred.shape[:2]:
        raise ValueError(
            f"pred and target must both be (B, N, D) and mask (B, N); got {tuple(pred.shape)}, "
            f"{tuple(target.shape)}, {tuple(mask.shape)}"
        )
    _check_tau(tau)
    if check_mask and not bool(mask.any()):
        raise ValueError("the mask selects no patch")
    b, n = pred.shape[:2]
    weights = mask.to(pred.device, torch.float32, non_blocking=True).reshape(b * n)
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target.detach().float(), dim=-1)
    logits = torch.bmm(p, t.transpose(1, 2)) / tau  # (B, N, N): row i = position i's scores
    logits = logits.reshape(b * n, n)
    positions = torch.arange(n, device=pred.device).repeat(b)
    rows = F.cross_entropy(logits, positions, reduction="none")
    hits = (logits.detach().argmax(dim=-1) == positions).float()
    count = weights.sum()
    return Contrast((rows * weights).sum() / count, (hits * weights).sum() / count)


def image_contrastive_loss(
    pred: Tensor, target_all: Tensor, tau: float, offset: int = 0
) -> Contrast:
    """Image-level InfoNCE of MimCo: each student global feature against the teacher global
    features of the whole (all-ranks) batch, ``logits[i, j] = <p_i, t_j> / tau`` (L2-normalised,
    float32), target ``offset + i``.

    Args:
        pred: ``(B, D)`` student image-head outputs of this rank (receive the gradient).
        target_all: ``(M, D)`` teacher global features of the global batch (detached here).
        tau: temperature.
        offset: row of ``target_all`` holding this rank's first sample (``rank * B``).

    Returns:
        Cross-entropy averaged over the ``B`` rows, and its top-1 accuracy.
    """
    if pred.dim() != 2 or target_all.dim() != 2 or target_all.shape[1] != pred.shape[1]:
        raise ValueError(
            f"pred must be (B, D) and target_all (M, D); got {tuple(pred.shape)}, "
            f"{tuple(target_all.shape)}"
        )
    if offset < 0 or offset + pred.shape[0] > target_all.shape[0]:
        raise ValueError(
            f"offset {offset} + batch {pred.shape[0]} exceeds the {target_all.shape[0]} targets"
        )
    _check_tau(tau)
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target_all.detach().float(), dim=-1)
    targets = torch.arange(pred.shape[0], device=pred.device) + offset
    return _contrast(p @ t.T / tau, targets)


# --- the objective ---------------------------------------------------------------------------


def feature_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear -> LayerNorm -> GELU -> Linear over the last dimension (tokens or images)."""
    head = nn.Sequential(
        nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim)
    )
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return head


class MimCoObjective(Objective):
    """MimCo: masked student vs frozen contrastive teacher, patch- and image-level InfoNCE."""

    name = "mimco"

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        sources = list(cfg.teacher or [])
        if len(sources) > 1:
            raise MimcliError(
                f"--objective mimco takes one --teacher, got {len(sources)}: {', '.join(sources)}"
            )
        self.tau = float(cfg.temperature)
        self.mask_ratio = float(cfg.mask_ratio)
        self.image_weight = float(cfg.image_weight)
        check_maskable(ctx.encoder, self.name)
        self.teacher_default = not sources
        # a plain attribute, not a submodule: never in state_dict, the optimiser or .to()
        self.teacher = Teacher(sources[0] if sources else DEFAULT_TEACHER, ctx.views, ctx.device)
        dim, teacher_dim = int(ctx.loaded.embed_dim), self.teacher.dim
        spec = cfg.head_width
        self.hidden = head_widths(
            dim, int(spec) if str(spec).isascii() and str(spec).isdigit() else spec
        ).hidden
        self.mask_token = nn.Parameter(torch.empty(dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.patch_head = feature_head(dim, self.hidden, teacher_dim)
        self.image_head = feature_head(dim, self.hidden, teacher_dim)

    @classmethod
    def defaults(cls, depth: int, embed_dim: int) -> dict[str, Any]:
        return {
            "blocks": "last1",
            "local_crops": 0,
            "photometric": False,
            "temperature": 0.2,
            "mask_ratio": 0.6,
            "image_weight": 1.0,
        }

    def transform(self) -> Transform:
        return SingleView(self.ctx.views)

    def views_summary(self) -> str:
        return f"1x{self.ctx.views.global_size}px (masked for the student, whole for the teacher)"

    def describe(self) -> dict[str, Any]:
        return {
            "objective": self.name,
            "teacher": {**self.teacher.describe(), "default": self.teacher_default},
            "teacher_global": "cls",
            "mask_ratio": self.mask_ratio,
            "temperature": self.tau,
            "image_weight": self.image_weight,
            "patch_negatives": "same image",
            "head_hidden": self.hidden,
            "head_norm": "layernorm",
        }

    def summary(self) -> str:
        t = self.teacher
        default = " (default)" if self.teacher_default else ""
        return (
            f"teacher {t.source}{default} ({t.loaded.arch}, dim {t.dim}); mask "
            f"{self.mask_ratio}; tau {self.tau}; image weight {self.image_weight}; heads "
            f"{self.mask_token.numel()}->{self.hidden}->{t.dim}"
        )

    def masks(self, batch: int, num_patches: int, stage: str, step: int) -> Tensor:
        """``(batch, N)`` bool masks of this rank: one draw for the global batch per
        (seed, stage, step), sliced by rank, so resumed and multi-process runs repeat them."""
        world, rank = dist.world_size(), dist.rank()
        gen = step_generator(self.ctx.seed, stage, step)
        full = random_mask(batch * world, num_patches, self.mask_ratio, gen)
        return full[rank * batch : (rank + 1) * batch]

    def step(
        self, encoder: nn.Module, batch: ViewBatch, stage: str, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Patch + weighted image InfoNCE of the masked view against the teacher's unmasked one.

        In the ``heads`` stage the encoder's parameters stay out of autograd; the gradient still
        reaches the mask token through the encoder.
        """
        device = self.ctx.device
        images = batch.views[0].to(device, non_blocking=True)
        b = images.shape[0]
        grid = patch_grid(encoder, images)
        mask = self.masks(b, grid[0] * grid[1], stage, step).to(device, non_blocking=True)
        autocast = runtime_autocast(device)
        with autocast:
            target = self.teacher.features(images, grid)
        with autocast, outside_autograd(encoder, enabled=stage == "heads"):
            tokens = encode_masked(encoder, images, mask, self.mask_token)
            prefix = int(getattr(encoder, "num_prefix_tokens", 1))
            patch_pred = self.patch_head(tokens[:, prefix:])
            image_pred = self.image_head(tokens[:, 0])
        patch = patch_contrastive_loss(
            patch_pred.float(), target.patches, mask, self.tau, check_mask=False
        )
        image = image_contrastive_loss(
            image_pred.float(), dist.gather(target.cls), self.tau, offset=dist.rank() * b
        )
        loss = patch.loss + self.image_weight * image.loss
        metrics = {
            "loss_patch": patch.loss.detach(),
            "loss_image": image.loss.detach(),
            "acc_patch": patch.accuracy,
            "acc_image": image.accuracy,
        }
        return loss, metrics
