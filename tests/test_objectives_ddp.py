"""The objectives under torchrun with 2 CPU processes (gloo). Every run ends with the loop's own
check that all ranks hold identical weights (encoder, objective parameters and buffers). nnclr
(gathered negatives, synchronised BatchNorm, queue filled from every rank) and mimco (masks drawn
for the whole global batch, gathered image-level negatives) must also log the same losses as one
process on the same global batch; conmim and mrmae draw masks per rank."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.objective_harness import tiny_run_args


def refine(args: list[str], out, processes: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, MIMCLI_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    launcher = [sys.executable]
    if processes > 1:
        launcher += [
            "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(29600 + os.getpid() % 1000),
        ]  # fmt: skip
    return subprocess.run(
        [*launcher, "-m", "mimcli.cli.app", "refine", *args, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def losses(run) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").open()]


@pytest.mark.parametrize("objective", ["nnclr", "mimco", "conmim", "mrmae"])
def test_two_processes(objective, tiny_model_dir, data_dir, teacher_dir, tmp_path):
    args = [str(tiny_model_dir), "--objective", objective, *tiny_run_args(data_dir)]
    args += ["--steps", "2", "--lr", "1e-3", "--topk", "1"]
    if objective in ("mimco", "mrmae"):
        args += ["--teacher", str(teacher_dir)]
    two = refine(args, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2 and config["resolved"]["objective"] == objective
    assert len(losses(tmp_path / "two")) == 4
    assert (tmp_path / "two" / "export" / "model.safetensors").exists()
    if objective in ("nnclr", "mimco"):
        one = refine(args, tmp_path / "one", 1)
        assert one.returncode == 0, one.stderr[-3000:]
        assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def test_two_process_resume_repeats_every_ranks_draws(tiny_model_dir, data_dir, tmp_path):
    """Killed and resumed under torchrun with top-3 neighbour draws: each rank's draw generator
    comes back from the checkpoint, so the export equals an uninterrupted 2-process run's."""
    import signal
    import time

    from safetensors.torch import load_file

    args = [str(tiny_model_dir), *tiny_run_args(data_dir), "--blocks", "last2", "--local-crops",
            "1", "--topk", "3", "--lr", "1e-3", "--steps", "12"]  # fmt: skip
    env = dict(os.environ, MIMCLI_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    port = str(29700 + os.getpid() % 1000)

    def launch(out, *extra):
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_addr", "127.0.0.1", "--master_port", port, "-m", "mimcli.cli.app",
             "refine", *args, "--out", str(out), *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip

    full = launch(tmp_path / "full")
    assert full.wait(timeout=240) == 0, full.stderr.read()[-3000:]
    cut = launch(tmp_path / "cut")
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 200
    while time.time() < deadline:  # kill it inside the refinement stage
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    # torchrun's workers live in their own sessions: kill them, then the launcher
    workers = subprocess.run(["pgrep", "-P", str(cut.pid)], capture_output=True, text=True)
    for pid in workers.stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    os.killpg(cut.pid, signal.SIGKILL)
    cut.wait(timeout=30)
    done = len(metrics.read_text().splitlines())
    assert 4 <= done < 14, done  # stopped inside the refinement stage, draws still to come
    assert not (tmp_path / "cut" / "export").exists()
    resumed = launch(tmp_path / "cut", "--resume")
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read()[-3000:]
    a = load_file(tmp_path / "full" / "export" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "export" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
