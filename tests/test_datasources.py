"""Images from datasets and shards (mimcli.datasources, mimcli.streams): a Hub dataset through
the real ``datasets`` + ``huggingface_hub`` clients on the loopback Hub, a local parquet folder, a
``save_to_disk`` dataset, WebDataset shards from files and over HTTP. Each holds the same images
as a folder, so probe, eval and refine must give the folder's numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mimcli.data import scan_folder, subsample
from mimcli.datasources import Columns, open_images
from mimcli.errors import MimcliError
from tests.datafixtures import dataset_of, push_dataset, write_parquet, write_shards
from tests.fileserver import FileServer

pytest.importorskip("datasets")
pytest.importorskip("webdataset")


def pixels(images, i):
    return np.asarray(images.open(i))


def test_every_source_reads_the_folders_images(image_folders, tmp_path):
    train, _ = image_folders
    folder = scan_folder(train)
    pq = write_parquet(train, tmp_path / "pq")
    saved = tmp_path / "saved"
    dataset_of(train).save_to_disk(str(saved))
    for spec in (str(pq), str(saved)):
        images = open_images(spec, labelled=True, what="--train")
        assert not images.streaming
        assert images.labels == folder.labels and images.classes == folder.classes
        for i in (0, 7, len(folder) - 1):
            assert np.array_equal(pixels(images, i), pixels(folder, i))
        assert images.paths[3] == f"{spec}[3]"
    pattern = write_shards(train, tmp_path / "wds", per_shard=7)
    shards = open_images("wds/" + pattern, labelled=True, what="--train")
    assert shards.streaming and len(shards) == len(folder)
    assert shards.labels == folder.labels
    assert shards.classes == [str(c) for c in range(3)]  # raw values, sorted
    assert shards.reader.counts == [7, 7, 7, 7, 2]
    assert shards.paths[8].endswith("shard-000001.tar#1")
    # an unlabelled dataset serves refine but not probe
    bare = write_parquet(train, tmp_path / "bare", labels=False)
    assert open_images(str(bare), labelled=False, what="--data").labels[0] == -1
    with pytest.raises(MimcliError, match="no label column .*--label-column"):
        open_images(str(bare), labelled=True, what="--train")
    with pytest.raises(MimcliError, match="no column 'pixels'.*--image-column"):
        open_images(str(pq), labelled=True, what="--train", columns=Columns(image="pixels"))
    # labels that are not one class per image (missing, lists): fine unread, one line if needed
    import datasets

    ds = dataset_of(train, labels=False)
    odd = ds.add_column("label", [None] + [1] * (len(ds) - 1))
    odd = odd.add_column("labels", [[0, 1]] * len(ds))
    odd.save_to_disk(str(tmp_path / "odd"))
    assert isinstance(odd.features["label"], datasets.Value)
    assert open_images(str(tmp_path / "odd"), labelled=False, what="--data").labels[1] == -1
    with pytest.raises(MimcliError, match="column 'label' is not one class per image"):
        open_images(str(tmp_path / "odd"), labelled=True, what="--train")


def test_stream_limit_is_the_first_samples_of_a_seeded_shard_order(image_folders, tmp_path):
    train, _ = image_folders
    shards = open_images("wds/" + write_shards(train, tmp_path / "w", 5), labelled=True, what="x")
    a, b = subsample(shards, 8, seed=0), subsample(shards, 8, seed=0)
    assert a.rows == b.rows and len(a) == 8
    starts = {r // 5 for r in a.rows}
    assert len(starts) == 2  # one whole shard of 5 and 3 of the next
    assert subsample(shards, 8, seed=1).rows != a.rows


def probe(model, train, val, workers=0, **kw):
    from mimcli.probe import ProbeConfig, run_probe

    cfg = ProbeConfig(model=str(model), train=train, val=val, k=5, num_workers=workers, **kw)
    return [(b.block, b.cls, b.patch) for b in run_probe(cfg).blocks]


def eval_knn(model, train, val, workers=0):
    from mimcli.evaluate.runner import EvalConfig, run_eval

    cfg = EvalConfig(
        models=[str(model)],
        train=train,
        val=val,
        protocols=("knn",),
        ks=(5,),
        num_workers=workers,
        cache=False,
    )
    knn = run_eval(cfg).models[0].knn
    assert knn
    return knn


def test_probe_on_parquet_and_shards_matches_the_folder(tiny_model_dir, image_folders, tmp_path):
    train, val = image_folders
    want = probe(tiny_model_dir, train, val)
    pq_train, pq_val = write_parquet(train, tmp_path / "pt"), write_parquet(val, tmp_path / "pv")
    assert probe(tiny_model_dir, str(pq_train), str(pq_val)) == want
    folder_knn = eval_knn(tiny_model_dir, train, val)
    assert eval_knn(tiny_model_dir, str(pq_train), str(pq_val)) == folder_knn
    wds_train = "wds/" + write_shards(train, tmp_path / "wt", per_shard=8)
    wds_val = "wds/" + write_shards(val, tmp_path / "wv", per_shard=4)
    assert probe(tiny_model_dir, wds_train, wds_val) == want
    assert eval_knn(tiny_model_dir, wds_train, wds_val) == folder_knn
    # two workers, each reading every other shard: other order, same numbers
    assert probe(tiny_model_dir, wds_train, wds_val, batch_size=5, workers=2) == want


def test_eval_on_a_hub_dataset_and_its_stream_matches_the_folder(
    hub, tiny_model_dir, image_folders, tmp_path
):
    train, val = image_folders
    push_dataset(hub, "someone/tiny-set", {"train": train, "validation": val})

    def knn(train_spec, val_spec, workers=0):
        return eval_knn(tiny_model_dir, train_spec, val_spec, workers)

    want = knn(train, val)
    assert want and knn("hfds/someone/tiny-set", "hfds/someone/tiny-set:validation") == want
    assert knn("hfids/someone/tiny-set", "hfids/someone/tiny-set:validation") == want
    # two data workers, a parquet file each (datasets must not split them again per worker)
    assert knn("hfids/someone/tiny-set", "hfids/someone/tiny-set:validation", workers=2) == want
    assert hub.count("GET", "tiny-set") > 0  # through the loopback Hub's HTTP routes
    hf = ("hfds/someone/tiny-set", "hfds/someone/tiny-set:validation")
    assert probe(tiny_model_dir, *hf) == probe(tiny_model_dir, train, val)
    # refine reads it at random (hfds: the folder's batches, so the folder's export) and streams
    # it (hfids: 2 shards, one lane)
    from mimcli.refine.pipeline import run_refine

    short = dict(head_steps=1, steps=2, val_limit=None)
    run_refine(refine_cfg(tiny_model_dir, train, tmp_path / "folder", val=val, **short))
    run_refine(refine_cfg(tiny_model_dir, hf[0], tmp_path / "hfds", val=hf[1], **short))
    a, b = export(tmp_path / "folder"), export(tmp_path / "hfds")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the k-NN monitor read --data and --val from the Hub too: the folder's numbers
    knn_logs = [
        [
            {k: v for k, v in r.items() if k.startswith("knn_")}
            for r in map(json.loads, (tmp_path / run / "metrics.jsonl").open())
            if "knn_ema_cls" in r
        ]
        for run in ("folder", "hfds")
    ]
    assert knn_logs[0] and knn_logs[0] == knn_logs[1]
    out = tmp_path / "run"
    run_refine(refine_cfg(tiny_model_dir, "hfids/someone/tiny-set", out, **short))
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["data"] == "hfids/someone/tiny-set"
    assert config["config"]["data_lanes"] == 1 and config["resolved"]["images"] == 30
    assert (out / "export" / "model.safetensors").is_file()


def test_shards_over_http(tiny_model_dir, image_folders, tmp_path):
    train, val = image_folders
    want = probe(tiny_model_dir, train, val)
    local = {
        split: write_shards(folder, tmp_path / split, per_shard=6, name=split)
        for split, folder in (("train", train), ("val", val))
    }
    with FileServer() as server:
        urls = {}
        for split, pattern in local.items():
            for tar in sorted((tmp_path / split).glob("*.tar")):
                server.add(f"/{split}/{tar.name}", tar.read_bytes())
            urls[split] = "wds/" + server.url + f"/{split}/" + pattern.rsplit("/", 1)[1]
        assert probe(tiny_model_dir, urls["train"], urls["val"]) == want
        assert server.gets(f"/train/{sorted((tmp_path / 'train').glob('*.tar'))[0].name}")
        assert eval_knn(tiny_model_dir, urls["train"], urls["val"]) == eval_knn(
            tiny_model_dir, train, val
        )
        from mimcli.refine.pipeline import run_refine

        out = tmp_path / "run"
        run_refine(refine_cfg(tiny_model_dir, urls["train"], out, head_steps=1, steps=2))
        assert (out / "export" / "model.safetensors").is_file()


def test_one_line_errors(tmp_path, image_folders, hub):
    train, _ = image_folders
    with pytest.raises(MimcliError, match="no such dataset"):
        open_images("hfds/someone/missing", labelled=True, what="--train")
    with pytest.raises(MimcliError, match="2 of 2 shards do not exist"):
        open_images(f"wds/{tmp_path}/none-{{0..1}}.tar", labelled=False, what="--data")
    push_dataset(hub, "someone/one-split", {"train": train})
    with pytest.raises(MimcliError, match="hfds/someone/one-split:test: .*test.*; name one as"):
        open_images("hfds/someone/one-split:test", labelled=True, what="--val")
    with pytest.raises(MimcliError, match="a folder of images has no splits"):
        open_images(f"{train}:test", labelled=True, what="--val")


# -- refinement --


def refine_cfg(model, data, out, **kw):
    """A tiny nna run (objective_harness.tiny_cfg) with heads on the last 2 blocks, 1 local crop."""
    from tests.objective_harness import tiny_cfg

    return tiny_cfg(model, data, out, "nna", **{"blocks": "last2", "local_crops": 1, **kw})


def export(run):
    from safetensors.torch import load_file

    return load_file(run / "export" / "model.safetensors")


def test_refine_on_parquet_equals_the_folder(tiny_model_dir, data_dir, tmp_path):
    """The same images in the same order as a parquet folder: the same batches and views, so
    a tensor-equal export."""
    from mimcli.refine.pipeline import run_refine

    pq = write_parquet(data_dir, tmp_path / "pq", shards=3)
    run_refine(refine_cfg(tiny_model_dir, data_dir, tmp_path / "folder"))
    run_refine(refine_cfg(tiny_model_dir, str(pq), tmp_path / "parquet"))
    a, b = export(tmp_path / "folder"), export(tmp_path / "parquet")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Position:
    """A stand-in for decoding: the sample is its position."""

    def __call__(self, record, key, position):
        return position


def positions(images, world, rank, lanes, start=0, total=9, workers=None):
    from torch.utils.data import DataLoader

    from mimcli.streams import StreamBatches

    batches = StreamBatches(
        images, Position(), list, seed=3, stage=1, start=start, total=total, batch_size=4,
        lanes=lanes, rank=rank, world=world,
    )  # fmt: skip
    loader = DataLoader(batches, batch_size=None, num_workers=lanes if workers is None else 0)
    return [[item[0] for item in batch] for batch in loader]


def test_stream_batches_are_disjoint_balanced_and_resumable(image_folders, tmp_path):
    """2 ranks x 2 lanes over 5 shards of 6 (30 samples, batch 4: 7 steps per epoch): the ranks
    read disjoint shards within an epoch, run the same steps (one wraps around), and a start at
    step k gives exactly the rest of the sequence."""
    from mimcli.streams import stream_lanes

    train, _ = image_folders
    images = open_images("wds/" + write_shards(train, tmp_path / "w", 6), labelled=False, what="x")
    per_rank = [positions(images, 2, r, 2, total=14) for r in (0, 1)]
    assert [len(p) for p in per_rank] == [14, 14]
    for epoch in (slice(0, 7), slice(7, 14)):
        seen = [{x for batch in p[epoch] for x in batch} for p in per_rank]
        assert not seen[0] & seen[1]
        shards = [{x // 6 for x in s} for s in seen]
        assert not shards[0] & shards[1]
    assert per_rank[0][:7] != per_rank[0][7:]  # a new seeded order each epoch
    # 5 shards over 2 ranks: 18 and 12 samples for 14 per epoch; the rank with 12 starts its
    # shards over (repeats), the other reads 14 different samples
    for epoch in (slice(0, 7), slice(7, 14)):
        for p in per_rank:
            got = [x for batch in p[epoch] for x in batch]
            held = 6 * len({x // 6 for x in got})
            assert (len(set(got)) < len(got)) == (held < 14), (held, got)
    for start in (3, 8):
        assert positions(images, 2, 0, 2, start=start, total=14) == per_rank[0][start:]
    # a single process reading in the main process makes the same batches as one lane
    one = positions(images, 1, 0, 1, total=7)
    assert positions(images, 1, 0, 1, total=7, workers=0) == one
    assert sorted(x for b in one for x in b) != list(range(28))  # shuffled
    with pytest.raises(MimcliError, match="5 shard\\(s\\) cannot give each of 2 process"):
        stream_lanes(images, 2, 3, explicit=True)
    assert stream_lanes(images, 2, 3, explicit=False) == 2


def test_resolve_workers(monkeypatch):
    from mimcli.runtime import resolve_workers, usable_cores

    assert resolve_workers("3") == (3, True) and resolve_workers(0) == (0, True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_workers("auto") == (usable_cores(), False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(usable_cores() * 4))
    assert resolve_workers("auto") == (1, False)
    with pytest.raises(MimcliError, match="--num-workers must be a count or auto"):
        resolve_workers("many")


def test_two_process_refine_on_shards_resumes_sample_exactly(tiny_model_dir, data_dir, tmp_path):
    """torchrun, 2 processes on gloo, wds shards: killed (SIGKILL) inside refinement and resumed,
    the export equals an uninterrupted run's tensor for tensor (each lane skips what it had
    consumed); both runs record one lane per rank."""
    import os

    from tests.objective_harness import kill_when, tiny_run_args, torchrun_refine

    pattern = "wds/" + write_shards(data_dir, tmp_path / "shards", per_shard=3)
    args = [str(tiny_model_dir), *tiny_run_args(data_dir), "--data", pattern, "--local-crops",
            "1", "--topk", "3", "--lr", "1e-3", "--steps", "10", "--num-workers", "1",
            "--blocks", "last2"]  # fmt: skip
    port = 29800 + os.getpid() % 100

    def launch(out, *extra):
        return torchrun_refine(args, out, 2, port, *extra)

    full = launch(tmp_path / "full")
    assert full.wait(timeout=240) == 0, full.stderr.read()[-3000:]
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["config"]["data_lanes"] == 1 and config["resolved"]["world_size"] == 2
    cut = launch(tmp_path / "cut")
    metrics = tmp_path / "cut" / "metrics.jsonl"
    done = kill_when(cut, metrics, 5)  # inside the refinement stage
    assert 5 <= done < 12, done
    resumed = launch(tmp_path / "cut", "--resume")
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read()[-3000:]
    a, b = export(tmp_path / "full"), export(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_columns_and_one_line_errors(tiny_model_dir, image_folders, tmp_path):
    """Named columns through the CLI; a dataset without labels for probe, an unknown worker
    count: one line, exit 2."""
    from typer.testing import CliRunner

    from mimcli.cli.app import app
    from tests.test_cli import one_line_error

    runner = CliRunner()
    train, val = image_folders
    specs = {}
    for split, folder in (("train", train), ("val", val)):
        ds = dataset_of(folder).rename_columns({"image": "photo", "label": "fine_label"})
        ds.save_to_disk(str(tmp_path / f"saved-{split}"))
        specs[split] = str(tmp_path / f"saved-{split}")
    base = ["probe", str(tiny_model_dir), "--train", specs["train"], "--val", specs["val"]]
    result = runner.invoke(app, [*base, "--json", "--num-workers", "0"])
    assert "no image column (it has photo, fine_label); name it with --image-column" in (
        one_line_error(result)
    )
    named = ["--image-column", "photo", "--label-column", "fine_label", "--json"]
    result = runner.invoke(app, [*base, *named, "--num-workers", "0", "--k", "5"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    folder = ["probe", str(tiny_model_dir), "--train", str(train), "--val", str(val)]
    result = runner.invoke(app, [*folder, "--json", "--num-workers", "0", "--k", "5"])
    want = json.loads(result.stdout)
    assert got["blocks"] == want["blocks"]
    bare = write_parquet(train, tmp_path / "bare", labels=False)
    result = runner.invoke(app, ["probe", str(tiny_model_dir), "--train", str(bare), "--val",
                                 str(val)])  # fmt: skip
    assert "labels are needed here" in one_line_error(result)
    result = runner.invoke(app, [*base, *named, "--num-workers", "lots"])  # refused when parsed
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Invalid value for '--num-workers': 'lots' is not auto or 0..1024" in result.output


def test_local_shard_index_reads_headers_as_webdataset_groups(image_folders, tmp_path):
    """The index of a local shard (tar headers, images skipped) lists the same samples and
    labels as webdataset's own full pass, odd samples included."""
    import webdataset as wds

    from mimcli.datasources import WdsStream

    train, _ = image_folders
    png = next(train.rglob("*.png")).read_bytes()
    with wds.TarWriter(str(tmp_path / "odd-0.tar")) as sink:
        sink.write({"__key__": "a/x0", "png": png, "cls": 2})
        sink.write({"__key__": "b", "png": png, "json": b"{}"})  # no label
        sink.write({"__key__": "c", "cls": 1})  # no image
        sink.write({"__key__": "d", "PNG": png, "CLS": b"7"})  # upper-case extensions
    pattern = write_shards(train, tmp_path / "w", per_shard=9)
    stream = WdsStream(f"{tmp_path}/odd-0.tar", "wds/odd", Columns())
    stream.prepare(labelled=False, what="--data")
    full = [label for _, label in stream.raw(0)]
    assert list(stream.raw(0, labels_only=True)) == [(None, v) for v in full]
    assert full == [2, None, 1, 7]
    stream = WdsStream(pattern, "wds/x", Columns())
    stream.prepare(labelled=True, what="--train")
    for shard in range(len(stream.shards)):
        full = [label for _, label in stream.raw(shard)]
        assert [v for _, v in stream.raw(shard, labels_only=True)] == full


