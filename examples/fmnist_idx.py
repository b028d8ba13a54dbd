"""Read Fashion-MNIST (or any MNIST-style) IDX files into numpy arrays.

Shared by `export_fashion_mnist.py` and `pretrain_tiny_mae.py`; no torch needed.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

DEFAULT_IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist`, or pass --idx-dir"

# The numeric prefix keeps sorted folder order equal to label order (ImageFolder sorts names).
CLASS_NAMES = (
    "0_tshirt_top",
    "1_trouser",
    "2_pullover",
    "3_dress",
    "4_coat",
    "5_sandal",
    "6_shirt",
    "7_sneaker",
    "8_bag",
    "9_ankle_boot",
)

# Mean/std of the Fashion-MNIST training pixels in [0, 1].
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(Exception):
    """A user-fixable problem with the input data (missing or malformed files)."""


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw) into an array of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataError(f"{path}: header says {expected} data bytes, file has {len(raw) - offset}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def _find(idx_dir: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz"):
        if (idx_dir / name).is_file():
            return idx_dir / name
    raise DataError(f"missing IDX file {idx_dir / (stem + '.gz')} ({INSTALL_HINT})")


def load_idx_split(idx_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one split ("train" or "test") from a folder of IDX files.

    Returns:
        images `(N, 28, 28)` uint8 and labels `(N,)` int64.
    """
    if not idx_dir.is_dir():
        raise DataError(f"IDX folder {idx_dir} does not exist ({INSTALL_HINT})")
    image_stem, label_stem = _STEMS[split]
    images = read_idx(_find(idx_dir, image_stem))
    labels = read_idx(_find(idx_dir, label_stem)).astype(np.int64)
    return _check_pair(images, labels, f"{idx_dir} [{split}]")


def load_npz_split(npz_path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one split from an .npz holding `x_train, y_train, x_test, y_test`."""
    if not npz_path.is_file():
        raise DataError(f"npz file {npz_path} does not exist")
    try:
        with np.load(npz_path) as arrays:
            images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
    except KeyError as e:
        raise DataError(f"{npz_path} lacks array {e} (needs x_train,y_train,x_test,y_test)") from e
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {npz_path}: {e}") from e
    if images.dtype != np.uint8:
        # Accept float arrays in [0, 1] or [0, 255].
        scale = 255.0 if images.max() <= 1.0 else 1.0
        images = np.clip(np.rint(images.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    return _check_pair(images, labels.astype(np.int64).reshape(-1), f"{npz_path} [{split}]")


def _check_pair(
    images: np.ndarray, labels: np.ndarray, where: str
) -> tuple[np.ndarray, np.ndarray]:
    if images.ndim != 3:
        raise DataError(f"{where}: images must be (N, H, W), got shape {images.shape}")
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise DataError(f"{where}: labels must lie in 0..{len(CLASS_NAMES) - 1}")
    return images, labels
