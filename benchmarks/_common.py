"""Shared helpers: machine description, timing, tables and JSON results."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="minimal sizes: checks the script runs")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result")
    p.add_argument("--threads", type=int, default=None, help="torch/FAISS threads (default: all)")
    return p


def setup_threads(threads: int | None) -> int:
    from mimcli.runtime import configure_threads

    return configure_threads(threads)


def machine() -> dict[str, Any]:
    """What the figures came from."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        info["faiss"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sync(device: Any = None) -> None:
    import torch

    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1, device: Any = None) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
        sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (also valid Markdown)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]

    def line(vals: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"

    out = [
        f"### {title}",
        "",
        line(list(columns)),
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    out += [line(r) for r in cells]
    return "\n".join(out)


def save(name: str, out: Path, payload: dict[str, Any]) -> Path:
    """``out/name.json`` with the machine description, written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    data = {
        "benchmark": name,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        **payload,
    }
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path
