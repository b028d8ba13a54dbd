"""Convert data2vec image encoders to timm: data2vec 2.0 (fairseq ``.pt``) onto our
``mimcli_vit_postnorm``, data2vec v1 vision (transformers layout) onto timm's ``Beit``.

data2vec 2.0: Baevski et al., 2022, "Efficient Self-supervised Learning with Contextualized Target
Representations for Vision, Speech and Language". data2vec v1: Baevski et al., 2022, "data2vec: A
General Framework for Self-supervised Learning in Speech, Vision and Language".

Decisions:

- data2vec 2.0 ViT-B runs 2 "prenet" blocks inside the image encoder (``context_encoder.blocks``)
  before the 10 shared ``blocks`` (ViT-L/H: 0 + 24/32); both are the same post-norm block, so they
  become ``blocks.0..`` in that order. The decoder, the EMA teacher (``_ema``), ``recon_proj`` and
  other modalities' encoders are dropped. Variants timm cannot represent (pre-norm
  ``layer_norm_first`` with a final ``norm``, ALiBi, cosine attention, several extra tokens) and any
  key we do not recognise are refused with their names, never silently dropped. Heads come from the
  checkpoint's ``cfg.model.num_heads``, whether the cfg was saved as a plain dict or as an OmegaConf
  ``DictConfig`` (read as inert data, omegaconf is never imported); without it the resolver
  settles the count (``build.settle_num_heads``). Weights are cast to float32.
- data2vec-vision LayerNorm eps: transformers' config says ``layer_norm_eps`` (1e-12 in the released
  configs); timm's Beit always uses 1e-6 and ``model_args`` must stay JSON, so no ``norm_layer`` can
  be passed. We keep timm's 1e-6, which is what the original BEiT-based data2vec training code used;
  the transformers eps differs from it by < 1e-6 relative for activations of variance >= 1 (the
  tests measure it). Configs with eps above 1e-5 are refused rather than approximated.
- data2vec-vision pooling: ``use_mean_pooling`` -> ``global_pool="avg"`` with ``fc_norm``
  (``pooler.layernorm``); otherwise ``"token"`` with the final ``norm`` (``layernorm``). With
  ``use_mean_pooling`` and no ``pooler.*`` weights (transformers' ``Data2VecVisionModel`` builds no
  pooler unless asked, and segmentation models keep none) transformers runs no final norm at all:
  such weights load onto ``mimcli_beit_no_final_norm`` (timm's Beit with identity norms), which
  the load note (``NO_FINAL_NORM_NOTE``) states. The
  released pre-trained checkpoints (facebook/data2vec-vision-base, -large) use a shared relative
  position bias and CLS pooling with a final norm; the ``-ft1k`` ones per-layer biases and mean
  pooling. ``mask_token``, ``relative_position_index`` buffers (timm rebuilds them) and heads
  (``classifier``, ``lm_head``, segmentation heads) are dropped.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mimcli.blocks import MAX_BLOCK
from mimcli.errors import MimcliError
from mimcli.models.build import (
    ConvertedCheckpoint,
    count_blocks,
    default_pretrained_cfg,
    recorded_num_heads,
)
from mimcli.models.postnorm import BEIT_NO_FINAL_NORM_ARCH, POSTNORM_ARCH
from mimcli.models.spec import MAX_HEADS

IMAGE = "modality_encoders.IMAGE."
D2V2_PATCH = IMAGE + "local_encoder.proj."
D2V2_CLS = IMAGE + "extra_tokens"
D2V2_POS = IMAGE + "fixed_positional_encoder.positions"
D2V2_NORM = IMAGE + "context_encoder.norm."
D2V2_PRENET = IMAGE + "context_encoder.blocks."
D2V2_EXPECTED = (
    f"{D2V2_PATCH}weight/bias, {D2V2_CLS}, {D2V2_POS}, {D2V2_NORM}weight/bias, blocks.<i>.*"
)
# timm-like names of one data2vec 2.0 block (AltBlock with qkv bias), identical in timm's ViT.
BLOCK_PARAMS = tuple(
    f"{layer}.{p}"
    for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for p in ("weight", "bias")
)

VISION_PREFIX = "data2vec_vision."
VISION_HEADS = ("classifier.", "lm_head.", "decode_head.", "auxiliary_head.", "fpn")
MAX_LAYER_NORM_EPS = 1e-5
NO_FINAL_NORM_NOTE = (
    "data2vec-vision with use_mean_pooling and no pooler.layernorm weights: loaded with no final "
    "norm (identity), as transformers runs it; features are the last block's raw tokens"
)
BEIT_MEAN_STD = (0.5, 0.5, 0.5)


def _show(keys: list[str], limit: int = 6) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more if keys else "none"


def _fairseq_weights(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Weights of a fairseq checkpoint (under ``"model"``) or a bare state dict, ``model.`` cut."""
    inner = checkpoint.get("model")
    weights = inner if isinstance(inner, dict) else checkpoint
    return {
        (k[len("model.") :] if k.startswith("model.") else k): v
        for k, v in weights.items()
        if isinstance(k, str)
    }


