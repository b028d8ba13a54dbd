"""``mimcli refine --plan``: byte counts against hand arithmetic, FLOPs against the analytic count,
the CLI, and the paper's ViT-L figure (about 100 images per 80 GB GPU)."""

from __future__ import annotations

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from typer.testing import CliRunner

from mimcli.cli.app import app
from mimcli.heads import head_widths
from mimcli.refine.plan import GIB, PlanConfig, fake_copy, plan_refine, trace
from tests.conftest import make_tiny_vit

runner = CliRunner()
D, DEPTH, PATCH, IMG = 32, 4, 8, 32
TOKENS = (IMG // PATCH) ** 2 + 1


def vit_params(dim: int, depth: int, patch: int, tokens: int) -> int:
    stem = 3 * patch * patch * dim + dim + dim + tokens * dim  # conv, its bias, cls, pos
    block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * (4 * dim * dim) + 5 * dim
    return stem + depth * block + 2 * dim  # + final norm


def head_params(dim: int, hidden: int, out: int, pred: int) -> int:
    projector = dim * hidden + 2 * hidden + hidden * hidden + 2 * hidden + hidden * out + 2 * out
    return projector + out * pred + 2 * pred + pred * out + 2 * out


def test_fixed_bytes_match_hand_arithmetic(tiny_model_dir):
    plan = plan_refine(
        PlanConfig(str(tiny_model_dir), blocks="3,4", queue_size="1000", precision="fp32")
    )
    w = head_widths(D)
    assert (w.hidden, w.out, w.predictor_hidden) == (256, 64, 512)
    enc = vit_params(D, DEPTH, PATCH, TOKENS)
    heads = 2 * head_params(D, w.hidden, w.out, w.predictor_hidden)
    assert plan.encoder_params == enc and plan.head_params == heads
    trainable = enc - TOKENS * D + heads  # the fixed position table stays frozen
    assert plan.bytes["parameters"] == 4 * (enc + heads)
    assert plan.bytes["gradients"] == 4 * trainable
    assert plan.bytes["optimizer"] == 2 * 4 * trainable  # AdamW: two fp32 states
    assert plan.bytes["ema"] == 4 * enc
    assert plan.bytes["queues"] == 2 * 1000 * (64 * 4 + 8)  # fp32 features + int64 ids
    # fp32: autocast makes no weight copies; what stays is the loss's in-batch part
    assert plan.bytes["weight_copies"] < 0.05 * plan.bytes["parameters"]
    assert plan.fixed_bytes == sum(plan.bytes.values())
    image = plan.activation_bytes_per_image + plan.transient_bytes_per_image
    assert plan.total_bytes == plan.fixed_bytes + plan.batch_size * image
    assert plan.max_batch == (plan.device_memory - plan.fixed_bytes) // image
    # views: 2 x 32 px + 10 x 16 px (96/224 of 32, a multiple of the patch)
    assert plan.views == [{"count": 2, "size": 32}, {"count": 10, "size": 16}]
    per_view = plan.activation_bytes_per_view
    assert per_view["32"] > per_view["16"] > 0
    assert plan.activation_bytes_per_image > 2 * per_view["32"] + 10 * per_view["16"] * 0.99


def test_forward_flops_match_analytic_and_backward_is_twice():
    model = make_tiny_vit()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = fake_copy(model, mode).train()
    with mode:
        t = trace(lambda: fake.forward_features(torch.empty(1, 3, IMG, IMG)).sum(), [], "fp32")
    macs = DEPTH * (12 * D * D * TOKENS + 2 * TOKENS * TOKENS * D) + 3 * PATCH**2 * D * (TOKENS - 1)
    assert t.forward_flops == pytest.approx(2 * macs, rel=0.03)
    # the patch embedding's input needs no gradient, so a little under 2x
    assert 1.9 < t.backward_flops / t.forward_flops <= 2.0


def test_plan_flops_count_encoder_and_heads(tiny_model_dir):
    plan = plan_refine(PlanConfig(str(tiny_model_dir), blocks="4", local_crops=0))
    w = head_widths(D)
    encoder = 2 * (DEPTH * (12 * D * D * TOKENS + 2 * TOKENS**2 * D) + 3 * 64 * D * 16)
    expected = 2 * encoder + 2 * 2 * w.macs(D)  # 2 views, one head
    assert plan.flops_per_image["forward"] == pytest.approx(expected, rel=0.05)
    assert plan.flops_per_image["backward"] == pytest.approx(2 * expected, rel=0.08)
    h100 = next(g for g in plan.gpus if g.gpu == "H100 SXM")
    step = plan.flops_per_image["total"] * plan.batch_size / (989e12 * 0.4)
    assert h100.step_s == pytest.approx(step)


def test_grad_checkpointing_keeps_block_inputs_only(tiny_model_dir):
    plain = plan_refine(PlanConfig(str(tiny_model_dir), blocks="4", local_crops=0))
    ckpt = plan_refine(
        PlanConfig(str(tiny_model_dir), blocks="4", local_crops=0, grad_checkpointing=True)
    )
    inputs = DEPTH * 2 * TOKENS * D * 4  # fp32 residual stream into each block, 2 views
    assert inputs < ckpt.activation_bytes_per_image < plain.activation_bytes_per_image
    assert ckpt.flops_per_image == plain.flops_per_image  # model FLOPs: recompute not counted


def test_cli_plan_writes_json_and_prints_table(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["refine", str(tiny_model_dir), "--plan", "--data", str(tmp_path / "not-yet"),
         "--out", str(out), "--blocks", "last2", "--local-crops", "2", "--batch-size", "8",
         "--device-memory", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "largest batch" in result.output and "H100 SXM" in result.output
    saved = json.loads((out / "plan.json").read_text())
    assert saved["blocks"] == [3, 4] and saved["batch_size"] == 8
    assert saved["device_memory"] == GIB
    assert not (out / "config.json").exists()  # nothing trained
    # a run in that folder on a GPU the plan names prints its planned wall time at start
    from mimcli.refine.plan import planned_seconds

    h100 = next(g for g in saved["gpus"] if g["gpu"].startswith("H100"))
    got = planned_seconds(saved, "NVIDIA H100 80GB HBM3", steps=100, batch_size=16)
    assert got == pytest.approx(h100["step_s"] * 2 * 100)  # twice the planned batch
    assert planned_seconds(saved, "NVIDIA GeForce RTX 4090", 100, 8) is None
    as_json = runner.invoke(
        app,
        ["refine", str(tiny_model_dir), "--plan", "--json", "--data", "x", "--out", str(out),
         "--precision", "fp16"],
    )  # fmt: skip
    assert as_json.exit_code == 2 and "--precision" in as_json.output


def test_vit_large_paper_recipe_fits_about_100_images(monkeypatch):
    """METHOD §1.4: about 100 images per 80 GB GPU for ViT-L/16 with 8 heads, 2x224 + 10x96,
    bf16; a timm name is built without downloading anything."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = plan_refine(
        PlanConfig("vit_large_patch16_224.mae", device_memory_gib=80.0, batch_size=100)
    )
    assert plan.blocks == list(range(17, 25))
    assert plan.views == [{"count": 2, "size": 224}, {"count": 10, "size": 96}]
    assert 70 <= plan.max_batch <= 140
    assert 150 * 2**20 < plan.activation_bytes_per_view["224"] < 190 * 2**20
    assert 25 * 2**20 < plan.activation_bytes_per_view["96"] < 40 * 2**20
    assert 280e6 < plan.encoder_params < 320e6
