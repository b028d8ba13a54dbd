"""A refine step reads nothing back from the device except on logging steps.

Counted around whole steps of ``Refiner.train_stage`` (forward, backward, optimiser step, queue
update and momentum networks, encoder EMA, the metrics window) of the tiny ViT, with the torch
search backend and one DataLoader worker (augmentation runs in the worker, not counted here):

* scalar reads: ``aten._local_scalar_dense`` (what ``.item()``, ``float()``, ``int()`` and
  ``bool()`` of a tensor dispatch to);
* data-dependent ops, which wait for the GPU to know their output size: ``nonzero``,
  ``masked_select``, ``unique``, ``bincount``, ``repeat_interleave`` without a size, and indexing
  or index-assignment with a boolean mask;
* explicit copies to the host: ``Tensor.tolist``, ``.cpu``, ``.numpy`` (seen with a
  ``TorchFunctionMode``: on the CPU they dispatch nothing).

Steps that do not log must count zero of everything; a logging step reads one stacked tensor of
window sums with one ``tolist()`` (under torchrun after one all-reduce) and nothing else.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from mimcli.errors import MimcliError
from mimcli.refine.loop import Refiner
from mimcli.runs import load_checkpoint, save_checkpoint
from tests.objective_harness import tiny_cfg

aten = torch.ops.aten

SCALAR_READS = {aten._local_scalar_dense.default}
DATA_DEPENDENT = {
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.bincount.default,
    aten.repeat_interleave.Tensor,
}
INDEXING = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}
HOST_COPIES = {"tolist", "cpu", "numpy"}


def _bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or []
    )


class SyncCounter(TorchDispatchMode):
    """Counts what would make the host wait for the device, by kind (with the op's name)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if self.paused:
            pass
        elif func in SCALAR_READS:
            self.counts[f"scalar read ({func.name()})"] += 1
        elif func in DATA_DEPENDENT:
            if not (func is aten.repeat_interleave.Tensor and kwargs.get("output_size")):
                self.counts[f"data-dependent ({func.name()})"] += 1
        elif func in INDEXING and _bool_index(args):
            self.counts[f"boolean mask ({func.name()})"] += 1
        return func(*args, **kwargs)


class HostCopyCounter(TorchFunctionMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", "")
        if name in HOST_COPIES and not self.counter.paused:
            self.counter.counts[f"host copy (Tensor.{name})"] += 1
        return func(*args, **(kwargs or {}))


class Uncounted:
    """Iterates ``batches`` with the counter paused: what the DataLoader does in this process
    (its batch sampler's permutations, receiving the worker's tensors) is not the step."""

    def __init__(self, batches: Any, counter: SyncCounter) -> None:
        self.batches, self.counter = batches, counter

    def __iter__(self) -> Uncounted:
        self.counter.paused = True
        try:
            self.it = iter(self.batches)
        finally:
            self.counter.paused = False
        return self

    def __next__(self) -> Any:
        self.counter.paused = True
        try:
            return next(self.it)
        finally:
            self.counter.paused = False


def counted_steps(
    refiner: Refiner, stage: str, seen_values: list[dict[str, float]] | None = None
) -> list[Counter[str]]:
    """Run ``stage`` from step 0; what each step counted (cut at the progress callback, which
    the loop calls once at the end of every step). ``seen_values`` receives each step's loss and
    metrics, read with the counter paused."""
    counter = SyncCounter()
    loader = refiner.loader
    refiner.loader = lambda stage, start: Uncounted(loader(stage, start), counter)  # type: ignore[method-assign]
    objective_step = type(refiner.objective).step.__get__(refiner.objective)

    def step(*args: Any) -> Any:
        loss, metrics = objective_step(*args)
        if seen_values is not None:
            counter.paused = True
            values = {"loss": loss.detach(), **metrics}
            seen_values.append({k: float(v) for k, v in values.items()})
            counter.paused = False
        return loss, metrics

    refiner.objective.step = step  # type: ignore[method-assign]  # what the step module calls
    steps: list[Counter[str]] = []
    seen: Counter[str] = Counter()

    def progress(stage: str, done: int, total: int, figures: dict[str, float]) -> None:
        nonlocal seen
        steps.append(counter.counts - seen)
        seen = Counter(counter.counts)

    refiner.progress = progress
    refiner.save = lambda stage, done, *rest: None  # type: ignore[method-assign]  # not part of a step
    if stage != "heads":
        refiner.optimizer = refiner.make_optimizer(stage)
    with counter, HostCopyCounter(counter):
        refiner.train_stage(stage, 0)
    return steps


# nna: heads + queues (look-up with the id exclusion, label agreement on labelled data);
# mimco: a masked view against a frozen teacher, boolean masks in its patch loss
OBJECTIVES = {
    "nna": dict(blocks="last2", local_crops=1, photometric=False),
    "mimco": dict(),
}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_only_logging_steps_read_from_the_device(
    objective, tiny_model_dir, data_dir, teacher_dir, tmp_path
):
    extra: dict[str, Any] = dict(OBJECTIVES[objective])
    if objective == "mimco":
        extra["teacher"] = [str(teacher_dir)]
    cfg = tiny_cfg(
        tiny_model_dir,
        data_dir,
        tmp_path / "run",
        objective,
        head_steps=2,
        steps=4,
        log_every=3,
        checkpoint_every=100,
        num_workers=1,
        knn_backend="torch",
        **extra,
    )
    cfg.out.mkdir(parents=True)
    refiner = Refiner(cfg)
    seen: list[dict[str, float]] = []
    heads = counted_steps(refiner, "heads", seen)
    refine = counted_steps(refiner, "refine", seen)
    # heads: step 1 does not log, step 2 ends the stage; refine: steps 1, 2 do not log, step 3
    # ends a window of 3, step 4 ends the stage
    quiet = {"heads 1": heads[0], "refine 1": refine[0], "refine 2": refine[1]}
    logging = {"heads 2": heads[1], "refine 3": refine[2], "refine 4": refine[3]}
    assert all(not c for c in quiet.values()), quiet
    one_read = Counter({"host copy (Tensor.tolist)": 1})
    assert all(c == one_read for c in logging.values()), logging

    # the records: window means of what each step returned (NaN steps left out of a metric's)
    records = [json.loads(x) for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["stage_step"]) for r in records] == [
        ("heads", 1), ("refine", 2), ("refine", 3)
    ]  # fmt: skip
    windows = [seen[0:2], seen[2:5], seen[5:6]]
    for record, window in zip(records, windows, strict=True):
        assert record["loss"] == pytest.approx(sum(s["loss"] for s in window) / len(window))
        for key in window[0]:
            defined = [s[key] for s in window if not math.isnan(s[key])]
            expected = sum(defined) / len(defined) if defined else None
            assert record[key] == (expected and pytest.approx(expected)), key
    if objective == "nna":  # no real neighbour before the first enqueue: a NaN step
        assert math.isnan(seen[0]["nn_agree/4"]) and not math.isnan(seen[1]["nn_agree/4"])


def test_resumed_windows_log_what_an_uninterrupted_run_logs(
    tiny_model_dir, data_dir, tmp_path, monkeypatch
):
    """A checkpoint ends a logging window, so the run resumed from it logs the same windows
    (every 2 steps, and at the checkpoint after refine step 3 of 4)."""

    def cfg(out: str, **kw: Any):  # type: ignore[no-untyped-def]
        return tiny_cfg(
            tiny_model_dir, data_dir, tmp_path / out, "nna", blocks="last1", local_crops=0,
            photometric=False, head_steps=1, steps=4, log_every=2, checkpoint_every=3, **kw,
        )  # fmt: skip

    real_save = Refiner.save

    def save_and_keep(self: Refiner, stage: str, done: int, *rest: object) -> None:
        real_save(self, stage, done, *rest)
        if (stage, done) == ("refine", 3):  # what a run killed right after this save leaves
            shutil.copytree(self.run.root, tmp_path / "cut")

    monkeypatch.setattr(Refiner, "save", save_and_keep)
    Refiner(cfg("full")).run_all()
    monkeypatch.setattr(Refiner, "save", real_save)
    Refiner(cfg("cut", resume=True)).run_all()

    def records(out: str) -> list[dict[str, Any]]:
        lines = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "images_per_s"} for x in lines]

    full = records("full")
    assert [(r["stage"], r["stage_step"]) for r in full] == [
        ("heads", 0), ("refine", 1), ("refine", 2), ("refine", 3)
    ]  # fmt: skip
    assert records("cut") == full


