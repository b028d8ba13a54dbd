"""Read checkpoint files without unpickling arbitrary objects.

``.safetensors`` files are read directly. Pickle-based files (``.pth``, ``.pt``, ``.th``, ``.bin``)
go through ``torch.load(weights_only=True)``; training frameworks (fairseq, the MIM-Refiner code)
also pickle config objects beside the weights, so every non-tensor class the file names is mapped
to an inert placeholder that stores nothing and runs no code.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mimcli.errors import MimcliError

PICKLE_SUFFIXES = {".pth", ".pt", ".th", ".bin", ".ckpt", ".tar"}


class OpaqueObject:
    """Stand-in for a pickled class we refuse to import: accepts any state, keeps none of it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


def _opaque_factory(*args: Any, **kwargs: Any) -> OpaqueObject:
    return OpaqueObject()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file as a dict, never executing code from it.

    Args:
        path: a ``.safetensors`` file or a torch pickle (zip or legacy format).

    Returns:
        The top-level dict (for safetensors: name -> tensor).
    """
    path = Path(path)
    if not path.is_file():
        raise MimcliError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError) as exc:
            raise MimcliError(f"cannot read {path} as safetensors: {exc}") from exc
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (RuntimeError, OSError, zipfile.BadZipFile, ValueError, EOFError):
        unsafe = []  # legacy (non-zip) format: load below refuses unknown globals by itself
    stubs: list[Any] = []
    for name in unsafe:
        # Classes become OpaqueObject; functions (e.g. argparse reconstructors) a no-op factory.
        leaf = name.rsplit(".", 1)[-1]
        stub = OpaqueObject if leaf[:1].isupper() else _opaque_factory
        stubs.append((stub, name))
    try:
        with torch.serialization.safe_globals(stubs):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt/unsupported pickles
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MimcliError(
            f"cannot read {path} as a weights-only torch checkpoint ({first}); "
            "convert it to safetensors or a plain state dict"
        ) from exc
    if isinstance(obj, dict):
        return obj
    raise MimcliError(f"{path} holds a {type(obj).__name__}, expected a dict of weights")


def tensors_only(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Keep the tensor entries of a (flat) state dict."""
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
