import json

import pytest
import torch
from typer.testing import CliRunner

from mimcli.cli.app import app

runner = CliRunner()


def test_help_shows_examples():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "probe" in result.output
    result = runner.invoke(app, ["probe", "--help"])
    assert result.exit_code == 0
    assert "Examples" in result.output and "vit_large_patch16_224.mae" in result.output
    assert runner.invoke(app, ["--version"]).output.startswith("mimcli ")


def test_probe_end_to_end_json(tiny_model_dir, image_folders, tmp_path):
    train, val = image_folders
    out = tmp_path / "probe"
    result = runner.invoke(
        app,
        [
            "probe",
            str(tiny_model_dir),
            "--train",
            str(train),
            "--val",
            str(val),
            "--k",
            "5",
            "--num-workers",
            "0",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [b["block"] for b in data["blocks"]] == [1, 2, 3, 4]
    assert all(0 <= b["cls"] <= 100 for b in data["blocks"])
    assert data["recommendation"]["blocks"][-1] == 4
    assert json.loads((out / "probe.json").read_text())["blocks"] == data["blocks"]


def test_probe_table_output(tiny_model_dir, image_folders):
    train, val = image_folders
    result = runner.invoke(
        app,
        [
            "probe",
            str(tiny_model_dir),
            "--train",
            str(train),
            "--val",
            str(val),
            "--num-workers",
            "0",
            "--blocks",
            "2-4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Recommended ID-head blocks" in result.stdout
    assert "4+norm" in result.stdout


def one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output + result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "model,expect",
    [
        ("vit_large_patch16_224.maee", "did you mean vit_large_patch16_224.mae"),
        ("not_a_model_at_all", "unknown model"),
        ("./missing/weights.pth", "no such file or folder"),
    ],
)
def test_bad_model_arguments(model, expect, image_folders):
    train, val = image_folders
    result = runner.invoke(app, ["probe", model, "--train", str(train), "--val", str(val)])
    assert expect in one_line_error(result)


def test_bad_folders_and_options(tiny_model_dir, image_folders, tmp_path):
    train, val = image_folders
    result = runner.invoke(
        app, ["probe", str(tiny_model_dir), "--train", str(tmp_path / "x"), "--val", str(val)]
    )
    assert "--train" in one_line_error(result)
    result = runner.invoke(
        app,
        ["probe", str(tiny_model_dir), "--train", str(train), "--val", str(val), "--blocks", "3-9"],
    )
    assert "out of range" in one_line_error(result)
    result = runner.invoke(
        app,
        [
            "probe",
            str(tiny_model_dir),
            "--train",
            str(train),
            "--val",
            str(val),
            "--device",
            "cuda" if not torch.cuda.is_available() else "tpu",
        ],
    )
    one_line_error(result)
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["probe", str(bad), "--train", str(train), "--val", str(val), "--out", str(out)]
    )
    assert "unsupported checkpoint" in one_line_error(result)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("blocks", ["4-2", ",", "1,x", "0"])
def test_bad_block_lists(blocks, tiny_model_dir, image_folders):
    train, val = image_folders
    result = runner.invoke(
        app,
        [
            "probe",
            str(tiny_model_dir),
            "--train",
            str(train),
            "--val",
            str(val),
            "--blocks",
            blocks,
        ],
    )
    assert "--blocks" in one_line_error(result)


def test_error_text_is_not_read_as_markup(tiny_model_dir, image_folders, tmp_path):
    train, _ = image_folders
    odd = tmp_path / "x[/]y[bold]"
    result = runner.invoke(
        app, ["probe", str(tiny_model_dir), "--train", str(train), "--val", str(odd)]
    )
    assert "x[/]y[bold]" in one_line_error(result)


def test_model_without_class_token(tmp_path, image_folders):
    import timm
    from timm.models import save_for_hf

    model = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        class_token=False,
        global_pool="avg",
    )
    save_for_hf(
        model,
        str(tmp_path / "nocls"),
        safe_serialization=True,
        model_args=dict(
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            class_token=False,
            global_pool="avg",
        ),
    )
    train, val = image_folders
    result = runner.invoke(
        app, ["probe", str(tmp_path / "nocls"), "--train", str(train), "--val", str(val)]
    )
    assert "no class token" in one_line_error(result)


def test_transform_overrides(tiny_model_dir, image_folders):
    train, val = image_folders
    args = [
        "probe",
        str(tiny_model_dir),
        "--train",
        str(train),
        "--val",
        str(val),
        "--num-workers",
        "0",
        "--json",
    ]
    result = runner.invoke(
        app,
        [
            *args,
            "--img-size",
            "48",
            "--crop-pct",
            "0.9",
            "--mean",
            "0.5",
            "--std",
            "0.25,0.25,0.25",
            "--interpolation",
            "bicubic",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["blocks"]) == 4
    from PIL import Image

    from mimcli.cli._common import transform_overrides
    from mimcli.data import eval_transform

    overrides = transform_overrides(48, 1.0, "0.5", "0.25", None)
    transform = eval_transform({"input_size": (3, 32, 32), "mean": (0, 0, 0)}, **overrides)
    x = transform(Image.new("RGB", (64, 64), (255, 0, 128)))
    assert x.shape == (3, 48, 48)
    assert x[0, 0, 0].item() == pytest.approx((1.0 - 0.5) / 0.25)
    assert "multiple of the patch size" in one_line_error(
        runner.invoke(app, [*args, "--img-size", "36"])
    )
    assert "--mean" in one_line_error(runner.invoke(app, [*args, "--mean", "a,b,c"]))


def test_library_does_not_import_typer():
    import subprocess
    import sys

    code = (
        "import sys, mimcli.refine, mimcli.evaluate, mimcli.probe, mimcli.models.sources; "
        "print('typer' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# Runs the app as the installed `mimcli` script does, then names the heavy modules it imported.
RUN_APP = """
import sys
from mimcli.cli.app import app
try:
    app(prog_name="mimcli")
finally:
    print(sorted(m for m in ("torch", "timm") if m in sys.modules), file=sys.stderr)
"""


def run_app(*args, **env):
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", RUN_APP, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


def test_version_and_shell_completion_start_without_torch():
    version = run_app("--version")
    assert version.returncode == 0 and version.stdout.startswith("mimcli ")
    assert version.stderr.strip() == "[]"
    # typer names the shell itself when detection is off (else it detects the running shell)
    script = run_app("--show-completion", "bash", _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    assert script.returncode == 0, script.stderr
    assert "_MIMCLI_COMPLETE=complete_bash" in script.stdout
    assert "complete -o default -F _mimcli_completion mimcli" in script.stdout
    assert script.stderr.strip() == "[]"
    zsh = run_app("--show-completion", "zsh", _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    assert zsh.returncode == 0 and "#compdef mimcli" in zsh.stdout
    # what the installed script asks on <TAB>: sub-commands, then a command's options
    words = run_app(_MIMCLI_COMPLETE="complete_bash", COMP_WORDS="mimcli ev", COMP_CWORD="1")
    assert (words.returncode, words.stdout.split()) == (0, ["eval"])
    options = run_app(
        _MIMCLI_COMPLETE="complete_bash", COMP_WORDS="mimcli eval --split", COMP_CWORD="2"
    )
    assert options.stdout.split() == ["--split-file"] and options.stderr.strip() == "[]"


def raw_checkpoint(path, embed_dim=128, num_heads=4):
    """An MAE-style .pth of a ViT whose width (128) is no released width: no head count."""
    from tests.conftest import make_tiny_vit

    model = make_tiny_vit(3, embed_dim=embed_dim, num_heads=num_heads, depth=2)
    torch.save({"model": {k: v.clone() for k, v in model.state_dict().items()}}, path)
    return path


def test_probe_asks_for_the_head_count_and_notes_where_it_came_from(image_folders, tmp_path):
    train, val = image_folders
    ckpt = raw_checkpoint(tmp_path / "w128.pth")
    base = ["--train", str(train), "--val", str(val), "--num-workers", "0"]
    line = one_line_error(runner.invoke(app, ["probe", str(ckpt), *base]))
    assert "width 128 is not a released ViT width" in line
    assert "--num-heads N" in line and "#heads=N" in line
    line = one_line_error(runner.invoke(app, ["probe", f"{ckpt}#heads=3", *base]))
    assert "not divisible by 3 attention heads" in line
    for args in ([str(ckpt), "--num-heads", "4"], [f"{ckpt}#heads=4"]):
        result = runner.invoke(app, ["probe", *args, *base, "--json"])
        assert result.exit_code == 0, result.output
        notes = [x for x in result.stderr.splitlines() if x.startswith("note:")]
        assert len(notes) == 1, result.stderr
        assert "mae read as vit_base_patch16_224 (width 128, 2 blocks, patch 8)" in notes[0]
        assert "4 attention heads (from " in notes[0]
        assert json.loads(result.stdout)["num_blocks"] == 2


def test_eval_num_heads_applies_to_models_without_their_own_count(
    tiny_model_dir, image_folders, tmp_path
):
    train, val = image_folders
    ckpt = raw_checkpoint(tmp_path / "w128.pth")
    base = ["--train", str(train), "--val", str(val), "--num-workers", "0", "--protocols", "knn"]
    # the suffix for the checkpoint; --num-heads 2 agrees with the folder's recorded count
    models = [f"{ckpt}#heads=4", str(tiny_model_dir)]
    result = runner.invoke(app, ["eval", *models, "--num-heads", "2", *base, "--json"])
    assert result.exit_code == 0, result.output
    notes = [x for x in result.stderr.splitlines() if x.startswith("note:")]
    assert len(notes) == 2, result.stderr
    assert "4 attention heads (from #heads=4)" in notes[0]
    assert "2 attention heads (from config.json)" in notes[1]
    sources = [m["source"] for m in json.loads(result.stdout)["models"]]
    assert sources == models
    # a count the folder's config.json contradicts is refused, naming the way out (after the
    # first model's work: eval loads one model at a time)
    result = runner.invoke(app, ["eval", *models, "--num-heads", "4", *base])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert (
        line.startswith("error:")
        and "gives 2 attention heads, not 4; leave out --num-heads 4" in line
    )


def test_training_progress_estimates_each_stage_once(capsys):
    """After a stage's first 3 steps: its estimated wall time, once; hours name what cuts
    them; the ETA column keeps an hour of steps (a slow step does not blank it)."""
    from mimcli.cli._common import ImageProgress

    bar = ImageProgress(show_loss=True)
    assert bar.progress.speed_estimate_period == 3600
    with bar.running():
        bar("heads", 0, 10, {"loss": 1.0, "img/s": 5.0})
        bar.started["heads"] -= 30  # the first steps took 30 s
        for done in (1, 2, 3, 4):
            bar("heads", done, 10, {"loss": 1.0, "img/s": 5.0})
        bar("refine", 0, 3000, {"loss": 1.0, "img/s": 5.0})
        bar.started["refine"] -= 30
        bar("refine", 3, 3000, {"loss": 1.0, "img/s": 5.0})
    err = capsys.readouterr().err
    assert err.count("heads: about") == 1 and "heads: about 2 min for 10 steps" in err
    assert "refine: about 8.3 h for 3000 steps" in err and "fewer --local-crops" in err
