"""Block lists (mimcli.blocks): parsing, ``--blocks auto|lastN|list`` resolution, 1-based to
0-based."""

import json

import pytest

from mimcli.blocks import parse_blocks, resolve_blocks, to_indices
from mimcli.errors import MimcliError


def test_resolve_blocks(tmp_path):
    assert resolve_blocks("auto", 24, None)[0] == list(range(17, 25))
    assert resolve_blocks("auto", 32, None)[0] == list(range(21, 33))  # ViT-H: 12 heads
    assert resolve_blocks("auto", 8, None)[0] == [6, 7, 8]
    assert resolve_blocks("last4", 12, None)[0] == [9, 10, 11, 12]
    assert resolve_blocks("17,20,24", 24, None)[0] == [17, 20, 24]
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"recommendation": {"blocks": [3, 4], "rule": "r"}}))
    blocks, reason = resolve_blocks("auto", 4, probe)
    assert blocks == [3, 4] and "probe" in reason
    for bad in ("last0", "last9", "0,1", "lastx", "30"):
        with pytest.raises(MimcliError):
            resolve_blocks(bad, 8, None)


def test_parse_blocks_and_the_one_conversion_to_timm_indices():
    assert parse_blocks("1,4,8-10") == [1, 4, 8, 9, 10]
    assert parse_blocks(None) is None and parse_blocks("all") is None
    for bad in ("3-1", "a", ","):
        with pytest.raises(MimcliError):
            parse_blocks(bad)
    assert to_indices([1, 4, 12]) == [0, 3, 11]
