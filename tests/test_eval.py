"""mimcli eval: feature cache, protocols wired end to end, run folders, CLI."""

import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mimcli.cli.app import app
from mimcli.data import eval_transform, scan_folder
from mimcli.errors import MimcliError
from mimcli.evaluate.runner import EvalConfig, resolve_eval_source, run_eval
from mimcli.featcache import cache_key, cached_features
from mimcli.models.sources import load_model

runner = CliRunner()


def test_feature_cache_hits_and_invalidates(tiny_model_dir, image_folders, tmp_path):
    train, _ = image_folders
    loaded = load_model(str(tiny_model_dir))
    images = scan_folder(train)
    tf = eval_transform(loaded.pretrained_cfg)
    tcfg = {"input_size": (3, 32, 32)}
    args = (loaded.model, images, tf, tcfg, [3, 4], torch.device("cpu"))
    first, hit1 = cached_features(*args, num_workers=0)
    second, hit2 = cached_features(*args, num_workers=0)
    assert (hit1, hit2) == (False, True)
    np.testing.assert_array_equal(np.asarray(first.cls), np.asarray(second.cls))
    np.testing.assert_array_equal(first.labels, second.labels)
    key = cache_key(loaded.model, images, tcfg, [3, 4], "float16")
    assert cache_key(loaded.model, images, {"input_size": (3, 48, 48)}, [3, 4], "float16") != key
    assert cache_key(loaded.model, images, tcfg, [4], "float16") != key
    # The same weights read with another attention-head count give other features.
    four = load_model(str(tiny_model_dir / "model.safetensors"), num_heads=4).model
    assert four.state_dict().keys() == loaded.model.state_dict().keys()
    assert all(torch.equal(four.state_dict()[k], v) for k, v in loaded.model.state_dict().items())
    assert cache_key(four, images, tcfg, [3, 4], "float16") != key
    with torch.no_grad():
        loaded.model.blocks[0].attn.qkv.weight.add_(1e-3)
    assert cache_key(loaded.model, images, tcfg, [3, 4], "float16") != key  # weights changed
    loaded.model.blocks[0].attn.qkv.weight.data.sub_(1e-3)
    os.utime(images.paths[0], ns=(1, 1))
    assert cache_key(loaded.model, images, tcfg, [3, 4], "float16") != key  # a file changed
    _, hit3 = cached_features(*args, use_cache=False, num_workers=0)
    assert hit3 is False


def test_run_folder_is_evaluated_through_its_export(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")
    source, label = resolve_eval_source(str(tmp_path))
    assert source == str(tmp_path / "export") and "refined" in label
    assert resolve_eval_source("vit_base_patch16_224.mae")[0] == "vit_base_patch16_224.mae"


def test_knn_protocol_matches_probe(tiny_model_dir, image_folders, tmp_path):
    from mimcli.probe import ProbeConfig, run_probe

    train, val = image_folders
    result = run_eval(
        EvalConfig(
            models=[str(tiny_model_dir)],
            train=train,
            val=val,
            protocols=("knn",),
            ks=(5,),
            num_workers=0,
        )
    )
    probe = run_probe(
        ProbeConfig(model=str(tiny_model_dir), train=train, val=val, k=5, blocks=[4], num_workers=0)
    )
    assert result.models[0].knn["cls"]["5"] == pytest.approx(probe.blocks[0].cls)
    assert result.models[0].knn["patch"]["5"] == pytest.approx(probe.blocks[0].patch)


def test_bad_eval_options(tiny_model_dir, image_folders):
    train, val = image_folders
    for kwargs, match in (
        ({"protocols": ("knn", "nope")}, "protocols"),
        ({"ks": (0,)}, "--k"),
        ({"cluster_features": "x"}, "cluster"),
    ):
        with pytest.raises(MimcliError, match=match):
            run_eval(EvalConfig(models=[str(tiny_model_dir)], train=train, val=val, **kwargs))
    result = runner.invoke(
        app, ["eval", str(tiny_model_dir), "--train", str(train), "--val", str(val), "--k", "a"]
    )
    assert result.exit_code == 2 and "--k" in result.stderr


def test_cli_all_protocols_two_models(tiny_model_dir, image_folders, tmp_path):
    from timm.models import save_for_hf

    from tests.conftest import TINY_ARGS, make_tiny_vit

    other = make_tiny_vit(seed=5)
    other.pretrained_cfg = dict(other.pretrained_cfg, input_size=(3, 32, 32), crop_pct=1.0)
    save_for_hf(other, str(tmp_path / "other"), model_args=dict(TINY_ARGS), safe_serialization=True)
    train, val = image_folders
    out = tmp_path / "eval"
    args = [
        "eval",
        str(tiny_model_dir),
        str(tmp_path / "other"),
        "--train",
        str(train),
        "--val",
        str(val),
        "--num-workers",
        "0",
        "--k",
        "3,5",
        "--linear-epochs",
        "3",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [m["name"] for m in data["models"]] == ["tiny-model", "other"]
    for m in data["models"]:
        assert set(m["knn"]["cls"]) == {"3", "5"} and 0 <= m["knn"]["patch"]["5"] <= 100
        assert 0 <= m["linear"]["best"]["val_acc"] <= 100 and len(m["linear"]["grid"]) >= 4
        assert set(m["lowshot"]) == {"1-shot", "2-shot", "5-shot", "1%"}
        assert len(m["lowshot"]["5-shot"]["runs"]) == 3
        assert set(m["cluster"]) >= {"acc", "nmi", "ami", "ari", "silhouette", "davies_bouldin"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"][0]["knn"] == data["models"][0]["knn"]
    assert (out / "knn.png").stat().st_size > 1000 and (out / "lowshot.png").stat().st_size > 1000
    assert len(list((out / "splits").glob("*.json"))) == 12  # 4 settings x 3 seeds
    # a second run reuses cached features and the saved splits: same numbers, table output
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "tiny-model" in again.stdout and "5-shot %" in again.stdout
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["models"][1]["lowshot"] == saved["models"][1]["lowshot"]
    assert all(m["features_cached"] for m in rerun["models"])


def test_far_resized_images_get_a_note_and_results_record_the_preprocessing(
    tiny_model_dir, tmp_path, caplog
):
    import logging

    from mimcli.evaluate.runner import EvalConfig, run_eval
    from tests.conftest import write_image_folder

    train = write_image_folder(tmp_path / "train", per_class=4, size=8, seed=1)
    val = write_image_folder(tmp_path / "val", per_class=2, size=8, seed=2)
    cfg = EvalConfig(models=[str(tiny_model_dir)], train=train, val=val, protocols=("knn",),
                     ks=(3,), num_workers=0, cache=False)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="mimcli"):
        result = run_eval(cfg)
    assert "--train: images are 8x8 px and are resized to the model's 32 px (4.0x)" in caplog.text
    pre = result.models[0].preprocessing
    assert pre["native_size"] == [8, 8] and pre["input_size"] == [3, 32, 32]
