"""Multi-process helpers for ``torchrun`` (DDP; NCCL on GPU, gloo on CPU). Single-process runs
go through the same calls, which then do nothing."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def backend() -> str | None:
    """The default process group's backend (``nccl``, ``gloo``), None when there is none."""
    if dist.is_available() and dist.is_initialized():
        return str(dist.get_backend())
    return None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the default process group; the gradient is the summed gradient of every rank.

    Each rank's output is the same sum, so d(sum_r L_r)/d(input_s) = sum_r dL_r/d(output).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over the default process group, differentiable (each rank's gradient is the
    sum of every rank's)."""
    return _AllReduceSum.apply(x)  # type: ignore[no-any-return]


def init_from_env(device: torch.device) -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return is_distributed()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    _created.append(True)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


_created: list[bool] = []  # whether init_from_env made the process group (then close() ends it)


def close(ended_well: bool) -> None:
    """End the process group :func:`init_from_env` made (nothing otherwise). After a run that
    ended well the ranks meet first, so no rank tears down its connections while another still
    uses them (gloo aborts a process whose peer vanished mid-exchange, "terminate called without
    an active exception"); after a failure each rank leaves on its own."""
    if not _created or not dist.is_initialized():
        return
    if ended_well and is_distributed():
        dist.barrier()
    dist.destroy_process_group()
    _created.clear()
    _control.clear()


def barrier() -> None:
    """Every rank waits for the others (nothing in one process)."""
    if is_distributed():
        dist.barrier()


def wait_for_rank0(hours: float = 24.0) -> None:
    """Every rank waits here until rank 0 arrives (nothing in one process), for work only rank 0
    does (a probe) that may outlast the process group's collective timeout (10 min on NCCL): the
    wait runs on a gloo group with a timeout of ``hours``."""
    if not is_distributed():
        return
    from datetime import timedelta

    group = dist.new_group(backend="gloo", timeout=timedelta(hours=hours))
    dist.barrier(group=group)
    dist.destroy_process_group(group)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every rank along dim 0; gradients flow back to each rank."""
    if not is_distributed():
        return x
    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():  # deprecated in torch 2.14 for a private replacement
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated")
        return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, no gradient (queue updates, metrics)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, small), in rank order; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank; ``obj`` itself in one process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the default process group in place (nothing in one process); no
    gradient, nothing read back to the host."""
    if is_distributed():
        dist.all_reduce(x)
    return x


_control: list[Any] = []  # the gloo group of control flags, made once


def agree_on_flags(flags: list[bool]) -> list[bool]:
    """Each flag OR-ed over ranks (``flags`` itself in one process): a host-side all-reduce on a
    gloo group (made on first use; every rank must call this at the same steps), so no device
    stream waits. The refine loop agrees on stop requests and timed checkpoints this way."""
    if not is_distributed():
        return flags
    if not _control:
        _control.append(dist.new_group(backend="gloo") if backend() != "gloo" else None)
    box = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_control[0])
    return [bool(v) for v in box.tolist()]


def check_identical(tensors: list[torch.Tensor], what: str) -> None:
    """Raise if ``tensors`` differ between ranks (they must stay identical under DDP)."""
    if not is_distributed() or not tensors:
        return
    total = torch.stack([t.detach().double().sum() for t in tensors]).sum().reshape(1)
    parts = gather(total.to(tensors[0].device))
    if not torch.allclose(parts, parts[0].expand_as(parts), rtol=1e-9, atol=0.0):
        raise RuntimeError(f"{what} diverged between ranks: checksums {parts.tolist()}")
