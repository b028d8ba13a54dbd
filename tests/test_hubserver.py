"""The LoopbackHub (tests/hubserver.py) against the real huggingface_hub client and timm.

These tests also pin down client behaviour the project relies on (huggingface_hub 2.4):
which requests a download makes, what is cached, which errors are raised, what is retried.
The fixtures come from the ``tests.hubserver`` plugin loaded by tests/conftest.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import httpx2
import huggingface_hub
import huggingface_hub.constants as hf_constants
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

# conftest.py has already loaded tests.hubserver as a plugin, so huggingface_hub (imported above)
# saw HF_ENDPOINT pointing at the LoopbackHub.
from tests.hubserver import HUB_URL, LoopbackHub

pytestmark = pytest.mark.timeout(60)

WEIGHTS = bytes(range(256)) * 40  # "*.bin" => served as an LFS file (ETag = sha256)


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_environment_points_at_the_loopback_hub(hub: LoopbackHub):
    assert hub.url == HUB_URL == hf_constants.ENDPOINT == os.environ["HF_ENDPOINT"]
    assert hub.url.startswith("http://127.0.0.1:")
    assert "mimcli-hubtests-" in hf_constants.HF_HUB_CACHE
    assert "mimcli-hubtests-" in hf_constants.HF_TOKEN_PATH
    assert huggingface_hub.get_token() is None
    assert hf_constants.HF_HUB_DISABLE_XET is True
    assert hf_constants.HF_HUB_DISABLE_TELEMETRY is True
    assert hf_constants.is_offline_mode() is False


def test_hf_hub_download_exact_bytes_then_cache(hub: LoopbackHub, fresh_hf_cache: Path):
    sha = hub.add_repo("acme/files", {"notes.txt": "hello hub", "ckpt/weights.bin": WEIGHTS})
    assert len(sha) == 40 and int(sha, 16) >= 0

    text = hf_hub_download("acme/files", "notes.txt", cache_dir=fresh_hf_cache)
    weights = hf_hub_download("acme/files", "ckpt/weights.bin", cache_dir=fresh_hf_cache)
    assert Path(text).read_bytes() == b"hello hub"
    assert Path(weights).read_bytes() == WEIGHTS
    assert Path(text).parent.name == sha  # snapshots/<commit sha>/notes.txt
    # Blob names are the ETag: git blob sha1 for regular files, sha256 for LFS files.
    assert Path(text).resolve().name == _git_blob_oid(b"hello hub")
    assert Path(weights).resolve().name == hashlib.sha256(WEIGHTS).hexdigest()
    assert hub.count("GET", "/resolve/") == 2
    assert hub.count("HEAD", "/resolve/") == 2

    # A branch revision is re-validated with one HEAD; the bytes come from the cache (no GET).
    again = hf_hub_download("acme/files", "ckpt/weights.bin", cache_dir=fresh_hf_cache)
    assert again == weights
    assert hub.count("GET", "/resolve/") == 2
    assert hub.count("HEAD", "/resolve/") == 3
    # A commit-sha revision already in the cache makes no request at all.
    before = len(hub.requests)
    pinned = hf_hub_download("acme/files", "notes.txt", revision=sha, cache_dir=fresh_hf_cache)
    assert pinned == text and len(hub.requests) == before


def test_revision_by_commit_sha_and_branch(hub: LoopbackHub, fresh_hf_cache: Path):
    first = hub.add_repo("acme/evolving", {"v.txt": "one"})
    second = hub.add_repo("acme/evolving", {"v.txt": "two", "new.txt": "new"}, message="v2")
    other = hub.add_repo("acme/evolving", {"v.txt": "three"}, branch="dev", message="dev")
    assert len({first, second, other}) == 3

    def read(revision: str | None, name: str = "v.txt") -> bytes:
        path = hf_hub_download("acme/evolving", name, revision=revision, cache_dir=fresh_hf_cache)
        return Path(path).read_bytes()

    assert read(first) == b"one"
    assert read(None) == b"two"
    assert read("main") == b"two"
    assert read(second, "new.txt") == b"new"
    assert read("dev") == b"three"
    assert read(first[:10]) == b"one"  # unambiguous short sha
    with pytest.raises(RemoteEntryNotFoundError):
        read(first, "new.txt")  # did not exist yet at the first commit
    repo = hub.get_repo("acme/evolving")
    assert repo is not None and list(repo.commits) == [first, second, other]
    assert repo.branches == {"main": second, "dev": other}


def test_missing_repo_revision_file_raise_the_hub_errors(hub: LoopbackHub, fresh_hf_cache):
    hub.add_repo("acme/present", {"a.txt": "a"})

    with pytest.raises(RepositoryNotFoundError) as repo_err:
        hf_hub_download("acme/absent", "a.txt", cache_dir=fresh_hf_cache)
    assert repo_err.value.response.status_code == 404
    assert repo_err.value.response.headers["X-Error-Code"] == "RepoNotFound"

    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("acme/present", "a.txt", revision="nope", cache_dir=fresh_hf_cache)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("acme/present", "a.txt", revision="0" * 40, cache_dir=fresh_hf_cache)

    with pytest.raises(RemoteEntryNotFoundError) as entry_err:
        hf_hub_download("acme/present", "missing.txt", cache_dir=fresh_hf_cache)
    assert isinstance(entry_err.value, EntryNotFoundError)  # what timm catches
    assert (
        entry_err.value.response.headers["X-Repo-Commit"]
        == hub.get_repo("acme/present").branches["main"]
    )

    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/absent")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("acme/present", revision="nope")
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_files("acme/absent")
    assert api.repo_exists("acme/present") and not api.repo_exists("acme/absent")
    assert api.file_exists("acme/present", "a.txt")
    assert not api.file_exists("acme/present", "missing.txt")
    assert not api.file_exists("acme/absent", "a.txt")
    assert not api.revision_exists("acme/present", "nope")


def test_model_info_list_files_tree_commits(hub: LoopbackHub):
    first = hub.add_repo("acme/info", {"config.json": "{}", "w/model.safetensors": WEIGHTS})
    sha = hub.add_repo("acme/info", {"README.md": "# card"}, message="Add card\n\nbody")
    api = HfApi()

    info = api.model_info("acme/info")
    assert info.id == "acme/info" and info.sha == sha and info.private is False
    assert sorted(s.rfilename for s in info.siblings) == [
        "README.md",
        "config.json",
        "w/model.safetensors",
    ]
    assert api.model_info("acme/info", revision=first).sha == first
    detailed = {s.rfilename: s for s in api.model_info("acme/info", files_metadata=True).siblings}
    assert detailed["config.json"].size == 2 and detailed["config.json"].lfs is None
    assert detailed["w/model.safetensors"].lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert api.repo_info("acme/info").sha == sha

    assert sorted(api.list_repo_files("acme/info")) == sorted(s.rfilename for s in info.siblings)
    assert sorted(api.list_repo_files("acme/info", revision=first)) == [
        "config.json",
        "w/model.safetensors",
    ]
    top = {e.path: type(e).__name__ for e in api.list_repo_tree("acme/info")}
    assert top == {"README.md": "RepoFile", "config.json": "RepoFile", "w": "RepoFolder"}
    [card] = api.get_paths_info("acme/info", ["README.md", "nope"])
    assert card.size == 6 and card.blob_id == _git_blob_oid(b"# card")

    commits = api.list_repo_commits("acme/info")
    assert [c.commit_id for c in commits] == [sha, first]
    assert commits[0].title == "Add card" and commits[0].message == "body"
    refs = api.list_repo_refs("acme/info")
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", sha)]


def test_snapshot_download_fetches_every_file(hub: LoopbackHub, fresh_hf_cache: Path):
    files = {
        "config.json": b'{"a": 1}',
        "model.safetensors": WEIGHTS,
        "sub dir/extra ü #1.txt": b"x",
    }
    sha = hub.add_repo("acme/snap", files)
    folder = Path(snapshot_download("acme/snap", cache_dir=fresh_hf_cache))
    assert folder.name == sha
    got = {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }
    assert got == files

    local_dir = folder.parent / "ld"
    only_json = snapshot_download("acme/snap", allow_patterns=["*.json"], local_dir=local_dir)
    assert sorted(p.name for p in Path(only_json).iterdir() if p.is_file()) == ["config.json"]


@pytest.mark.parametrize("safe_serialization", [False, True], ids=["pytorch_bin", "safetensors"])
def test_timm_hf_hub_round_trip(hub, fresh_hf_cache, tmp_path, safe_serialization):
    import timm
    import torch
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_for_hf(model, str(tmp_path / "export"), safe_serialization=safe_serialization)
    exported = {p.name: p for p in (tmp_path / "export").iterdir()}
    hub.add_repo("acme/tiny", exported)

    loaded = timm.create_model("hf-hub:acme/tiny", pretrained=True, cache_dir=fresh_hf_cache)
    loaded.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.patch_embed.proj.weight.shape == (32, 3, 8, 8)
    assert hub.count("GET", "/acme/tiny/resolve/main/config.json") == 1
    if safe_serialization:
        assert hub.count("GET", "/resolve/main/model.safetensors") == 1
        assert hub.count(path_contains="pytorch_model.bin") == 0
    else:  # timm first probes model.safetensors (404 EntryNotFound), then falls back
        assert hub.count("HEAD", "/resolve/main/model.safetensors") == 1
        assert hub.count("GET", "/resolve/main/pytorch_model.bin") == 1


def test_hf_hub_download_retries_head_on_5xx(hub: LoopbackHub, fresh_hf_cache: Path):
    hub.add_repo("acme/flaky", {"a.txt": "payload"})
    hub.fail_next(2, 500)
    path = hf_hub_download("acme/flaky", "a.txt", cache_dir=fresh_hf_cache)
    assert Path(path).read_bytes() == b"payload"
    # HEAD without retry fails -> no cached copy -> HEAD again with backoff (500, 1 s, 200) -> GET.
    assert [r.method for r in hub.requests] == ["HEAD", "HEAD", "HEAD", "GET"]


def test_hf_hub_download_get_retries_429_but_not_5xx(hub: LoopbackHub, fresh_hf_cache: Path):
    hub.add_repo("acme/flaky", {"a.txt": "payload"})
    hub.fail_next(1, 500, method="GET")
    with pytest.raises(HfHubHTTPError) as err:
        hf_hub_download("acme/flaky", "a.txt", cache_dir=fresh_hf_cache)
    assert err.value.response.status_code == 500
    assert not list(fresh_hf_cache.rglob("a.txt"))  # no partial file left in the snapshot

    hub.clear_requests()
    hub.fail_next(1, 429, "/resolve/", method="GET")  # answered with Retry-After: 0 (waits 1 s)
    path = hf_hub_download("acme/flaky", "a.txt", cache_dir=fresh_hf_cache)
    assert Path(path).read_bytes() == b"payload"
    assert [r.method for r in hub.requests] == ["HEAD", "GET", "GET"]


def test_api_calls_and_5xx(hub: LoopbackHub):
    hub.add_repo("acme/flaky", {"a.txt": "payload"})
    api = HfApi()
    hub.fail_next(1, 503, "/api/models/acme/flaky")
    with pytest.raises(HfHubHTTPError) as err:  # model_info does not retry
        api.model_info("acme/flaky")
    assert err.value.response.status_code == 503
    hub.fail_next(1, 500, "/tree/")
    assert api.list_repo_files("acme/flaky") == ["a.txt"]  # tree listing retries (1 s)


def test_token_is_sent_as_bearer_header(hub: LoopbackHub, fresh_hf_cache: Path):
    hub.add_repo("acme/private", {"a.txt": "a"})
    hf_hub_download("acme/private", "a.txt", token="hf_secret123", cache_dir=fresh_hf_cache)
    assert {r.headers.get("authorization") for r in hub.requests} == {"Bearer hf_secret123"}
    hub.clear_requests()
    HfApi().model_info("acme/private")
    assert "authorization" not in hub.requests[0].headers  # no implicit token in tests


def test_plain_url_file(hub: LoopbackHub):
    data = os.urandom(5000)
    url = hub.add_url_file("/downloads/mae_pretrain_vit_tiny.pth", data)
    assert url == f"{hub.url}/downloads/mae_pretrain_vit_tiny.pth"
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200 and resp.read() == data
        assert resp.headers["Content-Length"] == "5000"
    head = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(head, timeout=10) as resp:
        assert resp.headers["Content-Length"] == "5000" and resp.read() == b""
    ranged = urllib.request.Request(url, headers={"Range": "bytes=100-"})
    with urllib.request.urlopen(ranged, timeout=10) as resp:
        assert resp.status == 206 and resp.read() == data[100:]
        assert resp.headers["Content-Range"] == "bytes 100-4999/5000"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{hub.url}/downloads/other.pth", timeout=10)
    assert err.value.code == 404
    hub.fail_next(1, 503, "mae_pretrain")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=10)
    assert err.value.code == 503
    assert [r.method for r in hub.requests] == ["GET", "HEAD", "GET", "GET", "GET"]


def test_concurrent_requests_and_separate_instances(hub: LoopbackHub, fresh_hf_cache: Path):
    files = {f"f{i}.bin": os.urandom(1000 + i) for i in range(12)}
    hub.add_repo("acme/many", files)
    folder = Path(snapshot_download("acme/many", cache_dir=fresh_hf_cache, max_workers=8))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files

    with LoopbackHub() as other:
        assert other.url != hub.url
        url = other.add_url_file("/x", b"x")
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.read() == b"x"
        other.add_repo("acme/gone", {"a.txt": "a"})
        api = HfApi(endpoint=other.url)
        assert api.list_repo_files("acme/gone") == ["a.txt"]  # leaves a keep-alive connection
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=10)  # stopped: connection refused
    with pytest.raises(httpx2.TransportError):  # pooled keep-alive connections are closed too
        api.model_info("acme/gone")


# ---------------------------------------------------------------------------------------------
# Offline / unreachable Hub. huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import
# time, so each scenario runs in a fresh interpreter. An un-cached hf_hub_download against a
# refused endpoint retries the HEAD with backoff (1+2+4+8+8 s) before giving up, so the probes
# are started in the background when this module starts and collected by the last test.
# ---------------------------------------------------------------------------------------------

_PROBE = r"""
import json, sys, time
from huggingface_hub import HfApi, hf_hub_download, snapshot_download

