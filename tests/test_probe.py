import json

import numpy as np
import pytest
import torch
from PIL import Image

from mimcli.data import eval_transform, scan_folder
from mimcli.errors import MimcliError
from mimcli.models.sources import load_model
from mimcli.probe import ProbeConfig, recommend_blocks, run_probe
from mimcli.results import BlockScore
from tests.test_knn import naive_knn_accuracy
from tests.test_taps import manual_block_outputs


def independent_block_features(model_dir, folder):
    """Per-block CLS / mean-patch features by stepping through the model by hand."""
    loaded = load_model(str(model_dir))
    transform = eval_transform(loaded.pretrained_cfg)
    images = scan_folder(folder)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in images.paths])
    with torch.no_grad():
        outs = manual_block_outputs(loaded.model, x)
    cls = [o[:, 0].numpy() for o in outs]
    patch = [o[:, 1:].mean(1).numpy() for o in outs]
    return cls, patch, np.array(images.labels)


def test_probe_equals_independent_computation(tiny_model_dir, image_folders, tmp_path):
    train, val = image_folders
    cfg = ProbeConfig(
        model=str(tiny_model_dir),
        train=train,
        val=val,
        out=tmp_path / "out",
        k=5,
        feature_dtype="float32",
        num_workers=0,
        batch_size=7,
    )
    result = run_probe(cfg)
    tr_cls, tr_patch, tr_y = independent_block_features(tiny_model_dir, train)
    va_cls, va_patch, va_y = independent_block_features(tiny_model_dir, val)
    assert [s.block for s in result.blocks] == [1, 2, 3, 4]
    for i, score in enumerate(result.blocks):
        assert score.cls == pytest.approx(
            naive_knn_accuracy(tr_cls[i], tr_y, va_cls[i], va_y, 5, 0.07)
        )
        assert score.patch == pytest.approx(
            naive_knn_accuracy(tr_patch[i], tr_y, va_patch[i], va_y, 5, 0.07)
        )
    assert result.train_images == 30 and result.val_images == 12 and result.num_classes == 3
    saved = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert saved["blocks"][0]["block"] == 1
    assert saved["recommendation"]["blocks"] == result.recommendation.blocks
    assert (tmp_path / "out" / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # separable synthetic classes: some block must do far better than chance (33%)
    assert max(s.cls for s in result.blocks) > 60


def test_float16_features_agree_with_float32(tiny_model_dir, image_folders):
    train, val = image_folders
    base = dict(model=str(tiny_model_dir), train=train, val=val, k=5, num_workers=0)
    a = run_probe(ProbeConfig(**base, feature_dtype="float32"))
    b = run_probe(ProbeConfig(**base, feature_dtype="float16"))
    for x, y in zip(a.blocks, b.blocks, strict=True):
        assert abs(x.cls - y.cls) <= 100 / 12 + 1e-9  # at most one of 12 val images flips


def scores(values):
    return [BlockScore(i + 1, v, 0.0) for i, v in enumerate(values)]


def test_recommendation_rule():
    # ViT-L-like curve: peak (64%) at block 18 of 24, decline afterwards
    curve = [30 + 2 * i for i in range(18)] + [62, 61, 59, 57, 55, 52]
    rec = recommend_blocks(scores(curve), 24, margin=1.0, max_heads=8, min_heads=4)
    assert rec.peak_block == 18 and rec.blocks == [18, 19, 20, 21, 22, 23, 24]
    # a broad plateau: more than 8 candidates -> 8 evenly spaced, start and end included
    flat = [50.0] * 24
    rec = recommend_blocks(scores(flat), 24, margin=1.0, max_heads=8)
    assert len(rec.blocks) == 8 and rec.blocks[0] == 1 and rec.blocks[-1] == 24
    # peak at the last block -> still at least min_heads, ending at the last block
    rising = [float(i) for i in range(12)]
    rec = recommend_blocks(scores(rising), 12, margin=0.5, min_heads=4)
    assert rec.blocks == [9, 10, 11, 12]
    assert "peak CLS k-NN at block 12" in rec.rule
    # a model with fewer blocks than min_heads gets all its blocks
    assert recommend_blocks(scores([1.0, 2.0]), 2, min_heads=4).blocks == [1, 2]


def test_recommendation_only_names_probed_blocks():
    probed = [BlockScore(b, acc, 0.0) for b, acc in [(2, 70.0), (3, 71.0), (5, 60.0)]]
    rec = recommend_blocks(probed, 12, margin=1.0, min_heads=2)
    assert rec.blocks == [2, 3, 5] and "among the probed blocks" in rec.rule
    rec = recommend_blocks(probed, 12, margin=1.0, min_heads=1, max_heads=1)
    assert rec.blocks == [5]
    with pytest.raises(MimcliError, match="max-heads"):
        recommend_blocks(probed, 12, max_heads=0)


def test_bad_head_options_fail_before_any_work(tmp_path):
    cfg = ProbeConfig(model="no-such-model-anywhere", train=tmp_path, val=tmp_path, max_heads=0)
    with pytest.raises(MimcliError, match="max-heads"):
        run_probe(cfg)
