"""Plain ``http(s)://`` downloads into mimcli's cache, for files of several GB.

A URL is fetched once into ``<cache>/downloads/<sha256 prefix>-<file name>``. Bytes collect in
``<that name>.partial``, which is renamed to the final name only when its size matches what the
server announced (Content-Length, or the total of Content-Range). An interrupted transfer is
resumed with ``Range: bytes=N-`` (206), or restarted when the server ignores it (200); the partial
file survives the process, so the next run resumes too. One process at a time downloads a given
URL (a lock under ``downloads/.locks``: torchrun ranks wait for the first one's copy).

Failures are one line: offline (``HF_HUB_OFFLINE=1``, no DNS, no route, refused) or not found ->
MimcliError (exit 2: the user fixes it, by connecting or by passing a downloaded file's path);
a server that keeps failing or stalling -> RemoteError (exit 1).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mimcli._version import __version__
from mimcli.errors import MimcliError, RemoteError
from mimcli.fileio import cache_dir

RETRIES = 3  # attempts in a row that bring no new bytes before giving up
BACKOFF_SECONDS = 0.5
TIMEOUT_SECONDS = 60
CHUNK_BYTES = 1 << 20
PARTIAL_SUFFIX = ".partial"
BAR_MIN_BYTES = 16 << 20  # smaller downloads show no progress

# progress(file name, bytes so far, total bytes or 0 when the server does not say)
DownloadProgress = Callable[[str, int, int], None]


class _Unfinished(Exception):
    """The transfer ended short of the announced size, overshot it, or resumed elsewhere."""


def url_cache_path(url: str) -> Path:
    """Where ``url`` is cached: ``<cache>/downloads/<sha256 prefix>-<file name>``."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return cache_dir() / "downloads" / f"{digest}-{name}"


def partial_path(target: Path) -> Path:
    """Where the bytes of ``target`` collect until it is complete."""
    return target.with_name(target.name + PARTIAL_SUFFIX)


