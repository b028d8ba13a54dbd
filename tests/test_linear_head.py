"""`eval --save-heads` keeps each model's best linear-probe cell (mimcli.linear_head); `push`
publishes the refined model's with a card snippet that classifies an image using timm,
torch, safetensors and json only."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

from mimcli.cli.app import app
from mimcli.data import scan_folder
from mimcli.errors import MimcliError
from mimcli.evaluate.linear import LinearConfig, linear_probe
from mimcli.evaluate.runner import EvalConfig, run_eval
from mimcli.linear_head import HEAD_RECIPE, HEAD_WEIGHTS, load_head
from tests import test_cli

runner = CliRunner()


def classify(model, head, recipe, images, half: bool = False) -> torch.Tensor:
    """(N,) predicted class of each image file, through the loader's module."""
    transform = timm.data.create_transform(**recipe["transform"])
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        taps = model.forward_intermediates(
            x, indices=recipe["indices"], norm=False, return_prefix_tokens=True,
            output_fmt="NLC", intermediates_only=True,
        )  # fmt: skip
        if half:  # the eval cache keeps float16 features
            taps = [(p.half().float(), c.half().float()) for p, c in taps]
        return head(taps).argmax(dim=1)


def test_keeping_the_head_changes_no_number():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    train = rng.normal(size=(2, 30, 8)).astype(np.float32) + labels[None, :, None]
    val_labels = np.repeat(np.arange(3), 4)
    val = rng.normal(size=(2, 12, 8)).astype(np.float32) + val_labels[None, :, None]
    cfg = LinearConfig(lrs=(0.01, 0.1), epochs=3, batch_size=8)
    args = (train, train * 0.5, labels, val, val * 0.5, val_labels, 3, cfg)
    plain, kept = linear_probe(*args), linear_probe(*args, keep_best=True)
    head = kept.pop("head")
    assert kept == plain
    d = {"cls": 8, "cls+patch": 16}[plain["best"]["features"].split("@")[0]]
    d *= 2 if plain["best"]["features"].endswith("last4") else 1
    shapes = {k: tuple(v.shape) for k, v in head["tensors"].items()}
    assert shapes == {"weight": (3, d), "bias": (3,), "mean": (d,), "var": (d,)}
    assert head["eps"] == 1e-5 and (head["tensors"]["var"] > 0).all()


def noise_folder(root, per_class: int, seed: int):
    """3 classes of pure-noise images: the probe fits the train set and is near chance on val,
    so its val predictions depend on every detail of the head."""
    rng = np.random.default_rng(seed)
    for c in range(3):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("name", ["cls@last", "cls+patch@last", "cls@last4", "cls+patch@last4"])
def test_head_input_is_the_probe_layout(tiny_vit, name):
    """LinearHead.features on forward_intermediates output is the vector the probe trained on."""
    from mimcli.evaluate.linear import build_inputs
    from mimcli.linear_head import LinearHead, feature_recipe
    from mimcli.models.taps import tap_blocks

    recipe = feature_recipe(name, [1, 2, 3, 4])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        taps = tap_blocks(tiny_vit, x, [0, 1, 2, 3])
        expected = build_inputs(taps.cls.transpose(0, 1), taps.patch.transpose(0, 1), [name])[name]
        out = tiny_vit.forward_intermediates(
            x, indices=recipe["indices"], norm=False, return_prefix_tokens=True,
            output_fmt="NLC", intermediates_only=True,
        )  # fmt: skip
    d = expected.shape[1]
    head = LinearHead(
        {"weight": torch.eye(d)[:3], "bias": torch.zeros(3), "mean": torch.zeros(d),
         "var": torch.ones(d)}, 0.0, recipe["tokens"],
    )  # fmt: skip
    torch.testing.assert_close(head.features(out), expected)


def test_saved_head_predicts_what_the_probe_measured(tiny_model_dir, tmp_path):
    train = noise_folder(tmp_path / "train", 10, seed=1)
    val = noise_folder(tmp_path / "val", 8, seed=2)
    heads = tmp_path / "heads"
    result = run_eval(
        EvalConfig(
            models=[str(tiny_model_dir)], train=train, val=val, out=tmp_path / "eval",
            protocols=("linear",), linear_epochs=5, num_workers=0, cache=False, save_heads=heads,
        )
    )  # fmt: skip
    best = result.models[0].linear["best"]
    folder = heads / "tiny-model"
    assert sorted(p.name for p in folder.iterdir()) == [HEAD_RECIPE, HEAD_WEIGHTS]
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "head" not in saved["models"][0]["linear"]  # tensors go to the head folder only
    head, recipe = load_head(folder)
    assert recipe["features"] == best["features"] and recipe["val_acc"] == best["val_acc"]
    assert recipe["classes"] == ["class_0", "class_1", "class_2"]
    last4 = best["features"].endswith("last4")
    assert recipe["blocks"] == ([1, 2, 3, 4] if last4 else [4])
    assert recipe["indices"] == [b - 1 for b in recipe["blocks"]]
    assert recipe["transform"]["input_size"] == [3, 32, 32]
    assert recipe["transform"]["crop_pct"] == 1.0

    model = timm.create_model(f"local-dir:{tiny_model_dir}", pretrained=True).eval()
    images = scan_folder(val)
    predicted = classify(model, head, recipe, images.paths, half=True)
    accuracy = 100.0 * (predicted.numpy() == np.asarray(images.labels)).mean()
    assert 0 < best["val_acc"] < 100  # a test that a wrong head could pass is no test
    assert accuracy == pytest.approx(best["val_acc"], abs=1e-6)


