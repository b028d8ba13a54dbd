"""`mimcli push` when the connection to the Hub drops: the loopback Hub closes real sockets
(``LoopbackHub.drop_next``) in the middle of an upload's body, or after applying a commit but
before answering it. Whatever happens, the Hub ends with exactly one commit carrying the run's
files: retries send a dropped upload again, and a commit whose answer was lost is not made twice,
by mimcli's own retry or by the user running the same command again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download

from mimcli.hub.commit import folder_files
from mimcli.hub.push import PushConfig, run_push

TOKEN = "hf_LoopbackDropsToken0123456789"
REPO = "alice/drops"
MESSAGE = "push through dropped connections"


def mimcli(*args: str) -> subprocess.CompletedProcess:
    """The real command in a subprocess: every byte it prints is captured."""
    return subprocess.run(
        [sys.executable, "-m", "mimcli.cli.app", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=300,
    )


@pytest.fixture
def logged_in(hub, monkeypatch):
    hub.add_token(TOKEN, user="alice")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return hub


def push(run: Path, keep: Path, retries: list[str]):
    """``mimcli push RUN --repo REPO --to KEEP --retry-wait 0`` as the library call."""
    cfg = PushConfig(run_dir=run, repo=REPO, to=keep, commit_message=MESSAGE, retry_wait=0.0)
    return run_push(cfg, on_retry=retries.append)


def assert_one_commit(folder: Path, cache: Path, revision: str = "main") -> str:
    """``revision`` holds exactly one commit on top of the repo's first (``.gitattributes``), and
    its files, downloaded, are byte for byte those of ``folder``; returns its id."""
    api = HfApi(token=TOKEN)
    commits = api.list_repo_commits(REPO, revision=revision)
    assert len(commits) == 2, [c.title for c in commits]
    assert [c.title for c in commits] == [MESSAGE, "initial commit"]
    head = commits[0].commit_id
    files = folder_files(folder)
    assert {"model.safetensors", "README.md", "config.json"} <= set(files)
    assert sorted(api.list_repo_files(REPO, revision=head)) == sorted([".gitattributes", *files])
    for name in files:
        got = hf_hub_download(REPO, name, revision=head, cache_dir=cache)
        assert Path(got).read_bytes() == (folder / name).read_bytes(), name
    return head


def test_commit_dropped_mid_body_is_sent_again(logged_in, tiny_run, tmp_path, fresh_hf_cache):
    """Without LFS every file travels base64 in the commit POST: drop it twice halfway."""
    hub = logged_in
    hub.drop_next(2, "/commit/", method="POST", when="body")
    retries: list[str] = []
    outcome = push(tiny_run["run"], tmp_path / "keep", retries)

    sent = [r for r in hub.requests if r.method == "POST" and "/commit/" in r.path]
    assert len(sent) == 3 and len(retries) == 2, retries
    assert all(m.startswith(f"uploading to {REPO}: ") for m in retries)
    full = int(sent[-1].headers["content-length"])
    weights = (tmp_path / "keep" / "model.safetensors").stat().st_size
    assert full > weights  # the weights were in the body that was cut
    assert [(d.when, d.path) for d in hub.drops] == [("body", sent[0].path)] * 2
    assert all(0 < d.received < full for d in hub.drops)

    head = assert_one_commit(tmp_path / "keep", fresh_hf_cache)
    assert outcome.upload.commit_oid == head and not outcome.upload.unchanged
    assert hub.lfs_objects == {}


def test_lfs_upload_dropped_mid_body_is_sent_again(logged_in, tiny_run, tmp_path, fresh_hf_cache):
    """With LFS the weights travel in a PUT of their own: drop it halfway; the client sends it
    again (its own backoff, one second), and the commit follows once."""
    hub = logged_in
    hub.offer_lfs()
    hub.drop_next(1, "/lfs-objects/", method="PUT", when="body")
    retries: list[str] = []
    outcome = push(tiny_run["run"], tmp_path / "keep", retries)

    weights = (tmp_path / "keep" / "model.safetensors").read_bytes()
    puts = [r for r in hub.requests if r.method == "PUT"]
    assert len(puts) == 2 and puts[0].path == puts[1].path
    assert int(puts[0].headers["content-length"]) == len(weights)
    (drop,) = hub.drops
    assert drop.when == "body" and drop.path == puts[0].path and 0 < drop.received < len(weights)
    assert hub.count("POST", "/commit/") == 1 and retries == []

    head = assert_one_commit(tmp_path / "keep", fresh_hf_cache)
    assert outcome.upload.commit_oid == head
    stored = hub.get_repo(REPO).commits[head].files["model.safetensors"]
    assert stored.lfs and hub.lfs_objects == {stored.sha256: len(weights)}


@pytest.mark.parametrize("lfs", [False, True], ids=["regular", "lfs"])
def test_lost_commit_answer_is_not_committed_twice(
    logged_in, tiny_run, tmp_path, fresh_hf_cache, lfs
):
    """The Hub applies the commit and the connection drops before its answer: mimcli's retry
    asks the Hub again, finds every file already there, and sends no second commit."""
    hub = logged_in
    if lfs:
        hub.offer_lfs()
    hub.drop_next(1, "/commit/", method="POST", when="response")
    retries: list[str] = []
    outcome = push(tiny_run["run"], tmp_path / "keep", retries)

    assert len(retries) == 1 and retries[0].startswith(f"uploading to {REPO}: "), retries
    (drop,) = hub.drops
    assert drop.when == "response" and "/commit/" in drop.path
    assert hub.count("POST", "/commit/") == 1  # the retry had nothing left to send
    head = assert_one_commit(tmp_path / "keep", fresh_hf_cache)
    # the push reports the commit it made, whose answer it never got
    upload = outcome.upload
    assert upload.commit_oid == head and not upload.unchanged and upload.attempts >= 2
    assert hub.get_repo(REPO).branches["main"] == head


def test_lost_pull_request_answer_opens_one_pull_request(
    logged_in, tiny_run, tmp_path, fresh_hf_cache
):
    """With ``create_pr`` the files stay off main, so the client would send the commit again and
    open a second pull request: mimcli's retry finds the one the lost attempt opened."""
    hub = logged_in
    hub.drop_next(1, "/commit/", method="POST", when="response")
    retries: list[str] = []
    keep = tmp_path / "keep"
    cfg = PushConfig(
        run_dir=tiny_run["run"],
        repo=REPO,
        to=keep,
        commit_message=MESSAGE,
        create_pr=True,
        retry_wait=0.0,
    )
    upload = run_push(cfg, on_retry=retries.append).upload

    assert len(retries) == 1 and [d.when for d in hub.drops] == ["response"]
    assert hub.count("POST", "/commit/") == 1
    refs = HfApi(token=TOKEN).list_repo_refs(REPO, include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"]
    main = HfApi(token=TOKEN).list_repo_commits(REPO)
    assert [c.title for c in main] == ["initial commit"]  # the pull request left main alone
    head = assert_one_commit(keep, fresh_hf_cache, revision="refs/pr/1")
    assert upload.commit_oid == head and upload.pr_url.endswith(f"/{REPO}/discussions/1")
    assert upload.commit_url.endswith(f"/{REPO}/commit/{head}") and not upload.unchanged


@pytest.mark.slow  # two CLI subprocesses: about 10 s
def test_lost_commit_answer_then_the_same_command_again(
    logged_in, tiny_run, tmp_path, fresh_hf_cache
):
    """Without retries the push fails with one line (exit 1); the Hub did apply the commit, so
    running the same command again finds nothing to commit."""
    hub = logged_in
    run, keep = tiny_run["run"], tmp_path / "keep"
    hub.drop_next(1, "/commit/", method="POST", when="response")
    args = ("push", str(run), "--repo", REPO, "--to", str(keep), "--commit-message", MESSAGE)
    failed = mimcli(*args, "--retries", "0")
    assert failed.returncode == 1, failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"uploading to {REPO} failed after 1 attempt" in errors[0]
    assert "Traceback" not in failed.stderr
    assert [d.when for d in hub.drops] == ["response"]
    head = assert_one_commit(keep, fresh_hf_cache)  # applied, though the push failed

    again = mimcli(*args)
    assert again.returncode == 0, again.stderr
    assert "nothing to commit" in again.stdout
    assert hub.count("POST", "/commit/") == 1
    assert assert_one_commit(keep, fresh_hf_cache) == head
    for proc in (failed, again):
        assert TOKEN not in proc.stdout + proc.stderr
