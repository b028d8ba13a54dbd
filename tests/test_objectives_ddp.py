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
