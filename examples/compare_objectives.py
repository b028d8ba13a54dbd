"""Every refinement objective on the shipped tiny Fashion-MNIST MAE, with one short CPU recipe,
then k-NN of the base model, each refined encoder and the teacher, side by side.

    python examples/compare_objectives.py --out runs/objectives

1. `mimcli refine --objective nna` with the demo's recipe (last 4 blocks). Its export is also the
   teacher of mimco and mrmae: a self-supervised teacher made by mimcli without labels (the
   default timm teachers, DINO and CLIP, cannot be downloaded offline).
2. nnclr, conmim, mimco (--teacher the NNA export) and mrmae (--teacher the NNA export, MAE
   decoder shipped with the model): the same steps, batch and learning rates; every other option
   is the objective's documented default.
3. `mimcli eval` base + every export (k-NN, k=10/20, all test images, 20,000 train images).

Runs whose export already exists are kept (delete a run folder to redo it). The table goes to
OUT/objectives.md. Data: as examples/demo.py (Debian's Fashion-MNIST or the shipped subset).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from demo import IDX_DIR, MODEL, ROOT, bin_path, count_images, prepare_data, step  # noqa: E402

OBJECTIVES = ("nna", "nnclr", "conmim", "mimco", "mrmae")
TEACHER_BASED = ("mimco", "mrmae")
# One recipe for every objective: 30 head warm-up steps, 90 refinement steps of batch 256.
COMMON = [
    "--head-steps", "30", "--head-lr", "2e-3", "--steps", "90", "--lr", "1e-3",
    "--batch-size", "256",
]  # fmt: skip
# NNA as in the demo: the last 4 blocks, 2 local crops, a queue of 16,384.
NNA_EXTRA = ["--blocks", "last4", "--local-crops", "2", "--queue-size", "16384"]


def refine_args(objective: str, teacher: Path) -> list[str]:
    extra: list[str] = []
    if objective == "nna":
        extra = NNA_EXTRA
    elif objective == "nnclr":
        extra = ["--queue-size", "16384"]
    elif objective in TEACHER_BASED:
        extra = ["--teacher", str(teacher)]
    return ["--objective", objective, *COMMON, *extra]


def table(results: dict, runs: dict[str, Path], minutes: dict[str, float], teacher: str) -> str:
    by_name = {m["name"]: m for m in results["models"]}
    base = results["models"][0]

    def knn(model: dict, kind: str) -> float:
        return float(model["knn"][kind]["20"])

    lines = [
        "| objective | teacher | k-NN CLS (k=20) | Δ | k-NN mean patch (k=20) | Δ | refine |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| base (tiny MAE) | – | {knn(base, 'cls'):.2f} | | {knn(base, 'patch'):.2f} | | |",
    ]
    for objective, run in runs.items():
        model = by_name.get(run.name)
        if model is None:
            continue
        cls, patch = knn(model, "cls"), knn(model, "patch")
        who = f"NNA-refined tiny MAE ({teacher})" if objective in TEACHER_BASED else "–"
        took = f"{minutes[objective]:.1f} min" if objective in minutes else "(kept)"
        lines.append(
            f"| {objective} | {who} | {cls:.2f} | {cls - knn(base, 'cls'):+.2f} | {patch:.2f} | "
            f"{patch - knn(base, 'patch'):+.2f} | {took} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/objectives"))
    parser.add_argument("--data", type=Path, default=Path("data/fmnist"))
    parser.add_argument("--idx-dir", type=Path, default=IDX_DIR)
    parser.add_argument("--model", default=str(MODEL.relative_to(ROOT)))
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--knn-train", type=int, default=20000)
    args = parser.parse_args()
    chosen = [o.strip() for o in args.objectives.split(",") if o.strip()]
    unknown = sorted(set(chosen) - set(OBJECTIVES))
    if unknown:
        parser.error(f"unknown objectives {unknown}; choose from {', '.join(OBJECTIVES)}")
    if any(o in TEACHER_BASED for o in chosen) and "nna" not in chosen:
        chosen.insert(0, "nna")  # the teacher
    mimcli = bin_path("mimcli")
    out: Path = args.out
    timings: dict[str, float] = {}
    data, _ = prepare_data(args, timings)
    train, test = data / "train", data / "test"
    teacher = out / "nna" / "export"
    runs = {o: out / o for o in chosen}
    minutes: dict[str, float] = {}
    for objective, run in runs.items():
        if (run / "export" / "model.safetensors").exists():
            print(f"\n(keeping {run}: its export exists)")
            continue
        if run.exists():
            import shutil

            shutil.rmtree(run)
        start = time.perf_counter()
        step(
            f"refine {objective}",
            [mimcli, "refine", args.model, "--data", str(train), "--out", str(run),
             *refine_args(objective, teacher)],
            timings,
        )  # fmt: skip
        minutes[objective] = (time.perf_counter() - start) / 60
    n_train = count_images(train)
    limit = [] if not args.knn_train or args.knn_train >= n_train else [
        "--limit-train", str(args.knn_train)
    ]  # fmt: skip
    step(
        "eval",
        [mimcli, "eval", args.model, *[str(r) for r in runs.values()], "--train", str(train),
         "--val", str(test), *limit, "--protocols", "knn", "--out", str(out / "eval")],
        timings,
    )  # fmt: skip
    results = json.loads((out / "eval" / "results.json").read_text())
    text = table(results, runs, minutes, str(teacher))
    note = (
        f"\nk-NN on {results['val_images']:,} test images with {results['train_images']:,} "
        "train images as memory; the teacher's own k-NN is the nna row."
    )
    (out / "objectives.md").write_text(text + "\n" + note + "\n")
    print("\n=== objectives\n" + text + note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
