"""Experiment trackers (``--tracker``): TensorBoard, Weights & Biases, MLflow and Trackio behind
one small interface, each library imported only when named. ``refine`` sends them what it writes
to ``metrics.jsonl`` and keeps their run ids in ``RUN/trackers.json`` so that ``--resume`` goes
on in the same tracker runs; ``eval`` sends its final metrics and plots."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mimcli.errors import MimcliError
from mimcli.fileio import write_json
from mimcli.results import EvalResult

# the trackers, each the name of the package it needs and of the extra that installs it
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
STATE_FILE = "trackers.json"  # in the run folder: what reopens each tracker's run on --resume
PROJECT = "mimcli"  # W&B project, MLflow experiment and Trackio project unless the user set one
PARAM_LENGTH = 500  # older MLflow servers refuse longer parameter values (newer: 6000)

log = logging.getLogger(__name__)


def check_trackers(names: Sequence[str]) -> list[str]:
    """``names`` without repeats, each a known tracker whose package is installed (one line
    naming the extra otherwise)."""
    unique = list(dict.fromkeys(names))
    for name in unique:
        if name not in TRACKERS:
            raise MimcliError(f"--tracker {name!r}: choose from {', '.join(TRACKERS)}")
        if importlib.util.find_spec(name) is None:
            raise MimcliError(_missing(name))
    return unique


def _missing(name: str) -> str:
    return f"--tracker {name} needs the {name} package: pip install 'mimcli[{name}]'"


def _require(name: str) -> Any:
    """The tracker's package, or one line naming its extra."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MimcliError(_missing(name)) from None


