"""The same images as other sources: a parquet folder, a ``save_to_disk`` dataset, a Hub dataset
repo on the loopback Hub, WebDataset tar shards (written with ``webdataset``'s own writer).

Every builder keeps the folder's order (``mimcli.data.scan_folder``: classes sorted, files sorted)
and its bytes, so a source and its folder decode to the same pixels in the same order.
"""

from __future__ import annotations

from pathlib import Path

from mimcli.data import scan_folder


def folder_records(folder: Path) -> tuple[list[dict], list[int], list[str]]:
    images = scan_folder(folder)
    records = [{"bytes": Path(p).read_bytes(), "path": Path(p).name} for p in images.paths]
    return records, list(images.labels), list(images.classes)


def dataset_of(folder: Path, labels: bool = True):
    import datasets

    records, label_ids, classes = folder_records(folder)
    columns = {"image": records}
    features = {"image": datasets.Image()}
    if labels:
        columns["label"] = label_ids
        features["label"] = datasets.ClassLabel(names=classes)
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def write_parquet(folder: Path, out: Path, split: str = "train", shards: int = 2, **kw) -> Path:
    """``out/{split}-0000i-of-0000n.parquet`` (the Hub's naming), ``shards`` files."""
    out.mkdir(parents=True, exist_ok=True)
    ds = dataset_of(folder, **kw)
    for i in range(shards):
        part = ds.shard(shards, i, contiguous=True)
        part.to_parquet(out / f"{split}-{i:05d}-of-{shards:05d}.parquet")
    return out


def push_dataset(hub, repo: str, splits: dict[str, Path], shards: int = 2) -> None:
    """A parquet dataset repo (``data/{split}-*.parquet``) on the loopback Hub."""
    files = {}
    for split, folder in splits.items():
        out = write_parquet(folder, folder.parent / f".parquet-{split}", split, shards)
        files.update({f"data/{p.name}": p for p in sorted(out.glob("*.parquet"))})
    hub.add_repo(repo, files, repo_type="dataset")


def write_shards(folder: Path, out: Path, per_shard: int, name: str = "shard") -> str:
    """WebDataset shards ``out/{name}-000000.tar...`` of the folder's images (``png`` + ``cls``,
    in folder order); returns the brace pattern."""
    import webdataset as wds

    records, label_ids, _ = folder_records(folder)
    out.mkdir(parents=True, exist_ok=True)
    n = (len(records) + per_shard - 1) // per_shard
    for s in range(n):
        with wds.TarWriter(str(out / f"{name}-{s:06d}.tar")) as sink:
            for i in range(s * per_shard, min(len(records), (s + 1) * per_shard)):
                sink.write({"__key__": f"{i:06d}", "png": records[i]["bytes"], "cls": label_ids[i]})
    return str(out / f"{name}-{{{0:06d}..{n - 1:06d}}}.tar")
