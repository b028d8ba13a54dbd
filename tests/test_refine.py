"""mimcli refine: block choice, optimiser groups, gradient flow, the CLI end to end, resume after
SIGKILL, and errors."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mimcli.cli.app import app
from mimcli.errors import MimcliError
from mimcli.refine.loop import Refiner
from mimcli.refine.pipeline import probe_for_blocks
from tests.objective_harness import tiny_cfg

runner = CliRunner()


def small_cfg(model_dir, data_dir, out, **kw):
    """The tiny NNA run of these tests: 2 heads (last2), 1 local crop."""
    return tiny_cfg(model_dir, data_dir, out, "nna", **{"blocks": "last2", "local_crops": 1, **kw})


def first_batch(refiner, stage="refine"):
    return next(iter(refiner.loader(stage, 0)))


@pytest.mark.parametrize("freeze", [0, 2])
def test_gradients_reach_trainable_parameters_only(tiny_model_dir, data_dir, tmp_path, freeze):
    refiner = Refiner(small_cfg(tiny_model_dir, data_dir, tmp_path / "run", freeze_blocks=freeze))
    loss, metrics = refiner.step_losses(first_batch(refiner), "refine")
    assert torch.isfinite(loss) and set(metrics) >= {"loss/3", "loss/4", "nn_sim/4"}
    loss.backward()
    for name, p in refiner.encoder.named_parameters():
        frozen = name == "pos_embed" or (
            freeze
            and (
                not name.startswith(("blocks.", "norm."))
                or (name.startswith("blocks.") and int(name.split(".")[1]) < freeze)
            )
        )
        assert p.requires_grad == (not frozen), name
        if frozen:
            assert p.grad is None, name
        elif name.startswith(
            (
                "blocks.0.",
                "blocks.1.",
                "blocks.2.",
                "blocks.3.",
                "cls_token",
                "patch_embed",
                "norm.",
            )
        ):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in refiner.objective.heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_head_warmup_leaves_the_encoder_alone(tiny_model_dir, data_dir, tmp_path):
    refiner = Refiner(small_cfg(tiny_model_dir, data_dir, tmp_path / "run"))
    loss, _ = refiner.step_losses(first_batch(refiner, "heads"), "heads")
    loss.backward()
    assert all(p.grad is None for p in refiner.encoder.parameters())
    assert all(p.grad is not None for p in refiner.objective.heads.parameters())


def test_cli_end_to_end(tiny_model_dir, data_dir, tmp_path, image_folders, tiny_vit):
    _, val = image_folders
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "refine",
            str(tiny_model_dir),
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--blocks",
            "3,4",
            "--head-steps",
            "2",
            "--steps",
            "4",
            "--batch-size",
            "8",
            "--local-crops",
            "2",
            "--head-width",
            "32",
            "--num-workers",
            "0",
            "--val",
            str(val),
            "--lr",
            "1e-3",
            "--checkpoint-every",
            "3",
            "--log-every",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["blocks"] == [3, 4] and summary["steps"] == {"heads": 2, "refine": 4}
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["blocks"] == [3, 4] and config["resolved"]["queue_size"] == 24
    assert config["resolved"]["temperature"] == 0.2 and config["environment"]["torch"]
    assert config["resolved"]["num_heads"] == 2 and config["config"]["num_heads"] is None
    note = f"note: {tiny_model_dir}: timm layout read as vit_base_patch16_224 (width 32, 4 blocks"
    assert result.stderr.startswith(note), result.stderr  # the load note comes before the banner
    assert "2 attention heads (from config.json)" in result.stderr.splitlines()[0]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(6))
    assert all(r["loss"] > 0 and r["lr"] > 0 for r in lines)
    assert lines[0]["loss"] == pytest.approx(2 * math.log(8), rel=0.35)  # 2 heads, ln(batch)
    knn = [r for r in lines if "knn_ema_cls" in r]
    assert [r["step"] for r in knn] == [1, 5]  # the end of each stage
    assert len(summary["knn"]) == 2
    # the export is a timm layout holding the EMA weights, different from the base model
    import timm

    exported = timm.create_model(f"local-dir:{out / 'export'}", pretrained=True)
    ckpt_ema = {
        k[len("t.ema.") :]: v
        for k, v in load_file(out / "checkpoint.safetensors").items()
        if k.startswith("t.ema.")
    }
    for name, value in exported.state_dict().items():
        assert torch.equal(value, ckpt_ema[name]), name
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(exported(x), tiny_vit(x))


def run_cli(args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "mimcli.cli.app", "refine", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_run_folder_guards(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(MimcliError, match="no checkpoint"):
        Refiner(small_cfg(tiny_model_dir, data_dir, out, resume=True))
    Refiner(small_cfg(tiny_model_dir, data_dir, out, head_steps=1, steps=0)).run_all()
    with pytest.raises(MimcliError, match="--resume"):
        Refiner(small_cfg(tiny_model_dir, data_dir, out))
    with pytest.raises(MimcliError, match="fewer than one batch"):
        Refiner(small_cfg(tiny_model_dir, data_dir, tmp_path / "r2", batch_size=64))


def test_beit_refuses_local_crops(tmp_path, data_dir):
    import timm
    from timm.models import save_for_hf

    args = dict(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        use_abs_pos_emb=False,
        use_rel_pos_bias=True,
    )
    model = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, **args)
    save_for_hf(model, str(tmp_path / "beit"), model_args=args, safe_serialization=True)
    result = runner.invoke(
        app,
        [
            "refine",
            str(tmp_path / "beit"),
            "--data",
            str(data_dir),
            "--out",
            str(tmp_path / "run"),
            "--batch-size",
            "8",
            "--steps",
            "1",
            "--local-crops",
            "2",
        ],
    )
    assert result.exit_code == 2 and "--local-crops 0" in result.stderr


@pytest.mark.timeout(300)
def test_two_gloo_processes_match_one_process(tiny_model_dir, data_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): same losses and weights as one process on the same
    global batch; the run itself checks that the ranks' weights stay identical. Blocks come from
    a probe run first (rank 0 probes, the other waits; heads start the same on both ranks)."""
    common = [
        "refine",
        str(tiny_model_dir),
        "--data",
        str(data_dir),
        "--blocks",
        "auto",
        "--probe-train",
        str(data_dir),
        "--probe-val",
        str(data_dir),
        "--head-steps",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--local-crops",
        "1",
        "--head-width",
        "32",
        "--num-workers",
        "0",
        "--topk",
        "1",
        "--lr",
        "1e-3",
        "--log-every",
        "1",
    ]
    env = dict(os.environ, MIMCLI_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    single = subprocess.run(
        [sys.executable, "-m", "mimcli.cli.app", *common, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(29500 + os.getpid() % 1000),
            "-m",
            "mimcli.cli.app",
            *common,
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2
    assert config["resolved"]["blocks_reason"].startswith("probe ")
    assert (tmp_path / "two" / "probe" / "probe.json").is_file()
    one = [json.loads(x)["loss"] for x in (tmp_path / "one" / "metrics.jsonl").open()]
    two = [json.loads(x)["loss"] for x in (tmp_path / "two" / "metrics.jsonl").open()]
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)
    a = load_file(tmp_path / "one" / "export" / "model.safetensors")
    b = load_file(tmp_path / "two" / "export" / "model.safetensors")
    # Parameters whose true gradient is zero (the final norm's bias is cancelled by the head's
    # bias-free Linear + BN; the key part of the qkv bias by the softmax) get pure float noise,
    # which Adam scales to about one lr per step (lr = 1e-3 x 8/256, 2 steps). Everything else
    # must agree closely.
    step_bound = 2 * 1e-3 * 8 / 256
    for k in a:
        noise_only = k == "norm.bias" or k.endswith("attn.qkv.bias")
        tol = 1.5 * step_bound if noise_only else 1e-5
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=0, msg=k)


def test_auto_blocks_from_a_probe_run_on_the_spot(
    tiny_model_dir, data_dir, tmp_path, image_folders
):
    train, val = image_folders
    refiner = Refiner(
        small_cfg(
            tiny_model_dir,
            data_dir,
            tmp_path / "run",
            blocks="auto",
            probe_train=train,
            probe_val=val,
        ),
        prober=probe_for_blocks,
    )
    probe = json.loads((tmp_path / "run" / "probe" / "probe.json").read_text())
    assert refiner.blocks == probe["recommendation"]["blocks"] == [1, 2, 3, 4]
    assert refiner.blocks_reason.startswith("probe ")


def test_grad_checkpointing_changes_nothing_but_memory(tiny_model_dir, data_dir, tmp_path):
    grads = []
    for flag in (False, True):
        refiner = Refiner(
            small_cfg(tiny_model_dir, data_dir, tmp_path / f"run{flag}", grad_checkpointing=flag)
        )
        loss, _ = refiner.step_losses(first_batch(refiner), "refine")
        loss.backward()
        grads.append(refiner.encoder.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_non_finite_loss_stops_with_last_good_checkpoint(tiny_model_dir, data_dir, tmp_path):
    refiner = Refiner(small_cfg(tiny_model_dir, data_dir, tmp_path / "run", head_steps=4))
    real = refiner.objective.step
    calls = []

    def poisoned(encoder, batch, stage, step):
        loss, metrics = real(encoder, batch, stage, step)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), metrics

    refiner.objective.step = poisoned  # what the loop's step module calls
    with pytest.raises(MimcliError, match="non-finite at heads step 2"):
        refiner.run_all()
    from mimcli.runs import load_checkpoint

    state = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert state["stage"] == "heads" and state["done"] == 2
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").open()]
    assert steps == [0, 1]
    assert not (tmp_path / "run" / "export").exists()


def test_checkpoints_from_before_objectives_still_resume(tiny_model_dir, data_dir, tmp_path):
    """Checkpoints that kept NNA heads, queues and the lookup generator under their own keys
    restore into the objective exactly."""
    from mimcli.runs import load_checkpoint, save_checkpoint

    out = tmp_path / "run"
    Refiner(small_cfg(tiny_model_dir, data_dir, out, head_steps=2, steps=1)).run_all()
    state = load_checkpoint(out / "checkpoint.safetensors")
    objective = state.pop("objective")
    state["heads"] = {k[len("heads.") :]: v for k, v in objective.items() if k.startswith("heads.")}
    state["queues"] = {
        k[len("queues.") :]: v for k, v in objective.items() if k.startswith("queues.")
    }
    state["rng"]["lookup"] = objective["_extra_state"]["lookup_gen"]
    save_checkpoint(out / "checkpoint.safetensors", state)
    resumed = Refiner(small_cfg(tiny_model_dir, data_dir, out, head_steps=2, steps=1, resume=True))
    resumed.restore()
    now = resumed.objective.state_dict()
    assert now.keys() == objective.keys()
    for key, value in objective.items():
        if key != "_extra_state":
            assert torch.equal(now[key], value), key
    assert torch.equal(resumed.objective.lookup_gen.get_state(), state["rng"]["lookup"])


def test_resume_reads_model_with_the_runs_head_count_and_refuses_another_model(data_dir, tmp_path):
    """A checkpoint without a head count, refined as FILE#heads=4, resumes from a bare FILE (the
    run's recorded count is used), and a resume with another MODEL is one line, exit 2."""
    import timm

    def raw(width: int, heads: int):
        vit = timm.create_model(
            "vit_base_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
            embed_dim=width, depth=1, num_heads=heads,
        )  # fmt: skip
        path = tmp_path / f"w{width}.pth"
        torch.save(vit.state_dict(), path)
        return path

    w128, w192 = raw(128, 4), raw(192, 3)
    run = tmp_path / "run"
    args = ["--data", str(data_dir), "--out", str(run), "--head-steps", "1", "--steps", "1"]
    args += ["--batch-size", "8", "--head-width", "32", "--num-workers", "0", "--local-crops", "1"]
    first = runner.invoke(app, ["refine", f"{w128}#heads=4", *args])
    assert first.exit_code == 0, first.output
    assert json.loads((run / "config.json").read_text())["resolved"]["num_heads"] == 4
    again = runner.invoke(app, ["refine", str(w128), *args, "--resume"])
    assert again.exit_code == 0, again.output
    other = runner.invoke(app, ["refine", str(w192), *args, "--resume"])
    assert other.exit_code == 2
    line = other.output.strip().splitlines()[-1]
    assert "does not fit" in line or "attention heads" in line, other.output
    assert "Traceback" not in other.output
