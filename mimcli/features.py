"""Stream an image folder through an encoder and keep per-block features, not images.

Features go to memory-mapped ``.npy`` files (float16 by default), laid out (K, N, D) so that one
block's features are contiguous; RAM stays flat however large the dataset is.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mimcli.blocks import to_indices
from mimcli.data import BadImageTracker, ImageList, make_loader
from mimcli.models.taps import final_norm_of, tap_blocks
from mimcli.runtime import Progress, autocast
from mimcli.streams import image_dataset

FEATURE_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class FeatureSet:
    """Per-block features of one image folder.

    Attributes:
        blocks: tapped blocks, counted from 1 (as users see them).
        cls: (K, N, D) CLS features per block; ``patch`` likewise for mean patch tokens.
        cls_norm / patch_norm: (N, D) last-block features after the final norm, or None.
        labels: (N,) int64 labels (-1 when unlabelled).
        paths: the N image paths, in row order (unreadable images are not included).
        skipped: paths of unreadable images.
    """

    blocks: list[int]
    cls: np.ndarray
    patch: np.ndarray
    cls_norm: np.ndarray | None
    patch_norm: np.ndarray | None
    labels: np.ndarray
    paths: list[str]
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    directory: Path | None = None
    _owned_dir: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    def block(self, block: int, kind: str = "cls") -> np.ndarray:
        """(N, D) features of ``block`` (1-based), a view of the stored array (no copy); ``kind``
        is cls, patch, cls_norm or patch_norm (the last two ignore ``block``)."""
        if kind in ("cls_norm", "patch_norm"):
            arr = getattr(self, kind)
            if arr is None:
                raise KeyError(f"no {kind} features (model has no final norm)")
            return arr
        return getattr(self, kind)[self.blocks.index(block)]

    def close(self) -> None:
        """Drop the memory maps; delete the folder if it was a temporary one."""
        self.cls = self.patch = np.empty(0)
        self.cls_norm = self.patch_norm = None
        if self._owned_dir and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def extract_features(
    model: nn.Module,
    images: ImageList,
    transform: Callable,
    blocks: Sequence[int],
    device: torch.device,
    batch_size: int = 64,
    num_workers: int = 2,
    on_bad_image: str = "skip",
    dtype: str = "float16",
    directory: str | Path | None = None,
    progress: Progress | None = None,
    stage: str = "features",
) -> FeatureSet:
    """Compute CLS and mean-patch features after ``blocks`` (1-based) for every image.

    Args:
        directory: where the memory-mapped arrays go; a temporary folder when None (removed by
            ``FeatureSet.close``).
        progress: called as ``progress(stage, images_done, images_total)``.
    """
    tracker = BadImageTracker(images, on_bad_image)
    blocks = sorted(set(blocks))
    indices0 = to_indices(blocks)
    owned = directory is None
    folder = Path(tempfile.mkdtemp(prefix="mimcli-features-")) if owned else Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    dim = int(model.embed_dim)  # type: ignore[arg-type]
    n_total, n_blocks = len(images), len(blocks)
    np_dtype = FEATURE_DTYPES[dtype]
    has_norm = final_norm_of(model) is not None and indices0[-1] == len(model.blocks) - 1

    def memmap(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.lib.format.open_memmap(
            folder / f"{name}.npy", mode="w+", dtype=np_dtype, shape=shape
        )

    try:
        cls = memmap("cls", (n_blocks, n_total, dim))
        patch = memmap("patch", (n_blocks, n_total, dim))
        cls_norm = memmap("cls_norm", (n_total, dim)) if has_norm else None
        patch_norm = memmap("patch_norm", (n_total, dim)) if has_norm else None
        labels = np.full(n_total, -1, dtype=np.int64)
        kept: list[int] = []

        loader = make_loader(
            image_dataset(images, transform),
            batch_size,
            num_workers,
            pin_memory=device.type == "cuda",
        )
        model.eval()
        start = time.perf_counter()
        row = 0
        seen = 0
        if progress is not None:
            progress(stage, 0, n_total)
        with torch.inference_mode():
            for batch in loader:
                tracker.add(batch.bad)
                seen += len(batch.bad) + len(batch.labels)
                if len(batch.labels):
                    x = batch.images.to(device, non_blocking=True)
                    with autocast(device):
                        taps = tap_blocks(model, x, indices0)
                    n = x.shape[0]
                    # (B, K, D) -> (K, B, D) rows of the memory map
                    cls[:, row : row + n] = taps.cls.float().permute(1, 0, 2).cpu().numpy()
                    patch[:, row : row + n] = taps.patch.float().permute(1, 0, 2).cpu().numpy()
                    if has_norm:
                        cls_norm[row : row + n] = taps.cls_norm.float().cpu().numpy()  # type: ignore[index,union-attr]
                        patch_norm[row : row + n] = taps.patch_norm.float().cpu().numpy()  # type: ignore[index,union-attr]
                    labels[row : row + n] = batch.labels.numpy()
                    kept.extend(batch.indices.tolist())
                    row += n
                if progress is not None:
                    progress(stage, seen, n_total)
    except BaseException:
        # Nothing half-written survives a failure: drop the partial arrays.
        if owned:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    for arr in (cls, patch, cls_norm, patch_norm):
        if arr is not None:
            arr.flush()
    return FeatureSet(
        blocks=list(blocks),
        cls=cls[:, :row],
        patch=patch[:, :row],
        cls_norm=None if cls_norm is None else cls_norm[:row],
        patch_norm=None if patch_norm is None else patch_norm[:row],
        labels=labels[:row].copy(),
        paths=[images.paths[i] for i in kept],
        skipped=list(tracker.bad),
        seconds=seconds,
        directory=folder,
        _owned_dir=owned,
    )
