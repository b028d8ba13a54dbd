"""Where a run's encoder came from (mimcli.hub.provenance): base model, license, teachers, and
which eval columns are the base and this run."""

from __future__ import annotations

import pytest

from mimcli.errors import MimcliError
from mimcli.hub.provenance import base_model_info, choose_license, eval_columns, teacher_sources
from mimcli.results import EvalResult


def test_eval_columns_pick_this_run_and_its_base(tiny_run, tmp_path):
    run = tiny_run["run"]

    def result(*sources):
        models = [
            {"name": s.rstrip("/").split("/")[-1], "source": s, "arch": "a", "features_cached": 0}
            for s in sources
        ]
        return EvalResult.from_dict(
            {
                "models": models,
                "train_images": 1,
                "val_images": 1,
                "num_classes": 2,
                "protocols": ["knn"],
                "ks": [1],
            }
        )

    label = f"{run} (refined, export/)"
    assert eval_columns(result("b", label), run, "b") == (0, 1)
    assert eval_columns(result(label, "x", "b"), run, "b") == (2, 0)
    assert eval_columns(result(label, "x", "y"), run, "b") == (None, 0)
    assert eval_columns(result(str(run / "export")), run, "b") == (None, 0)
    warnings = []  # a moved run: the last model that is not the base, with a warning
    assert eval_columns(result("b", "/elsewhere/rA"), run, "b", warnings) == (0, 1)
    assert "taking 'rA'" in warnings[0]
    with pytest.raises(MimcliError, match="every evaluated model is the base"):
        eval_columns(result("b"), run, "b")


def test_license_and_base_model_are_inherited():
    hub_id, lic = base_model_info("vit_large_patch16_224.mae", {})
    assert (hub_id, lic) == ("timm/vit_large_patch16_224.mae", "cc-by-nc-4.0")
    assert base_model_info("examples/models/fmnist-mae-tiny", {}) == (None, "apache-2.0")
    assert base_model_info("examples/models/fmnist-mae-tiny#heads=4", {}) == (None, "apache-2.0")
    assert base_model_info("nonexistent-thing", {"license": "mit"}) == (None, "mit")
    assert base_model_info("nonexistent-thing", {}) == (None, None)


def test_teacher_sources_are_read_from_the_run():
    mimco = {"resolved": {"teacher": {"source": "vit_small_patch16_224.dino", "dim": 384}}}
    mrmae = {"resolved": {"teachers": [{"source": "a"}, {"source": "b"}]}}
    assert teacher_sources(mimco) == ["vit_small_patch16_224.dino"]
    assert teacher_sources(mrmae) == ["a", "b"] and teacher_sources({"resolved": {}}) == []


def test_license_is_given_inherited_or_other():
    assert choose_license("mit", "apache-2.0", "timm/x", "x") == ("mit", "set with --license", None)
    lic, note, warning = choose_license(None, "apache-2.0", "timm/x", "x")
    assert (lic, note, warning) == ("apache-2.0", "inherited from the base model timm/x", None)
    lic, note, warning = choose_license(None, None, "w.pth", "w.pth")
    assert lic == "other" and "set it with --license" in note
    assert warning == "the license of w.pth is unknown: the card says `other`; pass --license"