def _mlp_ratio(hidden: int, dim: int) -> float:
    ratio = hidden / dim
    if int(dim * ratio) != hidden:  # timm sizes its MLP as int(dim * mlp_ratio)
        raise MimcliError(f"MLP width {hidden} is not expressible as a ratio of width {dim}")
    return ratio


def _grid_side(num_tokens: int, what: str) -> int:
    side = int(round(num_tokens**0.5))
    if side * side != num_tokens:
        raise MimcliError(f"{what}: {num_tokens} positions do not form a square patch grid")
    return side


def looks_like_data2vec2(checkpoint: dict[str, Any]) -> bool:
    """True for a fairseq data2vec 2.0 checkpoint (any modality) or its bare state dict."""
    return any(k.startswith("modality_encoders.") for k in _fairseq_weights(checkpoint))


def convert_data2vec2(checkpoint: dict[str, Any]) -> ConvertedCheckpoint:
    """Translate a data2vec 2.0 image checkpoint to ``mimcli_vit_postnorm``.

    Args:
        checkpoint: the top-level dict of a fairseq ``.pt`` (weights under ``"model"``) or a bare
            state dict; keys may start with ``model.``.

    Returns:
        The converted checkpoint; the architecture (width, depth, patch, image size, MLP ratio) is
        read from tensor shapes.
    """
    weights = {k: v for k, v in _fairseq_weights(checkpoint).items() if isinstance(v, torch.Tensor)}
    left_out: dict[str, int] = {}
    kept = {}
    for k, v in weights.items():
        if "decoder" in k:
            left_out["decoder"] = left_out.get("decoder", 0) + 1
        elif "_ema" in k:
            left_out["EMA teacher"] = left_out.get("EMA teacher", 0) + 1
        elif k.startswith("recon_proj."):
            left_out["recon_proj"] = left_out.get("recon_proj", 0) + 1
        elif k.startswith("modality_encoders.") and not k.startswith(IMAGE):
            left_out["other modalities"] = left_out.get("other modalities", 0) + 1
        else:
            kept[k] = v
    required = [D2V2_PATCH + "weight", D2V2_PATCH + "bias", D2V2_CLS, D2V2_POS]
    required += [D2V2_NORM + "weight", D2V2_NORM + "bias"]
    missing = [k for k in required if k not in kept]
    if missing:
        modalities = sorted(
            {k.split(".")[1] for k in weights if k.startswith("modality_encoders.")}
        )
        raise MimcliError(
            f"not a data2vec 2.0 image checkpoint: missing {_show(missing)} (modalities present: "
            f"{_show(modalities)}; other keys: {_show(sorted(set(kept) - set(required)))}); "
            f"expected fairseq keys {D2V2_EXPECTED}"
        )
    unsupported = [k for k in kept if k == "norm.weight" or "alibi" in k or "logit_scale" in k]
    if unsupported:
        raise MimcliError(
            f"unsupported data2vec 2.0 variant (pre-norm final norm, ALiBi or cosine attention): "
            f"{_show(sorted(unsupported))}; only the released post-norm image encoders convert"
        )

    def take(key: str) -> torch.Tensor:
        return kept.pop(key).detach().to(torch.float32).contiguous()

    proj = take(D2V2_PATCH + "weight")
    if proj.ndim != 4:
        raise MimcliError(
            f"{D2V2_PATCH}weight has shape {tuple(proj.shape)}, expected (D, C, p, p)"
        )
    dim, in_chans, ph, pw = (int(s) for s in proj.shape)
    sd = {"patch_embed.proj.weight": proj, "patch_embed.proj.bias": take(D2V2_PATCH + "bias")}
    sd["cls_token"] = take(D2V2_CLS)
    if tuple(sd["cls_token"].shape) != (1, 1, dim):
        raise MimcliError(
            f"{D2V2_CLS} has shape {tuple(sd['cls_token'].shape)}; only one CLS token "
            f"(1, 1, {dim}) is supported"
        )
    sd["pos_embed"] = take(D2V2_POS)
    side = _grid_side(int(sd["pos_embed"].shape[1]), D2V2_POS)
    sd["norm_pre.weight"] = take(D2V2_NORM + "weight")
    sd["norm_pre.bias"] = take(D2V2_NORM + "bias")

    depth = 0
    for prefix in (D2V2_PRENET, "blocks."):
        for i in range(count_blocks(kept, prefix)):
            absent = [f"{prefix}{i}.{p}" for p in BLOCK_PARAMS if f"{prefix}{i}.{p}" not in kept]
            if absent:
                raise MimcliError(f"data2vec 2.0 block is incomplete: missing {_show(absent)}")
            for p in BLOCK_PARAMS:
                sd[f"blocks.{depth}.{p}"] = take(f"{prefix}{i}.{p}")
            depth += 1
    if depth == 0:
        raise MimcliError(f"data2vec 2.0 checkpoint has no blocks; expected {D2V2_EXPECTED}")
    if kept:
        raise MimcliError(
            f"data2vec 2.0 checkpoint has keys mimcli does not know how to convert: "
            f"{_show(sorted(kept))}; expected only {D2V2_EXPECTED} (decoder and _ema are dropped)"
        )

    img_size = side * ph if ph == pw else [side * ph, side * pw]
    model_args: dict[str, Any] = dict(
        img_size=img_size,
        patch_size=ph if ph == pw else [ph, pw],
        in_chans=in_chans,
        embed_dim=dim,
        depth=depth,
        mlp_ratio=_mlp_ratio(int(sd["blocks.0.mlp.fc1.weight"].shape[0]), dim),
        global_pool="token",
    )
    heads = recorded_num_heads(checkpoint, dim)
    if heads is not None:
        model_args["num_heads"] = heads[0]
    return ConvertedCheckpoint(
        arch=POSTNORM_ARCH,
        model_args=model_args,
        state_dict=sd,
        pretrained_cfg=default_pretrained_cfg(img_size if ph == pw else tuple(img_size)),
        decoder=None,
        format="data2vec2",
        heads_from=heads[1] if heads is not None else "",
        dropped=[f"{what} ({n} tensors)" for what, n in left_out.items()],
    )


