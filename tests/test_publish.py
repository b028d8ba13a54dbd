"""`mimcli push` builds its repo folder offline: weights, timm config, model card, secrets."""

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
from mimcli.evaluate import EvalConfig, run_eval
from mimcli.probe import ProbeConfig, run_probe, save_probe
from mimcli.publish import (
    MARKER,
    REDACTED,
    base_model_info,
    build_repo_folder,
    check_push_options,
    eval_columns,
    scrub,
)
from mimcli.results import EvalResult
from tests.conftest import TINY_ARGS, make_tiny_vit


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
    assert meta["license"] == "apache-2.0" and not built.warnings
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
    assert row == f"| k-NN CLS k=3 % | {base_cls:.2f} | {new_cls:.2f} | {new_cls - base_cls:+.2f} |"
    nmi = next(line for line in body.splitlines() if line.startswith("| k-means NMI"))
    base_nmi, new_nmi = result.models[0].cluster["nmi"], refined.cluster["nmi"]
    assert nmi.endswith(f"| {new_nmi - base_nmi:+.4f} |")
    assert "Davies-Bouldin (lower is better)" in body
    assert "base (base)" in body and "](plots/probe.png)" in body
    # the card's YAML is what huggingface_hub itself parses
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert card.data.eval_results[0].metric_value == entries["k-NN top-1 (CLS, k=3)"]


def test_eval_columns_pick_this_run_and_its_base(tiny_run, tmp_path):
    run = tiny_run["run"]

    def result(*sources):
        models = [
            {"name": s.rstrip("/").split("/")[-1], "source": s, "arch": "a", "features_cached": 0}
            for s in sources
        ]
        return EvalResult.from_dict(
            {
                "models": models,
                "train_images": 1,
                "val_images": 1,
                "num_classes": 2,
                "protocols": ["knn"],
                "ks": [1],
            }
        )

    label = f"{run} (refined, export/)"
    assert eval_columns(result("b", label), run, "b") == (0, 1)
    assert eval_columns(result(label, "x", "b"), run, "b") == (2, 0)
    assert eval_columns(result(label, "x", "y"), run, "b") == (None, 0)
    assert eval_columns(result(str(run / "export")), run, "b") == (None, 0)
    warnings = []  # a moved run: the last model that is not the base, with a warning
    assert eval_columns(result("b", "/elsewhere/rA"), run, "b", warnings) == (0, 1)
    assert "taking 'rA'" in warnings[0]
    with pytest.raises(MimcliError, match="every evaluated model is the base"):
        eval_columns(result("b"), run, "b")


def test_license_and_base_model_are_inherited():
    hub_id, lic = base_model_info("vit_large_patch16_224.mae", {})
    assert (hub_id, lic) == ("timm/vit_large_patch16_224.mae", "cc-by-nc-4.0")
    assert base_model_info("examples/models/fmnist-mae-tiny", {}) == (None, "apache-2.0")
    assert base_model_info("nonexistent-thing", {"license": "mit"}) == (None, "mit")
    assert base_model_info("nonexistent-thing", {}) == (None, None)


def test_unknown_license_is_other_with_a_warning(tmp_path):
    from timm.models import save_for_hf

    model = make_tiny_vit()
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "license"} | {
        "input_size": (3, 32, 32)
    }
    run = tmp_path / "run"
    save_for_hf(model, str(run / "export"), model_args=dict(TINY_ARGS), safe_serialization=True)
    (run / "config.json").write_text(json.dumps({"config": {"model": "weights.pth"}}))
    built = build_repo_folder(run, tmp_path / "repo", "a/b")
    meta, body = card_meta(built.path)
    assert meta["license"] == "other"
    assert any("pass --license" in w for w in built.warnings)
    assert "set it with --license" in body


