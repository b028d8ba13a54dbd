"""``refine --compile`` (mimcli.refine.compiling): what is compiled for each objective, that
compiled blocks and heads keep their state-dict keys, run eager in deep copies and under
``inference_mode``, and give the eager losses.

A cold inductor compile of the tiny ViT's block forward + backward takes ~30-45 s per input
shape on a CI CPU, so the default suite holds one inductor test with one view shape (no local
crops, refinement stage only); the wiring tests trace with dynamo's ``eager`` backend (no code
generated). Both stages, two view shapes, grad checkpointing, every objective, a resumed CLI run
and two processes under DDP and under FSDP2 (``--shard on``) are in the slow suite.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from mimcli.errors import MimcliError
from mimcli.refine import compiling
from mimcli.refine.compiling import compile_module, compile_step, compile_targets, is_compiled
from mimcli.refine.loop import Refiner
from mimcli.refine.plan import PlanConfig, plan_refine
from tests.objective_harness import (
    check_resume,
    first_batch,
    losses_on_fixed_batch,
    refine_cli,
    tiny_cfg,
    tiny_run_args,
)

OBJECTIVES = ("nna", "nnclr", "mimco", "conmim", "mrmae")


def refiner(model, data, out, objective="nna", teacher=None, **kw) -> Refiner:
    if objective in ("mimco", "mrmae"):
        kw["teacher"] = [str(teacher)]
    return Refiner(tiny_cfg(model, data, out, objective, **kw))


def assert_same_losses(eager: list[float], compiled: list[float]) -> None:
    # inductor reorders float32 sums: equal to ~1e-6 here, allow drift over a few steps
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


# -- default suite: one inductor compile, one shape ------------------------------------------


def test_compiled_refine_steps_give_the_eager_losses(tiny_model_dir, data_dir, tmp_path):
    """nna, no local crops (one view shape), three refinement steps: the losses of a Refiner
    built with ``compile=True`` equal eager ones; blocks and heads are compiled in place (same
    state-dict keys), the EMA copy is not."""
    eager = refiner(tiny_model_dir, data_dir, tmp_path / "eager", local_crops=0, blocks="last1")
    compiled = refiner(
        tiny_model_dir, data_dir, tmp_path / "compiled", local_crops=0, blocks="last1",
        compile=True,
    )  # fmt: skip
    assert all(is_compiled(b) for b in compiled.encoder.blocks)
    assert is_compiled(compiled.objective.heads.head(4))
    assert not any(is_compiled(b) for b in compiled.ema.blocks)
    assert not any(is_compiled(b) for b in eager.encoder.blocks)
    assert compiled.encoder.state_dict().keys() == eager.encoder.state_dict().keys()
    assert compiled.objective.state_dict().keys() == eager.objective.state_dict().keys()
    batch = first_batch(eager)
    for r in (eager, compiled):  # one forward + backward each: the same gradients
        r.encoder.train(), r.objective.train()
        r.step_losses(batch, "refine", 0)[0].backward()
    grads = [
        (n, p.grad, q.grad)
        for (n, p), q in zip(
            [*eager.encoder.named_parameters(), *eager.objective.named_parameters()],
            [*compiled.encoder.parameters(), *compiled.objective.parameters()],
            strict=True,
        )
        if p.grad is not None
    ]
    assert len(grads) > 20
    # float32 sums in another order: close relative to each gradient's norm, or ~0 where the
    # gradient is cancellation noise (e.g. the unused final norm's)
    for name, a, b in grads:
        assert (b - a).norm() <= 1e-3 * a.norm() + 1e-5, name
    want = torch.cat([a.flatten() for _, a, _ in grads])
    got = torch.cat([b.flatten() for _, _, b in grads])
    assert (got - want).norm() <= 1e-4 * want.norm(), float((got - want).norm() / want.norm())
    assert_same_losses(
        losses_on_fixed_batch(eager, "refine", 3), losses_on_fixed_batch(compiled, "refine", 3)
    )


# -- default suite: the wiring, traced with the eager backend --------------------------------


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_what_each_objective_compiles(objective, tiny_model_dir, data_dir, teacher_dir, tmp_path):
    r = refiner(tiny_model_dir, data_dir, tmp_path / "run", objective, teacher_dir)
    names = {id(m): n for n, m in r.objective.named_modules()}
    blocks, heads = compile_targets(r.encoder, r.objective)
    assert blocks[:4] == list(r.encoder.blocks)
    extra_blocks = [names[id(b)] for b in blocks[4:]]
    expected_blocks = {
        "conmim": [f"momentum_encoder.blocks.{i}" for i in range(4)],
        "mrmae": ["decoder.decoder_blocks.0", "decoder.decoder_blocks.1"],
    }
    assert extra_blocks == expected_blocks.get(objective, [])
    expected_heads = {
        "nna": ["heads.heads.4"],  # default blocks for the tiny ViT without a probe: the last
        "nnclr": ["heads.heads.4", "target_projectors.4"],
        "mimco": ["patch_head", "image_head"],
        "conmim": ["projector", "momentum_projector"],
        "mrmae": [],  # one Linear per teacher: nothing to fuse
    }[objective]
    assert [names[id(h)] for h in heads] == expected_heads
    counts = compile_step(r.encoder, r.objective, r.device, backend="eager")
    assert counts == {"blocks": len(blocks), "heads": len(heads)}
    # a step runs (dynamo traces every compiled module once per variant)
    loss, _ = r.step_losses(next(iter(r.loader("refine", 0))), "refine", 0)
    loss.backward()
    assert torch.isfinite(loss)


def test_heads_with_synchronised_batch_norm_stay_eager(tiny_model_dir, data_dir, tmp_path):
    r = refiner(tiny_model_dir, data_dir, tmp_path / "run")
    from mimcli.heads import IDHead, head_widths

    r.objective.heads.heads["4"] = IDHead(32, head_widths(32, 32), sync_bn=True)
    _, heads = compile_targets(r.encoder, r.objective)
    assert heads == []


class Recorder(nn.Module):
    """Records whether dynamo was tracing it when called."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.calls: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(torch.compiler.is_compiling())
        return self.linear(x)


