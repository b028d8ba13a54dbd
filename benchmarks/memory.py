"""Peak memory of `mimcli probe` and `mimcli eval` as the train set grows (10k vs 60k images).

Each command runs as its own subprocess (``python -m mimcli.cli.app ...``) and is measured from
outside:

- peak RSS: ``ru_maxrss`` from ``os.wait4`` on that child. Linux reports the maximum over the
  child and the descendants it reaped (DataLoader workers), so workers are counted as a maximum,
  never summed;
- sampled every 0.1 s from /proc: the child's resident anonymous memory (heap: tensors, arrays)
  and file-backed memory (shared libraries and the memory-mapped feature files), and the
  proportional set size (PSS) summed over the child and its live worker processes (shared pages
  split between them, so the sum is not inflated by copy-on-write sharing);
- the size of the feature files on disk: every ``.npy`` under the run's private ``TMPDIR`` and
  ``MIMCLI_CACHE`` (both set to a fresh temporary folder, so runs are cold and the user's cache
  is left alone).

Peak GPU memory of a few refine steps (random ViT-B/16 and ViT-L/16) is measured only when CUDA
is available.

    flock /tmp/mimcli-bench.lock python -m benchmarks.memory --data /tmp/fmnist
    python -m benchmarks.memory --smoke
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._common import parser, save, setup_threads, table

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "examples" / "models" / "fmnist-mae-tiny"
DEFAULT_DATA = Path("data/fmnist")
MB = 1024 * 1024
SAMPLE_S = 0.1
LOG_TAIL = 3000


@dataclass
class Job:
    """One measured command."""

    command: str  # probe | eval
    train: int  # train images used
    val: int
    workers: str  # "0", "2", ... or "default"
    argv: list[str]
    root: Path  # private TMPDIR / MIMCLI_CACHE / log folder of this run


@dataclass
class Measurement:
    command: str
    train: int
    val: int
    workers: str
    rc: int = 0
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0  # ru_maxrss of the child (max over it and its reaped workers)
    peak_anon_mb: float = 0.0  # sampled RssAnon of the main process
    peak_file_mb: float = 0.0  # sampled RssFile of the main process
    peak_tree_pss_mb: float = 0.0  # sampled PSS summed over the main process and its workers
    max_processes: int = 0  # the main process plus live descendants, at most
    features_mb: float = 0.0  # largest total size of .npy feature files seen on disk
    samples: int = 0
    argv: list[str] = field(default_factory=list)


# --- /proc sampling ---------------------------------------------------------------------------


def _status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (via /proc/PID/task/TID/children)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except (OSError, ValueError):
                continue
            found.extend(kids)
            stack.extend(kids)
    return found


def _feature_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".npy"):
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass  # renamed or removed while we looked
    return total


def _sample(pid: int, m: Measurement, root: Path) -> None:
    status = _status_kb(pid)
    if not status:  # exited (a zombie has no memory lines)
        return
    m.samples += 1
    m.peak_anon_mb = max(m.peak_anon_mb, status.get("RssAnon", 0) / 1024)
    m.peak_file_mb = max(m.peak_file_mb, status.get("RssFile", 0) / 1024)
    tree = [pid, *_descendants(pid)]
    m.max_processes = max(m.max_processes, len(tree))
    m.peak_tree_pss_mb = max(m.peak_tree_pss_mb, sum(_pss_kb(p) for p in tree) / 1024)
    m.features_mb = max(m.features_mb, _feature_bytes(root) / MB)


# --- running ----------------------------------------------------------------------------------


def _env(root: Path, threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("tmp", "cache"):
        (root / name).mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = str(root / "tmp")  # extract_features' temporary memory maps go here
    env["MIMCLI_CACHE"] = str(root / "cache")  # and cached features (not with --no-cache)
    env["MPLBACKEND"] = "Agg"
    if threads is not None:
        env["MIMCLI_THREADS"] = str(threads)
    return env


def run_jobs(
    jobs: Sequence[Job], parallel: int = 1, threads: int | None = None
) -> list[Measurement]:
    """Run ``jobs`` (at most ``parallel`` at once), sampling each child until it is reaped."""
    results: dict[int, Measurement] = {}
    pending = list(enumerate(jobs))
    running: dict[int, tuple[int, subprocess.Popen, Measurement, float, Any]] = {}
    while pending or running:
        while pending and len(running) < parallel:
            i, job = pending.pop(0)
            log = open(job.root / "log.txt", "wb")  # noqa: SIM115 (closed when reaped)
            start = time.perf_counter()
            proc = subprocess.Popen(
                job.argv,
                cwd=REPO,
                env=_env(job.root, threads),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            m = Measurement(job.command, job.train, job.val, job.workers, argv=job.argv)
            running[proc.pid] = (i, proc, m, start, log)
        for pid, (i, proc, m, start, log) in list(running.items()):
            _sample(pid, m, jobs[i].root)
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done == 0:
                continue
            m.wall_s = time.perf_counter() - start
            m.rc = os.waitstatus_to_exitcode(status)
            proc.returncode = m.rc  # reaped here, so Popen must not wait for it again
            m.peak_rss_mb = usage.ru_maxrss / 1024  # kilobytes on Linux
            log.close()
            results[i] = m
            del running[pid]
        if running:
            time.sleep(SAMPLE_S)
    return [results[i] for i in range(len(jobs))]


def _mimcli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mimcli.cli.app", *args]


BASELINE_IMPORTS = (
    "import mimcli.cli.app, mimcli.probe, mimcli.evaluate.runner, mimcli.evaluate.lowshot, "
    "mimcli.evaluate.cluster, mimcli.evaluate.knn, mimcli.index, faiss"
)


def make_jobs(
    data: Path,
    model: str,
    plan: Sequence[tuple[str, str, int]],
    total_train: int,
    limit_val: int | None,
    val_count: int,
    protocols: str,
    scratch: Path,
    baseline: bool = False,
) -> list[Job]:
    """One job per (command, workers, train size) of ``plan``; with ``baseline`` first a process
    that only imports what the commands import (the floor every run starts from)."""
    jobs = []
    val = val_count if limit_val is None else min(limit_val, val_count)
    if baseline:
        root = scratch / "imports"
        root.mkdir(parents=True)
        jobs.append(Job("imports", 0, 0, "-", [sys.executable, "-c", BASELINE_IMPORTS], root))
    for command, w, n in plan:
        args = [command, model, "--train", str(data / "train"), "--val", str(data / "test")]
        if n < total_train:
            args += ["--limit-train", str(n)]
        if limit_val is not None:
            args += ["--limit-val", str(limit_val)]
        if w != "default":
            args += ["--num-workers", w]
        if command == "eval":
            args += ["--protocols", protocols, "--no-cache"]
        args.append("--json")
        root = scratch / f"{command}-w{w}-n{n}"
        root.mkdir(parents=True)
        jobs.append(Job(command, min(n, total_train), val, w, _mimcli(*args), root))
    return jobs


# --- data ---------------------------------------------------------------------------------------


def make_smoke_folder(root: Path, classes: int = 3, train: int = 20, val: int = 4) -> Path:
    """A tiny ImageFolder: ``classes`` classes of 28 px grey PNGs (``train``/``val`` per class)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(28, 28), dtype=np.uint8) // (c + 1)
                Image.fromarray(pixels, mode="L").save(folder / f"{i:03d}.png")
    return root


