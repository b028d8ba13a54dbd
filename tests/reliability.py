"""The kill soak of tests/test_reliability.py: a tiny ``mimcli refine`` in a subprocess, killed
with SIGKILL at seeded random moments (and, every few kills, while a checkpoint sits between its
temporary file and its rename, through the ``MIMCLI_TEST_PAUSE_BEFORE_RENAME`` hook of
``mimcli.fileio``), resumed after each kill, until it finishes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from mimcli.runs import RunFolder


def make_inputs(root: Path) -> tuple[Path, Path]:
    """The tiny model and image folder the soaks refine (as tests/conftest.py makes them)."""
    from tests.conftest import write_image_folder
    from tests.objective_harness import save_tiny_vit

    model = save_tiny_vit(root / "tiny-model", seed=0)
    return model, write_image_folder(root / "data", per_class=8, classes=3, seed=3)


def soak_args(model_dir: Path, data_dir: Path, **over: str) -> list[str]:
    """A tiny NNA run with 32 steps (8 head warm-up + 24 refinement) of batch 8, a checkpoint
    every 3 steps and every 0.2 s (timed ones fall inside logging windows of 2 steps)."""
    opts = {
        "--blocks": "last2", "--head-steps": "8", "--steps": "24", "--batch-size": "8",
        "--local-crops": "1", "--head-width": "32", "--num-workers": "1", "--topk": "3",
        "--lr": "1e-3", "--checkpoint-every": "3", "--log-every": "2",
        "--checkpoint-minutes": "0.0033", **over,
    }  # fmt: skip
    return [str(model_dir), "--data", str(data_dir), *[x for kv in opts.items() for x in kv]]


def launch(args: list[str], out: Path, processes: int = 1, port: int = 0, **env: str):
    """``mimcli refine ARGS --out OUT`` (under torchrun on gloo with ``processes`` > 1) in its
    own session, so :func:`kill_run` reaches its workers."""
    environ = dict(os.environ, MIMCLI_THREADS="1", GLOO_SOCKET_IFNAME="lo", **env)
    if processes > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_addr", "127.0.0.1", "--master_port", str(port)]  # fmt: skip
    else:
        head = [sys.executable]
    return subprocess.Popen(
        [*head, "-m", "mimcli.cli.app", "refine", *args, "--out", str(out)],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL a :func:`launch`-ed run: torchrun's workers first, then its session."""
    found = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    for pid in found.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate(timeout=60)


def why(err: str) -> str:
    """A failed launch's error lines, then the end of its stderr."""
    lines = [x for x in err.splitlines() if "error:" in x or "Error:" in x][:8]
    return "\n".join([*lines, "...", err[-2000:]])


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill
            continue
    return out


@dataclass
class Soak:
    """What :func:`soak` did: kills by kind, launches, and the stderr of the last launch."""

    kills: int = 0
    paused_kills: int = 0
    launches: int = 0
    stale_seen: int = 0  # kills that left a temporary file behind (removed by the next start)
    log: list[str] = field(default_factory=list)


def soak(
    args: list[str],
    out: Path,
    kills: int,
    seed: int,
    total_steps: int,
    pause_every: int = 3,
    pause_name: str = "checkpoint.safetensors",
    processes: int = 1,
    port: int = 0,
    timeout: float = 240,
) -> Soak:
    """Run ``refine ARGS --out OUT`` (``total_steps`` steps in all) to the end
    while SIGKILLing it ``kills`` times, resuming after each (starting afresh while there is no
    checkpoint yet). The kills fall at seeded random steps spread over the run (each once this
    launch has logged that step, plus a random part of a step); every ``pause_every``-th kill
    (but the last) instead lands while the launch's first checkpoint called ``pause_name``
    waits to be renamed."""
    rng = random.Random(seed)
    at = sorted(rng.sample(range(1, total_steps - 1), kills))
    result = Soak()
    flag = out.parent / f".{out.name}.paused"
    metrics = out / "metrics.jsonl"
    for i in range(kills + 1):
        last = i == kills
        resume = ["--resume"] if RunFolder(out).has_checkpoint() else []
        paused = i < kills - 1 and pause_every > 0 and i % pause_every == pause_every - 1
        env = {}
        if paused:
            flag.unlink(missing_ok=True)
            env = {
                "MIMCLI_TEST_PAUSE_BEFORE_RENAME": pause_name,  # its first write
                "MIMCLI_TEST_PAUSE_FLAG": str(flag),
            }
        before = metrics.stat().st_ino if metrics.exists() else None
        proc = launch([*args, *resume], out, processes, port + i, **env)
        result.launches += 1
        if last:
            _, err = proc.communicate(timeout=timeout)
            result.log.append(err)
            assert proc.returncode == 0, f"the last resume failed:\n{why(err)}"
            return result
        deadline = time.time() + timeout
        if paused:
            while time.time() < deadline and not flag.exists() and proc.poll() is None:
                time.sleep(0.01)
        else:  # once this launch (its metrics file replaced on start) has logged step at[i]
            while time.time() < deadline and proc.poll() is None:
                fresh = metrics.exists() and metrics.stat().st_ino != before
                if fresh and max((r["step"] for r in records(out)), default=-1) >= at[i]:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.1))
        if proc.poll() is not None:
            raise AssertionError(f"launch {i} ended before its kill:\n{why(proc.communicate()[1])}")
        kill_run(proc)
        result.kills += 1
        result.paused_kills += paused and flag.exists()
        result.stale_seen += any(p.name.endswith(".tmp") for p in out.iterdir())
    raise AssertionError("unreachable")


def same_run(a: Path, b: Path) -> None:
    """``b`` ended as ``a``: tensor-equal exports, and ``metrics.jsonl`` with the same records
    (one per logging step, in order; equal losses and metrics, timings aside)."""
    ta = load_file(a / "export" / "model.safetensors")
    tb = load_file(b / "export" / "model.safetensors")
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        x, y = dict(x), dict(y)
        x.pop("images_per_s"), y.pop("images_per_s")
        assert x == y, (x, y)