def test_compiled_module_is_eager_in_copies_and_under_inference_mode():
    module = Recorder()
    keys = list(module.state_dict())
    compile_module(module, backend="eager")
    assert is_compiled(module) and list(module.state_dict()) == keys
    x = torch.randn(2, 4)
    module(x)
    assert module.calls == [True]
    with torch.inference_mode():
        module(x)
    assert module.calls == [True, False]
    twin = copy.deepcopy(module)
    assert not is_compiled(twin)
    twin.calls = []
    twin(x)
    assert twin.calls == [False]


def test_grad_checkpointing_runs_compiled_blocks(tiny_model_dir, data_dir, tmp_path):
    """With --grad-checkpointing each compiled block is recomputed in backward: same losses."""
    kw = dict(local_crops=1, blocks="last2", grad_checkpointing=True)
    eager = refiner(tiny_model_dir, data_dir, tmp_path / "eager", **kw)
    traced = refiner(tiny_model_dir, data_dir, tmp_path / "traced", **kw)
    compile_step(traced.encoder, traced.objective, traced.device, backend="eager")
    assert_same_losses(
        losses_on_fixed_batch(eager, "refine", 2), losses_on_fixed_batch(traced, "refine", 2)
    )


def test_no_compiler_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    with pytest.raises(MimcliError, match="C\\+\\+ compiler"):
        compiling.check_compilable(torch.device("cpu"))
    monkeypatch.setattr(compiling.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MimcliError, match="Triton"):
        compiling.check_compilable(torch.device("cuda"))
    with pytest.raises(MimcliError, match="cpu and cuda"):
        compiling.check_compilable(torch.device("mps"))

    def unsupported() -> None:
        raise RuntimeError("Python 3.15+ not yet supported for torch.compile")

    monkeypatch.setattr(torch._dynamo.eval_frame, "check_if_dynamo_supported", unsupported)
    with pytest.raises(MimcliError, match="--compile: Python 3.15"):
        compiling.check_compilable(torch.device("cpu"))


