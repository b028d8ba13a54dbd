"""The refine step on one GPU: images/s, MFU and peak memory against ``refine --plan``, and what
the ID heads and queues add over the bare encoder's forward and backward.

    PYTHONPATH=. python -m benchmarks.gpu_refine [--smoke] [--batch N] [--steps 10]

Runs from the source tree (no install). On CUDA: a ViT-L/16 with random weights (timm
``vit_large_patch16_224``, saved to a temporary folder so the real loader reads it; nothing is
downloaded), bf16 autocast, the paper's views (2 × 224 + 10 × 96 px), 8 ID heads on blocks
17–24, 65,536-entry queues, the torch search backend (no FAISS needed), the largest batch the plan
allows (or ``--batch``). Synthetic images; the first steps warm up and are not counted. Reported:
images/s, model TFLOP/s and MFU against the GPU's bf16 dense peak (H100/H200 989, A100 312;
model FLOPs from the plan, recompute not counted), ``max_memory_allocated`` against the plan's
total, and the step time over a bare encoder forward+backward of the same views. Then the same
figures compiled (what ``refine --compile`` does: ``mimcli.refine.compiling.compile_step`` on the
same Refiner, in place, after the eager steps; the bare encoder's blocks compiled alike), with the
compile time apart (the first compiled step minus a steady one); ``--no-compile`` skips them.
``--smoke`` runs a tiny ViT on the CPU and compiles with dynamo's ``eager`` backend (checks the
script; figures meaningless).

On CUDA the timed refine steps run under ``torch.cuda.set_sync_debug_mode("error")``: anything
in a step that makes the host wait for the GPU raises, except the logging steps' one read of the
metrics window and the benchmark's own ``synchronize`` between steps (for timing).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from benchmarks import refine_step
from benchmarks._common import parser, save, table
from benchmarks.refine_step import DATASET, bare_step_fn, refine_steps
from mimcli.refine.compiling import compile_step
from mimcli.refine.config import RefineConfig
from mimcli.refine.loop import Refiner
from mimcli.refine.plan import PlanConfig, plan_refine
from mimcli.refine.window import MetricWindow

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def gpu_peak(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


@contextmanager
def sync_debug(mode: str) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode(mode)`` inside, the previous mode after."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def sync_free_steps(refiner: Refiner, views: list[torch.Tensor], n: int) -> list[float]:
    """``refine_steps`` with every step under sync debug mode ``error``, but for the logging
    steps' read of the metrics window and the per-step ``synchronize`` that times the steps."""
    real_read, real_sync = MetricWindow.read, refine_step.sync

    def read(self: MetricWindow, *args: Any, **kwargs: Any) -> Any:
        with sync_debug("default"):
            return real_read(self, *args, **kwargs)

    def timing_sync(device: torch.device) -> None:
        with sync_debug("default"):
            real_sync(device)

    MetricWindow.read = read  # type: ignore[method-assign]
    refine_step.sync = timing_sync  # type: ignore[assignment]
    try:
        with sync_debug("error"):
            return refine_steps(refiner, views, n, "refine")
    finally:
        MetricWindow.read = real_read  # type: ignore[method-assign]
        refine_step.sync = real_sync


