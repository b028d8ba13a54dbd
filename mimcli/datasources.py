"""Where images come from: every ``--data``/``--train``/``--val`` string becomes an
:class:`~mimcli.data.ImageList`.

Forms (timm's reader names):

- a folder: an ImageFolder tree or a flat folder of images (:func:`mimcli.data.scan_folder`);
- ``hfds/OWNER/NAME[:split]``: a Hugging Face Hub dataset through ``datasets.load_dataset``
  (the user's HF cache); a local folder of parquet files or a ``save_to_disk`` dataset given as a
  plain path (``PATH[:split]``) is recognised by its contents. Rows are read at random;
- ``hfids/OWNER/NAME[:split]``: the same dataset streamed (its parquet files are the shards);
- ``wds/PATTERN``: WebDataset tar shards, a brace pattern of local paths or http(s) URLs.

``hfids/`` and ``wds/`` are streams: read shard by shard, never at random. Their shards are
indexed once (samples per shard, labels) and the index cached, so a stream knows its length and
labels like a folder does; :mod:`mimcli.streams` reads them in a seeded order.

Image and label columns are found by name (``image``/``img``/``jpg``..., ``label``/``labels``/
``cls``) or given (``--image-column``/``--label-column``); images may arrive decoded or as
``{bytes, path}`` records. Class names come from a ``ClassLabel`` feature, else the sorted label
values. ``datasets`` and ``webdataset`` are optional extras, imported only when named.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mimcli.data import ImageList, RowNames, rgb, scan_folder, subsample
from mimcli.errors import MimcliError, RemoteError
from mimcli.fileio import cache_dir, write_json

STREAM_PREFIXES = ("hfids/", "wds/")
SOURCE_PREFIXES = ("hfds/", *STREAM_PREFIXES)
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
LABEL_COLUMNS = ("label", "labels", "cls", "class", "target")
EXTRAS = {"datasets": "hf", "webdataset": "wds"}
INDEX_VERSION = 1


@dataclass(frozen=True)
class Columns:
    """``--image-column`` / ``--label-column`` (None: found by name)."""

    image: str | None = None
    label: str | None = None


def is_source(spec: str | os.PathLike[str] | None) -> bool:
    """Whether ``spec`` names a dataset or shards rather than a folder."""
    return spec is not None and str(spec).startswith(SOURCE_PREFIXES)


def data_spec(value: str | os.PathLike[str] | None) -> str | Path | None:
    """A ``--data``-like value as configs keep it: prefixed sources as strings (a ``Path`` would
    fold the ``//`` of a URL), everything else as a path."""
    if value is None or isinstance(value, Path):
        return value
    return str(value) if is_source(value) else Path(value)


def _need(module: str, spec: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS[module]
        raise MimcliError(
            f"{spec}: reading it needs the '{module}' package; "
            f"pip install 'mimcli[{extra}]' (or pip install {module})"
        ) from None


@contextmanager
def _bars(datasets: Any) -> Iterator[None]:
    """``datasets``' own progress bars only on a terminal (a log file gets no bar residue and a
    failing command's stderr stays one line)."""
    if sys.stderr.isatty() or not datasets.is_progress_bar_enabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def _split(rest: str, default: str = "train") -> tuple[str, str]:
    name, sep, split = rest.rpartition(":")
    if sep and "/" not in split and split:
        return name, split
    return rest, default


def open_images(
    spec: str | os.PathLike[str],
    *,
    labelled: bool,
    what: str,
    columns: Columns = Columns(),  # noqa: B008 - frozen
) -> ImageList:
    """The images of ``spec`` (see the module docstring); ``labelled`` asks for labels (one
    clear line when the source has none); ``what`` names the flag in messages."""
    text = str(spec)
    if text.startswith("hfds/"):
        name, split = _split(text[len("hfds/") :])
        return _from_dataset(_load_hub(name, split, text), text, labelled, what, columns)
    if text.startswith("hfids/"):
        name, split = _split(text[len("hfids/") :])
        return _from_stream(HubStream(name, split, text, columns), labelled, what)
    if text.startswith("wds/"):
        return _from_stream(WdsStream(text[len("wds/") :], text, columns), labelled, what)
    path = Path(text).expanduser()
    split = None
    if not path.exists():
        base, split = _split(text, default="")
        if split and Path(base).expanduser().exists():
            path = Path(base).expanduser()
        else:
            split = None
    if path.is_dir() and _dataset_kind(path):
        return _from_dataset(_load_local(path, split, text), text, labelled, what, columns)
    if path.is_file() and path.suffix == ".parquet":
        return _from_dataset(_load_local(path, split, text), text, labelled, what, columns)
    if split:
        raise MimcliError(f"{what} {text}: a folder of images has no splits ({split!r})")
    return scan_folder(path, labelled=labelled, what=what)


def labelled_pair(
    train: str | os.PathLike[str],
    val: str | os.PathLike[str],
    limit_train: int | None,
    limit_val: int | None,
    seed: int = 0,
    columns: Columns = Columns(),  # noqa: B008 - frozen
) -> tuple[ImageList, ImageList]:
    """The labelled ``--train`` and ``--val`` images of probe and eval, each subsampled; one
    clear line when their classes differ."""
    train_images = subsample(
        open_images(train, labelled=True, what="--train", columns=columns), limit_train, seed
    )
    val_images = subsample(
        open_images(val, labelled=True, what="--val", columns=columns), limit_val, seed
    )
    if train_images.classes != val_images.classes:
        raise MimcliError(
            f"--train has classes {train_images.classes[:5]}... but --val has "
            f"{val_images.classes[:5]}...; both need the same classes"
        )
    return train_images, val_images


def labelled_images(cfg: Any) -> tuple[ImageList, ImageList]:
    """:func:`labelled_pair` of a probe or eval config (``train``, ``val``, ``limit_train``,
    ``limit_val``, ``seed``, ``image_column``, ``label_column``)."""
    columns = Columns(cfg.image_column, cfg.label_column)
    return labelled_pair(cfg.train, cfg.val, cfg.limit_train, cfg.limit_val, cfg.seed, columns)


# -- map-style datasets (hfds/, local parquet, save_to_disk) --


def _dataset_kind(path: Path) -> str | None:
    if (path / "dataset_dict.json").exists():
        return "dict"
    if (path / "state.json").exists() and (path / "dataset_info.json").exists():
        return "saved"
    if any(path.glob("*.parquet")) or any(path.glob("*/*.parquet")):
        return "parquet"
    return None


def _dataset_error(exc: BaseException, spec: str) -> BaseException:
    from mimcli.hub.download import is_network_error

    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if is_network_error(exc):
        return RemoteError(f"{spec}: cannot reach the Hub ({text}); check the connection")
    if type(exc).__name__ in (
        "DatasetNotFoundError",
        "RepositoryNotFoundError",
        "FileNotFoundError",
    ):
        return MimcliError(f"{spec}: no such dataset (private or gated ones need `hf auth login`)")
    if "split" in text.lower():
        return MimcliError(f"{spec}: {text}; name one as NAME:split")
    return MimcliError(f"{spec}: cannot read it as a dataset ({text})")


def _load_hub(name: str, split: str, spec: str) -> Any:
    datasets = _need("datasets", spec)
    try:
        with _bars(datasets):
            return datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - mapped to one line
        raise _dataset_error(exc, spec) from None


def _load_local(path: Path, split: str | None, spec: str) -> Any:
    datasets = _need("datasets", spec)
    try:
        with _bars(datasets):
            return _read_local(datasets, path, split, spec)
    except MimcliError:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to one line
        raise _dataset_error(exc, spec) from None


def _read_local(datasets: Any, path: Path, split: str | None, spec: str) -> Any:
    kind = _dataset_kind(path) if path.is_dir() else "parquet"
    if kind in ("saved", "dict"):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            split = split or ("train" if "train" in loaded else None)
            if split not in loaded:
                raise MimcliError(f"{spec}: splits {sorted(loaded)}; name one as {path}:SPLIT")
            return loaded[split]
        return loaded
    files = str(path) if path.is_file() else None
    if files is not None:
        return datasets.load_dataset("parquet", data_files={"train": files}, split="train")
    return datasets.load_dataset(str(path), split=split or "train")


def _column(names: Sequence[str], given: str | None, candidates: Sequence[str]) -> str | None:
    if given is not None:
        return given if given in names else None
    lower = {n.lower(): n for n in names}
    return next((lower[c] for c in candidates if c in lower), None)


def _image_column(names: Sequence[str], columns: Columns, spec: str, flag: str) -> str:
    col = _column(names, columns.image, IMAGE_COLUMNS)
    if col is None:
        wanted = f"no column {columns.image!r}" if columns.image else "no image column"
        raise MimcliError(f"{spec}: {wanted} (it has {', '.join(names)}); name it with {flag}")
    return col


def _usable(values: Sequence[Any]) -> bool:
    """Labels that name one class each (ints or text, none missing)."""
    return all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in values)


def _class_names(values: Sequence[Any]) -> tuple[list[str], dict[Any, int]]:
    """Classes from raw label values: sorted (numbers numerically), named by their text."""
    uniq = sorted(set(values), key=lambda v: (isinstance(v, str), v))
    return [str(v) for v in uniq], {v: i for i, v in enumerate(uniq)}


def _missing_labels(spec: str, what: str, names: Sequence[str], columns: Columns) -> MimcliError:
    wanted = f"no column {columns.label!r}" if columns.label else "no label column"
    return MimcliError(
        f"{what} {spec}: {wanted} (it has {', '.join(names)}); labels are needed here: "
        "name the column with --label-column"
    )


def _from_dataset(ds: Any, spec: str, labelled: bool, what: str, columns: Columns) -> ImageList:
    import datasets

    names = list(ds.column_names)
    image_col = _image_column(names, columns, spec, "--image-column")
    label_col = _column(names, columns.label, LABEL_COLUMNS)
    if label_col is None and (labelled or columns.label):
        raise _missing_labels(spec, what, names, columns)
    if len(ds) == 0:
        raise MimcliError(f"{what} {spec}: the dataset has no rows")
    labels: list[int] = [-1] * len(ds)
    classes: list[str] = []
    if label_col is not None:  # labels whenever there are some (refine reports NN accuracy)
        values = ds.with_format("arrow")[label_col].to_pylist()  # 1.28 M: 0.1 s, not 20
        feature = ds.features[label_col]
        if isinstance(feature, datasets.ClassLabel):
            classes, labels = list(feature.names), [int(v) for v in values]
        elif _usable(values):
            classes, index = _class_names(values)
            labels = [index[v] for v in values]
        elif labelled:
            raise MimcliError(
                f"{what} {spec}: column {label_col!r} is not one class per image (missing "
                "values or lists); name another with --label-column"
            )
    feature = ds.features[image_col]
    if isinstance(feature, datasets.Image) and feature.decode:
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
    reader = DatasetRows(ds.select_columns([image_col]), image_col, spec)
    return ImageList(spec, RowNames(reader, n=len(ds)), labels, classes, reader)


def to_pil(value: Any, load: bool = True) -> Image.Image:
    """An image as a dataset or shard holds it (PIL, ``{bytes, path}``, bytes, array) -> RGB;
    ``load=False``: encoded ones opened, not decoded yet (see ``ImageList.open``)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        value = data if data is not None or not path else path
        if isinstance(value, str):
            img = Image.open(value)
            return rgb(img) if load else img
    if isinstance(value, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(value))
        return rgb(img) if load else img
    if isinstance(value, Image.Image):
        return rgb(value)
    if value is None:
        raise ValueError("no image")
    return Image.fromarray(np.asarray(value, dtype=np.uint8)).convert("RGB")


class DatasetRows:
    """Random access to a ``datasets.Dataset``'s images (undecoded; decoded here, so an
    unreadable image is one bad row, not a crash). Pickles into DataLoader workers (the arrow
    files are memory-mapped)."""

    streaming = False

    def __init__(self, ds: Any, column: str, spec: str) -> None:
        self.ds, self.column, self.spec = ds, column, spec

    def open(self, row: int, load: bool = True) -> Image.Image:
        return to_pil(self.ds[int(row)][self.column], load)

    def name(self, row: int) -> str:
        return f"{self.spec}[{row}]"

    def fingerprint(self) -> str:
        return str(getattr(self.ds, "_fingerprint", "")) + f":{len(self.ds)}"


# -- streams (hfids/, wds/) --


class Stream:
    """Shards read in order. Subclasses give ``shards`` (names), ``_key()`` (what the cached
    index depends on) and ``raw(shard)`` (``(image record, raw label)`` per sample, in shard
    order, nothing decoded). ``counts``/``labels`` come from the index."""

    streaming = True
    shards: list[str]

    def __init__(self, spec: str, columns: Columns) -> None:
        self.spec, self.columns = spec, columns
        self.counts: list[int] = []
        self.raw_labels: list[Any] = []
        self.class_names: list[str] | None = None
        self.label_field: str | None = None
        self.index_key = ""
        self.index_path: Path | None = None

    # the index
    def _key(self) -> dict[str, Any]:
        raise NotImplementedError

    def prepare(self, labelled: bool, what: str) -> None:
        """Find the image and label fields (one clear line when labels are needed and absent)."""
        raise NotImplementedError

    def raw(self, shard: int, labels_only: bool = False) -> Iterator[tuple[Any, Any]]:
        raise NotImplementedError

    def index(self, progress: bool = True) -> None:
        """Samples per shard and raw labels: from the cache, else one pass over the shards."""
        key = json.dumps({"v": INDEX_VERSION, **self._key()}, sort_keys=True)
        self.index_key = key
        path = self.index_path = (
            cache_dir() / "data-index" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
        )
        try:
            cached = json.loads(path.read_text())
            if len(cached["counts"]) == len(self.shards) and len(cached["labels"]) == sum(
                cached["counts"]
            ):
                self.counts, self.raw_labels = cached["counts"], cached["labels"]
                return
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, or unreadable: index again
        counts: list[int] = []
        labels: list[Any] = []
        shards = self.shards
        bar = _bar(len(shards), f"indexing {self.spec}") if progress else None
        for i in range(len(shards)):
            n = 0
            for _, label in self.raw(i, labels_only=True):
                labels.append(label)
                n += 1
            counts.append(n)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        self.counts, self.raw_labels = counts, labels
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"spec": self.spec, "counts": counts, "labels": labels})

    @property
    def offsets(self) -> np.ndarray:
        """Row of each shard's first sample (and the total last), computed once."""
        cached = getattr(self, "_offsets", None)
        if cached is None or len(cached) != len(self.counts) + 1:
            cached = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
            self._offsets = cached
        return cached

    def name(self, row: int) -> str:
        shard = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return f"{self.shards[shard]}#{row - int(self.offsets[shard])}"

    def decode(self, record: Any, load: bool = True) -> Image.Image:
        return to_pil(record, load)

    def read(self, shard: int) -> Iterator[Any]:
        """The image records of ``shard`` in order; one clear line when it no longer holds the
        samples its cached index counted (the shards changed since)."""
        n = 0
        for record, _ in self.raw(shard):
            n += 1
            yield record
        if n != self.counts[shard]:
            raise MimcliError(
                f"{self.spec}: shard {self.shards[shard]} holds {n} samples, its index "
                f"{self.counts[shard]}; the shards changed since they were indexed: remove "
                f"{cache_dir() / 'data-index'} and run again"
            )

    def first(self, images: ImageList, limit: int, seed: int) -> ImageList:
        """``--limit`` for a stream: the first ``limit`` samples of the shards in a seeded
        order (whole shards, the last one cut), so no shard is read for a few samples."""
        order = np.random.default_rng(seed).permutation(len(self.counts))
        keep: list[int] = []
        offsets = self.offsets
        chosen = set(images.rows) if images.rows is not None else None
        for shard in order:
            for row in range(int(offsets[shard]), int(offsets[shard + 1])):
                if chosen is None or row in chosen:
                    keep.append(row)
                    if len(keep) == limit:
                        break
            if len(keep) == limit:
                break
        keep.sort()
        if images.rows is None:
            positions = keep
        else:
            where = {r: i for i, r in enumerate(images.rows)}
            positions = [where[r] for r in keep]
        return images.subset(positions)