def looks_like_data2vec_vision(config: dict[str, Any]) -> bool:
    """True for a transformers ``config.json`` of a data2vec v1 vision model."""
    return config.get("model_type") == "data2vec-vision"


def _config_int(config: dict[str, Any], key: str, default: int, hi: int) -> int:
    """A whole number in 1..``hi`` from a data2vec-vision ``config.json``, else one line."""
    value = config.get(key, default)
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole:
        raise MimcliError(f"data2vec-vision config.json: {key} {value!r} is not a whole number")
    if not 1 <= value <= hi:
        raise MimcliError(f"data2vec-vision config.json: {key} {value} is not in 1..{hi}")
    return int(value)


def _config_pair(config: dict[str, Any], key: str, default: int) -> tuple[int, int]:
    """``image_size`` / ``patch_size``: one number or two, each in 1..8192."""
    value = config.get(key, default)
    pair = value if isinstance(value, list | tuple) and len(value) == 2 else [value, value]
    h, w = (_config_int({key: v}, key, default, 8192) for v in pair)
    return h, w


# (transformers name inside encoder.layer.<i>., timm name inside blocks.<i>.)
LAYER_RENAMES = (
    ("attention.output.dense.weight", "attn.proj.weight"),
    ("attention.output.dense.bias", "attn.proj.bias"),
    ("layernorm_before.weight", "norm1.weight"),
    ("layernorm_before.bias", "norm1.bias"),
    ("layernorm_after.weight", "norm2.weight"),
    ("layernorm_after.bias", "norm2.bias"),
    ("intermediate.dense.weight", "mlp.fc1.weight"),
    ("intermediate.dense.bias", "mlp.fc1.bias"),
    ("output.dense.weight", "mlp.fc2.weight"),
    ("output.dense.bias", "mlp.fc2.bias"),
    ("attention.attention.query.bias", "attn.q_bias"),
    ("attention.attention.value.bias", "attn.v_bias"),
)


