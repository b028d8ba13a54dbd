"""Probe and eval results (mimcli.results): typed round trips through probe.json/results.json,
one clear line for files that are not ours, and the refined-run marker of eval columns."""

import json

import pytest

from mimcli.errors import MimcliError
from mimcli.results import (
    REFINED_SUFFIX,
    BlockScore,
    EvalResult,
    ModelEval,
    ProbeResult,
    Recommendation,
    load_eval,
    load_probe,
    read_probe_json,
    save_eval_json,
    save_probe_json,
)


def probe_result() -> ProbeResult:
    return ProbeResult(
        model="m",
        arch="vit",
        format="timm",
        num_blocks=2,
        k=10,
        tau=0.07,
        train_images=30,
        val_images=12,
        num_classes=3,
        blocks=[BlockScore(1, 50.0, 55.5), BlockScore(2, 61.25, 60.0)],
        final_norm=BlockScore(2, 62.0, 59.0),
        recommendation=Recommendation([1, 2], 2, 61.25, "rule"),
        seconds={"load": 0.5},
    )


def test_probe_round_trip_keeps_every_value(tmp_path):
    result = probe_result()
    path = save_probe_json(result, tmp_path / "probe")
    assert path.name == "probe.json"
    back = load_probe(tmp_path / "probe")  # a folder means its probe.json
    assert back == result
    assert back.blocks[1].cls == 61.25 and back.final_norm == BlockScore(2, 62.0, 59.0)
    assert read_probe_json(path)["recommendation"]["blocks"] == [1, 2]


def test_probe_reader_refuses_other_json(tmp_path):
    bad = tmp_path / "probe.json"
    for text in ("{", json.dumps({"blocks": []}), json.dumps({"recommendation": {"blocks": "x"}})):
        bad.write_text(text)
        with pytest.raises(MimcliError, match="not a probe.json written by mimcli probe"):
            read_probe_json(bad)


def test_eval_round_trip_ignores_unknown_keys_and_marks_refined_runs(tmp_path):
    result = EvalResult(
        models=[
            ModelEval("base", "base", "vit", False, knn={"cls": {"20": 80.5}}),
            ModelEval("run", f"runs/x{REFINED_SUFFIX}", "vit", True, lowshot={"1": {}}),
        ],
        train_images=10,
        val_images=5,
        num_classes=2,
        protocols=["knn"],
        ks=[20],
    )
    save_eval_json(result, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    data["from_the_future"] = 1
    data["models"][0]["new_metric"] = {}
    (tmp_path / "results.json").write_text(json.dumps(data))
    back = load_eval(tmp_path)
    assert back == result
    assert [m.refined_run for m in back.models] == [None, "runs/x"]
    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(MimcliError, match="not a results.json written by mimcli eval"):
        load_eval(tmp_path / "results.json")
