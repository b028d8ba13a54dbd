"""Uploading a repo folder to the Hugging Face Hub through ``huggingface_hub.HfApi``: token,
offline and repo-id checks before anything is built, then create the repo (and branch) if needed
and send the folder's changed files as exactly one commit (``create_commit``, never
``upload_folder``, which splits uploads into several commits when ``hf_xet`` is installed),
retrying transient failures (HTTP 408/429/5xx, connection errors) with exponential backoff.
Unchanged files are compared by hash with the branch and left out, and a folder with nothing
changed makes no commit, so a re-run after a failure is safe. A commit retried after its answer
was lost is not made twice: the client finds the files on the branch and sends nothing, and a pull
request opened by the lost attempt is recognised and reported instead of opening another. Large
files go through Xet storage, or through Git LFS where the Hub has no Xet storage for the repo."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mimcli._version import __version__
from mimcli.errors import MimcliError, RemoteError
from mimcli.hub.commit import (
    additions,
    changed_files,
    client_uses_xet,
    folder_files,
    hub_offers_xet,
    opened_pull_request,
    pull_requests,
)
from mimcli.hub.download import endpoint_reachable, is_network_error
from mimcli.hub.repo_folder import MARKER

TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass
class PushResult:
    """What :func:`upload_folder` did.

    Attributes:
        repo_id: ``OWNER/NAME`` as the Hub spells it.
        repo_url: the repo's URL.
        commit_url: the commit's URL (the head's when nothing changed).
        commit_oid: the commit id.
        pr_url: the pull request opened with ``create_pr``, else None.
        unchanged: the branch already had these files (no new commit).
        attempts: Hub calls made, retries included.
    """

    repo_id: str
    repo_url: str
    commit_url: str
    commit_oid: str
    pr_url: str | None
    unchanged: bool
    attempts: int


@dataclass
class _Committed:
    """What ``create_commit`` answers, for a commit found on the Hub after its answer was lost."""

    commit_url: str
    oid: str
    pr_url: str | None


def _status(exc: BaseException) -> int | None:
    """The HTTP status of a failed Hub call, if it got that far."""
    return getattr(getattr(exc, "response", None), "status_code", None)


def _transient(exc: BaseException) -> bool:
    """Whether trying again may help: HTTP 408/429/5xx or a connection failure."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        return _status(exc) in TRANSIENT_STATUS
    return is_network_error(exc)


