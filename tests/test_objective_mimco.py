"""--objective mimco (MimCo): both losses against naive references, defaults, the teacher on the
student's grid, gradient flow (frozen teacher, heads stage through the mask token), the loss of
one step recomputed by hand, descent, the CLI end to end with resume, and the teacher errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from mimcli.errors import MimcliError
from mimcli.models.masked import encode_masked
from mimcli.models.teacher import Teacher
from mimcli.objectives.mimco import (
    DEFAULT_TEACHER,
    MimCoObjective,
    image_contrastive_loss,
    patch_contrastive_loss,
)
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


def mimco_cfg(model_dir, data_dir, out, teacher_dir, **kw):
    return tiny_cfg(model_dir, data_dir, out, "mimco", teacher=[str(teacher_dir)], **kw)


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


def softmax_nll(scores, target):
    exps = [math.exp(s) for s in scores]
    return -math.log(exps[target] / sum(exps))


def test_losses_match_naive_references():
    gen = torch.Generator().manual_seed(0)
    b, n, d, tau = 3, 5, 7, 0.2
    pred, target = torch.randn(b, n, d, generator=gen), torch.randn(b, n, d, generator=gen)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 0], [1, 1, 0, 1, 1]], dtype=torch.bool)
    losses, hits = [], []
    for i in range(b):
        for j in range(n):
            if mask[i, j]:
                scores = [
                    cosine(pred[i, j].tolist(), target[i, k].tolist()) / tau for k in range(n)
                ]
                losses.append(softmax_nll(scores, j))
                hits.append(max(range(n), key=lambda k: scores[k]) == j)
    got = patch_contrastive_loss(pred, target, mask, tau)
    assert got.loss.item() == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert got.accuracy.item() == pytest.approx(sum(hits) / len(hits))
    # the other images' patches are no negatives: changing them changes nothing
    other = target.clone()
    other[1:] = torch.randn(b - 1, n, d, generator=gen)
    only_first = mask.clone()
    only_first[1:] = False
    torch.testing.assert_close(
        patch_contrastive_loss(pred, other, only_first, tau).loss,
        patch_contrastive_loss(pred, target, only_first, tau).loss,
    )

    # image level: 3 rows of this rank against the 7 targets of the global batch, offset 2
    pred_img, target_all, offset = (
        torch.randn(3, d, generator=gen),
        torch.randn(7, d, generator=gen),
        2,
    )
    losses, hits = [], []
    for i in range(3):
        scores = [cosine(pred_img[i].tolist(), target_all[k].tolist()) / tau for k in range(7)]
        losses.append(softmax_nll(scores, offset + i))
        hits.append(max(range(7), key=lambda k: scores[k]) == offset + i)
    got = image_contrastive_loss(pred_img, target_all, tau, offset=offset)
    assert got.loss.item() == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert got.accuracy.item() == pytest.approx(sum(hits) / 3)
    # the positive decides: targets equal to the predictions give a near-zero loss
    exact = torch.cat(
        [torch.randn(2, d, generator=gen), pred_img, torch.randn(2, d, generator=gen)]
    )
    assert image_contrastive_loss(pred_img, exact, 0.01, offset=2).accuracy.item() == 1.0
    # gradient only through the prediction
    p = pred_img.clone().requires_grad_(True)
    t = target_all.clone().requires_grad_(True)
    image_contrastive_loss(p, t, tau, offset).loss.backward()
    assert p.grad is not None and p.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError, match="offset"):
        image_contrastive_loss(pred_img, target_all, tau, offset=5)
    with pytest.raises(ValueError, match="no patch"):
        patch_contrastive_loss(pred, target, torch.zeros(b, n, dtype=torch.bool), tau)
    with pytest.raises(ValueError, match="temperature"):
        patch_contrastive_loss(pred, target, mask, 0.0)


def test_defaults_heads_and_teacher_choice(tiny_model_dir, data_dir, teacher_dir, tmp_path):
    refiner = Refiner(mimco_cfg(tiny_model_dir, data_dir, tmp_path / "run", teacher_dir))
    obj, cfg = refiner.objective, refiner.cfg
    assert isinstance(obj, MimCoObjective)
    assert cfg.temperature == 0.2 and cfg.mask_ratio == 0.6 and cfg.image_weight == 1.0
    assert cfg.local_crops == 0 and cfg.photometric is False and refiner.blocks == [4]
    described = obj.describe()
    teacher = described["teacher"]
    assert {k: teacher[k] for k in ("source", "arch", "dim", "default")} == {
        "source": str(teacher_dir),
        "arch": "vit_base_patch16_224",
        "dim": 48,
        "default": False,
    }
    assert teacher["patch_size"] == [16, 16] and teacher["input_size"] == [32, 32]
    assert teacher["depth"] == 4 and len(teacher["mean"]) == len(teacher["std"]) == 3
    assert described["temperature"] == 0.2 and described["teacher_global"] == "cls"
    assert "teacher" in obj.summary() and "mask 0.6" in obj.summary()
    # one view per image, at the model's size
    views = obj.transform()(Image.new("RGB", (40, 40)))
    assert len(views) == 1 and views[0].shape == (3, 32, 32)
    # the objective owns the mask token and both heads, nothing of the teacher
    keys = set(obj.state_dict())
    assert "mask_token" in keys and obj.mask_token.shape == (32,)
    assert keys == {"mask_token"} | {
        k for k in keys if k.startswith(("patch_head.", "image_head."))
    }
    assert obj.patch_head[-1].out_features == 48 and obj.image_head[0].out_features == 32
    # the same draw per (seed, stage, step): a resumed run repeats its masks
    m = obj.masks(8, 16, "refine", 3)
    assert m.shape == (8, 16) and (m.sum(1) == round(0.6 * 16)).all()
    assert torch.equal(m, obj.masks(8, 16, "refine", 3))
    assert not torch.equal(m, obj.masks(8, 16, "refine", 4))
    # explicit options win; more than one teacher is refused
    other = Refiner(
        mimco_cfg(
            tiny_model_dir,
            data_dir,
            tmp_path / "run2",
            teacher_dir,
            mask_ratio=0.4,
            image_weight=0.5,
        )
    )
    assert other.objective.mask_ratio == 0.4 and other.objective.image_weight == 0.5
    two = tiny_cfg(
        tiny_model_dir, data_dir, tmp_path / "run3", "mimco", teacher=[str(teacher_dir)] * 2
    )
    with pytest.raises(MimcliError, match="one --teacher"):
        Refiner(two)


def test_teacher_features_on_the_student_grid(teacher_dir, tiny_vit):
    from mimcli.views import ViewConfig

    teacher = Teacher(
        str(teacher_dir), ViewConfig(global_size=32, local_size=16), torch.device("cpu")
    )
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    feats = teacher.features(images, (4, 4))
    assert feats.patches.shape == (3, 16, 48) and feats.cls.shape == (3, 48)
    # student-normalised (ImageNet mean/std) -> pixels -> the teacher's own mean/std
    cfg = teacher.loaded.pretrained_cfg
    pixels = images * torch.tensor(ViewConfig.std)[:, None, None]
    pixels = pixels + torch.tensor(ViewConfig.mean)[:, None, None]
    x = (pixels - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[
        :, None, None
    ]
    with torch.no_grad():
        tokens = teacher.model.forward_features(x)
    own = tokens[:, 1:]  # (3, 4, 48): the teacher's own 2x2 grid
    planes = own.transpose(1, 2).reshape(3, 48, 2, 2)
    expected = F.interpolate(planes, size=(4, 4), mode="bilinear", align_corners=False)
    expected = expected.flatten(2).transpose(1, 2)
    torch.testing.assert_close(feats.patches, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats.cls, tokens[:, 0], rtol=1e-4, atol=1e-4)
    # corners of a 2x -> 4x bilinear upsampling are the corner cells themselves
    torch.testing.assert_close(feats.patches[:, 0], own[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats.patches[:, 15], own[:, 3], rtol=1e-4, atol=1e-4)
    # on its own grid nothing is resampled
    torch.testing.assert_close(teacher.features(images, (2, 2)).patches, own, rtol=1e-4, atol=1e-4)


def test_step_loss_is_the_formula(tiny_model_dir, data_dir, teacher_dir, tmp_path):
    """The objective's loss recomputed from its parts: its masks, the masked pass, the teacher on
    the student's 4x4 grid, both losses."""
    refiner = Refiner(
        mimco_cfg(tiny_model_dir, data_dir, tmp_path / "run", teacher_dir, image_weight=0.7)
    )
    obj, encoder = refiner.objective, refiner.encoder
    batch = first_batch(refiner)
    loss, metrics = refiner.step_losses(batch, "refine", 2)
    assert set(metrics) == {"loss_patch", "loss_image", "acc_patch", "acc_image"}
    with torch.no_grad():
        images = batch.views[0]
        mask = obj.masks(8, 16, "refine", 2)
        tokens = encode_masked(encoder, images, mask, obj.mask_token)
        target = obj.teacher.features(images, (4, 4))
        patch = patch_contrastive_loss(obj.patch_head(tokens[:, 1:]), target.patches, mask, 0.2)
        image = image_contrastive_loss(obj.image_head(tokens[:, 0]), target.cls, 0.2)
    torch.testing.assert_close(loss.detach(), patch.loss + 0.7 * image.loss)
    assert metrics["loss_patch"] == pytest.approx(patch.loss.item(), rel=1e-5)
    assert metrics["loss_image"] == pytest.approx(image.loss.item(), rel=1e-5)
    # fresh heads: near chance level (ln 16 over a 4x4 grid, ln 8 over the batch)
    assert metrics["loss_patch"] == pytest.approx(math.log(16), rel=0.3)
    assert metrics["loss_image"] == pytest.approx(math.log(8), rel=0.3)


