"""``mim-refiner:NAME`` (mimcli.models.released through models.sources): every released name
comes out with its published architecture, files come through the URL cache from a local server
(``MIMCLI_MIMREFINER_URL``), offline is one line, and eval, push and the card name it well."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from mimcli.errors import MimcliError
from mimcli.evaluate.runner import _display_names, _stage_labels
from mimcli.hub.provenance import choose_license
from mimcli.hub.urls import url_cache_path
from mimcli.models.released import PREFIX, RELEASED
from mimcli.models.sources import load_model
from mimcli.models.taps import final_norm_of
from tests.fileserver import FileServer

# name: (postnorm, width, depth, heads, patch), as MIM-Refiner's hubconf.py publishes them
EXPECTED = {
    "mae_refined_l16": (False, 1024, 24, 16, 16),
    "dbot_refined_l16": (False, 1024, 24, 16, 16),
    "crossmae_refined_l16": (False, 1024, 24, 16, 16),
    "d2v2_refined_l16": (True, 1024, 24, 16, 16),
    "mae_refined_h14": (False, 1280, 32, 16, 14),
    "dbot_refined_h14": (False, 1280, 32, 16, 14),
    "d2v2_refined_h14": (True, 1280, 32, 16, 14),
    "mae_refined_twob14": (False, 2560, 24, 32, 14),
}
FILES = {
    "mae_refined_l16": "maerefined_l16.th",
    "dbot_refined_l16": "dbotrefined_l16.th",
    "crossmae_refined_l16": "crossmaerefined_l16.th",
    "d2v2_refined_l16": "d2v2refined_l16.th",
    "mae_refined_h14": "maerefined_h14.th",
    "dbot_refined_h14": "dbotrefined_h14.th",
    "d2v2_refined_h14": "d2v2refined_h14.th",
    "mae_refined_twob14": "maerefined_twob14.th",
}
META_COPY = "ignore:.*copying from a non-meta parameter"


def refiner_th(postnorm: bool, dim: int, depth: int, patch: int, grid: int = 0) -> bytes:
    """A ``.th`` file in MIM-Refiner's key layout (``state_dict``: ``cls_tokens.tokens``,
    ``pos_embed.embed`` (1, H, W, D), ``embed_norm`` for post-norm, ``norm`` for pre-norm) with
    the real shapes but one stored number per tensor (stride-0 views), so ViT-2B is a few KB."""
    grid = grid or 224 // patch

    def z(*shape: int) -> torch.Tensor:
        return torch.zeros(1).expand(*shape)

    sd = {
        "cls_tokens.tokens": z(1, 1, dim),
        "pos_embed.embed": z(1, grid, grid, dim),
        "patch_embed.proj.weight": z(dim, 3, patch, patch),
        "patch_embed.proj.bias": z(dim),
    }
    norms = ["embed_norm"] if postnorm else ["norm"]
    shapes = {
        "norm1.weight": (dim,),
        "norm1.bias": (dim,),
        "attn.qkv.weight": (3 * dim, dim),
        "attn.qkv.bias": (3 * dim,),
        "attn.proj.weight": (dim, dim),
        "attn.proj.bias": (dim,),
        "norm2.weight": (dim,),
        "norm2.bias": (dim,),
        "mlp.fc1.weight": (4 * dim, dim),
        "mlp.fc1.bias": (4 * dim,),
        "mlp.fc2.weight": (dim, 4 * dim),
        "mlp.fc2.bias": (dim,),
    }
    for i in range(depth):
        sd.update({f"blocks.{i}.{k}": z(*s) for k, s in shapes.items()})
    for n in norms:
        sd[f"{n}.weight"], sd[f"{n}.bias"] = z(dim), z(dim)
    buffer = io.BytesIO()
    torch.save({"state_dict": sd, "ctor_kwargs": {"dim": dim}}, buffer)
    return buffer.getvalue()


@pytest.fixture
def release_server(tmp_path, monkeypatch):
    """A local server standing in for the release's download page, and a fresh URL cache."""
    monkeypatch.setenv("MIMCLI_CACHE", str(tmp_path / "cache"))
    with FileServer() as server:
        monkeypatch.setenv("MIMCLI_MIMREFINER_URL", server.url + "/download/")
        yield server