def _bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    quiet = not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="shard", file=sys.stderr, leave=False, disable=quiet)


def _from_stream(stream: Stream, labelled: bool, what: str) -> ImageList:
    stream.prepare(labelled, what)
    stream.index()
    n = int(sum(stream.counts))
    if n == 0:
        raise MimcliError(f"{what} {stream.spec}: the shards hold no samples")
    labels = [-1] * n
    classes: list[str] = []
    missing = stream.label_field is None or not _usable(stream.raw_labels)
    if missing and labelled:
        raise MimcliError(
            f"{what} {stream.spec}: some samples have no label (or not one class each); labels "
            "are needed here: name the field with --label-column"
        )
    if not missing:
        if stream.class_names is not None:
            classes, labels = list(stream.class_names), [int(v) for v in stream.raw_labels]
        else:
            classes, index = _class_names(stream.raw_labels)
            labels = [index[v] for v in stream.raw_labels]
    if classes:
        _note_sorted(stream, labels, len(classes))
    stream.raw_labels = []  # not pickled into every data worker
    return ImageList(stream.spec, RowNames(stream, n=n), labels, classes, stream)


def _note_sorted(stream: Stream, labels: Sequence[int], classes: int) -> None:
    """A note when the shards look sorted by class (each holds a few classes): a shuffle
    buffer and --limit then see few classes at a time."""
    offsets = stream.offsets
    per_shard = [len(set(labels[offsets[i] : offsets[i + 1]])) for i in range(len(offsets) - 1)]
    typical = float(np.median(per_shard)) if per_shard else 0.0
    if classes >= 10 and typical <= max(2.0, classes / 20):
        logging.getLogger(__name__).info(
            "%s: its shards look sorted by class (a typical shard holds %d of %d classes): "
            "batches and --limit subsets will see few classes; write the shards shuffled",
            stream.spec,
            typical,
            classes,
        )