def test_gradient_flow_and_the_frozen_teacher(tiny_model_dir, data_dir, teacher_dir, tmp_path):
    refiner = Refiner(mimco_cfg(tiny_model_dir, data_dir, tmp_path / "run", teacher_dir))
    obj = refiner.objective
    teacher = obj.teacher.model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert all(not p.requires_grad for p in teacher.parameters())
    # heads stage: heads and the mask token learn, through the frozen encoder for the token
    loss, _ = refiner.step_losses(first_batch(refiner, "heads"), "heads", 0)
    loss.backward()
    assert all(p.grad is None for p in refiner.encoder.parameters())
    for name, p in obj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    trainable = {n for n, p in refiner.encoder.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in refiner.encoder.named_parameters()} - {"pos_embed"}
    obj.zero_grad(set_to_none=True)
    # refine stage: everything trainable gets a gradient, the teacher none
    loss, _ = refiner.step_losses(first_batch(refiner), "refine", 0)
    loss.backward()
    for name, p in refiner.encoder.named_parameters():
        if name == "pos_embed":
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in obj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())
    # a few optimiser steps of each stage leave the teacher bit-identical
    for stage in ("heads", "refine"):
        losses_on_fixed_batch(refiner, stage, 2)
        in_optimiser = {id(p) for g in refiner.optimizer.param_groups for p in g["params"]}
        assert not in_optimiser & {id(p) for p in teacher.parameters()}
        assert id(obj.mask_token) in in_optimiser
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the checkpoint holds no teacher tensor
    refiner.save("refine", 1)
    saved = load_file(refiner.run.checkpoint_path)
    assert saved and not any("teacher" in k for k in saved)
    for name, p in teacher.state_dict().items():
        assert not any(v.shape == p.shape and torch.equal(v, p) for v in saved.values()), name


