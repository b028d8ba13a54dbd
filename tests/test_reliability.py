"""What a refine run promises when things go wrong: killed at any moment (SIGKILL, also while a
checkpoint is being renamed in) it resumes to the same result; a disk that fills up or a file
size limit stops it with one line and the last checkpoint intact; a damaged checkpoint falls back
to the one before; Ctrl-C and SIGTERM save before stopping; files get the usual modes."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mimcli.refine.loop import Refiner
from tests.conftest import write_image_folder
from tests.reliability import launch, make_inputs, records, same_run, soak, soak_args


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("reliability"))


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """The uninterrupted soak run (a subprocess with the soak's thread count)."""
    out = tmp_path_factory.mktemp("reference") / "full"
    proc = launch(soak_args(*inputs), out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


def wait_for(predicate, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def last_step(run: Path) -> int:
    return max((r["step"] for r in records(run)), default=-1)


def usual_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def test_kill_soak_fast(inputs, tmp_path, reference):
    """3 SIGKILLs at seeded random moments (the second while a checkpoint waits to be renamed),
    a resume after each: the same export and metrics as the uninterrupted run."""
    out = tmp_path / "soak"
    done = soak(soak_args(*inputs), out, kills=3, seed=0, total_steps=32, pause_every=2)
    assert done.kills == 3 and done.paused_kills == 1, done
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".partial"))]
    same_run(reference, out)


