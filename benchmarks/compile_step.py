"""``refine --compile`` on the CPU: the refine step compiled against eager, measured in one run.

    PYTHONPATH=. python -m benchmarks.compile_step [--smoke] [--steps 6] [--rounds 2]

Two NNA refinement setups, each built twice (eager, and compiled the way ``refine --compile``
compiles it: :func:`mimcli.refine.compiling.compile_step`, per block and per head) and run
through the real loop (``Refiner.train_stage("refine")``, synthetic view tensors, checkpoints
off, as in ``benchmarks.refine_step``):

- the shipped tiny Fashion-MNIST MAE (8 blocks, 128 wide, 28 px, patch 4), last 4 blocks,
  2 × 28 + 2 local crops, batch 256;
- ViT-S/16 (timm ``vit_small_patch16_224``, random weights), 224 px, last 4 blocks,
  2 × 224 + 2 × 96 px, batch 16.

The compile is timed apart: the first compiled step (both view sizes and the heads compile
there) minus a steady compiled step, with inductor's on-disk cache pointed at an empty folder so
it is a cold compile. Then eager and compiled steps are timed alternately, one step each per
round by default (so a load change on a shared machine hits both alike); reported: median step
time of each, eager / compiled of the medians (the speed-up) and the median of the per-round
ratios, and the CPU pressure (Linux PSI) at the end.
Also the bytes saved for backward by one step of each (``saved_tensors_hooks``, every storage
once, parameters excluded): what ``refine --plan`` measures eagerly and assumes for compiled
runs (an upper bound). ``--smoke`` uses a 4-block, 32-wide ViT and the ``eager`` dynamo backend
(traces, generates no code): it checks the script runs, the figures mean nothing.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import parser, save, setup_threads, table
from benchmarks.refine_step import TINY, batches, make_refiner, make_views, refine_steps
from mimcli.refine.compiling import compile_step
from mimcli.refine.loop import Refiner


def save_vit(folder: Path, args: dict[str, Any], arch: str = "vit_base_patch16_224") -> str:
    """A random-weight timm ViT in timm's folder layout (nothing is downloaded)."""
    import timm
    from timm.models import save_for_hf

    model = timm.create_model(arch, pretrained=False, num_classes=0, **args)
    size = model.patch_embed.img_size[0]
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, size, size), crop_pct=1.0)
    model.pretrained_cfg.pop("license", None)
    save_for_hf(model, str(folder), model_args=args, safe_serialization=True)
    return str(folder)


