"""Stopping a refine run cleanly: Ctrl-C (SIGINT) and SIGTERM (what Slurm and Kubernetes send
before they kill a job) during training finish the current step, save a checkpoint and stop, so
at most that step is lost; a second Ctrl-C stops at once. Outside the training loop (loading,
probing, indexing data) a signal stops the run at once, as Ctrl-C always did.

The file-size limit's SIGXFSZ (``ulimit -f``) is ignored while a run is on, so a write past the
limit fails with ``EFBIG`` and becomes one line instead of killing the process.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's start: Ctrl-C reaches the whole process group and Slurm signals
    every process of a job, but only the main process decides when to stop (it shuts the
    workers down itself); a worker killed by SIGTERM would fail the step it feeds."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopRequests:
    """Signal handlers for the length of a run (main thread only; elsewhere nothing changes).

    ``deferring`` is True while the loop can stop at a step's end: a signal then only sets
    :attr:`signum`; otherwise it raises :class:`KeyboardInterrupt` where the program is.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferring = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        insisting = self.signum is not None and signum == signal.SIGINT
        if self.signum is None:
            self.signum = signum
        if insisting or not self.deferring:
            raise KeyboardInterrupt

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return SIGNAL_NAMES.get(self.signum or signal.SIGINT, f"signal {self.signum}")

    @contextmanager
    def installed(self) -> Iterator[StopRequests]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in SIGNAL_NAMES:
            self._old[sig] = signal.signal(sig, self._handle)
        if hasattr(signal, "SIGXFSZ"):
            self._old[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            yield self
        finally:
            for sig, old in self._old.items():
                signal.signal(sig, old)
            self._old.clear()

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """While inside, a signal waits for the loop (see :attr:`deferring`)."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
