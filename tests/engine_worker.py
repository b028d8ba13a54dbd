"""Run by tests/test_engines.py under torchrun (or alone): one refinement step of the tiny model
per engine, each rank saving the weights it ends with.

    python -m tests.engine_worker MODEL DATA OUT MODE...   (MODE: ddp, fsdp, bypass)

``bypass`` runs the objective's step on the bare encoder, outside any wrapper: its gradients
are never averaged, which is the silent failure the engines exist to prevent.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from mimcli import distributed as dist
from mimcli.refine import loop, sharding
from mimcli.refine.config import RefineConfig
from mimcli.refine.engine import StepModule


def one_step(model: str, data: Path, out: Path, mode: str) -> None:
    if mode == "bypass":
        loop.step_module = lambda enc, obj, stage: StepModule(enc, obj, stage != "heads")
    cfg = RefineConfig(
        model=model, data=data, out=out, head_steps=1, steps=1, batch_size=8, head_width="32",
        num_workers=0, checkpoint_every=100, lr=0.1, head_lr=0.1, topk=1, local_crops=1,
        shard="on" if mode == "fsdp" else "off",
    )  # fmt: skip
    refiner = loop.Refiner(cfg)
    out.mkdir(parents=True, exist_ok=True)
    refiner.optimizer = refiner.make_optimizer("refine")
    refiner.train_stage("refine", 0)
    weights = sharding.full_state_dict(refiner.encoder)
    for name, param in refiner.objective.named_parameters():  # the heads
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        weights[f"objective.{name}"] = full.detach().cpu()
    tensors = {k: v.contiguous() for k, v in weights.items()}
    save_file(tensors, str(out / f"rank{dist.rank()}.safetensors"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    model_dir, data_dir, root = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    for name in sys.argv[4:]:
        one_step(model_dir, data_dir, root / name, name)
