"""MR-MAE, "Mimic before Reconstruct" (Gao et al., 2023, arXiv 2303.05475), as a refinement
objective: the encoder sees the visible 25% of the patches (MAE style, no mask token); a linear
head per frozen teacher regresses the encoder's visible tokens onto the teacher's patch features
at the same positions (mimic), and the MAE decoder rebuilds the hidden 75% from them
(norm-pixel reconstruction, He et al., 2022).

What is implemented (METHOD §5):

- one crop + flip view per image (MAE's augmentation; ``--photometric`` adds BYOL's colour
  augmentations), ``--mask-ratio`` 0.75, masks drawn from (seed, stage, step, rank);
- teachers (``--teacher``, repeatable; default CLIP ``vit_base_patch16_clip_224.openai`` and DINO
  ``vit_base_patch16_224.dino``) see the whole unmasked view, normalised with their own mean/std,
  and give patch features on the student's grid (resampled when the grids differ);
- mimic loss per teacher: mean squared error between ``Linear(D -> Dt)(visible token)`` and the
  teacher's feature at that position, layer-normalised per token (no affine). The normalisation
  and the plain MSE are our choice (unverified): they put CLIP and DINO targets on one scale;
- reconstruction: MAE's decoder on the visible latents, MSE against per-patch normalised pixels
  on the masked patches. The decoder is ``--decoder PATH``, else the one shipped with MODEL
  (MAE ``_full`` checkpoint or ``decoder.safetensors`` in the folder), else a fresh one
  (:func:`mimcli.models.mae_decoder.fresh_spec`) warmed up in the ``heads`` stage;
  ``--no-reconstruction`` drops it (mimic only);
- loss = reconstruction + ``--mimic-weight`` (1.0, unverified) × mean over teachers of the mimic
  losses. Stage ``heads``: mimic heads and decoder train on the frozen encoder; ``refine``:
  everything trains.

Not implemented: the paper's focused mimicking (teacher-attention token selection), multi-layer
fusion and convolutional stem; the mimic target is the teacher's last-block patch output.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from mimcli import distributed as dist
from mimcli.errors import MimcliError
from mimcli.models.mae_decoder import (
    MaeDecoder,
    check_decoder_fits,
    fresh_spec,
    load_decoder,
    read_decoder_file,
    reconstruction_loss,
)
from mimcli.models.masked import check_maskable, encode_visible, masked_count, random_mask
from mimcli.models.teacher import Teacher, load_teachers
from mimcli.objectives.base import Objective, ObjectiveContext
from mimcli.objectives.parts import SingleView, step_generator
from mimcli.runtime import autocast as runtime_autocast
from mimcli.views import ViewBatch

DEFAULT_TEACHERS = ("vit_base_patch16_clip_224.openai", "vit_base_patch16_224.dino")
TARGET_NORM_EPS = 1e-6


def mimic_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error to per-token layer-normalised teacher features (float32).

    Args:
        pred: ``(B, K, Dt)`` mimic-head outputs on the visible tokens.
        target: ``(B, K, Dt)`` teacher features at the same positions (detached here).

    Returns:
        Scalar: mean over images, tokens and channels.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    target = target.detach().float()
    target = F.layer_norm(target, target.shape[-1:], eps=TARGET_NORM_EPS)
    return F.mse_loss(pred.float(), target)


def visible_positions(mask: Tensor, visible: int | None = None) -> Tensor:
    """``(B, K)`` int64 positions of the unmasked patches, ascending (same K for every row).

    ``visible`` is K when the caller knows it (:func:`mimcli.models.masked.masked_count`);
    otherwise it is counted in the mask's first row (a read of the mask's values)."""
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    if visible is None:
        visible = int((~mask[0]).sum())
    return order[:, :visible]


def gather_tokens(tokens: Tensor, positions: Tensor) -> Tensor:
    """``tokens`` (B, N, D) at ``positions`` (B, K) -> (B, K, D)."""
    index = positions.to(tokens.device)[..., None].expand(-1, -1, tokens.shape[-1])
    return torch.gather(tokens, 1, index)


class MRMAEObjective(Objective):
    """MR-MAE: mimic heads (one ``Linear(D -> Dt)`` per teacher) on the visible tokens plus the
    MAE decoder's norm-pixel reconstruction of the masked patches."""

    name = "mrmae"

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        encoder = ctx.encoder
        check_maskable(encoder, self.name)
        self.mask_ratio = float(cfg.mask_ratio)
        self.mimic_weight = float(cfg.mimic_weight)
        self.reconstruction = bool(cfg.reconstruction)
        if not self.reconstruction and cfg.decoder is not None:
            raise MimcliError("--decoder has no use with --no-reconstruction; drop one of them")
        self.prefix = int(getattr(encoder, "num_prefix_tokens", 1))
        if self.prefix < 1:
            raise MimcliError("--objective mrmae needs an encoder with a class token")
        ph, pw = (int(s) for s in encoder.patch_embed.patch_size)  # type: ignore[union-attr]
        if ph != pw:
            raise MimcliError(f"--objective mrmae needs square patches, got {ph}x{pw}")
        self.patch_size = ph
        size = ctx.views.global_size
        self.grid = (size // ph, size // ph)
        dim = int(ctx.loaded.embed_dim)

        # Teachers are a plain list, not modules: never in state_dict or the optimiser.
        self.teacher_sources = list(cfg.teacher) or list(DEFAULT_TEACHERS)
        self.teachers: list[Teacher] = load_teachers(self.teacher_sources, ctx.views, ctx.device)
        self.mimic_heads = nn.ModuleList(nn.Linear(dim, t.dim) for t in self.teachers)
        for head in self.mimic_heads:
            nn.init.zeros_(head.bias)

        self.decoder: MaeDecoder | None = None
        self.decoder_origin = "none: mimic only"
        if self.reconstruction:
            self.decoder, self.decoder_origin = self._build_decoder(dim)
            check_decoder_fits(self.decoder.spec, dim, self.grid, ph, self.decoder_origin)

    def _build_decoder(self, dim: int) -> tuple[MaeDecoder, str]:
        """``--decoder PATH``, else the model's own, else a fresh one (warmed up in ``heads``)."""
        cfg, loaded = self.ctx.cfg, self.ctx.loaded
        if cfg.decoder is not None:
            origin = f"--decoder {cfg.decoder}"
            state, metadata = read_decoder_file(Path(cfg.decoder))
            return load_decoder(state, metadata, origin), origin
        if getattr(loaded, "decoder", None):
            origin = "shipped with MODEL"
            metadata = getattr(loaded, "decoder_metadata", None)
            return load_decoder(loaded.decoder, metadata, f"{loaded.source} ({origin})"), origin
        warm = self.ctx.totals.get("heads", 1)
        origin = "fresh, warmed up" if warm else "fresh, not warmed up (no heads stage)"
        return MaeDecoder(fresh_spec(dim, self.grid, self.patch_size)).initialise(), origin

    @classmethod
    def defaults(cls, depth: int, embed_dim: int) -> dict[str, Any]:
        """One MAE-style view, 75% masked, mimic weight 1; the loss sits on the last block.
        lr 1.5e-4 is MAE's pre-training base lr (unverified for refinement)."""
        return {
            "blocks": "last1",
            "local_crops": 0,
            "photometric": False,
            "mask_ratio": 0.75,
            "mimic_weight": 1.0,
            "freeze_blocks": 0,
            "lr": 1.5e-4,
        }

    def transform(self) -> Callable[[Image.Image], list[Tensor]]:
        return SingleView(self.ctx.views)

    def views_summary(self) -> str:
        size, visible = self.ctx.views.global_size, f"{1 - self.mask_ratio:.0%}"
        return f"1x{size}px ({visible} visible to the encoder, whole to the teachers)"

    def describe(self) -> dict[str, Any]:
        spec = self.decoder.spec.as_dict() if self.decoder is not None else None
        rec_loss = None
        if spec is not None:
            targets = "per-patch normalised pixels" if spec["norm_pix_loss"] else "pixels"
            rec_loss = f"MSE to {targets} on the masked patches"
        return {
            "objective": self.name,
            "teachers": [t.describe() for t in self.teachers],
            "decoder": self.decoder_origin,
            "decoder_spec": spec,
            "reconstruction": self.reconstruction,
            "mask_ratio": self.mask_ratio,
            "mimic_weight": self.mimic_weight,
            "mimic_loss": "MSE of Linear(D->Dt)(visible token) to per-token layer-normed teacher",
            "reconstruction_loss": rec_loss,
        }

    def _mimic_term(self) -> str:
        return "mimic" if len(self.teachers) == 1 else f"mean of {len(self.teachers)} mimic losses"

    def summary(self) -> str:
        teachers = ", ".join(f"{t.source} ({t.loaded.arch}, {t.dim})" for t in self.teachers)
        if self.decoder is None:
            loss = f"{self.mimic_weight} x {self._mimic_term()} (no reconstruction)"
            decoder = self.decoder_origin
        else:
            s = self.decoder.spec
            decoder = f"{self.decoder_origin} ({s.width} wide, {s.depth} blocks)"
            loss = f"reconstruction + {self.mimic_weight} x {self._mimic_term()}"
        return (
            f"teachers {teachers}; decoder {decoder}; mask ratio {self.mask_ratio}; loss = {loss}"
        )

    def step(
        self, encoder: nn.Module, batch: ViewBatch, stage: str, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Reconstruction of the masked patches plus the weighted mean mimic loss."""
        warmup = stage == "heads"
        device = self.ctx.device
        images = batch.views[0].to(device, non_blocking=True)
        b = images.shape[0]
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        gen = step_generator(self.ctx.seed, stage, step, salt=dist.rank())
        n = grid[0] * grid[1]
        mask = random_mask(b, n, self.mask_ratio, gen)
        keep = visible_positions(mask, n - masked_count(n, self.mask_ratio))
        keep = keep.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True)
        autocast = runtime_autocast(device)
        with autocast, torch.set_grad_enabled(not warmup):
            latent = encode_visible(encoder, images, keep)
        if warmup:
            latent = latent.detach()
        visible = latent[:, self.prefix :]
        metrics: dict[str, Tensor] = {}
        total = torch.zeros((), device=device)
        if self.decoder is not None:
            with autocast:
                pred = self.decoder(torch.cat([latent[:, :1], visible], dim=1), keep)
            rec = reconstruction_loss(
                pred, images, mask, self.patch_size, self.decoder.spec.norm_pix_loss
            )
            total = total + rec
            metrics["loss_rec"] = rec.detach()
        terms = []
        for i, (teacher, head) in enumerate(zip(self.teachers, self.mimic_heads, strict=True)):
            with autocast:
                target = gather_tokens(teacher.features(images, grid).patches, keep)
                out = head(visible)
            term = mimic_loss(out, target)
            terms.append(term)
            metrics[f"loss_mimic/{i}"] = term.detach()
        total = total + self.mimic_weight * torch.stack(terms).mean()
        return total, metrics
