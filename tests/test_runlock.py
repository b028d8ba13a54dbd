"""One run per folder (mimcli.runlock): a live holder is refused in one line naming it, a killed
one's lock is taken over, another host's lock after its lease, --force-unlock at once (the old
holder sees ``lost``); two real ``mimcli refine`` processes on one --out."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mimcli import runlock
from mimcli.errors import MimcliError
from mimcli.refine.setup import with_saved_options
from tests.objective_harness import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]

# a process that holds RUN's lock: prints its state, then "lost: LINE" once it lost the lock
HOLDER = """
import sys, time
from mimcli import runlock
lock = runlock.acquire(sys.argv[1], "refine")
print("held", "torch" in sys.modules, flush=True)
while not lock.lost:
    time.sleep(0.02)
print("lost:", time.time(), lock.lost_line(), flush=True)
"""


def holder(run: Path, lease: float = 30.0) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MIMCLI_LOCK_LEASE_S=str(lease))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held False\n"  # torch-free
    return proc


def lock_file(run: Path) -> dict:
    return json.loads((run / runlock.LOCK_FILE).read_text())


def write_lock(run: Path, **fields) -> None:
    run.mkdir(parents=True, exist_ok=True)
    now = time.time()
    record = dict(pid=1, host="elsewhere", command="refine", started=now, heartbeat=now)
    (run / runlock.LOCK_FILE).write_text(json.dumps({**record, "token": "theirs", **fields}))


def test_second_acquire_is_refused_then_release_frees_the_folder(tmp_path):
    run = tmp_path / "run"
    with runlock.acquire(run, "refine") as lock:
        held = lock_file(run)
        assert (held["pid"], held["host"], held["command"]) == (
            os.getpid(), socket.gethostname(), "refine",
        )  # fmt: skip
        with pytest.raises(MimcliError) as err:
            runlock.acquire(run, "push")
        line = str(err.value)
        assert "\n" not in line and line.startswith(f"{run} is in use by refine (pid ")
        assert f"pid {os.getpid()} on host {socket.gethostname()}, started " in line
        assert line.endswith("if that run is gone pass --force-unlock")
    assert not (run / runlock.LOCK_FILE).exists() and not run.exists()  # made here, empty
    lock.release()  # idempotent
    assert runlock.acquire(run, "refine").release() is None


def test_killed_holder_is_taken_over(tmp_path):
    run = tmp_path / "run"
    proc = holder(run)
    pid = lock_file(run)["pid"]
    with pytest.raises(MimcliError, match=f"in use by refine \\(pid {pid} "):
        runlock.acquire(run, "refine")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    with pytest.warns(
        UserWarning, match=f"stale lock: taking over the lock of refine \\(pid {pid}"
    ):
        lock = runlock.acquire(run, "refine")
    assert lock_file(run)["token"] == lock.token and not lock.lost
    lock.release()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="no /proc")
def test_a_reused_pid_is_not_the_holder(tmp_path):
    run = tmp_path / "run"
    write_lock(run, host=socket.gethostname(), pid=os.getppid(), pid_start="1")  # alive, reused
    with pytest.warns(UserWarning, match="stale lock"):
        runlock.acquire(run, "refine").release()
    write_lock(run, host=socket.gethostname(), pid=os.getppid(), pid_start=None)
    with pytest.raises(MimcliError, match=f"pid {os.getppid()} on host"):
        runlock.acquire(run, "refine")


def test_another_hosts_lock_expires_with_its_heartbeat(tmp_path):
    run = tmp_path / "run"
    write_lock(run, heartbeat=time.time() - 0.2)
    with pytest.raises(MimcliError, match="host elsewhere, .*last heartbeat 0 s ago"):
        runlock.acquire(run, "refine", lease_s=2)
    write_lock(run, heartbeat=time.time() - 3)
    with pytest.warns(UserWarning, match="stale lock: .* on host elsewhere, .*heartbeat 3 s ago"):
        lock = runlock.acquire(run, "refine", lease_s=2)
    assert lock_file(run)["host"] == socket.gethostname()
    lock.release()


def test_an_unreadable_lock_counts_as_held_for_one_lease(tmp_path):
    run = tmp_path / "run"
    write_lock(run)
    (run / runlock.LOCK_FILE).write_text("{")
    with pytest.raises(MimcliError, match="in use by an unknown run .* is unreadable"):
        runlock.acquire(run, "refine", lease_s=2)
    old = time.time() - 3
    os.utime(run / runlock.LOCK_FILE, (old, old))
    with pytest.warns(UserWarning, match="stale lock"):
        runlock.acquire(run, "refine", lease_s=2).release()


def test_force_unlock_takes_over_and_the_holder_sees_it_lost(tmp_path):
    run = tmp_path / "run"
    proc = holder(run, lease=1.0)  # renews every 0.25 s
    with pytest.warns(UserWarning, match="--force-unlock: taking over the lock of refine"):
        lock = runlock.acquire(run, "push", force=True, lease_s=1.0)
    assert proc.wait(timeout=10) == 0 and proc.stdout is not None
    _, seen, lost = proc.stdout.read().split(" ", 2)
    assert float(seen) - lock_file(run)["heartbeat"] < 0.25 + 0.25  # one renewal, and slack
    assert lost.startswith(f"{run} was taken over by push (pid {os.getpid()} on host ")
    assert lost.rstrip().endswith("stopping (continue from its last checkpoint with --resume)")
    assert lock_file(run)["token"] == lock.token and not lock.lost
    lock.release()


def test_release_removes_only_its_own_lock(tmp_path):
    run = tmp_path / "run"
    first = runlock.acquire(run, "refine", lease_s=1.0)
    with pytest.warns(UserWarning, match="--force-unlock"):
        second = runlock.acquire(run, "refine", force=True, lease_s=1.0)
    first.release()
    assert lock_file(run)["token"] == second.token
    assert first.lost is False and first.renew() is False  # released: renews nothing
    second.release()
    assert not (run / runlock.LOCK_FILE).exists()
    runlock.hold_for_ranks(run, "refine").release()  # one process: acquire itself


def test_the_heartbeat_is_renewed(tmp_path):
    run = tmp_path / "run"
    with runlock.acquire(run, "refine", lease_s=0.4):
        first = lock_file(run)["heartbeat"]
        time.sleep(0.35)
        assert lock_file(run)["heartbeat"] > first


def test_force_unlock_is_not_carried_into_a_resume(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    saved = {"config": {"force_unlock": True, "topk": 3}}
    (out / "config.json").write_text(json.dumps(saved))
    cfg = tiny_cfg(tiny_model_dir, data_dir, out, "nna", resume=True)
    cfg = with_saved_options(cfg, given={"model", "data", "out", "resume"})
    assert cfg.topk == 3 and cfg.force_unlock is False


def test_refiner_refuses_a_held_folder_and_releases_on_error(tiny_model_dir, data_dir, tmp_path):
    from mimcli.refine.loop import Refiner

    out = tmp_path / "run"
    write_lock(out, command="push")
    with pytest.raises(MimcliError, match="in use by push \\(pid 1 on host elsewhere"):
        Refiner(tiny_cfg(tiny_model_dir, data_dir, out, "nna", batch_size=64))
    assert lock_file(out)["token"] == "theirs"
    with pytest.raises(MimcliError, match="fewer than one batch"), pytest.warns(UserWarning):
        Refiner(tiny_cfg(tiny_model_dir, data_dir, out, "nna", batch_size=64, force_unlock=True))
    assert not (out / runlock.LOCK_FILE).exists()  # released when __init__ failed


def test_push_refuses_a_held_run_and_takes_it_with_force_unlock(tmp_path):
    from typer.testing import CliRunner

    from mimcli.cli.app import app

    run = tmp_path / "run"
    write_lock(run)
    args = ["push", str(run), "--dry-run", "--to", str(tmp_path / "repo")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {run} is in use by refine (pid 1 on host elsewhere")
    result = CliRunner().invoke(app, [*args, "--force-unlock"])
    warning, error = result.stderr.strip().splitlines()
    assert warning.startswith(f"warning: {run}: --force-unlock: taking over the lock of refine")
    assert result.exit_code == 2 and "not a finished mimcli refine run" in error
    assert not (run / runlock.LOCK_FILE).exists()


def test_two_refines_on_one_out(tiny_model_dir, data_dir, tmp_path):
    """A second ``mimcli refine`` (here, in this process) on a folder that a first, real one
    holds exits 2 with one line naming it (the first is paused meanwhile, so it holds the folder
    before any checkpoint); the first then finishes with every step logged once."""
    from typer.testing import CliRunner

    from mimcli.cli.app import app

    out = tmp_path / "run"
    args = [
        str(tiny_model_dir), "--data", str(data_dir), "--out", str(out), "--blocks", "last2",
        "--head-steps", "2", "--steps", "2", "--batch-size", "8", "--local-crops", "1",
        "--head-width", "32", "--num-workers", "0", "--log-every", "1", "--topk", "3",
    ]  # fmt: skip
    env = dict(os.environ, MIMCLI_THREADS="1", MIMCLI_LOCK_LEASE_S="60")
    cmd = [sys.executable, "-m", "mimcli.cli.app", "refine"]
    first = subprocess.Popen([*cmd, *args], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / runlock.LOCK_FILE).exists() and time.time() < deadline:
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)
    try:
        second = CliRunner().invoke(app, ["refine", *args])
    finally:
        first.send_signal(signal.SIGCONT)
    lines = second.stderr.strip().splitlines()
    assert second.exit_code == 2 and len(lines) == 1, second.stderr
    assert lines[0].startswith(f"error: {out} is in use by refine (pid {first.pid} on host ")
    assert first.wait(timeout=180) == 0, first.stderr.read() if first.stderr else ""
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").open()]
    assert steps == [0, 1, 2, 3] and (out / "export" / "model.safetensors").exists()
    assert not (out / runlock.LOCK_FILE).exists()
