"""Image folders (ImageFolder layout or flat), evaluation transforms and streaming loaders.

Unreadable images never crash a long run: the dataset marks them, the collate function drops them,
and the caller decides (``--on-bad-image skip|fail``) from the indices it gets back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mimcli.errors import MimcliError
from mimcli.runtime import resolve_workers

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BAD_IMAGE_CHOICES = ("skip", "fail")
# what decoding an unreadable image raises (PIL: OSError/UnidentifiedImageError, truncated data)
BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class ImageList:
    """Images of one source: position ``i`` has label ``labels[i]`` (-1 when unlabelled).

    A folder's images are files (``paths``); a dataset's or shards' images are rows of a
    ``reader`` (see :mod:`mimcli.datasources`), ``rows[i]`` being the row of position ``i``, and
    ``paths`` the names users see in messages (``SOURCE[row]``).
    """

    root: Path | str
    paths: Sequence[str]
    labels: list[int]
    classes: list[str]
    reader: Any = None  # None: files at ``paths``; else opens rows (map-style) or streams them
    rows: list[int] | None = None  # the reader's row of each position (None: position = row)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    @property
    def streaming(self) -> bool:
        """Shards read in order (``wds/``, ``hfids/``): no random access."""
        return bool(getattr(self.reader, "streaming", False))

    def row(self, index: int) -> int:
        return index if self.rows is None else self.rows[index]

    def open(self, index: int, load: bool = True) -> Image.Image:
        """The image at position ``index`` in RGB (map-style sources only); ``load=False``:
        opened, not decoded yet (a JPEG can then be decoded at a reduced size,
        ``Image.draft``)."""
        if self.reader is None:
            img = Image.open(self.paths[index])
        else:
            img = self.reader.open(self.row(index), load=False)
        return rgb(img) if load else img

    def subset(self, keep: Sequence[int]) -> ImageList:
        labels = [self.labels[i] for i in keep]
        if self.reader is None:
            return ImageList(self.root, [self.paths[i] for i in keep], labels, self.classes)
        rows = [self.row(i) for i in keep]
        return ImageList(
            self.root, RowNames(self.reader, rows), labels, self.classes, self.reader, rows
        )


def rgb(img: Image.Image) -> Image.Image:
    """Decode ``img`` and return it in RGB (no copy when it is RGB already)."""
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


class RowNames(Sequence[str]):
    """The names of a reader's rows, made when asked (a million strings are not kept)."""

    def __init__(self, reader: Any, rows: Sequence[int] | None = None, n: int = 0) -> None:
        self.reader, self.rows, self.n = reader, rows, n if rows is None else len(rows)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.n))]
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.reader.name(index if self.rows is None else self.rows[index])


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def scan_folder(
    root: str | os.PathLike[str], labelled: bool = True, what: str = "folder"
) -> ImageList:
    """List the images of ``root``.

    Args:
        root: an ImageFolder tree (``root/<class>/<image>``); with ``labelled=False`` a flat folder
            of images is accepted too.
        labelled: whether class sub-folders are required.
        what: how the error messages name this folder (e.g. ``--train``).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise MimcliError(f"{what} {root}: no such folder")
    if not root.is_dir():
        raise MimcliError(f"{what} {root}: not a folder (expected one sub-folder per class)")
    class_dirs = sorted(
        e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
    )
    paths: list[str] = []
    labels: list[int] = []
    classes: list[str] = []
    for name in class_dirs:
        files = []
        for dirpath, _, filenames in os.walk(root / name, followlinks=True):
            files.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f))
        if files:
            classes.append(name)
            files.sort()
            paths.extend(files)
            labels.extend([len(classes) - 1] * len(files))
    if not paths:
        flat = sorted(
            str(root / e.name) for e in os.scandir(root) if e.is_file() and _is_image(e.name)
        )
        if flat and labelled:
            raise MimcliError(
                f"{what} {root}: images but no class sub-folders; labels are needed here, so "
                "arrange it as <folder>/<class>/<image> (ImageFolder layout)"
            )
        if not flat:
            raise MimcliError(
                f"{what} {root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        return ImageList(root, flat, [-1] * len(flat), [])
    return ImageList(root, paths, labels, classes)


def subsample(images: ImageList, limit: int | None, seed: int = 0) -> ImageList:
    """A seeded, class-balanced subset of at most ``limit`` images (all when ``limit`` is None)."""
    if limit is None or limit >= len(images):
        return images
    if limit <= 0:
        raise MimcliError(f"limit must be positive, got {limit}")
    if images.streaming:  # no random access: the first ``limit`` in the seeded shard order
        return images.reader.first(images, limit, seed)
    rng = np.random.default_rng(seed)
    labels = np.asarray(images.labels)
    # Round-robin over classes in a seeded random order keeps the class balance of small subsets.
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order: list[int] = []
    depth = 0
    while len(order) < limit:
        for members in per_class:
            if depth < len(members):
                order.append(int(members[depth]))
                if len(order) == limit:
                    break
        depth += 1
    return images.subset(sorted(order))


class ImageDataset(Dataset):
    """Yields ``(image_tensor_or_None, label, index)``; None marks an unreadable file."""

    def __init__(self, images: ImageList, transform: Callable[[Image.Image], Any]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        try:
            # a transform that decodes itself (augment.CanvasDecoder) gets the image unread
            img = self.images.open(index, load=not getattr(self.transform, "decodes", False))
            return self.transform(img), self.images.labels[index], index
        except BAD_IMAGE_ERRORS:
            return None, self.images.labels[index], index


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W)
    labels: torch.Tensor  # (B,)
    indices: torch.Tensor  # (B,) positions in the ImageList
    bad: list[int]  # ImageList positions of unreadable files in this batch


def collate(items: list[tuple[Any, int, int]]) -> Batch:
    good = [it for it in items if it[0] is not None]
    bad = [it[2] for it in items if it[0] is None]
    if good:
        images = torch.stack([it[0] for it in good])
    else:
        images = torch.empty(0)
    labels = torch.tensor([it[1] for it in good], dtype=torch.int64)
    indices = torch.tensor([it[2] for it in good], dtype=torch.int64)
    return Batch(images, labels, indices, bad)


def eval_transform(pretrained_cfg: dict[str, Any], **overrides: Any) -> Callable[..., torch.Tensor]:
    """timm's evaluation transform (resize, centre crop, normalise) from a pretrained_cfg."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config(dict(pretrained_cfg, **overrides))
    return create_transform(**cfg, is_training=False)


