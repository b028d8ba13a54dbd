"""Refinement objectives, one module each; losses are pure functions of tensors.

``nna`` (MIM-Refiner), ``nnclr`` (MAE-CT), ``mimco`` (MimCo), ``conmim`` (ConMIM), ``mrmae``
(MR-MAE). :func:`objective_class` imports only the module asked for.
"""

from __future__ import annotations

import importlib

from mimcli.errors import MimcliError
from mimcli.objectives.nna import alignment, multiview_loss, nna_loss, nnclr_loss

OBJECTIVES = {
    "nna": ("mimcli.objectives.nna", "NNAObjective"),
    "nnclr": ("mimcli.objectives.nnclr", "NNCLRObjective"),
    "mimco": ("mimcli.objectives.mimco", "MimCoObjective"),
    "conmim": ("mimcli.objectives.conmim", "ConMIMObjective"),
    "mrmae": ("mimcli.objectives.mrmae", "MRMAEObjective"),
}


def objective_class(name: str) -> type:
    """The objective class registered under ``name``."""
    if name not in OBJECTIVES:
        raise MimcliError(f"--objective {name!r}: choose one of {', '.join(OBJECTIVES)}")
    module, attr = OBJECTIVES[name]
    return getattr(importlib.import_module(module), attr)


__all__ = [
    "OBJECTIVES",
    "alignment",
    "multiview_loss",
    "nna_loss",
    "nnclr_loss",
    "objective_class",
]
