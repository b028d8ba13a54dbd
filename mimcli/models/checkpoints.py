"""Read checkpoint files without unpickling arbitrary objects.

``.safetensors`` files are read directly. Pickle-based files (``.pth``, ``.pt``, ``.th``, ``.bin``)
go through ``torch.load(weights_only=True)``; training frameworks (fairseq, MAE, the MIM-Refiner
code) also pickle config objects beside the weights, so every non-tensor class the file names is
mapped to an inert placeholder that runs no code and keeps what the pickle hands it as plain data;
``plain_config`` reads such configs (argparse ``Namespace``, OmegaConf ``DictConfig``) as dicts.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mimcli.errors import MimcliError

PICKLE_SUFFIXES = {".pth", ".pt", ".th", ".bin", ".ckpt", ".tar"}


class OpaqueObject:
    """Stand-in for a pickled class we refuse to import. It runs no code from the file; what the
    pickle hands it stays as inert data: constructor arguments in ``args``, ``BUILD`` state (an
    object's ``__dict__``, or what its ``__getstate__`` returned) in ``state``. Each pickled name
    gets its own subclass whose ``pickled_name`` says what the file meant (e.g.
    ``omegaconf.dictconfig.DictConfig``)."""

    pickled_name = "?"
    args: tuple[Any, ...] = ()
    state: Any = None

    def __new__(cls, *args: Any, **kwargs: Any) -> OpaqueObject:
        obj = super().__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<inert {self.pickled_name}>"


_STUBS: dict[str, type[OpaqueObject]] = {}


def _stub_class(name: str) -> type[OpaqueObject]:
    if name not in _STUBS:
        # a class name from the file: any character (a NUL one made type() raise ValueError)
        leaf = re.sub(r"\W", "_", name.rsplit(".", 1)[-1]) or "Stub"
        _STUBS[name] = type(leaf, (OpaqueObject,), {"pickled_name": name})
    return _STUBS[name]


def _stub_function(name: str) -> Any:
    """Functions named in the file (argparse/copyreg reconstructors, ``builtins.eval`` in a
    hostile file) become a factory that keeps the call's arguments as data and calls nothing."""

    def factory(*args: Any, **kwargs: Any) -> OpaqueObject:
        return _stub_class(name)(*args)

    factory.__name__ = factory.__qualname__ = re.sub(r"\W", "_", name.rsplit(".", 1)[-1])
    return factory


# How deep ``plain_config`` follows nested configs (fairseq nests about 3 levels).
MAX_CONFIG_DEPTH = 16


def plain_config(obj: Any, depth: int = 0) -> Any:
    """A pickled config as plain dicts, lists and scalars.

    Inert stubs become their kept state: an OmegaConf container (state with ``_content``) its
    content, an OmegaConf value node (state with ``_val``) its value, any other object (e.g. an
    argparse ``Namespace``) the dict of its public attributes. Private attributes (OmegaConf's
    ``_parent`` back-references among them) are skipped, so cycles are never followed; tensors
    pass through unchanged. Nothing is imported or called.
    """
    if depth > MAX_CONFIG_DEPTH:
        return None
    if isinstance(obj, OpaqueObject):
        state = obj.state
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            return None
        if "_content" in state:
            return plain_config(state["_content"], depth + 1)
        if "_val" in state:
            return plain_config(state["_val"], depth + 1)
        return {
            k: plain_config(v, depth + 1)
            for k, v in state.items()
            if isinstance(k, str) and not k.startswith("_")
        }
    if isinstance(obj, dict):
        return {k: plain_config(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_config(v, depth + 1) for v in obj]
    return obj


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
        except (SafetensorError, OSError) as exc:  # the header's own text may hold line breaks
            text = " ".join(str(exc).split())
            raise MimcliError(f"cannot read {path} as safetensors: {text}") from exc
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (RuntimeError, OSError, zipfile.BadZipFile, ValueError, EOFError, UnpicklingError):
        unsafe = []  # legacy (non-zip) format: load below refuses unknown globals by itself
    stubs: list[Any] = []
    for name in unsafe:
        # Classes become inert OpaqueObjects; functions a factory that calls nothing.
        leaf = name.rsplit(".", 1)[-1]
        if leaf[:1].isupper():
            stubs.append((_stub_class(name), name))
        else:
            stubs.append((_stub_function(name), name))
            stubs.append(_stub_class(name))  # what the factory returns may receive BUILD state
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
