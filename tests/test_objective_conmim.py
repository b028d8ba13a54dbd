"""--objective conmim (ConMIM, arXiv 2205.09616): the patch InfoNCE against a naive reference, the
weak/strong views, defaults, gradient flow and the momentum schedule, descent, the CLI end to end
with resume, and the position-only shortcut on content-free images."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mimcli.errors import MimcliError
from mimcli.models.masked import random_mask
from mimcli.objectives.conmim import (
    ConMIMObjective,
    WeakStrongTransform,
    conmim_loss,
    momentum_at,
    positive_accuracy,
)
from mimcli.optim import apply_lr
from mimcli.refine.loop import Refiner
from mimcli.views import ViewConfig
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


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models gain nothing from a second OpenMP thread; on a busy machine it only spins."""
    before = torch.get_num_threads()
    monkeypatch.setenv("MIMCLI_THREADS", "1")
    yield
    torch.set_num_threads(before)


def naive_conmim(pred, target, mask, tau):
    """Per image, per masked position: explicit softmax over that image's N keys."""
    terms, wins = [], []
    for b in range(pred.shape[0]):
        for i in range(pred.shape[1]):
            if not mask[b, i]:
                continue
            q = pred[b, i].double() / pred[b, i].double().norm()
            logits = []
            for j in range(pred.shape[1]):
                k = target[b, j].double() / target[b, j].double().norm()
                logits.append(float(q @ k) / tau)
            top = max(logits)
            denom = sum(math.exp(x - top) for x in logits)
            terms.append(-(logits[i] - top - math.log(denom)))
            wins.append(logits.index(top) == i)
    return sum(terms) / len(terms), sum(wins) / len(wins)


@pytest.mark.parametrize(
    ("b", "n", "d", "ratio", "tau"),
    [(2, 4, 3, 0.5, 0.1), (3, 9, 8, 0.3, 0.2), (1, 16, 5, 0.75, 1.0)],
)
def test_loss_matches_the_naive_reference(b, n, d, ratio, tau):
    gen = torch.Generator().manual_seed(b * 100 + n)
    pred = torch.randn(b, n, d, generator=gen)
    target = torch.randn(b, n, d, generator=gen) * 3  # scale must not matter (cosine)
    mask = random_mask(b, n, ratio, gen)
    loss = conmim_loss(pred, target, mask, tau)
    expected, wins = naive_conmim(pred, target, mask, tau)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert positive_accuracy(pred, target, mask) == pytest.approx(wins)
    # the positive is the same position: matching features give accuracy 1 and a small loss
    assert positive_accuracy(target, target, mask) == 1.0
    assert float(conmim_loss(target, target, mask, 0.05)) < float(loss)
    # a non-rectangular mask (different counts per image) works too
    ragged = torch.zeros(b, n, dtype=torch.bool)
    ragged[0, : n // 2] = True
    ragged[-1, -1] = True
    expected, _ = naive_conmim(pred, target, ragged, tau)
    assert float(conmim_loss(pred, target, ragged, tau)) == pytest.approx(expected, rel=1e-5)


def test_loss_gradient_reaches_pred_only():
    pred = torch.randn(2, 6, 4, requires_grad=True)
    target = torch.randn(2, 6, 4, requires_grad=True)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 1] = True
    conmim_loss(pred, target, mask, 0.1).backward()
    assert target.grad is None
    assert pred.grad[:, 1].abs().sum() > 0  # only masked rows feed the loss
    assert torch.equal(pred.grad[:, 0], torch.zeros_like(pred.grad[:, 0]))
    with pytest.raises(ValueError):
        conmim_loss(pred, target, torch.zeros(2, 6, dtype=torch.bool), 0.1)


def test_momentum_schedule():
    assert momentum_at(0, 100, 0.996) == 0.996
    assert momentum_at(50, 100, 0.996) == pytest.approx(0.998)
    assert momentum_at(100, 100, 0.996) == 1.0
    assert momentum_at(5, 0, 0.99) == 0.99
    values = [momentum_at(s, 10, 0.9) for s in range(11)]
    assert values == sorted(values)


