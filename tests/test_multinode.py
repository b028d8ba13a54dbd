"""Multi-node refinement as documented (README, examples/slurm_refine.sh): two "nodes" of one
process each on 127.0.0.1, joined by torchrun's c10d rendezvous, give the losses of one process
on the same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest

ARGS = [
    "--blocks", "last2", "--head-steps", "2", "--steps", "2", "--batch-size", "8",
    "--local-crops", "1", "--head-width", "32", "--num-workers", "0", "--topk", "1",
    "--lr", "1e-3", "--log-every", "1",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(300)
def test_two_nodes_with_c10d_rendezvous_match_one_process(tiny_model_dir, data_dir, tmp_path):
    env = dict(os.environ, MIMCLI_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    refine = ["-m", "mimcli.cli.app", "refine", str(tiny_model_dir), "--data", str(data_dir)]
    single = subprocess.run(
        [sys.executable, *refine, *ARGS, "--out", str(tmp_path / "one")],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    endpoint = f"127.0.0.1:{free_port()}"
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "mimcli-test",
    ]  # fmt: skip
    nodes = [
        subprocess.Popen(
            [*launcher, *refine, *ARGS, "--out", str(tmp_path / "two")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=240) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2
    one = [json.loads(x)["loss"] for x in (tmp_path / "one" / "metrics.jsonl").open()]
    two = [json.loads(x)["loss"] for x in (tmp_path / "two" / "metrics.jsonl").open()]
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)
    assert (tmp_path / "two" / "export" / "model.safetensors").is_file()