def test_stops_faults_and_damage_then_the_same_result(inputs, tmp_path, reference):
    """One run through what goes wrong on a cluster, then finished: the same result.

    SIGTERM mid-run saves and exits 143; a resume under a file-size limit (disk full) stops with
    one line, the checkpoint intact and no temporary file left; a truncated checkpoint falls
    back to the one before (saying so); Ctrl-C saves and exits 130; the last resume finishes."""
    # no timed checkpoints: the records equal the reference's, which has them
    args = soak_args(*inputs, **{"--checkpoint-minutes": "0"})
    out = tmp_path / "run"
    ckpt, prev = out / "checkpoint.safetensors", out / "checkpoint.prev.safetensors"
    # SIGTERM once a few logging windows are written
    proc = launch(args, out)
    wait_for(lambda: last_step(out) >= 4, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("SIGTERM: stopped after") and "--resume" in line, err
    assert ckpt.is_file() and prev.is_file()
    # the file-size limit: the next checkpoint cannot be written
    size, before = ckpt.stat().st_size, ckpt.read_bytes()
    limit = size // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.Popen(
        [sys.executable, "-m", "mimcli.cli.app", "refine", *args, "--out", str(out), "--resume"],
        env=dict(os.environ, MIMCLI_THREADS="1"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=small_files,
    )  # fmt: skip
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len([x for x in lines if "error:" in x]) == 1, err
    assert "cannot write the checkpoint" in lines[-1] and "EFBIG" in lines[-1], err
    assert "--resume" in lines[-1], err
    assert ckpt.read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # a truncated checkpoint: resume from the one before, then Ctrl-C
    with open(ckpt, "r+b") as fh:
        fh.truncate(size // 3)
    proc = launch([*args, "--resume"], out)
    start = last_step(out)
    wait_for(lambda: last_step(out) > start, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "resuming from the checkpoint before it" in err, err
    assert err.strip().splitlines()[-1].startswith("Ctrl-C (SIGINT): stopped after"), err
    # the rest
    proc = launch([*args, "--resume"], out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    same_run(reference, out)
    mode = usual_mode()
    for path in (out / "export" / "model.safetensors", ckpt, prev, out / "metrics.jsonl"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_a_metrics_record_that_cannot_be_written_leaves_whole_records(tmp_path):
    """Appending to metrics.jsonl past the file-size limit: one MimcliError line, the file cut
    back to its whole records (in a subprocess: the limit and SIGXFSZ stay there)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    code = f"""
import resource, signal
from mimcli.errors import MimcliError
from mimcli.runs import RunFolder
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (40, 40))
try:
    RunFolder({str(run)!r}).log({{"step": 1, "loss": 0.5, "note": "x" * 64}})
except MimcliError as exc:
    print(exc)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("cannot write a record to") and "EFBIG" in done.stdout
    assert (run / "metrics.jsonl").read_text() == '{"step": 0, "loss": 1.0}\n'


def test_stopped_before_the_first_checkpoint_says_start_again(tmp_path):
    from mimcli.refine.config import RefineConfig
    from mimcli.refine.pipeline import stopped_line

    cfg = RefineConfig(model="m", data=tmp_path, out=tmp_path / "run")
    assert "start the run again (without --resume)" in stopped_line(cfg, "SIGTERM")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.safetensors").write_bytes(b"x")
    assert stopped_line(cfg, "SIGTERM").endswith("--resume")


def test_no_keep_previous_keeps_one_checkpoint_and_says_so_when_it_is_damaged(
    tiny_model_dir, data_dir, tmp_path
):
    from mimcli.errors import MimcliError
    from tests.objective_harness import tiny_cfg

    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_model_dir, data_dir, out, "nna", blocks="last1", head_steps=1, steps=2,
                   keep_previous=False)  # fmt: skip
    Refiner(cfg).run_all()
    assert (out / "checkpoint.safetensors").is_file()
    assert not (out / "checkpoint.prev.safetensors").exists()
    with open(out / "checkpoint.safetensors", "r+b") as fh:
        fh.truncate(100)
    from dataclasses import replace

    with pytest.raises(MimcliError, match="no earlier checkpoint is kept"):
        Refiner(replace(cfg, resume=True)).run_all()


def test_a_run_whose_folder_is_taken_over_stops_with_one_line(
    tiny_model_dir, data_dir, tmp_path, monkeypatch
):
    """``--force-unlock`` by another run: the running one notices at its lock's next renewal
    and stops at the end of that step, writing nothing more."""
    from mimcli import runlock
    from mimcli.errors import MimcliError
    from tests.objective_harness import tiny_cfg

    monkeypatch.setenv("MIMCLI_LOCK_LEASE_S", "1")  # renewed every 0.25 s
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_model_dir, data_dir, out, "nna", blocks="last1", head_steps=1,
                   steps=300, checkpoint_every=1000, checkpoint_minutes=0)  # fmt: skip
    taken: list = []

    def progress(stage, done, total, figures):
        if stage == "refine" and done == 2 and not taken:
            taken.append(runlock.acquire(out, "eval", force=True))
            time.sleep(0.6)

    with pytest.raises(MimcliError, match="was taken over by eval") as caught:
        Refiner(cfg, progress).run_all()
    assert "\n" not in str(caught.value)
    assert max(r["step"] for r in records(out)) < 150  # of 301: it stopped early
    assert json.loads((out / ".mimcli.lock").read_text())["token"] == taken[0].token
    taken[0].release()
    assert not (out / ".mimcli.lock").exists()


@pytest.mark.parametrize(
    ("command", "target"),
    [("probe", "mimcli.probe.run_probe"), ("eval", "mimcli.evaluate.runner.run_eval")],
)
def test_ctrl_c_in_probe_and_eval_says_interrupted_only(
    command, target, tiny_model_dir, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from mimcli.cli.app import app

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, stop)
    folder = write_image_folder(tmp_path / "images", per_class=2, classes=2, seed=0)
    args = [command, str(tiny_model_dir), "--train", str(folder), "--val", str(folder)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 130, result.output
    assert result.stderr.strip() == "interrupted"


def test_a_run_started_again_drops_the_stopped_attempts_records(tiny_model_dir, data_dir, tmp_path):
    """An attempt stopped before its first checkpoint left records; starting again (as the
    stop message says) logs each step once."""
    from tests.objective_harness import tiny_cfg

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"stage": "heads", "step": 0, "loss": 9.0}\n')
    (out / ".metrics.jsonl.abc123.tmp").write_text("half")  # what a kill leaves
    cfg = tiny_cfg(tiny_model_dir, data_dir, out, "nna", blocks="last1", head_steps=1, steps=2)
    Refiner(cfg).run_all()
    assert [r["step"] for r in records(out)] == [0, 1, 2]
    assert records(out)[0]["loss"] != 9.0
    assert not (out / ".metrics.jsonl.abc123.tmp").exists()


def test_a_checkpoint_with_damaged_data_is_refused_and_the_one_before_is_used(tmp_path):
    """A flipped bit inside the tensor data (the header still reads) fails the checkpoint's
    CRC-32: one line, and the run folder falls back to the checkpoint kept before it."""
    import torch

    from mimcli.errors import MimcliError
    from mimcli.runs import RunFolder, load_checkpoint, save_checkpoint

    run = RunFolder(tmp_path)
    for done in (1, 2):
        state = {"stage": "refine", "done": done, "w": torch.full((64,), float(done))}
        save_checkpoint(run.checkpoint_path, state, previous=run.prev_checkpoint_path)
    data = bytearray(run.checkpoint_path.read_bytes())
    data[-7] ^= 0x10  # inside the last tensor's bytes
    run.checkpoint_path.write_bytes(bytes(data))
    with pytest.raises(MimcliError, match="does not match the checksum") as caught:
        load_checkpoint(run.checkpoint_path)
    assert "\n" not in str(caught.value)
    with pytest.warns(UserWarning, match="resuming from the checkpoint before it"):
        state = run.load_checkpoint()
    assert state["done"] == 1 and torch.equal(state["w"], torch.full((64,), 1.0))
