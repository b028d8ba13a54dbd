"""Run every benchmark in turn: ``python -m benchmarks [--smoke]``."""

from __future__ import annotations

import importlib
import sys

NAMES = (
    "probe_cost",
    "knn_search",
    "queue_lookup",
    "refine_step",
    "objective_step",
    "ddp_step",
    "memory",
    "plan_memory",
    "compile_step",
    "gpu_refine",
    "data_pipeline",
)


def main() -> int:
    for name in NAMES:
        print(f"\n## benchmarks.{name}\n", flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        code = module.main(sys.argv[1:])
        if code:
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
