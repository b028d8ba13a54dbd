"""Cost of mimcli's one-pass all-block probe features, against the final features only and
against a naive pass per block; plus the per-block k-NN scoring, timed on its own.

Inputs are random tensors (no images, no disk IO) and random weights except the shipped tiny MAE;
every method of one model sees the same batches, batch size and threads, timed interleaved
(order rotated each round; medians reported, every raw time in the JSON).

(a) one pass: ``tap_blocks`` on every block, as ``extract_features`` runs it per batch
    (inference mode, bf16 autocast on CUDA), CLS + mean patch of each block and the final-norm
    pair copied into float16 host arrays like the memory map.
(b) final only: ``model.forward_features`` + CLS / mean patch of the last block, same copies.
(c) naive: for each block i a truncated pass ``forward_intermediates(indices=[i],
    stop_early=True)``, the cheapest thing a user without taps would write: blocks 1..i run for
    block i, so (L + 1) / 2 full forwards in all (a full forward per block with a hook, L
    forwards, would be about twice as slow again).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import parser, save, setup_threads, table, timeit
from mimcli.features import FeatureSet
from mimcli.index import resolve_backend
from mimcli.models.sources import load_model
from mimcli.models.taps import final_norm_of, tap_blocks
from mimcli.probe import score_blocks

TINY = Path(__file__).resolve().parents[1] / "examples" / "models" / "fmnist-mae-tiny"
TARGET = 1.15  # (a) / (b)
# (label, timm name or None for the shipped tiny MAE, image size, batch, device)
CPU_MODELS = [
    ("tiny MAE (fmnist-mae-tiny)", None, 28, 64, "cpu"),
    ("ViT-S/16 random", "vit_small_patch16_224", 224, 8, "cpu"),
    ("ViT-B/16 random", "vit_base_patch16_224", 224, 8, "cpu"),
]
GPU_MODELS = [
    ("ViT-B/16 random, bf16", "vit_base_patch16_224", 224, 128, "cuda"),
    ("ViT-L/16 random, bf16", "vit_large_patch16_224", 224, 128, "cuda"),
]
SMOKE_MODELS = [
    ("tiny MAE (fmnist-mae-tiny)", None, 28, 8, "cpu"),
    ("ViT-S/16 random", "vit_small_patch16_224", 224, 1, "cpu"),
]


def build(name: str | None) -> torch.nn.Module:
    if name is None:
        return load_model(str(TINY)).model
    import timm

    return timm.create_model(name, pretrained=False, num_classes=0).eval()


def methods(model: torch.nn.Module, device: torch.device) -> dict[str, Callable[[Any], None]]:
    """The three ways to get CLS + mean-patch features, each writing float16 host arrays."""
    depth, dim = len(model.blocks), int(model.embed_dim)
    prefix = int(model.num_prefix_tokens)
    norm = final_norm_of(model)

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def host(t: torch.Tensor) -> np.ndarray:
        return t.float().cpu().numpy().astype(np.float16)

    def one_pass(x: torch.Tensor) -> None:
        with torch.inference_mode(), autocast():
            taps = tap_blocks(model, x, list(range(depth)))
        host(taps.cls.permute(1, 0, 2)), host(taps.patch.permute(1, 0, 2))
        host(taps.cls_norm), host(taps.patch_norm)  # type: ignore[arg-type]

    def final_only(x: torch.Tensor) -> None:
        with torch.inference_mode(), autocast():
            tokens = model.forward_features(x)
            cls, patch = tokens[:, 0], tokens[:, prefix:].mean(dim=1)
        host(cls), host(patch)

    def naive(x: torch.Tensor) -> None:
        cls = torch.empty(depth, x.shape[0], dim)
        patch = torch.empty_like(cls)
        with torch.inference_mode(), autocast():
            for i in range(depth):
                ((tokens, pre),) = model.forward_intermediates(
                    x,
                    indices=[i],
                    stop_early=True,
                    intermediates_only=True,
                    output_fmt="NLC",
                    return_prefix_tokens=True,
                )
                cls[i], patch[i] = pre[:, 0].float().cpu(), tokens.mean(dim=1).float().cpu()
            if norm is not None:  # the last pass also gives the final-norm pair
                kind, fn = norm
                pooled = fn(tokens).mean(dim=1) if kind == "tokens" else fn(tokens.mean(dim=1))
                host(fn(pre[:, 0])), host(pooled)
        host(cls), host(patch)

    return {"one_pass": one_pass, "final_only": final_only, "naive": naive}


def time_model(spec: tuple, repeat: int, naive_repeat: int) -> dict[str, Any]:
    label, name, size, batch, dev = spec
    device = torch.device(dev)
    model = build(name).to(device)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch, 3, size, size, generator=gen).to(device) for _ in range(2)]
    fns = methods(model, device)
    for fn in fns.values():  # warm-up: allocator, oneDNN/cuBLAS kernels
        fn(batches[0])
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeat):  # interleaved, order rotated: load changes hit every method alike
        for key in keys[r % 3 :] + keys[: r % 3]:
            fn = fns[key]
            if key != "naive" or r < naive_repeat:
                x = batches[r % len(batches)]
                times[key].append(timeit(lambda fn=fn, x=x: fn(x), 1, 0, device))
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "model": label,
        "timm_name": name or "fmnist-mae-tiny",
        "device": dev,
        "image_size": size,
        "batch": batch,
        "depth": len(model.blocks),
        "width": int(model.embed_dim),
        "seconds": times,
        "median_s": med,
        "min_s": {k: min(v) for k, v in times.items()},
        "images_per_s": {k: batch / v for k, v in med.items()},
        "ratio_one_pass_vs_final": med["one_pass"] / med["final_only"],
        "speedup_naive_vs_one_pass": med["naive"] / med["one_pass"],
    }


def time_knn(depth: int, dim: int, n_train: int, n_val: int) -> dict[str, Any]:
    """``probe.score_blocks`` (what ``mimcli probe`` runs) on random float16 features: k-NN of
    CLS and mean patch for every block plus the final-norm pair, 2 * (L + 1) searches."""
    gen = np.random.default_rng(0)

    def fake(n: int) -> FeatureSet:
        def arr(*shape: int) -> np.ndarray:
            return gen.standard_normal(shape, dtype=np.float32).astype(np.float16)

        return FeatureSet(
            blocks=list(range(1, depth + 1)),
            cls=arr(depth, n, dim),
            patch=arr(depth, n, dim),
            cls_norm=arr(n, dim),
            patch_norm=arr(n, dim),
            labels=gen.integers(0, 10, n),
            paths=[],
        )

    train, val = fake(n_train), fake(n_val)
    backend = resolve_backend("auto", "cpu")
    seconds = timeit(lambda: score_blocks(train, val, 10, 0.07, backend, 10), 1, 0)
    return {
        "depth": depth,
        "width": dim,
        "train": n_train,
        "val": n_val,
        "searches": 2 * (depth + 1),
        "backend": backend,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    p = parser("Probe feature cost: one pass over all blocks vs final only vs one pass per block")
    p.add_argument("--repeat", type=int, default=7, help="timed batches per method")
    p.add_argument("--knn-train", type=int, default=10_000)
    p.add_argument("--knn-val", type=int, default=2_000)
    args = p.parse_args(argv)
    threads = setup_threads(args.threads)
    repeat, naive_repeat = (1, 1) if args.smoke else (args.repeat, 3)
    n_train, n_val = (1_000, 200) if args.smoke else (args.knn_train, args.knn_val)
    specs = list(SMOKE_MODELS if args.smoke else CPU_MODELS)
    cuda = torch.cuda.is_available()
    if cuda and not args.smoke:
        specs += GPU_MODELS
    results, knn, rows = [], [], []
    for spec in specs:
        res = time_model(spec, repeat, naive_repeat)
        results.append(res)
        ips, ratio = res["images_per_s"], res["ratio_one_pass_vs_final"]
        verdict = "PASS" if ratio <= TARGET else "FAIL"
        rows.append(
            [
                res["model"],
                f"{spec[2]} px, B={spec[3]}, {spec[4]}",
                ips["one_pass"],
                ips["final_only"],
                ips["naive"],
                f"{ratio:.3f} {verdict}",
                f"{res['speedup_naive_vs_one_pass']:.2f}x",
            ]
        )
        if spec[4] == "cpu":
            knn.append(time_knn(res["depth"], res["width"], n_train, n_val))
    if not cuda:
        for label, _, size, batch, _ in GPU_MODELS:
            rows.append([label, f"{size} px, B={batch}, cuda"] + ["not measured: no GPU"] * 5)
    cols = ["model", "input", "(a) one pass img/s", "(b) final only img/s", "(c) naive img/s"]
    cols += [f"a/b (target <= {TARGET})", "c/a speed-up"]
    print(table(f"Probe feature extraction, {threads} threads, random inputs", cols, rows))
    knn_rows = [
        [
            f"depth {k['depth']}, width {k['width']}",
            f"{k['train']:,} / {k['val']:,}",
            k["searches"],
            k["backend"],
            k["seconds"],
            k["seconds"] / k["searches"],
        ]
        for k in knn
    ]
    print()
    kcols = ["features", "train / val", "k-NN searches", "backend", "total s", "s per search"]
    print(table("Per-block k-NN scoring (probe.score_blocks, k=10)", kcols, knn_rows))
    path = save(
        "probe_cost",
        args.out,
        {
            "smoke": args.smoke,
            "threads": threads,
            "inputs": "random tensors, no images or disk IO",
            "target_ratio_one_pass_vs_final": TARGET,
            "naive": "forward_intermediates(indices=[i], stop_early=True) once per block",
            "models": results,
            "knn": knn,
            "gpu": "measured" if cuda else "not measured: no GPU",
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
