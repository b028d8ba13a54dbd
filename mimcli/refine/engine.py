"""What torch's ``DistributedDataParallel`` wraps during refinement.

DDP averages only the gradients of computation that runs inside the wrapped module's
``forward()``; the objectives call ``forward_intermediates``, ``patch_embed`` and ``blocks``
directly, so wrapping the bare encoder would average nothing (no error: the ranks would just drift
apart). :class:`StepModule`'s ``forward()`` is the differentiable part of ``objective.step``, and
it is built per stage over what that stage trains: in the head warm-up the encoder is not one of
its submodules (DDP must not wait for gradients it never gets), in refinement it is.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from mimcli import distributed as dist
from mimcli.objectives.base import Objective
from mimcli.views import ViewBatch


class StepModule(nn.Module):
    """``forward(batch, stage, step) -> (loss, metrics)``: the objective's step on the encoder."""

    def __init__(self, encoder: nn.Module, objective: Objective, train_encoder: bool) -> None:
        super().__init__()
        self.objective = objective
        if train_encoder:
            self.encoder = encoder
        else:  # a plain attribute, not a submodule: DDP sees only what the stage trains
            self.__dict__["frozen_encoder"] = encoder

    def forward(self, batch: ViewBatch, stage: str, step: int) -> tuple[Tensor, dict[str, Any]]:
        if "encoder" in self._modules:
            encoder = self._modules["encoder"]
        else:
            encoder = self.__dict__["frozen_encoder"]
        return self.objective.step(encoder, batch, stage, step)


def step_module(encoder: nn.Module, objective: Objective, stage: str) -> nn.Module:
    """The module a stage's steps run through: under torchrun, wrapped in DDP.

    ``broadcast_buffers=False``: the queues are buffers, identical on every rank by construction
    (every rank enqueues the gathered batch), and re-sending them each step would cost a queue's
    size per step. ``static_graph=True``: the parameters a stage uses are the same every step, so
    DDP learns once which ones get no gradient (e.g. blocks after the deepest head) instead of
    searching the graph each step.
    """
    module = StepModule(encoder, objective, train_encoder=stage != "heads")
    if not dist.is_distributed():
        return module
    with warnings.catch_warnings():
        # torch 2.14 deprecates broadcast_buffers for forward_sync_buffers, whose False still
        # broadcasts every buffer (the queues) at init; the old flag is the one that does not
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated")
        return DistributedDataParallel(
            module, device_ids=None, broadcast_buffers=False, static_graph=True
        )
