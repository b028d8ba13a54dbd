"""One run per folder: ``refine`` and ``push`` hold ``RUN/.mimcli.lock`` while they use a run
folder, so a second run on it is refused with one line naming the holder.

The lock file (JSON) names the holder: pid, host, the pid's start time, the command, a random
token and a heartbeat the holder renews every quarter lease from a daemon thread. A lock is
stale, and taken over with one warning, when its process is gone (same host: the pid is dead or
now another process) or, for a holder on another host (torchrun over nodes, a shared
filesystem), when its heartbeat is older than the lease. ``force=True`` (``--force-unlock``)
takes it regardless; the old holder then finds another token at its next renewal and sets
``lost``, which a run checks to stop. No torch here (``hold_for_ranks`` imports it when called).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import socket
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from mimcli.errors import MimcliError
from mimcli.fileio import write_json

LOCK_FILE = ".mimcli.lock"
GUARD_FILE = ".mimcli.lock.guard"  # flock-ed around read-check-writes of LOCK_FILE
LEASE_S = 120.0  # a foreign holder's heartbeat older than this is stale; MIMCLI_LOCK_LEASE_S
_HELD: weakref.WeakValueDictionary[str, RunLock] = weakref.WeakValueDictionary()
F = TypeVar("F", bound=Callable[..., Any])


def lease_seconds(lease_s: float | None = None) -> float:
    value = lease_s or os.environ.get("MIMCLI_LOCK_LEASE_S") or LEASE_S
    try:
        return float(value)
    except ValueError:
        raise MimcliError(f"MIMCLI_LOCK_LEASE_S={value!r}: give the lease in seconds") from None


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), if known:
    a pid reused by another process then differs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)" start at field 3


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return start is None or _pid_start(pid) in (None, start)


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's holder; None when there is no lock file. An unreadable one is {}."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(holder: dict[str, Any]) -> str:
    """``refine (pid 123 on host h, started ..., last heartbeat 5 s ago)``."""
    if not holder:
        return f"an unknown run (its {LOCK_FILE} is unreadable)"
    beat = time.time() - float(holder.get("heartbeat", 0.0))
    return (
        f"{holder.get('command', '?')} (pid {holder.get('pid', '?')} on host "
        f"{holder.get('host', '?')}, started {_utc(float(holder.get('started', 0.0)))}, "
        f"last heartbeat {max(beat, 0.0):.0f} s ago)"
    )


def _stale(holder: dict[str, Any], path: Path, lease: float) -> bool:
    if not holder:  # unreadable: stale once nobody rewrote it for a lease
        with contextlib.suppress(OSError):
            return time.time() - path.stat().st_mtime > lease
        return True
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if pid == os.getpid():  # this process: held while a RunLock with its token lives
            gc.collect()
            return holder.get("token") not in _HELD
        return pid <= 0 or not _alive(pid, holder.get("pid_start"))
    return time.time() - float(holder.get("heartbeat", 0.0)) > lease


class RunLock:
    """This process's hold on ``RUN/.mimcli.lock``; see :func:`acquire`."""

    def __init__(self, root: Path, command: str, lease_s: float) -> None:
        self.root, self.path, self.command = root, root / LOCK_FILE, command
        self.lease_s, self.token, self.started = lease_s, uuid.uuid4().hex, time.time()
        self._lost, self._released = False, False
        self._stop = threading.Event()
        self.resumable = command == "refine"
        self.made_dir = False  # removed again on release when still empty

    def record(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "pid_start": _pid_start(os.getpid()),
            "command": self.command,
            "started": self.started,
            "started_utc": _utc(self.started),
            "heartbeat": time.time(),
            "token": self.token,
        }

    def _create(self) -> bool:
        """Write the lock only if there is none (link of a complete temporary file: atomic)."""
        tmp = write_json(self.path.with_name(f"{LOCK_FILE}.{self.token}"), self.record())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some FUSE/SMB mounts): exclusive create instead
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(tmp.read_bytes())
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _start(self) -> None:
        _HELD[self.token] = self
        weakref.finalize(self, _remove_if_ours, self.path, self.token)
        ref, period = weakref.ref(self), self.lease_s / 4
        threading.Thread(target=_renew_loop, args=(ref, self._stop, period), daemon=True).start()

    def renew(self) -> bool:
        """Refresh the heartbeat; False (and ``lost``) once the file holds another token."""
        if self._released or self._lost:
            return False
        with _guarded(self.path):  # no takeover between the check and the write
            holder = _read(self.path)
            if not holder or holder.get("token") != self.token:
                self._lost = True
                return False
            write_json(self.path, {**holder, "heartbeat": time.time()})
        return True

    @property
    def lost(self) -> bool:
        """Whether another run took the lock (``--force-unlock``, or a takeover)."""
        return self._lost

    def lost_line(self) -> str:
        holder = _read(self.path)
        who = describe(holder) if holder else "another run, since gone"
        line = f"{self.root} was taken over by {who} while this {self.command} used it: stopping"
        return line + (" (continue from its last checkpoint with --resume)" * self.resumable)

    def release(self) -> None:
        """Stop renewing and remove the lock if it still holds our token (idempotent)."""
        if not self._released:
            self._released = True
            self._stop.set()
            _HELD.pop(self.token, None)
            _remove_if_ours(self.path, self.token)
            if self.made_dir:
                with contextlib.suppress(OSError):
                    if [p.name for p in self.root.iterdir()] == [GUARD_FILE]:
                        (self.root / GUARD_FILE).unlink()
                    self.root.rmdir()  # only if empty: a run that failed before writing

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _remove_if_ours(path: Path, token: str) -> None:
    with _guarded(path):
        holder = _read(path)
        if holder and holder.get("token") == token:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _guarded(path: Path) -> Iterator[None]:
    """Hold ``GUARD_FILE`` beside the lock (``flock``: between processes on this host, and on
    NFS through its byte-range locks) around a read-check-write of the lock file, which a
    rename replaces and so cannot be locked itself. Where ``flock`` is missing or refused, the
    re-read after a takeover still catches a lost race at the next renewal."""
    try:
        import fcntl

        fd = os.open(path.with_name(GUARD_FILE), os.O_CREAT | os.O_RDWR, 0o666)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the flock