# More shards than any dataset is split into; a brace pattern asking for more is a typo, refused
# before its ranges are expanded (braceexpand builds each {lo..hi} range as a list).
MAX_SHARDS = 100_000
_BRACE_RANGE = re.compile(r"\{([^{},.]*)\.\.([^{},.]*)(?:\.\.[^{},]*)?\}")


def expand_shards(pattern: str, spec: str) -> list[str]:
    """The shard paths of a brace pattern (``shard-{000..099}.tar``), at most
    :data:`MAX_SHARDS`, refused in one line beyond that or when the pattern is empty."""
    from braceexpand import braceexpand

    for lo, hi in _BRACE_RANGE.findall(pattern):
        ints = [re.fullmatch(r"[+-]?[0-9]{1,12}", v.strip()) for v in (lo, hi)]
        too_long = max(len(lo), len(hi)) > 12
        if too_long or (all(ints) and abs(int(hi) - int(lo)) >= MAX_SHARDS):
            raise MimcliError(
                f"{spec}: the range {{{lo}..{hi}}} names more than {MAX_SHARDS} shards"
            )
    try:
        shards = list(itertools.islice(braceexpand(pattern), MAX_SHARDS + 1))
    except (ValueError, TypeError, RecursionError) as exc:
        raise MimcliError(f"{spec}: not a brace pattern of shards ({exc})") from exc
    if len(shards) > MAX_SHARDS:
        raise MimcliError(f"{spec}: the pattern names more than {MAX_SHARDS} shards")
    if not shards or not all(shards):
        raise MimcliError(f"{spec}: an empty shard name; e.g. wds/data/shard-{{000..009}}.tar")
    return shards