def cpu_pressure() -> str | None:
    """Linux PSI: how much of the recent time runnable tasks waited for a CPU (a shared
    machine's load shows here)."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None


def saved_bytes(refiner: Refiner, views: list[torch.Tensor]) -> int:
    """Bytes one refine step's forward saves for backward (each storage once, no parameters)."""
    params = {p.untyped_storage().data_ptr() for p in refiner.encoder.parameters()}
    params |= {p.untyped_storage().data_ptr() for p in refiner.objective.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    refiner.encoder.train()
    batch = batches(views, 1, 10**6)[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = refiner.step_losses(batch, "refine", 0)
    del loss
    return sum(seen.values())


def measure(
    label: str,
    make: Any,
    batch: int,
    steps: int,
    rounds: int,
    backend: str,
) -> dict[str, Any]:
    eager, compiled = make(), make()
    counts = compile_step(compiled.encoder, compiled.objective, compiled.device, backend)
    views = make_views(eager, batch)
    refine_steps(eager, views, 2, "refine")  # warm-up: optimiser state, allocator
    start = time.perf_counter()
    first = refine_steps(compiled, views, 1, "refine")[0]  # every view size + heads compile here
    first_wall = time.perf_counter() - start
    refine_steps(compiled, views, 1, "refine")  # warm-up like eager's second step
    eager_t: list[float] = []
    compiled_t: list[float] = []
    for _ in range(rounds):  # alternate, so a load change hits both alike
        eager_t += refine_steps(eager, views, steps, "refine")
        compiled_t += refine_steps(compiled, views, steps, "refine")
    e, c = statistics.median(eager_t), statistics.median(compiled_t)
    paired = statistics.median(a / b for a, b in zip(eager_t, compiled_t, strict=True))
    saved = {"eager": saved_bytes(eager, views), "compiled": saved_bytes(compiled, views)}
    g, loc, n = eager.views.global_size, eager.views.local_size, eager.views.local_crops
    return {
        "model": label,
        "batch": batch,
        "views": f"2x{g}" + (f" + {n}x{loc}" if n else "") + " px",
        "heads": len(eager.blocks),
        "compiled_modules": counts,
        "backend": backend,
        "first_compiled_step_s": first,
        "first_compiled_step_wall_s": first_wall,
        "compile_s": first - c,
        "eager_s": eager_t,
        "compiled_s": compiled_t,
        "eager_median_s": e,
        "compiled_median_s": c,
        "speedup": e / c,
        "speedup_paired_median": paired,  # median over (eager, compiled) steps run back to back
        "eager_images_per_s": batch / e,
        "compiled_images_per_s": batch / c,
        "saved_bytes": saved,
        "saved_compiled_over_eager": saved["compiled"] / max(saved["eager"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1, help="timed steps per round and mode")
    p.add_argument("--rounds", type=int, default=10, help="alternating eager/compiled rounds")
    p.add_argument("--vit-s-batch", type=int, default=16)
    p.add_argument("--tiny-batch", type=int, default=256)
    p.add_argument("--only", choices=("tiny", "vit-s"), default=None, help="one setup only")
    args = p.parse_args(argv)
    threads = setup_threads(args.threads)
    smoke = args.smoke
    steps, rounds = (1, 1) if smoke else (args.steps, args.rounds)
    backend = "eager" if smoke else "inductor"
    results = []
    with tempfile.TemporaryDirectory(prefix="mimcli-bench-compile-") as tmp:
        root = Path(tmp)
        # a cold compile: inductor's on-disk cache starts empty (restored afterwards)
        before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor-cache")
        try:
            setups: list[tuple[str, str, int, int]] = []
            if smoke:
                tiny = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
                setups.append(("tiny ViT (smoke)", save_vit(root / "smoke", tiny), 8, 1))
            else:
                if args.only in (None, "tiny"):
                    setups.append(("tiny MAE (shipped)", str(TINY), args.tiny_batch, 2))
                if args.only in (None, "vit-s"):
                    vit_s = save_vit(root / "vit-s", {}, "vit_small_patch16_224")
                    setups.append(("ViT-S/16", vit_s, args.vit_s_batch, 2))
            for label, model, batch, locals_ in setups:

                def make(model: str = model, batch: int = batch, locals_: int = locals_) -> Refiner:
                    return make_refiner(root, model, 4, batch, 16_384, locals_, "cpu", threads)

                res = measure(label, make, batch, steps, rounds, backend)
                results.append(res)
                print(f"{label}: speed-up {res['speedup']:.2f}x", flush=True)
        finally:
            if before is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
    rows = [
        [
            r["model"],
            f"B={r['batch']}, {r['views']}, {r['heads']} heads",
            r["eager_median_s"] * 1e3,
            r["compiled_median_s"] * 1e3,
            f"{r['speedup']:.2f}x ({r['speedup_paired_median']:.2f}x)",
            f"{r['compile_s']:.0f} s",
            f"{r['saved_compiled_over_eager']:.2f}",
        ]
        for r in results
    ]
    cols = ["model", "step", "eager ms", "compiled ms", "eager/compiled (paired)", "compile"]
    cols += ["saved bytes compiled/eager"]
    title = f"NNA refine step, eager vs --compile ({backend}), CPU, {threads} threads"
    print(table(title, cols, rows))
    print(f"CPU pressure at the end (PSI): {cpu_pressure()}")
    path = save(
        "compile_step",
        args.out,
        {
            "smoke": smoke,
            "threads": threads,
            "steps": steps,
            "rounds": rounds,
            "torch": torch.__version__,
            "cpu_pressure": cpu_pressure(),
            "results": results,
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
