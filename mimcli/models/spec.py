"""MODEL strings: the source (timm name, ``hf-hub:`` repo, folder, checkpoint file or URL) and an
optional ``#heads=N`` suffix giving the attention-head count of a checkpoint that does not record
it. No torch: the CLI and the Hub provenance read MODEL strings too.

``#`` cannot clash with the sources: timm names and Hub repo ids never contain it, a URL's
fragment is never sent to the server, and only a file literally named ``...#heads=N`` would be
misread.
"""

from __future__ import annotations

from dataclasses import dataclass

from mimcli.errors import MimcliError

HEADS_SUFFIX = "#heads="
# More attention heads than any ViT has (ViT-22B: 48); a larger N is a typo.
MAX_HEADS = 1024


@dataclass(frozen=True)
class ModelSpec:
    """A parsed MODEL argument.

    Attributes:
        source: what to load, the suffix cut off.
        num_heads: the count given by the ``#heads=N`` suffix, else None.
    """

    source: str
    num_heads: int | None = None


def parse_model_spec(text: str) -> ModelSpec:
    """Split ``text`` into its source and ``#heads=N`` suffix.

    Raises:
        MimcliError: for a suffix without a positive whole number or without a source.
    """
    text = text.strip()
    source, suffix, value = text.rpartition(HEADS_SUFFIX)
    if not suffix:
        return ModelSpec(text)
    if not source.strip():
        raise MimcliError(f"{text!r}: {HEADS_SUFFIX}N follows a MODEL, e.g. ckpt.pth#heads=16")
    digits = value.isascii() and value.isdigit() and len(value) <= 6
    if not digits or not 1 <= int(value) <= MAX_HEADS:
        raise MimcliError(
            f"{text!r}: the MODEL suffix {HEADS_SUFFIX}N needs a whole number of attention "
            f"heads in 1..{MAX_HEADS}, e.g. {source.strip() + HEADS_SUFFIX + '16'!r}"
        )
    return ModelSpec(source.strip(), int(value))


def model_source(text: str) -> str:
    """The MODEL argument without its ``#heads=`` suffix (no checks)."""
    source, suffix, _ = text.strip().rpartition(HEADS_SUFFIX)
    return source.strip() if suffix and source.strip() else text.strip()
