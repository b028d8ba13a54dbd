"""``mimcli push`` as one library call, :func:`run_push`: check the request and the Hub, build the
repo folder from the run (offline), upload it as one commit, and clear the staging copy. Nothing
remote happens until the folder is complete."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mimcli import runlock
from mimcli.errors import MimcliError, RemoteError
from mimcli.hub.repo_folder import RepoFolder, build_repo_folder
from mimcli.hub.upload import (
    PushResult,
    check_push_options,
    normalize_repo_id,
    preflight,
    upload_folder,
)

# without --to, the folder is staged in RUN_DIR/.push/repo and removed after the upload
STAGING_DIR, STAGED_REPO = ".push", "repo"


@dataclass
class PushConfig:
    """What ``mimcli push`` was asked to do (one field per flag).

    Attributes:
        run_dir: a finished ``mimcli refine`` run folder.
        repo: Hub repo id, ``OWNER/NAME`` or ``NAME`` (the token's owner); needed unless dry run.
        to: keep the repo folder here (required with ``dry_run``); else it is staged and removed.
        dry_run: only write the folder; upload nothing.
        private: create the repo private.
        revision: branch to push to (created if needed).
        commit_message: commit title (default names the mimcli version).
        create_pr: open a pull request against main instead of committing to it.
        eval_path: ``results.json`` (or its folder); default ``RUN_DIR/eval/results.json``.
        probe_path: ``probe.json`` (or its folder); default ``RUN_DIR/probe/probe.json``.
        heads_path: a linear-probe head folder or ``eval --save-heads`` folder; default
            ``<eval folder>/heads/<refined model>/`` when present.
        license: overrides the license inherited from the base model.
        datasets: Hub dataset ids the run used.
        tags: extra card tags.
        retries: retries of transient Hub failures per call.
        retry_wait: first backoff in seconds (doubles each retry).
        force_unlock: take ``RUN_DIR/.mimcli.lock`` from another run that is gone (a live
            ``refine`` or ``push`` on the folder is refused otherwise; :mod:`mimcli.runlock`).
    """

    run_dir: Path
    repo: str | None = None
    to: Path | None = None
    dry_run: bool = False
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    create_pr: bool = False
    eval_path: Path | None = None
    probe_path: Path | None = None
    heads_path: Path | None = None
    license: str | None = None
    datasets: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    retries: int = 4
    retry_wait: float = 2.0
    force_unlock: bool = False


@dataclass
class PushOutcome:
    """What :func:`run_push` did.

    Attributes:
        built: the repo folder that was built (its files, license, architecture, warnings).
        folder: where that folder is now; None once the staging copy was removed after upload.
        upload: the upload's result; None for a dry run.
    """

    built: RepoFolder
    folder: Path | None
    upload: PushResult | None = None

    def to_dict(self) -> dict[str, Any]:
        """``push --json``: folder, files, license, uploaded, and the upload's fields."""
        out: dict[str, Any] = {
            "folder": str(self.folder) if self.folder is not None else None,
            "files": self.built.files,
            "license": self.built.license,
            "uploaded": self.upload is not None,
        }
        return out if self.upload is None else {**out, **asdict(self.upload)}


def _repo_id(cfg: PushConfig) -> str:
    """The repo id the card names: checked with the Hub (uploads), or a local guess (dry runs)."""
    if not cfg.dry_run:
        return preflight(cfg.repo or "", retries=cfg.retries, retry_wait=cfg.retry_wait)
    # no --repo: the run's name, no owner (the card's usage then loads the folder from disk)
    return normalize_repo_id(cfg.repo) if cfg.repo else cfg.run_dir.resolve().name


def run_push(
    cfg: PushConfig,
    on_retry: Callable[[str], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> PushOutcome:
    """Build the repo folder of ``cfg.run_dir`` and (unless a dry run) upload it.

    Args:
        cfg: the request.
        on_retry: called with one line before each retry of a transient Hub failure.
        on_warning: called with each warning of the build (unknown license, post-norm
            architecture, guessed eval column), before anything is uploaded, and when the Hub
            has no Xet storage for the repo (large files then go through Git LFS).

    Returns:
        The folder built and the upload's result.

    Raises:
        MimcliError: a mistake in the request, a bad run or results, the Hub refusing the token,
            another live run holding ``RUN_DIR``.
        RemoteError: the Hub failed after retries; the message names the kept repo folder, so
            the same command can be run again.
    """
    if cfg.dry_run and cfg.to is None:
        raise MimcliError("--dry-run writes the repo folder only: give it a place with --to DIR")
    if not cfg.dry_run and not cfg.repo:
        raise MimcliError("give the Hub repo with --repo OWNER/NAME (or use --dry-run --to DIR)")
    if not cfg.run_dir.is_dir():
        raise MimcliError(f"{cfg.run_dir}: no such run folder")
    check_push_options(cfg.revision, cfg.create_pr)
    if not os.access(cfg.run_dir, os.W_OK):  # read-only: no run can write it either
        return _build_and_upload(cfg, on_retry, on_warning)
    with runlock.acquire(cfg.run_dir, "push", force=cfg.force_unlock):  # one run per folder
        return _build_and_upload(cfg, on_retry, on_warning)


def _build_and_upload(
    cfg: PushConfig,
    on_retry: Callable[[str], None] | None,
    on_warning: Callable[[str], None] | None,
) -> PushOutcome:
    repo_id = _repo_id(cfg)
    staging = cfg.to if cfg.to is not None else cfg.run_dir / STAGING_DIR / STAGED_REPO
    built = build_repo_folder(
        cfg.run_dir,
        staging,
        repo_id,
        eval_path=cfg.eval_path,
        probe_path=cfg.probe_path,
        license=cfg.license,
        datasets=cfg.datasets,
        tags=cfg.tags,
        heads_path=cfg.heads_path,
    )
    for warning in built.warnings:
        if on_warning is not None:
            on_warning(warning)
    if cfg.dry_run:
        return PushOutcome(built, built.path)
    try:
        result = upload_folder(
            built.path,
            repo_id,
            private=cfg.private,
            revision=cfg.revision,
            commit_message=cfg.commit_message,
            create_pr=cfg.create_pr,
            retries=cfg.retries,
            retry_wait=cfg.retry_wait,
            on_retry=on_retry,
            on_warning=on_warning,
        )
    except RemoteError as err:  # transient failures: keep the folder for the re-run
        raise RemoteError(f"{err} [repo folder: {built.path}]") from err
    except MimcliError:
        if cfg.to is None:
            shutil.rmtree(staging.parent, ignore_errors=True)
        raise
    if cfg.to is not None:
        return PushOutcome(built, built.path, result)
    # uploaded: the staging copy is not needed (on failure it stays, see the error)
    shutil.rmtree(staging.parent, ignore_errors=True)
    return PushOutcome(built, None, result)
