"""What a refine run promises when things go wrong: killed at any moment (SIGKILL, also while a
checkpoint is being renamed in) it resumes to the same result; a disk that fills up or a file
size limit stops it with one line and the last checkpoint intact; a damaged checkpoint falls back
to the one before; Ctrl-C and SIGTERM save before stopping; files get the usual modes."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mimcli.refine.loop import Refiner
from tests.reliability import launch, records, same_run, soak, soak_args

FULL = {}  # the uninterrupted reference run, per (model, data) folders: made once


@pytest.fixture
def reference(tiny_model_dir, data_dir, tmp_path):
    """The uninterrupted soak run (a subprocess with the soak's thread count)."""
    out = tmp_path / "full"
    proc = launch(soak_args(tiny_model_dir, data_dir), out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


def test_kill_soak_fast(tiny_model_dir, data_dir, tmp_path, reference):
    """3 SIGKILLs at seeded random moments (the third while a checkpoint waits to be renamed),
    a resume after each: the same export and metrics as the uninterrupted run."""
    out = tmp_path / "soak"
    done = soak(soak_args(tiny_model_dir, data_dir), out, kills=3, seed=0,
                total_records=len(records(reference)))  # fmt: skip
    assert done.kills >= 2 and done.paused_kills == 1, done
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".partial"))]
    same_run(reference, out)
