"""The long kill soaks (one process, 2 gloo processes under DDP and under FSDP2 with
torch.distributed.checkpoint folders) and the long-run stability check; ``make test-slow``.

Figures for the README's Reliability section come from these runs (kills, paused kills, equal)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.reliability import launch, make_inputs, records, same_run, soak, soak_args

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("soak"))


def reference_run(args, out, processes=1):
    proc = launch(args, out, processes, free_port())
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.mark.timeout(1200)
def test_kill_soak_one_process(inputs, tmp_path):
    """20 SIGKILLs (4 while checkpoint.safetensors waits for its rename), a resume after
    each: tensor-equal export, the same metrics records."""
    args = soak_args(*inputs)
    full = reference_run(args, tmp_path / "full")
    done = soak(args, tmp_path / "soak", kills=20, seed=1, pause_every=4, total_steps=32)
    print(f"one process: {done.kills} kills ({done.paused_kills} at a rename), "
          f"{done.launches} launches, {done.stale_seen} left temporary files")  # fmt: skip
    assert done.kills == 20 and done.paused_kills == 4, done
    same_run(full, tmp_path / "soak")


@pytest.mark.timeout(1800)
@pytest.mark.parametrize(
    ("shard", "pause_name", "kills"),
    [("off", "checkpoint.safetensors", 8), ("on", "checkpoint.dcp", 6)],
    ids=["ddp", "fsdp-dcp"],
)
def test_kill_soak_two_processes(inputs, tmp_path, shard, pause_name, kills):
    """Under torchrun with 2 gloo processes (DDP, and FSDP2 whose checkpoint is a
    torch.distributed.checkpoint folder renamed in whole): every kill takes all ranks; every
    resume ends tensor-equal to an uninterrupted 2-process run."""
    # FSDP: heads on blocks 2-3 of 4 (see tests/test_objectives_ddp.py)
    args = soak_args(*inputs, **{"--blocks": "2,3" if shard == "on" else "last2"})
    args += ["--shard", shard]
    full = reference_run(args, tmp_path / "full", processes=2)
    done = soak(args, tmp_path / "soak", kills=kills, seed=2, pause_every=3,
                pause_name=pause_name, processes=2, port=free_port(), total_steps=32,
                timeout=400)  # fmt: skip
    print(f"2 processes, --shard {shard}: {done.kills} kills ({done.paused_kills} at a rename), "
          f"{done.launches} launches")  # fmt: skip
    assert done.kills == kills and done.paused_kills == (kills - 1) // 3, done
    if shard == "on":
        assert (tmp_path / "soak" / "checkpoint.dcp" / "trainer.safetensors").is_file()
    same_run(full, tmp_path / "soak")


RSS_PROBE = """
import json, sys
from mimcli import api
rss = []
def progress(stage, done, total, figures=None):
    if stage == "refine":
        with open("/proc/self/statm") as fh:
            rss.append(int(fh.read().split()[1]) * 4096)
api.refine(sys.argv[1], sys.argv[2], sys.argv[3], progress=progress, **json.loads(sys.argv[4]))
print(json.dumps(rss))
"""


@pytest.mark.timeout(1200)
def test_long_run_memory_is_flat_and_metrics_stay_one_per_logging_step(inputs, tmp_path):
    """320 refinement steps: the resident memory's slope over steps 50-300 stays under
    40 KB/step (a leak of one 8-image batch of views per step would be ~200 KB/step); the same
    run stopped by SIGTERM 3 times and resumed logs exactly the uninterrupted run's records."""
    model, data = inputs
    options = dict(blocks="last2", head_steps=5, steps=320, batch_size=8, local_crops=1,
                   head_width="32", num_workers=0, topk=3, lr=1e-3, log_every=10,
                   checkpoint_every=100, checkpoint_minutes=0)  # fmt: skip
    env = dict(os.environ, MIMCLI_THREADS="1")
    probe = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(model), str(data), str(tmp_path / "full"),
         json.dumps(options)],
        capture_output=True, text=True, env=env, timeout=1000,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    rss = np.array(json.loads(probe.stdout.strip().splitlines()[-1]), dtype=np.float64)
    assert len(rss) == 320
    steps = np.arange(50, 300)
    slope = np.polyfit(steps, rss[50:300], 1)[0] / 1024  # KB per step
    print(f"RSS slope over steps 50-300: {slope:.2f} KB/step; RSS at 50: {rss[50] / 2**20:.0f} "
          f"MiB, at 300: {rss[300] / 2**20:.0f} MiB")  # fmt: skip
    assert slope < 40, slope
    # the same run, stopped by SIGTERM three times
    import signal
    import time

    args = [str(model), "--data", str(data)]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    out = tmp_path / "cut"
    expected = records(tmp_path / "full")
    for i, at in enumerate([40, 150, 260]):
        proc = launch([*args, *(["--resume"] if i else [])], out)
        while not any(r["step"] >= at for r in records(out)):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err[-3000:]
    proc = launch([*args, "--resume"], out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    got = records(out)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    assert all(a["loss"] == b["loss"] for a, b in zip(got, expected, strict=True))
    same_run(tmp_path / "full", out)


@pytest.mark.timeout(900)
def test_sigterm_to_torchrun_saves_on_every_rank_and_resumes_equal(inputs, tmp_path):
    """SIGTERM to the torchrun launcher (what Slurm's scancel or a Kubernetes eviction sends): it
    forwards the signal, both gloo ranks agree on a step, save there and exit; the resumed run
    ends tensor-equal to an uninterrupted 2-process run."""
    import signal
    import time

    args = soak_args(*inputs, **{"--checkpoint-minutes": "0", "--checkpoint-every": "100"})
    full = reference_run(args, tmp_path / "full", processes=2)
    out = tmp_path / "cut"
    proc = launch(args, out, 2, free_port())
    while max((r["step"] for r in records(out)), default=-1) < 12:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "SIGTERM: stopped after refine step" in err, err[-3000:]
    from mimcli.runs import load_checkpoint

    saved = load_checkpoint(out / "checkpoint.safetensors")
    # logged global step 12 = refine step 5: the save comes after it
    assert saved["stage"] == "refine" and saved["done"] >= 5, saved["done"]
    proc = launch([*args, "--resume"], out, 2, free_port())
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    same_run(full, out)
