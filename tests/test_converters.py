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
    loaded = load_model(str(path))
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
    loaded = load_model(str(path))
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
    loaded = load_model(str(path))
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
    loaded = load_model(str(path))
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
    loaded = load_model(str(path))  # the weights are fine; the payload is neutralised
    assert loaded.num_blocks == 3
    assert not os.path.exists(marker)
