"""Which blocks: parsing block lists, resolving ``refine --blocks`` (``auto``, ``lastN``, lists),
and the one conversion between the 1-based blocks users see and timm's 0-based indices. Kept
free of torch/timm imports so the command line starts fast."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mimcli.errors import MimcliError
from mimcli.results import read_probe_json


def to_indices(blocks: Sequence[int]) -> list[int]:
    """1-based block numbers (flags, tables, JSON) -> 0-based indices into ``model.blocks``."""
    return [b - 1 for b in blocks]


# No ViT has more blocks than this (ViT-22B has 48); larger numbers are refused before a range
# is built, so ``--blocks 1-20000000`` costs nothing.
MAX_BLOCK = 1024


def _block_number(text: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 6:
        raise ValueError(text)
    return int(text)


def parse_blocks(text: str | None) -> list[int] | None:
    """``"1,4,8-12"`` -> [1, 4, 8, 9, 10, 11, 12] (1-based block numbers, each at most
    :data:`MAX_BLOCK`)."""
    if text is None or text.strip() in ("", "all"):
        return None
    shown = text if len(text) <= 40 else text[:37] + "..."
    blocks: set[int] = set()
    try:
        for part in text.split(",", MAX_BLOCK):
            if "-" in part:
                lo, hi = (_block_number(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError(part)
            else:
                lo = hi = _block_number(part)
            if hi > MAX_BLOCK:
                raise MimcliError(
                    f"--blocks {shown!r}: block {hi} is beyond any model (at most {MAX_BLOCK})"
                )
            blocks.update(range(lo, hi + 1))
    except ValueError as exc:
        raise MimcliError(
            f"--blocks {shown!r}: expected block numbers like 9,10,12 or 17-24 (counted from 1)"
        ) from exc
    if not blocks:
        raise MimcliError(f"--blocks {shown!r}: no blocks selected")
    return sorted(blocks)


def resolve_blocks(spec: str, depth: int, probe: Path | None) -> tuple[list[int], str]:
    """``auto`` (probe.json recommendation, else the last third, at most 8), ``lastN``, or a list
    like ``17,20,24`` / ``17-24``. Returns 1-based blocks and the reason, for config.json."""
    spec = spec.strip()
    shown = repr(spec if len(spec) <= 40 else spec[:37] + "...")
    if spec == "auto":
        if probe is not None:
            rec = read_probe_json(probe)["recommendation"]
            blocks = [int(b) for b in rec["blocks"]]
            reason = f"probe {probe}: {rec.get('rule', '')}"
        else:
            if depth == 32:  # ViT-H: the paper's blocks 21-32
                n, reason = 12, "paper default for 32 blocks (ViT-H): the last 12"
            else:
                n = min(8, max(1, round(depth / 3)))
                reason = f"paper default: the last third of the {depth} blocks, at most 8 heads"
            blocks = list(range(depth - n + 1, depth + 1))
    elif spec.startswith("last"):
        try:
            n = _block_number(spec[4:])
        except ValueError as exc:
            raise MimcliError(f"--blocks {shown}: expected lastN, e.g. last4") from exc
        if not 1 <= n <= depth:
            raise MimcliError(f"--blocks {shown}: lastN needs N in 1..{depth}, the model's blocks")
        blocks, reason = list(range(depth - n + 1, depth + 1)), f"the last {n} blocks"
    else:
        blocks, reason = parse_blocks(spec) or [], "given with --blocks"
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad or not blocks:
        got = ",".join(map(str, bad[:8])) + (",..." if len(bad) > 8 else "") or "none"
        raise MimcliError(f"--blocks {shown}: blocks must lie in 1..{depth}, got {got}")
    return blocks, reason
