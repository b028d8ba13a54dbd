"""data2vec converters against naive forwards of the SOURCE layouts (fairseq data2vec 2.0 and
transformers data2vec-vision), block by block, on tiny random checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mimcli.errors import MimcliError
from mimcli.models.build import build_model, load_weights
from mimcli.models.checkpoints import read_checkpoint
from mimcli.models.data2vec import (
    convert_data2vec2,
    convert_data2vec_vision,
    looks_like_data2vec2,
    looks_like_data2vec_vision,
)
from mimcli.models.sources import load_model

IMG, PATCH = 32, 8
GRID = IMG // PATCH
ATOL = 1e-5
# timm's Beit normalises with eps 1e-6, transformers' data2vec-vision config with 1e-12. Each
# LayerNorm output then moves by about (1e-6 - 1e-12) / (2 var) relative: ~5e-7 at unit variance;
# the mean-pooled vector of these tiny random models has variance ~0.2, measured shift ~6e-6.
EPS_ATOL = 5e-5
IMAGE = "modality_encoders.IMAGE."
PROJ, CLS = IMAGE + "local_encoder.proj.", IMAGE + "extra_tokens"
POS, NORM = IMAGE + "fixed_positional_encoder.positions", IMAGE + "context_encoder.norm."
PRENET = IMAGE + "context_encoder.blocks."


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias=None):
    """q, k, v: (B, T, D) -> (B, T, D); bias: (H, T, T) added to the logits."""
    B, T, D = q.shape
    q, k, v = (t.reshape(B, T, heads, D // heads).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(D // heads)
    if bias is not None:
        logits = logits + bias
    return (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)


def patchify(images: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.conv2d(images, w, b, stride=w.shape[-1]).flatten(2).transpose(1, 2)


def rand_linear(gen: torch.Generator, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)
    return w, 0.1 * torch.randn(out_f, generator=gen)


def rand_norm(gen: torch.Generator, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return 1 + 0.2 * torch.randn(dim, generator=gen), 0.1 * torch.randn(dim, generator=gen)


def tap_blocks(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """timm block taps, re-joined to (B, 1 + N, D) per block."""
    taps = model.forward_intermediates(
        images,
        indices=None,
        norm=False,
        output_fmt="NLC",
        intermediates_only=True,
        return_prefix_tokens=True,
    )
    return [torch.cat([prefix, patches], 1) for patches, prefix in taps]


# ---------------------------------------------------------------- data2vec 2.0 (fairseq) --------


def d2v2_weights(dim: int, prenet: int, depth: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """fairseq key names: patch conv, CLS extra token, positions without CLS slot, the
    context-encoder LayerNorm, ``prenet`` encoder blocks and ``depth`` shared post-norm blocks."""
    gen = torch.Generator().manual_seed(seed)
    w: dict[str, torch.Tensor] = {
        IMAGE + "local_encoder.proj.weight": torch.randn(dim, 3, PATCH, PATCH, generator=gen)
        / math.sqrt(3 * PATCH * PATCH),
        IMAGE + "local_encoder.proj.bias": 0.1 * torch.randn(dim, generator=gen),
        IMAGE + "extra_tokens": torch.randn(1, 1, dim, generator=gen),
        IMAGE + "fixed_positional_encoder.positions": torch.randn(
            1, GRID * GRID, dim, generator=gen
        ),
    }
    w[IMAGE + "context_encoder.norm.weight"], w[IMAGE + "context_encoder.norm.bias"] = rand_norm(
        gen, dim
    )
    prefixes = [f"{IMAGE}context_encoder.blocks.{i}." for i in range(prenet)]
    for p in prefixes + [f"blocks.{i}." for i in range(depth)]:
        w[p + "norm1.weight"], w[p + "norm1.bias"] = rand_norm(gen, dim)
        w[p + "attn.qkv.weight"], w[p + "attn.qkv.bias"] = rand_linear(gen, 3 * dim, dim)
        w[p + "attn.proj.weight"], w[p + "attn.proj.bias"] = rand_linear(gen, dim, dim)
        w[p + "norm2.weight"], w[p + "norm2.bias"] = rand_norm(gen, dim)
        w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"] = rand_linear(gen, 4 * dim, dim)
        w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"] = rand_linear(gen, dim, 4 * dim)
    return w


def d2v2_reference(w: dict[str, torch.Tensor], images: torch.Tensor, heads: int):
    """data2vec 2.0 image encoder: (patches + positions), CLS first, LayerNorm, then post-norm
    blocks ``x = norm1(x + attn(x)); x = norm2(x + mlp(x))``; returns every block's (B, 1+N, D)."""
    eps = 1e-6
    x = patchify(
        images, w[IMAGE + "local_encoder.proj.weight"], w[IMAGE + "local_encoder.proj.bias"]
    )
    x = x + w[IMAGE + "fixed_positional_encoder.positions"]
    x = torch.cat([w[IMAGE + "extra_tokens"].expand(len(x), -1, -1), x], 1)
    x = layer_norm(
        x, w[IMAGE + "context_encoder.norm.weight"], w[IMAGE + "context_encoder.norm.bias"], eps
    )
    prenet = sorted({k.split(".")[4] for k in w if k.startswith(IMAGE + "context_encoder.blocks.")})
    main = sorted({int(k.split(".")[1]) for k in w if k.startswith("blocks.")})
    prefixes = [f"{IMAGE}context_encoder.blocks.{i}." for i in prenet]
    prefixes += [f"blocks.{i}." for i in main]
    outs = []
    for p in prefixes:
        q, k, v = (x @ w[p + "attn.qkv.weight"].T + w[p + "attn.qkv.bias"]).chunk(3, -1)
        a = attention(q, k, v, heads) @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        x = layer_norm(x + a, w[p + "norm1.weight"], w[p + "norm1.bias"], eps)
        h = F.gelu(x @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"])
        h = h @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"]
        x = layer_norm(x + h, w[p + "norm2.weight"], w[p + "norm2.bias"], eps)
        outs.append(x)
    return outs


def assert_matches_d2v2(checkpoint: dict, weights: dict, heads: int, depth: int) -> None:
    converted = convert_data2vec2(checkpoint)
    model = build_model(converted.arch, json.loads(json.dumps(converted.model_args))).eval()
    load_weights(model, converted.state_dict, "data2vec2 test")
    assert_model_matches_d2v2(model, weights, heads, depth)


def assert_model_matches_d2v2(
    model: torch.nn.Module, weights: dict, heads: int, depth: int
) -> None:
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = d2v2_reference(weights, images, heads)
        taps = tap_blocks(model, images)
        features = model.forward_features(images)
        pooled = model(images)
    assert len(taps) == len(expected) == depth
    for got, want in zip(taps, expected, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(features, expected[-1], atol=ATOL, rtol=0)  # no final norm
    torch.testing.assert_close(pooled, expected[-1][:, 0], atol=ATOL, rtol=0)  # CLS token


def test_data2vec2_matches_fairseq_reference_and_reads_architecture() -> None:
    # ViT-B layout in miniature: prenet blocks inside the image encoder, then the shared blocks.
    weights = d2v2_weights(dim=64, prenet=1, depth=2)
    checkpoint = {"cfg": {"model": {"num_heads": 4}}, "model": weights}
    converted = convert_data2vec2(checkpoint)
    assert converted.arch == "mimcli_vit_postnorm" and converted.format == "data2vec2"
    args = converted.model_args
    assert (args["embed_dim"], args["depth"], args["num_heads"]) == (64, 3, 4)
    assert (args["patch_size"], args["img_size"], args["mlp_ratio"]) == (PATCH, IMG, 4.0)
    assert converted.pretrained_cfg["input_size"] == (3, IMG, IMG)
    assert converted.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    assert_matches_d2v2(checkpoint, weights, heads=4, depth=3)


class FairseqConfigStandIn:
    """Stands in for a config object fairseq pickles beside the weights, without a head count."""

    def __init__(self) -> None:
        self.model = {"_name": "data2vec_multi", "depth": 2}


def test_data2vec2_pt_without_head_count_asks_for_it(tmp_path: Path) -> None:
    weights = d2v2_weights(dim=128, prenet=0, depth=2, seed=3)
    extra = {
        IMAGE + "decoder.blocks.0.0.weight": torch.randn(128, 128, 3, 3),
        IMAGE + "decoder.proj.weight": torch.randn(128, 128),
        "shared_decoder.proj.weight": torch.randn(4, 4),
        "recon_proj.weight": torch.randn(128, 128),
        "modality_encoders.AUDIO.local_encoder.conv.weight": torch.randn(4, 1, 3),
        "_ema.blocks.0.norm1.weight": torch.randn(128),
    }
    stored = {"model." + k: v for k, v in {**weights, **extra}.items()}  # wrapped model layout
    path = tmp_path / "checkpoint_best.pt"
    torch.save(
        {"cfg": FairseqConfigStandIn(), "model": stored, "optimizer_history": [{"step": 1}]}, path
    )
    checkpoint = read_checkpoint(path)
    assert looks_like_data2vec2(checkpoint)
    converted = convert_data2vec2(checkpoint)
    assert not [k for k in converted.state_dict if "decoder" in k or "ema" in k or "recon" in k]
    assert "num_heads" not in converted.model_args and converted.heads_from == ""
    assert converted.dropped == [
        "decoder (3 tensors)",
        "recon_proj (1 tensors)",
        "other modalities (1 tensors)",
        "EMA teacher (1 tensors)",
    ]
    # Width 128 is no released width and the cfg has no num_heads: one line asking for it.
    with pytest.raises(MimcliError, match=r"width 128 .*--num-heads N or as MODEL#heads=N"):
        load_model(str(path))
    for spec, heads in ((f"{path}#heads=4", 4), (str(path), 2)):
        loaded = load_model(spec, num_heads=2)  # the suffix wins over --num-heads
        assert loaded.model_args["num_heads"] == heads
        assert_model_matches_d2v2(loaded.model, weights, heads=heads, depth=2)
    note = load_model(f"{path}#heads=4").note
    assert note.startswith(f"{path}#heads=4: data2vec2 read as mimcli_vit_postnorm (width 128, ")
    assert "4 attention heads (from #heads=4)" in note
    assert "left out: decoder (3 tensors), recon_proj (1 tensors)" in note
    assert "EMA teacher (1 tensors)" in note


def install_omegaconf_standin(monkeypatch: pytest.MonkeyPatch) -> type:
    """Classes named and pickled like omegaconf 2.x's (``omegaconf.dictconfig.DictConfig``,
    ``omegaconf.nodes.AnyNode``, ``omegaconf.base.ContainerMetadata``): the state pickle gets is
    the instance ``__dict__`` minus ``_flags_cache`` — ``_metadata``, ``_parent`` (a cycle back to
    the parent container) and ``_content`` (key -> node) or ``_val`` (a leaf's value), as
    omegaconf's ``__getstate__`` returns it. omegaconf itself is not needed."""
    import sys
    import types
    import typing
    from collections import defaultdict
    from dataclasses import dataclass, field

    @dataclass
    class Metadata:
        ref_type: typing.Any
        object_type: typing.Any
        optional: bool
        key: typing.Any
        flags: dict = field(default_factory=dict)
        flags_root: bool = False
        resolver_cache: dict = field(default_factory=lambda: defaultdict(dict))

    @dataclass
    class ContainerMetadata(Metadata):
        key_type: typing.Any = None
        element_type: typing.Any = None

    class Node:
        def __getstate__(self) -> dict:
            state = dict(self.__dict__)
            del state["_flags_cache"]
            return state

    class DictConfig(Node):
        def __init__(self, content: dict, parent: typing.Any = None, key: typing.Any = None):
            meta = ContainerMetadata(typing.Any, dict, True, key, key_type=typing.Any)
            self.__dict__.update(_metadata=meta, _parent=parent, _flags_cache=None)
            self.__dict__["_content"] = {
                k: DictConfig(v, self, k) if isinstance(v, dict) else AnyNode(v, self, k)
                for k, v in content.items()
            }

    class AnyNode(Node):
        def __init__(self, value: typing.Any, parent: typing.Any, key: typing.Any):
            meta = Metadata(typing.Any, None, True, key)
            self.__dict__.update(_metadata=meta, _parent=parent, _flags_cache=None, _val=value)

    modules = {
        "omegaconf.base": (Metadata, ContainerMetadata, Node),
        "omegaconf.dictconfig": (DictConfig,),
        "omegaconf.nodes": (AnyNode,),
    }
    monkeypatch.setitem(sys.modules, "omegaconf", types.ModuleType("omegaconf"))
    for name, classes in modules.items():
        module = types.ModuleType(name)
        for cls in classes:
            cls.__module__, cls.__qualname__ = name, cls.__name__
            setattr(module, cls.__name__, cls)
        monkeypatch.setitem(sys.modules, name, module)
    return DictConfig


def test_data2vec2_head_count_from_pickled_omegaconf_config(tmp_path: Path, monkeypatch) -> None:
    """fairseq saves ``cfg`` as an OmegaConf DictConfig: the weights-only loader keeps its state
    as inert data and the converter reads ``cfg.model.num_heads`` from it (width 128, 4 heads: the
    old 64-dim-head guess said 2)."""
    weights = d2v2_weights(dim=128, prenet=1, depth=1, seed=5)
    with monkeypatch.context() as patched:
        dict_config = install_omegaconf_standin(patched)
        cfg = dict_config(
            {"common": {"seed": 1}, "model": {"_name": "data2vec_multi", "num_heads": 4}}
        )
        path = tmp_path / "d2v2_omegaconf.pt"
        torch.save({"cfg": cfg, "model": weights}, path)
    import sys

    assert "omegaconf" not in sys.modules  # the stand-in is gone; nothing can import it
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    assert "omegaconf.dictconfig.DictConfig" in unsafe and "omegaconf.nodes.AnyNode" in unsafe
    loaded = load_model(str(path))
    assert loaded.model_args["num_heads"] == 4
    assert "4 attention heads (from the file's cfg.model.num_heads)" in loaded.note
    assert_model_matches_d2v2(loaded.model, weights, heads=4, depth=2)
    with pytest.raises(MimcliError, match=r"records 4 attention heads .*not 2; leave out #heads=2"):
        load_model(f"{path}#heads=2")


def test_looks_like_data2vec2() -> None:
    weights = d2v2_weights(dim=32, prenet=0, depth=1)
    assert looks_like_data2vec2({"model": weights})
    assert looks_like_data2vec2({"model." + k: v for k, v in weights.items()})
    assert not looks_like_data2vec2({"cls_token": torch.zeros(1, 1, 8), "blocks.0.norm1.weight": 1})


@pytest.mark.parametrize(
    "drop",
    [POS, NORM + "weight"],
)
def test_data2vec2_missing_keys_name_the_expected_keys(drop: str) -> None:
    weights = d2v2_weights(dim=32, prenet=0, depth=1)
    del weights[drop]
    with pytest.raises(MimcliError, match="fixed_positional_encoder.positions") as err:
        convert_data2vec2({"model": weights})
    assert drop in str(err.value) and "extra_tokens" in str(err.value)


def test_data2vec2_audio_only_checkpoint_is_refused() -> None:
    audio = {
        "modality_encoders.AUDIO.local_encoder.conv.weight": torch.randn(4, 1, 3),
        "blocks.0.norm1.weight": torch.ones(4),
    }
    assert looks_like_data2vec2({"model": audio})
    with pytest.raises(MimcliError, match=r"modalities present: AUDIO.*local_encoder\.proj"):
        convert_data2vec2({"model": audio})


@pytest.mark.parametrize(
    "extra",
    ["norm.weight", IMAGE + "alibi_scale", "blocks.0.attn.logit_scale", "head.weight"],
)
def test_data2vec2_unsupported_or_unknown_keys_are_refused(extra: str) -> None:
    weights = d2v2_weights(dim=32, prenet=0, depth=1)
    weights[extra] = torch.ones(1)
    with pytest.raises(MimcliError, match=extra.replace(".", r"\.")):
        convert_data2vec2({"model": weights})


# ---------------------------------------------------------------- data2vec v1 vision (transformers)


def beit_relative_index(gh: int, gw: int) -> torch.Tensor:
    """BEiT's relative position index, pair by pair: patch pairs index a (2gh-1)(2gw-1) table by
    their row/column offset; the last three rows are CLS->patch, patch->CLS and CLS->CLS."""
    n, table = gh * gw, (2 * gh - 1) * (2 * gw - 1)
    index = torch.empty(n + 1, n + 1, dtype=torch.long)
    for i in range(n + 1):
        for j in range(n + 1):
            if i == 0 and j == 0:
                index[i, j] = table + 2
            elif i == 0:
                index[i, j] = table
            elif j == 0:
                index[i, j] = table + 1
            else:
                (yi, xi), (yj, xj) = divmod(i - 1, gw), divmod(j - 1, gw)
                index[i, j] = (yi - yj + gh - 1) * (2 * gw - 1) + (xi - xj + gw - 1)
    return index


def vision_checkpoint(
    shared: bool,
    per_layer: bool,
    mean_pooling: bool,
    abs_pos: bool = False,
    layer_scale: bool = True,
    prefix: str = "",
    dim: int = 32,
    depth: int = 2,
    heads: int = 2,
) -> tuple[dict[str, torch.Tensor], dict]:
    """transformers Data2VecVision weights and config.json (defaults as in the released configs)."""
    gen = torch.Generator().manual_seed(7)
    config = {
        "model_type": "data2vec-vision",
        "hidden_size": dim,
        "num_hidden_layers": depth,
        "num_attention_heads": heads,
        "intermediate_size": 4 * dim,
        "patch_size": PATCH,
        "image_size": IMG,
        "layer_norm_eps": 1e-12,
        "use_absolute_position_embeddings": abs_pos,
        "use_relative_position_bias": per_layer,
        "use_shared_relative_position_bias": shared,
        "layer_scale_init_value": 0.1 if layer_scale else 0.0,
        "use_mean_pooling": mean_pooling,
    }
    rows = (2 * GRID - 1) ** 2 + 3
    index = beit_relative_index(GRID, GRID)
    e = prefix + "embeddings."
    sd = {
        e + "cls_token": torch.randn(1, 1, dim, generator=gen),
        e + "mask_token": torch.randn(1, 1, dim, generator=gen),
        e + "patch_embeddings.projection.weight": torch.randn(dim, 3, PATCH, PATCH, generator=gen)
        / math.sqrt(3 * PATCH * PATCH),
        e + "patch_embeddings.projection.bias": 0.1 * torch.randn(dim, generator=gen),
    }
    if abs_pos:
        sd[e + "position_embeddings"] = torch.randn(1, GRID * GRID + 1, dim, generator=gen)
    if shared:
        rel = prefix + "encoder.relative_position_bias."
        sd[rel + "relative_position_bias_table"] = torch.randn(rows, heads, generator=gen)
        sd[rel + "relative_position_index"] = index
    for i in range(depth):
        p = f"{prefix}encoder.layer.{i}."
        a = p + "attention.attention."
        sd[a + "query.weight"], sd[a + "query.bias"] = rand_linear(gen, dim, dim)
        sd[a + "key.weight"] = rand_linear(gen, dim, dim)[0]
        sd[a + "value.weight"], sd[a + "value.bias"] = rand_linear(gen, dim, dim)
        if per_layer:
            table = torch.randn(rows, heads, generator=gen)
            sd[a + "relative_position_bias.relative_position_bias_table"] = table
            sd[a + "relative_position_bias.relative_position_index"] = index
        sd[p + "attention.output.dense.weight"], sd[p + "attention.output.dense.bias"] = (
            rand_linear(gen, dim, dim)
        )
        sd[p + "layernorm_before.weight"], sd[p + "layernorm_before.bias"] = rand_norm(gen, dim)
        sd[p + "layernorm_after.weight"], sd[p + "layernorm_after.bias"] = rand_norm(gen, dim)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = rand_linear(
            gen, 4 * dim, dim
        )
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = rand_linear(gen, dim, 4 * dim)
        if layer_scale:
            sd[p + "lambda_1"] = 0.5 + 0.2 * torch.randn(dim, generator=gen)
            sd[p + "lambda_2"] = 0.5 + 0.2 * torch.randn(dim, generator=gen)
    final = prefix + ("pooler.layernorm." if mean_pooling else "layernorm.")
    sd[final + "weight"], sd[final + "bias"] = rand_norm(gen, dim)
    if prefix:
        sd["classifier.weight"], sd["classifier.bias"] = rand_linear(gen, 10, dim)
    return sd, config


def vision_reference(sd: dict, config: dict, images: torch.Tensor, prefix: str = ""):
    """transformers' Data2VecVisionModel: pre-norm layers with separate q/k/v (no key bias), BEiT
    relative position bias (shared and/or per layer), layer scale; returns (blocks, sequence,
    pooled). With ``use_mean_pooling`` the sequence has no final norm; the pooled mean goes through
    ``pooler.layernorm`` when the weights have one (``add_pooling_layer=True``), else through
    nothing (transformers' default ``add_pooling_layer=False`` builds no pooler)."""
    w = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    eps, heads = config["layer_norm_eps"], config["num_attention_heads"]
    x = patchify(
        images,
        w["embeddings.patch_embeddings.projection.weight"],
        w["embeddings.patch_embeddings.projection.bias"],
    )
    x = torch.cat([w["embeddings.cls_token"].expand(len(x), -1, -1), x], 1)
    if config["use_absolute_position_embeddings"]:
        x = x + w["embeddings.position_embeddings"]
    index = beit_relative_index(GRID, GRID)

    def gather(table: torch.Tensor) -> torch.Tensor:
        return table[index.reshape(-1)].reshape(*index.shape, heads).permute(2, 0, 1)

    shared = None
    if config["use_shared_relative_position_bias"]:
        shared = gather(w["encoder.relative_position_bias.relative_position_bias_table"])
    outs = []
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        a = p + "attention.attention."
        h = layer_norm(x, w[p + "layernorm_before.weight"], w[p + "layernorm_before.bias"], eps)
        q = h @ w[a + "query.weight"].T + w[a + "query.bias"]
        k = h @ w[a + "key.weight"].T
        v = h @ w[a + "value.weight"].T + w[a + "value.bias"]
        bias = torch.zeros(())
        if config["use_relative_position_bias"]:
            bias = bias + gather(w[a + "relative_position_bias.relative_position_bias_table"])
        if shared is not None:
            bias = bias + shared
        o = attention(q, k, v, heads, bias)
        o = o @ w[p + "attention.output.dense.weight"].T + w[p + "attention.output.dense.bias"]
        x = x + w.get(p + "lambda_1", 1.0) * o
        h = layer_norm(x, w[p + "layernorm_after.weight"], w[p + "layernorm_after.bias"], eps)
        h = F.gelu(h @ w[p + "intermediate.dense.weight"].T + w[p + "intermediate.dense.bias"])
        h = h @ w[p + "output.dense.weight"].T + w[p + "output.dense.bias"]
        x = x + w.get(p + "lambda_2", 1.0) * h
        outs.append(x)
    if config["use_mean_pooling"]:
        pooled = x[:, 1:].mean(1)
        if "pooler.layernorm.weight" in w:
            pooled = layer_norm(
                pooled, w["pooler.layernorm.weight"], w["pooler.layernorm.bias"], eps
            )
        sequence = x
    else:
        sequence = layer_norm(x, w["layernorm.weight"], w["layernorm.bias"], eps)
        pooled = sequence[:, 0]
    return outs, sequence, pooled


VISION_CASES = {
    # facebook/data2vec-vision-base and -large (pre-trained): shared bias, CLS + final norm.
    "pretrained_shared_cls": dict(shared=True, per_layer=False, mean_pooling=False),
    # facebook/data2vec-vision-*-ft1k: per-layer bias, mean pooling, prefixed, classifier head.
    "ft1k_per_layer_mean": dict(
        shared=False, per_layer=True, mean_pooling=True, prefix="data2vec_vision."
    ),
    "shared_mean": dict(shared=True, per_layer=False, mean_pooling=True),
    "both_biases_prefixed": dict(
        shared=True, per_layer=True, mean_pooling=False, prefix="data2vec_vision."
    ),
    "abs_pos_no_layer_scale": dict(
        shared=False, per_layer=False, mean_pooling=True, abs_pos=True, layer_scale=False
    ),
}


@pytest.mark.parametrize("case", sorted(VISION_CASES))
def test_data2vec_vision_matches_transformers_reference(case: str) -> None:
    kwargs = VISION_CASES[case]
    sd, config = vision_checkpoint(**kwargs)
    assert looks_like_data2vec_vision(config)
    converted = convert_data2vec_vision(sd, config)
    assert converted.format == "data2vec-vision" and converted.arch.startswith("beit_")
    assert not [k for k in converted.state_dict if "mask_token" in k or "index" in k]
    args = json.loads(json.dumps(converted.model_args))  # must survive config.json
    assert args["global_pool"] == ("avg" if kwargs["mean_pooling"] else "token")
    assert converted.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert converted.pretrained_cfg["crop_pct"] == 0.9
    model = build_model(converted.arch, args).eval()
    load_weights(model, converted.state_dict, "data2vec-vision test")
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    prefix = kwargs.get("prefix", "")
    with torch.no_grad():
        # The key mapping is checked exactly with timm's eps; the source's own eps within EPS_ATOL.
        expected, sequence, pooled = vision_reference(
            sd, {**config, "layer_norm_eps": 1e-6}, images, prefix
        )
        _, sequence_hf, pooled_hf = vision_reference(sd, config, images, prefix)
        taps = tap_blocks(model, images)
        got_sequence = model.forward_features(images)
        got_pooled = model(images)
    assert len(taps) == len(expected) == config["num_hidden_layers"]
    for got, want in zip(taps, expected, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_sequence, sequence, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_pooled, pooled, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_sequence, sequence_hf, atol=EPS_ATOL, rtol=0)
    torch.testing.assert_close(got_pooled, pooled_hf, atol=EPS_ATOL, rtol=0)


def test_data2vec_vision_eps_difference_is_negligible() -> None:
    """timm's fixed eps 1e-6 against transformers' 1e-12: measured, not assumed."""
    sd, config = vision_checkpoint(shared=True, per_layer=False, mean_pooling=True)
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, _, pooled_hf = vision_reference(sd, config, images)
        _, _, pooled_timm_eps = vision_reference(sd, {**config, "layer_norm_eps": 1e-6}, images)
    diff = (pooled_hf - pooled_timm_eps).abs().max().item()
    assert 1e-7 < diff < EPS_ATOL


def test_data2vec_vision_refuses_mismatched_weights_and_large_eps() -> None:
    sd, config = vision_checkpoint(shared=True, per_layer=False, mean_pooling=False)
    with pytest.raises(MimcliError, match=r"missing .*encoder\.layer\.2\."):
        convert_data2vec_vision(sd, {**config, "num_hidden_layers": 3})
    with pytest.raises(MimcliError, match=r"unexpected .*relative_position_bias_table"):
        convert_data2vec_vision(sd, {**config, "use_shared_relative_position_bias": False})
    with pytest.raises(MimcliError, match="check image_size"):
        convert_data2vec_vision(sd, {**config, "image_size": 48})
    with pytest.raises(MimcliError, match="layer_norm_eps"):
        convert_data2vec_vision(sd, {**config, "layer_norm_eps": 1e-3})
    assert not looks_like_data2vec_vision({"model_type": "beit"})


@pytest.mark.parametrize("prefix", ["", "data2vec_vision."])
def test_data2vec_vision_without_pooler_runs_with_no_final_norm(prefix: str) -> None:
    """transformers' default Data2VecVisionModel (add_pooling_layer=False) with use_mean_pooling,
    or a segmentation model's backbone: no pooler.layernorm, so no final norm anywhere."""
    sd, config = vision_checkpoint(shared=False, per_layer=True, mean_pooling=True, prefix=prefix)
    sd = {k: v for k, v in sd.items() if ".pooler." not in f".{k}"}
    if prefix:  # a segmentation model: decode and auxiliary heads beside the backbone
        sd.pop("classifier.weight")
        sd.pop("classifier.bias")
        sd["decode_head.classifier.weight"] = torch.randn(5, 8, 1, 1)
        sd["auxiliary_head.classifier.weight"] = torch.randn(5, 8, 1, 1)
        sd["fpn1.0.weight"] = torch.randn(32, 32, 2, 2)
    converted = convert_data2vec_vision(sd, config)  # refused before: "missing pooler.layernorm"
    from mimcli.models.postnorm import BEIT_NO_FINAL_NORM_ARCH
    from mimcli.models.taps import final_norm_of

    assert converted.arch == BEIT_NO_FINAL_NORM_ARCH
    assert not [k for k in converted.state_dict if "norm." in k and not k.startswith("blocks.")]
    args = json.loads(json.dumps(converted.model_args))
    model = build_model(converted.arch, args).eval()
    load_weights(model, converted.state_dict, "data2vec-vision test")
    assert final_norm_of(model) is None
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, sequence, pooled = vision_reference(
            sd, {**config, "layer_norm_eps": 1e-6}, images, prefix
        )
        _, sequence_hf, _ = vision_reference(sd, config, images, prefix)
        taps = tap_blocks(model, images)
        got_sequence = model.forward_features(images)
        got_pooled = model(images)
    for got, want in zip(taps, expected, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_sequence, expected[-1], atol=ATOL, rtol=0)  # identity norm
    torch.testing.assert_close(got_sequence, sequence, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_sequence, sequence_hf, atol=EPS_ATOL, rtol=0)
    torch.testing.assert_close(got_pooled, expected[-1][:, 1:].mean(1), atol=ATOL, rtol=0)
    torch.testing.assert_close(got_pooled, pooled, atol=ATOL, rtol=0)
    # rebuilt from its name and JSON arguments alone (a refine export, a Hub repo): same function
    rebuilt = build_model(converted.arch, args).eval()
    load_weights(rebuilt, dict(model.state_dict()), "rebuilt")
    with torch.no_grad():
        assert torch.equal(rebuilt.forward_features(images), got_sequence)


def test_data2vec_vision_final_layernorm_with_mean_pooling_is_refused() -> None:
    """use_mean_pooling makes transformers' final ``layernorm`` an identity: weights holding one
    contradict config.json."""
    sd, config = vision_checkpoint(shared=True, per_layer=False, mean_pooling=False)
    with pytest.raises(MimcliError, match=r"unexpected layernorm\.bias, layernorm\.weight"):
        convert_data2vec_vision(sd, {**config, "use_mean_pooling": True})