class WdsStream(Stream):
    """WebDataset tar shards (local paths or http(s) URLs), read with ``webdataset``."""

    def __init__(self, pattern: str, spec: str, columns: Columns) -> None:
        super().__init__(spec, columns)
        _need("webdataset", spec)
        self.shards = expand_shards(pattern, spec)
        self.image_field: str | None = None

    def _remote(self) -> bool:
        return self.shards[0].startswith(("http://", "https://"))

    def prepare(self, labelled: bool, what: str) -> None:
        if not self._remote():
            missing = [s for s in self.shards if not Path(s).is_file()]
            if missing:
                raise MimcliError(
                    f"{what} {self.spec}: {len(missing)} of {len(self.shards)} shards do not "
                    f"exist (first: {missing[0]})"
                )
        first = next(self._samples(0), None)
        if first is None:
            raise MimcliError(f"{what} {self.spec}: the first shard holds no samples")
        fields = [k for k in first if not k.startswith("__")]
        self.image_field = _image_column(fields, self.columns, self.spec, "--image-column")
        self.label_field = _column(fields, self.columns.label, LABEL_COLUMNS)
        if self.label_field is None and (labelled or self.columns.label):
            raise _missing_labels(self.spec, what, fields, self.columns)

    def _key(self) -> dict[str, Any]:
        files: list[Any] = []
        for s in self.shards:
            if self._remote():
                files.append(s)
            else:
                st = os.stat(s)
                files.append([os.path.abspath(s), st.st_size, st.st_mtime_ns])
        return {"wds": files, "label": self.label_field}

    def _samples(self, shard: int) -> Iterator[dict[str, Any]]:
        import tarfile

        from webdataset import tariterators

        url = self.shards[shard]
        try:
            yield from tariterators.tarfile_samples([{"url": url}])
        except (OSError, ValueError, tarfile.TarError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            error = RemoteError if self._remote() else MimcliError
            raise error(f"{self.spec}: cannot read shard {url} ({first})") from None

    def raw(self, shard: int, labels_only: bool = False) -> Iterator[tuple[Any, Any]]:
        if labels_only and not self._remote():  # the index of a local shard: headers only
            yield from ((None, _label_value(v)) for v in self._local_labels(shard))
            return
        for sample in self._samples(shard):
            label = sample.get(self.label_field) if self.label_field else None
            yield (None if labels_only else sample.get(self.image_field)), _label_value(label)

    def _local_labels(self, shard: int) -> Iterator[Any]:
        """The label field of each sample of a local shard, grouped as ``webdataset`` groups
        files into samples (consecutive files sharing the name up to the first dot of the base
        name; ``__meta__`` files skipped), reading tar headers and seeking past the images:
        indexing a local ImageNet takes seconds, not a pass over its bytes."""
        import re
        import tarfile

        from webdataset.tariterators import base_plus_ext

        path = self.shards[shard]
        try:
            with tarfile.open(path, mode="r:*") as tar:
                key, label = None, None
                for member in tar:
                    name = member.name
                    if not member.isreg() or re.match(r"__[^/]*__($|/)", name):
                        continue
                    prefix, suffix = base_plus_ext(name)
                    if prefix is None:
                        continue
                    if prefix != key:
                        if key is not None:
                            yield label
                        key, label = prefix, None
                    if self.label_field and suffix.lower() == self.label_field:
                        handle = tar.extractfile(member)
                        label = handle.read() if handle is not None else None
                if key is not None:
                    yield label
        except (OSError, tarfile.TarError) as exc:
            raise MimcliError(f"{self.spec}: cannot read shard {path} ({exc})") from None


def _label_value(label: Any) -> Any:
    """A shard's label file (text bytes) as an int when it is one, else as text."""
    if isinstance(label, (bytes, bytearray)):
        text = label.decode("utf-8", "replace").strip()
        return int(text) if re.fullmatch(r"-?[0-9]{1,18}", text) else text
    return label


class HubStream(Stream):
    """A Hub dataset streamed through ``datasets`` (``streaming=True``): its data files are the
    shards."""

    def __init__(self, name: str, split: str, spec: str, columns: Columns) -> None:
        super().__init__(spec, columns)
        datasets = _need("datasets", spec)
        try:
            with _bars(datasets):
                self.ds = datasets.load_dataset(name, split=split, streaming=True)
        except Exception as exc:  # noqa: BLE001 - mapped to one line
            raise _dataset_error(exc, spec) from None
        self.name_split = (name, split)
        self.shards = [f"{spec}@shard{i}" for i in range(self.ds.n_shards)]
        self.image_col: str | None = None

    def prepare(self, labelled: bool, what: str) -> None:
        import datasets

        features = self.ds.features
        names = list(features) if features is not None else []
        self.image_col = _image_column(names, self.columns, self.spec, "--image-column")
        self.label_field = _column(names, self.columns.label, LABEL_COLUMNS)
        if self.label_field is None and (labelled or self.columns.label):
            raise _missing_labels(self.spec, what, names, self.columns)
        feature = features.get(self.label_field) if self.label_field else None
        if isinstance(feature, datasets.ClassLabel):
            self.class_names = list(feature.names)
        image = features[self.image_col]
        if isinstance(image, datasets.Image) and image.decode:
            self.ds = self.ds.cast_column(self.image_col, datasets.Image(decode=False))

    def _key(self) -> dict[str, Any]:
        from huggingface_hub import HfApi

        try:
            sha = HfApi().dataset_info(self.name_split[0]).sha
        except Exception:  # noqa: BLE001 - the index is then keyed on the name only
            sha = None
        return {"hfids": list(self.name_split), "sha": sha, "label": self.label_field}

    def _labels_only(self) -> Any:
        """The stream of the label column alone: parquet files are read for that column only
        (``columns=``, the parquet reader's projection), not their images."""
        import datasets

        if getattr(self, "_label_ds", None) is not None:
            return self._label_ds
        self._label_ds = self._label_stream(datasets)
        return self._label_ds

    def _label_stream(self, datasets: Any) -> Any:
        if self.label_field is None:
            return self.ds.select_columns([self.image_col])
        name, split = self.name_split
        try:
            with _bars(datasets):
                ds = datasets.load_dataset(
                    name, split=split, streaming=True, columns=[self.label_field]
                )
            if ds.n_shards == self.ds.n_shards:
                return ds
        except (TypeError, ValueError):  # not parquet: no projection
            pass
        return self.ds.select_columns([self.label_field])

    def raw(self, shard: int, labels_only: bool = False) -> Iterator[tuple[Any, Any]]:
        if labels_only:
            part = self._labels_only().shard(num_shards=self.ds.n_shards, index=shard)
        else:
            cols = [c for c in (self.image_col, self.label_field) if c]
            part = self.ds.select_columns(cols).shard(num_shards=self.ds.n_shards, index=shard)
        # .iter(), not iteration: in a DataLoader worker, iterating a datasets IterableDataset
        # splits its files among the workers again (one file here: the others would get none)
        for batch in part.iter(batch_size=64):
            columns = list(batch.values())
            labels = batch.get(self.label_field) if self.label_field else None
            for i in range(len(columns[0])):
                label = labels[i] if labels is not None else None
                yield (None if labels_only else batch[self.image_col][i]), label
