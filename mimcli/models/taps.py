"""Block taps: CLS token and mean patch token after chosen blocks, all in one forward pass.

Uses timm's ``forward_intermediates`` (no hooks). Features are the raw residual stream; the last
block's features are also given after the model's final norm, the way the encoder's own output
is normalised (``norm`` on all tokens, or ``fc_norm`` on the pooled token for mean-pooling BEiTs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BlockTaps:
    """Features of one batch.

    Attributes:
        cls: (B, K, D) CLS token after each tapped block (raw residual stream).
        patch: (B, K, D) mean of the patch tokens after each tapped block (register tokens are
            prefix tokens: ``forward_intermediates`` hands them over with the CLS token, so
            they are never in this mean).
        cls_norm: (B, D) CLS token of the last block after the final norm (None if no norm).
        patch_norm: (B, D) mean patch token of the last block after the final norm.
    """

    cls: torch.Tensor
    patch: torch.Tensor
    cls_norm: torch.Tensor | None
    patch_norm: torch.Tensor | None


def num_blocks(model: nn.Module) -> int:
    return len(model.blocks)  # type: ignore[arg-type]


def final_norm_of(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The final norm the encoder applies to its output: ("tokens", norm) or ("pooled", fc_norm)."""
    norm = getattr(model, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        return "tokens", norm
    fc_norm = getattr(model, "fc_norm", None)
    if fc_norm is not None and not isinstance(fc_norm, nn.Identity):
        return "pooled", fc_norm
    return None


def tap_blocks(model: nn.Module, images: torch.Tensor, blocks: Sequence[int]) -> BlockTaps:
    """Run ``model`` once and collect features after ``blocks``.

    Args:
        model: a timm ViT/BEiT (or ``mimcli_vit_postnorm``) with a class token.
        images: (B, 3, H, W) normalised images.
        blocks: block indices counted from 0 (timm's convention), ascending.

    Returns:
        BlockTaps; the final-norm variant is computed when the last block is tapped.
    """
    if getattr(model, "num_prefix_tokens", 0) < 1 or getattr(model, "cls_token", None) is None:
        raise ValueError("block taps need a model with a class token")
    depth = num_blocks(model)
    indices = sorted(set(int(b) for b in blocks))
    if not indices or indices[0] < 0 or indices[-1] >= depth:
        raise ValueError(f"block indices {list(blocks)} out of range for {depth} blocks")
    outputs = model.forward_intermediates(
        images,
        indices=indices,
        norm=False,
        output_fmt="NLC",
        intermediates_only=True,
        return_prefix_tokens=True,
        stop_early=True,
    )
    # prefix = CLS then any register tokens (timm's _pos_embed order); the rest are patches
    cls = torch.stack([prefix[:, 0] for _, prefix in outputs], dim=1)
    patch = torch.stack([tokens.mean(dim=1) for tokens, _ in outputs], dim=1)
    cls_norm = patch_norm = None
    final = final_norm_of(model)
    if final is not None and indices[-1] == depth - 1:
        kind, norm = final
        last_tokens, last_prefix = outputs[-1]
        if kind == "tokens":
            cls_norm = norm(last_prefix[:, 0])
            patch_norm = norm(last_tokens).mean(dim=1)
        else:
            cls_norm = norm(last_prefix[:, 0])
            patch_norm = norm(last_tokens.mean(dim=1))
    return BlockTaps(cls=cls, patch=patch, cls_norm=cls_norm, patch_norm=patch_norm)
