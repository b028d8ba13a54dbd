"""``mimcli push``: publish a refine run as a timm-loadable Hugging Face repo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mimcli.cli._common import (
    OUTPUT,
    ForceUnlockOpt,
    JsonOpt,
    handle_errors,
    number_range,
    print_json,
    stderr,
    stdout,
)

HELP = (
    "Publish a refine run's encoder as a Hugging Face repo that "
    '`timm.create_model("hf-hub:OWNER/NAME", pretrained=True)` loads: model.safetensors (encoder '
    "weights only), config.json in timm's layout, a model card with the eval results and plots, "
    "and the run's configuration. The folder is written first, then uploaded as one commit; "
    "transient Hub errors are retried and pushing the same run again is safe.\n\n"
    "The token comes from HF_TOKEN or `hf auth login`; it is never printed or written."
)

REPO = "Hub repo"
CARD = "Model card"
RETRIES = "Retries"

EPILOG = """\
Examples:

  mimcli eval vit_large_patch16_224.mae runs/mae-l \\
      --train in1k/train --val in1k/val --out runs/mae-l/eval \\
      --save-heads runs/mae-l/eval/heads
  mimcli push runs/mae-l --repo my-name/vit-large-mae-refined

  mimcli push runs/tiny --dry-run --to runs/tiny/hub   (write the folder only)

  mimcli push runs/mae-l --repo my-org/mae-l-refined --private --create-pr

RUN_DIR/eval/results.json and RUN_DIR/probe/probe.json are picked up when present, and so is \
the refined model's linear-probe head in RUN_DIR/eval/heads/<run>/ (from eval's --save-heads, \
as above; or name one with --heads): the repo then holds \
head.safetensors + head.json and the card shows how to classify an image with them. Without \
--to, the folder is staged in RUN_DIR/.push and removed after the upload; it is rebuilt from the \
run each time (edit the card after pushing, or pass --to and upload it yourself).
"""


def _split(values: list[str] | None) -> list[str]:
    """Repeated and/or comma-separated option values."""
    return [v.strip() for value in values or () for v in value.split(",") if v.strip()]


@handle_errors
def push(
    run_dir: Annotated[Path, typer.Argument(help="A finished `mimcli refine` run folder.")],
    repo: Annotated[
        str | None,
        typer.Option(
            "--repo", help="Hub repo id, OWNER/NAME (or NAME for yours).", rich_help_panel=REPO
        ),
    ] = None,
    to: Annotated[
        Path | None,
        typer.Option(
            "--to",
            help="Keep the repo folder here (required with --dry-run).",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Only write the folder to --to; upload nothing.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    private: Annotated[
        bool, typer.Option("--private", help="Create the repo private.", rich_help_panel=REPO)
    ] = False,
    revision: Annotated[
        str | None,
        typer.Option(
            "--revision", help="Branch to push to (created if needed).", rich_help_panel=REPO
        ),
    ] = None,
    commit_message: Annotated[
        str | None,
        typer.Option("--commit-message", help="Commit title.", rich_help_panel=REPO),
    ] = None,
    create_pr: Annotated[
        bool,
        typer.Option(
            "--create-pr",
            help="Open a pull request against main instead of committing to it.",
            rich_help_panel=REPO,
        ),
    ] = False,
    eval_path: Annotated[
        Path | None,
        typer.Option(
            "--eval",
            help="results.json (or its folder) from `mimcli eval BASE RUN`.",
            rich_help_panel=CARD,
        ),
    ] = None,
    probe_path: Annotated[
        Path | None,
        typer.Option(
            "--probe",
            help="probe.json (or its folder) for the card plot.",
            rich_help_panel=CARD,
        ),
    ] = None,
    heads_path: Annotated[
        Path | None,
        typer.Option(
            "--heads",
            help="Linear-probe head to publish: a head folder or `eval --save-heads` DIR.",
            show_default="EVAL_DIR/heads/<run>",
            rich_help_panel=CARD,
        ),
    ] = None,
    license: Annotated[  # noqa: A002 - the Hub's field name
        str | None,
        typer.Option(
            "--license",
            help="Override the license inherited from the base model.",
            rich_help_panel=CARD,
        ),
    ] = None,
    dataset: Annotated[
        list[str] | None,
        typer.Option(
            "--dataset",
            help="Hub dataset id(s) the run used (repeat or comma-separate).",
            rich_help_panel=CARD,
        ),
    ] = None,
    tag: Annotated[
        list[str] | None,
        typer.Option(
            "--tag",
            help="Extra card tags (repeat or comma-separate).",
            rich_help_panel=CARD,
        ),
    ] = None,
    retries: Annotated[
        int,
        typer.Option(
            "--retries",
            min=0,
            max=100,
            help="Retries of transient Hub failures.",
            rich_help_panel=RETRIES,
        ),
    ] = 4,
    retry_wait: Annotated[
        float,
        typer.Option(
            "--retry-wait",
            min=0.0,
            callback=number_range(0, 3600),
            help="First backoff in seconds (doubles).",
            rich_help_panel=RETRIES,
        ),
    ] = 2.0,
    force_unlock: ForceUnlockOpt = False,
    as_json: JsonOpt = False,
) -> None:
    from mimcli.hub.push import PushConfig, run_push

    cfg = PushConfig(
        run_dir=run_dir,
        repo=repo,
        to=to,
        dry_run=dry_run,
        private=private,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        eval_path=eval_path,
        probe_path=probe_path,
        heads_path=heads_path,
        license=license,
        datasets=_split(dataset),
        tags=_split(tag),
        retries=retries,
        retry_wait=retry_wait,
        force_unlock=force_unlock,
    )
    outcome = run_push(
        cfg,
        on_retry=lambda msg: stderr.print(f"[yellow]retry:[/] {msg}", highlight=False),
        on_warning=lambda msg: stderr.print(
            f"[yellow]warning:[/] {msg}", highlight=False, soft_wrap=True
        ),
    )
    built, result = outcome.built, outcome.upload
    if as_json:
        print_json(outcome.to_dict())
        return
    if result is None:
        stdout.print(f"Wrote {len(built.files)} files to {built.path} (dry run: nothing uploaded)")
        stdout.print(f"Read the model card: {built.path / 'README.md'}", markup=False)
        return
    if result.pr_url:
        stdout.print(f"Opened {result.pr_url}", markup=False)
    elif result.unchanged:
        stdout.print(f"{result.repo_id} already has these files: nothing to commit", markup=False)
    else:
        stdout.print(f"Pushed {result.commit_url}", markup=False)
    stdout.print(
        f'Load it with timm.create_model("hf-hub:{result.repo_id}", pretrained=True)'
        + ("" if built.stock_timm else " after `import mimcli.models.postnorm`"),
        markup=False,
    )
