"""A logging window of the refine loop: each step's loss and metrics are added on the device,
and read on the host once, at the window's last step.

Reading a value of a GPU tensor on the host (``float``, ``.item()``, ``.tolist()``) waits for
every kernel queued before it. The loop therefore keeps the window's sums where the values are
computed and reads them together: on a logging step, one stacked tensor (each step's loss, the
metric sums and counts, the objective's alarms) is summed over ranks with one all-reduce and
copied to the host with one ``tolist()``. No other step reads anything.

What a window reports (one ``metrics.jsonl`` record):

* ``loss``: the mean of its steps' losses over the steps and the ranks;
* each metric: the mean over the steps and ranks where it was defined (NaN marks a value that is
  not defined at a step, e.g. neighbour-label agreement before any real neighbour is in the
  queue; a metric defined nowhere in the window stays NaN);
* metrics given as host floats (a schedule, the same on every rank): their mean over the steps;
* the first step whose loss was not finite, if any (every step's loss is kept, not only the sum);
* the alarm counts of :meth:`mimcli.objectives.base.Objective.alarms`, summed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mimcli import distributed as dist


@dataclass
class WindowMeans:
    """What :meth:`MetricWindow.read` returns."""

    steps: int
    loss: float  # mean over steps and ranks (NaN/inf when a step's loss was not finite)
    metrics: dict[str, float]  # in the order the objective returned them
    first_non_finite: int | None  # the first step (as given to add) whose loss was not finite
    alarms: dict[str, float] = field(default_factory=dict)  # message -> count over ranks


class MetricWindow:
    """Sums of the loss and metrics of up to ``capacity`` steps, on ``device``.

    Args:
        device: where the objective's metrics live.
        capacity: the longest window (``--log-every``): each step's loss has its own slot.
    """

    def __init__(self, device: torch.device, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a logging window holds at least one step, got {capacity}")
        self.device = device
        self.capacity = capacity
        # float64 where the device has it (MPS has not): a window of float32 losses summed
        # exactly enough that --log-every 1 gives each step's loss as before
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.losses = torch.zeros(capacity, dtype=self.dtype, device=device)  # one slot a step
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self.first_step = 0
        self.order: list[str] = []  # every metric key, in the objective's order
        self.device_keys: list[str] = []
        self.sums: Tensor | None = None
        self.counts: Tensor | None = None
        self.host: dict[str, list[float]] = {}  # key -> [sum, count] of host floats

    def __len__(self) -> int:
        return self.steps

    def add(self, step: int, loss: Tensor, metrics: dict[str, Tensor | float]) -> None:
        """Add one step's loss and metrics (kernels only: nothing is read from the device)."""
        if self.steps >= self.capacity:
            raise RuntimeError(f"a logging window of {self.capacity} steps is full; read it first")
        device_keys = [k for k, v in metrics.items() if isinstance(v, Tensor)]
        if self.steps == 0:
            self.first_step = step
            self.order, self.device_keys = list(metrics), device_keys
            n = len(device_keys)
            self.sums = torch.zeros(n, dtype=self.dtype, device=self.device)
            self.counts = torch.zeros(n, dtype=self.dtype, device=self.device)
        elif list(metrics) != self.order:
            raise RuntimeError(
                f"the objective's metrics changed within a logging window: {self.order} -> "
                f"{list(metrics)}"
            )
        self.losses[self.steps] = loss.detach().reshape(())
        if device_keys:
            assert self.sums is not None and self.counts is not None
            values = torch.stack(
                [metrics[k].detach().to(self.device).reshape(()).float() for k in device_keys]  # type: ignore[union-attr]
            ).to(self.dtype)
            defined = ~torch.isnan(values)
            self.sums += torch.where(defined, values, torch.zeros_like(values))
            self.counts += defined
        for k, v in metrics.items():
            if not isinstance(v, Tensor) and not math.isnan(float(v)):
                entry = self.host.setdefault(k, [0.0, 0.0])
                entry[0] += float(v)
                entry[1] += 1
        self.steps += 1

    def state(self) -> dict[str, Any] | None:
        """This rank's unread window as plain numbers (one read from the device), for a
        checkpoint written mid-window (Ctrl-C, SIGTERM, a timed checkpoint); None when empty.
        :meth:`restore` puts it back exactly, so the resumed run logs the same window."""
        if self.steps == 0:
            return None
        assert self.sums is not None and self.counts is not None
        return {
            "steps": self.steps,
            "first_step": self.first_step,
            "order": list(self.order),
            "device_keys": list(self.device_keys),
            "losses": self.losses[: self.steps].tolist(),
            "sums": self.sums.tolist(),
            "counts": self.counts.tolist(),
            "host": {k: list(v) for k, v in self.host.items()},
        }

    def restore(self, state: dict[str, Any] | None) -> None:
        """Continue the window :meth:`state` saved (nothing when it is None)."""
        self._reset()
        if not state:
            return
        steps = int(state["steps"])
        if steps > self.capacity:
            raise ValueError(f"a saved window of {steps} steps exceeds {self.capacity}")
        self.steps, self.first_step = steps, int(state["first_step"])
        self.order, self.device_keys = list(state["order"]), list(state["device_keys"])
        self.losses[:steps] = torch.tensor(state["losses"], dtype=self.dtype)
        self.sums = torch.tensor(state["sums"], dtype=self.dtype, device=self.device)
        self.counts = torch.tensor(state["counts"], dtype=self.dtype, device=self.device)
        self.host = {k: [float(a), float(b)] for k, (a, b) in state["host"].items()}

    def read(self, alarms: dict[str, Tensor] | None = None) -> WindowMeans:
        """The window's means (over steps and ranks), then start a new window.

        One all-reduce of one stacked tensor under torchrun (every rank must call this at the
        same steps) and one copy to the host.

        Args:
            alarms: message -> 0-dim count on the device (the objective's); summed over ranks.
        """
        if self.steps == 0:
            raise RuntimeError("an empty logging window has nothing to read")
        assert self.sums is not None and self.counts is not None
        alarms = alarms or {}
        parts = [self.losses[: self.steps], self.sums, self.counts]
        parts += [a.detach().to(self.device).reshape(1).to(self.dtype) for a in alarms.values()]
        packed = torch.cat(parts)
        dist.all_reduce_sum_(packed)
        values = packed.tolist()  # the one read of the window
        world = dist.world_size()
        n, k = self.steps, len(self.device_keys)
        losses = values[:n]
        sums, counts = values[n : n + k], values[n + k : n + 2 * k]
        bad = [i for i, x in enumerate(losses) if not math.isfinite(x)]
        device_means = {
            key: (s / c if c else float("nan"))
            for key, s, c in zip(self.device_keys, sums, counts, strict=True)
        }
        metrics = {}
        for key in self.order:
            if key in device_means:
                metrics[key] = device_means[key]
            else:
                total, count = self.host.get(key, (0.0, 0.0))
                metrics[key] = total / count if count else float("nan")
        means = WindowMeans(
            steps=n,
            loss=sum(losses) / (n * world),
            metrics=metrics,
            first_non_finite=self.first_step + bad[0] if bad else None,
            alarms=dict(zip(alarms, values[n + 2 * k :], strict=True)),
        )
        self._reset()
        return means
