"""A run's settings before any work (mimcli.refine.setup): option checks, objective defaults,
options a resumed run takes from its folder, and the resume checks."""

from dataclasses import replace
from pathlib import Path

import pytest

from mimcli.errors import MimcliError
from mimcli.refine.config import RefineConfig
from mimcli.refine.setup import (
    check_resume,
    fill_defaults,
    resume_num_heads,
    validate,
    with_saved_options,
)
from mimcli.runs import RunFolder


def cfg(tmp_path: Path, **kw) -> RefineConfig:
    return RefineConfig(model="m", data=tmp_path / "data", out=tmp_path / "run", **kw)


def test_options_left_unset_take_the_objectives_defaults(tmp_path):
    nna = fill_defaults(cfg(tmp_path), depth=12, embed_dim=768)
    assert (nna.blocks, nna.local_crops, nna.lr, nna.head_input) == ("auto", 10, 4e-4, "cls")
    nnclr = fill_defaults(cfg(tmp_path, objective="nnclr"), depth=12, embed_dim=768)
    assert (nnclr.blocks, nnclr.freeze_blocks, nnclr.temperature) == ("last1", 6, 0.15)
    given = fill_defaults(cfg(tmp_path, objective="nnclr", lr=1e-3), depth=12, embed_dim=768)
    assert given.lr == 1e-3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"objective": "simclr"}, "--objective 'simclr': choose one of nna, nnclr"),
        ({"batch_size": 1}, "--batch-size must be at least 2"),
        ({"momentum": 1.0}, "--momentum must lie in [0, 1), got 1.0"),
        ({"mask_ratio": 0.0}, "--mask-ratio must lie strictly between 0 and 1, got 0.0"),
        ({"resume": True}, "--resume: no checkpoint in"),
    ],
)
def test_bad_options_are_one_line_before_any_work(tmp_path, options, message):
    with pytest.raises(MimcliError) as err:
        validate(cfg(tmp_path, **options), 1, RunFolder(tmp_path / "run"))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_resume_takes_unset_options_from_the_run_and_keeps_given_ones(tmp_path):
    run = RunFolder(tmp_path / "run")
    saved = cfg(tmp_path, objective="nnclr", lr=3e-4, teacher=["t"], global_scale=(0.3, 1.0))
    run.write_config({"config": {**saved.__dict__, "data": "/old/data", "out": "/elsewhere"}})
    now = cfg(tmp_path, resume=True, lr=5e-4)
    merged = with_saved_options(now, given={"lr", "data"})
    assert merged.objective == "nnclr" and merged.lr == 5e-4 and merged.teacher == ["t"]
    assert merged.global_scale == (0.3, 1.0) and merged.data == tmp_path / "data"
    assert merged.out == tmp_path / "run"  # never taken from the record
    assert with_saved_options(now, given=None) == now
    with pytest.raises(MimcliError, match="options differ from the run.*--lr 0.0003 -> 0.0005"):
        check_resume(merged, run)
    with pytest.raises(MimcliError, match="is a --objective nnclr run"):
        check_resume(cfg(tmp_path, resume=True), run)


def test_resume_keeps_the_head_count_the_run_was_read_with(tmp_path):
    """A MODEL given again without its #heads= suffix (or with another --num-heads) would load
    the same weights with another head count: the resume check refuses it."""
    run = RunFolder(tmp_path / "run")
    saved = replace(cfg(tmp_path), model="ckpt.pth#heads=4")
    record = {**saved.__dict__, "data": "/data", "out": "/run"}
    run.write_config({"config": record, "resolved": {"num_heads": 4}})
    again = replace(cfg(tmp_path, resume=True), model="ckpt.pth")
    check_resume(again, run, num_heads=4)
    with pytest.raises(MimcliError) as err:
        check_resume(again, run, num_heads=2)
    message = str(err.value)
    assert "read with 4 attention heads, it now loads with 2" in message
    assert "resume with the run's MODEL (ckpt.pth#heads=4)" in message
    # unset, --num-heads comes from the run's record (the count its MODEL was read with), so a
    # MODEL given again without its suffix loads as it did; a given count is kept
    assert resume_num_heads(again, run) == 4
    assert resume_num_heads(replace(again, num_heads=8), run) == 8
    assert resume_num_heads(replace(again, resume=False), run) is None
    run.write_config({"config": {**record, "num_heads": 4}, "resolved": {}})
    assert with_saved_options(again, given={"model"}).num_heads == 4
