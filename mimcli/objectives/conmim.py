"""ConMIM (Yi et al., 2023, "Masked Image Modeling with Denoising Contrast", arXiv 2205.09616) as
a refinement objective: masked patches of a weak view must find, among the patch features of a
strong view of the same crop from a momentum encoder, the one at their own position (intra-image
patch InfoNCE).

What is implemented (METHOD §3):

- views: one RandomResizedCrop + horizontal flip shared by two photometric versions; weak = crop
  + flip only, strong = + colour jitter (0.4, 0.4, 0.2, 0.1; p 0.8), grayscale (p 0.2), Gaussian
  blur (p 0.5, sigma 0.1-2, kernel ~10% of the crop) and solarize (threshold 128, p 0.2). The blur
  and solarize probabilities are BYOL-like choices (unverified for ConMIM). No local crops;
  ``--photometric`` and ``--local-crops`` are refused (the objective makes its own views).
- online branch: the trainable encoder on the weak view, a random ``--mask-ratio`` of the patch
  embeddings replaced by a learned mask token (width D, trunc-normal 0.02) before the position
  embeddings, all tokens through the encoder (:func:`encode_masked`). Masks are drawn uniformly at
  random (BEiT/ConMIM use block-wise masking; not reproduced) from a generator seeded by (seed,
  stage, step, rank), so a resumed run repeats them.
- momentum branch: an EMA copy of the encoder on the strong view, unmasked, no gradient; momentum
  ``--momentum`` (0.996) rising to 1 by a cosine over the refine stage. During the head warm-up
  the encoder is frozen and the momentum encoder stays equal to it.
- a per-token projector Linear(D->H) -> BN -> GELU -> Linear(H->O) -> BN (no biases, BN over all
  tokens of the batch), with H, O = the ``--head-width`` predictor-hidden and output widths:
  4096 -> 256 for ViT-B and wider, as METHOD §3 gives for ConMIM. A momentum copy of it embeds
  the strong view; it follows the online projector with the scheduled momentum during
  refinement and with the base momentum during the head warm-up (our choice, so its targets are
  not left at a random projection).
- loss: :func:`conmim_loss`, tau 0.1 (``--temperature``), negatives only from the same image (no
  cross-rank gather); patch tokens only (no CLS).
- stages: ``heads`` warms up the projector and mask token with the encoder frozen (gradient flows
  through the encoder to the mask token, but the encoder's parameters get no ``.grad``);
  ``refine`` trains everything.
- other defaults: ``--mask-ratio`` 0.4 (BEiT's 40%, which ConMIM's recipe follows; unverified),
  ``--lr`` 4e-4 (MIM-Refiner's refinement rate; ConMIM itself is a pre-training recipe), no
  frozen blocks, features of the last block after the final norm (blocks ``last1``).

Position-only finding (``tests/test_objective_conmim.py::
test_content_free_images_are_solved_from_position_alone``): on constant grey images the weak and
strong views carry no content. The momentum features then differ only through the absolute
position embeddings (what all patches of an image share cannot tell positions apart), and each
online masked slot holds the mask token plus the position embedding of that slot. Measured on the
tiny test ViT (16 patches, chance 1/16 = 0.06, ln 16 = 2.77; mask ratio 0.4, tau 0.1, batch 8):

- at initialisation the positive already wins for 0.46-0.48 of the masked patches, loss 1.6;
- after 15 head-warm-up steps on one such batch (encoder frozen; only the mask token and the
  projector train) it wins for about 0.9, loss 0.7-0.9;
- control, position tables zeroed: loss exactly ln 16 at every step, accuracy at chance.

(On the striped test images the same untrained model scores 0.10-0.17 at loss 3.1: content
noise hides the position cue at first.) So the InfoNCE can be solved from position alone: part of
what the loss rewards on real images is matching position codes, not content, and the mask token
needs no context to do it. MAE's frozen sin-cos table has entries of size ~1, so the cue is likely
stronger there (not measured: no real checkpoints here). Cross-image negatives at the same
position, or removing each position's batch mean from the momentum features, would remove the
shortcut; neither is in ConMIM, so neither is done here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision import transforms as T

from mimcli import distributed as dist
from mimcli.ema import ema_update, momentum_copy
from mimcli.errors import MimcliError
from mimcli.heads import batch_norm, head_widths
from mimcli.models.masked import check_maskable, encode_masked, patch_grid, random_mask
from mimcli.objectives.base import Objective, ObjectiveContext
from mimcli.objectives.mimco import patch_contrastive_loss
from mimcli.objectives.parts import outside_autograd, step_generator
from mimcli.runtime import autocast as runtime_autocast
from mimcli.views import ViewBatch, ViewConfig

__all__ = [
    "ConMIMObjective",
    "WeakStrongTransform",
    "conmim_loss",
    "momentum_at",
    "positive_accuracy",
]


# --- loss ------------------------------------------------------------------------------------


def conmim_loss(
    pred: Tensor, target: Tensor, mask: Tensor, tau: float, check_mask: bool = True
) -> Tensor:
    """ConMIM's denoising patch InfoNCE.

    For image ``b`` and masked position ``i``: cross-entropy of the logits
    ``<pred[b, i], target[b, j]> / tau`` (L2-normalised, float32) over the image's ``N``
    positions ``j``, with target ``j = i``; negatives are the other patches of the same image
    only. The same intra-image contrast as MimCo's patch loss
    (:func:`mimcli.objectives.mimco.patch_contrastive_loss`), with momentum-encoder keys instead
    of a teacher's.

    Args:
        pred: ``(B, N, D)`` online projector outputs of the masked weak view (receive gradient).
        target: ``(B, N, D)`` momentum projector outputs of the strong view (detached here).
        mask: ``(B, N)`` bool, True = masked; the loss covers these positions only.
        tau: temperature.
        check_mask: raise if the mask selects no patch (a read of the mask's values; False
            for :func:`mimcli.models.masked.random_mask` masks, never empty).

    Returns:
        Scalar float32: mean over all masked positions of the batch.
    """
    return patch_contrastive_loss(pred, target, _bool_mask(mask, pred), tau, check_mask).loss


@torch.no_grad()
def positive_accuracy(
    pred: Tensor, target: Tensor, mask: Tensor, check_mask: bool = True
) -> Tensor:
    """Fraction of masked positions whose own-position key has the highest logit (chance 1/N),
    a 0-dim tensor on ``pred``'s device.

    Args:
        pred: ``(B, N, D)``; target: ``(B, N, D)``; mask: ``(B, N)`` bool.
        check_mask: as in :func:`conmim_loss`.
    """
    return patch_contrastive_loss(pred, target, _bool_mask(mask, pred), 1.0, check_mask).accuracy


def _bool_mask(mask: Tensor, pred: Tensor) -> Tensor:
    if mask.dtype != torch.bool or mask.shape != pred.shape[:2]:
        raise ValueError(f"mask must be bool {tuple(pred.shape[:2])}, got {tuple(mask.shape)}")
    return mask


def momentum_at(step: int, total: int, base: float) -> float:
    """Momentum for refine step ``step`` of ``total``: ``base`` rising to 1 by a half cosine,
    ``1 - (1 - base) * (1 + cos(pi * step / total)) / 2``."""
    if total <= 0:
        return base
    progress = min(1.0, max(0.0, step / total))
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- views -----------------------------------------------------------------------------------


class WeakStrongTransform:
    """PIL image -> ``[weak, strong]``: two photometric versions of one crop (see the module
    docstring). Randomness comes from torch's global generator, which the dataset reseeds per
    sample, so the views repeat exactly when a run resumes."""

    def __init__(self, views: ViewConfig, blur: float = 0.5, solarize: float = 0.2) -> None:
        size = views.global_size
        mode = T.InterpolationMode(views.interpolation)
        kernel = max(3, int(size * 0.1) // 2 * 2 + 1)
        self.crop = T.Compose(
            [
                T.RandomResizedCrop(size, scale=views.global_scale, interpolation=mode),
                T.RandomHorizontalFlip(),
            ]
        )
        self.strong = T.Compose(
            [
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur),
                T.RandomSolarize(128, p=solarize),
            ]
        )
        self.finish = T.Compose([T.ToTensor(), T.Normalize(views.mean, views.std)])

    def __call__(self, img: Image.Image) -> list[Tensor]:
        crop = self.crop(img)
        return [self.finish(crop), self.finish(self.strong(crop))]


# --- the objective ---------------------------------------------------------------------------


def token_projector(dim: int, hidden: int, out: int, sync_bn: bool) -> nn.Sequential:
    """Per-token MLP on ``(T, dim)`` rows; BN statistics over all ``T`` tokens passed."""
    return nn.Sequential(
        nn.Linear(dim, hidden, bias=False),
        batch_norm(hidden, sync=sync_bn),
        nn.GELU(),
        nn.Linear(hidden, out, bias=False),
        batch_norm(out, sync=sync_bn),
    )


class ConMIMObjective(Objective):
    """ConMIM: masked weak view (online) vs unmasked strong view (momentum), per-patch InfoNCE
    within each image."""

    name = "conmim"

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        check_maskable(ctx.encoder, self.name)
        if cfg.photometric:
            raise MimcliError(
                "--objective conmim makes its own weak/strong views; drop --photometric"
            )
        if ctx.views.local_crops:
            raise MimcliError("--objective conmim uses no local crops; drop --local-crops")
        dim = int(ctx.loaded.embed_dim)
        spec = cfg.head_width
        widths = head_widths(
            dim, int(spec) if str(spec).isascii() and str(spec).isdigit() else spec
        )
        self.hidden, self.out = widths.predictor_hidden, widths.out
        self.tau = float(cfg.temperature)
        self.mask_ratio = float(cfg.mask_ratio)
        self.base_momentum = float(cfg.momentum)
        self.prefix = int(getattr(ctx.encoder, "num_prefix_tokens", 1))
        self.refine_steps = int(ctx.totals.get("refine", 0))
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.projector = token_projector(dim, self.hidden, self.out, ctx.sync_bn)
        self.momentum_encoder = momentum_copy(ctx.encoder)
        self.momentum_projector = momentum_copy(self.projector)

    @classmethod
    def defaults(cls, depth: int, embed_dim: int) -> dict[str, Any]:
        return {
            "blocks": "last1",
            "local_crops": 0,
            "photometric": False,
            "freeze_blocks": 0,
            "lr": 4e-4,
            "temperature": 0.1,
            "mask_ratio": 0.4,
            "momentum": 0.996,
        }

    def train(self, mode: bool = True) -> ConMIMObjective:
        """The momentum encoder always runs in eval mode (no dropout / drop-path in targets); the
        momentum projector's BN uses batch statistics in training, like the online one."""
        super().train(mode)
        self.momentum_encoder.eval()
        return self

    def describe(self) -> dict[str, Any]:
        return {
            "objective": self.name,
            "projector_widths": {"hidden": self.hidden, "out": self.out},
            "temperature": self.tau,
            "mask_ratio": self.mask_ratio,
            "momentum": self.base_momentum,
            "momentum_schedule": "cosine to 1 over the refine stage",
            "view_pair": "weak: crop+flip; strong: + jitter, grayscale, blur 0.5, solarize 0.2",
        }

    def summary(self) -> str:
        return (
            f"per-token projector {self.hidden}/{self.out} + mask token; tau {self.tau}; "
            f"mask ratio {self.mask_ratio}; momentum {self.base_momentum} -> 1 (cosine); "
            "weak/strong views"
        )

    def views_summary(self) -> str:
        return f"weak + strong of one {self.ctx.views.global_size}px crop"

    def transform(self) -> WeakStrongTransform:
        return WeakStrongTransform(self.ctx.views)

    def momentum(self, stage: str, step: int) -> float:
        """The EMA momentum applied after ``step`` of ``stage`` (warm-up: the base value)."""
        if stage != "refine":
            return self.base_momentum
        return momentum_at(step, self.refine_steps, self.base_momentum)

    def project(self, projector: nn.Module, tokens: Tensor) -> Tensor:
        """``(B, N, D)`` tokens -> ``(B, N, O)`` through a per-token projector."""
        b, n, d = tokens.shape
        return projector(tokens.reshape(b * n, d)).reshape(b, n, -1)

    def step(
        self, encoder: nn.Module, batch: ViewBatch, stage: str, step: int
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        device = self.ctx.device
        weak, strong = (v.to(device, non_blocking=True) for v in batch.views[:2])
        rows, cols = patch_grid(encoder, weak)
        generator = step_generator(self.ctx.seed, stage, step, salt=dist.rank())
        mask = random_mask(weak.shape[0], rows * cols, self.mask_ratio, generator)
        mask = mask.to(device, non_blocking=True)
        autocast = runtime_autocast(device)
        with autocast:
            # heads stage: gradient reaches the mask token through the frozen encoder
            with outside_autograd(encoder, stage == "heads"):
                online = encode_masked(encoder, weak, mask, self.mask_token)[:, self.prefix :]
            pred = self.project(self.projector, online)
            with torch.no_grad():
                keys = encode_masked(self.momentum_encoder, strong, None, None)[:, self.prefix :]
                target = self.project(self.momentum_projector, keys)
        pred, target = pred.float(), target.float()
        loss = conmim_loss(pred, target, mask, self.tau, check_mask=False)  # never empty
        metrics = {
            "patch_acc": positive_accuracy(pred, target, mask, check_mask=False),
            "momentum": self.momentum(stage, step),
        }
        return loss, metrics

    def after_step(self, encoder: nn.Module, stage: str, step: int) -> None:
        m = self.momentum(stage, step)
        if stage == "refine":  # frozen during the warm-up: the copy stays equal to it
            ema_update(self.momentum_encoder, encoder, m)
        ema_update(self.momentum_projector, self.projector, m)
