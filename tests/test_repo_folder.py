"""`mimcli push` builds its repo folder offline (mimcli.hub.repo_folder): weights, timm config,
model card, results, secrets kept out, atomic replacement."""

from __future__ import annotations

import json
import re

import pytest
import timm
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import mimcli
from mimcli.errors import MimcliError
from mimcli.evaluate.runner import EvalConfig, run_eval
from mimcli.hub.repo_folder import MARKER, build_repo_folder
from mimcli.probe import ProbeConfig, run_probe, save_probe
from tests.conftest import TINY_ARGS, unlicensed_run


def card_meta(folder):
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_folder_holds_exactly_the_timm_encoder(tiny_run, tmp_path):
    run = tiny_run["run"]
    built = build_repo_folder(run, tmp_path / "repo", "alice/tiny-refined", license="mit")
    folder = built.path
    assert set(built.files) == {"README.md", "config.json", "model.safetensors", MARKER}
    assert not list(tmp_path.glob(".repo*")), "staging folder left behind"

    exported = load_file(str(run / "export" / "model.safetensors"))
    published = load_file(str(folder / "model.safetensors"))
    reference = timm.create_model("vit_base_patch16_224", num_classes=0, **TINY_ARGS)
    assert set(published) == set(reference.state_dict())
    for key, value in published.items():
        assert torch.equal(value, exported[key]), key
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "pt"
    assert meta["mimcli_version"] == mimcli.__version__
    assert meta["base_model"] == str(tiny_run["base"])
    assert meta["objective"] == "nna"

    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_base_patch16_224"
    assert config["num_features"] == TINY_ARGS["embed_dim"]
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 32, 32] and pcfg["crop_pct"] == 1.0
    assert {"mean", "std", "crop_mode", "interpolation"} <= set(pcfg)

    # stock timm loads the folder strictly and computes what the run's export computes
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    ours = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), ours(x))

    meta, body = card_meta(folder)
    assert meta["library_name"] == "timm"
    assert meta["pipeline_tag"] == "image-feature-extraction"
    assert meta["license"] == "mit"
    assert {"mimcli", "nna"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local base has no Hub id
    assert "model-index" not in meta  # no eval results given
    assert 'timm.create_model("hf-hub:alice/tiny-refined", pretrained=True)' in body
    assert "blocks 3, 4" in body and "mimcli eval BASE RUN_DIR" in body
    run_cfg = json.loads((folder / MARKER).read_text())
    assert run_cfg["config"]["blocks"] == "last2"


def test_card_reports_eval_and_probe(tiny_run, tmp_path):
    run, base = tiny_run["run"], tiny_run["base"]
    result = run_eval(
        EvalConfig(
            models=[str(base), str(run)],
            train=tiny_run["train"],
            val=tiny_run["val"],
            out=run / "eval",
            protocols=("knn", "lowshot", "cluster"),
            ks=(3,),
            shots=(1, 2),
            num_workers=0,
            cache=False,
        )
    )
    probe = run_probe(
        ProbeConfig(
            model=str(run / "export"),
            train=tiny_run["train"],
            val=tiny_run["val"],
            k=3,
            num_workers=0,
        )
    )
    save_probe(probe, run / "probe")
    try:
        built = build_repo_folder(run, tmp_path / "repo", "alice/tiny-refined", datasets=["x/y"])
    finally:
        import shutil

        shutil.rmtree(run / "eval")
        shutil.rmtree(run / "probe")
    folder = built.path
    assert {
        "eval_results.json",
        "probe.json",
        "plots/knn.png",
        "plots/lowshot.png",
        "plots/probe.png",
    } <= set(built.files)
    meta, body = card_meta(folder)
    # the usage snippet is code: the secret filter must leave `..._tokens=True` alone
    assert "return_prefix_tokens=True" in body and "<redacted>" not in body
    assert "MIM-Refiner recipe" in body and "mim-refiner" in meta["tags"]
    # inherited from the base folder's timm pretrained_cfg (timm's default for this arch)
    assert meta["license"] == "apache-2.0"
    # a tiny run does not improve k-NN: the push warns, the card's first sentence says so
    assert built.warnings == [
        w for w in built.warnings if w.startswith("the refined model is not measurably better")
    ]
    assert len(built.warnings) == 1 and "did **not** measurably improve k-NN" in body
    assert f"inherited from the base model {base}" in body
    assert meta["datasets"] == ["x/y"]
    refined = result.models[1]
    entries = {
        m["name"]: m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]
    }
    assert entries["k-NN top-1 (CLS, k=3)"] == pytest.approx(refined.knn["cls"]["3"], abs=1e-4)
    assert entries["1-shot logistic regression top-1 (mean of splits)"] == pytest.approx(
        refined.lowshot["1-shot"]["mean"], abs=1e-4
    )
    assert entries["k-means NMI"] == pytest.approx(refined.cluster["nmi"], abs=1e-4)
    # the before/after table: base and refined columns with their values and the change
    base_cls, new_cls = result.models[0].knn["cls"]["3"], refined.knn["cls"]["3"]
    row = next(line for line in body.splitlines() if line.startswith("| k-NN CLS k=3 %"))
    # k-NN with its binomial standard error; the change with McNemar's p on the same queries
    from mimcli.evaluate.stats import mcnemar, p_text, standard_error, unpack

    before, after = (unpack(m.knn_correct["cls"]["3"]) for m in (result.models[0], refined))
    assert len(before) == len(after) == result.val_images
    se = [standard_error(acc, result.val_images) for acc in (base_cls, new_cls)]
    p = p_text(mcnemar(before, after))
    assert row == (
        f"| k-NN CLS k=3 % | {base_cls:.2f} ± {se[0]:.2f} | {new_cls:.2f} ± {se[1]:.2f} | "
        f"{new_cls - base_cls:+.2f} ({p}) |"
    )
    nmi = next(line for line in body.splitlines() if line.startswith("| k-means NMI"))
    base_nmi, new_nmi = result.models[0].cluster["nmi"], refined.cluster["nmi"]
    assert nmi.endswith(f"| {new_nmi - base_nmi:+.4f} |")
    assert "Davies-Bouldin (lower is better)" in body
    assert "base (base)" in body and "](plots/probe.png)" in body
    # the card's YAML is what huggingface_hub itself parses
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert card.data.eval_results[0].metric_value == entries["k-NN top-1 (CLS, k=3)"]