def test_device_errors_stop_at_the_logging_step_before_a_save(tiny_model_dir, data_dir, tmp_path):
    """A queue holding only the query's own entries is counted on the device and raised at the
    next logging step, before its checkpoint is written; so is a non-finite loss, with the step
    it first appeared at."""
    # one step per epoch: every step looks up the ids the 1-slot queue holds since the last one
    cfg = tiny_cfg(
        tiny_model_dir, data_dir, tmp_path / "starved", "nna", blocks="last1", local_crops=0,
        photometric=False, batch_size=24, queue_size="1", head_steps=4, log_every=2,
        checkpoint_every=2,
    )  # fmt: skip
    with pytest.raises(MimcliError, match="only the query's own entries; use a larger"):
        Refiner(cfg).run_all()
    assert not (cfg.out / "metrics.jsonl").exists()
    assert not (cfg.out / "checkpoint.safetensors").exists()

    cfg = tiny_cfg(
        tiny_model_dir, data_dir, tmp_path / "nan", "nna", blocks="last1", local_crops=0,
        photometric=False, head_steps=6, log_every=4, checkpoint_every=2,
    )  # fmt: skip
    refiner = Refiner(cfg)
    real = refiner.objective.step

    def poisoned(encoder, batch, stage, step):  # type: ignore[no-untyped-def]
        loss, metrics = real(encoder, batch, stage, step)
        return (loss * float("nan") if step == 2 else loss), metrics

    refiner.objective.step = poisoned  # type: ignore[method-assign]
    with pytest.raises(MimcliError, match="non-finite at heads step 2; stopped. The last good"):
        refiner.run_all()
    state = load_checkpoint(cfg.out / "checkpoint.safetensors")
    assert state["stage"] == "heads" and state["done"] == 2  # the one at 4 was never written
    assert [json.loads(x)["step"] for x in (cfg.out / "metrics.jsonl").open()] == [1]


def test_adamw_is_fused_and_stays_so_through_a_checkpoint(tmp_path):
    from mimcli.optim import make_optimizer

    def train(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int) -> None:
        for _ in range(steps):
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    opt = make_optimizer([{"params": params, "lr": 0.1, "weight_decay": 0.05}])
    assert opt.param_groups[0]["fused"] is True
    train(opt, params, 2)
    save_checkpoint(tmp_path / "c.safetensors", {"optimizer": opt.state_dict()})
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    again = make_optimizer([{"params": twins, "lr": 0.1, "weight_decay": 0.05}])
    again.load_state_dict(load_checkpoint(tmp_path / "c.safetensors")["optimizer"])
    assert again.param_groups[0]["fused"] is True
    train(opt, params, 2)
    train(again, twins, 2)
    for a, b in zip(params, twins, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