def run(fn):
    start = time.monotonic()
    try:
        value = fn()
    except Exception as e:
        return {"raised": [c.__module__ + "." + c.__qualname__ for c in type(e).__mro__],
                "cause": None if e.__cause__ is None else
                         type(e.__cause__).__module__ + "." + type(e.__cause__).__qualname__,
                "seconds": time.monotonic() - start}
    return {"value": value, "seconds": time.monotonic() - start}

out = {
    "cached": run(lambda: open(hf_hub_download("acme/cached", "a.txt")).read()),
    "model_info": run(lambda: HfApi().model_info("acme/cached").sha),
    "snapshot_download": run(lambda: snapshot_download("acme/uncached")),
    "hf_hub_download": run(lambda: hf_hub_download("acme/uncached", "a.txt")),
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module", autouse=True)
def _offline_probes(request, hub_server: LoopbackHub, tmp_path_factory):
    """Start the offline probes (only if test_offline_... is selected)."""
    if not any(item.name == "test_offline_endpoint_exceptions" for item in request.session.items):
        yield None
        return
    root = tmp_path_factory.mktemp("offline")
    cache = root / "cache"
    hub_server.add_repo("acme/cached", {"a.txt": "cached bytes"})
    hf_hub_download("acme/cached", "a.txt", cache_dir=cache)
    hub_server.reset()

    refused = socket.socket()  # bound but never listening: connections are refused
    refused.bind(("127.0.0.1", 0))
    base_env = dict(os.environ, HF_HOME=str(root / "home"), HF_HUB_CACHE=str(cache))
    base_env["HF_ENDPOINT"] = f"http://127.0.0.1:{refused.getsockname()[1]}"
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", _PROBE],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, env in {
            "refused": base_env,
            "offline": dict(base_env, HF_HUB_OFFLINE="1"),
        }.items()
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    refused.close()