def test_a_changed_shard_and_worker_errors_are_one_line(tiny_model_dir, image_folders, tmp_path):
    """Remote shards are indexed by URL: one rewritten after it was indexed stops the worker
    reading it with one line (torch re-raises a worker's error with the worker's traceback;
    the CLI keeps the message)."""
    from typer.testing import CliRunner

    from mimcli.cli.app import app

    train, val = image_folders
    with FileServer() as server:
        specs = {}
        for split, folder, per in (("train", train, 8), ("val", val, 4)):
            pattern = write_shards(folder, tmp_path / split, per_shard=per, name=split)
            for tar in sorted((tmp_path / split).glob("*.tar")):
                server.add(f"/{split}/{tar.name}", tar.read_bytes())
            specs[split] = "wds/" + server.url + f"/{split}/" + pattern.rsplit("/", 1)[1]
        open_images(specs["train"], labelled=True, what="--train")  # indexed and cached
        write_shards(train, tmp_path / "other", per_shard=5)
        server.add(
            "/train/train-000000.tar", sorted((tmp_path / "other").glob("*.tar"))[0].read_bytes()
        )
        result = CliRunner().invoke(
            app, ["probe", str(tiny_model_dir), "--train", specs["train"], "--val", specs["val"],
                  "--num-workers", "1"],
        )  # fmt: skip
    # it fails mid-run: the model note and a progress bar came first, then one error line
    assert result.exit_code == 2 and "Traceback" not in result.output + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0].split(": ", 1)[1][-40:])
    assert "train-000000.tar holds 5 samples, its index 8; the shards changed" in errors[0]


