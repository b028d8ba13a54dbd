"""The CPU cost of feeding refinement, per image: views made in DataLoader workers (the CPU
path, ``views.MultiCropTransform``) against ``--augment-on device`` (workers only decode into a
canvas, ``augment.CanvasDecoder``; the views are made by ``augment.DeviceMultiCrop``).

    PYTHONPATH=. python -m benchmarks.data_pipeline [--smoke] [--images 300] [--plan-flops]

Images: scikit-learn's two sample photographs (``load_sample_images``, 640 × 427 JPEGs) and
``--images`` JPEGs cut from them at ImageNet-like sizes (500 × 375, 500 × 333, 375 × 500,
500 × 500, ...; random crops of 60–100% of the largest crop of that shape, quality 90, in a
temporary folder), plus ``--large`` 1600 × 1067 JPEGs (a photo enlarged 2.5×: a camera-sized
file, smoother than a real one) for the DCT-domain downscale.

Timed in one process with one torch thread (one DataLoader worker's view), each image once after
a warm-up, CPU time of the process (``time.process_time``; wall time is reported too):

- (a) decode alone: ``Image.open(path).convert("RGB")`` as ``data.ImageDataset`` does it, and
  without the ``convert`` (which copies an image that is RGB already);
- (b) the CPU path: (a) + the paper's views (2 × 224 + 10 × 96, ``views.default_view_config``)
  seeded per image as ``views.MultiCropDataset`` does;
- (c) the device path's worker side: ``CanvasDecoder(cfg)(path)`` (decode, shrink, pad);
- (d) the device side's batched ops per image, apart: ``DeviceMultiCrop`` on a batch of canvases,
  on this CPU (``--threads``, default 1) and, where CUDA is available, on the GPU (batch 256,
  bf16 autocast around it as in the loop);
- (c)/(b): worker CPU time of the device path over the CPU path's (target ≤ 1/3);
- CPU cores per GPU to feed ViT-L/16 refinement at 40% MFU on an H100 (989 TFLOP/s dense bf16)
  with either path: images/s per GPU = 0.4 · 989e12 / FLOP per image, × CPU time per image.
  FLOP per image: 1.41 TFLOP (ViT-L/16 forward + backward: ~370 GFLOP at 224 px, ~67 at 96 px,
  2 × 370 + 10 × 67 ≈ 1,410), or ``--plan-flops``: what ``refine --plan`` measures (~25 s here);
- decoders: PIL against ``simplejpeg`` (libjpeg-turbo via a thin binding; skipped with a note
  when not installed), full size on the ImageNet-like files and scaled in the DCT domain
  (PIL's ``draft``, simplejpeg's ``min_width/min_height``) on the large ones.

``--smoke`` uses 6 + 2 images and a batch of 4: it checks the script runs, the figures mean
nothing.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks._common import parser, save, sync, table
from mimcli.augment import CanvasDecoder, DeviceMultiCrop
from mimcli.views import MultiCropTransform, ViewConfig, default_view_config

H100_BF16 = 989e12
MFU = 0.4
VIT_L_FLOPS = 1.41e12  # per image, forward + backward, 2 x 224 + 10 x 96 px
SHAPES = [(500, 375), (500, 333), (375, 500), (500, 500), (500, 400), (333, 500), (500, 281)]


def make_images(folder: Path, n: int, large: int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """ImageNet-like JPEGs cut from the two sample photos, and enlarged ones."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = random.Random(seed)
    small = []
    for i in range(n):
        photo = photos[i % 2]
        tw, th = rng.choice(SHAPES)
        # the largest crop of the target's shape, then 60-100% of it, anywhere
        fit = min(photo.width / tw, photo.height / th) * rng.uniform(0.6, 1.0)
        cw, ch = round(tw * fit), round(th * fit)
        left, top = rng.randint(0, photo.width - cw), rng.randint(0, photo.height - ch)
        crop = photo.crop((left, top, left + cw, top + ch))
        path = folder / f"img{i:04d}.jpg"
        crop.resize((tw, th), Image.Resampling.BICUBIC).save(path, quality=90)
        small.append(path)
    big = []
    for i in range(large):  # 80-100% of a photo, enlarged to a camera-sized file
        photo = photos[i % 2]
        cw, ch = round(photo.width * rng.uniform(0.8, 1)), round(photo.height * rng.uniform(0.8, 1))
        left, top = rng.randint(0, photo.width - cw), rng.randint(0, photo.height - ch)
        path = folder / f"large{i:03d}.jpg"
        crop = photo.crop((left, top, left + cw, top + ch))
        crop.resize((1600, 1067), Image.Resampling.BICUBIC).save(path, quality=90)
        big.append(path)
    return small, big


