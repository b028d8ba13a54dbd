import pytest
import torch

from mimcli.models.build import build_model
from mimcli.models.taps import tap_blocks


def manual_block_outputs(model, x):
    """Token sequences after every block, stepping through the model by hand."""
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    outs = []
    for blk in model.blocks:
        h = blk(h)
        outs.append(h)
    return outs


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("vit_base_patch16_224", {}),
        ("mimcli_vit_postnorm", {}),
        ("vit_base_patch16_224", {"reg_tokens": 4}),
        ("vit_base_patch16_224", {"reg_tokens": 2, "no_embed_class": True}),
    ],
)
def test_taps_equal_manual_forward(arch, extra):
    torch.manual_seed(0)
    model = build_model(
        arch, dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, **extra)
    ).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        taps = tap_blocks(model, x, [0, 1, 2, 3])
        outs = manual_block_outputs(model, x)
        features = model.forward_features(x)
    assert taps.cls.shape == (3, 4, 32) and taps.patch.shape == (3, 4, 32)
    prefix = 1 + extra.get("reg_tokens", 0)  # CLS, then register tokens, then the 16 patches
    assert outs[0].shape[1] == prefix + 16
    for i, tokens in enumerate(outs):
        torch.testing.assert_close(taps.cls[:, i], tokens[:, 0])
        torch.testing.assert_close(taps.patch[:, i], tokens[:, prefix:].mean(1))
    if arch == "vit_base_patch16_224":
        # the final-norm variant is the encoder's own output
        torch.testing.assert_close(taps.cls_norm, features[:, 0])
        torch.testing.assert_close(taps.patch_norm, features[:, prefix:].mean(1))
    else:  # data2vec 2.0 has no final norm: the last block's output is the encoder's output
        assert taps.cls_norm is None
        torch.testing.assert_close(taps.cls[:, -1], features[:, 0])


def test_taps_subset_and_no_norm_variant_without_last_block(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        taps = tap_blocks(tiny_vit, x, [1, 2])
        outs = manual_block_outputs(tiny_vit, x)
    assert taps.cls.shape == (2, 2, 32)
    torch.testing.assert_close(taps.cls[:, 1], outs[2][:, 0])
    assert taps.cls_norm is None
    with pytest.raises(ValueError):
        tap_blocks(tiny_vit, x, [4])


def test_taps_on_beit_with_mean_pooling():
    torch.manual_seed(0)
    model = build_model(
        "beit_base_patch16_224",
        dict(
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            use_abs_pos_emb=False,
            use_shared_rel_pos_bias=True,
            init_values=0.1,
            use_fc_norm=True,
            global_pool="avg",
        ),
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        taps = tap_blocks(model, x, [0, 1])
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(taps.patch_norm, pooled, atol=1e-5, rtol=1e-5)
    assert taps.cls.shape == (2, 2, 32)
