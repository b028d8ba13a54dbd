"""Run folders, the contract between ``refine``, ``eval`` and ``push``: ``config.json`` (written
first; its ``config`` part holds the options, read back on ``--resume``), ``metrics.jsonl``,
checkpoints, and the exported encoder in timm's layout. Everything is written atomically;
checkpoints are safetensors, never pickles.

A checkpoint is any nested structure of dicts/lists/tuples holding tensors, numpy arrays and JSON
scalars (model, heads, queues, optimiser, EMA, RNG states, step): tensors go into the safetensors
file, the structure into its metadata.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import sys
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mimcli._version import __version__
from mimcli.errors import MimcliError
from mimcli.fileio import atomic_path, io_error, rename_in, write_json, write_with

if TYPE_CHECKING:
    from torch import nn

# The names inside a run folder (the contract between refine, eval and push).
CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.safetensors"
PREV_CHECKPOINT = "checkpoint.prev.safetensors"  # the one before (unless --no-keep-previous)
SHARDED_CHECKPOINT = "checkpoint.dcp"  # refine --shard: a folder (mimcli.refine.sharding)
PREV_SHARDED = "checkpoint.dcp.prev"
SHARDED_TRAINER = "trainer.safetensors"  # in it: rank 0's part, written last
EXPORT = "export"
PROBE_DIR = "probe"  # refine --probe-train/--probe-val probes here; push reads it for the card
EVAL_DIR = "eval"  # where `mimcli eval BASE RUN --out RUN/eval` puts results; push reads them


def flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str = "t") -> Any:
    """Replace tensors/arrays in ``obj`` by references into ``tensors``; return the JSON part."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj)).clone()
        return {"__ndarray__": path}
    if isinstance(obj, dict):
        if not all(isinstance(k, str | int) for k in obj):
            raise TypeError(f"checkpoint dict keys must be str or int at {path}")
        return {"__dict__": [[k, flatten(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        items = [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, np.integer | np.floating):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint (at {path})")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def save_checkpoint(path: Path, state: dict[str, Any], previous: Path | None = None) -> None:
    """Write ``state`` as one safetensors file (temporary name, fsync, rename). ``previous``:
    where the file ``path`` held before goes (kept as a fallback)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten(state, tensors)
    metadata = {
        "format": "mimcli-checkpoint",
        "structure": json.dumps(structure),
        "mimcli_version": __version__,
        "crc32": tensors_crc32(tensors),
    }
    with atomic_path(path, keep_previous=previous) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except Exception as exc:  # a disk error as OSError, whoever reports it
            error = io_error(exc)
            if error is None:
                raise
            raise error from exc


def tensors_crc32(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 of the tensors' bytes in key order (one tensor on the host at a time): a
    checkpoint records it, so damaged data is found on reading, not trained on."""
    crc = 0
    for key in sorted(tensors):
        flat = tensors[key].detach().reshape(-1).cpu().contiguous()
        crc = zlib.crc32(key.encode("utf-8"), crc)
        crc = zlib.crc32(flat.view(torch.uint8).numpy() if flat.numel() else b"", crc)
    return f"{crc:08x}"


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:
        reason = " ".join(str(exc).split())  # one line
        raise MimcliError(f"cannot read checkpoint {path}: {reason}") from exc
    if metadata.get("format") != "mimcli-checkpoint":
        raise MimcliError(f"{path} is not a mimcli checkpoint")
    recorded = metadata.get("crc32")  # older checkpoints carry none
    if recorded is not None and recorded != tensors_crc32(tensors):
        raise MimcliError(
            f"cannot read checkpoint {path}: its data does not match the checksum it was "
            "written with (damaged on disk or in transfer)"
        )
    try:
        state = unflatten(json.loads(metadata["structure"]), tensors)
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise MimcliError(f"{path}: a damaged mimcli checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise MimcliError(f"{path}: a damaged mimcli checkpoint (not a mapping)")
    return state


def migrate_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """Checkpoints written before objectives existed hold NNA heads and queues apart; give them
    the ``objective`` entry of today's layout (in place; returned for convenience)."""
    if "objective" not in state:
        state["objective"] = {
            **{f"heads.{k}": v for k, v in state["heads"].items()},
            **{f"queues.{k}": v for k, v in state["queues"].items()},
            "_extra_state": {"lookup_gen": state["rng"]["lookup"]},
        }
    return state


def write_error(what: str, path: Path, exc: OSError) -> MimcliError:
    """The one line for a write that failed (disk full, file-size limit, I/O error)."""
    reason = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno or 0)
    hint = {
        "ENOSPC": "free some space",
        "EDQUOT": "free some space (disk quota)",
        "EFBIG": "raise the file-size limit (ulimit -f)",
        "EROFS": "make it writable",
    }.get(code or "", "fix the disk")
    named = f" ({code})" if code else ""
    return MimcliError(f"cannot write {what} {path}: {reason}{named}; {hint}")


def find_sharded(folder: Path) -> Path | None:
    """The complete sharded checkpoint ``folder``, or the previous one (``.old``) when a kill fell
    between the two renames that swap a new one in, or the one kept before it (``.prev``); None
    when there is none."""
    for candidate in (
        folder,
        folder.with_name(folder.name + ".old"),
        folder.with_name(PREV_SHARDED),
    ):
        if (candidate / SHARDED_TRAINER).is_file():
            return candidate
    return None


def environment() -> dict[str, str]:
    import timm

    return {
        "mimcli": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "argv": " ".join(sys.argv),
    }


class RunFolder:
    """The files of one run under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def at(cls, path: Path) -> RunFolder | None:
        """The run folder at ``path`` when it is one with an exported encoder, else None."""
        run = cls(Path(path))
        return run if run.config_path.is_file() and (run.export_dir / CONFIG).is_file() else None

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS

    @property
    def checkpoint_path(self) -> Path:
        return self.root / CHECKPOINT

    @property
    def prev_checkpoint_path(self) -> Path:
        return self.root / PREV_CHECKPOINT

    @property
    def sharded_checkpoint_path(self) -> Path:
        return self.root / SHARDED_CHECKPOINT

    def has_checkpoint(self) -> bool:
        """Whether a checkpoint to resume from is here (plain, or sharded by ``--shard``; the
        last one or the one kept before it)."""
        return (
            self.checkpoint_path.exists()
            or self.prev_checkpoint_path.exists()
            or find_sharded(self.sharded_checkpoint_path) is not None
        )

    def load_checkpoint(self) -> dict[str, Any]:
        """The last plain checkpoint; when it is missing or damaged (a kill between two renames,
        a truncated copy), the one kept before it, with a warning saying so."""
        path, prev = self.checkpoint_path, self.prev_checkpoint_path
        try:
            return load_checkpoint(path) if path.exists() else load_checkpoint(prev)
        except MimcliError as exc:
            if not prev.exists() or not path.exists():
                raise MimcliError(
                    f"{exc}; no earlier checkpoint is kept (--no-keep-previous): start the run "
                    "again without --resume, or into another --out"
                ) from None
            damage = str(exc)
        state = load_checkpoint(prev)
        warnings.warn(
            f"{damage}; resuming from the checkpoint before it ({prev.name}, stage "
            f"{state.get('stage')} step {state.get('done')})",
            stacklevel=2,
        )
        return state

    @property
    def probe_dir(self) -> Path:
        return self.root / PROBE_DIR

    @property
    def eval_dir(self) -> Path:
        return self.root / EVAL_DIR

    @property
    def export_dir(self) -> Path:
        return self.root / EXPORT

    def write_config(self, config: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.config_path, config)

    def read_config(self) -> dict[str, Any]:
        try:
            record = json.loads(self.config_path.read_text())
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: also bad UTF-8
            raise MimcliError(f"{self.root}: no readable config.json ({exc})") from exc
        if not isinstance(record, dict):
            raise MimcliError(f"{self.root}: config.json holds no JSON object; not a run folder")
        return record

    def saved_options(self) -> dict[str, Any] | None:
        """The options recorded in ``config.json`` (its ``config`` part), None if unreadable."""
        try:
            saved = json.loads(self.config_path.read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return None
        return saved if isinstance(saved, dict) else None

    def write_export(self, model: nn.Module, model_args: dict[str, Any]) -> Path:
        """``model`` in timm's Hugging Face layout (``config.json`` + ``model.safetensors``) as
        ``export/``, assembled beside it and renamed in."""
        from timm.models import save_for_hf

        target = self.export_dir
        tmp = target.with_name(target.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            save_for_hf(model, str(tmp), model_args=dict(model_args), safe_serialization=True)
            if target.exists():
                shutil.rmtree(target)
            rename_in(tmp, target)
        except Exception as exc:  # a disk error as OSError, whoever reports it
            error = io_error(exc)
            if error is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_error("the export", target, error) from None
        return target

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line (a single small write; a torn last line is skipped on read). A
        write that fails (disk full) is cut back off, so the file holds whole records only."""
        clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in record.items()}
        data = (json.dumps(clean) + "\n").encode("utf-8")
        fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:  # os.write may write part of it
                    view = view[os.write(fd, view) :]
            except OSError as exc:
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass
                raise write_error("a record to", self.metrics_path, exc) from None
        finally:
            os.close(fd)

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            step = record.get("step", 0) if isinstance(record, dict) else None
            if isinstance(step, int | float) and not isinstance(step, bool):  # else: not ours
                out.append(record)
        return out

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records beyond ``after_step`` (a resumed run writes them again)."""
        kept = [r for r in self.metrics() if r.get("step", -1) <= after_step]
        write_with(
            self.metrics_path,
            lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)),
        )