def best_per_image(
    cases: dict[str, tuple[Callable[[Path], Any], list[Path]]], rounds: int, warmup: int = 3
) -> dict[str, dict[str, float]]:
    """CPU and wall seconds per image of each case over its files: each file once per round,
    the cases interleaved round by round, the best round kept (on shared cores other jobs only
    add time)."""
    best: dict[str, dict[str, float]] = {}
    for fn, paths in cases.values():
        for path in paths[:warmup]:
            fn(path)
    for _ in range(rounds):
        for name, (fn, paths) in cases.items():
            cpu, wall = time.process_time(), time.perf_counter()
            for path in paths:
                fn(path)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if name not in best or cpu / len(paths) < best[name]["cpu_s"]:
                best[name] = {"cpu_s": cpu / len(paths), "wall_s": wall / len(paths)}
    return best


def device_ops(
    aug: DeviceMultiCrop, canvases: torch.Tensor, valid: torch.Tensor, device: str, repeat: int
) -> dict[str, Any]:
    """Seconds per image of the batched views (parameter sampling and upload included)."""
    images = canvases.to(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    times = []
    for r in range(repeat + 1):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            aug(images, valid, [(i, r) for i in range(len(images))])
        sync(device)
        if r:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    return {"s_per_image": statistics.median(times) / len(images), "batch": len(images)}


def cases(
    small: list[Path], big: list[Path], cfg: ViewConfig
) -> tuple[dict[str, tuple[Callable[[Path], Any], list[Path]]], str | None]:
    """What is timed, by name; and simplejpeg's version (None: not installed)."""
    transform, decoder = MultiCropTransform(cfg), CanvasDecoder(cfg)
    index = {path: i for i, path in enumerate(small)}

    def decode(path: Path) -> Image.Image:
        with Image.open(path) as img:
            return img.convert("RGB")

    def load(path: Path) -> Image.Image:  # no convert(): it copies an RGB image
        with Image.open(path) as img:
            img.load()
            return img

    def cpu_path(path: Path) -> list[torch.Tensor]:
        seed = hash((0, 0, index[path])) % (2**31)  # as views.MultiCropDataset seeds an image
        random.seed(seed)
        torch.manual_seed(seed)
        return transform(decode(path))

    def pil_draft(path: Path) -> Image.Image:
        with Image.open(path) as img:
            img.draft("RGB", decoder.target_size(*img.size))
            return img.convert("RGB")

    timed: dict[str, tuple[Callable[[Path], Any], list[Path]]] = {
        "decode": (decode, small),
        "load": (load, small),
        "cpu_path": (cpu_path, small),
        "worker": (decoder, small),
        "decode_large": (decode, big),
        "load_large": (load, big),
        "draft_decode_large": (pil_draft, big),
        "worker_large": (decoder, big),
        "worker_large_no_draft": (CanvasDecoder(cfg, draft=False), big),
    }
    try:
        import simplejpeg
    except ImportError:
        return timed, None

    def sj(path: Path) -> np.ndarray:
        return simplejpeg.decode_jpeg(path.read_bytes(), "RGB")

    def sj_scaled(path: Path) -> np.ndarray:
        data = path.read_bytes()
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        w, h = decoder.target_size(width, height)
        return simplejpeg.decode_jpeg(data, "RGB", min_width=w, min_height=h)

    def sj_worker(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        return decoder.fit(Image.fromarray(sj_scaled(path)))

    timed |= {
        "sj_decode": (sj, small),
        "sj_worker": (sj_worker, small),
        "sj_decode_large": (sj, big),
        "sj_scaled_decode_large": (sj_scaled, big),
        "sj_worker_large": (sj_worker, big),
    }
    return timed, simplejpeg.__version__


def cpu_pressure() -> str | None:
    """Linux PSI: the share of recent time runnable tasks waited for a CPU."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None


def plan_flops() -> float:
    from mimcli.refine.plan import PlanConfig, plan_refine

    plan = plan_refine(PlanConfig(model="vit_large_patch16_224.mae", batch_size=1))
    return float(plan.flops_per_image["total"])


LABELS = {
    "decode": "(a) decode (PIL, as data.ImageDataset: + convert)",
    "load": "(a) decode (PIL, no convert copy)",
    "cpu_path": "(b) CPU path: decode + 2 x 224 + 10 x 96 views",
    "worker": "(c) device path, worker: decode + shrink + pad",
    "sj_decode": "(a) decode (simplejpeg)",
    "sj_worker": "(c) worker with simplejpeg",
    "decode_large": "(a) decode (PIL + convert), 1600 x 1067",
    "load_large": "(a) decode (PIL, no convert copy)",
    "draft_decode_large": "(a) decode (PIL draft: DCT scaled)",
    "worker_large": "(c) worker, 1600 x 1067 (draft)",
    "worker_large_no_draft": "(c) worker, 1600 x 1067, no draft",
    "sj_decode_large": "(a) decode (simplejpeg), 1600 x 1067",
    "sj_scaled_decode_large": "(a) decode (simplejpeg, DCT scaled)",
    "sj_worker_large": "(c) worker with simplejpeg, 1600 x 1067",
}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=300, help="ImageNet-like JPEGs to time")
    p.add_argument("--large", type=int, default=24, help="1600 x 1067 JPEGs (DCT downscale)")
    p.add_argument("--rounds", type=int, default=3, help="passes over the files; best kept")
    p.add_argument("--batch", type=int, default=32, help="batch of the device ops on the CPU")
    p.add_argument("--plan-flops", action="store_true", help="FLOP per image from refine --plan")
    args = p.parse_args(argv)
    smoke = args.smoke
    n, large, batch, rounds = (
        (6, 2, 4, 1) if smoke else (args.images, args.large, args.batch, args.rounds)
    )
    torch.set_num_threads(1)  # one DataLoader worker
    cfg = default_view_config({}, 16)  # the paper's views: 2 x 224 + 10 x 96
    decoder = CanvasDecoder(cfg)
    with tempfile.TemporaryDirectory(prefix="mimcli-bench-data-") as tmp:
        small, big = make_images(Path(tmp), n, large)
        timed, simplejpeg = cases(small, big, cfg)
        workers = best_per_image(timed, rounds)
        decoded = [decoder(path) for path in small[:batch]]
    canvases = torch.stack([c for c, _ in decoded])
    valid = torch.stack([v for _, v in decoded])
    aug = DeviceMultiCrop(cfg, seed=0)
    torch.set_num_threads(args.threads or 1)
    ops: dict[str, dict[str, Any]] = {
        "cpu": device_ops(aug, canvases, valid, "cpu", 1 if smoke else 3)
        | {"threads": torch.get_num_threads()}
    }
    if torch.cuda.is_available() and not smoke:
        copies = -(-256 // batch)
        full, full_valid = canvases.repeat(copies, 1, 1, 1)[:256], valid.repeat(copies, 1)[:256]
        ops["cuda"] = device_ops(aug, full, full_valid, "cuda", 10)
        ops["cuda"]["gpu"] = torch.cuda.get_device_name(0)
    torch.set_num_threads(1)

    flops = plan_flops() if args.plan_flops else VIT_L_FLOPS
    gpu_images_per_s = MFU * H100_BF16 / flops
    ratio = workers["worker"]["cpu_s"] / workers["cpu_path"]["cpu_s"]
    cores = {
        "cpu_path": gpu_images_per_s * workers["cpu_path"]["cpu_s"],
        "device_path": gpu_images_per_s * workers["worker"]["cpu_s"],
    }
    rows = [
        [LABELS[k], 1 / v["cpu_s"], v["cpu_s"] * 1e3, v["wall_s"] * 1e3] for k, v in workers.items()
    ]
    cols = ["step", "images/s (CPU time)", "CPU ms", "wall ms"]
    print(table(f"One worker (one thread), per image, best of {rounds}", cols, rows))
    if simplejpeg is None:
        print("simplejpeg rows skipped: not installed (pip install simplejpeg)")
    print()
    op_rows: list[list[Any]] = [
        [f"{k} (B={v['batch']})", v["s_per_image"] * 1e3] for k, v in ops.items()
    ]
    if "cuda" not in ops:
        op_rows.append(["cuda", "skipped (--smoke)" if smoke else "not measured: no CUDA"])
    print(table("(d) DeviceMultiCrop, the batched views", ["device", "ms per image"], op_rows))
    print()
    print(f"worker CPU time, device path / CPU path: {ratio:.3f} (target <= 1/3)")
    print(
        f"ViT-L/16 at {MFU:.0%} MFU on an H100: {gpu_images_per_s:.0f} images/s per GPU "
        f"({flops / 1e9:,.0f} GFLOP per image); CPU cores per GPU: CPU path "
        f"{cores['cpu_path']:.1f}, device path {cores['device_path']:.2f} "
        f"(8 GPUs: {8 * cores['cpu_path']:.0f} against {8 * cores['device_path']:.1f})"
    )
    print(f"CPU pressure at the end (PSI): {cpu_pressure()}")
    path = save(
        "data_pipeline",
        args.out,
        {
            "smoke": smoke,
            "images": n,
            "large": large,
            "rounds": rounds,
            "views": f"2x{cfg.global_size} + {cfg.local_crops}x{cfg.local_size}",
            "canvas_side": decoder.side,
            "per_image": workers,
            "device_ops": ops,
            "device_over_cpu_path": ratio,
            "flops_per_image": flops,
            "gpu_images_per_s": gpu_images_per_s,
            "cores_per_gpu": cores,
            "simplejpeg": simplejpeg,
            "pillow": Image.__version__,
            "cpu_pressure": cpu_pressure(),
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