@pytest.mark.parametrize("stage", ["heads", "refine"])
def test_loss_descends_on_a_fixed_batch(tiny_model_dir, data_dir, teacher_dir, tmp_path, stage):
    """Both terms fall. The patch term cannot fall far here: the random tiny teacher's patch
    features of one image are nearly parallel (cosine 0.92-0.99, 2x2 upsampled to 4x4), so even
    predicting the teacher's own features scores about 2.6 at tau 0.2 (chance: ln 16 = 2.77).
    The image term falls towards ln(8/3): images of one class are near-duplicates."""
    cfg = mimco_cfg(tiny_model_dir, data_dir, tmp_path / "run", teacher_dir, lr=0.1, head_lr=0.1)
    refiner = Refiner(cfg)
    logged = []
    step_losses = refiner.step_losses

    def recording(*args):
        loss, metrics = step_losses(*args)
        logged.append(metrics)
        return loss, metrics

    refiner.step_losses = recording
    losses = losses_on_fixed_batch(refiner, stage, 12)
    assert losses[0] == pytest.approx(math.log(16) + math.log(8), rel=0.3)

    def first_last(values):
        return sum(values[:3]) / 3, sum(values[-3:]) / 3

    first, last = first_last(losses)
    assert last < 0.85 * first, losses
    first, last = first_last([m["loss_image"] for m in logged])
    assert last < 0.7 * first, logged
    first, last = first_last([m["loss_patch"] for m in logged])
    assert last < first - 0.05, logged


