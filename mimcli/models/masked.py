"""Passes of a timm ViT that the forward of ``forward_intermediates`` does not offer: masked
patches replaced by a learned token before the position embeddings (BEiT/SimMIM/ConMIM), and
MAE's pass over the visible patches only; plus the random masks both use."""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from mimcli.errors import MimcliError


def masked_count(num_patches: int, ratio: float) -> int:
    """How many of ``num_patches`` :func:`random_mask` masks per row: ``round(ratio * N)``, at
    least 1 and at most N - 1 (known on the host: nothing needs to count a mask's entries)."""
    if not 0 < ratio < 1:  # users' values are checked up front (objectives.OPTION_CHECKS)
        raise ValueError(f"mask ratio must lie strictly between 0 and 1, got {ratio}")
    return min(num_patches - 1, max(1, int(round(ratio * num_patches))))


def random_mask(batch: int, num_patches: int, ratio: float, generator: torch.Generator) -> Tensor:
    """``(batch, num_patches)`` bool, True = masked; exactly :func:`masked_count` per row
    (``round(ratio * N)``, at least 1, at most N - 1), positions uniform at random."""
    n_mask = masked_count(num_patches, ratio)
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
