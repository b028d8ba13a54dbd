"""`mimcli push` through the real huggingface_hub client to the loopback Hub: the round trip to
timm, retries of transient failures, re-runs, and the token never showing up anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from typer.testing import CliRunner

from mimcli.cli.app import app

runner = CliRunner()
TOKEN = "hf_LoopbackSecretToken0123456789"


def mimcli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real command in a subprocess: every byte it prints is captured."""
    return subprocess.run(
        [sys.executable, "-m", "mimcli.cli.app", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]


@pytest.fixture
def logged_in(hub, monkeypatch):
    hub.add_token(TOKEN, user="alice")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return hub


def test_round_trip_to_timm_and_probe(logged_in, tiny_run, tmp_path, fresh_hf_cache):
    hub = logged_in
    run = tiny_run["run"]
    keep = tmp_path / "keep"
    done = mimcli("push", str(run), "--repo", "alice/tiny-refined", "--to", str(keep))
    assert done.returncode == 0, done.stderr
    assert "Pushed" in done.stdout and "hf-hub:alice/tiny-refined" in done.stdout
    repo = hub.get_repo("alice/tiny-refined")
    head = repo.commits[repo.branches["main"]]
    assert {"model.safetensors", "config.json", "README.md", "mimcli_run.json"} <= set(head.files)
    for name in ("model.safetensors", "config.json", "README.md"):
        assert head.files[name].data == (keep / name).read_bytes()
    assert not (run / ".push").exists()

    # stock timm, through the Hub, computes exactly what the run's exported encoder computes
    model = timm.create_model(
        "hf-hub:alice/tiny-refined", pretrained=True, cache_dir=fresh_hf_cache
    ).eval()
    export = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), export(x))
        assert torch.equal(model.forward_features(x), export.forward_features(x))

    # mimcli itself pulls the pushed model through the same Hub path
    probes = {}
    for name, spec in (("hub", "hf-hub:alice/tiny-refined"), ("local", str(run / "export"))):
        result = runner.invoke(
            app,
            [
                "probe",
                spec,
                "--train",
                str(tiny_run["train"]),
                "--val",
                str(tiny_run["val"]),
                "--k",
                "3",
                "--num-workers",
                "0",
                "--json",
            ],
        )
        assert result.exit_code == 0, result.output
        probes[name] = json.loads(result.stdout)["blocks"]
    assert probes["hub"] == probes["local"]

    # the same push again is safe: nothing changed, so no new commit
    again = mimcli("push", str(run), "--repo", "alice/tiny-refined")
    assert again.returncode == 0, again.stderr
    assert "nothing to commit" in again.stdout
    assert hub.get_repo("alice/tiny-refined").branches["main"] == head.sha

    # the token is never printed nor written
    for proc in (done, again):
        assert TOKEN not in proc.stdout + proc.stderr
    for path in files_under(keep, run, tmp_path):
        assert TOKEN.encode() not in path.read_bytes(), path
    for recorded in hub.requests:  # ... while the client did send it to the Hub
        if recorded.method == "POST" and "/commit/" in recorded.path:
            assert recorded.headers.get("authorization") == f"Bearer {TOKEN}"


def test_transient_failures_are_retried(logged_in, tiny_run):
    hub = logged_in
    hub.fail_next(2, 500, path_contains="/commit/")
    hub.fail_next(1, 429, path_contains="/api/repos/create")
    done = mimcli("push", str(tiny_run["run"]), "--repo", "alice/retry", "--retry-wait", "0")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("retry:") >= 3, done.stderr
    assert "HTTP 500" in done.stderr and "HTTP 429" in done.stderr
    repo = hub.get_repo("alice/retry")
    assert "model.safetensors" in repo.commits[repo.branches["main"]].files
    assert hub.count("POST", "/commit/") == 3


