"""Build timm encoders from an architecture name and arguments, and infer them from weights.

Every model mimcli handles is a timm model (``VisionTransformer``, ``Beit`` or our registered
``mimcli_vit_postnorm``) created with ``num_classes=0``; a checkpoint converter only has to say
which architecture and which ``model_args`` rebuild it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

from mimcli.errors import MimcliError
from mimcli.models import postnorm  # noqa: F401  (registers mimcli_vit_postnorm with timm)

# Heads cannot be read off weights (qkv is (3D, D) for any head count); these are the widths of
# the released ViTs, and for other widths we assume 64-dim heads (32 for narrow models).
KNOWN_NUM_HEADS = {
    192: 3,
    384: 6,
    768: 12,
    1024: 16,
    1280: 16,
    1408: 16,
    1536: 16,
    1664: 16,
    2048: 16,
    2560: 32,
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ConvertedCheckpoint:
    """A checkpoint translated to a timm architecture.

    Attributes:
        arch: timm architecture name, e.g. ``vit_large_patch16_224`` or ``mimcli_vit_postnorm``.
        model_args: keyword arguments for ``timm.create_model(arch, **model_args)``.
        state_dict: weights with timm's key names, loadable strictly.
        pretrained_cfg: input_size/mean/std/crop_pct/interpolation overrides for evaluation.
        decoder: weights kept aside (e.g. an MAE decoder), or None.
        format: short name of the source format (``mae``, ``data2vec2``, ...).
    """

    arch: str
    model_args: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    decoder: dict[str, torch.Tensor] | None = None
    format: str = "timm"


def guess_num_heads(dim: int) -> int:
    """Attention heads for width ``dim`` (the released models' values, else 64-dim heads)."""
    if dim in KNOWN_NUM_HEADS:
        return KNOWN_NUM_HEADS[dim]
    for head_dim in (64, 32, 16):
        if dim % head_dim == 0:
            return dim // head_dim
    return 1


def count_blocks(state_dict: dict[str, torch.Tensor], prefix: str = "blocks.") -> int:
    """Number of transformer blocks, from the largest ``blocks.<i>.`` index present."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    if not indices:
        return 0
    if indices != set(range(max(indices) + 1)):
        raise MimcliError(f"checkpoint has gaps in its block numbering: {sorted(indices)}")
    return max(indices) + 1


def infer_vit_args(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Infer timm VisionTransformer arguments from a timm-keyed state dict.

    Reads width from ``cls_token``/patch projection, depth from ``blocks.<i>``, patch size from the
    projection kernel, image size from ``pos_embed`` (with or without a CLS slot), MLP ratio from
    ``fc1``, qkv bias, layer scale and whether a final norm exists.
    """
    required = ["patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"]
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise MimcliError(
            f"not a ViT checkpoint: missing {', '.join(missing)} (expected timm ViT keys "
            "patch_embed.proj.*, blocks.<i>.attn.qkv.*, blocks.<i>.mlp.fc1.*, cls_token, pos_embed)"
        )
    proj = state_dict["patch_embed.proj.weight"]
    embed_dim, in_chans, ph, pw = proj.shape
    depth = count_blocks(state_dict)
    class_token = "cls_token" in state_dict
    args: dict[str, Any] = dict(
        embed_dim=int(embed_dim),
        depth=depth,
        num_heads=guess_num_heads(int(embed_dim)),
        patch_size=int(ph),
        in_chans=int(in_chans),
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        class_token=class_token,
        global_pool="token" if class_token else "avg",
    )
    if ph != pw:
        args["patch_size"] = (int(ph), int(pw))
    if "pos_embed" in state_dict:
        n_pos = state_dict["pos_embed"].shape[1]
        n_patch = n_pos - (1 if class_token else 0)
        side = int(round(n_patch**0.5))
        if side * side == n_patch:
            args["img_size"] = side * int(ph)
        else:
            # The MAE / refiner releases always carry the CLS slot; try the other reading.
            side = int(round(n_pos**0.5))
            if side * side != n_pos:
                raise MimcliError(f"cannot read a square patch grid from pos_embed {n_pos} tokens")
            args["img_size"] = side * int(ph)
            args["no_embed_class"] = True
    else:
        args["pos_embed"] = "none"
    if "blocks.0.ls1.gamma" in state_dict:
        args["init_values"] = 1.0  # overwritten by the loaded gamma
    if "fc_norm.weight" in state_dict:
        args.update(global_pool="avg", fc_norm=True)
    elif "norm.weight" not in state_dict:
        args["final_norm"] = False
    if "norm_pre.weight" in state_dict:
        args["pre_norm"] = True
    return args


def build_model(arch: str, model_args: dict[str, Any]) -> nn.Module:
    """An encoder (no classifier) with random weights: ``timm.create_model(num_classes=0)``."""
    try:
        args = {k: v for k, v in model_args.items() if k != "num_classes"}
        return timm.create_model(arch, pretrained=False, num_classes=0, **args)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown model names
        raise MimcliError(f"unknown timm architecture {arch!r}: {exc}") from exc


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state_dict`` strictly; on mismatch, one line naming missing and unexpected keys."""
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if result.missing_keys:
            parts.append(f"missing {show(result.missing_keys)}")
        if result.unexpected_keys:
            parts.append(f"unexpected {show(result.unexpected_keys)}")
        raise MimcliError(f"{what}: weights do not match the architecture: {'; '.join(parts)}")


def default_pretrained_cfg(img_size: int | tuple[int, int], **overrides: Any) -> dict[str, Any]:
    """Evaluation config in timm's pretrained_cfg form (ImageNet mean/std unless overridden)."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    cfg: dict[str, Any] = dict(
        input_size=(3, h, w),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_pct=0.875,
        interpolation="bicubic",
    )
    cfg.update(overrides)
    return cfg


def fit_input_size(model: nn.Module, input_size: tuple[int, int, int] | list[int]) -> None:
    """Resize ``model`` to take ``input_size`` (C, H, W) images: timm's ``set_input_size``
    resamples the position embedding (and BEiT's relative-position tables)."""
    _, h, w = (int(v) for v in input_size)
    current = tuple(model.patch_embed.img_size)  # type: ignore[union-attr]
    if current == (h, w):
        return
    patch = tuple(model.patch_embed.patch_size)  # type: ignore[union-attr]
    if h % patch[0] or w % patch[1]:
        raise MimcliError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    if not hasattr(model, "set_input_size"):
        raise MimcliError(f"{type(model).__name__} cannot change its input size to {h}x{w}")
    model.set_input_size(img_size=(h, w))
