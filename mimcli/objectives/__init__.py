"""The registry of refinement objectives: everything mimcli knows about an objective outside its
own module (its module and class, the options it reads, how their values are checked, and what a
model card says about it) is declared here, once. Nothing here imports torch;
:func:`objective_class` imports only the module asked for.

``nna`` (MIM-Refiner), ``nnclr`` (MAE-CT), ``mimco`` (MimCo), ``conmim`` (ConMIM), ``mrmae``
(MR-MAE). Adding one: a module with an :class:`~mimcli.objectives.base.Objective` subclass and an
entry in :data:`OBJECTIVES`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mimcli.errors import MimcliError

if TYPE_CHECKING:
    from mimcli.objectives.base import Objective


@dataclass(frozen=True)
class ObjectiveInfo:
    """One objective, as the rest of mimcli sees it.

    Attributes:
        module: module holding the class (imported on demand).
        cls: the :class:`Objective` subclass's name.
        options: the objective options it reads (``RefineConfig`` fields); setting another
            objective's option warns.
        title: method and paper, for the model card.
        tag: the Hub tag of its family.
        sentence: how the card says what refinement did.
    """

    module: str
    cls: str
    options: tuple[str, ...]
    title: str
    tag: str
    sentence: str


OBJECTIVES: dict[str, ObjectiveInfo] = {
    "nna": ObjectiveInfo(
        "mimcli.objectives.nna",
        "NNAObjective",
        ("temperature", "blocks", "head_input", "local_crops", "probe"),
        "Nearest Neighbour Alignment, MIM-Refiner, arXiv 2402.10093",
        "mim-refiner",
        "MIM-Refiner recipe: ID heads on intermediate blocks were trained with Nearest "
        "Neighbour Alignment",
    ),
    "nnclr": ObjectiveInfo(
        "mimcli.objectives.nnclr",
        "NNCLRObjective",
        ("momentum", "temperature", "blocks", "head_input", "local_crops", "probe"),
        "NNCLR contrastive tuning, MAE-CT, arXiv 2304.10520",
        "mae-ct",
        "MAE-CT recipe: an NNCLR head on the last block was trained against a queue of "
        "nearest neighbours",
    ),
    "mimco": ObjectiveInfo(
        "mimcli.objectives.mimco",
        "MimCoObjective",
        ("teacher", "mask_ratio", "image_weight", "temperature"),
        "contrastive teacher, MimCo, arXiv 2209.03063",
        "mimco",
        "MimCo objective: the masked encoder was trained to match a frozen contrastive "
        "teacher, patch by patch and image by image",
    ),
    "conmim": ObjectiveInfo(
        "mimcli.objectives.conmim",
        "ConMIMObjective",
        ("mask_ratio", "momentum", "temperature"),
        "intra-image patch contrast, ConMIM, arXiv 2205.09616",
        "conmim",
        "ConMIM objective: masked patches were trained to find their own position among "
        "a momentum encoder's patch features",
    ),
    "mrmae": ObjectiveInfo(
        "mimcli.objectives.mrmae",
        "MRMAEObjective",
        ("teacher", "mask_ratio", "mimic_weight", "decoder", "reconstruction"),
        "mimic before reconstruct, MR-MAE, arXiv 2303.05475",
        "mr-mae",
        "MR-MAE objective: visible tokens were trained to mimic frozen teachers while the "
        "MAE decoder reconstructs the masked pixels",
    ),
}

# What options left at None mean when the objective has no default of its own (NNA's values).
FALLBACK_DEFAULTS: dict[str, Any] = {
    "blocks": "auto",
    "head_input": "cls",
    "local_crops": 10,
    "photometric": True,
    "freeze_blocks": 0,
    "lr": 4e-4,
}

# Objective options with their unset value (anything else counts as "given").
UNSET: dict[str, Any] = {"teacher": [], "reconstruction": True}

# Checks of objective option values, run on what the user gave before any work starts:
# option -> (test, what the value must be).
OPTION_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda v: 0 < v < math.inf, "must be positive"),
    "momentum": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    "mask_ratio": (lambda v: 0 < v < 1, "must lie strictly between 0 and 1"),
    "image_weight": (lambda v: 0 <= v < math.inf, "must be 0 or more"),
    "mimic_weight": (lambda v: 0 <= v < math.inf, "must be 0 or more"),
}


def flag(option: str) -> str:
    """The command-line flag of a ``RefineConfig`` option."""
    return "--no-reconstruction" if option == "reconstruction" else "--" + option.replace("_", "-")


def objective_info(name: str) -> ObjectiveInfo:
    """The registry entry of ``name`` (one clear line for an unknown name)."""
    if name not in OBJECTIVES:
        raise MimcliError(f"--objective {name!r}: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def objective_class(name: str) -> type[Objective]:
    """The objective class registered under ``name``."""
    info = objective_info(name)
    return getattr(importlib.import_module(info.module), info.cls)


def objective_defaults(name: str, depth: int, embed_dim: int) -> dict[str, Any]:
    """Values for options left unset: the objective's own defaults, then NNA's."""
    return {**FALLBACK_DEFAULTS, **objective_class(name).defaults(depth, embed_dim)}


def check_option_values(values: dict[str, Any]) -> None:
    """One clear line for the first objective option whose given value is out of range."""
    for option, (ok, rule) in OPTION_CHECKS.items():
        value = values.get(option)
        if value is not None and not ok(value):
            raise MimcliError(f"{flag(option)} {rule}, got {value}")


def ignored_options(name: str, values: dict[str, Any], depth: int, embed_dim: int) -> list[str]:
    """Flags set to something other than their default that objective ``name`` does not read
    (shown as warnings)."""
    defaults = objective_defaults(name, depth, embed_dim)
    readers = objective_info(name).options
    out = []
    for option in sorted({o for info in OBJECTIVES.values() for o in info.options}, key=_order):
        value = values.get(option)
        if value is None or value == UNSET.get(option) or value == defaults.get(option):
            continue
        if option not in readers:
            out.append(flag(option))
    return out


# the order the warnings name flags in (as the options appear in ``refine --help``)
_ORDER = (
    "teacher", "mask_ratio", "momentum", "image_weight", "mimic_weight", "decoder",
    "reconstruction", "temperature", "blocks", "head_input", "local_crops", "probe",
)  # fmt: skip


def _order(option: str) -> int:
    return _ORDER.index(option) if option in _ORDER else len(_ORDER)


__all__ = [
    "FALLBACK_DEFAULTS",
    "OBJECTIVES",
    "ObjectiveInfo",
    "check_option_values",
    "flag",
    "ignored_options",
    "objective_class",
    "objective_defaults",
    "objective_info",
]