def test_views_share_one_crop_and_repeat_when_reseeded():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    views = ViewConfig(global_size=32, local_size=16, local_crops=0, photometric=False)
    transform = WeakStrongTransform(views)
    torch.manual_seed(7)
    weak, strong = transform(img)
    assert weak.shape == strong.shape == (3, 32, 32) and not torch.equal(weak, strong)
    torch.manual_seed(7)
    again = transform(img)
    assert torch.equal(again[0], weak) and torch.equal(again[1], strong)
    transform.strong = lambda x: x  # without the photometric part the two views coincide
    torch.manual_seed(3)
    weak, strong = transform(img)
    assert torch.equal(weak, strong)


def test_defaults_and_description(tiny_model_dir, data_dir, tmp_path):
    refiner = Refiner(tiny_cfg(tiny_model_dir, data_dir, tmp_path / "run", "conmim", lr=None))
    obj, cfg = refiner.objective, refiner.cfg
    assert isinstance(obj, ConMIMObjective)
    assert cfg.local_crops == 0 and cfg.photometric is False and refiner.views.num_views == 2
    assert cfg.temperature == 0.1 and cfg.mask_ratio == 0.4 and cfg.momentum == 0.996
    assert cfg.lr == 4e-4 and cfg.freeze_blocks == 0 and refiner.blocks == [4]
    assert obj.mask_token.shape == (32,) and obj.mask_token.requires_grad
    assert 0 < obj.mask_token.std() < 0.05
    assert (obj.hidden, obj.out) == (64, 32)  # head width 32: predictor-hidden 64, out 32
    assert obj.describe()["projector_widths"] == {"hidden": 64, "out": 32}
    assert "tau 0.1" in obj.summary() and "mask ratio 0.4" in obj.summary()
    assert obj.views_summary() == "weak + strong of one 32px crop" and not obj.uses_blocks
    batch = first_batch(refiner)
    assert len(batch.views) == 2 and batch.views[0].shape == batch.views[1].shape
    # the momentum networks ride in the state dict (checkpoints, resume) but are not trained
    keys = obj.state_dict().keys()
    assert "mask_token" in keys and "momentum_encoder.blocks.0.attn.qkv.weight" in keys
    assert "momentum_projector.0.weight" in keys
    trained = {id(p) for p in obj.trainable_parameters()}
    assert id(obj.mask_token) in trained
    assert not any(id(p) in trained for p in obj.momentum_encoder.parameters())
    other = Refiner(
        tiny_cfg(
            tiny_model_dir, data_dir, tmp_path / "run2", "conmim", mask_ratio=0.6, temperature=0.2
        )
    )
    assert other.objective.mask_ratio == 0.6 and other.objective.tau == 0.2
    for bad in (dict(photometric=True), dict(local_crops=2), dict(mask_ratio=1.0)):
        with pytest.raises(MimcliError):
            Refiner(tiny_cfg(tiny_model_dir, data_dir, tmp_path / "bad", "conmim", **bad))


def test_gradient_flow_and_momentum_update_in_refine(tiny_model_dir, data_dir, tmp_path):
    refiner = Refiner(tiny_cfg(tiny_model_dir, data_dir, tmp_path / "run", "conmim"))
    obj = refiner.objective
    refiner.optimizer = refiner.make_optimizer("refine")
    apply_lr(refiner.optimizer, 1e-3)
    refiner.encoder.train()
    obj.train()
    assert not obj.momentum_encoder.training and obj.momentum_projector.training
    momentum_params = [*obj.momentum_encoder.parameters(), *obj.momentum_projector.parameters()]
    optimised = {id(p) for g in refiner.optimizer.param_groups for p in g["params"]}
    assert all(not p.requires_grad and id(p) not in optimised for p in momentum_params)
    assert id(obj.mask_token) in optimised
    loss, metrics = refiner.step_losses(first_batch(refiner), "refine", 1)
    assert metrics["momentum"] == pytest.approx(0.997)  # 1 - 0.004 * (1 + cos(pi/3)) / 2
    assert 0 <= metrics["patch_acc"] <= 1
    loss.backward()
    assert all(p.grad is None for p in momentum_params)
    for name, p in refiner.encoder.named_parameters():
        if name == "pos_embed":
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert obj.mask_token.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in obj.projector.parameters())
    old = [p.detach().clone() for p in momentum_params]
    refiner.optimizer.step()
    online = [*refiner.encoder.parameters(), *obj.projector.parameters()]
    obj.after_step(refiner.encoder, "refine", 1)
    m = 0.997
    moved = 0
    for before, after, o in zip(old, momentum_params, online, strict=True):
        torch.testing.assert_close(after, m * before + (1 - m) * o.detach(), rtol=1e-6, atol=1e-7)
        moved += not torch.equal(after, before)
    assert moved > len(old) // 2
    # BN running statistics are copied from the online projector
    assert torch.equal(obj.momentum_projector[1].running_mean, obj.projector[1].running_mean)