def test_the_name_table_is_the_published_one(monkeypatch):
    assert {n: (m.postnorm, m.embed_dim, m.depth, m.num_heads, m.patch_size) for n, m in
            RELEASED.items()} == EXPECTED  # fmt: skip
    assert {n: m.file for n, m in RELEASED.items()} == FILES
    monkeypatch.delenv("MIMCLI_MIMREFINER_URL", raising=False)
    assert RELEASED["d2v2_refined_l16"].url == (
        "https://ml.jku.at/research/mimrefiner/download/d2v2refined_l16.th"
    )


@pytest.mark.filterwarnings(META_COPY)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_released_name_loads_with_its_published_architecture(
    name, release_server, monkeypatch
):
    postnorm, dim, depth, heads, patch = EXPECTED[name]
    release_server.add(f"/download/{FILES[name]}", refiner_th(postnorm, dim, depth, patch))
    # the head count must come from the name, not from a width table that may change
    monkeypatch.setattr("mimcli.models.build.KNOWN_NUM_HEADS", {})
    with torch.device("meta"):  # real shapes, no memory: ViT-2B is 1.9 G parameters
        loaded = load_model(f"{PREFIX}{name}")
    args = loaded.model_args
    assert (args["embed_dim"], args["depth"], args["num_heads"], args["patch_size"]) == (
        dim,
        depth,
        heads,
        patch,
    )
    assert args["img_size"] == 224 and loaded.num_blocks == depth
    assert loaded.model.blocks[0].attn.num_heads == heads
    # post-norm: data2vec 2.0 blocks and no final norm; pre-norm: timm's ViT with its final norm
    assert postnorm == (loaded.arch == "mimcli_vit_postnorm")
    assert postnorm == (final_norm_of(loaded.model) is None)
    assert (loaded.source, loaded.source_kind, loaded.format) == (
        f"{PREFIX}{name}",
        "mim-refiner",
        "refiner",
    )
    assert any(FILES[name] in note and f"{heads} heads" in note for note in loaded.notes)
    assert [r.path for r in release_server.requests] == [f"/download/{FILES[name]}"]


@pytest.mark.filterwarnings(META_COPY)
def test_the_file_is_downloaded_once_and_a_wrong_file_is_refused(release_server):
    url = release_server.add("/download/maerefined_l16.th", refiner_th(False, 1024, 24, 16))
    with torch.device("meta"):
        load_model("mim-refiner:mae_refined_l16")
        load_model(" mim-refiner:mae_refined_l16 ")
    assert len(release_server.gets("/download/maerefined_l16.th")) == 1
    assert url_cache_path(url).is_file()

    # a tiny pre-norm file where the post-norm ViT-L/16 should be
    release_server.add("/download/d2v2refined_l16.th", refiner_th(False, 32, 2, 8, grid=4))
    with pytest.raises(MimcliError) as err:
        load_model("mim-refiner:d2v2_refined_l16")
    line = str(err.value)
    assert line.startswith("mim-refiner:d2v2_refined_l16: ") and "\n" not in line
    assert "is not the published post-norm ViT, width 1024, 24 blocks, 16 heads, patch 16" in line
    assert "width 32 (expected 1024), blocks 2 (expected 24), patch 8 (expected 16)" in line
    assert "post-norm False (expected True)" in line and line.endswith("to download again")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(MimcliError) as err:
        load_model("mim-refiner:mae_refined_b16")
    assert str(err.value) == (
        "mim-refiner:mae_refined_b16: unknown MIM-Refiner model 'mae_refined_b16'; known names: "
        + ", ".join(RELEASED)
    )


