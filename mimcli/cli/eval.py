"""``mimcli eval``: k-NN, linear probe, low-shot and clustering, models side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mimcli.cli._common import (
    DATA,
    HEADS_HELP,
    MAX_HEADS_OPTION,
    MAX_SEED,
    MODEL,
    OUTPUT,
    RUNTIME,
    SOURCES_HELP,
    BackendOpt,
    BatchSizeOpt,
    DeviceOpt,
    ImageColumnOpt,
    ImageProgress,
    JsonOpt,
    LabelColumnOpt,
    TrackerOpt,
    WorkersOpt,
    handle_errors,
    number_range,
    print_json,
    stdout,
)

HELP = (
    "Evaluate frozen features of one or more models with the paper's protocols: weighted k-NN "
    "(CLS and mean patch, several k), a linear-probe grid, 1/2/5-shot and 1% logistic regression "
    "over 3 seeded splits, and k-means clustering (ACC, NMI, AMI, ARI, silhouette, "
    "Davies-Bouldin). Features are cached per (model, folder, transform)."
)

PROTOCOLS = "Protocols"

EPILOG = (
    """\
Examples:

  mimcli eval examples/models/fmnist-mae-tiny runs/tiny \\
      --train data/fmnist/train --val data/fmnist/test --out runs/eval

  mimcli eval vit_large_patch16_224.mae --train in1k/train --val in1k/val \\
      --protocols knn,lowshot --json

  mimcli eval ckpt/vit_w512.pth#heads=8 vit_base_patch16_224.mae \\
      --train data/train --val data/val

  mimcli eval runs/mae-l --train in1k/train --val in1k/val \\
      --split-file 1percent.txt --split-file 1imgs_class.txt

  mimcli eval vit_large_patch16_224.mae runs/mae-l \\
      mim-refiner:mae_refined_l16 --train in1k/train --val in1k/val

A refine run folder (RUN_DIR) evaluates its exported encoder; mim-refiner:NAME is a model the \
MIM-Refiner paper released (the last example: base model, your run and the paper's result). \
--num-heads applies to every MODEL without its own #heads=N; a MODEL whose file records another \
count is refused.

A --split-file (SimCLRv2's 1percent.txt, MSN's 1imgs_class.txt) names train images one per line: \
a file name, or a path relative to the --train folder when the line holds a '/' (blank lines and \
# comments are skipped). Each file is scored like one seeded split and reported under its file \
name; --out/splits/ holds the seeded splits in the same format.
"""
    + HEADS_HELP
    + SOURCES_HELP
)


@handle_errors
def evaluate(
    models: Annotated[list[str], typer.Argument(help="Models or refine run folders.")],
    train: Annotated[
        str,
        typer.Option("--train", help="Labelled images (memory/fit).", rich_help_panel=DATA),
    ],
    val: Annotated[
        str,
        typer.Option("--val", help="Labelled images (queries/test).", rich_help_panel=DATA),
    ],
    num_heads: Annotated[
        int | None,
        typer.Option(
            "--num-heads",
            min=1,
            max=MAX_HEADS_OPTION,
            help="Attention heads of each MODEL with no count in its file or #heads=N.",
            rich_help_panel=MODEL,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Folder for results.json, plots, splits.", rich_help_panel=OUTPUT
        ),
    ] = None,
    save_heads: Annotated[
        Path | None,
        typer.Option(
            "--save-heads",
            help="Keep each model's best linear-probe head in DIR/<model>/ "
            "(head.safetensors + head.json; needs linear in --protocols).",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    protocols: Annotated[
        str,
        typer.Option(
            "--protocols",
            help="Comma list of knn, linear, lowshot, cluster.",
            show_default="all four",
            rich_help_panel=PROTOCOLS,
        ),
    ] = "knn,linear,lowshot,cluster",
    k: Annotated[
        str,
        typer.Option("--k", help="k values for k-NN, e.g. 10,20.", rich_help_panel=PROTOCOLS),
    ] = "10,20",
    tau: Annotated[
        float,
        typer.Option(
            "--tau",
            callback=number_range(0, lo_open=True),
            help="k-NN vote temperature.",
            rich_help_panel=PROTOCOLS,
        ),
    ] = 0.07,
    linear_epochs: Annotated[
        int,
        typer.Option(
            "--linear-epochs",
            min=1,
            max=10_000,
            help="Linear-probe epochs.",
            rich_help_panel=PROTOCOLS,
        ),
    ] = 20,
    cluster_features: Annotated[
        str,
        typer.Option(
            "--cluster-features",
            help="cls or patch (mean patch token).",
            rich_help_panel=PROTOCOLS,
        ),
    ] = "cls",
    split_files: Annotated[
        list[Path] | None,
        typer.Option(
            "--split-file",
            help="Low-shot subset of --train: one file name or relative path per line "
            "(SimCLRv2, MSN lists); repeatable.",
            rich_help_panel=PROTOCOLS,
        ),
    ] = None,
    limit_train: Annotated[
        int | None,
        typer.Option(
            "--limit-train", min=1, help="Class-balanced train subset.", rich_help_panel=DATA
        ),
    ] = None,
    limit_val: Annotated[
        int | None,
        typer.Option("--limit-val", min=1, help="Class-balanced val subset.", rich_help_panel=DATA),
    ] = None,
    no_cache: Annotated[
        bool,
        typer.Option("--no-cache", help="Recompute features.", rich_help_panel=RUNTIME),
    ] = False,
    batch_size: BatchSizeOpt = 128,
    num_workers: WorkersOpt = "auto",
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    device: DeviceOpt = "auto",
    knn_backend: BackendOpt = "auto",
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            min=0,
            max=MAX_SEED,
            help="Seed of the subsets, linear probes and k-means.",
            rich_help_panel=RUNTIME,
        ),
    ] = 0,
    trackers: TrackerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    from mimcli.datasources import data_spec
    from mimcli.errors import MimcliError
    from mimcli.evaluate.runner import EvalConfig, run_eval
    from mimcli.report.tables import eval_table

    parts = [x.strip() for x in k.split(",", 16)]
    if len(parts) > 16 or not all(p.isascii() and p.isdigit() and len(p) <= 6 for p in parts):
        raise MimcliError(f"--k {k!r}: expected 1 to 16 numbers like 10,20")
    ks = tuple(int(p) for p in parts)
    if not all(1 <= x <= 100_000 for x in ks):
        raise MimcliError(f"--k {k!r}: each k must lie in 1..100000")
    cfg = EvalConfig(
        models=list(models),
        train=data_spec(train),
        val=data_spec(val),
        out=out,
        num_heads=num_heads,
        protocols=tuple(p.strip() for p in protocols.split(",") if p.strip()),
        ks=ks,
        tau=tau,
        linear_epochs=linear_epochs,
        cluster_features=cluster_features,
        limit_train=limit_train,
        limit_val=limit_val,
        cache=not no_cache,
        batch_size=batch_size,
        num_workers=num_workers,
        image_column=image_column,
        label_column=label_column,
        device=device,
        knn_backend=knn_backend,
        seed=seed,
        split_files=tuple(split_files or ()),
        trackers=list(trackers or []),
        save_heads=save_heads,
    )
    bar = ImageProgress()
    with bar.running():
        result = run_eval(cfg, progress=bar)
    if as_json:
        print_json(result.to_dict())
        return
    stdout.print(eval_table(result))
    if out is not None:
        stdout.print(f"Wrote {out / 'results.json'} and plots in {out}", markup=False)
    if save_heads is not None:
        stdout.print(f"Wrote the linear-probe heads to {save_heads}", markup=False)