def offline_mode() -> bool:
    """huggingface_hub's offline switch (``HF_HUB_OFFLINE``); plain URLs obey it too."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download_url(
    url: str, progress: bool | DownloadProgress = True, label: str | None = None
) -> Path:
    """Fetch ``url`` into the cache once, resuming an interrupted transfer; return its path.

    Args:
        url: an ``http(s)://`` URL.
        progress: True for progress on stderr (downloads over 16 MiB), False for none, or a
            callback ``(file name, bytes so far, total or 0)``.
        label: what the user asked for (e.g. ``mim-refiner:NAME``), named by the offline line.
    """
    target = url_cache_path(url)
    if target.is_file():
        return target
    if offline_mode():
        raise MimcliError(offline_line(url, target, label, "offline mode is on: HF_HUB_OFFLINE=1"))
    with _download_lock(target):
        if target.is_file():  # another process finished it while this one waited
            return target
        display = _Display(target.name.split("-", 1)[-1], progress)
        try:
            return _fetch(url, target, label, display)
        finally:
            display.close()


def _fetch(url: str, target: Path, label: str | None, display: _Display) -> Path:
    """Attempts until the file is complete; only attempts that bring no bytes count as failures."""
    partial = partial_path(target)
    failures = 0
    last_error: Exception | None = None
    while failures < RETRIES:
        before = _size(partial)
        try:
            _transfer(url, partial, display)
            os.replace(partial, target)
            return target
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # asked for bytes past the end: already complete, or start over
                total = _content_range(exc.headers.get("Content-Range", ""))[1]
                if total is not None and before == total:
                    os.replace(partial, target)
                    return target
                partial.unlink(missing_ok=True)
            elif exc.code in (401, 403, 404, 410):
                raise MimcliError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from exc
            last_error = exc
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, OSError) and not isinstance(reason, TimeoutError):
                host = urllib.parse.urlparse(url).hostname
                why = f"{host} cannot be reached: {reason.strerror or reason}"
                raise MimcliError(offline_line(url, target, label, why)) from exc
            last_error = exc
        except (TimeoutError, ConnectionError, http.client.HTTPException, _Unfinished) as exc:
            last_error = exc
        if _size(partial) <= before:
            failures += 1
            time.sleep(BACKOFF_SECONDS * 2 ** (failures - 1))
    kept = _size(partial)
    resume = f"; {kept:,} bytes are kept in {partial} and the next run resumes" if kept else ""
    raise RemoteError(f"cannot download {url} after {RETRIES} attempts: {last_error}{resume}")


def _transfer(url: str, partial: Path, display: _Display) -> None:
    """One request: append to ``partial`` from where it ends (206), or rewrite it (200)."""
    have = _size(partial)
    headers = {"User-Agent": f"mimcli/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != have:
                partial.unlink(missing_ok=True)
                raise _Unfinished(f"the server resumed at byte {start}, not {have}")
        else:  # the whole file: a fresh start, or a server that ignores Range
            length = response.headers.get("Content-Length", "")
            have, total = 0, (int(length) if length.isdigit() else None)
        done = have
        with open(partial, "ab" if have else "wb") as fh:
            while chunk := response.read(CHUNK_BYTES):
                fh.write(chunk)
                done += len(chunk)
                display.update(done, total)
            fh.flush()
            os.fsync(fh.fileno())
    size = _size(partial)
    if total is not None and size != total:
        if size > total:
            partial.unlink()
        raise _Unfinished(f"the transfer stopped at {size:,} of {total:,} bytes")


def _content_range(value: str) -> tuple[int | None, int | None]:
    """(first byte, total size) of ``bytes FIRST-LAST/TOTAL`` or ``bytes */TOTAL``."""
    unit, _, rest = value.strip().partition(" ")
    span, _, total = rest.partition("/")
    if unit.lower() != "bytes":
        return None, None
    first = span.split("-")[0]
    return (int(first) if first.isdigit() else None), (int(total) if total.isdigit() else None)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def offline_line(url: str, target: Path, label: str | None, why: str) -> str:
    """The one line for a URL that cannot be fetched from here and is not cached: the URL, and
    how to go on with a copy downloaded elsewhere."""
    kept = _size(partial_path(target))
    resume = f" ({kept:,} bytes of it are kept; online, the download resumes)" if kept else ""
    if label:
        return (
            f"{label}: cannot download {url} ({why}) and it is not in the cache "
            f"{target.parent}{resume}; download that file and pass its path instead of {label}"
        )
    return (
        f"cannot download {url} ({why}) and it is not in the cache {target.parent}{resume}; "
        "download it elsewhere and pass its path instead"
    )


@contextmanager
def _download_lock(target: Path) -> Iterator[None]:
    """Hold ``downloads/.locks/<name>.lock`` while downloading ``target`` (no lock without
    ``fcntl``, i.e. on Windows)."""
    lock = target.parent / ".locks" / (target.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class _Display:
    """Progress of one download: the caller's callback; or, for files over ``BAR_MIN_BYTES``
    (or of unknown size), a rich bar on a terminal, and a line per tenth elsewhere (logs, or
    while a command's own rich display owns the terminal)."""

    def __init__(self, name: str, progress: bool | DownloadProgress) -> None:
        self.name = name
        self.callback = progress if callable(progress) else None
        self.enabled = bool(progress) and not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
        self.bar: Any = None
        self.task: Any = None
        self.lines = -1  # tenths already printed; -1 before the display is chosen

    def update(self, done: int, total: int | None) -> None:
        if self.callback is not None:
            self.callback(self.name, done, total or 0)
            return
        if not self.enabled or (total is not None and total < BAR_MIN_BYTES):
            return
        if self.bar is None and self.lines < 0:
            self._open(total)
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)
            return
        tenth = done * 10 // total if total else done // (1 << 30)
        if tenth > self.lines:
            self.lines = tenth
            of = f" of {total / 2**20:,.0f} MiB" if total else ""
            print(f"downloading {self.name}: {done / 2**20:,.0f} MiB{of}", file=sys.stderr)

    def _open(self, total: int | None) -> None:
        from rich.file_proxy import FileProxy

        self.lines = 0
        if not sys.stderr.isatty() or isinstance(sys.stderr, FileProxy):
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.bar = Progress(
            TextColumn(f"downloading {self.name}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task(self.name, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
