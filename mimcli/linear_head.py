"""The linear-probe head ``mimcli eval --save-heads`` keeps for each model: the best cell's
BatchNorm statistics and Linear layer (``head.safetensors``) and the recipe of its input features,
class names and eval transform (``head.json``). :func:`load_head` gives it back as a module that
maps timm's ``forward_intermediates`` output to logits.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimcli.errors import MimcliError
from mimcli.fileio import write_json, write_with

HEAD_WEIGHTS, HEAD_RECIPE = "head.safetensors", "head.json"
FORMAT = "mimcli-linear-head"
TENSORS = ("weight", "bias", "mean", "var")
TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def head_folder_name(model_name: str) -> str:
    """The folder of a model's head under ``--save-heads``: its eval column name with anything
    but letters, digits, ``.``, ``_`` and ``-`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("._") or "model"


def feature_recipe(features: str, cached_blocks: Sequence[int]) -> dict[str, Any]:
    """How the head's input vector is built (see ``evaluate.linear.select_sets``).

    Args:
        features: the linear probe's feature set, e.g. ``cls+patch@last4``.
        cached_blocks: the 1-based blocks eval extracted, ascending (the last is the last block).

    Returns:
        {"features", "blocks" (1-based), "indices" (0-based, for ``forward_intermediates``),
        "tokens" ("cls" or "cls+patch")}: the input is, block after block in ascending order,
        the CLS token, then (for ``cls+patch``) the mean patch token, all before the final norm.
    """
    tokens, which = features.split("@")
    blocks = list(cached_blocks)[-4:] if which == "last4" else [cached_blocks[-1]]
    return {
        "features": features,
        "blocks": [int(b) for b in blocks],
        "indices": [int(b) - 1 for b in blocks],
        "tokens": tokens,
    }


def save_head(folder: Path, tensors: dict[str, torch.Tensor], recipe: dict[str, Any]) -> Path:
    """Write ``head.safetensors`` and ``head.json`` to ``folder`` (each atomically)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    write_with(
        folder / HEAD_WEIGHTS,
        lambda tmp: save_file(
            {k: tensors[k].contiguous() for k in TENSORS}, str(tmp), metadata={"format": "pt"}
        ),
    )
    write_json(folder / HEAD_RECIPE, {"format": FORMAT, "version": 1, **recipe})
    return folder


def read_head(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and recipe of a saved head, checked against each other (one line if not)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    where = f"{folder}: not a head saved by mimcli eval --save-heads"
    try:
        recipe = json.loads((folder / HEAD_RECIPE).read_text())
        tensors = load_file(str(folder / HEAD_WEIGHTS))
    except (OSError, ValueError) as exc:
        raise MimcliError(f"{where} ({exc})") from exc
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise MimcliError(f"{where} (no {FORMAT} format in {HEAD_RECIPE})")
    if set(TENSORS) - set(tensors):
        raise MimcliError(f"{where} ({HEAD_WEIGHTS} lacks {sorted(set(TENSORS) - set(tensors))})")
    weight = tensors["weight"]
    num_classes, width = weight.shape
    per_block = 2 if recipe.get("tokens") == "cls+patch" else 1
    blocks = len(recipe.get("indices", []))
    if (
        tensors["bias"].shape != (num_classes,)
        or tensors["mean"].shape != (width,)
        or tensors["var"].shape != (width,)
        or len(recipe.get("classes", [])) != num_classes
        or not blocks
        or width % (per_block * blocks)
    ):
        raise MimcliError(f"{where} (its tensors, classes and blocks do not match)")
    return tensors, recipe


class LinearHead(nn.Module):
    """BatchNorm1d(affine=False) in eval mode, then Linear, over the recipe's features.

    Args:
        tensors: weight (C, d), bias (C,), mean (d,), var (d,).
        eps: BatchNorm's epsilon.
        tokens: ``cls`` or ``cls+patch``.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], eps: float, tokens: str) -> None:
        super().__init__()
        self.tokens, self.eps = tokens, eps
        self.register_buffer("mean", tensors["mean"].float())
        self.register_buffer("var", tensors["var"].float())
        self.linear = nn.Linear(*tensors["weight"].T.shape)
        with torch.no_grad():
            self.linear.weight.copy_(tensors["weight"])
            self.linear.bias.copy_(tensors["bias"])

    def features(self, intermediates: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``forward_intermediates(x, indices=recipe["indices"], norm=False, output_fmt="NLC",
        intermediates_only=True, return_prefix_tokens=True)`` → (B, d) input vector."""
        parts = []
        for patches, prefix in intermediates:
            parts.append(prefix[:, 0])
            if self.tokens == "cls+patch":
                parts.append(patches.mean(dim=1))
        return torch.cat(parts, dim=1).float()

    def forward(self, intermediates: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """(B, C) logits of the images ``intermediates`` were computed from."""
        x = self.features(intermediates)
        return self.linear((x - self.mean) / torch.sqrt(self.var + self.eps))


def load_head(folder: Path) -> tuple[LinearHead, dict[str, Any]]:
    """A saved head as an eval-mode module, and its recipe (``head.json``)."""
    tensors, recipe = read_head(folder)
    return LinearHead(tensors, float(recipe.get("eps", 1e-5)), recipe["tokens"]).eval(), recipe
