"""``refine --shard``: torch's FSDP2 (``fully_shard``) over the refine step, the encoder EMA
sharded the same way, sharded checkpoints through ``torch.distributed.checkpoint`` and the full
EMA gathered for the export.

What gets sharded: every transformer block of the encoder (and of the objective's momentum
encoder or decoder) is its own FSDP unit, then the root is the
:class:`~mimcli.refine.engine.StepModule` (encoder stem, final norm, the objective's heads,
projectors and the rest of its momentum networks), so everything ``objective.step`` touches is
gathered by the root's forward (the objectives call ``forward_intermediates``, ``patch_embed``
and ``blocks`` directly, never ``encoder.forward()``). The EMA is a copy of the encoder sharded
with the same units; its update is a local ``lerp_`` of matching shards. Frozen teachers are not
modules of the objective and stay whole on every rank.

Checkpoints are a folder (``checkpoint.dcp``): ``torch.distributed.checkpoint`` writes every
rank's shards as safetensors (its Hugging Face storage: no pickles), and rank 0 writes
``trainer.safetensors`` with the step, random states and the structure of the state. The folder
is assembled as ``checkpoint.dcp.partial`` and renamed in, so a kill leaves the previous one
whole. It resumes on the same number of processes. On several nodes, ``--out`` must be on a
filesystem every node sees.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimcli import distributed as dist
from mimcli.errors import MimcliError
from mimcli.fileio import rename_in
from mimcli.runs import (
    PREV_SHARDED,
    SHARDED_TRAINER,
    find_sharded,  # noqa: F401  (re-exported: callers look for a checkpoint here)
    load_checkpoint,
    save_checkpoint,
    unflatten,
    write_error,
)

SHARD_MODES = ("auto", "on", "off")
SHARDS = "shards"  # DCP's safetensors files, inside the checkpoint folder
TRAINER = SHARDED_TRAINER  # rank 0's part: step, RNG, knn log, the state's structure


def state_bytes(encoder: nn.Module, objective: nn.Module) -> int:
    """fp32 bytes of what sharding splits: parameters, gradients and AdamW's two moments of
    everything trained, plus the encoder EMA."""
    params = sum(p.numel() for p in encoder.parameters()) + sum(
        p.numel() for p in objective.parameters()
    )
    trained = sum(p.numel() for p in encoder.parameters() if p.requires_grad) + sum(
        p.numel() for p in objective.parameters() if p.requires_grad
    )
    ema = sum(p.numel() for p in encoder.parameters())
    return 4 * (params + trained + 2 * trained + ema)


def resolve_shard(mode: str, device: torch.device, world: int, needed: int) -> tuple[bool, str]:
    """Whether to shard and why (config.json and the banner say it).

    ``auto`` shards when ``needed`` (see :func:`state_bytes`) exceeds half of the GPU's memory;
    on the CPU never unless asked (``on``). One process has nothing to shard over.
    """
    if mode not in SHARD_MODES:
        raise MimcliError(f"--shard must be one of {', '.join(SHARD_MODES)}, got {mode!r}")
    if world <= 1:
        return False, "one process: nothing to shard over" if mode == "on" else "one process"
    if mode == "on":
        return True, f"--shard on: FSDP2 over {world} processes"
    if mode == "off":
        return False, "--shard off: DDP"
    if device.type != "cuda":
        return False, f"--shard auto: DDP (on {device.type}, sharding only with --shard on)"
    # every rank must decide alike (nodes may hold different GPUs): the smallest one decides
    total = min(dist.gather_objects(torch.cuda.get_device_properties(device).total_memory))
    gib = 1024**3
    if needed > total / 2:
        return True, (
            f"--shard auto: parameters, gradients, AdamW and EMA need {needed / gib:.1f} GiB, "
            f"over half of the GPU's {total / gib:.0f} GiB: FSDP2"
        )
    return False, (
        f"--shard auto: parameters, gradients, AdamW and EMA need {needed / gib:.1f} GiB, "
        f"under half of the GPU's {total / gib:.0f} GiB: DDP"
    )


def shard(step_module: nn.Module, ema: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 in place: the encoder's blocks, then the step module as the root; the EMA (a copy
    of the encoder made before) gets the same units, so its shards match the encoder's.
    Returns ``step_module``, now an FSDP module (its parameters are DTensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.world_size(),))
    encoder = step_module.encoder
    block_types = {type(block) for block in encoder.blocks}  # type: ignore[union-attr]
    for block in encoder.blocks:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh)
    # the objective's own stacks of such blocks (ConMIM's momentum encoder, MR-MAE's decoder)
    # are units too, or the root would gather them whole every step
    for module in step_module.objective.modules():
        if type(module) in block_types:
            fully_shard(module, mesh=mesh)
    fully_shard(step_module, mesh=mesh)
    for block in ema.blocks:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh)
    fully_shard(ema, mesh=mesh)
    return step_module


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every DTensor gathered whole (a collective: every rank calls
    it), on the CPU."""
    from torch.distributed.tensor import DTensor

    out = {}
    for key, value in module.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        out[key] = value.detach().cpu()
    return out


def local_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Plain tensors only (replicated on every rank; DTensor shards differ by design)."""
    from torch.distributed.tensor import DTensor

    return [t for t in tensors if not isinstance(t, DTensor)]


# --- checkpoints -----------------------------------------------------------------------------


def _split(obj: Any, tensors: dict[str, torch.Tensor], path: str = "t") -> Any:
    """Like :func:`mimcli.runs.flatten`, but the tensors stay as they are (DTensors, on their
    device): DCP writes them."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _split(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        items = [_split(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a sharded checkpoint (at {path})")


