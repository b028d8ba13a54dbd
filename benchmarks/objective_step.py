"""Cost of one training step per refinement objective, through the real loop (``train_stage``).

    python -m benchmarks.objective_step [--smoke] [--batch 256] [--steps 8]

Each objective runs on the shipped tiny Fashion-MNIST MAE (CPU) with the settings
`examples/compare_objectives.py` uses (NNA: last 4 blocks, 2 local crops, queue 16,384; the
teacher of mimco and mrmae is the tiny MAE itself, so teacher cost equals one student forward).
Synthetic batches in each objective's own view format are fed to the loop; the first step of
each stage is a warm-up and is not counted. Reported: median seconds per step of the head
warm-up and of the refinement stage, images/s, and the ratio to NNA's refinement step measured
in the same run.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from benchmarks._common import parser, save, setup_threads, table
from benchmarks.refine_step import DATASET, refine_steps
from mimcli.refine.config import RefineConfig
from mimcli.refine.loop import Refiner

TINY = Path(__file__).resolve().parents[1] / "examples" / "models" / "fmnist-mae-tiny"
OBJECTIVES = ("nna", "nnclr", "conmim", "mimco", "mrmae")


def make_refiner(root: Path, objective: str, batch: int, threads: int) -> Refiner:
    data = root / f"data{batch}"
    if not data.exists():  # blank PNGs: the Refiner only scans them; batches are synthetic
        for i in range(batch):
            (data / str(i % 10)).mkdir(parents=True, exist_ok=True)
            Image.new("L", (28, 28)).save(data / str(i % 10) / f"{i}.png")
    extra: dict[str, Any] = {}
    if objective == "nna":
        extra = {"blocks": "last4", "local_crops": 2, "queue_size": "16384"}
    elif objective == "nnclr":
        extra = {"queue_size": "16384"}
    elif objective in ("mimco", "mrmae"):
        extra = {"teacher": [str(TINY)]}
    cfg = RefineConfig(
        model=str(TINY),
        data=data,
        out=root / f"run-{objective}-{time.monotonic_ns()}",
        objective=objective,
        batch_size=batch,
        lr=1e-3,
        head_lr=2e-3,
        checkpoint_every=10**9,
        device="cpu",
        num_workers=0,
        threads=threads,
        **extra,
    )
    cfg.out.mkdir(parents=True)
    refiner = Refiner(cfg)
    refiner.save = lambda stage, done, *rest: None  # type: ignore[method-assign]
    if hasattr(refiner.objective, "labels_by_id"):  # synthetic ids run over the whole 60k range
        gen = torch.Generator().manual_seed(0)
        refiner.objective.labels_by_id = torch.randint(0, 10, (DATASET,), generator=gen)
    return refiner


def objective_views(refiner: Refiner, batch: int) -> list[torch.Tensor]:
    """Random tensors shaped like the objective's own views of one image, ``batch`` of each."""
    sample = refiner.objective.transform()(Image.new("RGB", (28, 28)))
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch, *v.shape, generator=gen) for v in sample]


def measure(objective: str, root: Path, batch: int, steps: int, threads: int) -> dict[str, Any]:
    refiner = make_refiner(root, objective, batch, threads)
    views = objective_views(refiner, batch)
    out: dict[str, Any] = {"objective": objective, "views": [list(v.shape[1:]) for v in views]}
    for stage in ("heads", "refine"):
        seconds = refine_steps(refiner, views, steps + 1, stage)[1:]  # drop the warm-up step
        out[f"{stage}_s"] = statistics.median(seconds)
        out[f"{stage}_all_s"] = seconds
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed steps per stage (after 1 warm-up)")
    args = p.parse_args(argv)
    threads = setup_threads(args.threads)
    batch, steps = (16, 2) if args.smoke else (args.batch, args.steps)
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        for objective in OBJECTIVES:
            rows_out.append(measure(objective, Path(tmp), batch, steps, threads))
            print(f"  {objective}: refine {rows_out[-1]['refine_s']:.3f} s/step", flush=True)
    nna = rows_out[0]["refine_s"]
    rows = [
        [
            r["objective"],
            " + ".join("x".join(map(str, s[1:])) for s in r["views"]),
            r["heads_s"],
            r["refine_s"],
            batch / r["refine_s"],
            r["refine_s"] / nna,
        ]
        for r in rows_out
    ]
    cols = ["objective", "views (px)", "head step s", "refine step s", "img/s", "vs nna"]
    print(table(f"Step cost per objective, tiny MAE, batch {batch}, {threads} threads", cols, rows))
    save(
        "objective_step",
        args.out,
        {"smoke": args.smoke, "batch": batch, "steps": steps, "threads": threads, "rows": rows_out},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
