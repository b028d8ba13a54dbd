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
from mimcli.models.checkpoints import plain_config
from mimcli.models.spec import HEADS_SUFFIX

# Heads cannot be read off weights (qkv is (3D, D) for any head count). When the file does not
# record the count, these widths (the released MAE / data2vec 2.0 / MIM-Refiner models and timm's
# ViT-Ti/S/B/L/H/g/G/2B) give it, and the load note says so; any other width needs --num-heads.
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
HEADS_FLAG = "--num-heads"
# Config entries training code saves beside the weights: fairseq ``cfg`` (DictConfig or dict),
# MAE's ``args`` (argparse Namespace), MAE-CT's ``ctor_kwargs``.
CONFIG_ENTRIES = ("cfg", "args", "ctor_kwargs")
HEAD_COUNT_KEYS = ("num_heads", "attention_heads", "num_attention_heads")
# Model names such as MAE's ``mae_vit_large_patch16`` or timm's ``vit_base_patch16_224``: size
# word -> (width, heads) of that ViT; used only when the width matches.
VIT_SIZES = {
    "tiny": (192, 3),
    "small": (384, 6),
    "base": (768, 12),
    "large": (1024, 16),
    "huge": (1280, 16),
    "giant": (1408, 16),
    "gigantic": (1664, 16),
}
VIT_NAME = re.compile(r"(?:^|_)vit_(" + "|".join(VIT_SIZES) + r")_patch\d+")

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
        format: short name of the source format (``mae``, ``MAE-CT``, ``data2vec2``, ...).
        heads_from: where ``model_args["num_heads"]`` was read in the file (e.g.
            ``cfg.model.num_heads``); empty when the file does not record it, and then
            ``num_heads`` is left out of ``model_args`` for :func:`settle_num_heads`.
        dropped: what the conversion left out, for the load note (``decoder (34 tensors)``).
    """

    arch: str
    model_args: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    decoder: dict[str, torch.Tensor] | None = None
    format: str = "timm"
    heads_from: str = ""
    dropped: list[str] = field(default_factory=list)


def settle_num_heads(
    converted: ConvertedCheckpoint,
    given: int | None,
    given_by: str,
    source: str,
) -> str:
    """Put the attention-head count into ``converted.model_args`` and say where it came from.

    Order: the count the file records (``converted.heads_from``; a different ``given`` count is
    refused rather than silently preferred), else ``given`` (``--num-heads`` or the MODEL's
    ``#heads=`` suffix), else the table of released widths (``KNOWN_NUM_HEADS``). A width outside
    the table with no count anywhere stops with one line asking for it.

    Args:
        converted: the checkpoint; ``model_args`` holds ``embed_dim`` and, when the file
            records it, ``num_heads``.
        given: the count the user gave, or None.
        given_by: how it was given (``--num-heads 16`` or ``#heads=16``), for messages.
        source: the MODEL argument without its suffix, for messages.

    Returns:
        The load note's head part, e.g. ``16 attention heads (from the table of released
        widths; override with --num-heads)``.
    """
    args = converted.model_args
    dim = int(args["embed_dim"])
    found = args.get("num_heads") if converted.heads_from else None
    if found is not None and given is not None and int(found) != given:
        raise MimcliError(
            f"{source}: the file records {found} attention heads ({converted.heads_from}), not "
            f"{given}; leave out {given_by} for this MODEL"
        )
    if found is not None:
        heads, why = int(found), f"from the file's {converted.heads_from}"
    elif given is not None:
        heads, why = given, f"from {given_by}"
    elif dim in KNOWN_NUM_HEADS:
        heads = KNOWN_NUM_HEADS[dim]
        why = f"from the table of released widths; override with {HEADS_FLAG}"
    else:
        raise MimcliError(
            f"{source}: width {dim} is not a released ViT width and the file does not record "
            f"its attention-head count; give it with {HEADS_FLAG} N or as MODEL{HEADS_SUFFIX}N "
            f"(e.g. {source}{HEADS_SUFFIX}N)"
        )
    if heads < 1 or dim % heads:
        raise MimcliError(f"{source}: width {dim} is not divisible by {heads} attention heads")
    args["num_heads"] = heads
    return f"{heads} attention heads ({why})"


def recorded_num_heads(checkpoint: dict[str, Any], dim: int) -> tuple[int, str] | None:
    """The attention-head count a checkpoint records beside its weights, and where.

    Looks in ``cfg``, ``args`` and ``ctor_kwargs`` (and their ``model`` entry) for ``num_heads``,
    ``attention_heads`` or ``num_attention_heads``; else reads a model name there (``model`` or
    ``arch``, e.g. MAE's ``args.model = "mae_vit_large_patch16"``) whose size word matches width
    ``dim``. Pickled config objects are read as inert data (``checkpoints.plain_config``).

    Returns:
        (count, where) such as ``(16, "args.model mae_vit_large_patch16")``, or None.
    """
    for entry in CONFIG_ENTRIES:
        if entry not in checkpoint:
            continue
        conf = plain_config(checkpoint[entry])
        if not isinstance(conf, dict):
            continue
        scopes = [(entry, conf)]
        if isinstance(conf.get("model"), dict):
            scopes.insert(0, (f"{entry}.model", conf["model"]))
        for where, scope in scopes:
            for key in HEAD_COUNT_KEYS:
                value = scope.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value, f"{where}.{key}"
        for where, scope in scopes:
            for key in ("model", "arch"):
                name = scope.get(key)
                match = VIT_NAME.search(name) if isinstance(name, str) else None
                if match and VIT_SIZES[match.group(1)][0] == dim:
                    return VIT_SIZES[match.group(1)][1], f"{where}.{key} {name}"
    return None


def guess_num_heads(dim: int) -> int:
    """A head count for width ``dim`` where no better source exists (the MAE decoder only): the
    released models' values, else 64-dim heads. Encoders never guess: see
    :func:`settle_num_heads`."""
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

    Reads width from the patch projection, depth from ``blocks.<i>``, patch size from the
    projection kernel, register tokens from ``reg_token`` (1, R, D), image size from ``pos_embed``
    (with or without slots for the CLS and register tokens), MLP ratio from ``fc1``, qkv bias,
    layer scale and whether a final norm exists. The head count is not in the weights: it is left
    out (see :func:`settle_num_heads`).
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
    reg_tokens = int(state_dict["reg_token"].shape[1]) if "reg_token" in state_dict else 0
    args: dict[str, Any] = dict(
        embed_dim=int(embed_dim),
        depth=depth,
        patch_size=int(ph),
        in_chans=int(in_chans),
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        class_token=class_token,
        global_pool="token" if class_token else "avg",
    )
    if reg_tokens:
        args["reg_tokens"] = reg_tokens
    if ph != pw:
        args["patch_size"] = (int(ph), int(pw))
    if "pos_embed" in state_dict:
        n_pos = state_dict["pos_embed"].shape[1]
        n_patch = n_pos - (1 if class_token else 0) - reg_tokens
        side = int(round(max(n_patch, 0) ** 0.5))
        if n_patch > 0 and side * side == n_patch:
            args["img_size"] = side * int(ph)
        else:
            # The MAE releases carry the CLS slot; MAE-CT and register-token ViTs (timm's
            # no_embed_class) give positions to the patches only.
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


def model_num_heads(model: nn.Module) -> int | None:
    """Attention heads of a timm ViT/BEiT (its first block's), None for other models."""
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[0], "attn", None) if blocks is not None and len(blocks) else None
    heads = getattr(attn, "num_heads", None)
    return int(heads) if isinstance(heads, int) else None


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
