"""Checkpoint converters onto timm's VisionTransformer: official MAE ``.pth`` (encoder-only or
``_full`` with decoder), MIM-Refiner ``.th`` (``cls_tokens.tokens``, ``pos_embed.embed``), MAE-CT
``.th`` (timm names, ``pos_embed`` without a CLS slot), and plain timm state dicts (register
tokens included).

The architecture is read off tensor shapes (``build.infer_vit_args``), the head count from what
the file records beside the weights (``build.recorded_num_heads``); data2vec formats live in
``data2vec.py``.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from mimcli.errors import MimcliError
from mimcli.models.build import (
    ConvertedCheckpoint,
    default_pretrained_cfg,
    infer_vit_args,
    recorded_num_heads,
)
from mimcli.models.postnorm import POSTNORM_ARCH

# Keys of an MAE ``_full`` checkpoint that belong to the decoder, kept aside for MR-MAE.
DECODER_PREFIXES = ("decoder_", "mask_token")
# Standard timm names for recognisable shapes, so config.json files read naturally.
STANDARD_VITS = {
    (192, 12, 16): "vit_tiny_patch16_224",
    (384, 12, 16): "vit_small_patch16_224",
    (768, 12, 16): "vit_base_patch16_224",
    (1024, 24, 16): "vit_large_patch16_224",
    (1280, 32, 14): "vit_huge_patch14_224",
}
WRAPPER_PREFIXES = ("module.", "model.", "encoder.", "backbone.")


def strip_prefixes(
    state_dict: dict[str, Any], prefixes: tuple[str, ...] = WRAPPER_PREFIXES
) -> dict[str, Any]:
    """Remove a wrapper prefix (``module.``, ``model.``...) shared by every key."""
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                changed = True
    return state_dict


def vit_arch_name(model_args: dict[str, Any]) -> str:
    patch = model_args["patch_size"]
    key = (model_args["embed_dim"], model_args["depth"], patch if isinstance(patch, int) else -1)
    return STANDARD_VITS.get(key, "vit_base_patch16_224")


def split_decoder(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    encoder = {k: v for k, v in state_dict.items() if not k.startswith(DECODER_PREFIXES)}
    decoder = {k: v for k, v in state_dict.items() if k.startswith(DECODER_PREFIXES)}
    return encoder, (decoder or None)


def convert_timm_vit(
    state_dict: dict[str, torch.Tensor],
    fmt: str = "timm",
    model_args: dict[str, Any] | None = None,
    pretrained_cfg: dict[str, Any] | None = None,
    heads: tuple[int, str] | None = None,
) -> ConvertedCheckpoint:
    """A state dict already in timm ViT naming (MAE and MAE-CT releases are): split off any
    decoder, drop classifier heads, infer the architecture unless ``model_args`` are given.

    Args:
        state_dict: the weights (a shared wrapper prefix such as ``module.`` is cut).
        fmt: the format name the load note shows.
        model_args: recorded arguments (our safetensors metadata); they win over inference.
        pretrained_cfg: recorded evaluation config.
        heads: (count, where) when the file records the attention-head count elsewhere.
    """
    state_dict = {
        k: v for k, v in strip_prefixes(state_dict).items() if isinstance(v, torch.Tensor)
    }
    encoder, decoder = split_decoder(state_dict)
    # Fine-tuned checkpoints carry a classifier; the encoder is what we want.
    classifier = [k for k in encoder if k.startswith("head.")]
    encoder = {k: v for k, v in encoder.items() if not k.startswith("head.")}
    inferred = infer_vit_args(encoder)
    heads_from = ""
    if model_args:
        inferred.update(model_args)
        if "num_heads" in model_args:
            heads_from = "model_args metadata"
    if heads is not None and not heads_from:
        inferred["num_heads"], heads_from = heads
    cfg = default_pretrained_cfg(inferred.get("img_size", 224))
    cfg.update(pretrained_cfg or {})
    dropped = []
    if decoder:
        dropped.append(f"MAE decoder ({len(decoder)} tensors, kept aside for MR-MAE)")
    if classifier:
        dropped.append(f"classifier head ({', '.join(sorted(classifier))})")
    return ConvertedCheckpoint(
        arch=vit_arch_name(inferred),
        model_args=inferred,
        state_dict=encoder,
        pretrained_cfg=cfg,
        decoder=decoder,
        format=fmt,
        heads_from=heads_from,
        dropped=dropped,
    )


def _is_square(n: int) -> bool:
    return n > 0 and round(n**0.5) ** 2 == n


def looks_like_maect(checkpoint: dict[str, Any], weights: dict[str, torch.Tensor]) -> bool:
    """An MAE-CT ``.th``: the weights under ``state_dict`` (beside ``ctor_kwargs``) in timm's
    names, one ``cls_token`` and a ``pos_embed`` (1, N, D) for the N patches only (no CLS slot).
    Files with ``ctor_kwargs`` count even with the older CLS slot."""
    if not isinstance(checkpoint.get("state_dict"), dict) or "arch" in checkpoint:
        return False  # timm's train.py checkpoints also use state_dict, beside an arch entry
    if "cls_token" not in weights or "reg_token" in weights or "pos_embed" not in weights:
        return False
    return "ctor_kwargs" in checkpoint or _is_square(int(weights["pos_embed"].shape[1]))


def convert_maect(
    checkpoint: dict[str, Any], weights: dict[str, torch.Tensor]
) -> ConvertedCheckpoint:
    """MAE-CT ``.th`` weights: timm's ViT with positions for the patches only
    (``no_embed_class``; the CLS token gets none, as in MAE-CT's encoder), heads from
    ``ctor_kwargs.attention_heads`` when present."""
    dim = int(weights["cls_token"].shape[-1])
    return convert_timm_vit(weights, fmt="MAE-CT", heads=recorded_num_heads(checkpoint, dim))


def looks_like_refiner(state_dict: dict[str, Any]) -> bool:
    return any(k.endswith(("cls_tokens.tokens", "pos_embed.embed")) for k in state_dict)


REFINER_ENCODER_PREFIXES = ("patch_embed.", "blocks.", "norm.", "embed_norm.")


def convert_refiner(
    state_dict: dict[str, torch.Tensor], heads: tuple[int, str] | None = None
) -> ConvertedCheckpoint:
    """MIM-Refiner ``.th`` weights (the ``state_dict`` entry; MAE-CT's use timm's names instead,
    see :func:`convert_maect`).

    ``cls_tokens.tokens`` -> ``cls_token``; ``pos_embed.embed`` (1, H, W, D) has no CLS slot and is
    added to patches only. Pre-norm encoders (refined MAE) become timm's ViT with a zero CLS slot
    in ``pos_embed`` — the same computation, since timm adds positions after the CLS concat.
    Refined data2vec 2.0 encoders carry ``embed_norm.*`` (the LayerNorm after the CLS concat) and
    post-norm blocks: they become ``mimcli_vit_postnorm`` (positions without a CLS slot).
    Keys outside the encoder are refused rather than silently dropped.
    """
    sd = {k: v for k, v in strip_prefixes(dict(state_dict)).items() if isinstance(v, torch.Tensor)}
    if "cls_tokens.tokens" not in sd or "pos_embed.embed" not in sd:
        raise MimcliError(
            "not a MIM-Refiner checkpoint: expected keys cls_tokens.tokens and "
            "pos_embed.embed beside patch_embed.proj.* and blocks.<i>.*"
        )
    unknown = [
        k
        for k in sd
        if k not in ("cls_tokens.tokens", "pos_embed.embed")
        and not k.startswith(REFINER_ENCODER_PREFIXES)
    ]
    if unknown:
        raise MimcliError(
            "MIM-Refiner checkpoint with keys mimcli does not know: "
            f"{', '.join(unknown[:5])} — expected only cls_tokens.tokens, pos_embed.embed, "
            "patch_embed.*, embed_norm.*, blocks.<i>.* and norm.*"
        )
    dim = sd["cls_tokens.tokens"].shape[-1]
    pos = sd["pos_embed.embed"].reshape(1, -1, dim)
    out: dict[str, torch.Tensor] = {"cls_token": sd["cls_tokens.tokens"].reshape(1, 1, dim)}
    postnorm = "embed_norm.weight" in sd
    if postnorm:
        out["pos_embed"] = pos
    else:
        out["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    for key, value in sd.items():
        if key.startswith("embed_norm."):
            out["norm_pre." + key[len("embed_norm.") :]] = value
        elif key.startswith(("patch_embed.", "blocks.", "norm.")):
            out[key] = value
    converted = convert_timm_vit(out, fmt="refiner", heads=heads)
    if postnorm:
        args = converted.model_args
        args.pop("no_embed_class", None)
        args.pop("pre_norm", None)
        args.setdefault("final_norm", True)
        converted.arch = POSTNORM_ARCH
    return converted


def model_args_from_metadata(metadata: dict[str, str] | None) -> dict[str, Any] | None:
    """Our own safetensors files record ``model_args`` (JSON) in their metadata."""
    if metadata and "model_args" in metadata:
        try:
            return json.loads(metadata["model_args"])
        except json.JSONDecodeError:
            return None
    return None