def test_head_warmup_trains_mask_token_and_projector_only(tiny_model_dir, data_dir, tmp_path):
    refiner = Refiner(tiny_cfg(tiny_model_dir, data_dir, tmp_path / "run", "conmim"))
    obj = refiner.objective
    refiner.optimizer = refiner.make_optimizer("heads")
    apply_lr(refiner.optimizer, 1e-3)
    refiner.encoder.eval()
    obj.train()
    trainable = {n for n, p in refiner.encoder.named_parameters() if p.requires_grad}
    proj_before = [p.detach().clone() for p in obj.momentum_projector.parameters()]
    loss, metrics = refiner.step_losses(first_batch(refiner, "heads"), "heads", 0)
    assert metrics["momentum"] == 0.996
    loss.backward()
    assert all(p.grad is None for p in refiner.encoder.parameters())
    # the freezing is temporary: the encoder's trainable set is untouched
    assert {n for n, p in refiner.encoder.named_parameters() if p.requires_grad} == trainable
    assert obj.mask_token.grad is not None and obj.mask_token.grad.abs().sum() > 0
    assert all(p.grad is not None for p in obj.projector.parameters())
    refiner.optimizer.step()
    obj.after_step(refiner.encoder, "heads", 0)
    for e, m in zip(refiner.encoder.parameters(), obj.momentum_encoder.parameters(), strict=True):
        assert torch.equal(e, m)
    for before, after, o in zip(
        proj_before, obj.momentum_projector.parameters(), obj.projector.parameters(), strict=True
    ):
        expected = 0.996 * before + 0.004 * o.detach()
        torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(after, before)


@pytest.mark.parametrize("stage", ["heads", "refine"])
def test_loss_descends_on_a_fixed_batch(tiny_model_dir, data_dir, tmp_path, stage):
    cfg = tiny_cfg(tiny_model_dir, data_dir, tmp_path / "run", "conmim", lr=3e-2, head_lr=3e-2)
    losses = losses_on_fixed_batch(Refiner(cfg), stage, 12)
    # random features at tau 0.1: near (a little above) ln N, N = 16 patches
    assert losses[0] == pytest.approx(math.log(16), rel=0.25), losses
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses


