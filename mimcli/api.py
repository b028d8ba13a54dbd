"""mimcli from Python (notebooks, scripts): ``from mimcli.api import probe, refine, evaluate,
push``.

Each function takes what the command takes — the positional arguments, then every option as a
keyword named like the flag (``--limit-train`` -> ``limit_train``) — and returns the command's
result dataclass (:class:`~mimcli.results.ProbeResult`, :class:`~mimcli.refine.config.
RefineResult`, :class:`~mimcli.results.EvalResult`, :class:`~mimcli.hub.push.PushOutcome`).
Progress shows as ``tqdm`` bars (widgets in Jupyter, text elsewhere; ``progress=False`` for
none, or pass your own callable ``progress(stage, done, total[, metrics])``). Mistakes raise
:class:`~mimcli.errors.MimcliError` with the message the command would print.

This module imports nothing heavy until a function is called.

Example::

    from mimcli.api import evaluate, probe, refine

    p = probe("vit_base_patch16_224.mae", train="in1k/train", val="in1k/val", limit_train=50000)
    print(p.recommendation.blocks)
    run = refine("vit_base_patch16_224.mae", data="in1k/train", out="runs/mae-b", epochs=20)
    e = evaluate(["vit_base_patch16_224.mae", run.out], train="in1k/train", val="in1k/val")
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mimcli.hub.push import PushOutcome
    from mimcli.refine.config import RefineResult
    from mimcli.results import EvalResult, ProbeResult

__all__ = ["probe", "refine", "evaluate", "push", "TqdmProgress"]

PathLike = str | os.PathLike[str]


class TqdmProgress:
    """``progress(stage, done, total[, metrics])`` drawn as one ``tqdm.auto`` bar per stage
    (a widget in Jupyter, text on a terminal); training shows the loss and images/s."""

    def __init__(self, unit: str = "img") -> None:
        self.unit = unit
        self.bars: dict[str, Any] = {}

    def __call__(
        self, stage: str, done: int, total: int, metrics: dict[str, float] | None = None
    ) -> None:
        from tqdm.auto import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit=self.unit)
        bar.update(done - bar.n)
        if metrics:
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _progress(progress: bool | Callable[..., None], unit: str = "img") -> Any:
    if progress is True:
        return TqdmProgress(unit)
    return progress or None


def _config(cls: type, where: str, values: dict[str, Any]) -> Any:
    """``cls(**values)`` with one clear line for an option the command does not have."""
    from mimcli.errors import MimcliError

    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise MimcliError(
            f"{where}() has no option {', '.join(unknown)}; it takes {', '.join(sorted(names))}"
        )
    return cls(**values)


def _data(value: PathLike | None) -> Any:
    from mimcli.datasources import data_spec

    return data_spec(os.fspath(value) if value is not None else None)


def probe(
    model: str,
    train: PathLike,
    val: PathLike,
    *,
    progress: bool | Callable[..., None] = True,
    **options: Any,
) -> ProbeResult:
    """``mimcli probe MODEL --train TRAIN --val VAL ...``: k-NN after every block and the
    recommended ID-head blocks (``result.recommendation``)."""
    from mimcli.probe import ProbeConfig, run_probe

    if "out" in options and options["out"] is not None:
        options["out"] = Path(options["out"])
    cfg = _config(ProbeConfig, "probe", dict(model=str(model), train=_data(train),
                                             val=_data(val), **options))  # fmt: skip
    return run_probe(cfg, progress=_progress(progress))


def refine(
    model: str,
    data: PathLike,
    out: PathLike,
    *,
    progress: bool | Callable[..., None] = True,
    **options: Any,
) -> RefineResult:
    """``mimcli refine MODEL --data DATA --out OUT ...``: the refined encoder in
    ``OUT/export`` (``result.out``). ``resume=True`` continues a run; options not given then
    come from its ``config.json``, as on the command line."""
    from mimcli.refine.config import RefineConfig
    from mimcli.refine.pipeline import run_refine

    for key in ("val", "probe_train", "probe_val"):
        if key in options:
            options[key] = _data(options[key])
    for key in ("probe", "decoder"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    given = set(options) | {"model", "data", "out"}
    values = dict(model=str(model), data=_data(data), out=Path(out), **options)
    cfg = _config(RefineConfig, "refine", values)
    return run_refine(cfg, progress=_progress(progress, "step"), given=given)


def evaluate(
    models: str | PathLike | Sequence[str | PathLike],
    train: PathLike,
    val: PathLike,
    *,
    progress: bool | Callable[..., None] = True,
    **options: Any,
) -> EvalResult:
    """``mimcli eval MODEL... --train TRAIN --val VAL ...``: every protocol for each model
    (a refine run folder evaluates its export), side by side in ``result.models``."""
    from mimcli.evaluate.runner import EvalConfig, run_eval

    names = [models] if isinstance(models, (str, os.PathLike)) else list(models)
    for key in ("protocols", "ks", "shots", "seeds"):
        if key in options:
            options[key] = tuple(options[key])
    for key in ("out", "save_heads"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    values = dict(models=[os.fspath(m) for m in names], train=_data(train), val=_data(val))
    cfg = _config(EvalConfig, "evaluate", {**values, **options})
    return run_eval(cfg, progress=_progress(progress))


def push(run_dir: PathLike, repo: str | None = None, **options: Any) -> PushOutcome:
    """``mimcli push RUN_DIR --repo REPO ...``: the run as a timm-loadable Hub repo (or, with
    ``dry_run=True, to=FOLDER``, only the folder). Warnings go to ``on_warning`` (default:
    Python's ``warnings``)."""
    import warnings

    from mimcli.hub.push import PushConfig, run_push

    on_warning = options.pop("on_warning", None) or (lambda text: warnings.warn(text, stacklevel=3))
    on_retry = options.pop("on_retry", None)
    for key in ("to", "eval_path", "probe_path", "heads_path"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    cfg = _config(PushConfig, "push", dict(run_dir=Path(run_dir), repo=repo, **options))
    return run_push(cfg, on_retry=on_retry, on_warning=on_warning)
