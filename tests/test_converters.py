"""Each checkpoint format: a tiny file with the real key layout and random values, loaded through
the resolver, must compute what a naive forward of that format computes."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from mimcli.errors import MimcliError
from mimcli.models.sources import load_model
from mimcli.models.taps import tap_blocks
from tests.conftest import make_tiny_vit
from tests.reference import layer_norm, postnorm_vit_blocks, prenorm_vit_blocks

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def random_mae_encoder(depth=3, dim=64, seed=0):
    """State dict with the official MAE encoder names (= timm's), random values."""
    model = make_tiny_vit(seed, depth=depth, embed_dim=dim, num_heads=1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_matches_reference(loaded, sd, heads, **ref_kwargs):
    with torch.no_grad():
        taps = tap_blocks(loaded.model, X, list(range(loaded.num_blocks)))
        ref = prenorm_vit_blocks(X, sd, heads, **ref_kwargs)
    assert len(ref) == loaded.num_blocks
    for i, tokens in enumerate(ref):
        torch.testing.assert_close(taps.cls[:, i], tokens[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(taps.patch[:, i], tokens[:, 1:].mean(1), atol=1e-5, rtol=1e-5)
    final = layer_norm(ref[-1], sd, "norm")
    torch.testing.assert_close(taps.cls_norm, final[:, 0], atol=1e-5, rtol=1e-5)


def test_mae_encoder_only_pth(tmp_path):
    sd = random_mae_encoder()
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": sd}, path)
    loaded = load_model(str(path), num_heads=1)
    assert loaded.format == "mae" and loaded.decoder is None
    assert loaded.model_args["depth"] == 3 and loaded.model_args["embed_dim"] == 64
    assert loaded.model_args["img_size"] == 32 and loaded.model_args["patch_size"] == 8
    assert_matches_reference(loaded, sd, heads=1)


def test_mae_full_pth_keeps_decoder_aside(tmp_path):
    sd = random_mae_encoder()
    decoder = {
        "mask_token": torch.randn(1, 1, 16),
        "decoder_pos_embed": torch.randn(1, 17, 16),
        "decoder_embed.weight": torch.randn(16, 64),
        "decoder_embed.bias": torch.randn(16),
        "decoder_blocks.0.norm1.weight": torch.randn(16),
        "decoder_norm.weight": torch.randn(16),
        "decoder_pred.weight": torch.randn(192, 16),
    }
    path = tmp_path / "mae_visualize_vit_tiny_full.pth"
    torch.save({"model": {**sd, **decoder}}, path)
    loaded = load_model(str(path), num_heads=1)
    assert set(loaded.decoder) == set(decoder)
    assert torch.equal(loaded.decoder["decoder_pred.weight"], decoder["decoder_pred.weight"])
    assert_matches_reference(loaded, sd, heads=1)


def test_refiner_th(tmp_path):
    sd = random_mae_encoder(seed=3)
    grid = 4
    pos = torch.randn(1, grid, grid, 64)
    th = {k: v for k, v in sd.items() if k not in ("cls_token", "pos_embed")}
    th["cls_tokens.tokens"] = torch.randn(1, 1, 64)
    th["pos_embed.embed"] = pos
    path = tmp_path / "mae_refined_l16.th"
    torch.save({"state_dict": th, "ctx": {"epoch": 3}}, path)
    loaded = load_model(str(path), num_heads=1)
    assert loaded.format == "refiner"
    ref_sd = dict(th)
    ref_sd["pos"] = pos
    assert_matches_reference(
        loaded, ref_sd, heads=1, pos_has_cls_slot=False, cls_key="cls_tokens.tokens", pos_key="pos"
    )


def test_timm_state_dict_safetensors(tmp_path):
    model = make_tiny_vit(7)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "weights.safetensors"
    save_file(sd, str(path), metadata={"model_args": '{"num_heads": 2}'})
    loaded = load_model(str(path))
    assert loaded.format == "timm" and loaded.model_args["num_heads"] == 2
    assert_matches_reference(loaded, sd, heads=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X), model(X))


def test_unsupported_checkpoint_names_expected_keys(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}, path)
    with pytest.raises(MimcliError) as info:
        load_model(str(path))
    msg = str(info.value)
    assert "unsupported checkpoint" in msg and "conv1.weight" in msg
    assert "patch_embed.proj" in msg and "modality_encoders.IMAGE" in msg


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mimcli-pwned",))


def test_malicious_pickle_is_never_executed(tmp_path):
    marker = "/tmp/mimcli-pwned"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model": Exploit()}, fh)
    with pytest.raises(MimcliError):
        load_model(str(path))
    torch.save({"model": {"x": Exploit()}}, tmp_path / "evil2.pth")
    with pytest.raises(MimcliError):
        load_model(str(tmp_path / "evil2.pth"))
    assert not os.path.exists(marker)


def test_corrupt_file(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(MimcliError, match="cannot read"):
        load_model(str(path))
    st = tmp_path / "broken.safetensors"
    st.write_bytes(b"\x00" * 20)
    with pytest.raises(MimcliError, match="safetensors"):
        load_model(str(st))


def test_refined_data2vec2_th_is_post_norm(tmp_path):
    """MIM-Refiner's refined data2vec 2.0 encoders: embed_norm + post-norm blocks, no CLS pos."""
    sd = random_mae_encoder(seed=4)
    th = {k: v for k, v in sd.items() if k.startswith(("patch_embed.", "blocks."))}
    th["cls_tokens.tokens"] = torch.randn(1, 1, 64)
    th["pos_embed.embed"] = torch.randn(1, 4, 4, 64)
    th["embed_norm.weight"] = 1 + 0.1 * torch.randn(64)
    th["embed_norm.bias"] = 0.1 * torch.randn(64)
    path = tmp_path / "d2v2_refined_tiny.th"
    torch.save({"state_dict": th}, path)
    loaded = load_model(str(path), num_heads=1)
    assert loaded.arch == "mimcli_vit_postnorm" and loaded.model_args["depth"] == 3
    with torch.no_grad():
        taps = tap_blocks(loaded.model, X, [0, 1, 2])
        ref = postnorm_vit_blocks(
            X, {**th, "pos": th["pos_embed.embed"]}, 1, "cls_tokens.tokens", "pos", "embed_norm"
        )
    for i, tokens in enumerate(ref):
        torch.testing.assert_close(taps.cls[:, i], tokens[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(taps.patch[:, i], tokens[:, 1:].mean(1), atol=1e-5, rtol=1e-5)
    assert taps.cls_norm is None  # no final norm in this checkpoint


def test_refiner_unknown_keys_are_refused(tmp_path):
    th = {k: v for k, v in random_mae_encoder().items() if k not in ("cls_token", "pos_embed")}
    th.update(
        {
            "cls_tokens.tokens": torch.randn(1, 1, 64),
            "pos_embed.embed": torch.randn(1, 4, 4, 64),
            "head.0.weight": torch.randn(8, 64),
        }
    )
    torch.save({"state_dict": th}, tmp_path / "x.th")
    with pytest.raises(MimcliError, match="head.0.weight"):
        load_model(str(tmp_path / "x.th"))


def test_mean_pooled_timm_state_dict_with_fc_norm(tmp_path):
    model = make_tiny_vit(2, global_pool="avg", fc_norm=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "fc_norm.weight" in sd and "norm.weight" not in sd
    save_file(sd, str(tmp_path / "gap.safetensors"), metadata={"model_args": '{"num_heads": 2}'})
    loaded = load_model(str(tmp_path / "gap.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X), model(X))


class EvalExploit:
    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path('/tmp/mimcli-pwned-eval').touch()",))


def test_named_globals_in_zip_checkpoints_become_inert(tmp_path):
    """builtins.eval is named in the pickle; mimcli maps it to an inert stub, so nothing runs."""
    marker = "/tmp/mimcli-pwned-eval"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.pt"
    torch.save({"model": random_mae_encoder(), "cfg": EvalExploit()}, path)
    assert "builtins.eval" in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    loaded = load_model(str(path), num_heads=1)  # the weights are fine; the payload is neutralised
    assert loaded.num_blocks == 3
    assert not os.path.exists(marker)


# ------------------------------------------------------------- attention-head count (issue 14)


def test_head_count_is_asked_for_outside_the_table_and_given_count_is_used(tmp_path):
    """Width 128 with 4 heads: no released width, nothing recorded. The old guess (64-dim heads,
    2) loaded without a word and computed other features; now the load stops with one line
    naming --num-heads and the #heads= suffix, and a given count matches the reference."""
    model = make_tiny_vit(9, embed_dim=128, num_heads=4, depth=2)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "mae_pretrain_vit_w128.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(MimcliError) as info:
        load_model(str(path))
    msg = str(info.value)
    assert "width 128 is not a released ViT width" in msg
    assert "--num-heads N" in msg and f"{path}#heads=N" in msg
    for loaded in (load_model(f"{path}#heads=4"), load_model(str(path), num_heads=4)):
        assert loaded.model_args["num_heads"] == 4 and loaded.num_heads == 4
        assert_matches_reference(loaded, sd, heads=4)
    note = load_model(f"{path}#heads=4").note
    assert (
        note == f"{path}#heads=4: mae read as vit_base_patch16_224 (width 128, 2 blocks, patch 8); "
        "4 attention heads (from #heads=4)"
    )
    assert "(from --num-heads 4)" in load_model(str(path), num_heads=4).note
    with pytest.raises(MimcliError, match="width 128 is not divisible by 3 attention heads"):
        load_model(f"{path}#heads=3")
    for bad in (f"{path}#heads=0", f"{path}#heads=x", "#heads=4"):
        with pytest.raises(MimcliError, match="#heads="):
            load_model(bad)


def test_table_width_says_where_its_head_count_came_from(tmp_path):
    sd = {
        k: v.clone()
        for k, v in make_tiny_vit(1, embed_dim=192, num_heads=3, depth=1).state_dict().items()
    }
    decoder = {"decoder_embed.weight": torch.randn(16, 192), "mask_token": torch.randn(1, 1, 16)}
    path = tmp_path / "mae_visualize_vit_ti_full.pth"
    torch.save({"model": {**sd, **decoder}}, path)
    loaded = load_model(str(path))
    assert loaded.model_args["num_heads"] == 3
    assert loaded.note == (
        f"{path}: mae read as vit_base_patch16_224 (width 192, 1 blocks, patch 8); 3 attention "
        "heads (from the table of released widths; override with --num-heads); left out: MAE "
        "decoder (2 tensors, kept aside for MR-MAE)"
    )
    assert_matches_reference(loaded, sd, heads=3)


def test_mae_training_checkpoint_reads_heads_from_its_args(tmp_path):
    """MAE's main_pretrain.py saves args (an argparse Namespace) beside the weights; its model
    name gives the head count when the width matches (here ViT-Ti width 192, 3 heads)."""
    import argparse

    sd = {
        k: v.clone()
        for k, v in make_tiny_vit(2, embed_dim=192, num_heads=3, depth=1).state_dict().items()
    }
    args = argparse.Namespace(model="mae_vit_tiny_patch16", mask_ratio=0.75, norm_pix_loss=True)
    path = tmp_path / "checkpoint-399.pth"
    torch.save({"model": sd, "optimizer": {}, "epoch": 399, "scaler": {}, "args": args}, path)
    loaded = load_model(str(path))
    assert "3 attention heads (from the file's args.model mae_vit_tiny_patch16)" in loaded.note
    assert_matches_reference(loaded, sd, heads=3)
    with pytest.raises(MimcliError, match=r"records 3 attention heads \(args.model"):
        load_model(str(path), num_heads=6)
    # A name whose size does not match the width says nothing: the table decides.
    torch.save({"model": sd, "args": argparse.Namespace(model="mae_vit_large_patch16")}, path)
    assert "from the table of released widths" in load_model(str(path)).note


def test_timm_names_and_layouts_refuse_a_different_head_count(tiny_model_dir):
    assert "2 attention heads (from config.json)" in load_model(str(tiny_model_dir)).note
    assert load_model(f"{tiny_model_dir}#heads=2").num_heads == 2
    with pytest.raises(MimcliError, match="gives 2 attention heads, not 4; leave out #heads=4"):
        load_model(f"{tiny_model_dir}#heads=4")


# ---------------------------------------------------------------------------------- MAE-CT .th


def maect_encoder(seed=6):
    """MAE-CT's encoder in timm terms: CLS token without a position, positions for patches."""
    return make_tiny_vit(seed, no_embed_class=True)


def test_maect_th_is_named_and_computes_like_timm(tmp_path):
    model = maect_encoder()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert sd["pos_embed"].shape == (1, 16, 32) and sd["cls_token"].shape == (1, 1, 32)
    ctor = {"kind": "vit.masked_encoder", "patch_size": 8, "embedding_dim": 32, "depth": 4}
    path = tmp_path / "maect_tiny8.th"
    torch.save({"state_dict": sd, "ctor_kwargs": {**ctor, "attention_heads": 2}}, path)
    loaded = load_model(str(path))
    assert loaded.format == "MAE-CT"
    assert loaded.model_args["no_embed_class"] is True and loaded.model_args["num_heads"] == 2
    assert "MAE-CT read as" in loaded.note
    assert "2 attention heads (from the file's ctor_kwargs.attention_heads)" in loaded.note
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.forward_features(X), model.forward_features(X))
        torch.testing.assert_close(loaded.model(X), model(X))
    ref = prenorm_vit_blocks(X, sd, 2, pos_has_cls_slot=False)
    with torch.no_grad():
        taps = tap_blocks(loaded.model, X, [3])
    torch.testing.assert_close(taps.cls[:, 0], ref[-1][:, 0], atol=1e-5, rtol=1e-5)
    # Without ctor_kwargs the layout still says MAE-CT; the head count is then given.
    torch.save({"state_dict": sd}, path)
    again = load_model(f"{path}#heads=2")
    assert again.format == "MAE-CT"
    with torch.no_grad():
        torch.testing.assert_close(again.model(X), model(X))


# ------------------------------------------------------------------------- register tokens


@pytest.mark.parametrize("no_embed_class", [False, True])
def test_register_token_state_dict(tmp_path, no_embed_class):
    """A raw state dict of a ViT with 4 register tokens: reg_tokens and the position layout come
    from the shapes, outputs are identical, and taps' mean patch leaves the registers out."""
    model = make_tiny_vit(4, reg_tokens=4, no_embed_class=no_embed_class)
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    assert sd["reg_token"].shape == (1, 4, 32)
    path = tmp_path / "vit_reg4.safetensors"
    save_file(sd, str(path))
    loaded = load_model(f"{path}#heads=2")
    args = loaded.model_args
    assert args["reg_tokens"] == 4 and args["num_heads"] == 2 and args["img_size"] == 32
    assert args.get("no_embed_class", False) is no_embed_class
    assert loaded.model.num_prefix_tokens == 5
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X), model(X))
        taps = tap_blocks(loaded.model, X, list(range(4)))
    ref = prenorm_vit_blocks(X, sd, 2, pos_has_cls_slot=not no_embed_class, reg_key="reg_token")
    for i, tokens in enumerate(ref):
        torch.testing.assert_close(taps.cls[:, i], tokens[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(taps.patch[:, i], tokens[:, 5:].mean(1), atol=1e-5, rtol=1e-5)
    final = layer_norm(ref[-1], sd, "norm")
    torch.testing.assert_close(taps.patch_norm, final[:, 5:].mean(1), atol=1e-5, rtol=1e-5)
