"""Block-list parsing shared by the CLI and the library (kept free of torch/timm imports so the
command line starts fast)."""

from __future__ import annotations

from mimcli.errors import MimcliError


def parse_blocks(text: str | None) -> list[int] | None:
    """``"1,4,8-12"`` -> [1, 4, 8, 9, 10, 11, 12] (1-based block numbers)."""
    if text is None or text.strip() in ("", "all"):
        return None
    blocks: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                blocks.update(range(lo, hi + 1))
            else:
                blocks.add(int(part))
            if "-" in part and lo > hi:
                raise ValueError(part)
    except ValueError as exc:
        raise MimcliError(
            f"--blocks {text!r}: expected block numbers like 9,10,12 or 17-24 (counted from 1)"
        ) from exc
    if not blocks:
        raise MimcliError(f"--blocks {text!r}: no blocks selected")
    return sorted(blocks)
