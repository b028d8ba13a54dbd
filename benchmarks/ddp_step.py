"""Refine step time under torch's DistributedDataParallel and FSDP2 against a hand-written
gradient all-reduce (what mimcli did before), 2 gloo processes on this CPU, measured in one run.

    python -m benchmarks.ddp_step [--smoke] [--batch 128] [--steps 6] [--rounds 3]

Both variants run the same objective step (NNA, shipped tiny Fashion-MNIST MAE, last 4 blocks, 2
local crops, refinement stage) on synthetic views; the baseline runs the plain step module and
then all-reduces one flat copy of every gradient after ``backward``, DDP overlaps bucketed
all-reduces with the backward pass. Rounds alternate the two variants so drifting load on the
machine hits both. Then the same refiner is sharded in place (``refine --shard on``: FSDP2 per
block plus the step module as root, the EMA alike) and timed for as many rounds. Reported: median
seconds per step of each and their ratios (target: DDP and FSDP within 10% of the hand-written
version).
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from benchmarks._common import parser, save, table
from benchmarks.objective_step import make_refiner, objective_views
from benchmarks.refine_step import batches
from mimcli.optim import apply_lr
from mimcli.refine import sharding
from mimcli.refine.engine import StepModule, step_module


def flat_all_reduce(params: list[torch.nn.Parameter]) -> None:
    """The hand-written averaging mimcli used before DDP: one flat copy, one all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch_dist.all_reduce(flat)
    flat /= torch_dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def timed_steps(
    refiner: Any, module: Any, views: list[torch.Tensor], n: int, manual: bool
) -> list[float]:
    params = [p for g in refiner.optimizer.param_groups for p in g["params"]]
    out = []
    for step, batch in enumerate(batches(views, n, 0)):
        torch_dist.barrier()
        start = time.perf_counter()
        loss, _ = module(batch, "refine", step)
        refiner.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if manual:
            flat_all_reduce(params)
        refiner.optimizer.step()
        refiner.objective.after_step(refiner.encoder, "refine", step)
        out.append(time.perf_counter() - start)
    return out


def worker(rank: int, world: int, port: int, root: str, batch: int, steps: int, rounds: int,
           results: Any) -> None:  # fmt: skip
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
    )  # fmt: skip
    refiner = make_refiner(Path(root) / f"rank{rank}", "nna", batch, threads=1)
    refiner.optimizer = refiner.make_optimizer("refine")
    apply_lr(refiner.optimizer, 1e-5)
    refiner.encoder.train()
    views = objective_views(refiner, batch // world)
    ddp = step_module(refiner.encoder, refiner.objective, "refine")
    plain = StepModule(refiner.encoder, refiner.objective, train_encoder=True)
    times: dict[str, list[float]] = {"ddp": [], "manual": [], "fsdp": []}
    for _ in range(rounds):
        times["ddp"] += timed_steps(refiner, ddp, views, steps + 1, manual=False)[1:]
        times["manual"] += timed_steps(refiner, plain, views, steps + 1, manual=True)[1:]
    fsdp = sharding.shard(plain, refiner.ema, refiner.device)  # in place: parameters -> DTensors
    refiner.optimizer = refiner.make_optimizer("refine")
    apply_lr(refiner.optimizer, 1e-5)
    for _ in range(rounds):
        times["fsdp"] += timed_steps(refiner, fsdp, views, steps + 1, manual=False)[1:]
    if rank == 0:
        results.put(times)
    torch_dist.barrier()
    torch_dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128, help="global batch (split over 2 ranks)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per round and variant")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    batch, steps, rounds = (16, 2, 1) if args.smoke else (args.batch, args.steps, args.rounds)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            worker, args=(2, port, tmp, batch, steps, rounds, results), nprocs=2, join=True,
            start_method="spawn",
        )  # fmt: skip
        times = results.get()
    ddp, manual = statistics.median(times["ddp"]), statistics.median(times["manual"])
    fsdp = statistics.median(times["fsdp"])
    rows = [["DDP (torch)", ddp, batch / ddp], ["FSDP2 (--shard on)", fsdp, batch / fsdp],
            ["hand-written all-reduce", manual, batch / manual]]  # fmt: skip
    print(table(f"Refine step, 2 gloo processes x 1 thread, global batch {batch}",
                ["variant", "s/step", "img/s"], rows))  # fmt: skip
    print(f"DDP / hand-written step time: {ddp / manual:.3f}")
    print(f"FSDP2 / hand-written step time: {fsdp / manual:.3f}")
    payload = {"smoke": args.smoke, "batch": batch, "steps": steps, "rounds": rounds}
    ratios = {"ratio": ddp / manual, "fsdp_ratio": fsdp / manual}
    save("ddp_step", args.out, {**payload, "times": times, **ratios})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
