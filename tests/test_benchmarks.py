"""Every benchmark script runs in its ``--smoke`` mode and writes its JSON result.

Not a timing test: nothing here asserts on speed. A benchmark module that does not exist yet is
skipped with a reason (the skip list must be empty once all of them are written).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os

import pytest
import torch

from benchmarks.__main__ import NAMES

# ~3 min in all on 2 cores (the memory smoke starts three CLI processes; plan_memory measures
# real steps): the slow suite.
pytestmark = pytest.mark.slow

BENCHMARKS = NAMES  # every benchmark `python -m benchmarks` runs


@pytest.fixture
def keep_torch_threads():
    """The benchmarks set torch's thread count and environment variables (plan_memory sets
    HF_HUB_OFFLINE) for this process; put them back afterwards, for the tests that follow."""
    before, environ = torch.get_num_threads(), dict(os.environ)
    yield
    torch.set_num_threads(before)
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_smoke(name, tmp_path, capsys, keep_torch_threads):
    assert importlib.util.find_spec(f"benchmarks.{name}") is not None, name
    module = importlib.import_module(f"benchmarks.{name}")
    code = module.main(["--smoke", "--out", str(tmp_path)])
    printed = capsys.readouterr()
    assert code in (0, None), f"benchmarks.{name} --smoke exited {code}:\n{printed.err[-2000:]}"
    results = sorted(tmp_path.glob("*.json"))
    assert results, f"benchmarks.{name} --smoke wrote no JSON to --out"
    for path in results:
        data = json.loads(path.read_text())
        assert "machine" in data, f"{path.name} has no 'machine' key"
        assert data["machine"]["cores"] >= 1