def convert_data2vec_vision(
    state_dict: dict[str, torch.Tensor], config: dict[str, Any]
) -> ConvertedCheckpoint:
    """Translate a transformers data2vec-vision checkpoint to timm's ``Beit``.

    Args:
        state_dict: transformers weights, with or without the ``data2vec_vision.`` prefix.
        config: the matching ``config.json`` (missing fields take transformers' defaults).

    Returns:
        The converted checkpoint (arch ``beit_base_patch16_224`` or ``beit_large_patch16_224`` with
        every size overridden in ``model_args``; ``mimcli_beit_no_final_norm`` for mean pooling
        without pooler weights).
    """
    dim = _config_int(config, "hidden_size", 768, 2**16)
    depth = _config_int(config, "num_hidden_layers", 12, MAX_BLOCK)
    num_heads = _config_int(config, "num_attention_heads", 12, MAX_HEADS)
    img_h, img_w = _config_pair(config, "image_size", 224)
    ph, pw = _config_pair(config, "patch_size", 16)
    grid = (img_h // ph, img_w // pw)
    try:
        eps = float(config.get("layer_norm_eps", 1e-12))
    except (TypeError, ValueError) as exc:
        raise MimcliError("data2vec-vision config.json: layer_norm_eps is not a number") from exc
    abs_pos = bool(config.get("use_absolute_position_embeddings", False))
    rel_pos = bool(config.get("use_relative_position_bias", False))
    shared_rel_pos = bool(config.get("use_shared_relative_position_bias", False))
    mean_pooling = bool(config.get("use_mean_pooling", True))
    if eps > MAX_LAYER_NORM_EPS:
        raise MimcliError(
            f"data2vec-vision layer_norm_eps {eps} is not supported: timm's Beit uses 1e-6 and "
            f"only configs with eps <= {MAX_LAYER_NORM_EPS} convert faithfully"
        )
    if config.get("hidden_act", "gelu") != "gelu":
        raise MimcliError(f"data2vec-vision hidden_act {config.get('hidden_act')!r}: need 'gelu'")

    # With the prefix, everything outside it is a head (classifier, segmentation); without it,
    # heads sit beside the encoder keys.
    prefixed = any(k.startswith(VISION_PREFIX) for k in state_dict)
    head_keys = [
        k
        for k in state_dict
        if (not k.startswith(VISION_PREFIX) if prefixed else k.startswith(VISION_HEADS))
    ]
    dropped = [f"heads ({len(head_keys)} tensors)"] if head_keys else []
    if prefixed:
        src = {
            k[len(VISION_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(VISION_PREFIX)
        }
    else:
        src = {k: v for k, v in state_dict.items() if not k.startswith(VISION_HEADS)}
    src = {
        k: v
        for k, v in src.items()
        if "relative_position_index" not in k  # a buffer timm rebuilds
        and k != "embeddings.mask_token"
        and not (k.startswith("pooler.") and not mean_pooling)  # CLS pooling has no weights
    }

    renames = {
        "embeddings.cls_token": "cls_token",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    }
    if abs_pos:
        renames["embeddings.position_embeddings"] = "pos_embed"
    if shared_rel_pos:
        table = "relative_position_bias_table"
        renames[f"encoder.relative_position_bias.{table}"] = f"rel_pos_bias.{table}"
    # Mean pooling with no pooler weights: transformers' final norm is an identity and there is
    # no pooler norm either.
    no_final_norm = mean_pooling and not any(k.startswith("pooler.") for k in src)
    final = "fc_norm" if mean_pooling else "norm"
    source_final = "pooler.layernorm" if mean_pooling else "layernorm"
    if not no_final_norm:
        for p in ("weight", "bias"):
            renames[f"{source_final}.{p}"] = f"{final}.{p}"
    layer_scale = "encoder.layer.0.lambda_1" in src
    for i in range(depth):
        layer = f"encoder.layer.{i}."
        pairs = list(LAYER_RENAMES)
        if layer_scale:
            pairs += [("lambda_1", "gamma_1"), ("lambda_2", "gamma_2")]
        if rel_pos:
            table = "relative_position_bias_table"
            pairs.append((f"attention.attention.relative_position_bias.{table}", f"attn.{table}"))
        renames.update({layer + a: f"blocks.{i}.{b}" for a, b in pairs})

    qkv_parts = [
        f"encoder.layer.{i}.attention.attention.{n}.weight"
        for i in range(depth)
        for n in ("query", "key", "value")
    ]
    missing = [k for k in list(renames) + qkv_parts if k not in src]
    unexpected = sorted(set(src) - set(renames) - set(qkv_parts))
    if missing or unexpected:
        raise MimcliError(
            f"data2vec-vision weights do not match config.json: missing {_show(missing)}; "
            f"unexpected {_show(unexpected)}; expected transformers keys [data2vec_vision.]"
            "embeddings.*, encoder.layer.<i>.attention.attention.query/key/value.*, "
            "encoder.layer.<i>.layernorm_before/after.*, "
            + ("no final norm" if no_final_norm else f"{source_final}.*")
            + " for this config"
        )
    sd = {new: src[old].detach().to(torch.float32).contiguous() for old, new in renames.items()}
    for i in range(depth):
        parts = qkv_parts[3 * i : 3 * i + 3]
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([src[k].float() for k in parts], 0)

    proj = sd["patch_embed.proj.weight"]
    if tuple(proj.shape[2:]) != (ph, pw) or int(proj.shape[0]) != dim:
        raise MimcliError(
            f"patch projection {tuple(proj.shape)} does not match config.json "
            f"(hidden_size {dim}, patch_size {ph}x{pw})"
        )
    if dim % num_heads:
        raise MimcliError(f"hidden_size {dim} is not divisible by num_attention_heads {num_heads}")
    expected_table = ((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, num_heads)
    for key, value in sd.items():
        if key.endswith("relative_position_bias_table") and tuple(value.shape) != expected_table:
            raise MimcliError(
                f"{key} has shape {tuple(value.shape)}, expected {expected_table} for a "
                f"{grid[0]}x{grid[1]} patch grid and {num_heads} heads (check image_size)"
            )
    if abs_pos and int(sd["pos_embed"].shape[1]) != grid[0] * grid[1] + 1:
        raise MimcliError(
            f"position_embeddings {tuple(sd['pos_embed'].shape)} do not match image_size "
            f"{img_h}x{img_w} with patch {ph}x{pw}"
        )

    # The gammas come from the weights; init_values only switches layer scale on or off. Off is
    # 0.0, not None: timm.create_model drops None kwargs, and beit_* default to layer scale on.
    init = config.get("layer_scale_init_value", 0.1)
    if not isinstance(init, int | float) or isinstance(init, bool) or not math.isfinite(init):
        raise MimcliError(f"data2vec-vision config.json: layer_scale_init_value {init!r}")
    init_values = (float(init) or 0.1) if layer_scale else 0.0
    img_size: int | list[int] = img_h if img_h == img_w else [img_h, img_w]
    model_args: dict[str, Any] = dict(
        img_size=img_size,
        patch_size=ph if ph == pw else [ph, pw],
        in_chans=int(proj.shape[1]),
        embed_dim=dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=_mlp_ratio(int(sd["blocks.0.mlp.fc1.weight"].shape[0]), dim),
        qkv_bias=True,
        use_abs_pos_emb=abs_pos,
        use_rel_pos_bias=rel_pos,
        use_shared_rel_pos_bias=shared_rel_pos,
        init_values=init_values,
        global_pool="avg" if mean_pooling else "token",
        use_fc_norm=mean_pooling,
    )
    arch = f"beit_{'large' if dim >= 1024 else 'base'}_patch16_224"
    if no_final_norm:
        arch = BEIT_NO_FINAL_NORM_ARCH
    pretrained_cfg = default_pretrained_cfg(
        (img_h, img_w), mean=BEIT_MEAN_STD, std=BEIT_MEAN_STD, crop_pct=0.9
    )
    return ConvertedCheckpoint(
        arch=arch,
        model_args=model_args,
        state_dict=sd,
        pretrained_cfg=pretrained_cfg,
        decoder=None,
        format="data2vec-vision",
        heads_from="config.json num_attention_heads",
        dropped=dropped,
    )


__all__ = [
    "NO_FINAL_NORM_NOTE",
    "convert_data2vec2",
    "convert_data2vec_vision",
    "looks_like_data2vec2",
    "looks_like_data2vec_vision",
]
