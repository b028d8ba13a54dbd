"""``--tracker`` (mimcli.trackers): what refine and eval send to TensorBoard and Trackio (and to
MLflow and W&B when installed), read back from the files and databases they wrote; a resumed
refine goes on in the same tracker runs; a missing package is one line."""

from __future__ import annotations

import json
import sqlite3
import struct
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mimcli.cli.app import app
from mimcli.errors import MimcliError
from mimcli.refine.loop import Refiner
from mimcli.trackers import open_trackers, read_state
from tests.objective_harness import Interrupt, metric_steps, refine_cli, tiny_run_args

runner = CliRunner()
# some of what a tiny nna run's metrics.jsonl records hold: losses, schedule, speed, the
# objective's per-head metrics, the --val k-NN
SCALARS = ("loss", "lr", "images_per_s", "loss/4", "nn_sim/4", "knn_ema_cls", "knn_encoder_patch")


def records(run: Path) -> dict[int, dict]:
    """``metrics.jsonl`` by global step."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def tensorboard_events(log_dir: Path):
    """TensorBoard's own reader over every event file in ``log_dir`` (restarts purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def tensorboard_hparams(events) -> dict:
    """The hyper-parameters recorded in the session-start summary."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = HParamsPluginData.FromString(content).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def trackio_rows(state: dict) -> list[tuple[str, int, dict]]:
    """(run id, step, metrics) of every row Trackio's local database holds for ``state``'s run
    name (``trackers.json``'s trackio entry)."""
    from trackio.sqlite_storage import SQLiteStorage

    db = sqlite3.connect(SQLiteStorage.get_project_db_path(state["project"]))
    try:
        rows = db.execute(
            "SELECT run_id, step, metrics FROM metrics WHERE run_name = ? ORDER BY id",
            (state["name"],),
        ).fetchall()
    finally:
        db.close()
    return [(run_id, step, json.loads(metrics)) for run_id, step, metrics in rows]


def trackio_config(state: dict) -> dict:
    from trackio.sqlite_storage import SQLiteStorage

    db = sqlite3.connect(SQLiteStorage.get_project_db_path(state["project"]))
    try:
        rows = db.execute("SELECT config FROM configs WHERE run_id = ?", (state["id"],)).fetchall()
    finally:
        db.close()
    assert len(rows) == 1
    return json.loads(rows[0][0])


def test_refine_logs_every_record_and_resume_continues_the_same_runs(
    tiny_model_dir, data_dir, image_folders, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    args = [str(tiny_model_dir), *tiny_run_args(data_dir), "--out", str(out), "--log-every", "1"]
    args += ["--checkpoint-every", "2", "--val", str(image_folders[1])]  # k-NN at stage ends
    args += ["--tracker", "tensorboard", "--tracker", "trackio"]
    # global steps: head warm-up 0-1, refinement 2-4. Killed as it writes the checkpoint after
    # step 3: steps 0-3 are logged, the last checkpoint is the warm-up's (after step 1), so the
    # resumed run computes and logs steps 2 and 3 again
    real_save = Refiner.save

    def save_or_die(self, stage, done, *rest):
        if (stage, done) == ("refine", 2):
            raise Interrupt
        real_save(self, stage, done, *rest)

    monkeypatch.setattr(Refiner, "save", save_or_die)
    with pytest.raises(Interrupt):
        runner.invoke(app, ["refine", *args], catch_exceptions=False)
    monkeypatch.setattr(Refiner, "save", real_save)
    assert sorted(records(out)) == [0, 1, 2, 3]
    first = read_state(out)
    assert set(first) == {"tensorboard", "trackio"}
    before = {step: m["loss"] for _, step, m in trackio_rows(first["trackio"])}
    assert before == pytest.approx({s: r["loss"] for s, r in records(out).items()})

    # --resume without --tracker: the run's recorded trackers go on
    resumed = refine_cli([*args[: args.index("--tracker")], "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert metric_steps(out) == [0, 1, 2, 3, 4]
    final = records(out)
    assert read_state(out) == first  # the same runs, reopened

    # TensorBoard: one log dir, a second event file whose restart drops the first file's steps
    # from the checkpoint on; each step once, every value as metrics.jsonl has it
    log_dir = out / "tensorboard"
    assert Path(first["tensorboard"]["log_dir"]) == log_dir
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2
    events = tensorboard_events(log_dir)
    assert [s for s, r in sorted(final.items()) if "knn_ema_cls" in r] == [1, 4]
    for key in SCALARS:
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        expected = [(s, r[key]) for s, r in sorted(final.items()) if r.get(key) is not None]
        assert [s for s, _ in logged] == [s for s, _ in expected], key
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6), key
    ema = [e.step for e in events.Scalars("ema_decay")]
    assert ema == [s for s, r in sorted(final.items()) if r["stage"] == "refine"]
    hparams = tensorboard_hparams(events)
    assert hparams["config/batch_size"] == 8
    assert hparams["config/objective"] == "nna"
    assert hparams["resolved/steps/refine"] == 3

    # Trackio: one run (one id), steps 0-4 once each; the steps the interrupted run had already
    # logged keep those values, which the exact resume computed again
    rows = trackio_rows(first["trackio"])
    assert {run_id for run_id, _, _ in rows} == {first["trackio"]["id"]}
    assert [step for _, step, _ in rows] == [0, 1, 2, 3, 4]
    for _, step, logged in rows:
        assert logged["loss"] == pytest.approx(final[step]["loss"], rel=1e-12)
        assert "stage" not in logged and "step" not in logged
    assert rows[-1][2]["ema_decay"] == pytest.approx(final[4]["ema_decay"])
    assert rows[-1][2]["knn_ema_cls"] == pytest.approx(final[4]["knn_ema_cls"])
    config = trackio_config(first["trackio"])
    assert config["config"]["objective"] == "nna"
    assert config["resolved"]["steps"] == {"heads": 2, "refine": 3}


def test_eval_logs_final_metrics_and_plots(tiny_model_dir, image_folders, tmp_path):
    train, val = image_folders
    out = tmp_path / "eval"
    args = ["eval", str(tiny_model_dir), "--train", str(train), "--val", str(val)]
    args += ["--protocols", "knn,cluster", "--num-workers", "0", "--tracker", "tensorboard"]
    result = runner.invoke(app, [*args, "--tracker", "trackio", "--out", str(out)])
    assert result.exit_code == 0, result.output
    model = json.loads((out / "results.json").read_text())["models"][0]
    name = model["name"]
    knn = {
        f"{name}/knn_{kind}_k{k}": acc
        for kind, per_k in model["knn"].items()
        for k, acc in per_k.items()
    }
    assert len(knn) == 4
    cluster = {f"{name}/cluster_{key}": v for key, v in model["cluster"].items()}

    events = tensorboard_events(out / "tensorboard")
    for key, value in {**knn, **cluster}.items():
        (scalar,) = events.Scalars(key)
        assert (scalar.step, scalar.value) == (0, pytest.approx(value, rel=1e-6)), key
    (image,) = events.Images("knn")
    assert (image.width, image.height) > (100, 100)
    assert "lowshot" not in events.Tags()["images"]  # not evaluated: no plot

    state = read_state(out)["trackio"]
    assert state["name"].startswith("eval")
    rows = trackio_rows(state)  # the metrics, then the plots
    assert {(run_id, step) for run_id, step, _ in rows} == {(state["id"], 0)}
    logged = {k: v for _, _, metrics in rows for k, v in metrics.items()}
    assert {k: logged[k] for k in knn} == pytest.approx(knn)
    assert logged["knn"]["_type"] == "trackio.image"


def test_eval_without_out_draws_its_plots_for_the_tracker(
    tiny_model_dir, image_folders, tmp_path, monkeypatch
):
    from trackio.utils import TRACKIO_DIR

    monkeypatch.chdir(tmp_path)
    train, val = image_folders
    args = ["eval", str(tiny_model_dir), "--train", str(train), "--val", str(val)]
    args += ["--protocols", "knn", "--num-workers", "0", "--tracker", "trackio", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert list(tmp_path.glob("*.png")) == [] and not (tmp_path / "trackers.json").exists()
    printed = json.loads(result.stdout)  # trackio's banner went to stderr
    model = printed["models"][0]
    from trackio.sqlite_storage import SQLiteStorage

    db = sqlite3.connect(SQLiteStorage.get_project_db_path("mimcli"))
    try:
        rows = db.execute(  # the rows of the newest run: its metrics, then its plots
            "SELECT metrics FROM metrics WHERE run_id = "
            "(SELECT run_id FROM metrics ORDER BY id DESC LIMIT 1) ORDER BY id"
        ).fetchall()
    finally:
        db.close()
    logged = {k: v for (metrics,) in rows for k, v in json.loads(metrics).items()}
    assert logged[f"{model['name']}/knn_cls_k20"] == pytest.approx(model["knn"]["cls"]["20"])
    plot = Path(TRACKIO_DIR) / "media" / logged["knn"]["file_path"]
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_package_or_unknown_tracker_is_one_line(
    tiny_model_dir, data_dir, image_folders, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    out = tmp_path / "run"
    refine = refine_cli(
        [str(tiny_model_dir), *tiny_run_args(data_dir), "--out", str(out)] + ["--tracker", "wandb"]
    )
    assert refine.exit_code == 2
    assert refine.output.strip() == (
        "error: --tracker wandb needs the wandb package: pip install 'mimcli[wandb]'"
    )
    assert not (out / "config.json").exists()  # refused before any work
    train, val = image_folders
    unknown = runner.invoke(
        app,
        ["eval", str(tiny_model_dir), "--train", str(train), "--val", str(val)]
        + ["--tracker", "neptune"],
    )
    assert unknown.exit_code == 2
    assert unknown.output.strip() == (
        "error: --tracker 'neptune': choose from tensorboard, wandb, mlflow, trackio"
    )


def test_a_tracker_that_cannot_start_is_one_line(tmp_path):
    (tmp_path / "tensorboard").write_text("a file where the log dir goes")
    with pytest.raises(MimcliError, match=r"^--tracker tensorboard: could not open its run \("):
        open_trackers(["tensorboard"], tmp_path, {"config": {}})
    assert not (tmp_path / "trackers.json").exists()


def test_mlflow_run_reopened_by_id(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    config = {"config": {"batch_size": 8, "teacher": ["a", "b"]}, "resolved": {"lr": 1e-3}}
    trackers = open_trackers(["mlflow"], run, config)
    for step in range(4):
        trackers.log(step, {"stage": "heads", "step": step, "loss": 1.0 + step})
    trackers.finish(failed=True)  # an interrupted run
    state = read_state(run)["mlflow"]
    # resumed from the checkpoint at step 2; steps up to 3 were logged before
    trackers = open_trackers(["mlflow"], run, config, resume_step=2, logged_through=3)
    assert read_state(run)["mlflow"] == state
    for step in range(2, 6):
        trackers.log(step, {"loss": 10.0 + step})
    trackers.finish()

    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    logged = client.get_run(state["run_id"])
    assert logged.info.status == "FINISHED"
    assert logged.data.params == {
        "config/batch_size": "8",
        "config/teacher": '["a", "b"]',
        "resolved/lr": "0.001",
    }
    history = [(m.step, m.value) for m in client.get_metric_history(state["run_id"], "loss")]
    assert sorted(history) == [(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0), (4, 14.0), (5, 15.0)]
    assert len(client.search_runs([logged.info.experiment_id])) == 1


def wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file: a 7-byte header, then LevelDB-log framing
    (32 KiB blocks; each chunk: CRC, length, type; full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # the end, or a chunk still being written
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_wandb_records(path: Path) -> list:
    """``path``'s records once they end with the run's exit record: W&B's service process may
    still be writing the file when ``finish()`` returns."""
    deadline = time.monotonic() + 30
    while True:
        found = list(wandb_records(path))
        if found and found[-1].WhichOneof("record_type") == "exit":
            return found
        assert time.monotonic() < deadline, f"{path}: no exit record"
        time.sleep(0.1)


def test_wandb_offline_run_reopened_by_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    trackers = open_trackers(["wandb"], run, {"config": {"batch_size": 8}})
    for step in range(4):
        trackers.log(step, {"loss": 1.0 + step})
    trackers.finish()
    state = read_state(run)["wandb"]
    trackers = open_trackers(
        ["wandb"], run, {"config": {"batch_size": 8}}, resume_step=2, logged_through=3
    )
    for step in range(2, 6):
        trackers.log(step, {"loss": 10.0 + step})
    trackers.finish()

    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{state['id']}.wandb"] * 2  # offline, one id
    history, ids = [], set()
    for path in files:
        for record in finished_wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                config = {
                    u.key or "/".join(u.nested_key): json.loads(u.value_json)
                    for u in record.run.config.update
                }
                assert config["config"] == {"batch_size": 8}
            elif kind == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                history.append((items["_step"], items["loss"]))
    assert ids == {state["id"]}
    assert history == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 14), (5, 15)]
