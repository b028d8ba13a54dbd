"""Naive reference forwards written from checkpoint key layouts (for converter oracle tests).

Plain tensor ops only, no timm: if a converter maps a key wrongly, these disagree with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, sd: dict, prefix: str, eps: float = 1e-6) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def attention(x: torch.Tensor, qkv_w, qkv_b, proj_w, proj_b, heads: int) -> torch.Tensor:
    B, N, D = x.shape
    qkv = x @ qkv_w.T + (qkv_b if qkv_b is not None else 0)
    q, k, v = qkv.reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-1, -2)) / (D // heads) ** 0.5
    out = attn.softmax(-1) @ v
    return out.transpose(1, 2).reshape(B, N, D) @ proj_w.T + proj_b


def mlp(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    h = F.gelu(x @ sd[prefix + ".fc1.weight"].T + sd[prefix + ".fc1.bias"])
    return h @ sd[prefix + ".fc2.weight"].T + sd[prefix + ".fc2.bias"]


def prenorm_vit_blocks(
    images: torch.Tensor,
    sd: dict,
    heads: int,
    pos_has_cls_slot: bool = True,
    cls_key: str = "cls_token",
    pos_key: str = "pos_embed",
    reg_key: str | None = None,
) -> list[torch.Tensor]:
    """Token sequences (B, 1+R+N, D) after every block of a pre-norm ViT (MAE / timm layout):
    CLS, then the R register tokens of ``reg_key`` (if given), then the N patches. With
    ``pos_has_cls_slot`` the positions cover all tokens, else the patches only."""
    w = sd["patch_embed.proj.weight"]
    x = F.conv2d(images, w, sd["patch_embed.proj.bias"], stride=w.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    prefix = [sd[cls_key].reshape(1, 1, -1)]
    if reg_key is not None:
        prefix.append(sd[reg_key].reshape(1, -1, x.shape[-1]))
    prefix_tokens = torch.cat(prefix, dim=1).expand(x.shape[0], -1, -1)
    pos = sd[pos_key].reshape(1, -1, x.shape[-1])
    if pos_has_cls_slot:
        x = torch.cat([prefix_tokens, x], dim=1) + pos
    else:
        x = torch.cat([prefix_tokens, x + pos], dim=1)
    outs = []
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}"
        h = layer_norm(x, sd, p + ".norm1")
        x = x + attention(
            h,
            sd[p + ".attn.qkv.weight"],
            sd.get(p + ".attn.qkv.bias"),
            sd[p + ".attn.proj.weight"],
            sd[p + ".attn.proj.bias"],
            heads,
        )
        x = x + mlp(layer_norm(x, sd, p + ".norm2"), sd, p + ".mlp")
        outs.append(x)
        i += 1
    return outs


def postnorm_vit_blocks(
    images: torch.Tensor, sd: dict, heads: int, cls_key: str, pos_key: str, embed_norm: str
) -> list[torch.Tensor]:
    """Token sequences after every block of a post-norm ViT (data2vec 2.0): positions added to
    patches only, CLS prepended, LayerNorm, then x = norm1(x + attn(x)); x = norm2(x + mlp(x))."""
    w = sd["patch_embed.proj.weight"]
    x = F.conv2d(images, w, sd["patch_embed.proj.bias"], stride=w.shape[-1])
    x = x.flatten(2).transpose(1, 2) + sd[pos_key].reshape(1, -1, x.shape[1])
    cls = sd[cls_key].reshape(1, 1, -1).expand(x.shape[0], -1, -1)
    x = layer_norm(torch.cat([cls, x], dim=1), sd, embed_norm)
    outs = []
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}"
        x = layer_norm(
            x
            + attention(
                x,
                sd[p + ".attn.qkv.weight"],
                sd.get(p + ".attn.qkv.bias"),
                sd[p + ".attn.proj.weight"],
                sd[p + ".attn.proj.bias"],
                heads,
            ),
            sd,
            p + ".norm1",
        )
        x = layer_norm(x + mlp(x, sd, p + ".mlp"), sd, p + ".norm2")
        outs.append(x)
        i += 1
    return outs
