"""Low-shot splits (METHOD §1.5): seeded class-balanced draws of k images per class (or a
fraction of the train set), saved beside the results so every model is scored on the same
images, and checked against the labels when read back."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np

from mimcli.errors import MimcliError
from mimcli.fileio import write_json

SPLIT_FORMAT = "mimcli-lowshot-split"


def _parse_shots(shots: float) -> tuple[int | None, float]:
    """(k, 0.0) for k images per class, (None, fraction) for a fraction of each class."""
    if isinstance(shots, bool) or not isinstance(shots, numbers.Real):
        raise MimcliError(f"low-shot setting {shots!r} is not a number; use e.g. 1, 2, 5 or 0.01")
    value = float(shots)
    if 0.0 < value < 1.0:
        return None, value
    if value >= 1.0 and value.is_integer():
        return int(value), 0.0
    raise MimcliError(
        f"low-shot setting {shots!r} is neither a whole number of images per class (>= 1) "
        "nor a fraction in (0, 1) such as 0.01 for 1%"
    )


def shot_name(shots: float) -> str:
    """Display name: ``"5-shot"`` or ``"1%"``."""
    k, fraction = _parse_shots(shots)
    return f"{k}-shot" if k is not None else f"{fraction * 100:g}%"


def split_filename(shots: float, seed: int) -> str:
    """File name of a saved split, e.g. ``5shot-seed0.json`` or ``1pct-seed2.json``."""
    k, fraction = _parse_shots(shots)
    tag = f"{k}shot" if k is not None else f"{fraction * 100:g}pct"
    return f"{tag}-seed{seed}.json"


def labels_hash(labels: np.ndarray) -> str:
    """SHA-256 of the label array as little-endian int64: identifies the train set of a split."""
    data = np.ascontiguousarray(np.asarray(labels).ravel(), dtype="<i8")
    return hashlib.sha256(data.tobytes()).hexdigest()


def lowshot_splits(labels: np.ndarray, shots: float, seed: int) -> np.ndarray:
    """Indices of a class-balanced train subset.

    Args:
        labels: (N,) integer class of each train image.
        shots: a whole number k (exactly k images of every class; an error when a class has fewer)
            or a fraction in (0, 1) (that fraction of each class, rounded half up, at least 1).
        seed: seeds ``np.random.default_rng``; the same labels and seed give the same split.

    Returns:
        (M,) int64 indices into ``labels``, sorted.
    """
    labels = np.asarray(labels).ravel()
    if labels.size == 0:
        raise MimcliError("cannot draw a low-shot split from an empty train set")
    k, fraction = _parse_shots(shots)
    order = np.argsort(labels, kind="stable")
    classes, counts = np.unique(labels, return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rng = np.random.default_rng(seed)
    picked = []
    for cls, start, count in zip(classes.tolist(), starts.tolist(), counts.tolist(), strict=True):
        take = k if k is not None else max(1, math.floor(fraction * count + 0.5))
        if count < take:
            raise MimcliError(
                f"{shot_name(shots)} split needs {take} train images of every class, "
                f"but class {cls} has only {count}"
            )
        members = order[start : start + count]
        picked.append(members[rng.choice(count, size=take, replace=False)])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def split_meta(labels: np.ndarray, shots: float, seed: int) -> dict[str, Any]:
    """What a split file records besides its indices, to refuse it for another train set."""
    labels = np.asarray(labels).ravel()
    return {
        "shots": shots,
        "seed": int(seed),
        "num_train": int(labels.size),
        "labels_sha256": labels_hash(labels),
    }


def save_split(path: str | Path, indices: np.ndarray, meta: dict[str, Any]) -> Path:
    """Write a split as JSON (atomically): ``meta`` (see :func:`split_meta`) plus the indices."""
    record = {"format": SPLIT_FORMAT, **meta, "indices": [int(i) for i in np.asarray(indices)]}
    return write_json(path, record)


def load_split(
    path: str | Path,
    labels: np.ndarray | None = None,
    shots: float | None = None,
    seed: int | None = None,
) -> np.ndarray:
    """Read a split written by :func:`save_split`.

    Args:
        labels: when given, the (N,) train labels the split must have been drawn from (same count
            and hash); ``shots`` and ``seed``, when given, must match the file too.

    Returns:
        (M,) int64 sorted indices.

    Raises:
        MimcliError: unreadable file, or a split made for other labels / shots / seed.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") != SPLIT_FORMAT:
            raise ValueError(f"format is {record.get('format')!r}, not {SPLIT_FORMAT!r}")
        indices = np.asarray(record["indices"], dtype=np.int64)
        num_train = int(record["num_train"])
        saved_shots, saved_seed = float(record["shots"]), int(record["seed"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise MimcliError(f"{path} is not a readable low-shot split file ({err})") from err
    if indices.ndim != 1 or indices.size == 0 or indices.min() < 0 or indices.max() >= num_train:
        raise MimcliError(f"{path}: indices are empty or outside 0..{num_train - 1}")
    if np.unique(indices).size != indices.size:
        raise MimcliError(f"{path}: indices repeat")
    stale = "; delete it to draw a new split"
    if labels is not None:
        labels = np.asarray(labels).ravel()
        if labels.size != num_train or labels_hash(labels) != record.get("labels_sha256"):
            raise MimcliError(
                f"{path} was drawn from another train set ({num_train} images, labels "
                f"{str(record.get('labels_sha256'))[:12]}…, here {labels.size} images, "
                f"{labels_hash(labels)[:12]}…){stale}"
            )
    if shots is not None and saved_shots != float(shots):
        raise MimcliError(f"{path} holds a {record['shots']!r} split, not {shots!r}{stale}")
    if seed is not None and saved_seed != seed:
        raise MimcliError(f"{path} holds the split of seed {saved_seed}, not {seed}{stale}")
    return np.sort(indices)


def split_for(labels: np.ndarray, shots: float, seed: int, split_dir: Path | None) -> np.ndarray:
    """The saved split when ``split_dir`` holds it; else a new draw, saved there if given."""
    path = Path(split_dir) / split_filename(shots, seed) if split_dir is not None else None
    if path is not None and path.exists():
        return load_split(path, labels=labels, shots=shots, seed=seed)
    indices = lowshot_splits(labels, shots, seed)
    if path is not None:
        save_split(path, indices, split_meta(labels, shots, seed))
    return indices
