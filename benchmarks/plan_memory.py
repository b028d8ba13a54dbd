"""`mimcli refine --plan` against real steps: per-image bytes predicted on fake tensors vs the
measured peak of real fp32 CPU steps (encoder + NNA heads + loss, forward and backward).

    python -m benchmarks.plan_memory [--smoke]

Each (model, batch) runs in its own subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` (large
tensors come from mmap and go back to the system when freed, so the peak is not hidden by heap
caching): one warm-up step, then the resident set is read, the high-water mark reset (``5`` into
``/proc/self/clear_refs``) and one step run; its peak is ``VmHWM`` minus the resident set before.
The slope over two batch sizes is the measured per-image bytes (fixed costs cancel); the plan's
per-image figure is its saved activations plus its backward transient.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import parser, save, table

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "examples" / "models" / "fmnist-mae-tiny"
MIB = 1024**2

# name, MODEL, blocks, global px, local px, local crops, two batch sizes (smoke: smaller)
_VIT_S_64 = {
    "name": "vit_small_patch16 @64/32",
    "model": "vit_small_patch16_224",
    "blocks": "last4",
    "global": 64,
    "local": 32,
    "crops": 2,
    "batches": (16, 48),
    "smoke": (4, 12),
}
CASES: tuple[dict[str, Any], ...] = (
    {
        "name": "fmnist-mae-tiny",
        "model": str(TINY),
        "blocks": "last4",
        "global": 28,
        "local": 12,
        "crops": 2,
        "batches": (64, 192),
        "smoke": (16, 48),
    },
    _VIT_S_64,
    {**_VIT_S_64, "name": _VIT_S_64["name"] + ", grad checkpointing", "grad_checkpointing": True},
    {
        **_VIT_S_64,
        "name": "vit_small_patch16 @224/96",
        "global": 224,
        "local": 96,
        "batches": (4, 12),
        "smoke": (2, 4),
    },
)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(case: dict[str, Any], batch: int) -> int:
    """Peak bytes of one real step above the resident set before it (in this process)."""
    import torch

    from mimcli.heads import HeadEnsemble, head_widths
    from mimcli.queue import NeighbourQueue
    from mimcli.refine.plan import build_architecture, nna_step

    torch.manual_seed(0)
    encoder, _, _ = build_architecture(case["model"], None)
    encoder = encoder.to_empty(device="cpu").train()
    encoder.set_grad_checkpointing(case.get("grad_checkpointing", False))
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0, 0.02)
    depth, dim = len(encoder.blocks), int(encoder.embed_dim)
    blocks = list(range(depth - 3, depth + 1))
    widths = head_widths(dim)
    heads = HeadEnsemble(blocks, dim, widths).train()
    queues = {b: NeighbourQueue(4096, widths.out) for b in blocks}
    ids = torch.arange(batch)

    def neighbours(block: int, z: torch.Tensor) -> torch.Tensor:
        return queues[block].lookup(z, ids, topk=20).neighbours

    sizes = [case["global"]] * 2 + [case["local"]] * case["crops"]
    step = nna_step(encoder, heads, blocks, "cls", sizes, "nna", 0.2, neighbours)
    params = [*encoder.parameters(), *heads.parameters()]
    step(batch).backward()  # warm-up: gradients and lazily built state exist from here on
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step(batch).backward()
    peak = _status_kb("VmHWM") - before
    del params
    return peak * 1024


def predict(case: dict[str, Any]) -> dict[str, int]:
    from mimcli.refine.plan import PlanConfig, plan_refine

    plan = plan_refine(
        PlanConfig(
            case["model"],
            blocks=case["blocks"],
            local_crops=case["crops"],
            global_size=case["global"],
            local_size=case["local"],
            precision="fp32",
            queue_size="4096",
            grad_checkpointing=case.get("grad_checkpointing", False),
        )
    )
    return {
        "saved": plan.activation_bytes_per_image,
        "transient": plan.transient_bytes_per_image,
        "predicted": plan.activation_bytes_per_image + plan.transient_bytes_per_image,
    }


def _child(case: dict[str, Any], batch: int) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    code = (
        "import json, sys; from benchmarks.plan_memory import measure; "
        "print(measure(json.loads(sys.argv[1]), int(sys.argv[2])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(case), str(batch)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows, results = [], []
    for case in CASES:
        b1, b2 = case["smoke"] if args.smoke else case["batches"]
        peaks = [_child(case, b) for b in (b1, b2)]
        measured = (peaks[1] - peaks[0]) / (b2 - b1)
        pred = predict(case)
        ratio = pred["predicted"] / measured
        results.append(
            {
                "case": case["name"],
                "batches": [b1, b2],
                "peaks_bytes": peaks,
                "measured_per_image": measured,
                **{f"{k}_per_image": v for k, v in pred.items()},
                "ratio": ratio,
            }
        )
        rows.append(
            [
                case["name"],
                f"{b1}/{b2}",
                pred["saved"] / MIB,
                pred["predicted"] / MIB,
                measured / MIB,
                ratio,
            ]
        )
    print(
        table(
            "refine --plan: per-image bytes, predicted vs measured (fp32, CPU)",
            ["model", "batches", "saved MiB", "predicted MiB", "measured MiB", "pred/meas"],
            rows,
        )
    )
    save("plan_memory", args.out, {"smoke": args.smoke, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
