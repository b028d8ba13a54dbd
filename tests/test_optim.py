"""Optimiser groups and schedules (mimcli.optim): layer-wise lr decay as in the reference code,
warm-up then cosine."""

import pytest

from mimcli.optim import encoder_param_groups, lr_at
from tests.conftest import make_tiny_vit


def test_layer_decay_follows_the_reference_convention():
    model = make_tiny_vit()  # 4 blocks
    model.pos_embed.requires_grad_(False)
    scales = {}
    for group in encoder_param_groups(model, 0.05, 0.5):
        for name in group["names"]:
            scales[name] = (group["lr_scale"], group["weight_decay"])
    assert scales["blocks.3.attn.qkv.weight"] == (0.5, 0.05)  # last block: decay^1
    assert scales["blocks.0.attn.qkv.weight"] == (0.5**4, 0.05)
    assert scales["patch_embed.proj.weight"] == (0.5**5, 0.05)
    assert scales["cls_token"] == (0.5**5, 0.0)
    assert scales["blocks.0.norm1.weight"][1] == 0.0 and scales["blocks.2.attn.qkv.bias"][1] == 0
    assert scales["norm.weight"] == (1.0, 0.0)
    assert "pos_embed" not in scales


def test_lr_schedule_is_warmup_then_cosine():
    lrs = [lr_at(s, 100, 1.0, 10, 0.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5, abs=0.02)
    assert lrs[-1] < 0.001 and all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