def _retry_after(exc: BaseException) -> float | None:
    """The server's ``Retry-After`` seconds, if it sent a number."""
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    try:
        return float(headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def with_retries(
    what: str,
    call: Callable[[], Any],
    retries: int,
    wait: float,
    on_retry: Callable[[str], None] | None = None,
) -> tuple[Any, int]:
    """``call()`` with up to ``retries`` more attempts on transient failures; (result, attempts)."""
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(retries + 1):
        try:
            return call(), attempt + 1
        except Exception as exc:
            status = _status(exc)
            if not _transient(exc):
                if status in (401, 403):
                    raise MimcliError(
                        f"{what}: the Hub refused the token (HTTP {status}); log in with "
                        "`hf auth login` or set HF_TOKEN to a token with write access"
                    ) from exc
                if isinstance(exc, HfHubHTTPError):
                    raise RemoteError(f"{what}: the Hub refused: {_one_line(exc)}") from exc
                raise
            if attempt == retries:
                cause = f"HTTP {status}" if status else type(exc).__name__
                raise RemoteError(
                    f"{what} failed after {retries + 1} attempts ({cause}); the folder is intact, "
                    "run the same command again to resume"
                ) from exc
            delay = min(_retry_after(exc) or wait * 2**attempt, 60.0)
            if on_retry is not None:
                cause = f"HTTP {status}" if status else type(exc).__name__
                on_retry(f"{what}: {cause}; retrying in {delay:.1f}s ({attempt + 1}/{retries})")
            time.sleep(delay)
    raise AssertionError("unreachable")


def check_push_options(revision: str | None, create_pr: bool) -> None:
    """``--create-pr`` targets main, so it cannot go with another ``--revision``."""
    if create_pr and revision not in (None, "main"):
        raise MimcliError(
            f"--create-pr opens a pull request against main, so it cannot go with --revision "
            f"{revision}: drop --revision, or push straight to that branch without --create-pr"
        )


def _require_token() -> None:
    """One clear line when huggingface_hub has no token (HF_TOKEN or ``hf auth login``)."""
    from huggingface_hub import get_token

    if not get_token():
        raise MimcliError(
            "no Hugging Face token: log in with `hf auth login` or set HF_TOKEN (or use "
            "--dry-run --to DIR to only write the folder)"
        )


def normalize_repo_id(repo: str) -> str:
    """``repo`` checked by huggingface_hub's own rules; a pasted ``hf-hub:`` prefix is dropped."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo = repo.strip()
    if repo.startswith("hf-hub:"):
        repo = repo[len("hf-hub:") :]
    if repo.count("/") > 1 or repo.startswith("/") or repo.endswith("/"):
        raise MimcliError(f"--repo {repo!r}: expected OWNER/NAME or NAME")
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise MimcliError(f"--repo {repo!r}: not a valid Hub repo id ({_one_line(exc)})") from exc
    return repo


def preflight(repo: str, retries: int = 4, retry_wait: float = 2.0) -> str:
    """Everything checkable before the folder is built: the repo id, offline mode, a token,
    that the endpoint answers; returns ``OWNER/NAME`` (a bare NAME gets the token's owner)."""
    from huggingface_hub import HfApi, constants

    repo = normalize_repo_id(repo)
    if constants.HF_HUB_OFFLINE:
        raise MimcliError(
            "HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it, or use --dry-run --to DIR"
        )
    _require_token()
    if not endpoint_reachable():
        raise RemoteError(
            f"cannot reach the Hub at {constants.ENDPOINT} (offline? check the network or "
            "HF_ENDPOINT), or use --dry-run --to DIR to only write the folder"
        )
    if "/" in repo:
        return repo
    who, _ = with_retries("asking the Hub who you are", HfApi().whoami, retries, retry_wait)
    return f"{who['name']}/{repo}"


def upload_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    retries: int = 4,
    retry_wait: float = 2.0,
    on_retry: Callable[[str], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> PushResult:
    """Create ``repo_id`` if needed and commit the files of ``folder`` that differ from the
    branch (``main`` for a pull request) as one commit; none when nothing differs.

    Args:
        on_retry: called with one line before each retry of a transient Hub failure.
        on_warning: called with one line when large files must go through Git LFS.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionNotFoundError

    check_push_options(revision, create_pr)
    _require_token()
    if not (folder / MARKER).is_file():
        raise MimcliError(f"{folder}: not a folder written by mimcli push")
    api = HfApi()
    attempts = 0

    def attempt(what: str, call: Callable[[], Any]) -> Any:
        nonlocal attempts
        value, n = with_retries(what, call, retries, retry_wait, on_retry)
        attempts += n
        return value

    repo_url = attempt(
        f"creating {repo_id}",
        lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
    )
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    branch = None if create_pr else revision
    if branch not in (None, "main"):
        attempt(
            f"creating branch {branch}",
            lambda: api.create_branch(repo_id, branch=branch, exist_ok=True),
        )

    def head() -> str | None:
        try:
            return api.repo_info(repo_id, revision=branch).sha
        except RevisionNotFoundError:
            return None

    before = attempt(f"reading {repo_id}", head)
    changed = attempt(
        f"reading {repo_id}",
        lambda: (
            folder_files(folder) if before is None else changed_files(api, repo_id, before, folder)
        ),
    )
    if before is not None and not changed:
        return PushResult(
            repo_id=repo_id,
            repo_url=str(repo_url),
            commit_url=f"{api.endpoint}/{repo_id}/commit/{before}",
            commit_oid=before,
            pr_url=None,
            unchanged=True,
            attempts=attempts,
        )
    # huggingface_hub 2.x sends large files through Xet whenever hf_xet is installed, and fails
    # on a Hub without Xet storage; open files make it use the Hub's Git LFS API instead
    lfs = client_uses_xet() and not attempt(
        f"asking {repo_id} for Xet storage",
        lambda: hub_offers_xet(api, repo_id, branch, create_pr),
    )
    if lfs and on_warning is not None:
        on_warning(f"the Hub has no Xet storage for {repo_id}: uploading through Git LFS")
    message = commit_message or f"Upload encoder refined with mimcli {__version__}"
    # the pull requests before the first attempt: one that appears later, with these files, was
    # opened by an attempt whose answer was lost (on a branch the client itself drops files
    # that the branch already has, so a commit sent again after a lost answer sends nothing)
    known_prs = (
        attempt(f"reading {repo_id}", lambda: pull_requests(api, repo_id)) if create_pr else {}
    )
    sent = 0

    def commit() -> Any:
        nonlocal sent
        sent += 1
        if create_pr and sent > 1:
            opened = opened_pull_request(api, repo_id, known_prs, folder)
            if opened is not None:
                number, sha = opened
                return _Committed(
                    commit_url=f"{api.endpoint}/{repo_id}/commit/{sha}",
                    oid=sha,
                    pr_url=f"{api.endpoint}/{repo_id}/discussions/{number}",
                )
        with additions(folder, changed, lfs) as operations:
            return api.create_commit(
                repo_id,
                operations,
                commit_message=message,
                revision=branch,
                create_pr=create_pr,
            )

    info = attempt(f"uploading to {repo_id}", commit)
    return PushResult(
        repo_id=repo_id,
        repo_url=str(repo_url),
        commit_url=info.commit_url,
        commit_oid=info.oid,
        pr_url=info.pr_url,
        # the client drops files that match the branch: a commit sent again after its answer was
        # lost finds nothing left to change, and reports the head
        unchanged=(info.pr_url is None and info.oid == before),
        attempts=attempts,
    )