def _count_images(folder: Path) -> int:
    from mimcli.data import scan_folder

    return len(scan_folder(folder))


# --- GPU: refine steps --------------------------------------------------------------------------

GPU_CONFIGS: tuple[dict[str, Any], ...] = (
    {"arch": "vit_base_patch16_224", "batch_size": 64, "local_crops": 2},
    {"arch": "vit_base_patch16_224", "batch_size": 64, "local_crops": 10},
    {"arch": "vit_base_patch16_224", "batch_size": 256, "local_crops": 10},
    {"arch": "vit_large_patch16_224", "batch_size": 64, "local_crops": 10},
    {"arch": "vit_large_patch16_224", "batch_size": 64, "local_crops": 10, "grad_ckpt": True},
)
GPU_SMOKE_CONFIGS: tuple[dict[str, Any], ...] = (
    {"arch": "vit_base_patch16_224", "batch_size": 8, "local_crops": 2},
)


def _random_vit(arch: str, path: Path) -> Path:
    """A randomly initialised timm ViT saved as a bare state dict (mimcli reads the shapes)."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(arch, pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _noise_images(root: Path, count: int, size: int = 224) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = root / "noise"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return root


def refine_steps(
    model: Path,
    data: Path,
    out: Path,
    device: str,
    batch_size: int,
    local_crops: int,
    grad_ckpt: bool = False,
    steps: int = 3,
    num_workers: int = 4,
) -> float:
    """One head warm-up step and ``steps`` refinement steps on the last 4 blocks; seconds."""
    from mimcli.refine.config import RefineConfig
    from mimcli.refine.pipeline import run_refine

    cfg = RefineConfig(
        model=str(model),
        data=data,
        out=out,
        blocks="last4",
        head_steps=1,
        steps=steps,
        batch_size=batch_size,
        local_crops=local_crops,
        grad_checkpointing=grad_ckpt,
        queue_size="65536",
        device=device,
        num_workers=num_workers,
        checkpoint_every=10**9,
    )
    start = time.perf_counter()
    run_refine(cfg)
    return time.perf_counter() - start


def gpu_refine_memory(smoke: bool) -> dict[str, Any]:
    """Peak CUDA memory (allocated and reserved by torch) of a few refine steps per config."""
    import gc

    import torch

    if not torch.cuda.is_available():
        return {"measured": False, "reason": "not measured: no GPU", "configs": []}
    rows = []
    configs = GPU_SMOKE_CONFIGS if smoke else GPU_CONFIGS
    with tempfile.TemporaryDirectory(prefix="mimcli-bench-gpu-") as tmp:
        root = Path(tmp)
        data = _noise_images(root / "data", max(c["batch_size"] for c in configs) * 2)
        weights: dict[str, Path] = {}
        for i, c in enumerate(configs):
            arch = c["arch"]
            if arch not in weights:
                weights[arch] = _random_vit(arch, root / f"{arch}.safetensors")
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            seconds = refine_steps(
                weights[arch],
                data,
                root / f"run{i}",
                "cuda",
                c["batch_size"],
                c["local_crops"],
                c.get("grad_ckpt", False),
                steps=1 if smoke else 3,
            )
            rows.append(
                {
                    **c,
                    "grad_ckpt": c.get("grad_ckpt", False),
                    "peak_allocated_mb": torch.cuda.max_memory_allocated() / MB,
                    "peak_reserved_mb": torch.cuda.max_memory_reserved() / MB,
                    "seconds": seconds,
                }
            )
            shutil.rmtree(root / f"run{i}", ignore_errors=True)
    return {"measured": True, "device": torch.cuda.get_device_name(0), "configs": rows}


# --- main -------------------------------------------------------------------------------------


def _ratios(runs: Sequence[Measurement]) -> list[dict[str, Any]]:
    out = []
    keys = sorted({(m.command, m.workers) for m in runs}, key=lambda k: (k[0] != "probe", k))
    for command, workers in keys:
        group = sorted((m for m in runs if (m.command, m.workers) == (command, workers)),
                       key=lambda m: m.train)  # fmt: skip
        if len(group) < 2:
            continue
        small, large = group[0], group[-1]
        out.append(
            {
                "command": command,
                "workers": workers,
                "train_small": small.train,
                "train_large": large.train,
                "rss_small_mb": small.peak_rss_mb,
                "rss_large_mb": large.peak_rss_mb,
                "rss_ratio": large.peak_rss_mb / small.peak_rss_mb,
                "anon_ratio": large.peak_anon_mb / max(small.peak_anon_mb, 1e-9),
                "rss_growth_mb": large.peak_rss_mb - small.peak_rss_mb,
                "features_growth_mb": large.features_mb - small.features_mb,
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("Peak RSS of mimcli probe / eval on few vs many train images (subprocesses).")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageFolder with train/ test/")
    p.add_argument("--model", default=str(MODEL), help="MODEL argument of both commands")
    p.add_argument("--sizes", default="10000,60000", help="train sizes (capped at all images)")
    p.add_argument("--limit-val", type=int, default=2000, help="val images of every run")
    p.add_argument("--workers", default="0,default", help="--num-workers values ('default' = 2)")
    p.add_argument("--commands", default="probe,eval", help="probe and/or eval")
    p.add_argument("--protocols", default="knn,lowshot,cluster", help="eval --protocols")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU refine measurement")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    if any(c not in ("probe", "eval") for c in commands):
        p.error("--commands takes probe and/or eval")

    with tempfile.TemporaryDirectory(prefix="mimcli-bench-memory-") as tmp:
        scratch = Path(tmp)
        if args.smoke:
            # Every run is a fresh interpreter (~3 s of imports alone), so the smoke test keeps to
            # three small runs side by side: probe on 20 and 60 images, eval on 60.
            data = make_smoke_folder(scratch / "data")
            total_train, val_count = 60, 12
            plan = [("probe", "0", 20), ("probe", "0", 60), ("eval", "0", 60)]
            limit_val, parallel, baseline = None, 3, False
        else:
            data = args.data
            if not ((data / "train").is_dir() and (data / "test").is_dir()):
                print(
                    f"{data}: no Fashion-MNIST ImageFolder (train/, test/). Make it with "
                    f"`make fmnist DATA={data}` or "
                    f"`python examples/export_fashion_mnist.py --out {data}`, or pass --data DIR.",
                    file=sys.stderr,
                )
                return 2
            total_train = _count_images(data / "train")
            val_count = _count_images(data / "test")
            sizes = sorted({min(int(s), total_train) for s in args.sizes.split(",")})
            plan = [(c, w, n) for c in commands for w in workers for n in sizes]
            limit_val, parallel, baseline = args.limit_val, 1, True
        jobs = make_jobs(
            data,
            args.model,
            plan,
            total_train,
            limit_val,
            val_count,
            args.protocols,
            scratch / "runs",
            baseline=baseline,
        )
        print(f"{len(jobs)} runs, {parallel} at a time", flush=True)
        runs = run_jobs(jobs, parallel=parallel, threads=args.threads)
        failed = [(j, m) for j, m in zip(jobs, runs, strict=True) if m.rc != 0]
        for job, m in failed:
            tail = (job.root / "log.txt").read_text(errors="replace")[-LOG_TAIL:]
            print(f"FAILED (rc {m.rc}): {' '.join(job.argv)}\n{tail}", file=sys.stderr)
        if failed:
            return 1

    rows = [
        (
            m.command,
            m.train,
            m.val,
            m.workers,
            m.peak_rss_mb,
            m.peak_anon_mb,
            m.peak_file_mb,
            m.peak_tree_pss_mb,
            m.max_processes,
            m.features_mb,
            m.wall_s,
        )
        for m in runs
    ]
    print(
        table(
            "Peak memory per command (MB; features = .npy files on disk)",
            [
                "command",
                "train",
                "val",
                "workers",
                "peak RSS",
                "RssAnon",
                "RssFile",
                "tree PSS",
                "procs",
                "features",
                "wall s",
            ],
            rows,
        )
    )
    ratios = _ratios(runs)
    if ratios:
        print()
        print(
            table(
                "Large / small train set",
                [
                    "command",
                    "workers",
                    "train",
                    "peak RSS",
                    "ratio",
                    "+RSS",
                    "anon ratio",
                    "+features",
                ],
                [
                    (
                        r["command"],
                        r["workers"],
                        f"{r['train_small']} -> {r['train_large']}",
                        f"{r['rss_small_mb']:.0f} -> {r['rss_large_mb']:.0f}",
                        r["rss_ratio"],
                        r["rss_growth_mb"],
                        r["anon_ratio"],
                        r["features_growth_mb"],
                    )
                    for r in ratios
                ],
            )
        )

    gpu = {"measured": False, "reason": "skipped (--no-gpu)", "configs": []}
    if not args.no_gpu:
        gpu = gpu_refine_memory(args.smoke)
    print()
    if gpu["measured"]:
        print(
            table(
                f"Peak GPU memory of refine steps ({gpu['device']}, MB)",
                ["arch", "batch", "local crops", "grad ckpt", "allocated", "reserved", "s"],
                [
                    (
                        c["arch"],
                        c["batch_size"],
                        c["local_crops"],
                        c["grad_ckpt"],
                        c["peak_allocated_mb"],
                        c["peak_reserved_mb"],
                        c["seconds"],
                    )
                    for c in gpu["configs"]
                ],
            )
        )
    else:
        print(f"Peak GPU memory of refine: {gpu['reason']}")

    path = save(
        "memory",
        args.out,
        {
            "smoke": args.smoke,
            "data": str(args.data) if not args.smoke else "generated (smoke)",
            "model": args.model,
            "method": {
                "peak_rss": "ru_maxrss from os.wait4 on the command's process: the maximum over "
                "it and the worker processes it reaped (workers are not summed)",
                "sampled": f"every {SAMPLE_S} s from /proc: RssAnon/RssFile of the main process, "
                "PSS summed over the main process and its live workers",
                "features": "largest total size of .npy files under the run's TMPDIR and "
                "MIMCLI_CACHE (fresh temporary folders)",
            },
            "runs": [asdict(m) for m in runs],
            "ratios": ratios,
            "gpu_refine": gpu,
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
