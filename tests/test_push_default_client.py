"""`mimcli push` with huggingface_hub in its default configuration (hf_xet installed, Xet not
disabled) against a loopback Hub without Xet storage: one commit per push, none for an identical
push, and the weights through Git LFS. huggingface_hub reads HF_HUB_DISABLE_XET once, at import,
and tests/hubserver.py sets it for this session, so those pushes run in a subprocess without it.
Also the pieces of mimcli.hub.commit that need no Hub."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mimcli.hub.commit import additions, file_sha256, folder_files, git_blob_sha1, hub_offers_xet

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_LoopbackDefaultClient0123456789"
REPO = "alice/default-client"

# Four pushes of the same run in one interpreter: new repo, identical, a changed card, a PR.
PUSHES = r"""
import json, sys
from pathlib import Path
from mimcli.hub.commit import client_uses_xet
from mimcli.hub.push import PushConfig, run_push

run, repo = Path(sys.argv[1]), sys.argv[2]
print(json.dumps({"client_uses_xet": client_uses_xet()}))
for options in ({}, {}, {"tags": ["changed"]}, {"tags": ["changed", "pr"], "create_pr": True}):
    warnings = []
    outcome = run_push(
        PushConfig(run_dir=run, repo=repo, retries=0, **options), on_warning=warnings.append
    )
    print(json.dumps({**outcome.to_dict(), "warnings": warnings}))
"""


def changed_paths(repo, sha: str) -> set[str]:
    """The paths a commit added, changed or removed against its parent."""
    commit = repo.commits[sha]
    before = repo.commits[commit.parent].files if commit.parent else {}
    paths = set(before) | set(commit.files)
    return {p for p in paths if before.get(p) != commit.files.get(p)}


def test_push_with_the_default_client_is_one_commit_through_lfs(hub, tiny_run):
    hub.add_token(TOKEN, user="alice")
    hub.offer_lfs()
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"}
    done = subprocess.run(
        [sys.executable, "-c", PUSHES, str(tiny_run["run"]), REPO],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**env, "HF_TOKEN": TOKEN},
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines[0] == {"client_uses_xet": True}  # the default configuration, really
    first, same, changed, pr = lines[1:]

    repo = hub.get_repo(REPO)
    history = [c.sha for c in reversed(repo.history(repo.commits[repo.branches["main"]]))]
    # the repo's first commit (.gitattributes), then exactly one per push that changed something
    assert len(history) == 3 and hub.count("POST", "/commit/") == 3
    assert first["commit_oid"] == history[1] and not first["unchanged"]
    assert changed_paths(repo, history[1]) == set(first["files"])
    assert same["unchanged"] and same["commit_oid"] == history[1] and same["pr_url"] is None
    assert changed["commit_oid"] == history[2] and not changed["unchanged"]
    assert changed_paths(repo, history[2]) == {"README.md"}
    assert "- changed\n" in repo.commits[history[2]].files["README.md"].data.decode()

    # the pull request: one commit on top of main, again only the card
    assert pr["pr_url"].endswith("/discussions/1") and repo.branches["main"] == history[2]
    pr_head = repo.branches["refs/pr/1"]
    assert repo.commits[pr_head].parent == history[2] and pr["commit_oid"] == pr_head
    assert changed_paths(repo, pr_head) == {"README.md"}

    # the weights went through the LFS batch API once (pushes 2-4 found them on the Hub); the
    # only Xet requests are mimcli's question before each commit, which the Hub answered 404
    weights = repo.commits[history[1]].files["model.safetensors"]
    assert weights.lfs and hub.lfs_objects == {weights.sha256: weights.size}
    assert hub.count("PUT", f"/lfs-objects/{weights.sha256}") == 1
    assert hub.count("POST", "/info/lfs/objects/batch") == 1
    xet = [r for r in hub.requests if "xet" in r.path.lower()]
    assert len(xet) == 3 and all(r.method == "GET" and "/xet-write-token/" in r.path for r in xet)
    no_xet = f"the Hub has no Xet storage for {REPO}: uploading through Git LFS"
    assert [o["warnings"].count(no_xet) for o in (first, same, changed, pr)] == [1, 0, 1, 1]


def test_without_xet_the_hub_is_asked_and_says_no(hub):
    """In this session the client runs with Xet disabled; the question itself still goes out."""
    from huggingface_hub import HfApi

    hub.add_token(TOKEN, user="alice")
    hub.add_repo(REPO, {"a.txt": "a"})
    api = HfApi(token=TOKEN)
    assert hub_offers_xet(api, REPO, "main", create_pr=False) is False
    assert hub_offers_xet(api, REPO, None, create_pr=True) is False
    asked = [r for r in hub.requests if "xet-write-token" in r.path]
    assert [r.path for r in asked] == [
        f"/api/models/{REPO}/xet-write-token/main",
        f"/api/models/{REPO}/xet-write-token/None?create_pr=1",
    ]
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in asked)


def test_folder_files_and_hashes_match_git_and_the_hub(tmp_path):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "knn.png").write_bytes(b"\x89PNG")
    (tmp_path / "hello.txt").write_bytes(b"hello\n")
    for hidden in (".git/HEAD", ".cache/huggingface/upload/x.metadata"):
        (tmp_path / hidden).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / hidden).write_text("x")
    (tmp_path / ".cache" / "other.txt").write_text("kept")
    assert folder_files(tmp_path) == [".cache/other.txt", "hello.txt", "plots/knn.png"]
    # `git hash-object` of "hello\n", and its sha256
    assert git_blob_sha1(tmp_path / "hello.txt") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert file_sha256(tmp_path / "hello.txt") == hashlib.sha256(b"hello\n").hexdigest()


@pytest.mark.parametrize("lfs", [False, True])
def test_additions_read_paths_or_open_files(tmp_path, lfs):
    (tmp_path / "w.safetensors").write_bytes(b"w" * 10)
    with additions(tmp_path, ["w.safetensors"], lfs=lfs) as (operation,):
        source = operation.path_or_fileobj
        assert operation.path_in_repo == "w.safetensors" and operation.upload_info.size == 10
        assert isinstance(source, str) != lfs
    assert lfs == getattr(source, "closed", False)
