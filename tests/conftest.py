"""Shared fixtures: tiny ViTs, small generated image folders, the loopback Hub (tests.hubserver).

The loopback Hub plugin sets HF_ENDPOINT/HF_HOME before anything imports huggingface_hub, so it
must stay the first plugin loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest_plugins = ("tests.hubserver",)

os.environ.setdefault("MIMCLI_THREADS", "2")
os.environ["MIMCLI_CACHE"] = os.environ.get("MIMCLI_TEST_CACHE", "") or str(
    Path(os.environ.get("TMPDIR", "/tmp")) / f"mimcli-test-cache-{os.getpid()}"
)

TINY_ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


def make_tiny_vit(seed: int = 0, **overrides):
    """A random tiny timm ViT: 32 px, patch 8 (16 patches), width 32, 4 blocks."""
    import timm

    torch.manual_seed(seed)
    args = dict(TINY_ARGS, **overrides)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **args)
    # Random init leaves LayerNorms at identity and tiny weights; perturb so bugs show up.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture
def tiny_vit():
    return make_tiny_vit()


def write_image_folder(
    root: Path, per_class: int, classes: int = 3, size: int = 32, seed: int = 0
) -> Path:
    """ImageFolder of noisy images around a class colour and stripe pattern (k-NN separable)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.zeros((size, size, 3), dtype=np.float32)
        base[..., c % 3] = 170.0
        base[:, :: (c + 2)] += 60.0
        for i in range(per_class):
            img = base + rng.normal(0, 25, size=base.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folders(tmp_path):
    """(train, val) ImageFolders with 3 classes: 10 and 4 images per class."""
    train = write_image_folder(tmp_path / "train", per_class=10, seed=1)
    val = write_image_folder(tmp_path / "val", per_class=4, seed=2)
    return train, val


@pytest.fixture
def data_dir(tmp_path):
    """Unlabelled-use training folder for tiny refine runs: 3 classes x 8 images."""
    return write_image_folder(tmp_path / "data", per_class=8, classes=3, seed=3)


@pytest.fixture
def teacher_dir(tmp_path):
    """A tiny teacher on a coarser grid (patch 16: 2x2 on 32 px; the student has 4x4), width 48."""
    from tests.objective_harness import save_tiny_vit

    return save_tiny_vit(tmp_path / "teacher", seed=7, patch_size=16, embed_dim=48)


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_vit):
    """A tiny ViT saved in timm's Hugging Face layout (config.json + model.safetensors)."""
    from timm.models import save_for_hf

    folder = tmp_path / "tiny-model"
    tiny_vit.pretrained_cfg = dict(tiny_vit.pretrained_cfg, input_size=(3, 32, 32), crop_pct=1.0)
    save_for_hf(tiny_vit, str(folder), model_args=dict(TINY_ARGS), safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished tiny refine run, its base model folder and image folders."""
    from timm.models import save_for_hf

    from mimcli.refine.config import RefineConfig
    from mimcli.refine.pipeline import run_refine

    root = tmp_path_factory.mktemp("tiny-run")
    base = root / "base"
    vit = make_tiny_vit(seed=4)
    vit.pretrained_cfg = dict(vit.pretrained_cfg, input_size=(3, 32, 32), crop_pct=1.0)
    save_for_hf(vit, str(base), model_args=dict(TINY_ARGS), safe_serialization=True)
    train = write_image_folder(root / "data" / "train", per_class=8, classes=3, seed=1)
    val = write_image_folder(root / "data" / "val", per_class=4, classes=3, seed=2)
    out = root / "run"
    cfg = RefineConfig(
        model=str(base),
        data=train,
        out=out,
        blocks="last2",
        head_steps=2,
        steps=2,
        batch_size=8,
        local_crops=1,
        head_width="32",
        num_workers=0,
        seed=0,
    )
    run_refine(cfg)
    return {"run": out, "base": base, "train": train, "val": val, "root": root}


def unlicensed_run(run: Path, base_model: str = "weights.pth") -> Path:
    """A finished-looking refine run folder: a tiny ViT export whose pretrained_cfg names no
    licence, and a config.json saying it started from ``base_model`` (for push/card tests)."""
    from timm.models import save_for_hf

    model = make_tiny_vit()
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "license"} | {
        "input_size": (3, 32, 32)
    }
    save_for_hf(model, str(run / "export"), model_args=dict(TINY_ARGS), safe_serialization=True)
    (run / "config.json").write_text(json.dumps({"config": {"model": base_model}, "resolved": {}}))
    return run
