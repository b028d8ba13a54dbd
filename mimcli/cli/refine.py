"""``mimcli refine``: MIM-Refiner with NNA heads, neighbour queues, head warm-up and EMA, or one
of the other objectives of the family (``--objective``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mimcli.cli._common import (
    DATA,
    HEADS_HELP,
    MAX_SEED,
    OUTPUT,
    RUNTIME,
    SOURCES_HELP,
    BackendOpt,
    DeviceOpt,
    ForceUnlockOpt,
    ImageColumnOpt,
    ImageProgress,
    LabelColumnOpt,
    NumHeadsOpt,
    TrackerOpt,
    WorkersOpt,
    count_or_auto,
    handle_errors,
    number_range,
    print_json,
    show_notes,
    stderr,
    stdout,
)

if TYPE_CHECKING:
    from rich.table import Table

    from mimcli.refine.plan import RefinePlan

HELP = (
    "Refine a MIM encoder with MIM-Refiner: ID heads on late blocks trained with Nearest "
    "Neighbour Alignment against per-head neighbour queues; a head warm-up with the encoder "
    "frozen, then full refinement with layer-wise lr decay; the EMA encoder is exported in "
    "timm's layout to RUN_DIR/export.\n\n"
    "Other objectives (--objective): nnclr (MAE-CT: one NNCLR head on the last block, EMA "
    "projector queue, first half frozen), mimco (MimCo: masked student vs a frozen contrastive "
    "--teacher, patch + image InfoNCE), conmim (ConMIM: masked weak view vs a momentum encoder's "
    "strong view, per-patch InfoNCE), mrmae (MR-MAE: visible tokens mimic frozen --teacher "
    "features + MAE pixel reconstruction through the model's decoder). Options left unset take "
    "the objective's documented defaults (recorded in RUN_DIR/config.json).\n\n"
    "Steps override epochs. Learning rates are base rates × batch/256. Run under `torchrun "
    "--nproc_per_node N` for several processes (NCCL on GPU, gloo on CPU)."
)

OBJECTIVE = "Objective"
HEADS = "Heads and queue"
SCHEDULE = "Schedule"
VIEWS = "Views"
AUGMENTATION = "Augmentation"
MRMAE = "MR-MAE (--objective mrmae)"
MONITOR = "k-NN monitoring"
PLAN = "Plan (--plan: no training)"

EPILOG = (
    """\
Examples:

  mimcli refine vit_large_patch16_224.mae --data in1k/train --out runs/mae-l \\
    --blocks 17-24 --head-epochs 20 --epochs 20 --batch-size 1024

  mimcli refine examples/models/fmnist-mae-tiny --data data/fmnist/train \\
    --out runs/tiny --blocks last4 --head-steps 30 --steps 120 --local-crops 2

  mimcli refine ... --out runs/tiny --resume     (from the last checkpoint)

  mimcli refine vit_large_patch16_224.mae --data in1k/train --out runs/plan \\
    --plan --batch-size 96     (memory and speed; writes RUN_DIR/plan.json)

  mimcli refine examples/models/fmnist-mae-tiny --objective nnclr \\
    --data data/fmnist/train --out runs/tiny-nnclr --head-steps 30 --steps 90

  mimcli refine examples/models/fmnist-mae-tiny --objective conmim \\
    --data data/fmnist/train --out runs/tiny-conmim --head-steps 30 --steps 90

  mimcli refine examples/models/fmnist-mae-tiny --objective mimco \\
    --teacher runs/tiny/export --data data/fmnist/train --out runs/tiny-mimco

  mimcli refine examples/models/fmnist-mae-tiny --objective mrmae \\
    --teacher runs/tiny/export --data data/fmnist/train --out runs/tiny-mrmae

