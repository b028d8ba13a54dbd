"""``refine --shard`` pieces that need no second process: the auto rule, the plan's sharded
bytes against hand arithmetic, the checkpoint folder's atomic swap, and the one-line errors.
The 2- and 4-process runs are in tests/test_engines.py and tests/test_objectives_ddp.py."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from mimcli.cli.app import app
from mimcli.errors import MimcliError
from mimcli.refine.plan import PlanConfig, plan_refine
from mimcli.refine.sharding import (
    TRAINER,
    find_sharded,
    load_sharded,
    resolve_shard,
    save_sharded,
    state_bytes,
)
from mimcli.runs import RunFolder, save_checkpoint
from tests.conftest import make_tiny_vit
from tests.objective_harness import tiny_run_args

runner = CliRunner()
CPU = torch.device("cpu")


def test_auto_never_shards_on_cpu_or_in_one_process():
    assert resolve_shard("auto", CPU, 8, 10**15)[0] is False
    assert resolve_shard("on", CPU, 2, 0)[0] is True
    assert resolve_shard("off", CPU, 2, 10**15)[0] is False
    sharded, why = resolve_shard("on", CPU, 1, 0)
    assert sharded is False and "one process" in why
    with pytest.raises(MimcliError, match="--shard must be one of"):
        resolve_shard("yes", CPU, 2, 0)


def test_state_bytes_count_parameters_gradients_adamw_and_ema():
    encoder, heads = make_tiny_vit(), torch.nn.Linear(32, 8)
    encoder.pos_embed.requires_grad_(False)
    p_enc = sum(p.numel() for p in encoder.parameters())
    p_heads = 32 * 8 + 8
    trained = p_enc - encoder.pos_embed.numel() + p_heads
    assert state_bytes(encoder, heads) == 4 * ((p_enc + p_heads) + 3 * trained + p_enc)


def test_plan_splits_the_state_over_processes(tiny_model_dir):
    common = dict(blocks="3,4", queue_size="1000", precision="fp32")
    whole = plan_refine(PlanConfig(str(tiny_model_dir), **common))
    two = plan_refine(PlanConfig(str(tiny_model_dir), shard="on", processes=2, **common))
    assert not whole.sharded and two.sharded and two.processes == 2
    for key in ("parameters", "gradients", "optimizer", "ema"):
        assert two.bytes[key] == -(-whole.bytes[key] // 2)
    # gathered whole: the root unit (stem, norm, heads) and two blocks, weights and gradients
    vit = make_tiny_vit()
    block = 4 * sum(p.numel() for p in vit.blocks[0].parameters())
    root = 4 * whole.encoder_params - len(vit.blocks) * block + 4 * whole.head_params
    assert two.bytes["gathered"] == 2 * (root + 2 * block)
    assert two.fixed_bytes == sum(two.bytes.values())
    assert any("--shard" in note for note in two.notes)
    # auto: shards only when parameters + gradients + AdamW + EMA exceed half the memory
    state = sum(whole.bytes[k] for k in ("parameters", "gradients", "optimizer", "ema"))
    small = plan_refine(PlanConfig(str(tiny_model_dir), processes=2,
                                   device_memory_gib=1.9 * state / 2**30, **common))  # fmt: skip
    large = plan_refine(PlanConfig(str(tiny_model_dir), processes=2,
                                   device_memory_gib=2.1 * state / 2**30, **common))  # fmt: skip
    assert small.sharded and not large.sharded


def test_a_kill_between_the_two_renames_keeps_the_previous_checkpoint(tmp_path):
    run = RunFolder(tmp_path)
    folder = run.sharded_checkpoint_path
    assert find_sharded(folder) is None and not run.has_checkpoint()
    old = folder.with_name(folder.name + ".old")
    old.mkdir()
    save_checkpoint(old / TRAINER, {"stage": "refine", "done": 3})
    assert find_sharded(folder) == old and run.has_checkpoint()
    folder.mkdir()
    save_checkpoint(folder / TRAINER, {"stage": "refine", "done": 4})
    assert find_sharded(folder) == folder


def test_resuming_a_sharded_run_unsharded_is_one_clear_line(tiny_model_dir, data_dir, tmp_path):
    args = ["refine", str(tiny_model_dir), *tiny_run_args(data_dir), "--out", str(tmp_path)]
    first = runner.invoke(app, [*args, "--head-steps", "1", "--steps", "1"])
    assert first.exit_code == 0, first.output
    (tmp_path / "checkpoint.safetensors").rename(tmp_path / "elsewhere")
    (tmp_path / "checkpoint.dcp").mkdir()
    save_checkpoint(tmp_path / "checkpoint.dcp" / TRAINER, {"stage": "refine", "done": 1})
    resumed = runner.invoke(app, [*args, "--head-steps", "1", "--steps", "2", "--resume"])
    assert resumed.exit_code == 2
    assert "written with sharding; resume with --shard on" in resumed.stderr
    assert "Traceback" not in resumed.output
    bad = runner.invoke(app, [*args, "--shard", "always", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "--shard must be auto, on or off" in bad.stderr


def test_sharded_save_replaces_a_stale_old_folder_and_loads_a_subset(tmp_path):
    """One process (DCP needs no process group): a `.old` left by a kill after the last swap
    does not stop the next save; a template with more entries than were saved (optimiser state
    of parameters that never got a gradient) loads what was saved; a saved entry the template
    lacks is one clear error."""
    folder = tmp_path / "checkpoint.dcp"
    for stale in (folder, folder.with_name("checkpoint.dcp.old")):
        stale.mkdir()
        save_checkpoint(stale / TRAINER, {"stage": "heads", "done": 1})
    weights = {"w": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(3.0)}
    save_sharded(folder, {"model": weights}, {"stage": "refine", "done": 2})
    assert not folder.with_name("checkpoint.dcp.old").exists()
    assert not folder.with_name("checkpoint.dcp.partial").exists()

    def template(trainer):
        assert trainer["stage"] == "refine"
        return {"model": {"w": torch.zeros(2, 3), "step": torch.zeros(()), "x": torch.ones(4)}}

    state = load_sharded(folder, template)
    assert state["done"] == 2
    assert torch.equal(state["sharded"]["model"]["w"], weights["w"])
    assert float(state["sharded"]["model"]["step"]) == 3.0
    assert "x" not in state["sharded"]["model"]
    with pytest.raises(MimcliError, match="does not fit this model"):
        load_sharded(folder, lambda trainer: {"model": {"w": torch.zeros(2, 3)}})
    with pytest.raises(MimcliError, match="does not fit this model"):
        load_sharded(folder, lambda t: {"model": {"w": torch.zeros(3, 3), "step": torch.zeros(())}})


def test_a_damaged_sharded_checkpoint_falls_back_to_the_one_kept_before(tmp_path):
    """Two saves keep the first as checkpoint.dcp.prev; with the last one's shards damaged,
    loading says so and returns the one before; --no-keep-previous keeps none."""
    folder = tmp_path / "checkpoint.dcp"
    first = {"w": torch.arange(6.0).reshape(2, 3)}
    save_sharded(folder, {"model": first}, {"stage": "refine", "done": 2})
    save_sharded(folder, {"model": {"w": first["w"] + 1}}, {"stage": "refine", "done": 4})
    prev = folder.with_name("checkpoint.dcp.prev")
    assert (prev / TRAINER).is_file()
    for shard in (folder / "shards").rglob("*.safetensors"):
        shard.write_bytes(shard.read_bytes()[:20])

    def template(trainer):
        return {"model": {"w": torch.zeros(2, 3)}}

    with pytest.warns(UserWarning, match="resuming from the checkpoint before it"):
        state = load_sharded(folder, template)
    assert state["done"] == 2 and torch.equal(state["sharded"]["model"]["w"], first["w"])
    save_sharded(folder, {"model": first}, {"stage": "refine", "done": 6}, keep_previous=False)
    assert not prev.exists()
