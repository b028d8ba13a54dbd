"""--objective mrmae (MR-MAE): both losses and patchify against naive references, the shipped
fmnist-mae-tiny decoder (strict load, same output as the pre-training script, low reconstruction
loss on Fashion-MNIST), decoder errors, gradient flow (frozen teachers, heads stage), descent, the
CLI end to end with resume, and the offline default teachers."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mimcli.errors import MimcliError
from mimcli.models.mae_decoder import (
    MaeDecoder,
    fresh_spec,
    load_decoder,
    patchify,
    read_decoder_file,
    reconstruction_loss,
    unpatchify,
)
from mimcli.models.masked import encode_visible, random_mask
from mimcli.models.sources import load_model
from mimcli.objectives.mrmae import (
    DEFAULT_TEACHERS,
    MRMAEObjective,
    mimic_loss,
    visible_positions,
)
from mimcli.refine.loop import Refiner
from tests.conftest import write_image_folder
from tests.objective_harness import (
    check_resume,
    first_batch,
    losses_on_fixed_batch,
    metric_steps,
    refine_cli,
    save_tiny_vit,
    tiny_cfg,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "examples" / "models" / "fmnist-mae-tiny"
FMNIST = ROOT / "examples" / "data" / "fashion-mnist-subset.npz"


def mrmae_cfg(model_dir, data_dir, out, teachers, **kw):
    return tiny_cfg(model_dir, data_dir, out, "mrmae", teacher=[str(t) for t in teachers], **kw)


# --- oracles ---------------------------------------------------------------------------------


def _naive_mimic(pred, target):
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for k in range(pred.shape[1]):
            t = target[b, k].double()
            mean = t.mean()
            var = ((t - mean) ** 2).mean()  # LayerNorm: biased variance
            t = (t - mean) / math.sqrt(var + 1e-6)
            total += float(((pred[b, k].double() - t) ** 2).sum())
            count += t.numel()
    return total / count


def _naive_reconstruction(pred, images, mask, p, norm_pix):
    b_, c_, h, w = images.shape
    total, masked = 0.0, 0
    for b in range(b_):
        for n in range(mask.shape[1]):
            if not mask[b, n]:
                continue
            i, j = divmod(n, w // p)
            pixels = [
                float(images[b, ch, i * p + r, j * p + c])
                for r in range(p)
                for c in range(p)
                for ch in range(c_)
            ]
            if norm_pix:
                mean = sum(pixels) / len(pixels)
                var = sum((v - mean) ** 2 for v in pixels) / (len(pixels) - 1)  # unbiased
                pixels = [(v - mean) / math.sqrt(var + 1e-6) for v in pixels]
            err = [(float(pred[b, n, d]) - pixels[d]) ** 2 for d in range(len(pixels))]
            total += sum(err) / len(err)
            masked += 1
    return total / masked


def test_losses_and_patchify_match_naive_references():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 5, 7, generator=gen), torch.randn(3, 5, 7, generator=gen) * 4 + 2
    assert float(mimic_loss(pred, target)) == pytest.approx(_naive_mimic(pred, target), rel=1e-5)
    # a perfect mimic head has zero loss whatever the teacher's scale
    normed = torch.nn.functional.layer_norm(target, (7,), eps=1e-6)
    assert float(mimic_loss(normed, target * 1.0)) < 1e-10

    images = torch.randn(2, 3, 12, 8, generator=gen)
    p = 4  # 3 x 2 grid, 48 values per patch
    mask = random_mask(2, 6, 0.5, gen)
    out = torch.randn(2, 6, p * p * 3, generator=gen)
    for norm_pix in (True, False):
        got = float(reconstruction_loss(out, images, mask, p, norm_pix))
        assert got == pytest.approx(_naive_reconstruction(out, images, mask, p, norm_pix), rel=1e-5)
    # only masked patches count: changing a visible patch's prediction changes nothing
    visible = (~mask[0]).nonzero()[0, 0]
    changed = out.clone()
    changed[0, visible] += 10.0
    assert torch.equal(
        reconstruction_loss(changed, images, mask, p), reconstruction_loss(out, images, mask, p)
    )
    patches = patchify(images, p)
    assert patches.shape == (2, 6, 48)
    assert float(patches[1, 3, 2 * 3 + 1]) == float(images[1, 1, 4 + 0, 4 + 2])  # (i1,j1),(r0,c2)
    assert torch.equal(unpatchify(patches, p, (3, 2)), images)
    # visible positions: ascending, exactly the unmasked ones
    keep = visible_positions(mask)
    for row in range(2):
        assert keep[row].tolist() == (~mask[row]).nonzero().flatten().tolist()


# --- the shipped decoder ---------------------------------------------------------------------


def _pretrain_script():
    spec = importlib.util.spec_from_file_location(
        "pretrain_tiny_mae", ROOT / "examples" / "pretrain_tiny_mae.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_decoder_matches_pretraining_and_reconstructs_fmnist():
    loaded = load_model(str(SHIPPED))
    assert loaded.decoder is not None and loaded.decoder_metadata["decoder_num_heads"] == "4"
    decoder = load_decoder(loaded.decoder, loaded.decoder_metadata, "shipped").eval()
    s = decoder.spec
    assert (s.encoder_dim, s.width, s.depth, s.num_heads, s.num_patches, s.patch_size) == (
        128,
        64,
        2,
        4,
        49,
        4,
    )
    assert s.norm_pix_loss and s.layer_norm_eps == 1e-6
    for key, value in decoder.state_dict().items():
        assert torch.equal(value, loaded.decoder[key]), key

    x = np.load(FMNIST)["x_test"][:48]
    gray = torch.from_numpy(x).float().div(255)[:, None]
    images = ((gray - 0.286) / 0.353).expand(-1, 3, -1, -1).contiguous()
    gen = torch.Generator().manual_seed(0)
    mask = random_mask(len(images), 49, 0.75, gen)
    keep = visible_positions(mask)
    script = _pretrain_script()
    reference = script.MaeDecoder(128, 49, 48).eval()
    reference.load_state_dict(load_file(SHIPPED / "decoder.safetensors"), strict=True)
    # the script restores MAE's shuffle order: visible patches first, then the masked ones
    hidden = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :37]
    restore = torch.cat([keep, hidden], dim=1).argsort(dim=1)
    with torch.no_grad():
        latent = encode_visible(loaded.model, images, keep)
        ours = decoder(latent, keep)
        theirs = reference(latent, restore)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        fresh = MaeDecoder(fresh_spec(128, (7, 7), 4)).initialise(gen).eval()
        assert torch.equal(fresh.decoder_pos_embed, script.sincos_2d(64, 7, cls_slot=True))
        shipped_loss = float(reconstruction_loss(ours, images, mask, 4))
        fresh_loss = float(reconstruction_loss(fresh(latent, keep), images, mask, 4))
    # pre-training ended at 0.47 (augmented train views); a random decoder is far worse
    assert shipped_loss < 0.6 and fresh_loss > 1.0, (shipped_loss, fresh_loss)


def test_shipped_decoder_is_used_by_the_objective(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=3, classes=3, size=28, seed=5)
    teacher = save_tiny_vit(tmp_path / "teacher", seed=7, patch_size=16, embed_dim=48)
    refiner = Refiner(mrmae_cfg(SHIPPED, data, tmp_path / "run", [teacher]))
    obj = refiner.objective
    assert obj.decoder_origin == "shipped with MODEL" and obj.decoder.spec.num_patches == 49
    assert torch.equal(
        obj.decoder.decoder_pred.weight,
        load_file(SHIPPED / "decoder.safetensors")["decoder_pred.weight"],
    )
    loss, metrics = refiner.step_losses(first_batch(refiner, "heads"), "heads", 0)
    # noisy colour images, not Fashion-MNIST: only check the loss is there and finite
    assert metrics["loss_rec"] > 0 and torch.isfinite(loss)


def test_decoder_errors_name_the_problem(tmp_path, tiny_model_dir, data_dir, teacher_dir):
    state = load_file(SHIPPED / "decoder.safetensors")
    broken = {k: v for k, v in state.items() if k != "decoder_blocks.1.mlp.fc2.bias"}
    with pytest.raises(MimcliError, match=r"missing decoder_blocks\.1\.mlp\.fc2\.bias"):
        load_decoder(broken, {"decoder_num_heads": "4"}, "test")
    with pytest.raises(MimcliError, match=r"unexpected extra\.weight"):
        load_decoder({**state, "extra.weight": torch.zeros(1)}, None, "test")
    bad_shape = dict(state, **{"decoder_norm.bias": torch.zeros(65)})
    with pytest.raises(MimcliError, match=r"shape mismatch decoder_norm\.bias"):
        load_decoder(bad_shape, None, "test")
    with pytest.raises(MimcliError, match="not an MAE decoder"):
        load_decoder({"blocks.0.norm1.weight": torch.zeros(4)}, None, "test")
    # an MAE _full .pth: the decoder comes out, the encoder keys stay behind
    full = tmp_path / "mae_full.pth"
    encoder = {"cls_token": torch.zeros(1, 1, 128), "blocks.0.norm1.weight": torch.ones(128)}
    torch.save({"model": {**encoder, **state}, "epoch": 3}, full)
    read, metadata = read_decoder_file(full)
    assert read.keys() == state.keys() and metadata is None
    assert load_decoder(read, metadata, "pth").spec.num_heads == 2  # 64 wide: 32-dim heads
    torch.save({"model": encoder}, tmp_path / "encoder_only.pth")
    # through the CLI: one line, exit 2, no traceback
    base = [str(tiny_model_dir), "--objective", "mrmae", "--teacher", str(teacher_dir)]
    base += ["--data", str(data_dir), "--batch-size", "8", "--num-workers", "0"]
    for decoder, message in (
        (SHIPPED / "decoder.safetensors", "reads 128-wide tokens"),
        (tmp_path / "encoder_only.pth", "no MAE decoder weights"),
    ):
        result = refine_cli([*base, "--decoder", str(decoder), "--out", str(tmp_path / "x")])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
    # a decoder for another grid (same width) is refused against the student's 4x4 grid
    other = MaeDecoder(fresh_spec(32, (7, 7), 4)).initialise()
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    result = refine_cli(
        [*base, "--decoder", str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "y")]
    )
    assert result.exit_code == 2 and "49 patches of 4 px" in result.output, result.output
    assert "16 patches of 8 px" in result.output


# --- training --------------------------------------------------------------------------------


def test_defaults_and_description(tiny_model_dir, data_dir, teacher_dir, tmp_path):
    refiner = Refiner(mrmae_cfg(tiny_model_dir, data_dir, tmp_path / "run", [teacher_dir], lr=None))
    obj, cfg = refiner.objective, refiner.cfg
    assert isinstance(obj, MRMAEObjective)
    assert cfg.local_crops == 0 and cfg.photometric is False and cfg.mask_ratio == 0.75
    assert cfg.mimic_weight == 1.0 and cfg.lr == 1.5e-4 and refiner.blocks == [4]
    assert len(first_batch(refiner).views) == 1  # one MAE-style view
    described = obj.describe()
    (teacher,) = described["teachers"]
    assert {k: teacher[k] for k in ("source", "arch", "dim")} == {
        "source": str(teacher_dir),
        "arch": "vit_base_patch16_224",
        "dim": 48,
    }
    assert teacher["patch_size"] == [16, 16] and "resampled" in teacher["features"]
    assert described["decoder"] == "fresh, warmed up" and described["reconstruction"] is True
    assert described["decoder_spec"]["width"] == 32 and described["decoder_spec"]["depth"] == 2
    assert "fresh, warmed up" in obj.summary() and "mask ratio 0.75" in obj.summary()
    assert obj.views_summary().startswith("1x32px (25% visible")
    assert [tuple(h.weight.shape) for h in obj.mimic_heads] == [(48, 32)]
    assert fresh_spec(1024, (14, 14), 16).width == 512 and fresh_spec(768, (14, 14), 16).depth == 8
    assert DEFAULT_TEACHERS == ("vit_base_patch16_clip_224.openai", "vit_base_patch16_224.dino")


def test_gradient_flow_and_frozen_teachers(tiny_model_dir, data_dir, teacher_dir, tmp_path):
    refiner = Refiner(mrmae_cfg(tiny_model_dir, data_dir, tmp_path / "run", [teacher_dir]))
    obj = refiner.objective
    teacher = obj.teachers[0].model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert not any(p.requires_grad for p in teacher.parameters())
    names = set(obj.state_dict())
    assert names and all(n.startswith(("mimic_heads.", "decoder.")) for n in names)
    # refine: encoder, mimic heads and decoder all get gradient
    batch = first_batch(refiner)
    refiner.encoder.train()
    loss, metrics = refiner.step_losses(batch, "refine", 0)
    assert set(metrics) == {"loss_rec", "loss_mimic/0"}
    total = float(metrics["loss_rec"] + metrics["loss_mimic/0"])
    assert float(loss.detach()) == pytest.approx(total, rel=1e-5)
    loss.backward()
    for module in (refiner.encoder, obj.mimic_heads, obj.decoder):
        for name, p in module.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            else:
                assert p.grad is None and name.endswith("pos_embed"), name
    assert all(p.grad is None for p in teacher.parameters())
    # heads: the encoder gets nothing, heads and decoder do
    refiner.encoder.zero_grad(set_to_none=True)
    obj.zero_grad(set_to_none=True)
    loss, _ = refiner.step_losses(first_batch(refiner, "heads"), "heads", 0)
    loss.backward()
    assert all(p.grad is None for p in refiner.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.trainable_parameters())
    # a few optimiser steps: teachers stay bit-identical and outside the optimiser
    losses_on_fixed_batch(refiner, "refine", 2)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    optimised = {id(p) for g in refiner.optimizer.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in obj.trainable_parameters()} <= optimised
    refiner.save("refine", 1)
    saved = load_file(refiner.run.checkpoint_path)
    for name, p in teacher.state_dict().items():
        assert not any(v.shape == p.shape and torch.equal(v, p) for v in saved.values()), name


def test_without_reconstruction_builds_no_decoder(tiny_model_dir, data_dir, teacher_dir, tmp_path):
    cfg = mrmae_cfg(tiny_model_dir, data_dir, tmp_path / "run", [teacher_dir], reconstruction=False)
    refiner = Refiner(cfg)
    obj = refiner.objective
    assert obj.decoder is None and obj.describe()["decoder"] == "none: mimic only"
    assert "no reconstruction" in obj.summary()
    assert all(n.startswith("mimic_heads.") for n in obj.state_dict())
    loss, metrics = refiner.step_losses(first_batch(refiner), "refine", 0)
    assert set(metrics) == {"loss_mimic/0"}
    assert float(loss.detach()) == pytest.approx(metrics["loss_mimic/0"])


@pytest.mark.parametrize("stage", ["heads", "refine"])
def test_loss_descends_on_a_fixed_batch(tiny_model_dir, data_dir, teacher_dir, tmp_path, stage):
    cfg = mrmae_cfg(tiny_model_dir, data_dir, tmp_path / "run", [teacher_dir], lr=0.1)
    cfg.head_lr = 0.1
    losses = losses_on_fixed_batch(Refiner(cfg), stage, 8)
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3, losses


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_end_to_end_and_resume(tiny_model_dir, data_dir, teacher_dir, tmp_path, monkeypatch):
    args = [str(tiny_model_dir), "--objective", "mrmae", "--teacher", str(teacher_dir)]
    args += ["--data", str(data_dir), "--head-steps", "2", "--steps", "3", "--batch-size", "8"]
    args += ["--head-width", "32", "--num-workers", "0", "--checkpoint-every", "1"]
    args += ["--head-lr", "1e-3", "--lr", "1e-3"]
    check_resume(tmp_path, args, monkeypatch)
    run = tmp_path / "full"
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["objective"] == "mrmae" and resolved["decoder"] == "fresh, warmed up"
    assert [t["source"] for t in resolved["teachers"]] == [str(teacher_dir)]
    assert resolved["mask_ratio"] == 0.75 and resolved["mimic_weight"] == 1.0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metric_steps(run) == [0, 1, 2, 3, 4]
    assert all({"loss", "loss_rec", "loss_mimic/0"} <= set(r) for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)


def test_cli_mimic_only_with_two_teachers(tiny_model_dir, data_dir, teacher_dir, tmp_path):
    second = save_tiny_vit(tmp_path / "teacher2", seed=8, embed_dim=24, num_heads=2)
    args = [str(tiny_model_dir), "--objective", "mrmae", "--data", str(data_dir)]
    args += ["--teacher", str(teacher_dir), "--teacher", str(second), "--no-reconstruction"]
    args += ["--head-steps", "1", "--steps", "2", "--batch-size", "8", "--num-workers", "0"]
    result = refine_cli([*args, "--log-every", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    banner = result.output
    assert "decoder none: mimic only" in banner and "1x32px (25% visible" in banner
    assert "1.0 x mean of 2 mimic losses (no reconstruction)" in banner
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    resolved = config["resolved"]
    assert resolved["decoder"] == "none: mimic only" and resolved["reconstruction"] is False
    assert config["config"]["reconstruction"] is False
    assert [t["dim"] for t in resolved["teachers"]] == [48, 24]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        assert {"loss_mimic/0", "loss_mimic/1"} <= set(r) and "loss_rec" not in r
        assert r["loss"] == pytest.approx((r["loss_mimic/0"] + r["loss_mimic/1"]) / 2, rel=1e-5)


def test_default_teachers_offline_is_one_line_exit_2(
    tiny_model_dir, data_dir, tmp_path, monkeypatch
):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    args = [str(tiny_model_dir), "--objective", "mrmae", "--data", str(data_dir)]
    result = refine_cli([*args, "--batch-size", "8", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "--teacher" in result.output and DEFAULT_TEACHERS[0] in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "config.json").exists()
