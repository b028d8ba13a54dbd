"""Per-block representation quality of a frozen encoder, and where to put the ID heads.

One forward pass taps every block (CLS and mean-patch features); weighted k-NN (METHOD §1.5)
scores each block; the recommendation follows MIM-Refiner: heads from around the quality peak
through the last block.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mimcli.data import eval_transform, resize_note
from mimcli.datasources import labelled_images
from mimcli.errors import MimcliError
from mimcli.evaluate.knn import knn_accuracy
from mimcli.features import FeatureSet, extract_features
from mimcli.index import resolve_backend
from mimcli.models.build import fit_input_size
from mimcli.models.sources import load_model
from mimcli.results import BlockScore, ProbeResult, Recommendation, save_probe_json
from mimcli.runtime import Progress, configure_threads, select_device


@dataclass
class ProbeConfig:
    """Every option of ``mimcli probe``; blocks are counted from 1."""

    model: str
    train: str | Path  # a folder or a source (mimcli.datasources)
    val: str | Path
    out: Path | None = None
    num_heads: int | None = None  # for a MODEL whose file has no head count (--num-heads)
    k: int = 10
    tau: float = 0.07
    blocks: list[int] | None = None
    limit_train: int | None = None
    limit_val: int | None = None
    batch_size: int = 64
    num_workers: int | str = "auto"
    device: str = "auto"
    knn_backend: str = "auto"
    on_bad_image: str = "skip"
    image_column: str | None = None
    label_column: str | None = None
    feature_dtype: str = "float16"
    margin: float = 1.0
    max_heads: int = 8
    min_heads: int = 4
    seed: int = 0
    threads: int | None = None
    transform_overrides: dict[str, Any] = field(default_factory=dict)


def check_head_options(margin: float, max_heads: int, min_heads: int) -> None:
    if max_heads < 1 or min_heads < 1:
        raise MimcliError("--max-heads and --min-heads must be at least 1")
    if margin < 0:
        raise MimcliError(f"--margin must be 0 or more, got {margin}")


def recommend_blocks(
    scores: list[BlockScore],
    num_blocks: int,
    margin: float = 1.0,
    max_heads: int = 8,
    min_heads: int = 4,
) -> Recommendation:
    """Blocks to give ID heads, judged on CLS k-NN (the heads read the CLS token).

    Rule: find the peak block; start at the first block within ``margin`` points of the peak and
    take every probed block from there on. More than ``max_heads`` blocks: keep an evenly spaced
    subset that includes the start and the last block. Fewer than ``min_heads``: add the probed
    blocks just before the start until there are ``min_heads`` (when that many were probed).
    Only probed blocks are ever recommended.
    """
    check_head_options(margin, max_heads, min_heads)
    min_heads = min(min_heads, max_heads)
    probed = sorted(s.block for s in scores)
    by_block = {s.block: s.cls for s in scores}
    peak_block = max(probed, key=lambda b: (by_block[b], b))
    peak = by_block[peak_block]
    start = min(b for b in probed if by_block[b] >= peak - margin)
    chosen = [b for b in probed if b >= start]
    if len(chosen) > max_heads:
        span = len(chosen) - 1
        if max_heads == 1:
            chosen = [chosen[-1]]
        else:
            chosen = sorted({chosen[round(i * span / (max_heads - 1))] for i in range(max_heads)})
    if len(chosen) < min_heads:
        chosen = probed[-min_heads:]
    partial = "" if probed == list(range(1, num_blocks + 1)) else " (among the probed blocks)"
    rule = (
        f"peak CLS k-NN at block {peak_block} ({peak:.1f}%); heads from the first block within "
        f"{margin:g} point(s) of the peak (block {start}) to the last block{partial}, "
        f"at most {max_heads} (evenly spaced) and at least {min_heads}"
    )
    return Recommendation(blocks=chosen, peak_block=peak_block, peak_accuracy=peak, rule=rule)


def score_blocks(
    train: FeatureSet,
    val: FeatureSet,
    k: int,
    tau: float,
    backend: str,
    num_classes: int,
    device: torch.device | str = "cpu",
) -> tuple[list[BlockScore], BlockScore | None]:
    """Weighted k-NN accuracy of every tapped block, CLS and mean-patch."""

    def acc(kind: str, block: int) -> float:
        return knn_accuracy(
            train.block(block, kind),
            train.labels,
            val.block(block, kind),
            val.labels,
            ks=(k,),
            tau=tau,
            num_classes=num_classes,
            backend=backend,
            device=device,
        )[k]

    scores = [BlockScore(b, acc("cls", b), acc("patch", b)) for b in train.blocks]
    final = None
    if train.cls_norm is not None and val.cls_norm is not None:
        final = BlockScore(train.blocks[-1], acc("cls_norm", 0), acc("patch_norm", 0))
    return scores, final


def run_probe(cfg: ProbeConfig, progress: Progress | None = None) -> ProbeResult:
    """Load the model, extract features of both folders in one pass each, score every block."""
    check_head_options(cfg.margin, cfg.max_heads, cfg.min_heads)
    if cfg.k < 1:
        raise MimcliError(f"--k must be at least 1, got {cfg.k}")
    if cfg.tau <= 0:
        raise MimcliError(f"--tau must be positive, got {cfg.tau}")
    configure_threads(cfg.threads)
    device = select_device(cfg.device)
    backend = resolve_backend(cfg.knn_backend, device)
    train_images, val_images = labelled_images(cfg)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(cfg.model, num_heads=cfg.num_heads)
    timings["load"] = time.perf_counter() - start
    depth = loaded.num_blocks
    if getattr(loaded.model, "cls_token", None) is None:
        raise MimcliError(
            f"{cfg.model}: the model has no class token; probe and the ID heads read the CLS token"
        )
    blocks = cfg.blocks or list(range(1, depth + 1))
    bad = [b for b in blocks if b < 1 or b > depth]
    if bad:
        raise MimcliError(f"--blocks {bad} out of range: the model has blocks 1..{depth}")
    if "input_size" in cfg.transform_overrides:
        fit_input_size(loaded.model, cfg.transform_overrides["input_size"])
    model = loaded.model.to(device)
    transform = eval_transform(loaded.pretrained_cfg, **cfg.transform_overrides)
    size = cfg.transform_overrides.get("input_size") or loaded.pretrained_cfg.get("input_size")
    for what, images in (("--train", train_images), ("--val", val_images)):
        note = resize_note(images, int((size or (3, 224, 224))[-1]), what)
        if note:
            logging.getLogger(__name__).info(note)
    feats: dict[str, FeatureSet] = {}
    try:
        for name, images in (("train", train_images), ("val", val_images)):
            feats[name] = extract_features(
                model,
                images,
                transform,
                blocks,
                device,
                batch_size=cfg.batch_size,
                num_workers=cfg.num_workers,
                on_bad_image=cfg.on_bad_image,
                dtype=cfg.feature_dtype,
                progress=progress,
                stage=name,
            )
            timings[f"features_{name}"] = feats[name].seconds
        if len(feats["train"]) == 0 or len(feats["val"]) == 0:
            raise MimcliError("no readable images left in --train or --val")
        if cfg.k > len(feats["train"]):
            warnings.warn(
                f"--k {cfg.k} is more than the {len(feats['train'])} --train images; each vote "
                f"uses all {len(feats['train'])} of them",
                stacklevel=1,
            )
        start = time.perf_counter()
        scores, final = score_blocks(
            feats["train"],
            feats["val"],
            cfg.k,
            cfg.tau,
            backend,
            len(train_images.classes),
            device,
        )
        timings["knn"] = time.perf_counter() - start
    finally:
        for fs in feats.values():
            fs.close()
    recommendation = recommend_blocks(scores, depth, cfg.margin, cfg.max_heads, cfg.min_heads)
    result = ProbeResult(
        model=cfg.model,
        arch=loaded.arch,
        format=loaded.format,
        num_blocks=depth,
        k=cfg.k,
        tau=cfg.tau,
        train_images=len(feats["train"]),
        val_images=len(feats["val"]),
        num_classes=len(train_images.classes),
        blocks=scores,
        final_norm=final,
        recommendation=recommendation,
        seconds=timings,
        skipped_images=feats["train"].skipped + feats["val"].skipped,
        knn_backend=backend,
        device=str(device),
    )
    if cfg.out is not None:
        save_probe(result, Path(cfg.out))
    return result


def save_probe(result: ProbeResult, out: Path) -> None:
    """``probe.json`` and ``probe.png`` in ``out``."""
    from mimcli.report.plots import plot_probe

    save_probe_json(result, out)
    plot_probe(result, out / "probe.png")