def make_loader(
    dataset: Dataset, batch_size: int, num_workers: int | str, pin_memory: bool = False
) -> DataLoader:
    """Ordered, streaming loader (images are never kept after their batch); ``num_workers`` may
    be ``auto`` (:func:`mimcli.runtime.resolve_workers`)."""
    if batch_size <= 0:
        raise MimcliError(f"--batch-size must be positive, got {batch_size}")
    workers, _ = resolve_workers(num_workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if workers else None,
    )


def native_size(images: ImageList) -> tuple[int, int] | None:
    """(width, height) of the first image of a map-style source (None for a stream or an
    unreadable first image): what the data looks like before a model's transform."""
    if not len(images) or images.streaming:
        return None
    try:
        img = images.open(0, load=False)
        return int(img.size[0]), int(img.size[1])
    except BAD_IMAGE_ERRORS:
        return None


def resize_note(images: ImageList, input_size: int, what: str) -> str | None:
    """One line when images are resized far (over 2x either way) from their native size to
    the model's input size: features of, e.g., 28 px images blown up to 224 px are not what
    the model saw in pre-training."""
    size = native_size(images)
    if size is None:
        return None
    factor = input_size / min(size)
    if 0.5 <= factor <= 2:
        return None
    return (
        f"{what}: images are {size[0]}x{size[1]} px and are resized to the model's "
        f"{input_size} px ({factor:.1f}x); results of much resized images say less about the "
        "model"
    )


class BadImageTracker:
    """Counts unreadable files and applies ``--on-bad-image``."""

    def __init__(self, images: ImageList, policy: str = "skip") -> None:
        if policy not in BAD_IMAGE_CHOICES:
            raise MimcliError(
                f"unknown --on-bad-image {policy!r}; choose one of {', '.join(BAD_IMAGE_CHOICES)}"
            )
        self.images = images
        self.policy = policy
        self.bad: list[str] = []

    def add(self, positions: Sequence[int]) -> None:
        for pos in positions:
            path = self.images.paths[pos]
            if self.policy == "fail":
                raise MimcliError(f"cannot read image {path}; remove it or use --on-bad-image skip")
            self.bad.append(path)

    def summary(self, limit: int = 3) -> str | None:
        if not self.bad:
            return None
        shown = ", ".join(self.bad[:limit])
        more = f" and {len(self.bad) - limit} more" if len(self.bad) > limit else ""
        return f"skipped {len(self.bad)} unreadable image(s): {shown}{more}"
