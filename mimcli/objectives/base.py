"""The contract between the refine loop and an objective: what an objective is built from
(:class:`ObjectiveContext`) and what the loop calls on it (:class:`Objective`).

The loop (:mod:`mimcli.refine.loop`) owns the encoder, its EMA, the optimiser, the data, runs,
resume and DDP. An :class:`Objective` owns everything else a method adds: heads, projectors,
decoders, mask tokens (trainable, in ``state_dict``), queues and momentum networks (not trained
by the optimiser, in ``state_dict``) and frozen teachers (neither: reloaded from ``--teacher`` on
resume, never written to checkpoints). Each step the loop calls::

    loss, metrics = objective.step(encoder, batch, stage, step)   # forward + losses
    ... backward, optimiser step ...
    objective.after_step(encoder, stage, step)                    # queues, momentum updates

A step must not make the host wait for the device: no ``float()``/``int()``/``bool()``/
``.item()``/``.tolist()``/``.cpu()`` of device values, no ``nonzero``, boolean-mask indexing or
``unique`` in ``step``, ``after_step`` or what they call (``tests/test_sync_free.py`` counts them).
Metrics are returned as 0-dim device tensors (host floats only for values known on the host,
such as a schedule); the loop sums them on the device and reads them once per logging window.
Conditions that must stop the run but are only known on the device (a queue with no valid
neighbour) are counted on the device and reported through :meth:`Objective.alarms`.

Building blocks live beside it: :mod:`mimcli.objectives.parts` (single view, outside-autograd,
per-step generators), :mod:`mimcli.models.masked` (masks, mask-token and visible-token passes),
:mod:`mimcli.models.teacher` (frozen teachers), :mod:`mimcli.ema` (momentum networks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn

from mimcli.views import MultiCropTransform, ViewBatch, ViewConfig

if TYPE_CHECKING:
    from mimcli.models.sources import LoadedModel
    from mimcli.refine.config import RefineConfig

Transform = Callable[[Image.Image], list[Tensor]]


@dataclass
class ObjectiveContext:
    """What an objective is built from (all resolved by the loop before construction).

    Attributes:
        cfg: the run's ``RefineConfig`` (objective options: ``teacher``, ``mask_ratio``,
            ``momentum``, ``image_weight``, ``mimic_weight``, ``reconstruction``, ``decoder``,
            ``temperature``, ``topk``, ``queue_size``, ``head_width``, ``head_input``...; options
            left at None were already filled from the objective's :meth:`Objective.defaults`).
        encoder: the trainable encoder (timm ViT, ``dynamic_img_size`` where supported).
        loaded: the ``LoadedModel`` it came from (arch, pretrained_cfg, decoder weights, ...).
        blocks: 1-based blocks chosen for heads (objectives without per-block heads may ignore).
        views: crop sizes, scales, mean/std and interpolation of the training views.
        device: where training runs.
        dataset_size: number of training images (queue sizing).
        seed: run seed (objectives seed their own generators from it).
        sync_bn: build BatchNorms synchronised across ranks (True under DDP).
        totals: steps of each stage, ``{"heads": H, "refine": R}`` (momentum schedules).
        extra: loop-provided extras (``labels_by_id``: labels of the dataset ids, monitoring
            only, or None for unlabelled data).
    """

    cfg: RefineConfig
    encoder: nn.Module
    loaded: LoadedModel
    blocks: list[int]
    views: ViewConfig
    device: torch.device
    dataset_size: int
    seed: int
    sync_bn: bool = False
    totals: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class of refinement objectives (see the module docstring for the contract).

    Subclasses set ``name`` and implement :meth:`step`; most also override :meth:`defaults`,
    :meth:`transform`, :meth:`after_step` and :meth:`describe`.
    """

    name: ClassVar[str] = ""
    # whether --blocks means anything to this objective (per-block heads)
    uses_blocks: ClassVar[bool] = False

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__()
        self.ctx = ctx

    # -- options --
    @classmethod
    def defaults(cls, depth: int, embed_dim: int) -> dict[str, Any]:
        """Values for ``RefineConfig`` fields the user left at None (``blocks``, ``head_input``,
        ``local_crops``, ``freeze_blocks``, ``lr``, ``temperature``, ``photometric``,
        ``mask_ratio``, ``momentum``...). Anything not given here falls back to the NNA value."""
        return {}

    # -- data --
    def transform(self) -> Transform:
        """PIL image -> list of view tensors for one sample (default: the multi-crop views)."""
        return MultiCropTransform(self.ctx.views)

    # -- optimisation --
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser trains in both stages (heads, projectors, decoders, mask
        tokens). Momentum networks and queues hold no trainable parameters."""
        return [p for p in self.parameters() if p.requires_grad]

    def step(
        self, encoder: nn.Module, batch: ViewBatch, stage: str, step: int
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Forward pass and loss of one step.

        Args:
            encoder: the trainable encoder; in the ``heads`` stage it is frozen (eval mode, not in
                the optimiser), so compute its features without gradient unless something
                trainable sits upstream of it (a mask token).
            batch: the views made by :meth:`transform` for this rank's samples, plus dataset
                indices (seeding, queue ids) and labels (monitoring only; never used for loss).
            stage: ``"heads"`` (warm-up) or ``"refine"``.
            step: step within the stage, counted from 0 (seed per-step randomness from it so a
                resumed run repeats the same masks).

        Returns:
            ``(loss, metrics)``: a scalar loss to minimise and what to log, each a 0-dim
            tensor on the device (or a host float); the same keys every step of a stage. NaN
            means "not defined at this step" (left out of the window's mean).
        """
        raise NotImplementedError

    def alarms(self) -> dict[str, Tensor]:
        """Errors found on the device, read by the loop with the metrics at its logging steps
        (never on other steps): message -> 0-dim count on the device; a count above zero stops
        the run with ``MimcliError(message)`` before anything is saved. Default: none."""
        return {}

    def after_step(self, encoder: nn.Module, stage: str, step: int) -> None:
        """Called after the optimiser step: enqueue, update momentum networks."""

    def rank_state(self) -> Any:
        """State that differs between ranks (a per-rank random generator), gathered from every
        rank into the checkpoint; None when there is none."""
        return None

    def load_rank_state(self, state: Any) -> None:
        """Restore what :meth:`rank_state` returned on this rank."""

    def describe(self) -> dict[str, Any]:
        """Resolved settings for ``config.json`` (key ``objective`` = the name)."""
        return {"objective": self.name}

    def views_summary(self) -> str:
        """How many views of which size each image gives (the refine banner)."""
        v = self.ctx.views
        text = f"2x{v.global_size}px"
        return text + (f" + {v.local_crops}x{v.local_size}px" if v.local_crops else "")

    def summary(self) -> str:
        """One line for the refine banner: what was built (heads, teachers, decoder...)."""
        return ", ".join(f"{k} {v}" for k, v in self.describe().items() if k != "objective")
