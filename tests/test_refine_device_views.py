"""``refine --augment-on device`` end to end: workers decode into canvases, the loop makes the
views on the training device (mimcli.augment), seeded per (seed, epoch key, image) so a resumed
run is exact; objectives that make their own views say so in one line."""

from __future__ import annotations

import json

import torch

from mimcli.views import ViewBatch
from tests.objective_harness import (
    check_resume,
    first_batch,
    refine_cli,
    tiny_cfg,
    tiny_run_args,
)


def test_device_views_resume_exactly(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    args = [str(tiny_model_dir), *tiny_run_args(data_dir), "--augment-on", "device",
            "--local-crops", "2", "--blocks", "last2"]  # fmt: skip
    check_resume(tmp_path, args, monkeypatch)
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["config"]["augment_on"] == "device"


def test_device_views_match_the_cpu_views_in_layout(tiny_model_dir, data_dir, tmp_path):
    """Same view sizes and count, normalised alike; different pixels (other filters), the same
    images; the batch the workers make holds uint8 canvases and their valid sizes."""
    from mimcli.refine.loop import Refiner

    cpu = Refiner(tiny_cfg(tiny_model_dir, data_dir, tmp_path / "a", "nna", local_crops=2))
    dev = Refiner(
        tiny_cfg(
            tiny_model_dir, data_dir, tmp_path / "b", "nna", local_crops=2, augment_on="device"
        )
    )
    a = first_batch(cpu)
    raw = first_batch(dev)
    canvas, valid = raw.views
    assert canvas.dtype == torch.uint8 and canvas.shape[-1] == canvas.shape[-2]
    assert valid.tolist() == [[32, 32]] * len(valid)  # 32 px images fit the canvas as they are
    b = dev.make_views(raw, "refine", 0)
    assert isinstance(b, ViewBatch) and torch.equal(a.indices, b.indices)
    assert [v.shape for v in a.views] == [v.shape for v in b.views]
    for x, y in zip(a.views, b.views, strict=True):
        assert not torch.equal(x, y)
        assert abs(float(x.mean()) - float(y.mean())) < 0.5 and abs(x.std() - y.std()) < 0.5
    # the views are a function of (seed, epoch key, image): the same batch again, the same views
    again = dev.make_views(first_batch(dev), "refine", 0)
    assert all(torch.equal(x, y) for x, y in zip(b.views, again.views, strict=True))
    later = dev.make_views(first_batch(dev), "refine", dev.per_epoch)  # another epoch's key
    assert not torch.equal(b.views[0], later.views[0])


def test_objectives_with_their_own_views_say_so(tiny_model_dir, data_dir, tmp_path):
    args = [str(tiny_model_dir), *tiny_run_args(data_dir), "--objective", "conmim",
            "--augment-on", "device", "--out", str(tmp_path / "c")]  # fmt: skip
    from tests.test_cli import one_line_error

    line = one_line_error(refine_cli(args))
    assert "--objective conmim makes its own views: use --augment-on cpu" in line
    bad = refine_cli([*args[:-1], str(tmp_path / "d"), "--augment-on", "gpu"])
    assert "--augment-on must be one of cpu, device" in one_line_error(bad)
