"""``mimcli refine`` as one library call: options a resumed run takes from its folder, the
probe that picks head blocks when asked (``--probe-train/--probe-val``: run on rank 0 once the
process group is up while the other ranks wait), then the refine loop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mimcli import distributed as dist
from mimcli.errors import Interrupted
from mimcli.probe import ProbeConfig, run_probe
from mimcli.refine.config import RefineConfig, RefineResult, RefineStart
from mimcli.refine.interrupts import StopRequests
from mimcli.refine.loop import Refiner
from mimcli.refine.setup import with_saved_options
from mimcli.results import PROBE_FILE
from mimcli.runs import RunFolder
from mimcli.runtime import StepProgress, rng_kept


def probe_for_blocks(cfg: RefineConfig) -> Path:
    """Probe the base model on ``--probe-train``/``--probe-val`` into ``RUN_DIR/probe`` and
    return its probe.json. Rank 0 probes (a resumed run reuses the first probe) with the random
    state kept, so every rank still initialises the same heads; the others wait for it."""
    out = RunFolder(cfg.out).probe_dir
    if dist.rank() == 0 and not (out / PROBE_FILE).exists():
        with rng_kept():
            _probe(cfg, out)
    dist.wait_for_rank0()
    return out / PROBE_FILE


def _probe(cfg: RefineConfig, out: Path) -> None:
    run_probe(
        ProbeConfig(
            model=cfg.model,
            num_heads=cfg.num_heads,
            train=cfg.probe_train,  # type: ignore[arg-type]
            val=cfg.probe_val,  # type: ignore[arg-type]
            out=out,
            limit_train=cfg.val_limit,
            limit_val=cfg.val_limit,
            device=cfg.device,
            num_workers=cfg.num_workers,
            knn_backend=cfg.knn_backend,
            seed=cfg.seed,
        )
    )


def run_refine(
    cfg: RefineConfig,
    progress: StepProgress | None = None,
    on_start: Callable[[RefineStart], None] | None = None,
    given: set[str] | None = None,
) -> RefineResult:
    """Refine ``cfg.model`` on ``cfg.data`` into ``cfg.out``.

    Args:
        cfg: every option.
        progress: called after each step with (stage, done, total, {"loss", "img/s"}).
        on_start: called once the run is set up, before the first step.
        given: with ``cfg.resume``, the options the user set; the others take the run's
            recorded values. None: ``cfg`` is used as it is.
    """
    stops, ended_well = StopRequests(), False
    try:
        with stops.installed():
            refiner = Refiner(
                with_saved_options(cfg, given), progress, prober=probe_for_blocks, stops=stops
            )
            if on_start is not None:
                on_start(refiner.start_info())
            result = refiner.run_all()
            ended_well = True
            return result
    except KeyboardInterrupt:  # before or after the steps, or a second Ctrl-C: nothing saved
        raise Interrupted(stopped_line(cfg, stops.name), stops.signum or 2) from None
    finally:
        dist.close(ended_well)  # the process group this run made under torchrun


def stopped_line(cfg: RefineConfig, signal_name: str) -> str:
    """What a run stopped by a signal outside its steps tells the user to do next."""
    if RunFolder(cfg.out).has_checkpoint():
        return (
            f"{signal_name}: stopped; continue from the last checkpoint with: mimcli refine "
            f"{cfg.model} --data {cfg.data} --out {cfg.out} --resume"
        )
    return (
        f"{signal_name}: stopped before the first checkpoint; start the run again "
        "(without --resume)"
    )