def test_scrub_removes_secrets():
    run = {
        "config": {"hub_token": "abc", "lr": 1.0, "api_key": None},
        "environment": {"argv": "mimcli refine m --token hf_abcdefghijk --out r"},
        "notes": ["uses hf_ZZZZZZZZZZZZ here", "my-secret-value"],
    }
    clean = scrub(run, secrets=["my-secret-value"])
    text = json.dumps(clean)
    assert clean["config"] == {"hub_token": REDACTED, "lr": 1.0, "api_key": None}
    assert "hf_abcdefghijk" not in text and "hf_ZZZZ" not in text
    assert "my-secret-value" not in text
    assert clean["environment"]["argv"] == f"mimcli refine m --token {REDACTED} --out r"
    leaky = [
        "https://bucket.s3.amazonaws.com/w.pth?X-Amz-Signature=abc&X-Amz-Security-Token=def",
        "https://user:hunter2@example.com/w.pth",
        "login password=hunter2 now",
        "--wandb-key abcdef123",
        {"auth": {"pass": "hunter2"}},
    ]
    text = json.dumps(scrub(leaky))
    for secret in ("X-Amz-Signature=abc", "def", "hunter2", "abcdef123"):
        assert secret not in text, secret
    assert "https://bucket.s3.amazonaws.com/w.pth?<redacted>" in text


def test_repo_ids_follow_the_hub_rules():
    from mimcli.publish import normalize_repo_id

    assert normalize_repo_id("hf-hub:alice/x") == "alice/x"
    assert normalize_repo_id(" alice/x ") == "alice/x"
    assert normalize_repo_id("tiny") == "tiny"
    for bad in ("alice/x..", "-x/y", "a/b/c", "alice/", "x" * 97, "alice/my model"):
        with pytest.raises(MimcliError, match="--repo"):
            normalize_repo_id(bad)


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
    with pytest.raises(MimcliError, match="--create-pr"):
        check_push_options("dev", True)
    check_push_options("main", True)
    check_push_options("dev", False)


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


def test_safetensors_bytes_are_reproducible_and_readable(tmp_path):
    from safetensors.torch import load_file as load

    from mimcli.publish import safetensors_bytes

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
        "import torch, sys; from mimcli.publish import safetensors_bytes; "
        "sys.stdout.buffer.write(safetensors_bytes({'w': torch.ones(2)}, "
        "{'format': 'pt', 'mimcli_version': '1', 'base_model': 'b', 'objective': 'nna'}))"
    )
    import subprocess
    import sys

    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True).stdout for _ in "ab"}
    assert len(runs) == 1


def test_card_names_other_objectives_and_their_settings():
    from mimcli.report.modelcard import _refine_summary

    run = {
        "config": {"objective": "mrmae", "batch_size": 8, "topk": 20},
        "resolved": {
            "objective": "mrmae",
            "blocks": [4],
            "steps": {"heads": 2, "refine": 3},
            "teachers": [{"source": "runs/nna/export", "arch": "vit_base_patch16_224"}],
            "decoder": {"source": "shipped with MODEL"},
            "mask_ratio": 0.75,
            "lr": 1e-3,
        },
    }
    lines = _refine_summary(run)
    text = "\n".join(lines)
    assert lines[0] == "- objective: **mrmae** (mimic before reconstruct, MR-MAE, arXiv 2303.05475)"
    assert "teachers runs/nna/export" in text and "decoder shipped with MODEL" in text
    assert "mask ratio 0.75" in text
    assert "neighbour queue" not in text and "ID heads" not in text
    nna = _refine_summary({"config": {}, "resolved": {"queue_size": 24, "blocks": [3, 4]}})
    assert "Nearest Neighbour Alignment" in nna[0] and "ID heads on blocks 3, 4" in nna[1]
    assert any("neighbour queue 24 entries" in line for line in nna)


def test_teachers_and_their_licenses_reach_the_card():
    from mimcli.publish import teacher_sources
    from mimcli.report.modelcard import CardInputs, render_card

    mimco = {"resolved": {"teacher": {"source": "vit_small_patch16_224.dino", "dim": 384}}}
    mrmae = {"resolved": {"teachers": [{"source": "a"}, {"source": "b"}]}}
    assert teacher_sources(mimco) == ["vit_small_patch16_224.dino"]
    assert teacher_sources(mrmae) == ["a", "b"] and teacher_sources({"resolved": {}}) == []
    card = render_card(
        CardInputs(
            repo_id="alice/x",
            arch="vit_base_patch16_224",
            stock_timm=True,
            run={"config": {"objective": "mimco"}, "resolved": mimco["resolved"]},
            base_spec="base",
            base_hub_id=None,
            license="apache-2.0",
            license_note="given",
            teachers=[("vit_small_patch16_224.dino", "apache-2.0"), ("local/t", None)],
        )
    )
    assert "`vit_small_patch16_224.dino` (license: apache-2.0)" in card
    assert "`local/t` (license: unknown)" in card and "MimCo objective" in card