def test_unknown_license_is_other_with_a_warning(tmp_path):
    run = unlicensed_run(tmp_path / "run")
    built = build_repo_folder(run, tmp_path / "repo", "a/b")
    meta, body = card_meta(built.path)
    assert meta["license"] == "other"
    assert any("pass --license" in w for w in built.warnings)
    assert "set it with --license" in body


def test_token_never_reaches_the_folder(tiny_run, tmp_path, monkeypatch):
    token = "hf_FolderMustNotSeeThis123"
    monkeypatch.setenv("HF_TOKEN", token)
    run = tiny_run["run"]
    config = json.loads((run / "config.json").read_text())
    poisoned = tmp_path / "run"
    import shutil

    shutil.copytree(run, poisoned)
    config["environment"]["argv"] += f" HF_TOKEN={token}"
    (poisoned / "config.json").write_text(json.dumps(config))
    built = build_repo_folder(poisoned, tmp_path / "repo", "alice/x", license="mit")
    for path in built.path.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


def test_postnorm_encoder_is_published_with_a_loading_note(tmp_path):
    from timm.models import save_for_hf

    from mimcli.models.postnorm import POSTNORM_ARCH

    args = dict(TINY_ARGS)
    model = timm.create_model(POSTNORM_ARCH, num_classes=0, **args)
    model.pretrained_cfg = dict(
        model.pretrained_cfg, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3
    )
    run = tmp_path / "run"
    save_for_hf(model, str(run / "export"), model_args=args, safe_serialization=True)
    (run / "config.json").write_text(json.dumps({"config": {"model": "d2v2.pt"}, "resolved": {}}))
    built = build_repo_folder(run, tmp_path / "repo", "alice/d2v2", license="cc-by-nc-4.0")
    assert not built.stock_timm
    assert any("not a stock timm architecture" in w for w in built.warnings)
    _, body = card_meta(built.path)
    assert "Needs mimcli to load" in body and "import mimcli.models.postnorm" in body
    # what the card tells a reader to run, in a fresh interpreter
    import subprocess
    import sys

    code = (
        "import timm, torch\n"
        "import mimcli.models.postnorm\n"
        f"m = timm.create_model('local-dir:{built.path}', pretrained=True)\n"
        "print(m(torch.zeros(1, 3, 32, 32)).shape[-1])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == str(TINY_ARGS["embed_dim"]), done.stderr
    loaded = timm.create_model(f"local-dir:{built.path}", pretrained=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_beit_without_final_norm_is_published_with_a_loading_note(tmp_path):
    """A data2vec-vision model saved without its pooler loads as mimcli_beit_no_final_norm; timm
    alone cannot build it, so the repo says how to load it and the build warns."""
    from timm.models import save_for_hf

    from mimcli.models.postnorm import BEIT_NO_FINAL_NORM_ARCH

    args = dict(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, use_abs_pos_emb=False,
        use_rel_pos_bias=True, init_values=0.1, global_pool="avg", use_fc_norm=True,
    )  # fmt: skip
    model = timm.create_model(BEIT_NO_FINAL_NORM_ARCH, num_classes=0, **args).eval()
    run = tmp_path / "run"
    save_for_hf(model, str(run / "export"), model_args=args, safe_serialization=True)
    (run / "config.json").write_text(json.dumps({"config": {"model": "d2v"}, "resolved": {}}))
    built = build_repo_folder(run, tmp_path / "repo", "alice/d2v", license="apache-2.0")
    assert not built.stock_timm
    assert any("BEiT with no final norm" in w for w in built.warnings)
    _, body = card_meta(built.path)
    assert "Needs mimcli to load" in body and "*no final norm*" in body
    assert "import mimcli.models.postnorm" in body and "post-norm* ViT" not in body
    loaded = timm.create_model(f"local-dir:{built.path}", pretrained=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), model.forward_features(x))


def test_bad_inputs_are_one_line_errors(tiny_run, tmp_path):
    with pytest.raises(MimcliError, match="not a finished mimcli refine run"):
        build_repo_folder(tmp_path, tmp_path / "repo", "a/b")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(MimcliError, match="not a folder written by mimcli push"):
        build_repo_folder(tiny_run["run"], foreign, "a/b")
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(MimcliError, match="not a results.json"):
        build_repo_folder(tiny_run["run"], tmp_path / "r", "a/b", eval_path=foreign / "notes.txt")


def test_rebuild_replaces_only_on_success(tiny_run, tmp_path, monkeypatch):
    dest = tmp_path / "repo"
    build_repo_folder(tiny_run["run"], dest, "a/b", license="mit")
    before = {p.name: p.read_bytes() for p in dest.iterdir() if p.is_file()}

    def boom(inputs):
        raise RuntimeError("card failed")

    monkeypatch.setattr("mimcli.report.modelcard.render_card", boom)
    with pytest.raises(RuntimeError, match="card failed"):
        build_repo_folder(tiny_run["run"], dest, "a/b", license="apache-2.0")
    after = {p.name: p.read_bytes() for p in dest.iterdir() if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert re.search(r"license: mit", (dest / "README.md").read_text())


def test_card_usage_snippet_runs_verbatim_and_gives_the_measured_feature(
    tiny_run, tmp_path, monkeypatch
):
    """The card's Python block, run as written (the folder's path put where it says so), gives
    the CLS the results measured: the last block before the final norm."""
    from PIL import Image

    from mimcli.models.taps import tap_blocks

    built = build_repo_folder(tiny_run["run"], tmp_path / "repo", "tiny-refined")
    _, body = card_meta(built.path)
    code = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    assert "your-name" not in body and "local-dir:PATH/TO/THIS/FOLDER" in code
    monkeypatch.chdir(tmp_path)
    photo = next(tiny_run["val"].rglob("*.png"))
    Image.open(photo).convert("RGB").save(tmp_path / "photo.jpg", quality=95)
    scope: dict = {}
    exec(code.replace("PATH/TO/THIS/FOLDER", str(built.path)), scope)  # noqa: S102 - our card
    model, x = scope["model"], scope["transform"](scope["image"]).unsqueeze(0)
    with torch.no_grad():
        taps = tap_blocks(model, x, [len(model.blocks) - 1])
    torch.testing.assert_close(scope["cls"], taps.cls[:, 0])
    torch.testing.assert_close(scope["mean_patch"], taps.patch[:, 0])


def test_card_datasets_come_from_hub_sources_never_from_folder_names(tiny_run, tmp_path):
    """Dataset ids from --dataset and hfds/ sources only; the probe the run's --probe named
    is published with its plot."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    built = build_repo_folder(run, tmp_path / "a", "alice/x")
    meta, _ = card_meta(built.path)
    assert "datasets" not in meta  # a folder's name is not a dataset id
    assert "plots/probe.png" not in built.files
    probe = run_probe(
        ProbeConfig(model=str(run / "export"), train=tiny_run["train"], val=tiny_run["val"], k=3,
                    num_workers=0)
    )  # fmt: skip
    save_probe(probe, tmp_path / "probe")
    config = json.loads((run / "config.json").read_text())
    config["config"]["data"] = "hfds/someone/tiny-set:train"
    config["config"]["probe"] = str(tmp_path / "probe" / "probe.json")
    (run / "config.json").write_text(json.dumps(config))
    built = build_repo_folder(run, tmp_path / "b", "alice/x", datasets=["other/set"])
    meta, _ = card_meta(built.path)
    assert meta["datasets"] == ["other/set", "someone/tiny-set"]
    assert "plots/probe.png" in built.files and "probe.json" in built.files