def test_pushed_head_card_snippet_classifies_like_the_loader(
    tiny_run, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    run_eval(
        EvalConfig(
            models=[str(run)], train=tiny_run["train"], val=tiny_run["val"], out=run / "eval",
            protocols=("linear",), linear_epochs=5, num_workers=0,
            save_heads=run / "eval" / "heads",
        )
    )  # fmt: skip
    assert (run / "eval" / "heads" / "run" / HEAD_RECIPE).is_file()
    repo = tmp_path / "repo"
    done = runner.invoke(app, ["push", str(run), "--dry-run", "--to", str(repo)])
    assert done.exit_code == 0, done.output
    assert {HEAD_RECIPE, HEAD_WEIGHTS} <= {p.name for p in repo.iterdir()}
    body = (repo / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", body, re.S)
    assert len(blocks) == 2 and "Classify with the linear-probe head" in body
    code = blocks[1]
    assert "mimcli" not in code and "PATH/TO/THIS/FOLDER" in code
    photos = scan_folder(tiny_run["val"])
    monkeypatch.chdir(tmp_path)
    head, recipe = load_head(repo)
    model = timm.create_model(f"local-dir:{repo}", pretrained=True).eval()
    capsys.readouterr()
    for path in photos.paths[::5]:
        Image.open(path).convert("RGB").save(tmp_path / "photo.jpg", quality=95)
        scope: dict = {}
        exec(code.replace("PATH/TO/THIS/FOLDER", str(repo)), scope)  # noqa: S102 - our card
        [expected] = classify(model, head, recipe, [tmp_path / "photo.jpg"])
        assert capsys.readouterr().out == recipe["classes"][int(expected)] + "\n"
        torch.testing.assert_close(scope["logits"], head(scope["taps"]))
    assert recipe["model"] == "run" and str(tmp_path) not in (repo / HEAD_RECIPE).read_text()

    # the snippet's cls+patch branch: a head over CLS + mean patch of the last 4 blocks
    from mimcli.linear_head import feature_recipe, save_head

    torch.manual_seed(0)
    wide = {"weight": torch.randn(3, 256), "bias": torch.randn(3), "mean": torch.randn(256),
            "var": torch.rand(256) + 0.5}  # fmt: skip
    save_head(repo, wide, {**recipe, **feature_recipe("cls+patch@last4", [1, 2, 3, 4])})
    head, wide_recipe = load_head(repo)
    assert wide_recipe["indices"] == [0, 1, 2, 3]
    scope = {}
    exec(code.replace("PATH/TO/THIS/FOLDER", str(repo)), scope)  # noqa: S102 - our card
    [expected] = classify(model, head, wide_recipe, [tmp_path / "photo.jpg"])
    assert capsys.readouterr().out == recipe["classes"][int(expected)] + "\n"
    assert scope["x"].shape == (1, 256)
    torch.testing.assert_close(scope["logits"], head(scope["taps"]))

    # --heads naming a folder without a head is one line; a head of another width is refused
    with pytest.raises(MimcliError, match="no head.json"):
        from mimcli.hub.repo_folder import build_repo_folder

        build_repo_folder(run, tmp_path / "r2", "a/b", heads_path=tmp_path)
    narrow = json.loads((repo / HEAD_RECIPE).read_text())
    narrow["indices"], narrow["blocks"] = narrow["indices"] * 2, narrow["blocks"] * 2
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(repo / HEAD_WEIGHTS, other / HEAD_WEIGHTS)
    (other / HEAD_RECIPE).write_text(json.dumps(narrow))
    with pytest.raises(MimcliError, match="belongs to another model"):
        build_repo_folder(run, tmp_path / "r3", "a/b", heads_path=other)


def test_save_heads_without_the_linear_protocol_is_one_line(tiny_model_dir, image_folders):
    train, val = image_folders
    result = runner.invoke(
        app,
        ["eval", str(tiny_model_dir), "--train", str(train), "--val", str(val),
         "--protocols", "knn", "--save-heads", "heads"],
    )  # fmt: skip
    line = test_cli.one_line_error(result)
    assert "--save-heads" in line and "linear" in line
