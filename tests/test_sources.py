"""The resolver end to end: Hub repos (through the real huggingface_hub client and the loopback
Hub), plain URLs, local folders and the offline/error paths."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mimcli.errors import MimcliError, RemoteError
from mimcli.models.sources import load_model
from tests.test_data2vec import vision_checkpoint, vision_reference

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_local_folder_and_local_dir_prefix(tiny_model_dir, tiny_vit):
    for spec in (str(tiny_model_dir), f"local-dir:{tiny_model_dir}"):
        loaded = load_model(spec)
        assert loaded.source_kind == "folder" and loaded.num_blocks == 4
        assert loaded.model_args["embed_dim"] == 32
        assert loaded.pretrained_cfg["input_size"] == [3, 32, 32] or tuple(
            loaded.pretrained_cfg["input_size"]
        ) == (3, 32, 32)
        with torch.no_grad():
            assert torch.equal(loaded.model(X), tiny_vit(X))


def test_hf_hub_timm_layout(hub, tiny_model_dir, tiny_vit):
    hub.add_repo("mimcli-test/tiny-vit", {p.name: p for p in tiny_model_dir.iterdir()})
    loaded = load_model("hf-hub:mimcli-test/tiny-vit")
    assert loaded.source_kind == "hf-hub" and loaded.format == "timm"
    with torch.no_grad():
        assert torch.equal(loaded.model(X), tiny_vit(X))
    assert hub.count("GET", "model.safetensors") >= 1


def test_hf_hub_data2vec_vision_layout(hub, tmp_path):
    sd, config = vision_checkpoint(shared=True, per_layer=False, mean_pooling=False)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    hub.add_repo(
        "facebook/data2vec-vision-tiny",
        {
            "config.json": tmp_path / "config.json",
            "model.safetensors": tmp_path / "model.safetensors",
        },
    )
    loaded = load_model("hf-hub:facebook/data2vec-vision-tiny")
    assert loaded.format == "data2vec-vision" and loaded.arch.startswith("beit")
    assert tuple(loaded.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    with torch.no_grad():
        _, sequence, _ = vision_reference(sd, {**config, "layer_norm_eps": 1e-6}, X)
        torch.testing.assert_close(loaded.model.forward_features(X), sequence, atol=1e-5, rtol=0)
    # the same files as a local folder
    local = load_model(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(local.model.forward_features(X), loaded.model.forward_features(X))


def test_data2vec_vision_folder_without_pooler_loads_with_no_final_norm(tmp_path):
    """transformers' default Data2VecVisionModel save (use_mean_pooling, no pooler): loaded with
    an identity final norm, and the load says so."""
    sd, config = vision_checkpoint(shared=True, per_layer=False, mean_pooling=True)
    sd = {k: v.contiguous() for k, v in sd.items() if not k.startswith("pooler.")}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_model(str(tmp_path))
    assert loaded.arch == "mimcli_beit_no_final_norm" and loaded.format == "data2vec-vision"
    assert any("no final norm" in note for note in loaded.notes)
    with torch.no_grad():
        blocks, sequence, _ = vision_reference(sd, {**config, "layer_norm_eps": 1e-6}, X)
        torch.testing.assert_close(loaded.model.forward_features(X), sequence, atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded.model(X), blocks[-1][:, 1:].mean(1), atol=1e-5, rtol=0)


def test_hf_hub_errors(hub):
    with pytest.raises(MimcliError, match="no such repo"):
        load_model("hf-hub:nobody/nothing")
    hub.add_repo("mimcli-test/no-config", {"README.md": b"hello"})
    with pytest.raises(MimcliError, match="config.json"):
        load_model("hf-hub:mimcli-test/no-config")


def test_url_download_is_cached(hub, tmp_path, tiny_vit):
    sd = {k: v.contiguous() for k, v in tiny_vit.state_dict().items()}
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": sd}, path)
    url = hub.add_url_file("/downloads/mae_pretrain_vit_tiny.pth", path.read_bytes())
    first = load_model(url + "#heads=2")  # the suffix never reaches the server
    assert first.format == "mae" and first.source_kind == "url"
    gets = hub.count("GET", "mae_pretrain_vit_tiny.pth")
    second = load_model(url, num_heads=2)
    assert hub.count("GET", "mae_pretrain_vit_tiny.pth") == gets == 1
    with torch.no_grad():
        assert torch.equal(first.model(X), second.model(X))
        assert torch.equal(first.model(X), tiny_vit(X))
    cached = list((Path(os.environ["MIMCLI_CACHE"]) / "downloads").glob("*mae_pretrain_vit_tiny*"))
    assert len(cached) == 1 and not list(cached[0].parent.glob(".*.tmp"))


def test_url_errors(hub):
    with pytest.raises(MimcliError, match="HTTP 404"):
        load_model(f"{hub.url}/downloads/missing.pth")
    url = hub.add_url_file("/downloads/flaky.pth", b"x")
    hub.fail_next(10, status=500, path_contains="flaky")
    with pytest.raises(RemoteError, match="after 3 attempts"):
        load_model(url)
    assert not list((Path(os.environ["MIMCLI_CACHE"]) / "downloads").glob("*flaky*"))


def test_offline_with_nothing_cached_is_one_line_exit_2(tmp_path, image_folders):
    """A timm name while the Hub is unreachable (closed port) and the cache is empty."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with-block ends
    train, val = image_folders
    env = dict(
        os.environ,
        HF_ENDPOINT=f"http://127.0.0.1:{port}",
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
        HF_HUB_ETAG_TIMEOUT="2",
        HF_HUB_DOWNLOAD_TIMEOUT="2",
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mimcli.cli.app",
            "probe",
            "vit_tiny_patch16_224.augreg_in21k",
            "--train",
            str(train),
            "--val",
            str(val),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "cannot reach the Hub" in lines[0] and "Traceback" not in proc.stderr


def test_a_converted_checkpoint_does_not_inherit_timms_tag_or_licence(tmp_path):
    """The architecture name's timm cfg describes timm's weights (e.g. an augreg tag under
    apache-2.0); a raw state dict loaded through it must not claim them (push would inherit the
    licence)."""
    import timm

    vit = timm.create_model(
        "vit_base_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
        embed_dim=192, depth=1, num_heads=3,
    )  # fmt: skip
    assert {"license", "tag"} <= set(vit.pretrained_cfg)  # what would leak
    path = tmp_path / "weights.pth"
    torch.save(vit.state_dict(), path)
    loaded = load_model(str(path))
    assert not {"license", "tag", "hf_hub_id", "url"} & set(loaded.pretrained_cfg)
    assert loaded.pretrained_cfg["input_size"] == (3, 32, 32)
