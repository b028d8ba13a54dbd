"""``mimcli refine --plan``: memory and compute of one NNA refinement step, measured without a GPU
and without weights, by running encoder + heads + loss forward and backward on fake tensors.

Saved activations are summed through ``saved_tensors_hooks`` (each storage once, parameters
excluded) and FLOPs counted by ``FlopCounterMode``; both come from a trace at 1 and at 2 images,
so the per-image slope and the per-step constant (the bf16 weight copies autocast keeps) separate.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from mimcli.blocks import resolve_blocks
from mimcli.errors import MimcliError
from mimcli.fileio import write_json
from mimcli.heads import HeadEnsemble, head_widths
from mimcli.objectives.nna import block_features, multiview_loss
from mimcli.refine.setup import freeze_parameters, trainable_architecture
from mimcli.refine.sharding import SHARD_MODES

GIB = 1024**3
MIB = 1024**2
PLAN_FILE = "plan.json"
DEFAULT_MEMORY_GIB = 80.0
QUEUE_AUTO = 65536  # --queue-size auto without reading --data: the paper's size (its cap)
# dense tensor-core peaks in TFLOP/s: bf16, and TF32 for fp32 runs
GPUS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.0, "fp32": 494.5},
    "H200": {"bf16": 989.0, "fp32": 494.5},
    "A100": {"bf16": 312.0, "fp32": 156.0},
}
PRECISIONS = ("bf16", "fp32")
PLAN_OBJECTIVES = ("nna", "nnclr")
aten = torch.ops.aten
# FlopCounterMode has no formula for CPU flash attention; it has the same cost as the CUDA kernel


def _sdpa_cpu(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    return int(sdpa_flop_count(query, key, value))


def _sdpa_cpu_backward(grad: Any, query: Any, key: Any, value: Any, *a: Any, **k: Any) -> int:
    return int(sdpa_backward_flop_count(grad, query, key, value))


SDPA_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
}


@dataclass
class PlanConfig:
    """What ``refine --plan`` is asked about (blocks counted from 1)."""

    model: str
    out: Path | None = None
    num_heads: int | None = None
    objective: str = "nna"
    blocks: str | None = None
    probe: Path | None = None
    head_width: str = "auto"
    head_input: str | None = None
    local_crops: int | None = None
    freeze_blocks: int | None = None  # None: the objective's default
    global_size: int | None = None  # None: the model's input size
    local_size: int | None = None  # None: 96/224 of it, a multiple of the patch size
    batch_size: int = 256  # per process
    precision: str = "bf16"
    grad_checkpointing: bool = False
    shard: str = "auto"  # refine --shard: on, off, auto (state over half the device memory)
    processes: int = 1  # processes the global batch and the sharded state are split over
    compile: bool = False  # refine --compile: recorded; memory stays the eager measurement
    queue_size: str = "auto"
    device_memory_gib: float | None = None  # None: the local GPU's, else 80
    mfu: float = 0.4


@dataclass
class GpuEstimate:
    gpu: str
    peak_tflops: float
    step_s: float
    images_per_s: float


@dataclass
class RefinePlan:
    """Bytes per process, per image and FLOPs of one refinement step (everything trains)."""

    model: str
    arch: str
    objective: str
    blocks: list[int]
    views: list[dict[str, int]]  # [{"count": 2, "size": 224}, ...]
    batch_size: int
    precision: str
    grad_checkpointing: bool
    encoder_params: int
    head_params: int
    head_widths: dict[str, int]
    queue_size: int
    bytes: dict[str, int]  # per process: parameters, gradients, optimizer, ema, queues, ...
    activation_bytes_per_view: dict[str, int]  # view size -> saved bytes per image and view
    activation_bytes_per_image: int  # all views of one image, heads and loss included
    transient_bytes_per_image: int
    fixed_bytes: int
    total_bytes: int  # at batch_size
    device_memory: int
    max_batch: int
    flops_per_image: dict[str, float]  # forward, backward, lookup, total
    gpus: list[GpuEstimate] = field(default_factory=list)
    mfu: float = 0.4
    sharded: bool = False  # FSDP2 over `processes`
    processes: int = 1
    notes: list[str] = field(default_factory=list)
    path: str | None = None
    compile: bool = False  # refine --compile (activations measured eagerly: an upper bound)


# --- measuring on fake tensors -----------------------------------------------------------------


@dataclass
class Trace:
    saved_bytes: int
    largest_saved: int
    forward_flops: int
    backward_flops: int
    by_phase: dict[str, int] = field(default_factory=dict)  # saved bytes per Phases.current


@dataclass
class Phases:
    """Which part of a step runs now (``global``, ``local``, ``heads``), for :func:`trace`."""

    current: str = ""


def _storage_key(t: Tensor) -> int:
    return int(t.untyped_storage()._cdata)


def trace(
    run: Callable[[], Tensor],
    params: Sequence[Tensor],
    precision: str,
    phases: Phases | None = None,
) -> Trace:
    """Run ``run()`` (which returns a scalar loss) forward and backward, summing the bytes of
    every distinct storage autograd saves (parameters excluded) and the FLOPs of each pass;
    with ``phases``, saved bytes are also summed per phase (where each storage is first saved)."""
    skip = {_storage_key(p) for p in params}
    saved: dict[int, int] = {}
    phase_of: dict[int, str] = {}
    held: list[Any] = []  # keeps every saved storage alive, so no key is reused in this trace

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in skip and key not in saved:
            held.append(t.untyped_storage())
            saved[key] = held[-1].nbytes()
            phase_of[key] = phases.current if phases else ""
        return t

    cast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    forward = FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS)
    with forward, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        loss = run()
    backward = FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS)
    with backward:
        loss.backward()
    return Trace(
        saved_bytes=sum(saved.values()),
        largest_saved=max(saved.values(), default=0),
        by_phase={
            name: sum(n for k, n in saved.items() if phase_of[k] == name)
            for name in set(phase_of.values())
        },
        forward_flops=int(forward.get_total_flops()),
        backward_flops=int(backward.get_total_flops()),
    )


def fake_copy(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """The module's architecture with fake CPU parameters (no weights read or allocated)."""
    meta = module if _on_meta(module) else copy.deepcopy(module).to("meta")
    with mode:
        return meta.to_empty(device="cpu")


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def _tokens(encoder: nn.Module, size: int) -> int:
    patch = encoder.patch_embed.patch_size  # type: ignore[union-attr]
    grid = (size // patch[0]) * (size // patch[1])
    return grid + int(getattr(encoder, "num_prefix_tokens", 1))


# --- the plan --------------------------------------------------------------------------------


def _strip_tag(name: str) -> str:
    return name.split(".", 1)[0]


def _looks_like_timm_name(spec: str) -> bool:
    import timm

    return (
        re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?", spec) is not None
        and not Path(spec).exists()
        and timm.is_model(_strip_tag(spec))
    )


def build_architecture(spec: str, num_heads: int | None) -> tuple[nn.Module, str, dict[str, Any]]:
    """The trainable encoder's architecture on the meta device, as ``refine`` rebuilds it
    (``dynamic_img_size``, the official position-table resize): a timm name is built without
    downloading anything; other MODEL forms are loaded to read their architecture."""
    from mimcli.models.build import build_model

    if _looks_like_timm_name(spec):
        arch, args = _strip_tag(spec), {}
        with torch.device("meta"):
            cfg = dict(build_model(spec, {}).pretrained_cfg)
    else:
        from mimcli.models.sources import load_model

        loaded = load_model(spec, num_heads)
        arch, args, cfg = loaded.arch, dict(loaded.model_args), dict(loaded.pretrained_cfg)
    with torch.device("meta"):
        encoder = trainable_architecture(arch, args)
    return encoder, arch, cfg


def default_device_memory() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return int(DEFAULT_MEMORY_GIB * GIB)


def _check(cfg: PlanConfig) -> None:
    if cfg.objective not in PLAN_OBJECTIVES:
        raise MimcliError(
            f"--plan covers --objective {' and '.join(PLAN_OBJECTIVES)}, not {cfg.objective}"
        )
    if cfg.precision not in PRECISIONS:
        raise MimcliError(f"--precision must be bf16 or fp32, got {cfg.precision!r}")
    if not 0 < cfg.mfu <= 1:
        raise MimcliError(f"--mfu must be in (0, 1], got {cfg.mfu}")
    if cfg.batch_size < 1:
        raise MimcliError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.shard not in SHARD_MODES:
        raise MimcliError(f"--shard must be one of {', '.join(SHARD_MODES)}, got {cfg.shard!r}")


def plan_refine(cfg: PlanConfig) -> RefinePlan:
    """Measure one refinement step of ``cfg.model`` and write ``cfg.out/plan.json`` (if given).

    Memory per process = parameters + gradients + AdamW (2 fp32 states per trainable
    parameter) + the encoder EMA + the queues (fixed), + the bf16 weight copies autocast keeps
    (fixed), + per image: the activations saved for backward over all views, plus a backward
    transient (the largest single saved tensor of one image, twice: its gradient and the
    gradient being produced exist together while it is still held).
    """
    from mimcli.objectives import objective_class, objective_defaults
    from mimcli.views import default_view_config

    _check(cfg)
    encoder, arch, pretrained_cfg = build_architecture(cfg.model, cfg.num_heads)
    depth = len(encoder.blocks)  # type: ignore[arg-type]
    dim = int(encoder.embed_dim)  # type: ignore[arg-type]
    defaults = objective_defaults(cfg.objective, depth, dim)
    freeze = cfg.freeze_blocks if cfg.freeze_blocks is not None else defaults["freeze_blocks"]
    freeze_parameters(encoder, int(freeze))
    blocks_spec = cfg.blocks if cfg.blocks is not None else defaults.get("blocks") or "auto"
    blocks, _ = resolve_blocks(str(blocks_spec), depth, cfg.probe)
    head_input = cfg.head_input or defaults.get("head_input") or "cls"
    local_crops = cfg.local_crops if cfg.local_crops is not None else defaults["local_crops"]
    patch = int(encoder.patch_embed.patch_size[0])  # type: ignore[union-attr,index]
    views = default_view_config(pretrained_cfg, patch, local_crops=local_crops)
    global_size = cfg.global_size or views.global_size
    local_size = cfg.local_size or views.local_size
    widths = head_widths(
        dim,
        int(cfg.head_width)
        if cfg.head_width.isascii() and cfg.head_width.isdigit()
        else cfg.head_width,
    )
    obj = objective_class(cfg.objective)
    qsize = QUEUE_AUTO if cfg.queue_size == "auto" else int(cfg.queue_size)
    tau = float(defaults.get("temperature") or 0.2)

    heads = HeadEnsemble(
        blocks,
        dim,
        widths,
        act=getattr(obj, "activation", "gelu"),
        predictor_final_bn=getattr(obj, "predictor_final_bn", True),
    )
    encoder_params = sum(p.numel() for p in encoder.parameters())
    encoder_trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    head_params = sum(p.numel() for p in heads.parameters())

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fenc = fake_copy(encoder, mode).train()
    fheads = fake_copy(heads, mode).train()
    if hasattr(fenc, "set_grad_checkpointing"):
        # traced without: checkpointed blocks save through hooks of their own, out of sight
        fenc.set_grad_checkpointing(False)
    params = [*fenc.parameters(), *fheads.parameters()]
    view_sizes = [global_size] * 2 + [local_size] * local_crops

    phases = Phases()
    loss_kind = getattr(obj, "loss_kind", "nna")
    step = nna_step(fenc, fheads, blocks, head_input, view_sizes, loss_kind, tau, phases=phases)

    with mode:
        one = trace(lambda: step(1), params, cfg.precision, phases)
        two = trace(lambda: step(2), params, cfg.precision, phases)
        block_saved = {
            size: _block_saved(fenc, size, params, cfg.precision)
            for size in (set(view_sizes) if cfg.grad_checkpointing else ())
        }
    per_view = {str(global_size): (two.by_phase["global"] - one.by_phase["global"]) // 2}
    if local_crops:
        local_slope = two.by_phase["local"] - one.by_phase["local"]
        per_view[str(local_size)] = local_slope // local_crops

    per_image = two.saved_bytes - one.saved_bytes
    weight_copies = max(0, one.saved_bytes - per_image)
    transient = 2 * (two.largest_saved // 2)
    notes = [
        "bytes per process; model FLOPs (recompute not counted); the queue look-up is counted "
        "analytically and its neighbours stood in for",
        f"queue size {qsize}"
        + (" (auto without reading --data: the paper's size)" if cfg.queue_size == "auto" else ""),
    ]
    if cfg.grad_checkpointing:
        # each block keeps only its input (the fp32 residual stream) instead of what it saves;
        # taps stop after the last tapped block
        ran = max(blocks)
        kept = sum(ran * (_tokens(fenc, s) * dim * 4 - block_saved[s]) for s in view_sizes)
        outside = per_image - sum(ran * block_saved[s] for s in view_sizes)  # heads, stem, loss
        per_image = max(per_image + kept, 0)
        # backward recomputes one block of a pass (2 global views, or all the local ones) at a
        # time; by then the heads' saved tensors are freed, so only the excess counts
        passes = [2 * block_saved[global_size]]
        if local_crops:
            passes.append(local_crops * block_saved[local_size])
        transient += max(0, max(passes) - max(outside, 0))
        notes.append(
            "grad checkpointing: block inputs kept, one block recomputed at a time (per-view "
            "figures are without checkpointing)"
        )

    if cfg.compile:
        notes.append(
            "--compile: activations measured on the eager step, an upper bound for the compiled "
            "one (inductor saves fewer, fused intermediates; compile workspace not counted); "
            "FLOPs and step time as eager at the same MFU"
        )

    trainable = encoder_trainable + head_params
    lookup_flops = 2 * 2 * qsize * widths.out * len(blocks)  # 2 global queries per head
    nbytes = {
        "parameters": 4 * (encoder_params + head_params),
        "gradients": 4 * trainable,
        "optimizer": 2 * 4 * trainable,
        "ema": 4 * encoder_params,
        "queues": len(blocks) * qsize * (widths.out * 4 + 8),
        "weight_copies": weight_copies,
    }
    # the look-up's (2B, Q) fp32 similarities live briefly in the forward pass
    transient = max(transient, 2 * qsize * 4)
    memory = (
        int(cfg.device_memory_gib * GIB)
        if cfg.device_memory_gib is not None
        else default_device_memory()
    )
    state = nbytes["parameters"] + nbytes["gradients"] + nbytes["optimizer"] + nbytes["ema"]
    sharded = cfg.processes > 1 and (
        cfg.shard == "on" or (cfg.shard == "auto" and state > memory / 2)
    )
    if sharded:
        # FSDP2: each process keeps 1/N of parameters, gradients, AdamW and EMA, and gathers
        # whole the root unit (stem, norm, heads) and two blocks at a time (one computing, one
        # prefetched), with their full gradients before the reduce-scatter
        n = cfg.processes
        block = 4 * sum(p.numel() for p in encoder.blocks[0].parameters())  # type: ignore[index]
        root = 4 * (encoder_params - depth * block // 4 + head_params)
        for key in ("parameters", "gradients", "optimizer", "ema"):
            nbytes[key] = -(-nbytes[key] // n)
        nbytes["gathered"] = 2 * (root + 2 * block)
        notes.append(
            f"--shard: FSDP2 over {n} processes; parameters, gradients, AdamW and EMA split "
            f"{n} ways, plus the root unit and two blocks gathered whole"
        )
    fixed = sum(nbytes.values())
    image = per_image + transient
    max_batch = max(0, (memory - fixed) // image) if image else 0
    flops = {
        "forward": float(two.forward_flops - one.forward_flops),
        "backward": float(two.backward_flops - one.backward_flops),
        "lookup": float(lookup_flops),
    }
    flops["total"] = flops["forward"] + flops["backward"] + flops["lookup"]
    gpus = []
    for name, peaks in GPUS.items():
        peak = peaks[cfg.precision] * 1e12
        step_s = flops["total"] * cfg.batch_size / (peak * cfg.mfu)
        gpus.append(GpuEstimate(name, peaks[cfg.precision], step_s, cfg.batch_size / step_s))
    plan = RefinePlan(
        model=cfg.model,
        arch=arch,
        objective=cfg.objective,
        blocks=list(blocks),
        views=[{"count": 2, "size": global_size}]
        + ([{"count": local_crops, "size": local_size}] if local_crops else []),
        batch_size=cfg.batch_size,
        precision=cfg.precision,
        grad_checkpointing=cfg.grad_checkpointing,
        encoder_params=encoder_params,
        head_params=head_params,
        head_widths=asdict(widths),
        queue_size=qsize,
        bytes=nbytes,
        activation_bytes_per_view=per_view,
        activation_bytes_per_image=per_image,
        transient_bytes_per_image=transient,
        fixed_bytes=fixed,
        total_bytes=fixed + cfg.batch_size * image,
        device_memory=memory,
        max_batch=int(max_batch),
        flops_per_image=flops,
        gpus=gpus,
        mfu=cfg.mfu,
        notes=notes,
        sharded=sharded,
        processes=cfg.processes,
        compile=cfg.compile,
    )
    if cfg.out is not None:
        cfg.out.mkdir(parents=True, exist_ok=True)
        path = cfg.out / PLAN_FILE
        plan.path = str(path)
        write_json(path, asdict(plan))
    return plan


def nna_step(
    encoder: nn.Module,
    heads: HeadEnsemble,
    blocks: Sequence[int],
    head_input: str,
    view_sizes: Sequence[int],
    loss_kind: str,
    tau: float,
    neighbours: Callable[[int, Tensor], Tensor] | None = None,
    phases: Phases | None = None,
) -> Callable[[int], Tensor]:
    """The forward of ``NNAObjective.step`` on random images of ``view_sizes`` (2 global first),
    as a function of the batch; returns the summed loss. ``neighbours(block, z)`` gives the
    ``(B, D)`` queue neighbours of global targets ``z``; by default an empty stand-in (the real
    look-up's ``nonzero`` cannot run on fake tensors). ``phases`` is told which part runs."""
    tag = phases or Phases()

    def step(batch: int) -> Tensor:
        imgs = [torch.randn(batch, 3, s, s) for s in view_sizes]
        tag.current = "global"
        feats = block_features(encoder, torch.cat(imgs[:2]), blocks, head_input)
        if len(view_sizes) > 2:
            tag.current = "local"
            local = block_features(encoder, torch.cat(imgs[2:]), blocks, head_input)
            feats = {k: torch.cat([feats[k], local[k]]) for k in feats}
        tag.current = "heads"
        total = torch.zeros(())
        for block in blocks:
            z, p = heads.head(block)(feats[block])
            z, p = z.float(), p.float()
            zg = [z[:batch], z[batch : 2 * batch]]
            with torch.no_grad():
                nn_g = [
                    neighbours(block, t.detach()) if neighbours else torch.empty_like(t) for t in zg
                ]
            p_views = [p[i * batch : (i + 1) * batch] for i in range(len(view_sizes))]
            loss, _ = multiview_loss(zg, nn_g, p_views, tau, kind=loss_kind)
            total = total + loss
        return total

    return step


def _block_saved(encoder: nn.Module, size: int, params: Sequence[Tensor], precision: str) -> int:
    """Saved bytes of one block for one image of ``size`` pixels."""
    blk = encoder.blocks[0]  # type: ignore[index]
    dim = int(encoder.embed_dim)  # type: ignore[arg-type]
    n = _tokens(encoder, size)

    def run(batch: int) -> Tensor:
        x = torch.empty(batch, n, dim, requires_grad=True)
        return blk(x).float().sum()

    return (
        trace(lambda: run(2), params, precision).saved_bytes
        - trace(lambda: run(1), params, precision).saved_bytes
    )


def planned_seconds(
    plan: dict[str, Any], device_name: str, steps: int, batch_size: int
) -> float | None:
    """Wall time of ``steps`` steps of a global ``batch_size`` on the GPU ``device_name`` (as
    torch names it, e.g. "NVIDIA H100 80GB HBM3") from a plan.json: the planned step time of
    the GPU whose model number it names, scaled from the plan's per-process batch; None when
    the plan has no such GPU."""
    words = set(device_name.replace("-", " ").upper().split())
    per_process = batch_size / max(1, int(plan.get("processes", 1)))
    for gpu in plan.get("gpus", []):
        model = str(gpu.get("gpu", "")).split()[0].upper()
        if model in words and plan.get("batch_size"):
            return float(gpu["step_s"]) * per_process / float(plan["batch_size"]) * steps
    return None


def gib(n: float) -> float:
    return n / GIB


def human(n: float) -> str:
    """Bytes as GiB or MiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def tflop(n: float) -> str:
    return f"{n / 1e9:.1f} GFLOP" if n < 1e12 else f"{n / 1e12:.2f} TFLOP"
