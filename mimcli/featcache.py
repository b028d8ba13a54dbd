"""On-disk cache of extracted features, keyed by (model weights and structure, image folder,
transform, blocks).

The key changes when any of them changes: the weights are hashed together with what they do not
show (architecture, class, attention-head count: the same weights with another head count give
other features), the folder is fingerprinted by
every file's relative path, size and modification time, the transform by its resolved config.
Entries are written to a temporary folder and renamed, so a killed run never leaves half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mimcli.data import ImageList
from mimcli.features import FeatureSet, extract_features
from mimcli.fileio import cache_dir, write_json
from mimcli.models.build import model_num_heads
from mimcli.runtime import Progress

CACHE_VERSION = 1


def weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_structure(model: nn.Module) -> dict[str, Any]:
    """What shapes the features besides the weights."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        "class": type(model).__name__,
        "architecture": cfg.get("architecture"),
        "num_heads": model_num_heads(model),
    }


def folder_digest(images: ImageList) -> str:
    """What the images are: files (name, size, mtime) and labels; for a dataset or shards, the
    reader's fingerprint (or its index), the rows and labels."""
    digest = hashlib.sha256()
    if images.reader is not None:
        fingerprint = getattr(images.reader, "fingerprint", None)
        ident = fingerprint() if fingerprint else json.dumps(images.reader.index_key)
        digest.update(f"{images.root}\0{ident}\n".encode())
        rows = np.arange(len(images)) if images.rows is None else np.asarray(images.rows)
        digest.update(rows.astype(np.int64).tobytes())
        digest.update(np.asarray(images.labels, dtype=np.int64).tobytes())
        digest.update("\0".join(images.classes).encode())
        return digest.hexdigest()
    for path, label in zip(images.paths, images.labels, strict=True):
        st = os.stat(path)
        rel = os.path.relpath(path, images.root)
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    digest.update("\0".join(images.classes).encode())
    return digest.hexdigest()


def cache_key(
    model: nn.Module,
    images: ImageList,
    transform_cfg: dict[str, Any],
    blocks: Sequence[int],
    dtype: str,
) -> str:
    spec = {
        "version": CACHE_VERSION,
        "weights": weights_digest(model),
        "structure": model_structure(model),
        "images": folder_digest(images),
        "transform": {
            k: list(v) if isinstance(v, tuple) else v for k, v in sorted(transform_cfg.items())
        },
        "blocks": list(blocks),
        "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def _load(entry: Path) -> FeatureSet:
    meta = json.loads((entry / "meta.json").read_text())

    def arr(name: str) -> np.ndarray | None:
        path = entry / f"{name}.npy"
        return np.load(path, mmap_mode="r") if path.exists() else None

    return FeatureSet(
        blocks=meta["blocks"],
        cls=arr("cls"),
        patch=arr("patch"),  # type: ignore[arg-type]
        cls_norm=arr("cls_norm"),
        patch_norm=arr("patch_norm"),
        labels=np.load(entry / "labels.npy"),
        paths=meta["paths"],
        skipped=meta["skipped"],
        seconds=0.0,
        directory=entry,
    )


def cached_features(
    model: nn.Module,
    images: ImageList,
    transform: Callable,
    transform_cfg: dict[str, Any],
    blocks: Sequence[int],
    device: torch.device,
    use_cache: bool = True,
    progress: Progress | None = None,
    stage: str = "features",
    **kwargs: Any,
) -> tuple[FeatureSet, bool]:
    """Features from the cache when present (returns ``(features, True)``), else extracted and,
    with ``use_cache``, stored. ``kwargs`` go to ``extract_features``."""
    dtype = kwargs.get("dtype", "float16")
    if not use_cache:
        return extract_features(
            model, images, transform, blocks, device, progress=progress, stage=stage, **kwargs
        ), False
    root = cache_dir() / "features"
    entry = root / cache_key(model, images, transform_cfg, blocks, dtype)
    if (entry / "meta.json").exists():
        feats = _load(entry)
        if progress is not None:
            progress(stage, len(images), len(images))
        return feats, True
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
    try:
        feats = extract_features(
            model,
            images,
            transform,
            blocks,
            device,
            directory=tmp,
            progress=progress,
            stage=stage,
            **kwargs,
        )
        n = len(feats)
        np.save(tmp / "labels.npy", feats.labels)
        write_json(
            tmp / "meta.json",
            {"blocks": feats.blocks, "paths": feats.paths, "skipped": feats.skipped, "rows": n},
        )
        if n < len(images):  # unreadable images were skipped: shrink the arrays to the rows kept
            for name in ("cls", "patch", "cls_norm", "patch_norm"):
                arr = getattr(feats, name)
                if arr is not None:
                    np.save(tmp / f"{name}.part.npy", np.asarray(arr))
                    os.replace(tmp / f"{name}.part.npy", tmp / f"{name}.npy")
        feats.close()
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _load(entry), False