def test_persistent_failure_keeps_the_folder_and_a_rerun_succeeds(logged_in, tiny_run, tmp_path):
    hub = logged_in
    run = tiny_run["run"]
    hub.fail_next(3, 503, path_contains="/commit/")
    failed = mimcli(
        "push", str(run), "--repo", "alice/flaky", "--retries", "2", "--retry-wait", "0"
    )
    assert failed.returncode == 1
    lines = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "failed after 3 attempts (HTTP 503)" in lines[0]
    assert "Traceback" not in failed.stderr
    staged = run / ".push" / "repo"
    assert str(staged) in failed.stderr.replace("\n", "")
    assert (staged / "model.safetensors").is_file() and (staged / "README.md").is_file()
    repo = hub.get_repo("alice/flaky")
    assert repo is not None and "model.safetensors" not in repo.commits[repo.branches["main"]].files

    rerun = mimcli("push", str(run), "--repo", "alice/flaky")
    assert rerun.returncode == 0, rerun.stderr
    repo = hub.get_repo("alice/flaky")
    assert "model.safetensors" in repo.commits[repo.branches["main"]].files
    assert not (run / ".push").exists()
    assert TOKEN not in failed.stderr + failed.stdout + rerun.stdout + rerun.stderr


def test_branch_pull_request_and_bare_name(logged_in, tiny_run):
    hub = logged_in
    run = str(tiny_run["run"])
    first = runner.invoke(app, ["push", run, "--repo", "tiny", "--commit-message", "first"])
    assert first.exit_code == 0, first.output
    repo = hub.get_repo("alice/tiny")  # a bare name goes to the token's owner (whoami)
    main = repo.branches["main"]
    assert repo.commits[main].title == "first"

    dev = runner.invoke(
        app, ["push", run, "--repo", "alice/tiny", "--revision", "dev", "--license", "mit"]
    )
    assert dev.exit_code == 0, dev.output
    repo = hub.get_repo("alice/tiny")
    assert repo.branches["main"] == main
    assert "license: mit" in repo.commits[repo.branches["dev"]].files["README.md"].data.decode()

    pr = runner.invoke(app, ["push", run, "--repo", "alice/tiny", "--create-pr", "--tag", "pr"])
    assert pr.exit_code == 0, pr.output
    assert "Opened" in pr.stdout and "/discussions/" in pr.stdout
    repo = hub.get_repo("alice/tiny")
    assert repo.branches["main"] == main
    pr_readme = repo.commits[repo.branches["refs/pr/1"]].files["README.md"].data.decode()
    assert "- pr\n" in pr_readme


@pytest.mark.parametrize(
    "args, token, expect, code",
    [
        (["--repo", "alice/x"], None, "no Hugging Face token", 2),
        (["--repo", "alice/x"], "hf_wrong_token_123456", "refused the token (HTTP 401)", 2),
        (["--repo", "alice/x", "--create-pr", "--revision", "dev"], TOKEN, "--create-pr", 2),
        (["--dry-run"], TOKEN, "--to DIR", 2),
        ([], TOKEN, "--repo OWNER/NAME", 2),
        (["--repo", "a/b/c"], TOKEN, "expected OWNER/NAME", 2),
        (["--repo", "alice/x.."], TOKEN, "not a valid Hub repo id", 2),
    ],
)
def test_bad_push_requests_are_one_line(hub, tiny_run, monkeypatch, args, token, expect, code):
    hub.add_token(TOKEN, user="alice")
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    result = runner.invoke(app, ["push", str(tiny_run["run"]), *args])
    assert result.exit_code == code, result.output
    assert expect in result.output
    assert "Traceback" not in result.output
    assert hub.get_repo("alice/x") is None
    assert not (tiny_run["run"] / ".push").exists()
    if token:
        assert token not in result.output


def test_push_help_and_dry_run(tiny_run, tmp_path):
    result = runner.invoke(app, ["push", "--help"])
    assert result.exit_code == 0
    assert "Examples" in result.output and "--dry-run" in result.output
    out = tmp_path / "dry"
    result = runner.invoke(app, ["push", str(tiny_run["run"]), "--dry-run", "--to", str(out)])
    assert result.exit_code == 0, result.output
    assert "nothing uploaded" in result.output
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: timm\n")


