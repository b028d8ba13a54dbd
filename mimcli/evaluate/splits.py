"""Low-shot splits (METHOD §1.5): seeded class-balanced draws of k images per class (or a
fraction of the train set), saved beside the results so every model is scored on the same
images, and checked against the labels when read back; split files (one image name per line,
the format of the published SimCLRv2 and MSN subsets) read and matched to a folder's images, and
the seeded splits written in that format too."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mimcli.errors import MimcliError
from mimcli.fileio import write_json, write_text

if TYPE_CHECKING:
    from mimcli.data import ImageList

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


def split_for(
    labels: np.ndarray,
    shots: float,
    seed: int,
    split_dir: Path | None,
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """The saved split when ``split_dir`` holds it; else a new draw, saved there if given.

    With ``split_dir`` and ``names`` (the (N,) relative paths of the train images), the split is
    also written as a split file (``5shot-seed0.txt``) that ``--split-file`` reads back.
    """
    path = Path(split_dir) / split_filename(shots, seed) if split_dir is not None else None
    if path is not None and path.exists():
        indices = load_split(path, labels=labels, shots=shots, seed=seed)
    else:
        indices = lowshot_splits(labels, shots, seed)
        if path is not None:
            save_split(path, indices, split_meta(labels, shots, seed))
    if split_dir is not None and names is not None:
        what = f"{shot_name(shots)} split, seed {seed}"
        write_split_names(Path(split_dir) / split_text_filename(shots, seed), indices, names, what)
    return indices


# -- split files: one image name per line (SimCLRv2's 1%/10% subsets, MSN's k-per-class lists) --

SPLIT_TEXT_SUFFIX = ".txt"
SHOWN = 3  # names quoted in an error


@dataclass(frozen=True)
class NamedSplit:
    """A low-shot training subset read from a ``--split-file``.

    Attributes:
        name: the key it is reported under (the file's name; its path when two names collide).
        path: the file as given.
        indices: (M,) sorted int64 positions in the train images.
    """

    name: str
    path: str
    indices: np.ndarray


def train_names(images: ImageList) -> list[str]:
    """Paths of a folder's train images relative to its root, with ``/`` separators: the names a
    split file holds (one per line).

    Raises:
        MimcliError: the images come from a dataset or shards, whose rows have no file names.
    """
    if images.reader is not None:
        raise MimcliError(
            f"--split-file needs a folder --train (<folder>/<class>/<image>); {images.root} is a "
            "dataset or shards, whose images have no file names to match"
        )
    prefix = str(images.root).rstrip(os.sep) + os.sep
    return [
        (p[len(prefix) :] if p.startswith(prefix) else os.path.relpath(p, images.root)).replace(
            os.sep, "/"
        )
        for p in map(str, images.paths)
    ]


def read_split_lines(path: str | Path) -> list[tuple[int, str]]:
    """``(line number, name)`` of every image a split file lists.

    Format: UTF-8 text, one image per line: a file name (``n01440764_10026.JPEG``, as in
    SimCLRv2's ``1percent.txt`` and MSN's ``1imgs_class.txt``) or a path relative to the
    ``--train`` folder with ``/`` separators (``n01440764/n01440764_10026.JPEG``; a leading
    ``./`` is dropped). Surrounding whitespace is ignored, and so are blank lines and lines
    starting with ``#``; the rest of a line is the name (no label column).
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError as err:
        raise MimcliError(f"--split-file {path}: no such file") from err
    except (OSError, UnicodeDecodeError) as err:
        raise MimcliError(f"--split-file {path}: not readable as UTF-8 text ({err})") from err
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if name and not name.startswith("#"):
            entries.append((number, name[2:] if name.startswith("./") else name))
    if not entries:
        raise MimcliError(
            f"--split-file {path}: lists no images (one file name or relative path per line)"
        )
    return entries


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _quote(items: Sequence[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (", …" if len(items) > SHOWN else "")


def match_split_file(path: str | Path, names: Sequence[str]) -> np.ndarray:
    """Positions in the train images of the images a split file lists (see
    :func:`read_split_lines`): a line with a ``/`` is matched to the relative path, any other
    line to the file name.

    Args:
        names: (N,) relative paths of the train images (:func:`train_names`).

    Returns:
        (M,) sorted int64 positions, one per listed image.

    Raises:
        MimcliError: a name not among the train images, a file name that several train images
            share, or two lines naming the same image (each reported once, with the first few).
    """
    entries = read_split_lines(path)
    by_path = {n: i for i, n in enumerate(names)} if any("/" in e for _, e in entries) else {}
    # one position per file name; the few names several images share keep all their positions
    by_name: dict[str, int] = {}
    shared_by: dict[str, list[int]] = {}
    if any("/" not in e for _, e in entries):
        for i, n in enumerate(names):
            base = n.rpartition("/")[2]
            if by_name.setdefault(base, i) != i:
                shared_by.setdefault(base, [by_name[base]]).append(i)
    missing, shared, repeats = [], [], []
    first_line: dict[int, int] = {}
    for number, entry in entries:
        if "/" in entry:
            found = [by_path[entry]] if entry in by_path else []
        else:
            found = shared_by.get(entry) or ([by_name[entry]] if entry in by_name else [])
        if not found:
            missing.append(entry)
        elif len(found) > 1:
            shared.append(f"{entry} ({' and '.join(names[i] for i in found[:2])})")
        elif found[0] in first_line:
            repeats.append(f"line {number} repeats line {first_line[found[0]]} ({entry})")
        else:
            first_line[found[0]] = number
    if missing:
        raise MimcliError(
            f"--split-file {path}: {len(missing)} of {len(entries)} names not found among the "
            f"{len(names)} --train images ({_quote(missing)}); names with a '/' are paths "
            "relative to --train, others file names"
        )
    if shared:
        raise MimcliError(
            f"--split-file {path}: {_count(len(shared), 'file name')} shared by several --train "
            f"images: {_quote(shared)}; write those lines as paths relative to --train"
        )
    if repeats:
        raise MimcliError(
            f"--split-file {path}: {_count(len(repeats), 'line')} naming an image listed before: "
            f"{_quote(repeats)}; list each image once"
        )
    return np.sort(np.fromiter(first_line, dtype=np.int64, count=len(first_line)))


def folder_names(images: ImageList) -> list[str] | None:
    """:func:`train_names` of a folder's images; None for a dataset's or shards'."""
    return train_names(images) if images.reader is None else None


def load_split_files(
    paths: Sequence[str | Path], images: ImageList, settings: Sequence[str] = ()
) -> list[NamedSplit]:
    """Each ``--split-file`` matched against the train images, named by its file name (by the
    path as given when two files share a name); ``settings`` are the seeded settings' names
    (``5-shot``, ``1%``), which a split file's name may not repeat."""
    if not paths:
        return []
    given = [str(p) for p in paths]
    if len(set(given)) < len(given):
        raise MimcliError(
            f"--split-file: {_quote(sorted({p for p in given if given.count(p) > 1}))} given twice"
        )
    keys = [Path(p).name for p in given]
    if len(set(keys)) < len(keys):
        keys = given
    check_split_names(keys, given, settings)
    names = train_names(images)
    return [
        NamedSplit(key, path, match_split_file(path, names))
        for key, path in zip(keys, given, strict=True)
    ]


def check_split_names(keys: Sequence[str], paths: Sequence[str], settings: Sequence[str]) -> None:
    """Refuse split files (``paths``) whose names (``keys``) repeat or repeat a seeded
    setting's (``1%``): every result needs a key of its own."""
    for key, path in zip(keys, paths, strict=True):
        if key in settings or keys.count(key) > 1:
            raise MimcliError(
                f"--split-file {path}: its name {key!r} is taken by another low-shot result; "
                "rename the file"
            )


def split_text_filename(shots: float, seed: int) -> str:
    """The name list beside a saved split, e.g. ``5shot-seed0.txt``."""
    return Path(split_filename(shots, seed)).with_suffix(SPLIT_TEXT_SUFFIX).name


def write_split_names(
    path: str | Path, indices: np.ndarray, names: Sequence[str], what: str
) -> Path:
    """Write a split as a split file (atomically): a ``#`` line saying ``what`` it is, then the
    relative path of each image, one per line, in ``indices`` order; ``--split-file`` reads it
    back to the same images."""
    lines = [f"# mimcli {what}: {len(indices)} images, paths relative to the --train folder"]
    lines.extend(names[int(i)] for i in indices)
    return write_text(path, "\n".join(lines) + "\n")
