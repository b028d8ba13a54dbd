"""Writing to the LoopbackHub (tests/hubserver.py) with the real huggingface_hub client (2.4).

whoami, create_repo / delete_repo, create_branch, upload_folder / create_commit (incl. PRs), auth,
and what the client retries. Only the token passed explicitly is ever sent (the test environment
has none).

Client retry behaviour (huggingface_hub 2.4, HF_HUB_DISABLE_XET=1 as in these tests, so
``upload_folder`` takes the legacy single-commit path ``create_commit``):

* ``POST .../preupload/{rev}`` goes through ``http_backoff``: retried on 408/429/500/502/503/504
  (and timeouts / network errors) up to 5 times (6 tries), sleeping 1, 2, 4, 8, 8 s; a 429 or other
  retried status with ``Retry-After: N`` sleeps N + 1 s instead. Only then does it raise.
* ``POST .../commit/{rev}`` is sent once (``get_session().post``): a 5xx or 429 raises
  ``HfHubHTTPError`` at once, no commit is made, nothing is retried.
* ``POST /api/repos/create``, ``GET /api/whoami-v2``, ``POST /api/validate-yaml`` (README.md) and
  the ``repo_info`` call that answers an all-unchanged upload are not retried either. (create_repo
  loops, without sleeping, only on a 409 whose body says "another conflicting operation is in
  progress".)
* With hf_xet installed and *not* disabled, ``upload_folder`` instead runs ``pipelined_upload``:
  its commit POSTs are retried with backoff, and ``create_pr=True`` opens the PR with a separate
  ``POST .../discussions`` call (not served by the LoopbackHub).
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
)
from huggingface_hub.errors import (
    BadRequestError,
    EntryNotFoundError,
    HfHubHTTPError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hubserver import DEFAULT_GITATTRIBUTES, HubRepo, LoopbackHub

pytestmark = pytest.mark.timeout(60)

TOKEN = "hf_loopbackWriteToken123"
READ_TOKEN = "hf_loopbackReadToken456"
USER = "alice"
REPO = "acme/upload"
WEIGHTS = bytes(range(256)) * 64 + b"tail"  # *.safetensors: stored as an LFS-like file
CARD = "---\nlicense: mit\ntags:\n- mim\n---\n# Model\n"


@pytest.fixture
def api(hub: LoopbackHub) -> HfApi:
    hub.add_token(TOKEN, user=USER, role="write", name="ci-write")
    hub.add_token(READ_TOKEN, user=USER, role="read", name="ci-read")
    return HfApi(token=TOKEN)


def _folder(root: Path, overrides: dict[str, bytes] | None = None) -> Path:
    files = {
        "model.safetensors": WEIGHTS,
        "config.json": b'{"arch": "vit_tiny", "dim": 32}\n',
        "plots/a.png": b"\x89PNG\r\n\x1a\n" + bytes(100),
        "README.md": CARD.encode(),
        **(overrides or {}),
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _repo(hub: LoopbackHub, repo_id: str = REPO, repo_type: str = "model") -> HubRepo:
    repo = hub.get_repo(repo_id, repo_type)
    assert repo is not None
    return repo


def _changed_paths(repo: HubRepo, sha: str) -> set[str]:
    """Paths added, changed or removed by commit ``sha`` relative to its parent."""
    commit = repo.commits[sha]
    before = repo.commits[commit.parent].files if commit.parent else {}
    paths = set(before) | set(commit.files)
    return {p for p in paths if before.get(p) != commit.files.get(p)}


def _raw(hub: LoopbackHub, method: str, path: str, token: str | None = None, **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx2.Client(timeout=10) as client:
        return client.request(method, hub.url + path, headers=headers, **kwargs)


# ---------------------------------------------------------------------------------------------
# whoami and auth
# ---------------------------------------------------------------------------------------------


def test_whoami(hub: LoopbackHub, api: HfApi):
    me = api.whoami()
    assert me["type"] == "user" and me["name"] == USER and me["orgs"] == []
    assert me["auth"]["type"] == "access_token"
    assert me["auth"]["accessToken"] == {
        "displayName": "ci-write",
        "role": "write",
        "createdAt": me["auth"]["accessToken"]["createdAt"],
    }
    assert HfApi(token=READ_TOKEN).whoami()["auth"]["accessToken"]["role"] == "read"
    assert hub.requests[0].headers["authorization"] == f"Bearer {TOKEN}"

    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_unknown").whoami()
    assert err.value.response.status_code == 401
    assert str(err.value).startswith("Invalid user token.")

    before = len(hub.requests)
    with pytest.raises(LocalTokenNotFoundError):  # no token at all: raised client-side
        HfApi().whoami()
    assert len(hub.requests) == before
    assert _raw(hub, "GET", "/api/whoami-v2").status_code == 401
    assert _raw(hub, "GET", "/api/whoami-v2", token=TOKEN).json()["name"] == USER

    hub.reset()  # forgets tokens too
    assert _raw(hub, "GET", "/api/whoami-v2", token=TOKEN).status_code == 401


def test_writes_need_a_write_token(hub: LoopbackHub, api: HfApi, tmp_path: Path):
    api.create_repo(REPO)
    head = _repo(hub).branches["main"]
    folder = _folder(tmp_path / "f")

    with pytest.raises(HfHubHTTPError) as err:
        HfApi().upload_folder(folder_path=folder, repo_id=REPO)
    assert err.value.response.status_code == 401
    assert "authorization" not in hub.requests[-1].headers

    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_unknown").upload_folder(folder_path=folder, repo_id=REPO)
    assert err.value.response.status_code == 401

    read_api = HfApi(token=READ_TOKEN)
    with pytest.raises(HfHubHTTPError) as err:
        read_api.upload_folder(folder_path=folder, repo_id=REPO)
    assert err.value.response.status_code == 403
    assert "read token" in str(err.value)
    with pytest.raises(HfHubHTTPError) as err:
        read_api.create_repo("acme/other")
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:  # exist_ok: client checks repo_info, still 403
        read_api.create_repo("acme/other", exist_ok=True)
    assert err.value.response.status_code == 403
    # ...but create_repo(exist_ok=True) on an existing repo passes with a read token.
    assert read_api.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as err:
        read_api.create_branch(REPO, branch="dev")
    assert err.value.response.status_code == 403

    assert hub.get_repo("acme/other") is None
    assert _repo(hub).branches == {"main": head}  # nothing was written
    assert _raw(hub, "POST", f"/api/models/{REPO}/commit/main", content=b"").status_code == 401


# ---------------------------------------------------------------------------------------------
# Repos and branches
# ---------------------------------------------------------------------------------------------


def test_create_repo_exist_ok_private_and_delete(hub: LoopbackHub, api: HfApi):
    url = api.create_repo(REPO, private=True)
    assert url == f"{hub.url}/{REPO}" and url.repo_id == REPO and url.repo_type == "model"
    repo = _repo(hub)
    assert repo.private is True
    [initial] = repo.commits.values()
    assert repo.branches == {"main": initial.sha}
    assert initial.files[".gitattributes"].data == DEFAULT_GITATTRIBUTES.encode()
    assert "*.safetensors filter=lfs diff=lfs merge=lfs -text" in DEFAULT_GITATTRIBUTES
    assert initial.author == USER and initial.message == "initial commit"
    assert api.model_info(REPO).private is True
    assert api.list_repo_files(REPO) == [".gitattributes"]

    assert api.create_repo(REPO, exist_ok=True) == url  # 409 swallowed by the client
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert "already created" in str(err.value)
    assert list(_repo(hub).commits) == [initial.sha]

    assert api.create_repo("public").repo_id == f"{USER}/public"  # the token user's namespace
    assert _repo(hub, f"{USER}/public").private is False
    data = api.create_repo("acme/data", repo_type="dataset", private=False)
    assert data == f"{hub.url}/datasets/acme/data" and data.repo_type == "dataset"
    assert _repo(hub, "acme/data", "dataset").private is False
    assert hub.get_repo("acme/data") is None  # not a model
    create = json.loads(
        _raw(
            hub, "POST", "/api/repos/create", token=TOKEN, json={"name": "x", "organization": "o"}
        ).content
    )
    assert create["url"] == f"{hub.url}/o/x" and create["name"] == "o/x"

    api.delete_repo("acme/data", repo_type="dataset")
    assert hub.get_repo("acme/data", "dataset") is None
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo("acme/data", repo_type="dataset")
    api.delete_repo("acme/data", repo_type="dataset", missing_ok=True)
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token=READ_TOKEN).delete_repo(REPO)
    assert err.value.response.status_code == 403 and hub.get_repo(REPO) is not None


def test_create_branch_and_upload_to_it(
    hub: LoopbackHub, api: HfApi, tmp_path: Path, fresh_hf_cache: Path
):
    api.create_repo(REPO)
    main_head = _repo(hub).branches["main"]
    api.create_branch(REPO, branch="dev")
    assert _repo(hub).branches == {"main": main_head, "dev": main_head}
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch(REPO, branch="dev")
    assert err.value.response.status_code == 409
    api.create_branch(REPO, branch="dev", exist_ok=True)
    with pytest.raises(BadRequestError):
        api.create_branch(REPO, branch="refs/pr/5")
    with pytest.raises(RevisionNotFoundError):
        api.create_branch(REPO, branch="other", revision="nope")
    with pytest.raises(RepositoryNotFoundError):
        api.create_branch("acme/absent", branch="dev")

    info = api.upload_folder(
        folder_path=_folder(tmp_path / "f"), repo_id=REPO, revision="dev", commit_message="On dev"
    )
    repo = _repo(hub)
    assert repo.branches["main"] == main_head  # main untouched
    assert info.oid == repo.branches["dev"] != main_head
    assert repo.commits[info.oid].parent == main_head
    assert api.list_repo_files(REPO) == [".gitattributes"]
    assert "config.json" in api.list_repo_files(REPO, revision="dev")
    got = hf_hub_download(REPO, "model.safetensors", revision="dev", cache_dir=fresh_hf_cache)
    assert Path(got).read_bytes() == WEIGHTS
    refs = api.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": main_head, "dev": info.oid}

    # A branch from a commit sha, then deleting it.
    api.create_branch(REPO, branch="v1", revision=info.oid[:10])
    assert _repo(hub).branches["v1"] == info.oid
    api.delete_branch(REPO, branch="v1")
    assert "v1" not in _repo(hub).branches

    with pytest.raises(RevisionNotFoundError):  # committing to a missing branch: no auto-create
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO, revision="nope")
    with pytest.raises(RevisionNotFoundError):  # a sha is not a branch
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=REPO, revision=info.oid)


# ---------------------------------------------------------------------------------------------
# upload_folder / create_commit
# ---------------------------------------------------------------------------------------------


def test_upload_folder_round_trip(
    hub: LoopbackHub, api: HfApi, tmp_path: Path, fresh_hf_cache: Path
):
    api.create_repo(REPO)
    folder = _folder(tmp_path / "f")
    info = api.upload_folder(
        folder_path=folder,
        repo_id=REPO,
        commit_message="Add model",
        commit_description="trained with mimcli",
    )
    repo = _repo(hub)
    head = repo.branches["main"]
    assert info.oid == head and len(head) == 40
    assert info == info.commit_url == f"{hub.url}/{REPO}/commit/{head}"
    assert info.repo_url.repo_id == REPO and info.pr_url is None and info.pr_num is None
    assert repo.commits[head].message == "Add model\n\ntrained with mimcli"
    assert repo.commits[head].author == USER
    assert _changed_paths(repo, head) == {
        "model.safetensors",
        "config.json",
        "plots/a.png",
        "README.md",
    }

    assert sorted(api.list_repo_files(REPO)) == [
        ".gitattributes",
        "README.md",
        "config.json",
        "model.safetensors",
        "plots/a.png",
    ]
    for rel in ("model.safetensors", "config.json", "plots/a.png", "README.md"):
        local = hf_hub_download(REPO, rel, cache_dir=fresh_hf_cache)
        assert Path(local).read_bytes() == (folder / rel).read_bytes()
        assert f"/snapshots/{head}/" in local
    [commit, initial] = api.list_repo_commits(REPO)
    assert commit.commit_id == head and commit.title == "Add model"
    assert commit.message == "trained with mimcli" and commit.authors == [USER]
    assert initial.title == "initial commit"
    # The safetensors file is served like an LFS file (ETag = sha256), as on the Hub.
    [entry] = api.get_paths_info(REPO, ["model.safetensors"])
    assert entry.lfs is not None and entry.lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()

    # Requests: README validated twice (upload_folder and create_commit), 1 preupload, 1 commit.
    upload_requests = [(r.method, r.path) for r in hub.requests][:5]
    assert upload_requests == [
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"),
        ("POST", "/api/validate-yaml"),
        ("POST", f"/api/models/{REPO}/preupload/main"),
        ("POST", f"/api/models/{REPO}/commit/main"),
    ]
    [commit_request] = [r for r in hub.requests if "/commit/" in r.path]
    assert commit_request.headers["content-type"] == "application/x-ndjson"
    # The write calls carry the token; the downloads above (no token given) do not.
    auth = [r.headers.get("authorization") for r in hub.requests]
    assert auth[:5] == [f"Bearer {TOKEN}"] * 5
    assert {r.headers.get("authorization") for r in hub.requests if "/resolve/" in r.path} == {None}


def test_reupload_identical_is_a_no_op_and_one_change_is_one_commit(
    hub: LoopbackHub, api: HfApi, tmp_path: Path, fresh_hf_cache: Path
):
    api.create_repo(REPO)
    folder = _folder(tmp_path / "f")
    first = api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="v1")
    repo = _repo(hub)
    assert len(repo.commits) == 2

    hub.clear_requests()
    again = api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="v1 again")
    assert again.oid == first.oid == _repo(hub).branches["main"]
    assert len(_repo(hub).commits) == 2  # no new (empty) commit
    assert hub.count("POST", "/commit/") == 0
    assert hub.count("POST", "/preupload/main") == 1
    assert hub.count("GET", f"/api/models/{REPO}/revision/main") == 1  # repo_info for the answer

    (folder / "config.json").write_bytes(b'{"arch": "vit_tiny", "dim": 64}\n')
    changed = api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="dim 64")
    repo = _repo(hub)
    assert len(repo.commits) == 3 and changed.oid == repo.branches["main"] != first.oid
    assert repo.commits[changed.oid].parent == first.oid
    assert _changed_paths(repo, changed.oid) == {"config.json"}
    assert hub.count("POST", "/commit/") == 1
    local = hf_hub_download(REPO, "config.json", cache_dir=fresh_hf_cache)
    assert Path(local).read_bytes() == b'{"arch": "vit_tiny", "dim": 64}\n'

    # The preupload oid is the git blob sha1 of the content, also for LFS-like files.
    answer = _raw(
        hub,
        "POST",
        f"/api/models/{REPO}/preupload/{first.oid}",
        token=TOKEN,
        json={"files": [{"path": "model.safetensors", "sample": "", "size": 1}, {"path": "n"}]},
    ).json()
    assert answer["commitOid"] == first.oid
    assert answer["files"] == [
        {
            "path": "model.safetensors",
            "uploadMode": "regular",
            "shouldIgnore": False,
            "oid": hashlib.sha1(b"blob %d\0" % len(WEIGHTS) + WEIGHTS).hexdigest(),
        },
        {"path": "n", "uploadMode": "regular", "shouldIgnore": False, "oid": None},
    ]


def test_create_pr(hub: LoopbackHub, api: HfApi, tmp_path: Path, fresh_hf_cache: Path):
    api.create_repo(REPO)
    folder = _folder(tmp_path / "f")
    base = api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="v1")

    # Nothing changed: the client skips the commit, so no PR is opened at all.
    same = api.upload_folder(folder_path=folder, repo_id=REPO, create_pr=True)
    assert same.oid == base.oid and same.pr_url is None
    assert "refs/pr/1" not in _repo(hub).branches

    (folder / "extra.txt").write_bytes(b"new in the PR")
    info = api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="PR", create_pr=True)
    assert info.pr_url == f"{hub.url}/{REPO}/discussions/1"
    assert info.pr_revision == "refs/pr/1" and info.pr_num == 1
    repo = _repo(hub)
    assert repo.branches["main"] == base.oid  # main unchanged
    assert repo.branches["refs/pr/1"] == info.oid and repo.commits[info.oid].parent == base.oid
    assert _changed_paths(repo, info.oid) == {"extra.txt"}
    assert hub.count("POST", "/preupload/main?create_pr=1") == 2
    assert hub.count("POST", "/commit/main?create_pr=1") == 1

    got = hf_hub_download(REPO, "extra.txt", revision="refs/pr/1", cache_dir=fresh_hf_cache)
    assert Path(got).read_bytes() == b"new in the PR"
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "extra.txt", cache_dir=fresh_hf_cache)
    assert api.model_info(REPO, revision="refs/pr/1").sha == info.oid
    assert "extra.txt" in api.list_repo_files(REPO, revision="refs/pr/1")
    assert api.list_repo_commits(REPO, revision="refs/pr/1")[0].commit_id == info.oid
    refs = api.list_repo_refs(REPO, include_pull_requests=True)
    assert [b.name for b in refs.branches] == ["main"]
    assert [(p.name, p.ref, p.target_commit) for p in refs.pull_requests] == [
        ("refs/pr/1", "refs/pr/1", info.oid)
    ]
    with urllib.request.urlopen(f"{hub.url}/{REPO}/resolve/refs/pr/1/extra.txt") as resp:
        assert resp.read() == b"new in the PR"  # an unquoted refs/pr/N works too

    # Pushing to the PR branch, then a second PR.
    more = api.upload_file(
        path_or_fileobj=b"more", path_in_repo="more.txt", repo_id=REPO, revision="refs/pr/1"
    )
    assert _repo(hub).branches["refs/pr/1"] == more.oid and more.pr_url is None
    second = api.upload_file(
        path_or_fileobj=b"2", path_in_repo="two.txt", repo_id=REPO, create_pr=True
    )
    assert second.pr_revision == "refs/pr/2" and second.pr_num == 2
    assert _repo(hub).commits[second.oid].parent == base.oid
    assert _repo(hub).branches["main"] == base.oid


def test_create_commit_operations(hub: LoopbackHub, api: HfApi, tmp_path: Path):
    api.create_repo(REPO)
    folder = _folder(tmp_path / "f")
    api.upload_folder(folder_path=folder, repo_id=REPO)
    head = _repo(hub).branches["main"]
    info = api.create_commit(
        REPO,
        [
            CommitOperationDelete("config.json"),
            CommitOperationDelete("plots/"),
            CommitOperationCopy("README.md", "docs/README.md"),  # regular: re-sent as "file"
            CommitOperationCopy("model.safetensors", "copy.safetensors"),  # LFS-like: "lfsFile"
            CommitOperationAdd("empty.txt", b""),
        ],
        commit_message="Reshuffle",
        parent_commit=head,
    )
    repo = _repo(hub)
    files = repo.commits[info.oid].files
    assert sorted(files) == [
        ".gitattributes",
        "README.md",
        "copy.safetensors",
        "docs/README.md",
        "empty.txt",
        "model.safetensors",
    ]
    assert files["copy.safetensors"].data == WEIGHTS and files["empty.txt"].data == b""
    assert files["docs/README.md"].data == (folder / "README.md").read_bytes()

    with pytest.raises(HfHubHTTPError) as err:  # the branch moved on since `head`
        api.create_commit(
            REPO, [CommitOperationAdd("a", b"a")], commit_message="stale", parent_commit=head
        )
    assert err.value.response.status_code == 412
    with pytest.raises(EntryNotFoundError) as err:
        api.delete_file("config.json", REPO)
    assert "doesn't exist" in str(err.value)
    with pytest.raises(RepositoryNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="acme/absent")
    assert _repo(hub).branches["main"] == info.oid

    # Raw NDJSON: an lfsFile the server never received is a 400; an empty commit is accepted.
    def commit(*lines: dict) -> httpx2.Response:
        body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        return _raw(hub, "POST", f"/api/models/{REPO}/commit/main", token=TOKEN, content=body)

    header = {"key": "header", "value": {"summary": "raw", "description": ""}}
    lfs = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "ab" * 32}}
    bad = commit(header, lfs)
    assert bad.status_code == 400 and "never uploaded" in bad.json()["error"]
    utf8 = {"key": "file", "value": {"path": "u.txt", "content": "hé", "encoding": "utf-8"}}
    assert commit(header, utf8).status_code == 200
    assert _repo(hub).commits[_repo(hub).branches["main"]].files["u.txt"].data == "hé".encode()
    bad64 = {"key": "file", "value": {"path": "b", "content": "!!", "encoding": "base64"}}
    assert commit(header, bad64).status_code == 400
    assert commit({"key": "nonsense", "value": {}}).status_code == 400
    assert (
        commit(header, {"key": "file", "value": {"path": "../x", "content": ""}}).status_code == 400
    )
    before = len(_repo(hub).commits)
    empty = commit(header).json()
    assert empty["success"] is True and len(_repo(hub).commits) == before + 1
    assert empty["commitUrl"] == f"{hub.url}/{REPO}/commit/{empty['commitOid']}"
    assert "pullRequestUrl" not in empty


def test_readme_yaml_is_validated(hub: LoopbackHub, api: HfApi, tmp_path: Path):
    api.create_repo(REPO)
    head = _repo(hub).branches["main"]
    folder = _folder(tmp_path / "f", {"README.md": b"---\nlicense: [mit\n---\n# Model\n"})
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.upload_folder(folder_path=folder, repo_id=REPO)
    assert _repo(hub).branches["main"] == head and hub.count("POST", "/preupload/") == 0


def test_dataset_repo_upload(hub: LoopbackHub, api: HfApi, fresh_hf_cache: Path):
    api.create_repo("acme/feats", repo_type="dataset")
    info = api.upload_file(
        path_or_fileobj=b"1,2\n", path_in_repo="f.csv", repo_id="acme/feats", repo_type="dataset"
    )
    assert info.commit_url == f"{hub.url}/datasets/acme/feats/commit/{info.oid}"
    assert info.repo_url.repo_type == "dataset"
    path = hf_hub_download("acme/feats", "f.csv", repo_type="dataset", cache_dir=fresh_hf_cache)
    assert Path(path).read_bytes() == b"1,2\n"


# ---------------------------------------------------------------------------------------------
# Fault injection: what the client retries (see the module docstring)
# ---------------------------------------------------------------------------------------------


def test_commit_post_is_not_retried(hub: LoopbackHub, api: HfApi, tmp_path: Path):
    api.create_repo(REPO)
    head = _repo(hub).branches["main"]
    folder = _folder(tmp_path / "f")
    hub.clear_requests()
    hub.fail_next(2, 500, path_contains="/commit/")
    for _ in range(2):
        with pytest.raises(HfHubHTTPError) as err:
            api.upload_folder(folder_path=folder, repo_id=REPO)
        assert err.value.response.status_code == 500
    assert hub.count("POST", "/commit/") == 2  # one POST per call: no retry
    assert hub.count("POST", "/preupload/") == 2
    assert _repo(hub).branches["main"] == head

    hub.fail_next(1, 429, path_contains="/commit/")  # with Retry-After: 0 - still not retried
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_folder(folder_path=folder, repo_id=REPO)
    assert err.value.response.status_code == 429 and hub.count("POST", "/commit/") == 3

    info = api.upload_folder(folder_path=folder, repo_id=REPO)  # a plain re-run then works
    assert info.oid == _repo(hub).branches["main"] != head
    assert hub.count("POST", "/commit/") == 4


@pytest.mark.parametrize("status", [500, 503, 429])
def test_preupload_is_retried_with_backoff(
    hub: LoopbackHub, api: HfApi, tmp_path: Path, status: int
):
    api.create_repo(REPO)
    hub.clear_requests()
    hub.fail_next(1, status, path_contains="/preupload/")  # 429 comes with Retry-After: 0
    start = time.monotonic()
    info = api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    waited = time.monotonic() - start
    assert info.oid == _repo(hub).branches["main"]
    assert hub.count("POST", "/preupload/") == 2 and hub.count("POST", "/commit/") == 1
    assert 0.9 <= waited < 10  # one sleep of 1 s (5xx: base wait; 429: Retry-After 0 + 1)


def test_create_repo_and_whoami_are_not_retried(hub: LoopbackHub, api: HfApi):
    for status in (500, 429):
        hub.fail_next(1, status, path_contains="/api/repos/create")
        with pytest.raises(HfHubHTTPError) as err:
            api.create_repo(REPO, exist_ok=True)
        assert err.value.response.status_code == status
        hub.fail_next(1, status, path_contains="/api/whoami-v2")
        with pytest.raises(HfHubHTTPError) as err:
            api.whoami()
        assert err.value.response.status_code == status
    assert hub.count("POST", "/api/repos/create") == 2 and hub.count("GET", "/whoami-v2") == 2
    assert hub.get_repo(REPO) is None
    api.create_repo(REPO)
    assert hub.get_repo(REPO) is not None


def test_fail_next_applies_to_write_endpoints_before_auth(hub: LoopbackHub):
    hub.fail_next(1, 502, path_contains="/preupload/", method="POST")
    response = _raw(hub, "POST", f"/api/models/{REPO}/preupload/main", json={"files": []})
    assert response.status_code == 502  # injected before the (missing) token was checked
    response = _raw(hub, "POST", f"/api/models/{REPO}/preupload/main", json={"files": []})
    assert response.status_code == 401
    hub.add_token(TOKEN)
    response = _raw(hub, "POST", "/api/models/acme/absent/preupload/main", token=TOKEN, json={})
    assert response.status_code == 400
    response = _raw(
        hub, "POST", "/api/models/acme/absent/preupload/main", token=TOKEN, json={"files": []}
    )
    assert response.status_code == 404 and response.headers["X-Error-Code"] == "RepoNotFound"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{hub.url}/api/whoami-v2", timeout=10)
    assert err.value.code == 401


def test_drop_next_ends_the_connection_without_an_answer(hub: LoopbackHub, api: HfApi):
    # mid-body: a raw socket sends a quarter of a 1 MiB body and reads no status line, only the
    # connection's end (EOF or a reset)
    hub.drop_next(1, "/lfs-objects/", method="PUT")
    with socket.create_connection((urlsplit(hub.url).hostname, hub.port), timeout=10) as conn:
        conn.sendall(
            b"PUT /lfs-objects/" + b"0" * 64 + b" HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 1048576\r\n\r\n" + bytes(256 * 1024)
        )
        try:
            answer = conn.recv(1024)
        except ConnectionResetError:
            answer = b""
    assert answer == b""
    (drop,) = hub.drops
    assert drop.when == "body" and 0 < drop.received <= 64 * 1024 and drop.method == "PUT"
    assert hub.count("PUT", "/lfs-objects/") == 1

    # after the answer: the change stands, the client gets no answer
    hub.drop_next(1, "/api/repos/create", when="response")
    with pytest.raises(httpx2.RemoteProtocolError):
        api.create_repo(REPO)
    assert hub.get_repo(REPO) is not None and [d.when for d in hub.drops] == ["body", "response"]
    api.create_repo(REPO, exist_ok=True)  # the drops are used up: answered again
    assert hub.count("POST", "/api/repos/create") == 2

    with pytest.raises(ValueError, match="when must be"):
        hub.drop_next(1, when="headers")
    hub.drop_next(3, "/api/whoami-v2")
    hub.reset()  # forgets pending and recorded drops
    assert hub.drops == []
    hub.add_token(TOKEN, user=USER)
    assert api.whoami()["name"] == USER