@pytest.mark.timeout(120)
def test_offline_endpoint_exceptions(_offline_probes):
    results = {}
    for name, proc in _offline_probes.items():
        stdout, stderr = proc.communicate(timeout=90)
        assert proc.returncode == 0, stderr
        results[name] = json.loads(stdout.strip().splitlines()[-1])
    local_entry = "huggingface_hub.errors.LocalEntryNotFoundError"

    refused = results["refused"]
    # A cached file is served from the cache at once when the HEAD call cannot connect.
    assert refused["cached"]["value"] == "cached bytes" and refused["cached"]["seconds"] < 5
    # HfApi calls surface the raw transport error (not an HfHubHTTPError, not an OSError).
    assert refused["model_info"]["raised"][0] == "httpx2.ConnectError"
    assert "builtins.OSError" not in refused["model_info"]["raised"]
    assert refused["snapshot_download"]["raised"][0] == local_entry
    assert refused["snapshot_download"]["cause"] == "httpx2.ConnectError"
    # hf_hub_download with nothing cached: LocalEntryNotFoundError (a FileNotFoundError and an
    # EntryNotFoundError) from httpx2.ConnectError, after ~23 s of retries.
    download = refused["hf_hub_download"]
    assert download["raised"][0] == local_entry
    assert {"builtins.FileNotFoundError", "huggingface_hub.errors.EntryNotFoundError"} <= set(
        download["raised"]
    )
    assert download["cause"] == "httpx2.ConnectError"
    assert download["seconds"] > 15

    offline = results["offline"]  # HF_HUB_OFFLINE=1: no connection attempt, no waiting
    assert offline["cached"]["value"] == "cached bytes"
    assert offline["model_info"]["raised"][0] == "huggingface_hub.errors.OfflineModeIsEnabled"
    assert offline["hf_hub_download"]["raised"][0] == local_entry
    assert offline["hf_hub_download"]["seconds"] < 5
    assert offline["snapshot_download"]["raised"][0] == local_entry