def test_cli_end_to_end_and_resume(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    args = [
        str(tiny_model_dir),
        "--objective",
        "conmim",
        *tiny_run_args(data_dir),
        "--lr",
        "1e-3",
    ]
    check_resume(tmp_path, args, monkeypatch, stop_after=("refine", 1))
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    resolved, options = config["resolved"], config["config"]
    assert resolved["objective"] == "conmim" and options["objective"] == "conmim"
    assert resolved["temperature"] == 0.1 and resolved["mask_ratio"] == 0.4
    assert resolved["momentum"] == 0.996 and resolved["projector_widths"]["out"] == 32
    assert options["local_crops"] == 0 and options["photometric"] is False
    assert resolved["views"]["local_crops"] == 0
    records = [
        json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    ]
    assert metric_steps(tmp_path / "full") == list(range(5))
    assert all(math.isfinite(r["loss"]) and 0 <= r["patch_acc"] <= 1 for r in records)
    refine_momenta = [r["momentum"] for r in records if r["stage"] == "refine"]
    assert [r["momentum"] for r in records if r["stage"] == "heads"] == [0.996, 0.996]
    assert refine_momenta == pytest.approx([momentum_at(s, 3, 0.996) for s in range(3)])
    from safetensors.torch import load_file

    base = load_file(tiny_model_dir / "model.safetensors")
    exported = export_tensors(tmp_path / "full")
    assert torch.equal(exported["pos_embed"], base["pos_embed"])  # frozen position table
    for key in ("blocks.0.attn.qkv.weight", "blocks.3.mlp.fc1.weight", "patch_embed.proj.weight"):
        assert not torch.equal(exported[key], base[key]), key
    assert "mask_token" not in exported
    again = refine_cli([*args, "--out", str(tmp_path / "again"), "--steps", "0"])
    assert again.exit_code == 0, again.output
    assert "conmim: per-token projector 64/32" in again.stderr and "one 32px crop" in again.stderr


def test_content_free_images_are_solved_from_position_alone(tiny_model_dir, tmp_path):
    """METHOD §3 risk. Constant grey images: weak and strong views carry no content, so the only
    thing telling patches apart is the absolute position embedding. With it, the positive wins
    far above chance already at initialisation and almost always after a short head warm-up
    (encoder frozen); with the position table zeroed, the loss sits at exactly ln N and the
    positive wins at chance — the signal is position, nothing else."""
    grey = tmp_path / "grey" / "all"
    grey.mkdir(parents=True)
    for i in range(8):
        Image.fromarray(np.full((32, 32, 3), 90 + 12 * i, np.uint8)).save(grey / f"{i}.png")
    n = 16
    measured = {}
    for zero_positions in (False, True):
        out = tmp_path / f"run-{zero_positions}"
        cfg = tiny_cfg(tiny_model_dir, grey.parent, out, "conmim", head_lr=3e-2)
        refiner = Refiner(cfg)
        obj = refiner.objective
        if zero_positions:
            with torch.no_grad():
                refiner.encoder.pos_embed.zero_()
                obj.momentum_encoder.pos_embed.zero_()
        batch = first_batch(refiner, "heads")
        assert all(float(v.std(dim=(2, 3)).max()) == 0 for v in batch.views)  # content-free
        refiner.encoder.eval()
        obj.train()
        with torch.no_grad():
            init_loss, init = refiner.step_losses(batch, "heads", 0)
        losses = losses_on_fixed_batch(refiner, "heads", 15)
        with torch.no_grad():
            final_loss, final = refiner.step_losses(batch, "heads", 15)
        measured[zero_positions] = (
            float(init_loss),
            init["patch_acc"],
            losses,
            float(final_loss),
            final["patch_acc"],
        )
    init_loss, init_acc, losses, final_loss, final_acc = measured[False]
    # measured: init loss 1.61, acc 0.48; after 15 steps loss ~0.7, acc 0.92 (chance 1/16)
    assert init_acc > 4 / n and init_loss < 0.75 * math.log(n), measured[False]
    assert final_acc >= 0.75 and final_loss < 0.4 * math.log(n), measured[False]
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    init_loss, init_acc, losses, final_loss, final_acc = measured[True]
    assert max(abs(x - math.log(n)) for x in [init_loss, *losses, final_loss]) < 1e-3
    assert init_acc < 3 / n and final_acc < 3 / n, measured[True]


def test_unmaskable_encoder_is_refused():
    from types import SimpleNamespace

    from mimcli.objectives.base import ObjectiveContext

    views = ViewConfig(global_size=32, local_size=16, local_crops=0, photometric=False)
    ctx = ObjectiveContext(
        cfg=SimpleNamespace(
            photometric=False, head_width="32", temperature=0.1, mask_ratio=0.4, momentum=0.996
        ),
        encoder=torch.nn.Linear(2, 2),
        loaded=SimpleNamespace(embed_dim=2),
        blocks=[1],
        views=views,
        device=torch.device("cpu"),
        dataset_size=8,
        seed=0,
    )
    with pytest.raises(MimcliError, match="conmim"):
        ConMIMObjective(ctx)


def test_grad_checkpointing_gives_the_same_masked_gradients(tiny_model_dir, tmp_path):
    """encode_masked recomputes blocks under --grad-checkpointing; gradients are unchanged."""
    from mimcli.models.masked import encode_masked, random_mask
    from tests.conftest import make_tiny_vit

    grads = []
    for flag in (False, True):
        vit = make_tiny_vit(seed=1).train()
        vit.set_grad_checkpointing(flag)
        token = torch.zeros(32, requires_grad=True)
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        mask = random_mask(2, 16, 0.5, torch.Generator().manual_seed(1))
        encode_masked(vit, images, mask, token).square().mean().backward()
        grads.append((token.grad.clone(), vit.blocks[0].attn.qkv.weight.grad.clone()))
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b)
