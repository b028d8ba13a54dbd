"""Where mimcli's files go and how they get there: the cache folder, and atomic writes (everything
mimcli writes goes to a temporary name first, then is renamed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def cache_dir() -> Path:
    """mimcli's cache: ``$MIMCLI_CACHE``, else ``$XDG_CACHE_HOME/mimcli``, else
    ``~/.cache/mimcli`` (downloads and the feature cache live under it)."""
    root = os.environ.get("MIMCLI_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mimcli"


TEMP_SUFFIX = ".tmp"  # temporary files are ``.NAME.RANDOM.tmp`` beside their target

# a test hook (tests/test_reliability.py): MIMCLI_TEST_PAUSE_BEFORE_RENAME=NAME[@N] makes the N-th
# (default first) write of a file called NAME in this process stop between writing its temporary
# file and renaming it, after touching $MIMCLI_TEST_PAUSE_FLAG, so a test can kill it there
_PAUSE_ENV, _PAUSE_FLAG_ENV = "MIMCLI_TEST_PAUSE_BEFORE_RENAME", "MIMCLI_TEST_PAUSE_FLAG"
_writes_seen: dict[str, int] = {}


def _pause_for_tests(name: str) -> None:
    spec = os.environ.get(_PAUSE_ENV)
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _writes_seen[name] = _writes_seen.get(name, 0) + 1
    if _writes_seen[name] != int(nth or 1):
        return
    flag = os.environ.get(_PAUSE_FLAG_ENV)
    if flag:
        Path(flag).touch()
    while True:  # until the test kills this process
        time.sleep(3600)


def io_error(exc: BaseException) -> OSError | None:
    """``exc`` as the ``OSError`` it reports: safetensors raises its own error type for a failed
    write ("I/O error: File too large (os error 27)"); None when it is no I/O error."""
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"os error (\d+)", str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush ``path``'s data to the disk (a rename after it cannot expose an empty file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename in it survives a crash); a no-op where folders cannot
    be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def usual_modes(root: str | os.PathLike[str]) -> None:
    """Give every file under ``root`` the mode a new file gets under the user's umask (0644 under
    the usual 022): safetensors and ``tempfile`` create files readable by their owner only."""
    for folder, _, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~_UMASK)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and folder under ``root`` (a folder assembled before its rename)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(os.path.join(folder, name))
        fsync_dir(folder)


@contextmanager
def atomic_path(
    path: str | os.PathLike[str], keep_previous: str | os.PathLike[str] | None = None
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; if the body succeeds, fsync it, rename it onto
    ``path`` and fsync the folder. On failure the temporary file is removed.

    Args:
        keep_previous: move the file ``path`` held before to this name (in the same folder)
            just before the new one is renamed in; a crash between the two renames leaves the
            previous file under this name and no ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # again: a writer may have replaced it (safetensors does)
        fsync_file(tmp)
        _pause_for_tests(path.name)
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def rename_in(partial: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Move the folder ``partial`` (assembled and fsynced) onto the path ``target``, durably.
    ``target`` must not exist. Its files get the usual permissions (some writers make 0600)."""
    usual_modes(partial)
    fsync_tree(partial)
    _pause_for_tests(Path(target).name)
    os.replace(partial, target)
    fsync_dir(Path(target).parent)


def remove_stale_temporaries(folder: str | os.PathLike[str], keep: str = "") -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder`` (``.NAME.*.tmp``, as
    :func:`atomic_path` names them) and ``*.partial`` folders, except those of the file ``keep``
    (one a live thread may be writing); returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        stale_file = entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX)
        if keep and entry.name.startswith(f".{keep}."):
            continue
        stale_dir = entry.name.endswith(".partial") and entry.is_dir()
        if stale_file and entry.is_file():
            entry.unlink(missing_ok=True)
        elif stale_dir:
            shutil.rmtree(entry, ignore_errors=True)
        else:
            continue
        removed.append(entry)
    return removed


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
