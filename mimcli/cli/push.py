"""``mimcli push``: publish a refine run as a timm-loadable Hugging Face repo."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from mimcli.cli._common import JsonOpt, handle_errors, print_json, stderr, stdout

HELP = (
    "Publish a refine run's encoder as a Hugging Face repo that "
    '`timm.create_model("hf-hub:OWNER/NAME", pretrained=True)` loads: model.safetensors (encoder '
    "weights only), config.json in timm's layout, a model card with the eval results and plots, "
    "and the run's configuration. The folder is written first, then uploaded as one commit; "
    "transient Hub errors are retried and pushing the same run again is safe.\n\n"
    "The token comes from HF_TOKEN or `hf auth login`; it is never printed or written."
)

EPILOG = """\
Examples:

  mimcli eval vit_large_patch16_224.mae runs/mae-l \\
      --train in1k/train --val in1k/val --out runs/mae-l/eval
  mimcli push runs/mae-l --repo my-name/vit-large-mae-refined

  mimcli push runs/tiny --dry-run --to runs/tiny/hub     (write the folder, upload nothing)

  mimcli push runs/mae-l --repo my-org/mae-l-refined --private --create-pr

RUN_DIR/eval/results.json and RUN_DIR/probe/probe.json are picked up when present. Without
--to, the folder is staged in RUN_DIR/.push and removed after the upload; it is rebuilt from the
run each time (edit the card after pushing, or pass --to and upload it yourself).
"""


def _split(values: list[str] | None) -> list[str]:
    """Repeated and/or comma-separated option values."""
    return [v.strip() for value in values or () for v in value.split(",") if v.strip()]


@handle_errors
def push(
    run_dir: Annotated[Path, typer.Argument(help="A finished `mimcli refine` run folder.")],
    repo: Annotated[
        str | None, typer.Option("--repo", help="Hub repo id, OWNER/NAME (or NAME for yours).")
    ] = None,
    to: Annotated[
        Path | None,
        typer.Option("--to", help="Keep the repo folder here (required with --dry-run)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only write the folder to --to; upload nothing.")
    ] = False,
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch to push to (created if needed).")
    ] = None,
    commit_message: Annotated[
        str | None, typer.Option("--commit-message", help="Commit title.")
    ] = None,
    create_pr: Annotated[
        bool,
        typer.Option(
            "--create-pr", help="Open a pull request against main instead of committing to it."
        ),
    ] = False,
    eval_path: Annotated[
        Path | None,
        typer.Option("--eval", help="results.json (or its folder) from `mimcli eval BASE RUN`."),
    ] = None,
    probe_path: Annotated[
        Path | None, typer.Option("--probe", help="probe.json (or its folder) for the card plot.")
    ] = None,
    license: Annotated[  # noqa: A002 - the Hub's field name
        str | None,
        typer.Option("--license", help="Override the license inherited from the base model."),
    ] = None,
    dataset: Annotated[
        list[str] | None,
        typer.Option(
            "--dataset", help="Hub dataset id(s) the run used (repeat or comma-separate)."
        ),
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Extra card tags (repeat or comma-separate).")
    ] = None,
    retries: Annotated[
        int, typer.Option("--retries", min=0, help="Retries of transient Hub failures.")
    ] = 4,
    retry_wait: Annotated[
        float, typer.Option("--retry-wait", min=0.0, help="First backoff in seconds (doubles).")
    ] = 2.0,
    as_json: JsonOpt = False,
) -> None:
    from mimcli.errors import MimcliError, RemoteError
    from mimcli.hub.repo_folder import build_repo_folder
    from mimcli.hub.upload import check_push_options, normalize_repo_id, preflight, upload_folder

    if dry_run and to is None:
        raise MimcliError("--dry-run writes the repo folder only: give it a place with --to DIR")
    if not dry_run and not repo:
        raise MimcliError("give the Hub repo with --repo OWNER/NAME (or use --dry-run --to DIR)")
    if not run_dir.is_dir():
        raise MimcliError(f"{run_dir}: no such run folder")
    check_push_options(revision, create_pr)
    if not dry_run:
        repo_id = preflight(repo, retries=retries, retry_wait=retry_wait)  # type: ignore[arg-type]
    else:
        repo_id = normalize_repo_id(repo) if repo else run_dir.resolve().name
        if "/" not in repo_id:
            repo_id = f"your-name/{repo_id}"  # the card's usage line needs an owner
    staging = to if to is not None else run_dir / ".push" / "repo"
    built = build_repo_folder(
        run_dir,
        staging,
        repo_id,
        eval_path=eval_path,
        probe_path=probe_path,
        license=license,
        datasets=_split(dataset),
        tags=_split(tag),
    )
    for warning in built.warnings:
        stderr.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    summary = {"folder": str(built.path), "files": built.files, "license": built.license}
    if dry_run:
        if as_json:
            print_json({**summary, "uploaded": False})
        else:
            stdout.print(
                f"Wrote {len(built.files)} files to {built.path} (dry run: nothing uploaded)"
            )
            stdout.print(f"Read the model card: {built.path / 'README.md'}", markup=False)
        return
    try:
        result = upload_folder(
            built.path,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            retries=retries,
            retry_wait=retry_wait,
            on_retry=lambda msg: stderr.print(f"[yellow]retry:[/] {msg}", highlight=False),
        )
    except RemoteError as err:  # transient failures: keep the folder for the re-run
        raise RemoteError(f"{err} [repo folder: {built.path}]") from err
    except MimcliError:
        if to is None:
            shutil.rmtree(staging.parent, ignore_errors=True)
        raise
    if to is None:  # uploaded: the temporary copy is not needed (on failure it stays, see error)
        shutil.rmtree(staging.parent, ignore_errors=True)
        summary["folder"] = None
    if as_json:
        print_json({**summary, "uploaded": True, **result.__dict__})
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