def save_model(folder: Path, smoke: bool) -> None:
    import timm
    from timm.models import save_for_hf

    args: dict[str, Any] = (
        dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2)
        if smoke
        else dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    )
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **args)
    size = args["img_size"]
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, size, size), crop_pct=1.0)
    model.pretrained_cfg.pop("license", None)
    save_for_hf(model, str(folder), model_args=args, safe_serialization=True)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="per GPU (default: the plan's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-ups)")
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True,
        help="also the compiled step (refine --compile)",
    )  # fmt: skip
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    steps = 1 if args.smoke else args.steps
    backend = "inductor" if cuda else "eager"  # CPU smoke: trace only, generate no code
    versions = {"torch": torch.__version__}
    try:
        import huggingface_hub
        import timm

        versions |= {"timm": timm.__version__, "huggingface_hub": huggingface_hub.__version__}
    except ImportError:
        pass
    print("versions:", versions, "| device:", torch.cuda.get_device_name(0) if cuda else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_model(root / "model", smoke=not cuda)
        blocks, local, queue = ("17-24", 10, "65536") if cuda else ("last2", 2, "256")
        plan = plan_refine(
            PlanConfig(
                model=str(root / "model"), blocks=blocks, local_crops=local, queue_size=queue,
                batch_size=args.batch or 8, precision="bf16" if cuda else "fp32",
            )
        )  # fmt: skip
        batch = args.batch or (max(2, min(plan.max_batch, 256)) if cuda else 8)
        plan = plan_refine(
            PlanConfig(
                model=str(root / "model"), blocks=blocks, local_crops=local, queue_size=queue,
                batch_size=batch, precision="bf16" if cuda else "fp32",
            )
        )  # fmt: skip
        data = root / "data"
        for i in range(batch):  # blank images: the Refiner only scans them
            (data / str(i % 10)).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(data / str(i % 10) / f"{i}.png")
        cfg = RefineConfig(
            model=str(root / "model"), data=data, out=root / "run", blocks=blocks,
            local_crops=local, queue_size=queue, batch_size=batch, device=device, num_workers=0,
            knn_backend="torch", checkpoint_every=10**9, lr=1e-4, head_lr=1e-4,
        )  # fmt: skip
        cfg.out.mkdir(parents=True)
        refiner = Refiner(cfg)
        refiner.save = lambda stage, done, *rest: None  # type: ignore[method-assign]
        gen = torch.Generator().manual_seed(0)  # synthetic ids run over the whole DATASET range
        refiner.objective.labels_by_id = torch.randint(0, 10, (DATASET,), generator=gen)
        sample = refiner.objective.transform()(Image.new("RGB", (256, 256)))
        gen = torch.Generator().manual_seed(0)
        views = [torch.randn(batch, *v.shape, generator=gen) for v in sample]
        if cuda:
            views = [v.to(device) for v in views]
        eager = measure(refiner, views, steps, cuda, None)
        compiled = None
        if args.compile:  # in place, after the eager steps: one Refiner fits the device
            compile_step(refiner.encoder, refiner.objective, refiner.device, backend)
            compiled = measure(refiner, views, steps, cuda, backend)
    mode_rows = [("", eager)] + ([(", compiled", compiled)] if compiled else [])
    peak_tflops = gpu_peak(torch.cuda.get_device_name(0)) if cuda else None
    rows: list[list[Any]] = [
        ["batch per GPU (plan's largest)", f"{batch} ({plan.max_batch})"],
        ["plan's total GiB at this batch", plan.total_bytes / 1024**3],
    ]
    for tag, m in mode_rows:
        tflops = plan.flops_per_image["total"] * m["images_per_s"] / 1e12
        m["tflops"] = tflops
        m["mfu"] = tflops / peak_tflops if peak_tflops else None
        peak = m["peak_bytes"]
        rows += [
            [f"refine step s{tag}", m["refine_s"]],
            [f"images/s{tag}", m["images_per_s"]],
            [f"model TFLOP/s{tag}", tflops],
            [f"MFU{tag}", f"{m['mfu']:.1%}" if m["mfu"] else "n/a (CPU or unknown GPU)"],
            [f"peak memory GiB (max_memory_allocated){tag}", peak / 1024**3 if cuda else "n/a"],
            [f"peak / plan{tag}", peak / plan.total_bytes if cuda else "n/a"],
            [f"bare encoder fwd+bwd s{tag}", m["bare_s"]],
            [f"heads + queues overhead{tag}", f"{m['refine_s'] / m['bare_s'] - 1:+.1%}"],
        ]
    for tag, m in mode_rows:
        rows.append([f"host syncs outside logging steps{tag}", m["host_syncs_outside_logging"]])
    if compiled:
        rows += [
            [f"compile s (first compiled step - steady; {backend})", compiled["compile_s"]],
            ["compiled speed-up (eager / compiled step)", eager["refine_s"] / compiled["refine_s"]],
        ]
    else:
        rows.append(["compiled", "skipped (--no-compile)"])
    print(table("Refine step on one GPU" if cuda else "gpu_refine --smoke (CPU)", ["", ""], rows))
    save(
        "gpu_refine",
        args.out,
        {
            "smoke": args.smoke, "cuda": cuda, "versions": versions, "batch": batch,
            "max_batch": plan.max_batch, "plan_total_bytes": plan.total_bytes,
            "refine_s": eager["refine_s"], "bare_s": eager["bare_s"],
            "images_per_s": eager["images_per_s"], "tflops": eager["tflops"],
            "peak_bytes": eager["peak_bytes"], "sync_debug_error": cuda,
            "eager": eager, "compiled": compiled,
            "compile_backend": backend if compiled else None,
        },
    )  # fmt: skip
    return 0


def measure(
    refiner: Refiner, views: list[torch.Tensor], steps: int, cuda: bool, backend: str | None
) -> dict[str, Any]:
    """Two warm-up refine steps (the first also compiles, when compiled), ``steps`` timed ones
    (on CUDA under sync debug mode ``error``), then a bare encoder step on a copy of the encoder
    (its blocks compiled with ``backend`` when given): medians, peak memory of the refine
    steps."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm = refine_steps(refiner, views, 2, "refine")  # optimiser state, kernels, caches
    syncs = "n/a"
    timed = None
    if cuda:
        try:
            timed = sync_free_steps(refiner, views, steps)
            syncs = "none"
        except RuntimeError as exc:  # compiled code that syncs: say so, still time the steps
            if "synchroniz" not in str(exc) or backend is None:
                raise
            syncs = f"yes: {str(exc).splitlines()[0]}"
    refine_s = statistics.median(timed or refine_steps(refiner, views, steps, "refine"))
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    bare_step, _, _ = bare_step_fn(refiner, views, backend)
    bare = []
    for i in range(steps + 2):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        bare_step()
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            bare.append(time.perf_counter() - start)
    del bare_step  # its encoder copy and AdamW state
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {
        "refine_s": refine_s,
        "warmup_steps_s": warm,
        "compile_s": warm[0] - refine_s,
        "bare_s": statistics.median(bare),
        "images_per_s": len(views[0]) / refine_s,
        "peak_bytes": peak,
        "host_syncs_outside_logging": syncs,
    }


if __name__ == "__main__":
    raise SystemExit(main())
