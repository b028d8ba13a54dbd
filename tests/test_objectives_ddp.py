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

from tests.objective_harness import kill_when, tiny_run_args, torchrun_refine


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


def assert_same_export(one, two, steps: int, lr: float, batch: int) -> None:
    """Exports agree to float tolerance. Parameters whose true gradient is (nearly) zero get
    float noise that Adam scales up to about one lr per step, so a difference of up to the
    summed step sizes is allowed there; every other parameter must agree to 1e-5."""
    from safetensors.torch import load_file

    a = load_file(one / "export" / "model.safetensors")
    b = load_file(two / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    bound = 1.5 * steps * lr * batch / 256
    loose = [k for k in a if (a[k] - b[k]).abs().max() > 1e-5]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=bound, rtol=0, msg=k)
    assert len(loose) <= len(a) // 4, loose  # the noise-only parameters are few


# Under torchrun: conmim and mrmae draw masks per rank (their losses differ from one process);
# nna is compared with DDP in tests/test_refine.py; FSDP2 (--shard on) must match one process
# conmim under FSDP (its momentum encoder's blocks are units too) must log DDP's losses
ENGINES = {"nna": ["on"], "nnclr": ["off", "on"], "mimco": ["off", "on"], "conmim": ["off", "on"],
           "mrmae": ["off"]}  # fmt: skip


@pytest.mark.parametrize("objective", list(ENGINES))
def test_two_processes(objective, tiny_model_dir, data_dir, teacher_dir, tmp_path):
    """2 processes under DDP (--shard off) and FSDP2 (--shard on): nna, nnclr and mimco log the
    same losses as one process on the same global batch and export the same weights."""
    args = [str(tiny_model_dir), "--objective", objective, *tiny_run_args(data_dir)]
    args += ["--steps", "2", "--lr", "1e-3", "--topk", "1"]
    if objective in ("mimco", "mrmae"):
        args += ["--teacher", str(teacher_dir)]
    one = None
    if objective in ("nna", "nnclr", "mimco"):
        one = refine(args, tmp_path / "one", 1)
        assert one.returncode == 0, one.stderr[-3000:]
    for shard in ENGINES[objective]:
        two = refine([*args, "--shard", shard], tmp_path / shard, 2)
        assert two.returncode == 0, two.stderr[-3000:]
        config = json.loads((tmp_path / shard / "config.json").read_text())
        resolved = config["resolved"]
        assert resolved["world_size"] == 2 and resolved["objective"] == objective
        assert resolved["sharded"] == (shard == "on")
        assert len(losses(tmp_path / shard)) == 4
        assert (tmp_path / shard / "export" / "model.safetensors").exists()
        if one is not None:
            assert losses(tmp_path / shard) == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
            assert_same_export(tmp_path / "one", tmp_path / shard, steps=2, lr=1e-3, batch=8)
    if one is None and len(ENGINES[objective]) == 2:  # masks per rank: FSDP against DDP
        assert losses(tmp_path / "on") == pytest.approx(losses(tmp_path / "off"), rel=1e-5)


@pytest.mark.parametrize(
    ("shard", "processes"),
    [("off", 2), ("on", 2), pytest.param("on", 4, marks=pytest.mark.slow)],
    ids=["ddp", "fsdp", "fsdp-4proc"],
)
def test_two_process_resume_repeats_every_ranks_draws(
    shard, processes, tiny_model_dir, data_dir, tmp_path
):
    """Killed (SIGKILL) and resumed under torchrun with top-3 neighbour draws, under DDP and under
    FSDP2 (``--shard on``: sharded checkpoints through torch.distributed.checkpoint): each rank's
    draw generator comes back from the checkpoint, so the export equals an uninterrupted
    2-process run's, tensor for tensor."""

    from safetensors.torch import load_file

    # under FSDP, heads on blocks 2-3 of 4: block 4 and the final norm never get a gradient, so
    # the saved optimiser state covers fewer parameters than a fresh one would
    blocks = "last2" if shard == "off" else "2,3"
    args = [str(tiny_model_dir), *tiny_run_args(data_dir), "--blocks", blocks, "--local-crops",
            "1", "--topk", "3", "--lr", "1e-3", "--steps", "12", "--shard", shard]  # fmt: skip
    port = 29700 + os.getpid() % 1000

    def launch(out, *extra):
        return torchrun_refine(args, out, processes, port, *extra)

    full = launch(tmp_path / "full")
    assert full.wait(timeout=240) == 0, full.stderr.read()[-3000:]
    cut = launch(tmp_path / "cut")
    metrics = tmp_path / "cut" / "metrics.jsonl"
    kill_when(cut, metrics, 4)  # inside the refinement stage
    done = len(metrics.read_text().splitlines())
    assert 4 <= done < 14, done  # stopped inside the refinement stage, draws still to come
    assert not (tmp_path / "cut" / "export").exists()
    sharded = (tmp_path / "cut" / "checkpoint.dcp" / "trainer.safetensors").is_file()
    assert sharded == (shard == "on")
    resumed = launch(tmp_path / "cut", "--resume")
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read()[-3000:]
    a = load_file(tmp_path / "full" / "export" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "export" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
