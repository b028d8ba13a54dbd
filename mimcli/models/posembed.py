"""How refinement resizes a ViT's absolute position table for views smaller than its input size
(local crops). The official MIM-Refiner code resizes the table with plain bicubic interpolation
(``align_corners=False``, no antialiasing); timm's ``resample_abs_pos_embed``, which a timm ViT
built with ``dynamic_img_size=True`` calls, antialiases by default. For a 224-px model on 96-px
crops (grid 14 -> 6) the two tables differ by up to ~5%. The rule is recorded per run, so a run
started under timm's rule resumes under it."""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

OFFICIAL = "bicubic"  # the official code's rule, the default
TIMM = "bicubic-antialias"  # timm's default; runs recorded without a rule used it
RULES = (OFFICIAL, TIMM)


def resize_pos_table(
    table: torch.Tensor,
    grid: tuple[int, int],
    old_grid: tuple[int, int],
    num_prefix_tokens: int,
    rule: str = OFFICIAL,
) -> torch.Tensor:
    """The (1, prefix + H*W, D) position table ``table`` on ``old_grid`` resized to ``grid``
    (prefix entries kept as they are)."""
    return resample_abs_pos_embed(
        table,
        new_size=list(grid),
        old_size=list(old_grid),
        num_prefix_tokens=num_prefix_tokens,
        interpolation="bicubic",
        antialias=rule == TIMM,
    )


class PlainBicubicPosEmbed:
    """Mixin for a timm ``VisionTransformer`` (or a subclass such as ``mimcli_vit_postnorm``):
    ``_pos_embed`` resizes the table with the official rule. Everything that adds position
    embeddings goes through ``_pos_embed`` (``forward_features``, ``forward_intermediates``, the
    masked and visible-token passes), so every view of every objective follows the rule."""

    def _pos_embed(self: Any, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is None or not self.dynamic_img_size:
            return super()._pos_embed(x)  # type: ignore[misc]
        batch, rows, cols, dim = x.shape
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        table = resize_pos_table(
            self.pos_embed, (rows, cols), tuple(self.patch_embed.grid_size), prefix
        )
        x = x.view(batch, -1, dim)
        tokens = []
        if self.cls_token is not None:
            tokens.append(self.cls_token.expand(batch, -1, -1))
        if getattr(self, "reg_token", None) is not None:
            tokens.append(self.reg_token.expand(batch, -1, -1))
        if self.no_embed_class:  # position table without prefix slots: add, then prepend
            x = torch.cat([*tokens, x + table], dim=1)
        else:
            x = torch.cat([*tokens, x], dim=1) + table
        return self.pos_drop(x)


_CLASSES: dict[type, type] = {}


def apply_resize_rule(encoder: nn.Module, rule: str) -> nn.Module:
    """Make ``encoder`` (built with ``dynamic_img_size=True``) resize its position table by
    ``rule``; returned for convenience. timm's ``_pos_embed`` takes no interpolation options, so
    the official rule swaps in a subclass of the encoder's own class whose only change is that
    method (weights, state-dict keys and every other method stay timm's). Copies
    (``copy.deepcopy``: the EMA, momentum encoders) keep the rule."""
    if rule not in RULES:
        raise ValueError(f"unknown position-table resize rule {rule!r}; choose one of {RULES}")
    base = type(encoder)
    if rule == TIMM or isinstance(encoder, PlainBicubicPosEmbed):
        return encoder
    if not hasattr(encoder, "_pos_embed"):  # not a timm ViT (e.g. BEiT: relative positions)
        return encoder
    if base not in _CLASSES:
        _CLASSES[base] = type(f"{base.__name__}PlainBicubic", (PlainBicubicPosEmbed, base), {})
    encoder.__class__ = _CLASSES[base]
    return encoder
