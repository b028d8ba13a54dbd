"""The MIM-Refiner paper's released models by name (``mim-refiner:NAME``, the names of its
torch.hub entries): where each file is, the architecture it holds, and what is known about its
license. No torch here; ``models.sources`` downloads, converts and checks the files.

Alkin et al., 2024, "MIM-Refiner: A Contrastive Learning Boost from Intermediate Pre-Trained
Representations" (arXiv 2402.10093); names, files and shapes as its ``hubconf.py`` lists them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mimcli.errors import MimcliError

PREFIX = "mim-refiner:"
DEFAULT_BASE_URL = "https://ml.jku.at/research/mimrefiner/download/"
BASE_URL_ENV = "MIMCLI_MIMREFINER_URL"  # another base URL (a mirror, or a local test server)
PROJECT_PAGE = "https://ml-jku.github.io/MIM-Refiner"
# Neither the download page nor the code repository's README states a license for the weights.
LICENSE_NOTE = f"no stated license for its weights: see {PROJECT_PAGE}"


@dataclass(frozen=True)
class ReleasedModel:
    """One released refined encoder.

    Attributes:
        name: its torch.hub name (``mae_refined_l16``...).
        file: the file under the release's base URL (weights under ``state_dict``).
        embed_dim / depth / num_heads / patch_size: the published architecture.
        postnorm: data2vec 2.0 post-norm blocks (``mimcli_vit_postnorm``) instead of pre-norm.
    """

    name: str
    file: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    postnorm: bool = False

    @property
    def url(self) -> str:
        """The file's URL: ``$MIMCLI_MIMREFINER_URL`` or the release's base URL, then the file."""
        base = os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
        return base.rstrip("/") + "/" + self.file

    def describe(self) -> str:
        """e.g. ``pre-norm ViT, width 1024, 24 blocks, 16 heads, patch 16``."""
        return (
            f"{'post' if self.postnorm else 'pre'}-norm ViT, width {self.embed_dim}, "
            f"{self.depth} blocks, {self.num_heads} heads, patch {self.patch_size}"
        )

    def mismatch(self, model_args: dict[str, Any], postnorm: bool) -> str | None:
        """What differs between a converted file (its ``model_args``, post-norm or not) and the
        published architecture, or None when they agree."""
        found = {
            "width": model_args.get("embed_dim"),
            "blocks": model_args.get("depth"),
            "patch": model_args.get("patch_size"),
            "post-norm": postnorm,
        }
        expected = {
            "width": self.embed_dim,
            "blocks": self.depth,
            "patch": self.patch_size,
            "post-norm": self.postnorm,
        }
        wrong = [f"{k} {found[k]} (expected {v})" for k, v in expected.items() if found[k] != v]
        return ", ".join(wrong) if wrong else None


_L16 = dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16)
_H14 = dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14)
_TWOB14 = dict(embed_dim=2560, depth=24, num_heads=32, patch_size=14)

RELEASED: dict[str, ReleasedModel] = {
    m.name: m
    for m in (
        ReleasedModel("mae_refined_l16", "maerefined_l16.th", **_L16),
        ReleasedModel("dbot_refined_l16", "dbotrefined_l16.th", **_L16),
        ReleasedModel("crossmae_refined_l16", "crossmaerefined_l16.th", **_L16),
        ReleasedModel("d2v2_refined_l16", "d2v2refined_l16.th", **_L16, postnorm=True),
        ReleasedModel("mae_refined_h14", "maerefined_h14.th", **_H14),
        ReleasedModel("dbot_refined_h14", "dbotrefined_h14.th", **_H14),
        ReleasedModel("d2v2_refined_h14", "d2v2refined_h14.th", **_H14, postnorm=True),
        ReleasedModel("mae_refined_twob14", "maerefined_twob14.th", **_TWOB14),
    )
}


def is_released_spec(spec: str) -> bool:
    """Whether a MODEL argument names a released model (``mim-refiner:NAME``)."""
    return spec.strip().startswith(PREFIX)


def released_model(spec: str) -> ReleasedModel:
    """The released model ``mim-refiner:NAME`` names; an unknown NAME lists the known ones."""
    name = spec.strip()[len(PREFIX) :].strip()
    if name not in RELEASED:
        known = ", ".join(RELEASED)
        raise MimcliError(f"{spec}: unknown MIM-Refiner model {name!r}; known names: {known}")
    return RELEASED[name]