--num-heads is for MODEL only; a --teacher takes #heads=N.
"""
    + HEADS_HELP
    + SOURCES_HELP
)


@handle_errors
def refine(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model to refine (same forms as probe).")],
    data: Annotated[
        str,
        typer.Option(
            "--data", help="Training images: folder, dataset or shards.", rich_help_panel=DATA
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Run folder (config, metrics, checkpoint).", rich_help_panel=OUTPUT
        ),
    ],
    num_heads: NumHeadsOpt = None,
    objective: Annotated[
        str,
        typer.Option(
            "--objective", help="nna, nnclr, mimco, conmim or mrmae.", rich_help_panel=OBJECTIVE
        ),
    ] = "nna",
    teacher: Annotated[
        list[str] | None,
        typer.Option(
            "--teacher",
            help="Frozen teacher MODEL, any MODEL form (downloads once).\n\n"
            "mimco: one; default vit_small_patch16_224.dino.\n\n"
            "mrmae: repeatable; default vit_base_patch16_clip_224.openai + "
            "vit_base_patch16_224.dino.",
            rich_help_panel=OBJECTIVE,
        ),
    ] = None,
    blocks: Annotated[
        str | None,
        typer.Option(
            "--blocks",
            help="auto (probe.json or last third), lastN, or 17,20,24.",
            rich_help_panel=HEADS,
        ),
    ] = None,
    probe: Annotated[
        Path | None,
        typer.Option(
            "--probe", help="probe.json whose recommendation auto uses.", rich_help_panel=HEADS
        ),
    ] = None,
    head_epochs: Annotated[
        float,
        typer.Option(
            "--head-epochs",
            callback=number_range(0, 1e6, lo_open=True),
            help="Head warm-up epochs.",
            rich_help_panel=SCHEDULE,
        ),
    ] = 20.0,
    head_steps: Annotated[
        int | None,
        typer.Option(
            "--head-steps",
            min=0,
            help="Head warm-up steps (overrides epochs).",
            rich_help_panel=SCHEDULE,
        ),
    ] = None,
    epochs: Annotated[
        float,
        typer.Option(
            "--epochs",
            callback=number_range(0, 1e6, lo_open=True),
            help="Refinement epochs.",
            rich_help_panel=SCHEDULE,
        ),
    ] = 20.0,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            min=0,
            help="Refinement steps (overrides epochs).",
            rich_help_panel=SCHEDULE,
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="Use a seeded subset of --data.", rich_help_panel=DATA),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", min=2, help="Global batch.", rich_help_panel=SCHEDULE),
    ] = 256,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            callback=number_range(0),
            help="Refinement base lr (× batch/256); nnclr 2e-4, mrmae 1.5e-4, others 4e-4.",
            rich_help_panel=SCHEDULE,
        ),
    ] = None,
    head_lr: Annotated[
        float,
        typer.Option(
            "--head-lr",
            callback=number_range(0),
            help="Warm-up base lr (× batch/256).",
            rich_help_panel=SCHEDULE,
        ),
    ] = 2e-4,
    warmup: Annotated[
        float,
        typer.Option(
            "--warmup",
            callback=number_range(0, 1),
            help="Refinement lr warm-up fraction.",
            rich_help_panel=SCHEDULE,
        ),
    ] = 0.2,
    head_warmup: Annotated[
        float,
        typer.Option(
            "--head-warmup",
            callback=number_range(0, 1),
            help="Head-stage lr warm-up fraction.",
            rich_help_panel=SCHEDULE,
        ),
    ] = 0.2,
    layer_decay: Annotated[
        float,
        typer.Option(
            "--layer-decay",
            callback=number_range(0, 1, lo_open=True),
            help="Layer-wise lr decay.",
            rich_help_panel=SCHEDULE,
        ),
    ] = 0.65,
    weight_decay: Annotated[
        float,
        typer.Option(
            "--weight-decay",
            callback=number_range(0),
            help="Encoder weight decay.",
            rich_help_panel=SCHEDULE,
        ),
    ] = 0.05,
    local_crops: Annotated[
        int | None,
        typer.Option(
            "--local-crops",
            min=0,
            max=64,
            help="Local crops per image (nna: 10, nnclr: 0).",
            rich_help_panel=VIEWS,
        ),
    ] = None,
    photometric: Annotated[
        bool | None,
        typer.Option(
            "--photometric/--no-photometric",
            help="Colour jitter, blur, grayscale and solarize on the views (nnclr: off).",
            rich_help_panel=AUGMENTATION,
        ),
    ] = None,
    global_scale: Annotated[
        str,
        typer.Option(
            "--global-scale", help="Area range of global crops, lo,hi.", rich_help_panel=VIEWS
        ),
    ] = "0.25,1.0",
    local_scale: Annotated[
        str,
        typer.Option(
            "--local-scale", help="Area range of local crops, lo,hi.", rich_help_panel=VIEWS
        ),
    ] = "0.05,0.25",
    pos_embed_resize: Annotated[
        str | None,
        typer.Option(
            "--pos-embed-resize",
            help="Position table on small views: bicubic (official) or bicubic-antialias "
            "(timm's). Default: bicubic; a resumed run keeps its own.",
            rich_help_panel=VIEWS,
            show_default=False,
        ),
    ] = None,
    head_width: Annotated[
        str,
        typer.Option(
            "--head-width",
            callback=count_or_auto(65536, lo=8, words=("auto", "paper")),
            help="auto (paper sizes for wide models) or N.",
            rich_help_panel=HEADS,
        ),
    ] = "auto",
    head_input: Annotated[
        str | None,
        typer.Option(
            "--head-input",
            help="cls or patch (mean patch token); nnclr: patch.",
            rich_help_panel=HEADS,
        ),
    ] = None,
    queue_size: Annotated[
        str,
        typer.Option(
            "--queue-size",
            callback=count_or_auto(2**24),
            help="auto = min(65536, images) or N.",
            rich_help_panel=HEADS,
        ),
    ] = "auto",
    topk: Annotated[
        int,
        typer.Option(
            "--topk", min=1, help="Refinement samples among top-k NNs.", rich_help_panel=HEADS
        ),
    ] = 20,
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temperature",
            help="Loss tau; nna 0.2/0.3 by width, nnclr 0.15-0.3, mimco 0.2, conmim 0.1.",
            rich_help_panel=OBJECTIVE,
        ),
    ] = None,
    mask_ratio: Annotated[
        float | None,
        typer.Option(
            "--mask-ratio",
            help="Masked patches: mimco 0.6, conmim 0.4, mrmae 0.75.",
            rich_help_panel=OBJECTIVE,
        ),
    ] = None,
    momentum: Annotated[
        float | None,
        typer.Option(
            "--momentum",
            help="EMA target momentum: nnclr projector 0.99, conmim encoder 0.996 (-> 1).",
            rich_help_panel=OBJECTIVE,
        ),
    ] = None,
    image_weight: Annotated[
        float | None,
        typer.Option(
            "--image-weight",
            help="mimco: weight of the image-level loss.",
            rich_help_panel=OBJECTIVE,
        ),
    ] = None,
    mimic_weight: Annotated[
        float | None,
        typer.Option("--mimic-weight", help="Weight of the mimic loss.", rich_help_panel=MRMAE),
    ] = None,
    reconstruction: Annotated[
        bool,
        typer.Option(
            "--reconstruction/--no-reconstruction",
            help="Keep the MAE pixel loss.",
            show_default="on",
            rich_help_panel=MRMAE,
        ),
    ] = True,
    decoder: Annotated[
        Path | None,
        typer.Option(
            "--decoder",
            help="MAE decoder: decoder.safetensors, a folder holding one, or an MAE _full .pth "
            "(default: shipped with MODEL, else a fresh one).",
            rich_help_panel=MRMAE,
        ),
    ] = None,
    ema: Annotated[
        float,
        typer.Option(
            "--ema",
            callback=number_range(0, 1, hi_open=True),
            help="EMA decay of the encoder, reached gradually: min(ema, 1-(1+step)^-2/3) "
            "(logged as ema_decay).",
            rich_help_panel=SCHEDULE,
        ),
    ] = 0.9999,
    export: Annotated[
        str, typer.Option("--export", help="Export ema or raw weights.", rich_help_panel=OUTPUT)
    ] = "ema",
    freeze_blocks: Annotated[
        int | None,
        typer.Option(
            "--freeze-blocks",
            min=0,
            max=1024,
            help="Freeze the stem and first K blocks (nnclr: half).",
            rich_help_panel=SCHEDULE,
        ),
    ] = None,
    val: Annotated[
        str | None,
        typer.Option("--val", help="Labelled images: k-NN monitoring.", rich_help_panel=MONITOR),
    ] = None,
    val_every: Annotated[
        int,
        typer.Option(
            "--val-every",
            min=0,
            help="k-NN every N steps (0: stage ends).",
            rich_help_panel=MONITOR,
        ),
    ] = 0,
    val_limit: Annotated[
        int | None,
        typer.Option("--val-limit", min=1, help="Images per k-NN set.", rich_help_panel=MONITOR),
    ] = 5000,
    checkpoint_every: Annotated[
        int,
        typer.Option(
            "--checkpoint-every",
            min=1,
            help="Checkpoint every N steps.",
            rich_help_panel=OUTPUT,
        ),
    ] = 50,
    checkpoint_minutes: Annotated[
        float,
        typer.Option(
            "--checkpoint-minutes",
            min=0,
            help="Also checkpoint when N minutes have passed since the last (0: off).",
            rich_help_panel=OUTPUT,
        ),
    ] = 15.0,
    no_keep_previous: Annotated[
        bool,
        typer.Option(
            "--no-keep-previous",
            help="Keep only the last checkpoint (half the disk; no fallback for --resume).",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    log_every: Annotated[
        int,
        typer.Option(
            "--log-every",
            min=1,
            help="Log metrics (means) every N steps.",
            rich_help_panel=OUTPUT,
        ),
    ] = 10,
    trackers: TrackerOpt = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out (unset options: the run's).",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    force_unlock: ForceUnlockOpt = False,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            min=0,
            max=MAX_SEED,
            help="Seed of init, batch order, views and subsets.",
            rich_help_panel=RUNTIME,
        ),
    ] = 0,
    device: DeviceOpt = "auto",
    num_workers: WorkersOpt = "auto",
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    knn_backend: BackendOpt = "auto",
    grad_clip: Annotated[
        float | None,
        typer.Option(
            "--grad-clip",
            callback=number_range(0, lo_open=True),
            help="Clip the gradient norm.",
            rich_help_panel=SCHEDULE,
        ),
    ] = None,
    grad_checkpointing: Annotated[
        bool,
        typer.Option(
            "--grad-checkpointing",
            help="Activation checkpointing (less memory).",
            rich_help_panel=RUNTIME,
        ),
    ] = False,
    shard: Annotated[
        str,
        typer.Option(
            "--shard",
            help="FSDP2 under torchrun: on, off (DDP), auto (when the state > half a GPU).",
            rich_help_panel=RUNTIME,
        ),
    ] = "auto",
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            min=1,
            help="Processes (GPUs) to plan for; default $WORLD_SIZE, else 1.",
            rich_help_panel=PLAN,
            show_default=False,
        ),
    ] = None,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile/--eager",
            help="torch.compile the blocks and heads (slow first steps).",
            rich_help_panel=RUNTIME,
        ),
    ] = False,
    augment_on: Annotated[
        str,
        typer.Option(
            "--augment-on",
            help="cpu: views made in the data workers; device: workers only decode, crops and "
            "colour ops run batched on the GPU (nna, nnclr).",
            rich_help_panel=RUNTIME,
        ),
    ] = "cpu",
    probe_train: Annotated[
        str | None,
        typer.Option(
            "--probe-train", help="With --probe-val: probe now for auto.", rich_help_panel=HEADS
        ),
    ] = None,
    probe_val: Annotated[
        str | None,
        typer.Option(
            "--probe-val", help="With --probe-train: probe now for auto.", rich_help_panel=HEADS
        ),
    ] = None,
    plan: Annotated[
        bool,
        typer.Option(
            "--plan",
            help="Print memory and speed of a step; write plan.json; no training, --data not read.",
            rich_help_panel=PLAN,
        ),
    ] = False,
    device_memory: Annotated[
        float | None,
        typer.Option(
            "--device-memory",
            min=0.1,
            callback=number_range(0.1),
            help="GiB per process; default the local GPU's, else 80.",
            rich_help_panel=PLAN,
            show_default=False,
        ),
    ] = None,
    mfu: Annotated[
        float,
        typer.Option(
            "--mfu",
            min=0.01,
            max=1.0,
            callback=number_range(0.01, 1),
            help="Model FLOPs utilisation.",
            rich_help_panel=PLAN,
        ),
    ] = 0.4,
    precision: Annotated[
        str,
        typer.Option("--precision", help="bf16 or fp32 (--plan only).", rich_help_panel=PLAN),
    ] = "bf16",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON.", rich_help_panel=OUTPUT)
    ] = False,
) -> None:
    from dataclasses import asdict, fields

    if plan:
        from mimcli.refine.plan import PlanConfig, plan_refine

        world = processes or max(1, int(os.environ.get("WORLD_SIZE", "1")))
        result_plan = plan_refine(
            PlanConfig(
                model=model,
                out=out,
                num_heads=num_heads,
                objective=objective,
                blocks=blocks,
                probe=probe,
                head_width=head_width,
                head_input=head_input,
                local_crops=local_crops,
                freeze_blocks=freeze_blocks,
                batch_size=max(1, batch_size // world),
                precision=precision,
                grad_checkpointing=grad_checkpointing,
                shard=shard,
                processes=world,
                compile=compile,
                queue_size=queue_size,
                device_memory_gib=device_memory,
                mfu=mfu,
            )
        )
        show_notes()
        if as_json:
            print_json(asdict(result_plan))
        else:
            stdout.print(plan_table(result_plan))
        return

    from mimcli.datasources import data_spec
    from mimcli.refine.config import RefineConfig, RefineStart
    from mimcli.refine.pipeline import run_refine

    cfg = RefineConfig(
        model=model,
        data=data_spec(data),
        out=out,
        objective=objective,
        num_heads=num_heads,
        teacher=list(teacher or []),
        blocks=blocks,
        probe=probe,
        head_epochs=head_epochs,
        head_steps=head_steps,
        epochs=epochs,
        steps=steps,
        limit=limit,
        batch_size=batch_size,
        lr=lr,
        head_lr=head_lr,
        warmup=warmup,
        head_warmup=head_warmup,
        layer_decay=layer_decay,
        weight_decay=weight_decay,
        local_crops=local_crops,
        photometric=photometric,
        global_scale=parse_scale(global_scale, "--global-scale"),
        local_scale=parse_scale(local_scale, "--local-scale"),
        pos_embed_resize=pos_embed_resize,
        head_width=head_width,
        head_input=head_input,
        queue_size=queue_size,
        topk=topk,
        temperature=temperature,
        mask_ratio=mask_ratio,
        momentum=momentum,
        image_weight=image_weight,
        mimic_weight=mimic_weight,
        reconstruction=reconstruction,
        decoder=decoder,
        ema=ema,
        export=export,
        freeze_blocks=freeze_blocks,
        val=data_spec(val),
        val_every=val_every,
        val_limit=val_limit,
        checkpoint_every=checkpoint_every,
        checkpoint_minutes=checkpoint_minutes,
        keep_previous=not no_keep_previous,
        log_every=log_every,
        trackers=list(trackers or []),
        resume=resume,
        force_unlock=force_unlock,
        seed=seed,
        device=device,
        num_workers=num_workers,
        image_column=image_column,
        label_column=label_column,
        knn_backend=knn_backend,
        grad_clip=grad_clip,
        grad_checkpointing=grad_checkpointing,
        shard=shard,
        compile=compile,
        augment_on=augment_on,
        probe_train=data_spec(probe_train),
        probe_val=data_spec(probe_val),
    )
    # on --resume, options not given here come from the run's config.json
    given = {f.name for f in fields(cfg) if _given(ctx, f.name)}

    def announce(start: RefineStart) -> None:
        show_notes()
        for flag in start.ignored_flags:
            stderr.print(
                f"warning: {flag} is not used by --objective {start.objective}; ignored",
                markup=False,
                highlight=False,
            )
        blocks = f"blocks {start.blocks} ({start.blocks_reason}); " if start.uses_blocks else ""
        stderr.print(
            f"{start.objective}: {start.summary}; {blocks}{steps_text(start.steps)} "
            f"({start.steps_per_epoch}/epoch); lr {start.lr:.2e}, head lr {start.head_lr:.2e}; "
            f"views {start.views}; {start.device}, {start.precision}, {start.world_size} "
            "process(es)" + (f"; {start.shard}" if start.shard else ""),
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        if start.planned:
            stderr.print(start.planned, markup=False, highlight=False)

    bar = ImageProgress(show_loss=True)
    with bar.running():
        result = run_refine(cfg, progress=bar, on_start=announce, given=given)
    if as_json:
        print_json({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()})
        return
    what = (
        f"blocks {','.join(map(str, result.blocks))} ({result.blocks_reason})"
        if result.blocks
        else "the whole encoder"
    )
    stdout.print(
        f"Refined {what} with {result.objective}", markup=False, highlight=False, soft_wrap=True
    )
    took = f"{result.seconds / 60:.1f} min" if result.seconds >= 60 else f"{result.seconds:.0f} s"
    stdout.print(
        f"{steps_text(result.steps)}, final loss {result.final_loss:.4f}, {took}",
        markup=False,
        soft_wrap=True,
    )
    if result.knn and result.best_knn:
        last, best = result.knn[-1], result.best_knn
        stdout.print(
            f"k-NN (k=20) last, step {last['step']}: EMA CLS {last['knn_ema_cls']:.2f} / patch "
            f"{last['knn_ema_patch']:.2f}; best EMA CLS {best['knn_ema_cls']:.2f} at step "
            f"{best['step']}",
            markup=False,
            soft_wrap=True,
        )
    stdout.print(f"Exported encoder: {result.export_dir}", markup=False, soft_wrap=True)


def plan_table(plan: RefinePlan) -> Table:
    """What one step costs: fixed bytes, bytes per image, the batch that fits, FLOPs, speed."""
    from rich.table import Table

    from mimcli.refine.plan import human, tflop

    views = " + ".join(f"{v['count']}×{v['size']}" for v in plan.views)
    table = Table(
        title=f"refine --plan: {plan.arch}, {len(plan.blocks)} heads, views {views}",
        caption=f"{plan.precision}, batch {plan.batch_size} per process"
        + (", grad checkpointing" if plan.grad_checkpointing else "")
        + (f", sharded over {plan.processes} processes" if plan.sharded else "")
        + (", compiled (memory measured eager)" if plan.compile else "")
        + f"; MFU {plan.mfu:g}",
    )
    table.add_column("item")
    table.add_column("value", justify="right")
    for key, value in plan.bytes.items():
        table.add_row(key.replace("_", " "), human(value))
    table.add_row("fixed, total", human(plan.fixed_bytes))
    for size, value in plan.activation_bytes_per_view.items():
        table.add_row(f"activations per {size}-px view", human(value))
    table.add_row("activations per image", human(plan.activation_bytes_per_image))
    table.add_row("backward transient per image", human(plan.transient_bytes_per_image))
    table.add_row(f"total at batch {plan.batch_size}", human(plan.total_bytes))
    table.add_row(
        f"largest batch in {human(plan.device_memory)}", str(plan.max_batch), style="bold"
    )
    table.add_row("FLOPs per image (fwd + bwd)", tflop(plan.flops_per_image["total"]))
    for gpu in plan.gpus:
        table.add_row(
            f"{gpu.gpu} ({gpu.peak_tflops:g} TFLOP/s)",
            (f"{gpu.step_s:.2f} s" if gpu.step_s >= 1 else f"{gpu.step_s * 1e3:.1f} ms")
            + f"/step, {gpu.images_per_s:,.0f} img/s",
        )
    if plan.path:
        table.add_row("written", plan.path)
    return table


def steps_text(steps: dict[str, int]) -> str:
    return f"{steps.get('heads', 0)} head warm-up + {steps.get('refine', 0)} refinement steps"


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was set on the command line (or by an environment variable)."""
    source = ctx.get_parameter_source(name)  # typer's own click copy: compare by name
    return source is not None and source.name != "DEFAULT"


def parse_scale(text: str, flag: str) -> tuple[float, float]:
    from mimcli.errors import MimcliError

    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise MimcliError(f"{flag} {text!r}: expected two numbers like 0.25,1.0") from exc
    if not 0 < lo <= hi <= 1:
        raise MimcliError(f"{flag} {text!r}: need 0 < lo <= hi <= 1")
    return lo, hi
