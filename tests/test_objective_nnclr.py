"""--objective nnclr (MAE-CT): defaults, the EMA target projector that fills the queue, gradient
flow, descent, the CLI end to end and resume. The NNCLR loss itself has its oracle test in
tests/test_nna.py (``nnclr_loss`` against the naive reference)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mimcli.objectives.nnclr import NNCLRObjective, default_nnclr_temperature, nnclr_loss
from mimcli.optim import apply_lr
from mimcli.refine.loop import Refiner
from tests.objective_harness import (
    check_resume,
    export_tensors,
    first_batch,
    losses_on_fixed_batch,
    metric_steps,
    refine_cli,
    tiny_cfg,
    tiny_run_args,
)


def test_defaults_follow_mae_ct(tiny_model_dir, data_dir, tmp_path):
    refiner = Refiner(tiny_cfg(tiny_model_dir, data_dir, tmp_path / "run", "nnclr", lr=None))
    obj = refiner.objective
    assert isinstance(obj, NNCLRObjective)
    cfg = refiner.cfg
    assert refiner.blocks == [4] and cfg.head_input == "patch"
    assert cfg.local_crops == 0 and cfg.photometric is False and refiner.views.num_views == 2
    assert cfg.freeze_blocks == 2 and cfg.lr == 2e-4 and cfg.momentum == 0.99
    assert obj.tau == 0.15 == default_nnclr_temperature(32)
    assert default_nnclr_temperature(1024) == 0.2 and default_nnclr_temperature(1280) == 0.3
    head = obj.heads.head(4)
    assert any(isinstance(m, torch.nn.ReLU) for m in head.modules())
    assert not any(isinstance(m, torch.nn.GELU) for m in head.modules())
    assert isinstance(head.predictor[-1], torch.nn.Linear)  # no final BN on the predictor
    # frozen: stem and blocks 0-1 of 4
    trainable = {n for n, p in refiner.encoder.named_parameters() if p.requires_grad}
    assert not any(
        n.startswith(("blocks.0.", "blocks.1.", "patch_embed", "cls_token")) for n in trainable
    )
    assert any(n.startswith("blocks.2.") for n in trainable) and "norm.weight" in trainable
    # explicit options still win
    other = Refiner(
        tiny_cfg(tiny_model_dir, data_dir, tmp_path / "run2", "nnclr", blocks="3,4", momentum=0.9)
    )
    assert other.blocks == [3, 4] and other.objective.momentum == 0.9


def test_queue_holds_the_ema_projector_outputs(tiny_model_dir, data_dir, tmp_path):
    refiner = Refiner(tiny_cfg(tiny_model_dir, data_dir, tmp_path / "run", "nnclr"))
    obj = refiner.objective
    batch = first_batch(refiner)
    refiner.encoder.train()
    obj.train()
    # perturb the online projector so it differs from its EMA copy
    with torch.no_grad():
        for p in obj.heads.head(4).projector.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    loss, metrics = refiner.step_losses(batch, "refine", 0)
    assert torch.isfinite(loss) and "nn_sim/4" in metrics
    with torch.no_grad():
        from mimcli.objectives.nna import block_features

        x = block_features(refiner.encoder, torch.cat(batch.views[:2]), [4], "patch")[4]
        target = obj.target_projectors["4"]
        expected = F.normalize(target(x)[: len(batch.indices)], dim=1)
        online = F.normalize(obj.heads.head(4).project(x)[: len(batch.indices)], dim=1)
    queue = obj.queues["4"]
    obj.after_step(refiner.encoder, "refine", 0)
    stored = queue.features[: len(batch.indices)]
    torch.testing.assert_close(stored, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(stored, online, atol=1e-3)
    assert torch.equal(queue.ids[: len(batch.indices)], batch.indices)


def test_gradient_flow_and_momentum_update(tiny_model_dir, data_dir, tmp_path):
    refiner = Refiner(tiny_cfg(tiny_model_dir, data_dir, tmp_path / "run", "nnclr"))
    obj = refiner.objective
    refiner.optimizer = refiner.make_optimizer("refine")
    apply_lr(refiner.optimizer, 1e-2)
    refiner.encoder.train()
    obj.train()
    optimised = {id(p) for g in refiner.optimizer.param_groups for p in g["params"]}
    target = obj.target_projectors["4"]
    assert all(not p.requires_grad and id(p) not in optimised for p in target.parameters())
    loss, _ = refiner.step_losses(first_batch(refiner), "refine", 0)
    loss.backward()
    assert all(p.grad is None for p in target.parameters())
    for name, p in refiner.encoder.named_parameters():
        if name.startswith(("blocks.0.", "blocks.1.", "patch_embed", "cls_token", "pos_embed")):
            assert p.grad is None, name
        elif name.startswith(("blocks.2.", "blocks.3.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is not None for p in obj.heads.parameters())
    before = [p.detach().clone() for p in target.parameters()]
    refiner.optimizer.step()
    online = list(obj.heads.head(4).projector.parameters())
    obj.after_step(refiner.encoder, "refine", 0)
    for old, new, o in zip(before, target.parameters(), online, strict=True):
        torch.testing.assert_close(new, 0.99 * old + 0.01 * o.detach(), rtol=1e-6, atol=1e-7)
        assert not torch.equal(new, old)


def test_head_warmup_leaves_the_encoder_alone(tiny_model_dir, data_dir, tmp_path):
    refiner = Refiner(tiny_cfg(tiny_model_dir, data_dir, tmp_path / "run", "nnclr"))
    loss, _ = refiner.step_losses(first_batch(refiner, "heads"), "heads", 0)
    loss.backward()
    assert all(p.grad is None for p in refiner.encoder.parameters())
    assert all(p.grad is not None for p in refiner.objective.heads.parameters())


@pytest.mark.parametrize("stage", ["heads", "refine"])
def test_loss_descends_on_a_fixed_batch(tiny_model_dir, data_dir, tmp_path, stage):
    """With the queue held fixed (no enqueue: on one batch the id exclusion would make every
    neighbour another sample of the same batch) and the nearest neighbour, the loss falls."""
    cfg = tiny_cfg(tiny_model_dir, data_dir, tmp_path / "run", "nnclr", lr=0.1, head_lr=0.1, topk=1)
    refiner = Refiner(cfg)
    losses = losses_on_fixed_batch(refiner, stage, 12, update=False)
    assert losses[0] == pytest.approx(math.log(8), rel=0.5)  # one head, ln(batch)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_loss_value_matches_the_formula(tiny_model_dir, data_dir, tmp_path):
    """The objective's loss is the symmetric NNCLR loss of its own heads and queue."""
    refiner = Refiner(tiny_cfg(tiny_model_dir, data_dir, tmp_path / "run", "nnclr"))
    obj = refiner.objective
    batch = first_batch(refiner)
    refiner.encoder.eval()
    obj.eval()  # BN on running stats: the same outputs in both passes
    state = obj.lookup_gen.get_state()
    loss, _ = refiner.step_losses(batch, "refine", 0)
    obj.lookup_gen.set_state(state)
    from mimcli.objectives.nna import block_features

    with torch.no_grad():
        b = len(batch.indices)
        x = block_features(refiner.encoder, torch.cat(batch.views[:2]), [4], "patch")[4]
        _, p = obj.heads.head(4)(x)
        t = obj.target_projectors["4"](x)
        nn = [
            obj.queues["4"].lookup(t[i * b : (i + 1) * b], batch.indices, 20, obj.lookup_gen)
            for i in (0, 1)
        ]
        expected = 0.5 * (
            nnclr_loss(t[:b], nn[0].neighbours, p[b:], obj.tau)
            + nnclr_loss(t[b:], nn[1].neighbours, p[:b], obj.tau)
        )
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_cli_end_to_end_and_resume(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    args = [
        str(tiny_model_dir),
        "--objective",
        "nnclr",
        *tiny_run_args(data_dir),
        "--lr",
        "1e-3",
        "--topk",
        "3",
    ]
    check_resume(tmp_path, args, monkeypatch, stop_after=("refine", 1))
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    resolved = config["resolved"]
    assert resolved["objective"] == "nnclr" and resolved["loss"] == "nnclr"
    assert resolved["blocks"] == [4] and resolved["freeze_blocks"] == 2
    assert resolved["target_momentum"] == 0.99 and resolved["head_input"] == "patch"
    assert metric_steps(tmp_path / "full") == list(range(5))
    from safetensors.torch import load_file

    base = load_file(tiny_model_dir / "model.safetensors")
    exported = export_tensors(tmp_path / "full")
    assert torch.equal(exported["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])
    assert not torch.equal(exported["blocks.3.attn.qkv.weight"], base["blocks.3.attn.qkv.weight"])
    # the banner names the objective
    out = refine_cli([*args, "--out", str(tmp_path / "again")])
    assert out.exit_code == 0 and "nnclr: heads" in out.stderr


def test_unknown_objective_is_one_clear_line(tiny_model_dir, data_dir, tmp_path):
    out = refine_cli(
        [str(tiny_model_dir), "--data", str(data_dir), "--out", str(tmp_path / "r"),
         "--objective", "simclr"]
    )  # fmt: skip
    assert out.exit_code == 2
    assert "--objective 'simclr': choose one of nna, nnclr, mimco, conmim, mrmae" in out.output
    assert "Traceback" not in out.output


def test_resume_with_another_objective_is_refused(tiny_model_dir, data_dir, tmp_path):
    args = [str(tiny_model_dir), *tiny_run_args(data_dir), "--out", str(tmp_path / "run")]
    assert refine_cli([*args, "--objective", "nnclr"]).exit_code == 0
    out = refine_cli([*args, "--resume", "--objective", "nna"])
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert "is a --objective nnclr run; resume it with --objective nnclr" in out.output
