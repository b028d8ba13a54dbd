"""Options across objectives: bad values are one line (exit 2) before any work, options an
objective does not read are named in a warning, and --resume refuses changed options."""

import pytest

from tests.objective_harness import metric_steps, refine_cli, run_interrupted, tiny_run_args

SHIPPED = "examples/models/fmnist-mae-tiny"


@pytest.mark.parametrize(
    ("objective", "flags", "message"),
    [
        ("nna", ["--temperature", "0"], "--temperature must be positive, got 0.0"),
        ("conmim", ["--temperature", "-0.1"], "--temperature must be positive"),
        ("nnclr", ["--momentum", "2"], "--momentum must lie in [0, 1), got 2.0"),
        ("mimco", ["--mask-ratio", "1.5"], "--mask-ratio must lie strictly between 0 and 1"),
        ("mrmae", ["--mimic-weight", "-1"], "--mimic-weight must be 0 or more"),
        ("mimco", ["--image-weight", "-1"], "--image-weight must be 0 or more"),
    ],
)
def test_bad_values_are_one_line(objective, flags, message, tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    result = refine_cli(
        [str(tiny_model_dir), "--objective", objective, *tiny_run_args(data_dir), *flags,
         "--out", str(out)]
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (out / "config.json").exists()


def test_unused_options_are_named(tiny_model_dir, data_dir, teacher_dir, tmp_path):
    result = refine_cli(
        [str(tiny_model_dir), *tiny_run_args(data_dir), "--steps", "1", "--head-steps", "1",
         "--momentum", "0.9", "--mask-ratio", "0.5", "--teacher", str(teacher_dir),
         "--out", str(tmp_path / "nna")]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for flag in ("--momentum", "--mask-ratio", "--teacher"):
        assert f"warning: {flag} is not used by --objective nna; ignored" in result.stderr
    assert "--temperature" not in result.stderr


def test_resume_refuses_changed_options(tiny_model_dir, data_dir, teacher_dir, tmp_path):
    args = [str(tiny_model_dir), "--objective", "mimco", "--teacher", str(teacher_dir),
            *tiny_run_args(data_dir), "--out", str(tmp_path / "run")]  # fmt: skip
    assert refine_cli(args).exit_code == 0
    result = refine_cli([*args, "--resume", "--mask-ratio", "0.5"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--mask-ratio 0.6 -> 0.5" in result.output and "config.json" in result.output


def test_whole_encoder_objectives_record_no_blocks(tiny_model_dir, data_dir, tmp_path):
    import json

    result = refine_cli(
        [str(tiny_model_dir), "--objective", "conmim", *tiny_run_args(data_dir), "--json",
         "--out", str(tmp_path / "run")]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["blocks"] == [] and summary["objective"] == "conmim"
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert resolved["blocks"] is None and "trains the whole encoder" in resolved["blocks_reason"]


def test_decoder_may_be_a_folder(data_dir, tmp_path):
    from mimcli.models.mae_decoder import read_decoder_file

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    state, meta = read_decoder_file(root / SHIPPED)
    assert "decoder_pred.weight" in state and meta["decoder_num_heads"] == "4"
    result = refine_cli(
        [str(root / SHIPPED), "--objective", "mrmae", "--decoder", str(tmp_path / "nowhere"),
         "--teacher", str(root / SHIPPED), *tiny_run_args(data_dir), "--out", str(tmp_path / "r")]
    )  # fmt: skip
    assert (
        result.exit_code == 2 and "--decoder" in result.output and "no such file" in result.output
    )


def test_bare_resume_takes_the_runs_options(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """--resume with only MODEL, --data and --out continues with the options in config.json."""
    out = tmp_path / "run"
    args = [str(tiny_model_dir), "--objective", "conmim", *tiny_run_args(data_dir),
            "--mask-ratio", "0.3", "--lr", "1e-3", "--out", str(out)]  # fmt: skip
    run_interrupted(args, monkeypatch, stop_after=("refine", 1))
    bare = refine_cli([str(tiny_model_dir), "--data", str(data_dir), "--out", str(out), "--resume"])
    assert bare.exit_code == 0, bare.output
    assert "warning" not in bare.stderr and "mask ratio 0.3" in bare.stderr
    assert metric_steps(out) == list(range(5))


@pytest.mark.parametrize("objective", ["mimco", "conmim"])
def test_grad_checkpointing_through_a_frozen_encoder(
    objective, tiny_model_dir, data_dir, teacher_dir, tmp_path
):
    """The head warm-up runs the blocks out of autograd: checkpointing must not recompute them
    there (it would record different tensors in backward)."""
    flags = ["--teacher", str(teacher_dir)] if objective == "mimco" else []
    result = refine_cli(
        [str(tiny_model_dir), "--objective", objective, *tiny_run_args(data_dir), *flags,
         "--grad-checkpointing", "--steps", "1", "--out", str(tmp_path / "run")]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
