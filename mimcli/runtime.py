"""Device, precision, thread and seed decisions, made in one place (cuda -> mps -> cpu; bf16
autocast on CUDA, fp32 elsewhere), and the progress-callback types the library reports through."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from mimcli.errors import MimcliError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")

# progress(stage, done, total): feature extraction, probe, eval, low-shot, linear probe
Progress = Callable[[str, int, int], None]
# progress(stage, done, total, figures): training steps with their loss and images/s
StepProgress = Callable[[str, int, int, dict[str, float]], None]


def select_device(name: str = "auto") -> torch.device:
    """Resolve ``auto|cpu|cuda|mps`` (or ``cuda:N``) to an available torch device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MimcliError(f"--device {name}: no CUDA GPU is visible; use --device cpu or auto")
        return torch.device(name)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise MimcliError("--device mps: MPS is not available here; use --device cpu or auto")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise MimcliError(f"unknown --device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


MAX_WORKERS = 1024  # DataLoader worker processes; more is a typo


def resolve_workers(value: int | str) -> tuple[int, bool]:
    """``--num-workers``: a count, or ``auto`` = this process's share of the cores (under
    torchrun: usable cores / processes on this node, at least 1). Returns (count, whether it
    was asked for explicitly)."""
    if isinstance(value, int) or (str(value).isascii() and str(value).isdigit()):
        if not 0 <= int(value) <= MAX_WORKERS:
            raise MimcliError(f"--num-workers must lie in 0..{MAX_WORKERS}, got {value}")
        return int(value), True
    if str(value) != "auto":
        raise MimcliError(f"--num-workers must be a count or auto, got {value!r}")
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, usable_cores() // local), False


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's and FAISS's OpenMP thread counts explicitly (both ship their own OpenMP).

    Defaults to ``MIMCLI_THREADS`` or the number of usable cores.
    """
    if num_threads is None:
        env = os.environ.get("MIMCLI_THREADS")
        if env:
            num_threads = int(env)
        else:
            num_threads = usable_cores()
    num_threads = max(1, num_threads)
    torch.set_num_threads(num_threads)
    try:
        import faiss

        faiss.omp_set_num_threads(num_threads)
    except ImportError:
        pass
    return num_threads


@contextmanager
def rng_kept() -> Iterator[None]:
    """Run a block without moving python's, numpy's or torch's (CPU and CUDA) random state, so
    work done on one rank only (a probe) leaves every rank's next draw the same."""
    states = (random.getstate(), np.random.get_state())
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        try:
            yield
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch threads (many tiny ops, e.g. the linear-probe grid, are
    faster on one thread than split across busy cores), then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def faiss_threads(threads: int | None) -> Iterator[None]:
    """Cap FAISS's OpenMP threads at ``threads`` (None: leave them) and restore them after."""
    import faiss

    before = faiss.omp_get_max_threads()
    if threads is None or threads >= before:
        yield
        return
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def autocast(device: torch.device) -> torch.autocast:
    """The forward-pass precision: bf16 autocast on CUDA, fp32 (autocast disabled) elsewhere.
    Similarities and softmax are computed in fp32 by the losses themselves."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def precision_name(device: torch.device) -> str:
    """What :func:`autocast` does on ``device``, for config.json and banners."""
    return "bf16 autocast" if device.type == "cuda" else "fp32"