def test_cli_end_to_end_and_resume(tiny_model_dir, data_dir, teacher_dir, tmp_path, monkeypatch):
    args = [
        str(tiny_model_dir),
        "--objective",
        "mimco",
        "--teacher",
        str(teacher_dir),
        *tiny_run_args(data_dir),
        "--lr",
        "1e-2",
        "--mask-ratio",
        "0.5",
    ]
    check_resume(tmp_path, args, monkeypatch, stop_after=("heads", 1))
    run = tmp_path / "full"
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["objective"] == "mimco"
    assert config["config"]["teacher"] == [str(teacher_dir)]
    resolved = config["resolved"]
    assert resolved["objective"] == "mimco" and resolved["teacher"]["source"] == str(teacher_dir)
    assert resolved["teacher"]["dim"] == 48 and resolved["mask_ratio"] == 0.5
    assert resolved["temperature"] == 0.2 and resolved["image_weight"] == 1.0
    assert metric_steps(run) == list(range(5))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert r["loss"] == pytest.approx(r["loss_patch"] + r["loss_image"], rel=1e-5)
        assert 0 <= r["acc_patch"] <= 1 and 0 <= r["acc_image"] <= 1
    base = load_file(tiny_model_dir / "model.safetensors")
    exported = export_tensors(run)
    assert exported.keys() == base.keys()
    assert not torch.equal(exported["blocks.3.attn.qkv.weight"], base["blocks.3.attn.qkv.weight"])
    ckpt = load_file(run / "checkpoint.safetensors")
    objective_keys = {k[len("t.objective.") :] for k in ckpt if k.startswith("t.objective.")}
    assert "mask_token" in objective_keys
    assert all(k.startswith(("mask_token", "patch_head.", "image_head.")) for k in objective_keys)


def test_teacher_errors_are_one_line(tiny_model_dir, data_dir, teacher_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    common = [str(tiny_model_dir), "--objective", "mimco", "--data", str(data_dir)]
    out = refine_cli([*common, "--out", str(tmp_path / "a"), "--batch-size", "8"])
    assert out.exit_code == 2, out.output
    assert "--teacher" in out.output and DEFAULT_TEACHER in out.output
    assert "Traceback" not in out.output
    two = refine_cli(
        [*common, "--out", str(tmp_path / "b"), "--batch-size", "8"]
        + ["--teacher", str(teacher_dir), "--teacher", str(teacher_dir)]
    )
    assert two.exit_code == 2 and "one --teacher" in two.output and "Traceback" not in two.output
