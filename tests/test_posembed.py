"""The position-table resize rule of refinement (mimcli.models.posembed): local views get the
official plain-bicubic table (no antialiasing), checked against a naive ``F.interpolate`` of the
table, for timm's ViT and the post-norm architecture; runs keep the rule they started with."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import mimcli.models.postnorm  # noqa: F401  (registers mimcli_vit_postnorm)
from mimcli.errors import MimcliError
from mimcli.models.masked import encode_masked
from mimcli.models.posembed import OFFICIAL, TIMM, apply_resize_rule
from mimcli.refine.config import RefineConfig
from mimcli.refine.setup import check_resume, settle_resize_rule
from mimcli.runs import RunFolder

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(arch, dynamic_img_size=True, **TINY).eval()
    with torch.no_grad():
        model.pos_embed.normal_()  # a table with structure at every frequency
    return model


def naive_tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch tokens + the table resized by plain bicubic interpolation (the official rule)."""
    x = model.patch_embed(images)  # (B, H, W, D)
    b, h, w, d = x.shape
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    table = model.pos_embed[:, prefix:]
    side = int(table.shape[1] ** 0.5)
    grid = table.reshape(1, side, side, d).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=False)
    resized = resized.permute(0, 2, 3, 1).reshape(1, h * w, d)
    cls = model.cls_token.expand(b, -1, -1)
    if model.no_embed_class:
        return torch.cat([cls, x.reshape(b, h * w, d) + resized], dim=1)
    table = torch.cat([model.pos_embed[:, :prefix], resized], dim=1)
    return torch.cat([cls, x.reshape(b, h * w, d)], dim=1) + table


@pytest.mark.parametrize("arch", ["vit_base_patch16_224", "mimcli_vit_postnorm"])
def test_small_views_get_the_official_table(arch):
    images = torch.randn(2, 3, 16, 16)  # a local view: grid 4 -> 2
    timm_way = tiny(arch)
    official = apply_resize_rule(copy.deepcopy(timm_way), OFFICIAL)
    with torch.no_grad():
        expected = naive_tokens(official, images)
        got = official._pos_embed(official.patch_embed(images))
        antialiased = timm_way._pos_embed(timm_way.patch_embed(images))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (antialiased - expected).abs().max() > 0.05  # timm's default really differs
    # the full-size grid is left alone: both rules give timm's own tokens
    full = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(official(full), timm_way(full), rtol=0, atol=0)
    # weights and keys are timm's; copies (EMA, momentum encoders) keep the rule
    assert official.state_dict().keys() == timm_way.state_dict().keys()
    assert type(copy.deepcopy(official)) is type(official)
    assert apply_resize_rule(timm_way, TIMM) is timm_way and type(timm_way).__name__ in (
        "VisionTransformer",
    )


def test_masked_passes_follow_the_rule():
    model = apply_resize_rule(tiny("vit_base_patch16_224"), OFFICIAL)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = encode_masked(model, images, None, None)
        x = naive_tokens(model, images)
        expected = model.norm(model.blocks(model.norm_pre(x)))
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)


def test_new_runs_record_the_official_rule_and_resumed_runs_keep_theirs(tmp_path):
    def cfg(**kw):
        return RefineConfig(model="m", data=tmp_path / "d", out=tmp_path / "run", **kw)

    run = RunFolder(tmp_path / "run")
    assert settle_resize_rule(cfg(), run).pos_embed_resize == OFFICIAL
    run.write_config({"config": {"objective": "nna"}})  # recorded before the rule existed
    resumed = settle_resize_rule(cfg(resume=True), run)
    assert resumed.pos_embed_resize == TIMM
    check_resume(resumed, run)  # the run's own rule: accepted
    with pytest.raises(MimcliError, match="--pos-embed-resize 'bicubic-antialias' -> 'bicubic'"):
        check_resume(cfg(resume=True, pos_embed_resize=OFFICIAL), run)
    run.write_config({"config": {"objective": "nna", "pos_embed_resize": OFFICIAL}})
    assert settle_resize_rule(cfg(resume=True), run).pos_embed_resize == OFFICIAL
