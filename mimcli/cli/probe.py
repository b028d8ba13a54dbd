"""``mimcli probe``: k-NN quality after every block, and where the ID heads should go."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mimcli.blocks import parse_blocks
from mimcli.cli._common import (
    DATA,
    HEADS_HELP,
    MAX_SEED,
    OUTPUT,
    RUNTIME,
    SOURCES_HELP,
    BackendOpt,
    BadImageOpt,
    BatchSizeOpt,
    CropPctOpt,
    DeviceOpt,
    ImageColumnOpt,
    ImageProgress,
    ImgSizeOpt,
    InterpolationOpt,
    JsonOpt,
    LabelColumnOpt,
    MeanOpt,
    NumHeadsOpt,
    StdOpt,
    WorkersOpt,
    handle_errors,
    number_range,
    print_json,
    stderr,
    stdout,
    transform_overrides,
)

HELP = (
    "Measure k-NN accuracy after every transformer block and recommend ID-head blocks.\n\n"
    "All blocks are tapped in one forward pass. Features are standardised with the train set's "
    "mean/std and L2-normalised; each of the k nearest train images votes exp(sim/tau) for its "
    "class. CLS and mean-patch features are scored separately; blocks are counted from 1."
)

KNN = "k-NN"
HEADS = "Head recommendation"

EPILOG = (
    """\
Examples:

  mimcli probe vit_large_patch16_224.mae --train in1k/train --val in1k/val \\
      --limit-train 50000 --out runs/probe-mae-l

  mimcli probe examples/models/fmnist-mae-tiny --train data/fmnist/train \\
      --val data/fmnist/test --json

  mimcli probe ckpt/vit_w512.pth#heads=8 --train data/train --val data/val

MODEL: a timm name with a pretrained tag, hf-hub:owner/repo, a folder (timm or transformers \
data2vec-vision layout), a checkpoint file (MAE .pth, data2vec 2.0 .pt, MIM-Refiner/MAE-CT .th, \
timm .safetensors), an http(s) URL of such a file, or mim-refiner:NAME, a model the MIM-Refiner \
paper released (mae_refined_l16, d2v2_refined_h14, ...; downloaded once, resumable).
"""
    + HEADS_HELP
    + SOURCES_HELP
)


@handle_errors
def probe(
    model: Annotated[str, typer.Argument(help="Model to probe (see below for the forms).")],
    train: Annotated[
        str,
        typer.Option("--train", help="Labelled images: k-NN memory.", rich_help_panel=DATA),
    ],
    val: Annotated[
        str,
        typer.Option("--val", help="Labelled images: k-NN queries.", rich_help_panel=DATA),
    ],
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    num_heads: NumHeadsOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for probe.json and probe.png.", rich_help_panel=OUTPUT),
    ] = None,
    k: Annotated[
        int, typer.Option("--k", min=1, help="Neighbours that vote.", rich_help_panel=KNN)
    ] = 10,
    tau: Annotated[
        float,
        typer.Option(
            "--tau",
            callback=number_range(0, lo_open=True),
            help="Vote temperature: weight exp(sim/tau).",
            rich_help_panel=KNN,
        ),
    ] = 0.07,
    blocks: Annotated[
        str | None,
        typer.Option(
            "--blocks",
            help="Blocks to keep, from 1: e.g. 9-12 (default all).",
            rich_help_panel=KNN,
        ),
    ] = None,
    limit_train: Annotated[
        int | None,
        typer.Option(
            "--limit-train",
            min=1,
            help="Probe on a class-balanced subset.",
            rich_help_panel=DATA,
        ),
    ] = None,
    limit_val: Annotated[
        int | None,
        typer.Option(
            "--limit-val",
            min=1,
            help="Class-balanced subset of --val.",
            rich_help_panel=DATA,
        ),
    ] = None,
    batch_size: BatchSizeOpt = 64,
    num_workers: WorkersOpt = "auto",
    device: DeviceOpt = "auto",
    knn_backend: BackendOpt = "auto",
    on_bad_image: BadImageOpt = "skip",
    feature_dtype: Annotated[
        str,
        typer.Option(
            "--feature-dtype",
            help="Stored features: float16 or float32.",
            rich_help_panel=RUNTIME,
        ),
    ] = "float16",
    margin: Annotated[
        float,
        typer.Option(
            "--margin",
            callback=number_range(0, 100),
            help="Heads start at the first block this close to the peak.",
            rich_help_panel=HEADS,
        ),
    ] = 1.0,
    max_heads: Annotated[
        int,
        typer.Option(
            "--max-heads", min=1, max=1024, help="At most this many heads.", rich_help_panel=HEADS
        ),
    ] = 8,
    min_heads: Annotated[
        int,
        typer.Option(
            "--min-heads", min=1, max=1024, help="At least this many heads.", rich_help_panel=HEADS
        ),
    ] = 4,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            min=0,
            max=MAX_SEED,
            help="Seed of the --limit-* subsets.",
            rich_help_panel=DATA,
        ),
    ] = 0,
    img_size: ImgSizeOpt = None,
    crop_pct: CropPctOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    interpolation: InterpolationOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure k-NN accuracy after every transformer block and recommend ID-head blocks."""
    from mimcli.datasources import data_spec
    from mimcli.errors import MimcliError
    from mimcli.features import FEATURE_DTYPES
    from mimcli.probe import ProbeConfig, run_probe
    from mimcli.report.tables import probe_table

    if feature_dtype not in FEATURE_DTYPES:
        raise MimcliError(f"--feature-dtype must be one of {', '.join(FEATURE_DTYPES)}")
    cfg = ProbeConfig(
        model=model,
        train=data_spec(train),
        val=data_spec(val),
        out=out,
        num_heads=num_heads,
        k=k,
        tau=tau,
        blocks=parse_blocks(blocks),
        limit_train=limit_train,
        limit_val=limit_val,
        batch_size=batch_size,
        num_workers=num_workers,
        image_column=image_column,
        label_column=label_column,
        device=device,
        knn_backend=knn_backend,
        on_bad_image=on_bad_image,
        feature_dtype=feature_dtype,
        margin=margin,
        max_heads=max_heads,
        min_heads=min_heads,
        seed=seed,
        transform_overrides=transform_overrides(img_size, crop_pct, mean, std, interpolation),
    )
    bar = ImageProgress()
    with bar.running():
        result = run_probe(cfg, progress=bar)
    if result.skipped_images:
        shown = ", ".join(result.skipped_images[:3])
        stderr.print(
            f"warning: skipped {len(result.skipped_images)} unreadable image(s): {shown}",
            markup=False,
        )
    if as_json:
        print_json(result.to_dict())
        return
    stdout.print(probe_table(result))
    rec = result.recommendation
    stdout.print(f"Recommended ID-head blocks: [bold]{','.join(map(str, rec.blocks))}[/]")
    stdout.print(f"  rule: {rec.rule}", highlight=False, markup=False)
    if out is not None:
        stdout.print(f"Wrote {out / 'probe.json'} and {out / 'probe.png'}", markup=False)
