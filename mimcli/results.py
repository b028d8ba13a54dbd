"""What ``probe`` and ``eval`` produce, as plain dataclasses with typed readers and writers of
``probe.json`` and ``results.json``. No torch here: reports, model cards and ``push`` read results
without loading the machinery that computed them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mimcli._version import __version__
from mimcli.errors import MimcliError
from mimcli.fileio import write_json

PROBE_FILE = "probe.json"
EVAL_FILE = "results.json"
# An eval column made from a refine run folder has the source "<run> (refined, export/)".
REFINED_SUFFIX = " (refined, export/)"


@dataclass
class BlockScore:
    block: int  # 1-based
    cls: float  # k-NN accuracy (%) on the CLS token
    patch: float  # k-NN accuracy (%) on the mean patch token


@dataclass
class Recommendation:
    blocks: list[int]  # 1-based
    peak_block: int
    peak_accuracy: float
    rule: str


@dataclass
class ProbeResult:
    model: str
    arch: str
    format: str
    num_blocks: int
    k: int
    tau: float
    train_images: int
    val_images: int
    num_classes: int
    blocks: list[BlockScore]
    final_norm: BlockScore | None
    recommendation: Recommendation
    seconds: dict[str, float]
    skipped_images: list[str] = field(default_factory=list)
    knn_backend: str = "faiss"
    device: str = "cpu"
    mimcli_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeResult:
        """Rebuild a result from ``probe.json`` (unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        rest = {k: v for k, v in data.items() if k in known}
        rest["blocks"] = [BlockScore(**b) for b in data.get("blocks", [])]
        final = data.get("final_norm")
        rest["final_norm"] = BlockScore(**final) if final else None
        rest["recommendation"] = Recommendation(**data["recommendation"])
        return cls(**rest)


def save_probe_json(result: ProbeResult, out: Path) -> Path:
    """``out/probe.json`` (atomic)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / PROBE_FILE, result.to_dict())
    return out / PROBE_FILE


def read_probe_json(path: Path) -> dict[str, Any]:
    """A ``probe.json`` as written (a folder means its ``probe.json``); checked to hold a
    recommendation."""
    path = Path(path)
    if path.is_dir():
        path = path / PROBE_FILE
    try:
        data = json.loads(path.read_text())
        [int(b) for b in data["recommendation"]["blocks"]]
    except (OSError, KeyError, TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise MimcliError(f"{path}: not a probe.json written by mimcli probe ({exc!r})") from exc
    return data


def load_probe(path: Path) -> ProbeResult:
    """A ``probe.json`` (or a folder holding one) as a :class:`ProbeResult`."""
    data = read_probe_json(path)
    try:
        return ProbeResult.from_dict(data)
    except (KeyError, TypeError) as exc:
        raise MimcliError(f"{path}: not a probe.json written by mimcli probe ({exc})") from exc


@dataclass
class ModelEval:
    name: str
    source: str
    arch: str
    features_cached: bool
    knn: dict[str, dict[str, float]] = field(default_factory=dict)
    linear: dict[str, Any] = field(default_factory=dict)
    lowshot: dict[str, Any] = field(default_factory=dict)
    cluster: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # per-query k-NN correctness ("cls"/"patch" -> k -> packed bits, evaluate.stats.pack)
    knn_correct: dict[str, dict[str, str]] = field(default_factory=dict)
    # the eval transform (timm pretrained_cfg terms) and the data's native size
    preprocessing: dict[str, Any] = field(default_factory=dict)

    @property
    def refined_run(self) -> str | None:
        """The refine run folder this column was made from, or None for any other MODEL."""
        if self.source.endswith(REFINED_SUFFIX):
            return self.source[: -len(REFINED_SUFFIX)]
        return None


@dataclass
class EvalResult:
    models: list[ModelEval]
    train_images: int
    val_images: int
    num_classes: int
    protocols: list[str]
    ks: list[int]
    mimcli_version: str = __version__
    train: str = ""
    val: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """Rebuild a result from ``results.json`` (unknown keys, e.g. from newer versions, are
        ignored)."""
        top = {f.name for f in fields(cls)}
        per_model = {f.name for f in fields(ModelEval)}
        models = [
            ModelEval(**{k: v for k, v in m.items() if k in per_model}) for m in data["models"]
        ]
        rest = {k: v for k, v in data.items() if k in top and k != "models"}
        return cls(models=models, **rest)


def save_eval_json(result: EvalResult, out: Path) -> Path:
    """``out/results.json`` (atomic)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / EVAL_FILE, result.to_dict())
    return out / EVAL_FILE


def load_eval(path: Path) -> EvalResult:
    """A ``results.json`` (or a folder holding one) as an :class:`EvalResult`."""
    path = Path(path)
    if path.is_dir():
        path = path / EVAL_FILE
    try:
        return EvalResult.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MimcliError(f"{path}: not a results.json written by mimcli eval ({exc})") from exc