def save_sharded(
    folder: Path, sharded: dict[str, Any], trainer: dict[str, Any], keep_previous: bool = True
) -> None:
    """Write ``sharded`` (state dicts holding DTensors; every rank calls this) with DCP and
    ``trainer`` (rank 0's small state) into ``folder``, atomically; the folder it replaces is
    kept as ``checkpoint.dcp.prev`` when ``keep_previous``."""
    import torch.distributed.checkpoint as dcp

    partial = folder.with_name(folder.name + ".partial")
    if dist.rank() == 0 and partial.exists():
        shutil.rmtree(partial)
    dist.barrier()
    tensors: dict[str, torch.Tensor] = {}
    structure = _split(sharded, tensors)
    dcp.save(
        tensors,
        storage_writer=dcp.HuggingFaceStorageWriter(str(partial / SHARDS), save_distributed=True),
    )
    error = None
    if dist.rank() == 0:
        try:
            save_checkpoint(
                partial / TRAINER,
                {**trainer, "sharded_structure": structure, "world_size": dist.world_size()},
            )
            old = folder.with_name(folder.name + ".old")
            prev = folder.with_name(PREV_SHARDED)
            if folder.exists():
                if old.exists():  # left by a kill after the last swap; `folder` is whole
                    shutil.rmtree(old)
                folder.rename(old)
            rename_in(partial, folder)
            if prev.exists():
                shutil.rmtree(prev)
            if old.exists():
                if keep_previous:
                    old.rename(prev)
                else:
                    shutil.rmtree(old)
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            error = str(write_error("the sharded checkpoint", folder, exc))
    # rank 0's outcome reaches every rank (none waits forever on a failed one), then every rank
    # must see the checkpoint: its shards went to a folder only its own node may see otherwise
    outcome = dist.gather_objects(error)[0]
    if outcome is not None:
        raise MimcliError(outcome)
    if not all(dist.gather_objects((folder / TRAINER).is_file())):
        raise MimcliError(
            f"{folder} is not visible to every process: with several nodes, --out must be on a "
            "filesystem every node sees"
        )


def _collect_paths(structure: Any, out: dict[str, Any]) -> None:
    """The tensor paths a saved structure refers to (keys of ``out``)."""
    if isinstance(structure, dict):
        if "__tensor__" in structure:
            out[structure["__tensor__"]] = None
            return
        for value in structure.values():
            _collect_paths(value, out)
    elif isinstance(structure, list):
        for value in structure:
            _collect_paths(value, out)


def load_sharded(
    folder: Path, template_for: Callable[[dict[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_sharded` on the same number of processes.

    ``template_for(trainer)`` returns state dicts shaped like the saved ones (today's, built for
    the saved stage; DTensors sharded like the saved ones): their tensors are filled in place.
    Returns the trainer state with the loaded state dicts under ``"sharded"``."""
    candidates = [
        c
        for c in (folder, folder.with_name(folder.name + ".old"), folder.with_name(PREV_SHARDED))
        if (c / TRAINER).is_file()
    ]
    if not candidates:
        raise MimcliError(f"--resume: no sharded checkpoint in {folder.parent}")
    first: str | None = None
    for found in candidates:  # the last one, else the one kept before it (every rank alike)
        try:
            state = _load_sharded_from(found, folder, template_for)
        except _Unreadable as exc:
            first = first or str(exc)
            continue
        if found != candidates[0]:
            warnings.warn(
                f"{first}; resuming from the checkpoint before it ({found.name}, stage "
                f"{state.get('stage')} step {state.get('done')})",
                stacklevel=2,
            )
        return state
    raise MimcliError(first)


class _Unreadable(MimcliError):
    """A sharded checkpoint that cannot be read (damaged, or not this model's)."""


def _load_sharded_from(
    found: Path, folder: Path, template_for: Callable[[dict[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    try:
        trainer = load_checkpoint(found / TRAINER)
        saved_world = int(trainer.pop("world_size"))
        trainer["sharded_structure"]  # noqa: B018  (present in every sharded checkpoint)
    except MimcliError as exc:
        raise _Unreadable(str(exc)) from None
    except (KeyError, TypeError, ValueError):
        raise _Unreadable(f"{found / TRAINER} is not a whole sharded checkpoint") from None
    if saved_world != dist.world_size():
        raise MimcliError(
            f"--resume: the sharded checkpoint was written by {saved_world} processes, this run "
            f"has {dist.world_size()}; resume with --nproc-per-node/--nnodes giving "
            f"{saved_world} processes"
        )
    tensors: dict[str, torch.Tensor] = {}
    _split(template_for(trainer), tensors)
    saved = trainer.pop("sharded_structure")
    saved_keys: dict[str, Any] = {}
    _collect_paths(saved, saved_keys)
    # the template may hold more (optimiser state for parameters that never got a gradient,
    # e.g. blocks after the deepest head), never less
    unknown = sorted(set(saved_keys) - set(tensors))
    misfit = (
        f"--resume: the checkpoint in {folder.parent} does not fit this model and options "
        "({}); resume with the run's MODEL and options (see its config.json)"
    )
    if unknown:
        raise MimcliError(misfit.format(f"e.g. {', '.join(unknown[:3])}"))
    wanted = {k: tensors[k] for k in saved_keys}
    try:
        dcp.load(wanted, storage_reader=dcp.HuggingFaceStorageReader(str(found / SHARDS)))
    except (Exception, dcp.api.CheckpointException) as exc:  # a BaseException, gathered from
        # every rank's failure by DCP: all ranks raise alike (damaged shards, other shapes)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise _Unreadable(misfit.format(lines[-1] if lines else type(exc).__name__)) from None
    trainer["sharded"] = unflatten(saved, tensors)
    return trainer
