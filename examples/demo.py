"""The main job end to end on the embedded default: probe -> refine -> eval -> push --dry-run.

`make demo` runs this with the shipped tiny Fashion-MNIST MAE (examples/models/fmnist-mae-tiny).
Every step is a plain `mimcli` command, printed before it runs, so the demo doubles as a recipe:

    python examples/demo.py --out runs/demo

Images: Fashion-MNIST from Debian's `dataset-fashion-mnist` package when it is installed (60,000
train / 10,000 test; `make demo` installs it where apt is available and it runs as root),
otherwise the 5,000 / 1,000 subset shipped in examples/data/. The summary says which was used.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
SUBSET = HERE / "data" / "fashion-mnist-subset.npz"
MODEL = HERE / "models" / "fmnist-mae-tiny"

# The refine recipe measured on 2 CPU cores (README): 30 head warm-up steps, 90 refinement steps
# of batch 256 on the last 4 blocks (what the probe recommends for this model).
REFINE_RECIPE = [
    "--head-steps", "30", "--head-lr", "2e-3", "--steps", "90", "--lr", "1e-3",
    "--batch-size", "256", "--local-crops", "2", "--queue-size", "16384",
]  # fmt: skip


def bin_path(name: str) -> str:
    """The executable beside this Python (the demo's venv), else on PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def step(title: str, args: list[str], timings: dict[str, float]) -> None:
    print(f"\n=== {title}\n$ {shlex.join(args)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT)
    timings[title] = time.perf_counter() - start
    if done.returncode != 0:
        print(f"demo: step '{title}' failed (exit {done.returncode})", file=sys.stderr)
        raise SystemExit(done.returncode)


def have_idx(idx_dir: Path) -> bool:
    return (idx_dir / "train-images-idx3-ubyte.gz").is_file() or (
        idx_dir / "train-images-idx3-ubyte"
    ).is_file()


def prepare_data(args: argparse.Namespace, timings: dict[str, float]) -> tuple[Path, str]:
    """Export Fashion-MNIST to an ImageFolder tree (once: later runs find it complete)."""
    export = [sys.executable, str(HERE / "export_fashion_mnist.py")]
    if have_idx(args.idx_dir):
        data = args.data
        source = f"Fashion-MNIST from Debian's dataset-fashion-mnist ({args.idx_dir})"
        step("data", [*export, "--idx-dir", str(args.idx_dir), "--out", str(data)], timings)
    else:
        data = args.data.with_name(args.data.name + "-subset")
        source = (
            f"the Fashion-MNIST subset shipped in {SUBSET.relative_to(ROOT)} (Debian's "
            "dataset-fashion-mnist is not installed: `sudo apt-get install dataset-fashion-mnist` "
            "for all 70,000 images)"
        )
        step("data", [*export, "--npz", str(SUBSET), "--out", str(data)], timings)
    return data, source


def count_images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*.png"))


def summary(out: Path, results: dict, source: str, timings: dict[str, float]) -> str:
    base, refined = results["models"][0], results["models"][1]

    def row(label: str, get) -> str:
        a, b = get(base), get(refined)
        return f"| {label:<24} | {a:>8.2f} | {b:>8.2f} | {b - a:>+7.2f} |"

    lines = [
        f"Data: {source}",
        f"k-NN memory: {results['train_images']} train images; queries: all "
        f"{results['val_images']} test images.",
        "",
        f"| {'metric':<24} | {'base':>8} | {'refined':>8} | {'change':>7} |",
        f"|{'-' * 26}|{'-' * 10}|{'-' * 10}|{'-' * 9}|",
        row("k-NN CLS (k=20) %", lambda m: m["knn"]["cls"]["20"]),
        row("k-NN mean patch (k=20) %", lambda m: m["knn"]["patch"]["20"]),
        row("5-shot %", lambda m: m["lowshot"]["5-shot"]["mean"]),
        row("cluster NMI", lambda m: m["cluster"]["nmi"]),
        "",
        "Time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + f"; total {sum(timings.values()) / 60:.1f} min",
        "",
        "Outputs:",
        f"  {out / 'probe'}/probe.json, probe.png      per-block k-NN of the base model",
        f"  {out / 'refine'}/config.json, metrics.jsonl  the refine run (checkpoint.safetensors)",
        f"  {out / 'refine' / 'export'}/                 the refined encoder, timm layout",
        f"  {out / 'refine' / 'eval'}/results.json, *.png  base vs refined, every metric",
        f"  {out / 'hub'}/README.md                    the model card `mimcli push` would upload",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--data", type=Path, default=Path("data/fmnist"))
    parser.add_argument("--idx-dir", type=Path, default=IDX_DIR)
    parser.add_argument("--model", default=str(MODEL.relative_to(ROOT)))
    parser.add_argument(
        "--knn-train",
        type=int,
        default=20000,
        help="class-balanced train images in the eval's k-NN memory (0 = all)",
    )
    args = parser.parse_args()
    mimcli = bin_path("mimcli")
    out: Path = args.out
    timings: dict[str, float] = {}
    data, source = prepare_data(args, timings)
    train, test = data / "train", data / "test"
    n_train = count_images(train)
    step(
        "probe",
        [mimcli, "probe", args.model, "--train", str(train), "--val", str(test), "--k", "20",
         "--limit-train", str(min(10000, n_train)), "--limit-val", "2000",
         "--out", str(out / "probe")],
        timings,
    )  # fmt: skip
    run = out / "refine"
    if run.exists():
        print(f"\n(removing the previous demo run {run})")
        shutil.rmtree(run)
    step(
        "refine",
        [mimcli, "refine", args.model, "--data", str(train), "--out", str(run),
         "--blocks", "auto", "--probe", str(out / "probe" / "probe.json"), *REFINE_RECIPE],
        timings,
    )  # fmt: skip
    limit = [] if not args.knn_train or args.knn_train >= n_train else [
        "--limit-train", str(args.knn_train)
    ]  # fmt: skip
    step(
        "eval",
        [mimcli, "eval", args.model, str(run), "--train", str(train), "--val", str(test),
         *limit, "--protocols", "knn,lowshot,cluster", "--out", str(run / "eval")],
        timings,
    )  # fmt: skip
    step(
        "push",
        [mimcli, "push", str(run), "--dry-run", "--to", str(out / "hub"),
         "--probe", str(out / "probe"), "--dataset", "zalando-datasets/fashion_mnist"],
        timings,
    )  # fmt: skip
    results = json.loads((run / "eval" / "results.json").read_text())
    text = summary(out, results, source, timings)
    (out / "summary.md").write_text(text + "\n")
    print("\n=== before / after\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