def test_cli_flag_reaches_the_config(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    import mimcli.refine.pipeline as pipeline

    seen = {}

    def fake_run(cfg, progress=None, on_start=None, given=None):
        seen["compile"], seen["given"] = cfg.compile, given
        raise MimcliError("stop here")

    monkeypatch.setattr(pipeline, "run_refine", fake_run)
    base = [str(tiny_model_dir), "--data", str(data_dir), "--out", str(tmp_path / "run")]
    refine_cli([*base, "--compile"])
    assert seen["compile"] is True and "compile" in seen["given"]
    refine_cli(base)
    assert seen["compile"] is False and "compile" not in seen["given"]
    refine_cli([*base, "--eager"])  # what turns it off for a resumed compiled run
    assert seen["compile"] is False and "compile" in seen["given"]


def test_plan_records_compile_and_keeps_eager_memory(tiny_model_dir, tmp_path):
    base = dict(model=str(tiny_model_dir), blocks="4", local_crops=0, precision="fp32")
    eager = plan_refine(PlanConfig(**base))
    compiled = plan_refine(PlanConfig(**base, compile=True, out=tmp_path / "plan"))
    assert compiled.compile and not eager.compile
    assert compiled.total_bytes == eager.total_bytes and compiled.max_batch == eager.max_batch
    assert any("--compile" in n and "upper bound" in n for n in compiled.notes)
    assert json.loads((tmp_path / "plan" / "plan.json").read_text())["compile"] is True
    result = refine_cli(
        [str(tiny_model_dir), "--data", str(tmp_path), "--out", str(tmp_path / "cli"),
         "--plan", "--compile", "--blocks", "4", "--local-crops", "0"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "compiled" in result.output
    assert json.loads((tmp_path / "cli" / "plan.json").read_text())["compile"] is True


# -- slow suite: inductor, both stages, two shapes, every objective -------------------------


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_compiled_gives_the_eager_losses(
    objective, tiny_model_dir, data_dir, teacher_dir, tmp_path
):
    """Head warm-up then refinement, compiled with inductor. nna with one local crop (two view
    shapes) and grad checkpointing."""
    kw: dict = {}
    if objective == "nna":
        kw = dict(local_crops=1, blocks="last2", grad_checkpointing=True)
    eager = refiner(tiny_model_dir, data_dir, tmp_path / "e", objective, teacher_dir, **kw)
    compiled = refiner(
        tiny_model_dir, data_dir, tmp_path / "c", objective, teacher_dir, compile=True, **kw
    )
    for stage, steps in (("heads", 2), ("refine", 3)):
        assert_same_losses(
            losses_on_fixed_batch(eager, stage, steps),
            losses_on_fixed_batch(compiled, stage, steps),
        )


@pytest.mark.slow
def test_compiled_cli_run_resumes_to_the_same_export(
    tiny_model_dir, data_dir, tmp_path, monkeypatch
):
    args = [str(tiny_model_dir), *tiny_run_args(data_dir), "--local-crops", "1", "--compile"]
    check_resume(tmp_path, args, monkeypatch)
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["config"]["compile"] is True


@pytest.mark.slow
@pytest.mark.parametrize(
    "objective,engine",
    [("nnclr", []), ("nna", ["--shard", "on", "--local-crops", "1", "--blocks", "last2"])],
    ids=["ddp", "fsdp"],
)
def test_two_processes_compiled_match_one_eager(
    objective, engine, tiny_model_dir, data_dir, tmp_path
):
    """2 gloo processes with compiled blocks give the one-process eager losses: under DDP
    (nnclr) and under FSDP2 (``--shard on``: blocks compiled, then sharded). The heads use
    synchronised BatchNorm there, so they stay eager."""
    args = [str(tiny_model_dir), "--objective", objective, *tiny_run_args(data_dir)]
    args += ["--steps", "2", "--lr", "1e-3", "--topk", "1", "--log-every", "1"]
    env = dict(os.environ, MIMCLI_THREADS="1", GLOO_SOCKET_IFNAME="lo")

    def run(out, *launcher: str, extra: tuple[str, ...] = ()) -> list[float]:
        done = subprocess.run(
            [sys.executable, *launcher, "-m", "mimcli.cli.app", "refine", *args, *extra,
             "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").open()]

    torchrun = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(29800 + os.getpid() % 100))  # fmt: skip
    two = run(tmp_path / "two", *torchrun, extra=("--compile", *engine))
    one = run(tmp_path / "one", extra=tuple(e for e in engine if e not in ("--shard", "on")))
    assert len(two) == 4
    assert two == pytest.approx(one, rel=1e-4)
