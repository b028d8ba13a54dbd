"""timm's folder layout as `mimcli push` writes it (mimcli.hub.timm_layout): the weight check,
reproducible safetensors bytes, and a config that timm loads strictly."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open

from mimcli.errors import MimcliError
from mimcli.hub.timm_layout import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    encoder_weights,
    timm_config,
    write_timm_folder,
)
from tests.conftest import TINY_ARGS, make_tiny_vit


def test_safetensors_bytes_are_reproducible_and_readable(tmp_path):
    from safetensors.torch import load_file as load

    from mimcli.hub.timm_layout import safetensors_bytes

    tensors = {
        "b": torch.randn(3, 2),
        "a": torch.arange(5, dtype=torch.int64),
        "h": torch.randn(4).to(torch.bfloat16),
        "s": torch.tensor(2.5),
    }
    meta = {"z": "1", "format": "pt", "a": "x"}
    blob = safetensors_bytes(tensors, meta)
    assert blob == safetensors_bytes(dict(reversed(tensors.items())), dict(reversed(meta.items())))
    path = tmp_path / "w.safetensors"
    path.write_bytes(blob)
    loaded = load(str(path))
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == meta
    # and across processes (the safetensors writer's metadata order is not)
    code = (
        "import torch, sys; from mimcli.hub.timm_layout import safetensors_bytes; "
        "sys.stdout.buffer.write(safetensors_bytes({'w': torch.ones(2)}, "
        "{'format': 'pt', 'mimcli_version': '1', 'base_model': 'b', 'objective': 'nna'}))"
    )
    import subprocess
    import sys

    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True).stdout for _ in "ab"}
    assert len(runs) == 1


def test_weights_must_be_exactly_the_architecture(tmp_path):
    from safetensors.torch import save_file

    model = make_tiny_vit()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    got = encoder_weights(tmp_path, "vit_base_patch16_224", dict(TINY_ARGS))
    assert list(got) == list(state) and all(torch.equal(got[k], state[k]) for k in state)

    state["head.extra"] = torch.zeros(1)
    state["pos_embed"] = torch.zeros(1, 3, 32)
    del state["cls_token"]
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(MimcliError, match="weights do not match vit_base_patch16_224") as err:
        encoder_weights(tmp_path, "vit_base_patch16_224", dict(TINY_ARGS))
    assert "['cls_token']" in str(err.value) and "['head.extra']" in str(err.value)
    assert "wrong shape ['pos_embed']" in str(err.value)


def test_timm_folder_is_two_files_timm_loads(tmp_path):
    model = make_tiny_vit()
    export = {
        "architecture": "vit_base_patch16_224",
        "num_classes": 0,
        "num_features": TINY_ARGS["embed_dim"],
        "global_pool": "token",
        "model_args": dict(TINY_ARGS),
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3},
        "label_names": ["not", "kept"],
    }
    write_timm_folder(tmp_path, dict(model.state_dict()), {"format": "pt"}, export)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert "label_names" not in config and config["model_args"] == TINY_ARGS
    assert config["pretrained_cfg"] == {
        **export["pretrained_cfg"],
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": "bicubic",
    }
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(MimcliError, match=r"lacks pretrained_cfg \['mean', 'std'\]"):
        timm_config({**export, "pretrained_cfg": {"input_size": [3, 32, 32]}})
