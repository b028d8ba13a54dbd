"""Post-norm ViT block for data2vec 2.0 encoders, plugged into timm's VisionTransformer.

data2vec 2.0 (Baevski et al., 2022) uses post-norm blocks, ``x = norm1(x + attn(x));
x = norm2(x + mlp(x))``, a LayerNorm after the CLS concat and no final norm. timm has no such block,
so we register one architecture, ``mimcli_vit_postnorm``, built from timm's VisionTransformer with
``block_fn=PostNormBlock``; block taps then work through timm's own ``forward_intermediates``.

The other architecture timm lacks is registered here too, so that importing this module (as
``models.build`` does, and as published model cards say) makes every mimcli architecture known:
``mimcli_beit_no_final_norm``, timm's Beit with no final norm at all (data2vec-vision saved with
mean pooling and no pooler, which transformers runs with an identity norm; timm's Beit always
puts a LayerNorm either before or after pooling).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.layers import DropPath, LayerNorm, Mlp, PatchEmbed
from timm.layers.attention import Attention
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer
from torch import nn

POSTNORM_ARCH = "mimcli_vit_postnorm"
BEIT_NO_FINAL_NORM_ARCH = "mimcli_beit_no_final_norm"
# Registered here, not in timm: loading them needs ``import mimcli.models.postnorm`` first.
MIMCLI_ARCHS = (POSTNORM_ARCH, BEIT_NO_FINAL_NORM_ARCH)

# timm looks up a default pretrained config per registered name; ours has no weights to fetch.
_UNTRAINED = dict(
    url="",
    num_classes=0,
    input_size=(3, 224, 224),
    crop_pct=0.875,
    interpolation="bicubic",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    first_conv="patch_embed.proj",
    classifier="head",
)
default_cfgs = generate_default_cfgs(
    {
        f"{POSTNORM_ARCH}.untrained": dict(_UNTRAINED),
        f"{BEIT_NO_FINAL_NORM_ARCH}.untrained": dict(
            _UNTRAINED, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9
        ),
    }
)


class PostNormBlock(nn.Module):
    """Transformer block with the norm after each residual sum (data2vec 2.0 layout).

    Accepts the keyword arguments timm's VisionTransformer passes to ``block_fn``; options that
    have no meaning for a post-norm block (layer scale, qk-norm, scaled norms) must be off.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = LayerNorm,
        mlp_layer: type[nn.Module] = Mlp,
        init_values: float | None = None,
        qk_norm: bool = False,
        scale_attn_norm: bool = False,
        scale_mlp_norm: bool = False,
        **_: Any,
    ) -> None:
        super().__init__()
        if init_values or qk_norm or scale_attn_norm or scale_mlp_norm:
            raise ValueError("PostNormBlock supports no layer scale, qk-norm or scaled norms")
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
        )
        self.norm1 = norm_layer(dim)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = mlp_layer(
            in_features=dim,
            hidden_features=int(dim * mlp_ratio),
            act_layer=act_layer,
            drop=proj_drop,
        )
        self.norm2 = norm_layer(dim)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        if attn_mask is not None or is_causal:
            attn_out = self.attn(x, attn_mask=attn_mask, is_causal=is_causal)
        else:
            attn_out = self.attn(x)
        x = self.norm1(x + self.drop_path1(attn_out))
        x = self.norm2(x + self.drop_path2(self.mlp(x)))
        return x


class BiasedPatchEmbed(PatchEmbed):
    """timm drops the patch-projection bias when ``pre_norm=True``; data2vec 2.0 keeps it."""

    def __init__(self, *args: Any, bias: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, bias=True, **kwargs)


@register_model
def mimcli_vit_postnorm(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """data2vec 2.0 image encoder: positions without a CLS slot, embedding LayerNorm, post-norm
    blocks, no final norm. Weights come from mimcli's converter, never from timm's registry."""
    args: dict[str, Any] = dict(
        no_embed_class=True,
        pre_norm=True,
        final_norm=False,
        qkv_bias=True,
        norm_layer=partial(LayerNorm, eps=1e-6),
        block_fn=PostNormBlock,
        embed_layer=BiasedPatchEmbed,
    )
    args.update(kwargs)
    return build_model_with_cfg(VisionTransformer, POSTNORM_ARCH, pretrained, **args)


class BeitNoFinalNorm(Beit):
    """timm's Beit (same arguments) whose final ``norm`` and ``fc_norm`` are both identities: the
    output is the last block's residual stream, as in transformers' Data2VecVisionModel with
    ``use_mean_pooling`` and no pooler."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.norm = nn.Identity()
        self.fc_norm = nn.Identity()


@register_model
def mimcli_beit_no_final_norm(pretrained: bool = False, **kwargs: Any) -> Beit:
    """BEiT with no final norm (``BeitNoFinalNorm``). Weights come from mimcli's converter."""
    return build_model_with_cfg(BeitNoFinalNorm, BEIT_NO_FINAL_NORM_ARCH, pretrained, **kwargs)
