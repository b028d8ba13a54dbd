"""Shared pieces of the per-objective tests (tests/test_objective_*.py): tiny teachers, a tiny
refine through the CLI, and an interrupted-then-resumed run compared with an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mimcli.cli.app import app
from mimcli.refine.config import RefineConfig
from mimcli.refine.loop import Refiner
from tests.conftest import TINY_ARGS, make_tiny_vit

runner = CliRunner()


def save_tiny_vit(folder: Path, seed: int, **overrides) -> Path:
    """A random tiny timm ViT (32 px) in timm's Hugging Face layout; ``overrides`` change
    ``TINY_ARGS`` (e.g. ``patch_size=16, embed_dim=48`` for a teacher on a coarser grid)."""
    from timm.models import save_for_hf

    vit = make_tiny_vit(seed=seed, **overrides)
    vit.pretrained_cfg = dict(vit.pretrained_cfg, input_size=(3, 32, 32), crop_pct=1.0)
    save_for_hf(vit, str(folder), model_args=dict(TINY_ARGS, **overrides), safe_serialization=True)
    return folder


def tiny_cfg(model_dir: Path, data_dir: Path, out: Path, objective: str, **kw) -> RefineConfig:
    """A RefineConfig for a few CPU steps on the tiny ViT (batch 8, 32-wide heads)."""
    base = dict(
        model=str(model_dir),
        data=data_dir,
        out=out,
        objective=objective,
        head_steps=2,
        steps=3,
        batch_size=8,
        head_width="32",
        num_workers=0,
        checkpoint_every=1,
        head_lr=1e-3,
        lr=1e-3,
        seed=0,
    )
    base.update(kw)
    return RefineConfig(**base)


def tiny_run_args(data_dir: Path) -> list[str]:
    """CLI options of a tiny run: 2 head steps + 3 steps of batch 8, 32-wide heads, a checkpoint
    every step (so ``check_resume`` can cut anywhere)."""
    return [
        "--data", str(data_dir), "--head-steps", "2", "--steps", "3", "--batch-size", "8",
        "--head-width", "32", "--num-workers", "0", "--checkpoint-every", "1",
    ]  # fmt: skip


def first_batch(refiner: Refiner, stage: str = "refine"):
    return next(iter(refiner.loader(stage, 0)))


def refine_cli(args: list[str]):
    """``mimcli refine ARGS`` in-process; returns the click Result."""
    return runner.invoke(app, ["refine", *args])


def export_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "export" / "model.safetensors")


def metric_steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


class Interrupt(BaseException):
    """Stands in for a kill: raised right after a checkpoint is written."""


def run_interrupted(
    args: list[str], monkeypatch: pytest.MonkeyPatch, stop_after: tuple[str, int]
) -> None:
    """``mimcli refine ARGS`` in-process, stopped (as if killed) right after the checkpoint at
    ``stop_after`` (stage, steps done in that stage; needs ``--checkpoint-every 1``)."""
    real_save = Refiner.save

    def save_then_stop(self, stage, done, *rest):
        real_save(self, stage, done, *rest)
        if (stage, done) == stop_after:
            raise Interrupt

    monkeypatch.setattr(Refiner, "save", save_then_stop)
    with pytest.raises(Interrupt):
        runner.invoke(app, ["refine", *args], catch_exceptions=False)
    monkeypatch.setattr(Refiner, "save", real_save)


def check_resume(
    tmp_path: Path,
    args: list[str],
    monkeypatch: pytest.MonkeyPatch,
    stop_after: tuple[str, int] = ("refine", 1),
) -> None:
    """Run ``mimcli refine ARGS`` uninterrupted into ``tmp_path/full``; run it again into
    ``tmp_path/cut``, interrupted right after the checkpoint at ``stop_after`` (stage, steps
    done in that stage; needs ``--checkpoint-every 1``), then ``--resume`` it. The exports must
    be identical tensors and the logged steps the same."""
    full = refine_cli([*args, "--out", str(tmp_path / "full")])
    assert full.exit_code == 0, full.output
    run_interrupted([*args, "--out", str(tmp_path / "cut")], monkeypatch, stop_after)
    assert not (tmp_path / "cut" / "export").exists()
    resumed = refine_cli([*args, "--out", str(tmp_path / "cut"), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    a, b = export_tensors(tmp_path / "full"), export_tensors(tmp_path / "cut")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert metric_steps(tmp_path / "full") == metric_steps(tmp_path / "cut")


def losses_on_fixed_batch(
    refiner: Refiner, stage: str, steps: int, update: bool = True
) -> list[float]:
    """Train ``steps`` optimiser steps of ``stage`` on one fixed batch (the loop's own optimiser,
    lr held at the stage's peak); returns the loss before each step. ``update=False`` skips the
    objective's ``after_step`` (queues and momentum targets stay as they are)."""
    batch = first_batch(refiner, stage)
    refiner.optimizer = refiner.make_optimizer(stage)
    refiner.encoder.train(stage != "heads")
    refiner.objective.train()
    from mimcli.optim import apply_lr

    apply_lr(refiner.optimizer, refiner.peak_lr(stage))
    losses = []
    for step in range(steps):
        loss, _ = refiner.step_losses(batch, stage, step)
        refiner.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        refiner.optimizer.step()
        if update:
            refiner.objective.after_step(refiner.encoder, stage, step)
        losses.append(float(loss.detach()))
    return losses


def torchrun_refine(args: list[str], out: Path, processes: int, port: int, *extra: str):
    """``torchrun -m mimcli.cli.app refine ARGS --out OUT`` on gloo, in its own session (so
    :func:`kill_when` can kill it with its workers); returns the Popen."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MIMCLI_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
         "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "mimcli.cli.app",
         "refine", *args, "--out", str(out), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def kill_when(proc, metrics: Path, lines: int, timeout: float = 200) -> int:
    """SIGKILL a :func:`torchrun_refine` run (its workers, then the launcher) once ``metrics``
    holds ``lines`` records; returns how many it holds then."""
    import os
    import signal
    import subprocess
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
            break
        time.sleep(0.02)
    # torchrun's workers live in their own sessions: kill them, then the launcher
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    for pid in workers.stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return len(metrics.read_text().splitlines())
