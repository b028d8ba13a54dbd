"""Slow tests on real images: Fashion-MNIST (Debian's dataset-fashion-mnist) and the shipped tiny
MAE. Run with `make test-slow` (installs the dataset where apt is available)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mimcli.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
IDX = Path("/usr/share/datasets/fashion-mnist")
MODEL = ROOT / "examples" / "models" / "fmnist-mae-tiny"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (IDX / "train-images-idx3-ubyte.gz").exists(),
        reason="needs Debian's dataset-fashion-mnist (make test-slow installs it)",
    ),
]


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    out = tmp_path_factory.mktemp("fmnist") / "folders"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "export_fashion_mnist.py"),
            "--out",
            str(out),
            "--limit-train",
            "5000",
            "--limit-test",
            "1000",
        ],
        check=True,
        capture_output=True,
    )
    return out


def test_export_is_complete_and_balanced(fmnist):
    classes = sorted(p.name for p in (fmnist / "train").iterdir())
    assert len(classes) == 10 and classes[0] == "0_tshirt_top"
    assert [len(list((fmnist / "train" / c).glob("*.png"))) for c in classes] == [500] * 10
    assert sum(len(list((fmnist / "test" / c).glob("*.png"))) for c in classes) == 1000


def test_probe_shipped_tiny_mae_gives_a_sensible_curve(fmnist, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "probe",
            str(MODEL),
            "--train",
            str(fmnist / "train"),
            "--val",
            str(fmnist / "test"),
            "--k",
            "20",
            "--out",
            str(tmp_path),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    cls = [b["cls"] for b in data["blocks"]]
    patch = [b["patch"] for b in data["blocks"]]
    assert len(cls) == 8 and data["train_images"] == 5000 and data["val_images"] == 1000
    assert min(cls + patch) > 50  # chance is 10%
    assert max(cls) > 70
    assert data["recommendation"]["blocks"][-1] == 8
    assert (tmp_path / "probe.png").stat().st_size > 10_000