def _renew_loop(ref: weakref.ref[RunLock], stop: threading.Event, period: float) -> None:
    while not stop.wait(period):
        lock = ref()
        if lock is None or not lock.renew():
            return
        del lock


def acquire(
    root: str | os.PathLike[str], command: str, force: bool = False, lease_s: float | None = None
) -> RunLock:
    """Hold run folder ``root`` (created if missing) for ``command``.

    Raises:
        MimcliError: another live run holds it (the line names it and ``--force-unlock``).
    """
    lock = RunLock(Path(root), command, lease_seconds(lease_s))
    lock.made_dir = not lock.root.exists()
    try:
        lock.root.mkdir(parents=True, exist_ok=True)
        return _acquire(lock, force)
    except OSError as exc:
        raise MimcliError(f"{root}: cannot write its lock file {LOCK_FILE} ({exc})") from exc


def _acquire(lock: RunLock, force: bool) -> RunLock:
    root = lock.root
    for _ in range(20):
        if lock._create():
            lock._start()
            return lock
        holder = _read(lock.path)
        if holder is None:  # released in between: try again
            continue
        if not force and not _stale(holder, lock.path, lock.lease_s):
            raise MimcliError(
                f"{root} is in use by {describe(holder)}; wait for it, or if that run is gone "
                "pass --force-unlock"
            )
        with _guarded(lock.path):
            if (_read(lock.path) or {}).get("token") != holder.get("token"):
                continue  # changed since it was read (a takeover or a release): look again
            why = "--force-unlock" if force else "stale lock"
            warnings.warn(
                f"{root}: {why}: taking over the lock of {describe(holder)}", stacklevel=3
            )
            write_json(lock.path, lock.record())
        time.sleep(0.2)  # another run taking over at once: the last write wins, both see it
        if (_read(lock.path) or {}).get("token") == lock.token:
            lock._start()
            return lock
        force = False  # another run won the takeover: it is the holder now
    raise MimcliError(f"{root}: could not take its lock {LOCK_FILE}; try again")


def release(lock: RunLock | None) -> None:
    if lock is not None:
        lock.release()


def hold_for_ranks(
    root: str | os.PathLike[str], command: str, force: bool = False, lease_s: float | None = None
) -> RunLock | None:
    """:func:`acquire` under torchrun: rank 0 takes the lock and tells the others; every rank
    raises the same error when it fails. None on the other ranks (and their ``lost`` is rank
    0's to share)."""
    from mimcli import distributed as dist

    if not dist.is_distributed():
        return acquire(root, command, force, lease_s)
    lock, error, cause = None, None, None
    if dist.rank() == 0:
        try:
            lock = acquire(root, command, force, lease_s)
        except Exception as exc:  # every rank must reach the broadcast
            error, cause = (str(exc) if isinstance(exc, MimcliError) else f"{root}: {exc}"), exc
    error = dist.broadcast_object(error)
    if error is not None:
        raise MimcliError(error) from cause
    return lock


def released_on_error(init: F) -> F:
    """For an ``__init__`` that sets ``self.lock``: release it when the rest of ``__init__``
    raises (the object never runs, so nothing else would)."""

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except BaseException:
            release(getattr(self, "lock", None))
            raise

    return wrapper  # type: ignore[return-value]