def run_probe_cli(env: dict, image_folders) -> subprocess.CompletedProcess:
    train, val = image_folders
    argv = ["probe", "mim-refiner:d2v2_refined_l16", "--train", str(train), "--val", str(val)]
    return subprocess.run(
        [sys.executable, "-m", "mimcli.cli.app", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_probe_offline_is_one_line_naming_the_url(how, tmp_path, image_folders):
    import socket

    env = dict(os.environ, MIMCLI_CACHE=str(tmp_path / "cache"))
    env.pop("MIMCLI_MIMREFINER_URL", None)
    if how == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
        url = "https://ml.jku.at/research/mimrefiner/download/d2v2refined_l16.th"
        why = "(offline mode is on: HF_HUB_OFFLINE=1) and it is not in the cache"
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # closed once the with-block ends
        env["MIMCLI_MIMREFINER_URL"] = f"http://127.0.0.1:{port}/download"
        url = f"http://127.0.0.1:{port}/download/d2v2refined_l16.th"
        why = "(127.0.0.1 cannot be reached: Connection refused) and it is not in the cache"
    proc = run_probe_cli(env, image_folders)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = lines[0]
    assert line.startswith(f"error: mim-refiner:d2v2_refined_l16: cannot download {url} ("), line
    assert why in line
    assert line.endswith(
        "download that file and pass its path instead of mim-refiner:d2v2_refined_l16"
    )


def test_eval_names_the_paper_model_readably():
    specs = ["vit_large_patch16_224.mae", "runs/mae-l", "mim-refiner:mae_refined_l16"]
    assert _display_names(specs) == [
        "vit_large_patch16_224.mae",
        "mae-l",
        "mim-refiner:mae_refined_l16",
    ]
    # one progress bar per label: two released models must not share one
    labels = _stage_labels(_display_names([*specs, "mim-refiner:mae_refined_h14"]))
    assert labels == ["vit_lar…_224.mae", "mae-l", "mae_refined_l16", "mae_refined_h14"]
    assert _stage_labels(["run-2024-01-01-lr1e-4-seed0", "run-2024-01-01-lr1e-5-seed0"]) == [
        "run-202…-4-seed0",
        "run-202…-5-seed0",
    ]
    alike = ["run-2024-01-01-lr1e-4-seed0", "run-2024-01-02-lr1e-4-seed0"]
    assert _stage_labels(alike) == ["1:run-202…-4-seed0", "2:run-202…-4-seed0"]


def test_card_license_for_a_released_base_is_other_naming_the_project_page():
    lic, note, warning = choose_license(
        None, None, "mim-refiner:mae_refined_l16", "mim-refiner:mae_refined_l16"
    )
    assert lic == "other"
    assert note == (
        "the base model mim-refiner:mae_refined_l16 was released with no stated license for its "
        "weights: see https://ml-jku.github.io/MIM-Refiner"
    )
    assert warning.startswith("the license of mim-refiner:mae_refined_l16 is unknown (")
    assert choose_license("apache-2.0", None, "x", "mim-refiner:mae_refined_l16")[0] == "apache-2.0"


def test_card_of_a_run_started_from_a_released_model_states_other_and_why(tmp_path):

    import yaml

    from mimcli.hub.repo_folder import build_repo_folder
    from tests.conftest import unlicensed_run

    run = unlicensed_run(tmp_path / "run", base_model="mim-refiner:mae_refined_l16")
    built = build_repo_folder(run, tmp_path / "repo", "alice/x")
    head, body = (built.path / "README.md").read_text()[4:].split("\n---\n", 1)
    meta = yaml.safe_load(head)
    assert meta["license"] == "other" and "base_model" not in meta
    assert (
        "License: `other` (the base model mim-refiner:mae_refined_l16 was released with no stated "
        "license for its weights: see https://ml-jku.github.io/MIM-Refiner)." in body
    )
    assert "refined from `mim-refiner:mae_refined_l16`" in body
    assert any(w.startswith("the license of mim-refiner:mae_refined_l16 is unknown") for w in
               built.warnings)  # fmt: skip
