"""Every numeric option of probe, refine, eval and push is bounded at parse time: a bad value is
one usage line naming the option, exit 2, no traceback, before any work; boundary values pass
the parser (the command then fails on the missing model or data, not on the option)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mimcli.cli.app import app

runner = CliRunner()

BASE = {
    "probe": ["probe", "no-such-model.pth", "--train", "no-such-dir", "--val", "no-such-dir"],
    "eval": ["eval", "no-such-model.pth", "--train", "no-such-dir", "--val", "no-such-dir"],
    "refine": ["refine", "no-such-model.pth", "--data", "no-such-dir", "--out", "no-such-run"],
    "push": ["push", "no-such-run"],
}

BAD = [
    # probe
    ("probe", "--k", "0"),
    ("probe", "--k", "-3"),
    ("probe", "--tau", "0"),
    ("probe", "--tau", "-0.1"),
    ("probe", "--tau", "nan"),
    ("probe", "--tau", "inf"),
    ("probe", "--margin", "-1"),
    ("probe", "--margin", "101"),
    ("probe", "--max-heads", "0"),
    ("probe", "--min-heads", "0"),
    ("probe", "--max-heads", "100000"),
    ("probe", "--seed", "-1"),
    ("probe", "--seed", str(2**32)),
    ("probe", "--limit-train", "0"),
    ("probe", "--limit-val", "0"),
    ("probe", "--batch-size", "0"),
    ("probe", "--num-workers", "-1"),
    ("probe", "--num-workers", "many"),
    ("probe", "--num-workers", "²"),
    ("probe", "--num-heads", "0"),
    ("probe", "--num-heads", "5000"),
    ("probe", "--img-size", "4"),
    ("probe", "--img-size", "100000"),
    ("probe", "--crop-pct", "0"),
    ("probe", "--crop-pct", "1.5"),
    ("probe", "--crop-pct", "nan"),
    # eval
    ("eval", "--tau", "0"),
    ("eval", "--tau", "nan"),
    ("eval", "--linear-epochs", "0"),
    ("eval", "--linear-epochs", "1000000"),
    ("eval", "--limit-train", "0"),
    ("eval", "--limit-val", "-5"),
    ("eval", "--batch-size", "0"),
    ("eval", "--seed", "-1"),
    ("eval", "--num-heads", "0"),
    ("eval", "--num-workers", "x"),
    # refine: run lengths
    ("refine", "--epochs", "-1"),
    ("refine", "--epochs", "0"),
    ("refine", "--epochs", "inf"),
    ("refine", "--epochs", "nan"),
    ("refine", "--head-epochs", "-1"),
    ("refine", "--head-epochs", "0"),
    ("refine", "--steps", "-1"),
    ("refine", "--head-steps", "-1"),
    ("refine", "--limit", "0"),
    ("refine", "--batch-size", "1"),
    # refine: rates and weights
    ("refine", "--lr", "-1e-4"),
    ("refine", "--lr", "nan"),
    ("refine", "--head-lr", "-1"),
    ("refine", "--warmup", "-0.1"),
    ("refine", "--warmup", "1.5"),
    ("refine", "--head-warmup", "2"),
    ("refine", "--layer-decay", "0"),
    ("refine", "--layer-decay", "1.1"),
    ("refine", "--weight-decay", "-0.05"),
    ("refine", "--temperature", "0"),
    ("refine", "--temperature", "-0.2"),
    ("refine", "--temperature", "inf"),
    ("refine", "--mimic-weight", "inf"),
    ("refine", "--mask-ratio", "1"),
    ("refine", "--mask-ratio", "0"),
    ("refine", "--momentum", "1"),
    ("refine", "--image-weight", "-1"),
    ("refine", "--mimic-weight", "-1"),
    ("refine", "--ema", "1"),
    ("refine", "--ema", "-0.5"),
    ("refine", "--grad-clip", "0"),
    ("refine", "--grad-clip", "-1"),
    # refine: sizes and counts
    ("refine", "--local-crops", "-1"),
    ("refine", "--local-crops", "1000"),
    ("refine", "--topk", "0"),
    ("refine", "--head-width", "4"),
    ("refine", "--head-width", "wide"),
    ("refine", "--head-width", "10000000"),
    ("refine", "--queue-size", "0"),
    ("refine", "--queue-size", "99999999999"),
    ("refine", "--queue-size", "²"),
    ("refine", "--freeze-blocks", "-1"),
    ("refine", "--freeze-blocks", "5000"),
    ("refine", "--val-every", "-1"),
    ("refine", "--val-limit", "0"),
    ("refine", "--checkpoint-every", "0"),
    ("refine", "--log-every", "0"),
    ("refine", "--seed", "-1"),
    ("refine", "--processes", "0"),
    ("refine", "--device-memory", "0"),
    ("refine", "--device-memory", "inf"),
    ("refine", "--mfu", "0"),
    ("refine", "--mfu", "1.5"),
    ("refine", "--mfu", "nan"),
    ("refine", "--num-heads", "0"),
    ("refine", "--num-workers", "-2"),
    # push
    ("push", "--retries", "-1"),
    ("push", "--retries", "1000"),
    ("push", "--retry-wait", "-1"),
    ("push", "--retry-wait", "nan"),
]


def usage_lines(output: str, option: str) -> list[str]:
    """Lines naming ``option`` as wrong: click's usage error, or mimcli's own one-line error for
    options checked together before any work (the objective options, e.g. --temperature)."""
    return [
        line
        for line in output.splitlines()
        if f"Invalid value for '{option}'" in line or line.startswith(f"error: {option} ")
    ]


@pytest.mark.parametrize(("command", "option", "value"), BAD)
def test_a_bad_value_is_one_usage_line_and_exit_2(command, option, value):
    result = runner.invoke(app, [*BASE[command], option, value])
    assert result.exit_code == 2, result.output
    assert len(usage_lines(result.output, option)) == 1, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


GOOD = [
    ("probe", "--k", "1"),
    ("probe", "--tau", "1e-3"),
    ("probe", "--margin", "0"),
    ("probe", "--seed", str(2**32 - 1)),
    ("probe", "--crop-pct", "1"),
    ("probe", "--num-workers", "0"),
    ("probe", "--num-workers", "auto"),
    ("eval", "--linear-epochs", "1"),
    ("refine", "--epochs", "0.5"),
    ("refine", "--steps", "0"),
    ("refine", "--head-steps", "0"),
    ("refine", "--lr", "0"),
    ("refine", "--warmup", "1"),
    ("refine", "--ema", "0"),
    ("refine", "--mask-ratio", "0.99"),
    ("refine", "--momentum", "0"),
    ("refine", "--local-crops", "0"),
    ("refine", "--queue-size", "auto"),
    ("refine", "--queue-size", "16"),
    ("refine", "--head-width", "auto"),
    ("refine", "--head-width", "paper"),
    ("refine", "--head-width", "8"),
    ("refine", "--val-every", "0"),
    ("push", "--retries", "0"),
    ("push", "--retry-wait", "0"),
]


@pytest.mark.parametrize(("command", "option", "value"), GOOD)
def test_a_boundary_value_passes_the_parser(command, option, value):
    result = runner.invoke(app, [*BASE[command], option, value])
    assert "Invalid value" not in result.output, result.output
    assert "Traceback" not in result.output
    # the command then stops on the missing model, data or run folder, in one error line
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert option not in errors[0]


@pytest.mark.parametrize(
    ("k", "message"),
    [("0", "1..100000"), ("10,-1", "expected 1 to 16"), ("10,200000", "1..100000"),
     ("²", "expected 1 to 16"), (",".join(["5"] * 17), "expected 1 to 16")],
)  # fmt: skip
def test_eval_k_lists_are_checked_before_any_work(k, message):
    result = runner.invoke(app, [*BASE["eval"], "--k", k])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--k" in errors[0] and message in errors[0], result.output


def test_probe_k_beyond_the_train_set_says_so_on_stderr(tiny_model_dir, image_folders):
    """Refusing would break probing small sets with the default k; like timm/faiss users expect,
    the vote uses every train image, and a warning line says so."""
    train, val = image_folders
    args = ["probe", str(tiny_model_dir), "--train", str(train), "--val", str(val)]
    result = runner.invoke(app, [*args, "--k", "1000", "--num-workers", "0", "--blocks", "4"])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if line.startswith("warning: --k")]
    assert warned == [
        "warning: --k 1000 is more than the 30 --train images; each vote uses all 30 of them"
    ]
