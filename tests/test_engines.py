"""torch's engines under torchrun on gloo: DDP and FSDP2 (``--shard on``) average gradients.

Each rank is fed different data (its half of the global batch). After one refinement step at a
large learning rate, every rank must hold the same weights, equal to one process stepping on the
whole batch. The ``bypass`` run (the objective's step on the bare encoder, no wrapper) shows that
the check bites: its ranks drift apart silently, the failure the engines exist to prevent.
"""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

LR_STEP = 0.1 * 8 / 256  # --lr 0.1 scaled to batch 8: Adam's first step moves by about this


def run_worker(root, model, data, processes: int, modes: list[str]) -> None:
    env = dict(os.environ, MIMCLI_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                     "--master_addr", "127.0.0.1",
                     "--master_port", str(29800 + os.getpid() % 100 + processes)]  # fmt: skip
    done = subprocess.run(
        [*launcher, "-m", "tests.engine_worker", str(model), str(data), str(root), *modes],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def largest_differences(a: dict, b: dict) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {k: float((a[k] - b[k]).abs().max()) for k in a}


@pytest.mark.parametrize(
    "processes", [2, pytest.param(4, marks=pytest.mark.slow)], ids=["2proc", "4proc"]
)
def test_engines_average_gradients_over_ranks(processes, tiny_model_dir, data_dir, tmp_path):
    run_worker(tmp_path, tiny_model_dir, data_dir, 1, ["one"])
    run_worker(tmp_path, tiny_model_dir, data_dir, processes, ["ddp", "fsdp", "bypass"])
    one = load_file(tmp_path / "one" / "rank0.safetensors")
    for mode in ("ddp", "fsdp"):
        ranks = [load_file(tmp_path / mode / f"rank{r}.safetensors") for r in range(processes)]
        for other in ranks[1:]:
            assert all(torch.equal(ranks[0][k], other[k]) for k in ranks[0]), mode
        diff = largest_differences(ranks[0], one)
        # parameters with no true gradient (final norm bias before the heads' BN, qkv key
        # biases) get float noise that Adam turns into a step of either sign; the rest agree
        noisy = {k: d for k, d in diff.items() if d > 1e-5}
        assert len(noisy) <= 8 and len(diff) > 60, (mode, noisy)
        assert max(diff.values()) <= 2 * LR_STEP + 1e-6, (mode, noisy)  # a flipped sign at most
    bypass = [load_file(tmp_path / "bypass" / f"rank{r}.safetensors") for r in range(2)]
    apart = largest_differences(bypass[0], bypass[1])
    assert sum(d > 1e-4 for d in apart.values()) > len(apart) * 0.8