def test_auto_lanes_split_each_ranks_shards_evenly():
    """--num-workers auto: lanes that divide each rank's shards when that keeps at least half of
    the workers (ImageNet's 1024 shards on 8 ranks with 12 cores each: 8 lanes of 16 shards)."""
    from types import SimpleNamespace

    from mimcli.streams import stream_lanes

    class Shards:
        streaming = True

        def __init__(self, n):
            self.offsets = np.arange(n + 1) * 10

    def lanes(shards, world, workers, explicit=False):
        images = SimpleNamespace(reader=Shards(shards), rows=None, root="wds/x")
        return stream_lanes(images, world, workers, explicit)

    assert lanes(1024, 8, 12) == 8 and lanes(1024, 8, 12, explicit=True) == 12
    assert (
        lanes(64, 8, 3) == 2 and lanes(1000, 8, 7) == 5 and lanes(1016, 8, 7) == 7
    )  # 127 each: prime
    assert lanes(12, 8, 4) == 1  # fewer shards than ranks x workers: one each


def test_class_sorted_shards_get_a_note(tmp_path, caplog):
    import logging

    from tests.conftest import write_image_folder

    folder = write_image_folder(tmp_path / "ten", per_class=2, classes=10, size=8)
    with caplog.at_level(logging.INFO, logger="mimcli"):
        open_images("wds/" + write_shards(folder, tmp_path / "w", 2), labelled=True, what="x")
    assert "shards look sorted by class (a typical shard holds 1 of 10 classes)" in caplog.text
