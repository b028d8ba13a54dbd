"""Remote sources: files from the Hugging Face Hub (through huggingface_hub) and plain URLs
(``download_url``, from ``mimcli.hub.urls``: resumable, cached), with network and Hub errors
mapped to one line: offline or not found -> MimcliError (exit 2), a server failing after
retries -> RemoteError (exit 1).
"""

from __future__ import annotations

import socket
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mimcli.errors import MimcliError, RemoteError
from mimcli.hub.urls import download_url, url_cache_path

__all__ = [
    "download_url",
    "endpoint_reachable",
    "hub_access",
    "hub_errors_to_mimcli",
    "hub_file",
    "hub_file_exists",
    "is_network_error",
    "url_cache_path",
]


def hub_errors_to_mimcli(spec: str, exc: BaseException) -> MimcliError:
    """Translate huggingface_hub / network exceptions into one clear line."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, LocalEntryNotFoundError | OfflineModeIsEnabled) or is_network_error(exc):
        return MimcliError(
            f"{spec}: cannot reach the Hub (offline?) and the weights are not in the local cache; "
            "connect once to download them, or pass a local checkpoint file or folder"
        )
    if isinstance(exc, GatedRepoError):
        return MimcliError(
            f"{spec}: the repo is gated; accept its terms and log in (hf auth login)"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return MimcliError(f"{spec}: no such repo on the Hub (or it is private: log in first)")
    if isinstance(exc, RevisionNotFoundError):
        return MimcliError(f"{spec}: no such revision on the Hub")
    if isinstance(exc, EntryNotFoundError):
        return MimcliError(f"{spec}: a file the model needs is missing from the repo ({exc})")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is not None and status >= 500:
            return RemoteError(f"{spec}: the Hub failed (HTTP {status}); try again later")
        return MimcliError(f"{spec}: the Hub refused the request: {str(exc).splitlines()[0]}")
    return MimcliError(f"{spec}: {type(exc).__name__}: {exc}")


def is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a connection failure or timeout, whichever HTTP library
    huggingface_hub runs on (httpx, httpx2...). Downloads and uploads both retry these."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return type(exc).__module__.split(".")[0].startswith("httpx") and "Error" in type(exc).__name__


def endpoint_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint (``HF_ENDPOINT``) accepts a TCP connection within ``timeout``."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    parsed = urllib.parse.urlparse(constants.ENDPOINT)
    proxies = urllib.request.getproxies()
    if any(proxies.get(k) for k in ("http", "https", "all")) and not urllib.request.proxy_bypass(
        parsed.hostname or ""
    ):
        return True  # a direct TCP check says nothing behind a proxy; let the client try
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def hub_access() -> Iterator[None]:
    """Use the network when the Hub answers; otherwise switch huggingface_hub to its offline
    mode (``HF_HUB_OFFLINE``) for the call, so cached files load at once and missing ones fail
    at once instead of after a minute of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or endpoint_reachable():
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def hub_file(repo_id: str, filename: str, spec: str, revision: str | None = None) -> Path:
    """Download (or take from the cache) one file of a Hub repo."""
    from huggingface_hub import hf_hub_download

    try:
        with hub_access():
            return Path(hf_hub_download(repo_id, filename, revision=revision))
    except Exception as exc:
        raise hub_errors_to_mimcli(spec, exc) from exc


def hub_file_exists(repo_id: str, filename: str, spec: str, revision: str | None = None) -> bool:
    """Whether ``filename`` can be had (downloaded now, or already cached)."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hub_file(repo_id, filename, spec, revision)
    except MimcliError as err:
        if isinstance(err.__cause__, EntryNotFoundError):
            return False
        raise
    return True
