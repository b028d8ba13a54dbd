"""Overhead of a full mimcli refine step (ID heads + neighbour queues) over the bare encoder.

(full) ``Refiner.train_stage("refine")`` itself, fed synthetic ``ViewBatch``es instead of its
    DataLoader (no images decoded: the same view tensors every step, fresh dataset ids, as from a
    60,000-image dataset) and with checkpoint writes switched off; step time = time between
    progress callbacks, so it covers lr schedule, taps forward, heads, NNA losses, queue look-ups,
    backward, AdamW on encoder + heads, enqueue, EMA, metrics and the metrics.jsonl line.
(bare) the same encoder and views: ``forward_features`` on the globals and on the locals (two
    passes, as mimcli does), ``.pow(2).mean()``, backward, AdamW on the same encoder groups.
Both are timed in alternating rounds. The breakdown times the pieces on their own (same shapes).
The Refiner is built on a temporary folder of blank PNGs (it needs one batch of images).
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks._common import parser, save, setup_threads, sync, table, timeit
from mimcli.ema import ema_decay, ema_update
from mimcli.objectives.nna import block_features, multiview_loss
from mimcli.optim import apply_lr, encoder_param_groups, make_optimizer
from mimcli.refine.compiling import compile_module
from mimcli.refine.config import RefineConfig
from mimcli.refine.loop import Refiner
from mimcli.views import ViewBatch

TINY = Path(__file__).resolve().parents[1] / "examples" / "models" / "fmnist-mae-tiny"
TARGET = 1.15  # full / bare, ViT-L on GPU
BARE, TAPS = "encoder fwd+bwd, bare forward_features", "encoder fwd+bwd, all-block taps"
HEADS, EMA, ENQUEUE = "heads fwd+bwd + NNA losses", "EMA update", "enqueue"
LOOKUP = "queue look-ups, 2 per head, top-20 (auto backend)"
ADAM_ENC, ADAM_ALL = "AdamW step, encoder only", "AdamW step, encoder + heads"
DATASET = 60_000  # ids drawn as from Fashion-MNIST's train split


def make_refiner(
    root: Path,
    model: str,
    heads: int,
    batch: int,
    queue: int,
    locals_: int,
    device: str,
    threads: int,
) -> Refiner:
    data = root / f"data{batch}"
    if not data.exists():  # blank PNGs in 10 class folders: the Refiner only scans them
        size = 224 if device == "cuda" else 28
        for i in range(batch):
            (data / str(i % 10)).mkdir(parents=True, exist_ok=True)
            Image.new("L", (size, size)).save(data / str(i % 10) / f"{i}.png")
    cfg = RefineConfig(
        model=model,
        data=data,
        out=root / f"run-{heads}-{time.monotonic_ns()}",
        blocks=f"last{heads}",
        batch_size=batch,
        lr=1e-3,
        head_lr=2e-3,
        local_crops=locals_,
        queue_size=str(queue),
        checkpoint_every=10**9,
        device=device,
        num_workers=0,
        threads=threads,
    )
    cfg.out.mkdir(parents=True)
    refiner = Refiner(cfg)
    refiner.save = lambda stage, done, *rest: None  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(0)
    refiner.objective.labels_by_id = torch.randint(0, 10, (DATASET,), generator=gen)
    return refiner


def make_views(refiner: Refiner, batch: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    g, loc, n = refiner.views.global_size, refiner.views.local_size, refiner.views.local_crops
    sizes = [g, g] + [loc] * n
    return [torch.randn(batch, 3, s, s, generator=gen).to(refiner.device) for s in sizes]


def batches(views: list[torch.Tensor], n: int, start: int) -> list[ViewBatch]:
    b = views[0].shape[0]
    out = []
    for step in range(start, start + n):
        ids = (torch.arange(b) + step * b) % DATASET
        out.append(ViewBatch(views=views, labels=torch.randint(0, 10, (b,)), indices=ids, bad=[]))
    return out


def refine_steps(refiner: Refiner, views: list[torch.Tensor], n: int, stage: str) -> list[float]:
    """Seconds per step of the real training loop, over ``n`` steps."""
    stamps = [time.perf_counter()]
    start = getattr(refiner, "_bench_steps", 0)
    refiner._bench_steps = start + n  # type: ignore[attr-defined]
    refiner.loader = lambda stage, first: batches(views, n, start)  # type: ignore[method-assign]
    refiner.progress = lambda *_: (sync(refiner.device), stamps.append(time.perf_counter()))
    refiner.totals[stage] = n
    if getattr(refiner, "_bench_stage", None) != stage:  # keep AdamW state across calls
        refiner.optimizer = refiner.make_optimizer(stage)
        refiner._bench_stage = stage  # type: ignore[attr-defined]
    refiner.train_stage(stage, 0)
    return list(np.diff(stamps))


def bare_step_fn(
    refiner: Refiner, views: list[torch.Tensor], backend: str | None = None
) -> tuple[Any, Any, Any]:
    """A bare encoder step on a copy of the refiner's encoder; ``backend``: compile the copy's
    blocks as ``refine --compile`` does (``mimcli.refine.compiling``)."""
    encoder = copy.deepcopy(refiner.encoder).train()  # a copy runs eager
    if backend is not None:
        for block in encoder.blocks:
            compile_module(block, backend)
    cfg = refiner.cfg
    opt = make_optimizer(encoder_param_groups(encoder, cfg.weight_decay, cfg.layer_decay))
    apply_lr(opt, 1e-4)
    dev = refiner.device.type
    inputs = [torch.cat(views[:2])] + ([torch.cat(views[2:])] if len(views) > 2 else [])

    def forward_backward() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = sum(encoder.forward_features(x).float().pow(2).mean() for x in inputs)
        loss.backward()  # type: ignore[union-attr]
        return loss  # type: ignore[return-value]

    def step() -> None:
        loss = forward_backward()
        opt.step()
        float(loss.detach())

    return step, forward_backward, opt


def breakdown(refiner: Refiner, views: list[torch.Tensor], repeat: int) -> dict[str, float]:
    """Seconds of each piece of a refine step, timed on its own (medians)."""
    dev, b, cfg = refiner.device, views[0].shape[0], refiner.cfg
    refiner.encoder.train()  # the head warm-up stage left it in eval mode
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    inputs = [torch.cat(views[:2])] + ([torch.cat(views[2:])] if len(views) > 2 else [])
    ids = torch.arange(b, device=dev)
    _, bare_fb, bare_opt = bare_step_fn(refiner, views)
    with torch.no_grad(), autocast:
        feats = [
            block_features(refiner.encoder, x, refiner.blocks, refiner.cfg.head_input)
            for x in inputs
        ]
    feats_d = {k: torch.cat([f[k] for f in feats]).float() for k in refiner.blocks}
    z_glob = {
        k: torch.randn(2, b, refiner.objective.widths.out, device=dev) for k in refiner.blocks
    }
    nn_glob = {k: torch.nn.functional.normalize(z_glob[k], dim=-1) for k in refiner.blocks}

    def taps_fb() -> None:
        refiner.encoder.zero_grad(set_to_none=True)
        with autocast:
            outs = [
                block_features(refiner.encoder, x, refiner.blocks, refiner.cfg.head_input)
                for x in inputs
            ]
            loss = sum(o.float().pow(2).mean() for f in outs for o in f.values())
        loss.backward()  # type: ignore[union-attr]

    def heads_fb() -> None:
        refiner.objective.heads.zero_grad(set_to_none=True)
        total = torch.zeros((), device=dev)
        for k in refiner.blocks:
            with autocast:
                z, p = refiner.objective.heads.head(k)(feats_d[k])
            z, p = z.float(), p.float()
            p_views = [p[i * b : (i + 1) * b] for i in range(len(views))]
            z_g = [z[:b], z[b : 2 * b]]
            total = total + multiview_loss(z_g, list(nn_glob[k]), p_views, refiner.objective.tau)[0]
        total.backward()

    def lookups(backend: str) -> None:
        for k in refiner.blocks:
            for zg in z_glob[k]:
                refiner.objective.queues[str(k)].lookup(
                    zg, ids, cfg.topk, refiner.objective.lookup_gen, backend
                )

    def enqueue() -> None:
        for k in refiner.blocks:
            refiner.objective.queues[str(k)].enqueue(z_glob[k][0], ids)  # type: ignore[operator]

    bare_fb()  # leaves gradients for the optimiser steps below
    taps_fb()
    heads_fb()
    refiner.optimizer = refiner.make_optimizer("refine")
    refiner._bench_stage = None  # type: ignore[attr-defined]
    pieces = {
        BARE: bare_fb,
        TAPS: taps_fb,
        HEADS: heads_fb,
        LOOKUP: lambda: lookups(cfg.knn_backend),
        "(same look-ups, torch backend)": lambda: lookups("torch"),
        ENQUEUE: enqueue,
        EMA: lambda: ema_update(refiner.ema, refiner.encoder, ema_decay(1000, refiner.cfg.ema)),
        ADAM_ENC: bare_opt.step,
        ADAM_ALL: refiner.optimizer.step,
    }
    return {k: timeit(fn, repeat, 1, dev) for k, fn in pieces.items()}


def measure(refiner: Refiner, views: list[torch.Tensor], rounds: int, steps: int) -> dict:
    bare, _, _ = bare_step_fn(refiner, views)
    refine_steps(refiner, views, 2, "refine")  # warm-up: optimiser state, allocator, kernels
    bare(), bare()
    full_t, bare_t = [], []
    for _ in range(rounds):  # alternate, so a load change hits both alike
        full_t += refine_steps(refiner, views, steps, "refine")
        bare_t += [timeit(bare, 1, 0, refiner.device) for _ in range(steps)]
    full, base = float(np.median(full_t)), float(np.median(bare_t))
    b = views[0].shape[0]
    return {
        "heads": len(refiner.blocks),
        "blocks": refiner.blocks,
        "full_s": full_t,
        "bare_s": bare_t,
        "full_median_s": full,
        "bare_median_s": base,
        "full_min_s": min(full_t),
        "bare_min_s": min(bare_t),
        "full_images_per_s": b / full,
        "bare_images_per_s": b / base,
        "ratio": full / base,
    }


def main(argv: list[str] | None = None) -> int:
    p = parser("Refine step overhead: heads + queues + EMA vs the bare encoder step")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--gpu-batch", type=int, default=64, help="per-GPU batch for ViT-L")
    args = p.parse_args(argv)
    threads = setup_threads(args.threads)
    smoke = args.smoke
    batch = 16 if smoke else args.batch
    # (rounds, steps per round) for 8 heads, then for the 4 / 1 head variants
    rounds, steps, repeat = (1, 1, 1) if smoke else (3, 3, 3)
    short = (1, 1) if smoke else (2, 2)
    heads_list = (8, 1) if smoke else (8, 4, 1)
    cuda = torch.cuda.is_available()
    rows, results, parts = [], [], {}
    with tempfile.TemporaryDirectory(prefix="mimcli-bench-") as tmp:
        root = Path(tmp)
        setups = [(str(TINY), "tiny MAE, CPU", h, batch, 16_384, 2, "cpu") for h in heads_list]
        if cuda and not smoke:
            import timm
            from timm.models import save_for_hf

            big = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0)
            save_for_hf(big, str(root / "vit-l"), safe_serialization=True)
            del big
            setups.append(
                (str(root / "vit-l"), "ViT-L/16, bf16", 8, args.gpu_batch, 65_536, 10, "cuda")
            )
        for model, label, heads, b, queue, locals_, device in setups:
            refiner = make_refiner(root, model, heads, b, queue, locals_, device, threads)
            views = make_views(refiner, b)
            res = measure(refiner, views, *((rounds, steps) if heads == 8 else short))
            res.update(model=label, batch=b, queue=queue, local_crops=locals_, device=device)
            res["head_widths"] = vars(refiner.objective.widths)
            if heads == 8:
                warm = refine_steps(refiner, views, steps, "heads")
                res["head_warmup_median_s"] = float(np.median(warm))
                parts[label] = breakdown(refiner, views, repeat)
            results.append(res)
            g, loc = refiner.views.global_size, refiner.views.local_size
            verdict = "PASS" if res["ratio"] <= TARGET else "FAIL"
            rows.append(
                [
                    label,
                    heads,
                    f"B={b}, 2x{g} + {locals_}x{loc} px, queue {queue:,}",
                    res["full_images_per_s"],
                    res["bare_images_per_s"],
                    f"{res['ratio']:.2f}" + (f" {verdict}" if device == "cuda" else ""),
                    res["full_median_s"] * 1000,
                    res["bare_median_s"] * 1000,
                ]
            )
    if not cuda:
        rows.append(["ViT-L/16, bf16", 8, "2x224 + 10x96 px"] + ["not measured: no GPU"] * 5)
    cols = ["model", "heads", "views", "full img/s", "bare img/s", "full/bare"]
    cols += ["full ms/step", "bare ms/step"]
    print(table(f"Refine step vs bare encoder step, {threads} threads", cols, rows))
    for label, piece in parts.items():
        res = next(r for r in results if r["model"] == label and r["heads"] == 8)
        explained = (
            piece[TAPS] - piece[BARE] + piece[HEADS] + piece[LOOKUP] + piece[ENQUEUE] + piece[EMA]
        )
        explained += piece[ADAM_ALL] - piece[ADAM_ENC]
        res["overhead_explained_s"] = explained
        res["overhead_measured_s"] = res["full_median_s"] - res["bare_median_s"]
        prow = [[k, v * 1000] for k, v in piece.items()]
        prow += [
            ["= overhead explained by the pieces above", explained * 1e3],
            ["= overhead measured (full step - bare step)", res["overhead_measured_s"] * 1e3],
            ["whole head warm-up step (encoder frozen, no EMA)", res["head_warmup_median_s"] * 1e3],
        ]
        print()
        print(
            table(
                f"Pieces of one refine step, {label}, 8 heads (timed apart)", ["piece", "ms"], prow
            )
        )
    path = save(
        "refine_step",
        args.out,
        {
            "smoke": smoke,
            "threads": threads,
            "inputs": "random view tensors; blank PNGs only to construct the Refiner",
            "target_ratio_gpu_vit_l": TARGET,
            "results": results,
            "breakdown_s": parts,
            "gpu": "measured" if cuda else "not measured: no GPU",
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