@contextlib.contextmanager
def _to_stderr() -> Iterator[None]:
    """Trackers print banners on stdout, which mimcli keeps for results (``--json``)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float]:
    """A nested config as ``{"a/b": scalar}`` (lists and None as JSON text), for the trackers
    whose hyper-parameters are flat (TensorBoard, MLflow)."""
    out: dict[str, str | int | float] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_params(value, f"{name}/"))
        elif isinstance(value, bool):
            out[name] = str(value)
        elif isinstance(value, int | float | str):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a ``metrics.jsonl`` record, except its ``step`` (the x axis)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step"
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


def eval_scalars(result: EvalResult) -> dict[str, float]:
    """An eval's final metrics as ``MODEL/metric``: ``knn_cls_k20``, ``linear_best``,
    ``lowshot_1-shot`` (mean over splits, ``_std`` beside), ``cluster_nmi``..."""
    out: dict[str, float] = {}
    for model in result.models:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.name).strip("_") or "model"
        values: dict[str, Any] = {}
        for kind, per_k in model.knn.items():
            values.update({f"knn_{kind}_k{k}": acc for k, acc in per_k.items()})
        if model.linear.get("best"):
            values["linear_best"] = model.linear["best"]["val_acc"]
        for key, cell in model.lowshot.items():
            setting = key.replace("%", "pct")
            values[f"lowshot_{setting}"] = cell["mean"]
            values[f"lowshot_{setting}_std"] = cell["std"]
        values.update({f"cluster_{k}": v for k, v in model.cluster.items()})
        out.update({f"{name}/{k}": v for k, v in scalars(values).items()})
    return out


@dataclass(frozen=True)
class Resume:
    """How a tracker reopens the run it had before ``--resume``.

    Attributes:
        state: what its ``start`` returned then (ids, paths), from ``trackers.json``.
        next_step: the first global step the resumed run logs (the checkpoint's next step).
    """

    state: dict[str, Any]
    next_step: int


class Tracker:
    """One tracking library: ``start`` opens a run (a new one, or the one ``resume`` names) and
    returns what reopens it; ``log`` sends scalars at a global step; ``log_images`` PNG files;
    ``finish`` closes the run."""

    name = ""
    rewinds = False  # True: on resume it drops what it holds from next_step on (TensorBoard)

    def __init__(self, run_name: str) -> None:
        self.run_name = run_name

    def start(
        self, config: Mapping[str, Any], run_dir: Path | None, resume: Resume | None
    ) -> dict[str, Any]:
        raise NotImplementedError

    def where(self) -> str:
        """Where the run is, for the note printed at start."""
        return ""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        raise NotImplementedError

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        raise NotImplementedError

    def finish(self, failed: bool = False) -> None:
        raise NotImplementedError


class TensorBoard(Tracker):
    """Event files in ``RUN/tensorboard/``; a resumed run writes a new file in the same folder
    that tells readers to drop what the earlier files hold from the checkpoint on."""

    name = "tensorboard"
    rewinds = True

    def start(
        self, config: Mapping[str, Any], run_dir: Path | None, resume: Resume | None
    ) -> dict[str, Any]:
        _require(self.name)
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        log_dir = str(run_dir / "tensorboard") if run_dir is not None else None
        purge = resume.next_step if resume is not None else None
        self.writer = SummaryWriter(log_dir, purge_step=purge, flush_secs=30)
        if resume is None:  # hyper-parameters once, in the same event file as the scalars
            for summary in hparams(flat_params(config), {}):
                self.writer.file_writer.add_summary(summary)
            text = json.dumps(dict(config), indent=2, default=str)
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)
        return {"log_dir": self.writer.log_dir}

    def where(self) -> str:
        return self.writer.log_dir

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        import numpy as np
        from PIL import Image

        for tag, path in images.items():
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def finish(self, failed: bool = False) -> None:
        self.writer.close()


class WandB(Tracker):
    """Weights & Biases, offline (``RUN/wandb/``, ``wandb sync`` uploads it) unless
    ``WANDB_MODE`` says otherwise; ``--resume`` reopens the run by its id."""

    name = "wandb"

    def start(
        self, config: Mapping[str, Any], run_dir: Path | None, resume: Resume | None
    ) -> dict[str, Any]:
        wandb = _require(self.name)
        kwargs: dict[str, Any] = {
            "project": os.environ.get("WANDB_PROJECT") or PROJECT,
            "name": self.run_name,
            "config": dict(config),
            "settings": wandb.Settings(console="off"),
        }
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(run_dir)
        if "WANDB_MODE" not in os.environ:
            kwargs["mode"] = "offline"
        if resume is not None:
            kwargs.update(id=resume.state["id"], resume="allow", project=resume.state["project"])
        self.wandb = wandb
        with _to_stderr():
            self.run = wandb.init(**kwargs)
        return {"id": self.run.id, "project": self.run.project}

    def where(self) -> str:
        return f"project {self.run.project}, run {self.run.id} ({self.run.dir})"

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        self.run.log({k: self.wandb.Image(str(p)) for k, p in images.items()}, step=step)

    def finish(self, failed: bool = False) -> None:
        with _to_stderr():
            self.run.finish(exit_code=1 if failed else 0)


class MLflow(Tracker):
    """MLflow through its client: ``MLFLOW_TRACKING_URI`` when set, else ``RUN/mlflow.db``
    (SQLite; artifacts in ``RUN/mlartifacts/``); ``--resume`` reopens the run by its id."""

    name = "mlflow"

    def start(
        self, config: Mapping[str, Any], run_dir: Path | None, resume: Resume | None
    ) -> dict[str, Any]:
        _require(self.name)
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        own = uri is None and run_dir is not None  # a store of this run's own, in its folder
        if own:
            run_dir.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
        with _to_stderr():
            self.client = MlflowClient(tracking_uri=uri)
            if resume is not None:
                self.run_id = resume.state["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return {"run_id": self.run_id}
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                artifacts = (run_dir.resolve() / "mlartifacts").as_uri() if own else None
                experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
            self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
            params = [Param(k, str(v)[:PARAM_LENGTH]) for k, v in flat_params(config).items()]
            for first in range(0, len(params), 100):  # a batch holds at most 100 parameters
                self.client.log_batch(self.run_id, params=params[first : first + 100])
        return {"run_id": self.run_id}

    def where(self) -> str:
        uri = urlsplit(self.client.tracking_uri)  # never a password or token on the screen
        host = uri.netloc.rsplit("@", 1)[-1]
        return f"run {self.run_id} ({urlunsplit(uri._replace(netloc=host, query=''))})"

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        for path in images.values():
            self.client.log_artifact(self.run_id, str(path), artifact_path="plots")

    def finish(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class Trackio(Tracker):
    """Trackio's local SQLite database (``TRACKIO_DIR``, else under the Hugging Face home), or
    wherever ``TRACKIO_SPACE_ID`` / ``TRACKIO_SERVER_URL`` send it; a run is known by its name
    in the project, kept unique here so that ``--resume`` reopens this one."""

    name = "trackio"

    def start(
        self, config: Mapping[str, Any], run_dir: Path | None, resume: Resume | None
    ) -> dict[str, Any]:
        trackio = _require(self.name)
        self.trackio = trackio
        project = resume.state["project"] if resume is not None else PROJECT
        if resume is not None:
            name = resume.state["name"]
        else:
            try:
                taken = {run.name for run in trackio.Api().runs(project)}
            except ValueError:  # no such project yet
                taken = set()
            name = self.run_name
            for n in range(2, len(taken) + 2):
                if name not in taken:
                    break
                name = f"{self.run_name}-{n}"
        with _to_stderr():  # config again on resume: Trackio rewrites a resumed run's config
            self.run = trackio.init(
                project=project,
                name=name,
                config=dict(config),
                resume="allow" if resume is not None else "never",
                embed=False,
                auto_log_cpu=False,
                auto_log_gpu=False,
            )
        if resume is not None and self.run.id != resume.state.get("id"):
            warnings.warn(
                f"trackio: run {name} of project {project} was not found here; "
                "a new run of that name was started",
                stacklevel=2,
            )
        return {"project": project, "name": self.run.name, "id": self.run.id}

    def where(self) -> str:
        from trackio.utils import TRACKIO_DIR

        return f"project {self.run.project}, run {self.run.name} ({TRACKIO_DIR})"

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        self.run.log({k: self.trackio.Image(str(p)) for k, p in images.items()}, step=step)

    def finish(self, failed: bool = False) -> None:
        with _to_stderr():
            self.trackio.finish()


CLASSES: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoard,
    "wandb": WandB,
    "mlflow": MLflow,
    "trackio": Trackio,
}


class TrackerSet:
    """The trackers of one run as one (``--tracker`` repeated; empty when none was asked for).

    A tracker whose ``log`` fails is warned about once and left out from then on:
    ``metrics.jsonl`` stays the record and the run goes on.

    Args:
        trackers: started trackers, each with the last step it already holds from before a
            resume (-1: nothing; steps up to it are not sent again).
    """

    def __init__(self, trackers: Sequence[tuple[Tracker, int]] = ()) -> None:
        self.trackers = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        """The numbers of ``record`` (a ``metrics.jsonl`` record, or any flat dict) at ``step``."""
        values = scalars(record)
        self._each(lambda t: t.log(step, values), step)

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        self._each(lambda t: t.log_images(step, images), step)

    def _each(self, call: Any, step: int) -> None:
        for entry in list(self.trackers):
            tracker, held = entry
            if step <= held:
                continue
            try:
                call(tracker)
            except Exception as exc:
                warnings.warn(
                    f"--tracker {tracker.name} failed to log ({exc}); left out from now on, "
                    "metrics.jsonl has every record",
                    stacklevel=3,
                )
                self.trackers.remove(entry)
                with contextlib.suppress(Exception):
                    tracker.finish(failed=True)

    def finish(self, failed: bool = False) -> None:
        """Close every run, marked failed when the work did not end; a tracker that cannot
        close is warned about (the work's own outcome stands)."""
        for tracker, _ in self.trackers:
            try:
                tracker.finish(failed)
            except Exception as exc:
                warnings.warn(f"--tracker {tracker.name} failed to close ({exc})", stacklevel=2)
        self.trackers = []


def open_trackers(
    names: Sequence[str],
    run_dir: Path | None,
    config: Mapping[str, Any],
    *,
    run_name: str | None = None,
    resume_step: int | None = None,
    logged_through: int = -1,
) -> TrackerSet:
    """Start a run in each tracker of ``names`` and keep what reopens them in
    ``run_dir/trackers.json``.

    Args:
        names: tracker names (``TRACKERS``).
        run_dir: the run folder (log dirs and databases go there); None: each tracker's default.
        config: the hyper-parameters (a new tracker run records them).
        run_name: the runs' name; default the run folder's name.
        resume_step: with ``--resume``, the first global step the resumed run logs: trackers
            listed in ``trackers.json`` reopen their runs there.
        logged_through: with ``resume_step``, the last step the interrupted run logged; the
            reopened runs that cannot drop steps (all but TensorBoard) get none up to it again.
    """
    names = check_trackers(names)
    if not names:
        return TrackerSet()
    config = json.loads(json.dumps(config, default=str))  # paths, tuples: plain JSON values
    saved = read_state(run_dir) if resume_step is not None and run_dir is not None else {}
    run_name = run_name or (run_dir.resolve().name if run_dir is not None else PROJECT)
    state, started = dict(saved), []
    try:
        for name in names:
            tracker = CLASSES[name](run_name)
            prior = saved.get(name)
            resume = Resume(prior, int(resume_step)) if prior and resume_step is not None else None
            try:
                state[name] = tracker.start(config, run_dir, resume)
            except MimcliError:
                raise
            except Exception as exc:  # e.g. no login for online W&B, an unreachable server
                what = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise MimcliError(
                    f"--tracker {name}: could not open its run ({type(exc).__name__}: {what})"
                ) from exc
            held = logged_through if resume is not None and not tracker.rewinds else -1
            started.append((tracker, held))
            log.info("--tracker %s: %s", name, tracker.where())
    except BaseException:
        TrackerSet(started).finish(failed=True)
        raise
    if run_dir is not None:
        write_json(run_dir / STATE_FILE, state)
    return TrackerSet(started)


def read_state(run_dir: Path) -> dict[str, Any]:
    """``run_dir/trackers.json`` (empty when there is none)."""
    path = Path(run_dir) / STATE_FILE
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MimcliError(
            f"{path}: unreadable ({exc}); delete it to start new tracker runs"
        ) from None
    return state if isinstance(state, dict) else {}
