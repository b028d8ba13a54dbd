"""The Python API (``mimcli.api``): the same numbers and files as the commands, lazy imports,
one clear error for an option a command does not have."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mimcli.cli.app import app
from mimcli.errors import MimcliError
from tests.objective_harness import tiny_run_args

runner = CliRunner()


def test_importing_the_api_loads_no_torch():
    code = "import sys, mimcli.api; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_probe_and_evaluate_give_the_commands_numbers(tiny_model_dir, image_folders, tmp_path):
    from mimcli.api import evaluate, probe

    train, val = image_folders
    seen = []
    result = probe(
        str(tiny_model_dir), train, val, k=5, num_workers=0,
        progress=lambda stage, done, total: seen.append((stage, done, total)),
    )  # fmt: skip
    cli = runner.invoke(app, ["probe", str(tiny_model_dir), "--train", str(train), "--val",
                              str(val), "--k", "5", "--num-workers", "0", "--json"])  # fmt: skip
    assert cli.exit_code == 0, cli.output
    want = json.loads(cli.stdout)
    assert [b.cls for b in result.blocks] == [b["cls"] for b in want["blocks"]]
    assert result.recommendation.blocks == want["recommendation"]["blocks"]
    assert seen[-1] == ("val", len(list(val.rglob("*.png"))), 12)
    got = evaluate(tiny_model_dir, str(train), str(val), protocols=["knn"], ks=[5],
                   num_workers=0, cache=False, progress=True)  # fmt: skip
    cli = runner.invoke(app, ["eval", str(tiny_model_dir), "--train", str(train), "--val",
                              str(val), "--protocols", "knn", "--k", "5", "--num-workers", "0",
                              "--no-cache", "--out", str(tmp_path / "e")])  # fmt: skip
    assert cli.exit_code == 0, cli.output
    saved = json.loads((tmp_path / "e" / "results.json").read_text())
    assert got.models[0].knn == saved["models"][0]["knn"]
    with pytest.raises(MimcliError, match="probe\\(\\) has no option limit_trian; it takes"):
        probe(str(tiny_model_dir), train, val, limit_trian=5)


def test_refine_and_push_write_what_the_commands_write(tiny_model_dir, data_dir, tmp_path):
    from mimcli.api import push, refine

    cli = runner.invoke(app, ["refine", str(tiny_model_dir), *tiny_run_args(data_dir),
                              "--blocks", "last2", "--out", str(tmp_path / "cli")])  # fmt: skip
    assert cli.exit_code == 0, cli.output
    result = refine(
        str(tiny_model_dir), data_dir, tmp_path / "api", head_steps=2, steps=3, batch_size=8,
        head_width="32", num_workers=0, checkpoint_every=1, blocks="last2", progress=True,
    )  # fmt: skip
    assert result.out == tmp_path / "api" and result.steps == {"heads": 2, "refine": 3}
    a = load_file(tmp_path / "cli" / "export" / "model.safetensors")
    b = load_file(result.export_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    warned = []
    outcome = push(result.out, dry_run=True, to=tmp_path / "repo", license="apache-2.0",
                   on_warning=warned.append)  # fmt: skip
    assert outcome.upload is None and (tmp_path / "repo" / "model.safetensors").is_file()
    pushed = load_file(tmp_path / "repo" / "model.safetensors")
    assert all(torch.equal(pushed[k], b[k]) for k in b)
