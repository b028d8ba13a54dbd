"""MAE-CT contrastive tuning (Lehner et al., 2023, arXiv 2304.10520) as a refinement objective:
one NNCLR head (Dwibedi et al., 2021, arXiv 2104.14548) on the last block.

Differences from NNA (:mod:`mimcli.objectives.nna`), per METHOD §2:

- one head, on the last block, fed the mean patch token after the final norm by default;
- ReLU heads, predictor without its final BatchNorm;
- NNCLR loss: the neighbour in every entry of a row (:func:`nnclr_loss`), symmetric over the two
  views;
- the queue holds (and is searched with) outputs of an EMA copy of the projector (momentum 0.99,
  0.995 for ViT-H and wider), not the online projections;
- as in the NNA path, the head warm-up takes the nearest neighbour and refinement draws among the
  top-k (METHOD §2 names only the top-20 draw for MAE-CT; our choice, shared with NNA);
- the stem and the first half of the blocks frozen; crop + flip only (no colour augmentations),
  no local crops; lr 1e-4 × (2 × batch)/256, i.e. 2e-4 × batch/256; tau 0.15 (ViT-B and
  smaller), 0.2 (ViT-L), 0.3 (ViT-H and wider).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mimcli.ema import ema_update, momentum_copy
from mimcli.objectives.base import ObjectiveContext
from mimcli.objectives.nna import NNAObjective, nnclr_loss

__all__ = ["NNCLRObjective", "nnclr_loss", "default_nnclr_temperature"]


def default_nnclr_temperature(embed_dim: int) -> float:
    """MAE-CT's values: 0.15 for ViT-B (768) and smaller, 0.2 for ViT-L (1024), 0.3 above."""
    if embed_dim <= 768:
        return 0.15
    return 0.2 if embed_dim <= 1024 else 0.3


class NNCLRObjective(NNAObjective):
    """MAE-CT: NNCLR with an EMA target projector filling the queue."""

    name = "nnclr"
    loss_kind = "nnclr"
    activation = "relu"
    predictor_final_bn = False

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        self.momentum = float(ctx.cfg.momentum)
        self.target_projectors = nn.ModuleDict(
            {str(b): momentum_copy(self.heads.head(b).projector) for b in self.blocks}
        )

    @classmethod
    def defaults(cls, depth: int, embed_dim: int) -> dict[str, Any]:
        return {
            "blocks": "last1",
            "head_input": "patch",
            "local_crops": 0,
            "photometric": False,
            "freeze_blocks": depth // 2,
            "lr": 2e-4,
            "temperature": default_nnclr_temperature(embed_dim),
            "momentum": 0.99 if embed_dim < 1280 else 0.995,
        }

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "target_momentum": self.momentum}

    def summary(self) -> str:
        return f"{super().summary()}; EMA projector {self.momentum}"

    def targets(self, block: int, z: Tensor, x: Tensor) -> Tensor:
        """The EMA projector's output on the same inputs (searched in and enqueued)."""
        target = self.target_projectors[str(block)]
        target.train(self.heads.training)
        return target(x.detach()).detach()

    def after_step(self, encoder: nn.Module, stage: str, step: int) -> None:
        super().after_step(encoder, stage, step)
        for block in self.blocks:
            ema_update(
                self.target_projectors[str(block)],
                self.heads.head(block).projector,
                self.momentum,
            )
