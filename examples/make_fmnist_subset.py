"""Write the small class-balanced Fashion-MNIST subset shipped in `examples/data/`.

`make demo` falls back to it on machines without Debian's `dataset-fashion-mnist` package (and
without apt to install it). The first N images of each class, in file order, from each split:

    python examples/make_fmnist_subset.py --per-class-train 500 --per-class-test 100

Fashion-MNIST is (c) Zalando SE, MIT License (https://github.com/zalandoresearch/fashion-mnist).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fmnist_idx import DEFAULT_IDX_DIR, DataError, load_idx_split  # noqa: E402

OUT = Path(__file__).resolve().parent / "data" / "fashion-mnist-subset.npz"


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    keep = [np.flatnonzero(labels == c)[:per_class] for c in range(int(labels.max()) + 1)]
    return np.sort(np.concatenate(keep))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idx-dir", type=Path, default=DEFAULT_IDX_DIR)
    parser.add_argument("--per-class-train", type=int, default=500)
    parser.add_argument("--per-class-test", type=int, default=100)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    try:
        arrays = {}
        for split, n in (("train", args.per_class_train), ("test", args.per_class_test)):
            images, labels = load_idx_split(args.idx_dir, split)
            keep = first_per_class(labels, n)
            arrays[f"x_{split}"], arrays[f"y_{split}"] = images[keep], labels[keep].astype(np.uint8)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(args.out)
    sizes = {k: v.shape[0] for k, v in arrays.items() if k.startswith("x_")}
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB): {sizes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