def test_offline_or_unreachable_hub_fails_fast(tiny_run):
    offline = mimcli(
        "push",
        str(tiny_run["run"]),
        "--repo",
        "alice/x",
        env={"HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"},
    )
    assert offline.returncode == 2 and "HF_HUB_OFFLINE is set" in offline.stderr
    down = mimcli(
        "push",
        str(tiny_run["run"]),
        "--repo",
        "alice/x",
        env={"HF_TOKEN": TOKEN, "HF_ENDPOINT": "http://127.0.0.1:9"},
    )
    assert down.returncode == 1, down.stderr
    assert "cannot reach the Hub at http://127.0.0.1:9" in down.stderr
    assert "Traceback" not in down.stderr and TOKEN not in down.stderr + down.stdout
    assert not (tiny_run["run"] / ".push").exists()


# -- the library call behind the command ---------------------------------------------------------

JSON_KEYS = ["folder", "files", "license", "uploaded"]
UPLOAD_KEYS = ["repo_id", "repo_url", "commit_url", "commit_oid", "pr_url", "unchanged", "attempts"]


def test_run_push_dry_run_reports_the_folder_and_its_warnings(tmp_path):
    from mimcli.hub.push import PushConfig, run_push
    from tests.conftest import unlicensed_run

    run = unlicensed_run(tmp_path / "run")
    warnings: list[str] = []
    outcome = run_push(
        PushConfig(run_dir=run, to=tmp_path / "dry", dry_run=True), on_warning=warnings.append
    )
    assert outcome.upload is None and outcome.folder == outcome.built.path == tmp_path / "dry"
    assert warnings == outcome.built.warnings and "pass --license" in warnings[0]
    assert outcome.to_dict() == {
        "folder": str(tmp_path / "dry"),
        "files": ["README.md", "config.json", "mimcli_run.json", "model.safetensors"],
        "license": "other",
        "uploaded": False,
    }
    # without --repo no placeholder owner: the card's usage loads the folder from disk
    readme = (tmp_path / "dry" / "README.md").read_text()
    assert 'timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)' in readme
    assert "your-name" not in readme


def test_run_push_uploads_and_clears_its_staging_copy(logged_in, tiny_run):
    from mimcli.hub.push import PushConfig, run_push

    hub = logged_in
    hub.offer_lfs()  # as the Hub does; with Xet disabled in this process, the client uses LFS
    run = tiny_run["run"]
    retries: list[str] = []
    hub.fail_next(1, 503, path_contains="/commit/")
    outcome = run_push(
        PushConfig(run_dir=run, repo="lib", retry_wait=0.0, tags=["x"]), on_retry=retries.append
    )
    assert outcome.folder is None and not (run / ".push").exists()
    upload = outcome.upload
    assert upload is not None and upload.repo_id == "alice/lib" and not upload.unchanged
    assert len(retries) == 1 and "HTTP 503" in retries[0]
    repo = hub.get_repo("alice/lib")
    assert repo.branches["main"] == upload.commit_oid
    # the weights went up once through LFS: the retried commit found them stored
    weights = repo.commits[upload.commit_oid].files["model.safetensors"]
    assert weights.lfs and hub.lfs_objects == {weights.sha256: weights.size}
    assert hub.count("PUT", "/lfs-objects/") == 1 and hub.count("GET", "/xet-write-token/") == 0
    as_dict = outcome.to_dict()
    assert list(as_dict) == JSON_KEYS + UPLOAD_KEYS
    assert as_dict["folder"] is None and as_dict["uploaded"] is True
    assert as_dict["files"] == outcome.built.files and as_dict["commit_oid"] == upload.commit_oid

    # `push --json` prints exactly that (here: the same files again, nothing to commit)
    again = runner.invoke(app, ["push", str(run), "--repo", "alice/lib", "--tag", "x", "--json"])
    assert again.exit_code == 0, again.output
    printed = json.loads(again.stdout)
    assert list(printed) == JSON_KEYS + UPLOAD_KEYS
    assert printed["unchanged"] is True and printed["commit_oid"] == upload.commit_oid
    assert printed["files"] == as_dict["files"] and printed["folder"] is None
