"""A small Hugging Face Hub-compatible HTTP server for tests ("LoopbackHub"), plus pytest fixtures.

Project rule: Hub traffic in tests goes through the *real* ``huggingface_hub`` client over HTTP to
this server on 127.0.0.1 - never to the internet, never by patching the client.

Import-time side effects (read this before touching import order)
-----------------------------------------------------------------
``huggingface_hub`` copies ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``,
``HF_HUB_DISABLE_XET``... into ``huggingface_hub.constants`` **once, when it is first imported**.
So importing this module (the lead's ``tests/conftest.py`` loads it as a plugin with
``pytest_plugins = ("tests.hubserver",)``, which happens before any test module is imported):

* binds the session server to a free port on 127.0.0.1 (it only starts serving when the ``hub`` /
  ``hub_server`` fixture is first used; until then connections wait in the listen backlog);
* sets ``HF_ENDPOINT=http://127.0.0.1:<port>``;
* points ``HF_HOME``, ``HF_HUB_CACHE`` (and ``TORCH_HOME``, used by ``torch.hub``/timm for
  ``http(s)`` checkpoint URLs) into a fresh temporary directory, removed at interpreter exit - so
  no test reads or writes the user's real caches or token file;
* sets ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_DISABLE_XET=1``, ``HF_HUB_DISABLE_UPDATE_CHECK=1``
  and adds 127.0.0.1/localhost to ``NO_PROXY``;
* removes ``HF_TOKEN``, ``HUGGING_FACE_HUB_TOKEN``, ``HF_TOKEN_PATH``, ``HF_OIDC_*``,
  ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``HUGGINGFACE_CO_STAGING`` and legacy cache
  variables, so no real token is ever sent and offline mode is off.

It raises ``RuntimeError`` if ``huggingface_hub`` was already imported (its constants would still
point at huggingface.co). Subprocesses started by tests inherit this environment, so a CLI run in a
subprocess also talks to the LoopbackHub (as long as the ``hub`` fixture is active).

Cold caches
-----------
``HF_HUB_CACHE`` is shared by the whole session. For a cold cache in one test, use the
``fresh_hf_cache`` fixture and pass it explicitly:
``hf_hub_download(..., cache_dir=fresh_hf_cache)``, ``snapshot_download(..., cache_dir=...)``,
``timm.create_model("hf-hub:o/n", pretrained=True, cache_dir=...)``. The fixture also sets
``HF_HUB_CACHE`` in ``os.environ`` for that test, which reaches subprocesses (the in-process
``huggingface_hub.constants`` cannot change). Commit shas are random, so a session-wide cache
never serves a stale file for a re-created repo.

What the server speaks (enough for ``hf_hub_download``, ``snapshot_download``, ``HfApi.model_info``
/ ``dataset_info`` / ``repo_info`` / ``list_repo_files`` / ``list_repo_tree`` / ``file_exists`` /
``repo_exists`` / ``revision_exists`` / ``list_repo_refs`` / ``list_repo_commits`` /
``get_paths_info`` and timm's ``hf-hub:`` loading):

* ``HEAD|GET /[datasets/|spaces/]{repo_id}/resolve/{revision}/{path}`` - 200 with ``X-Repo-Commit``,
  ``ETag`` (git blob sha1 for regular files; sha256 plus ``X-Linked-Etag``/``X-Linked-Size`` for
  LFS-like files, see ``LFS_SUFFIXES``), ``Content-Length``, ``Accept-Ranges``; ``Range`` -> 206.
  Never a redirect, never xet headers. Errors: 404 with ``X-Error-Code`` ``RepoNotFound`` /
  ``RevisionNotFound`` / ``EntryNotFound`` (the latter with ``X-Repo-Commit``, as the Hub does).
* ``GET /api/{models|datasets|spaces}/{repo_id}[/revision/{rev}]`` (``blobs=true``, ``expand=``),
  ``.../tree/{rev}[/{path}]`` (``recursive``, ``expand``), ``.../refs``, ``.../commits/{rev}``,
  ``POST .../paths-info/{rev}``, and ``GET /api/agent-harnesses`` (empty registry).
* Plain files registered with ``add_url_file`` at any other path (``GET``/``HEAD``/``Range``).
"""

from __future__ import annotations

import atexit
import datetime as _dt
import hashlib
import json
import os
import shutil
import socket
import socketserver
import sys
import tempfile
import threading
import traceback
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

__all__ = [
    "HUB_URL",
    "LFS_SUFFIXES",
    "HubCommit",
    "HubFile",
    "HubRepo",
    "LoopbackHub",
    "RecordedRequest",
    "fresh_hf_cache",
    "hub",
    "hub_server",
]

HOST = "127.0.0.1"

# Files stored "in LFS" on the fake Hub (as the Hub's default .gitattributes would), plus anything
# >= LFS_MIN_SIZE bytes. They get ETag = sha256 and X-Linked-Etag / X-Linked-Size headers, and an
# ``lfs`` entry in tree listings. Everything is still served directly (no redirect).
LFS_SUFFIXES = (
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".safetensors",
    ".h5",
    ".msgpack",
    ".onnx",
    ".npy",
    ".npz",
    ".pkl",
    ".pickle",
    ".tar",
    ".gz",
    ".tgz",
    ".zip",
    ".zst",
    ".parquet",
    ".arrow",
)
LFS_MIN_SIZE = 10 * 1024 * 1024

_REPO_TYPE_PREFIXES = {"datasets": "dataset", "spaces": "space", "kernels": "kernel"}
_API_REPO_TYPES = {"models": "model", **_REPO_TYPE_PREFIXES}
# Path segments that follow a repo id in /api/{type}s/{repo_id}/... URLs.
_API_SUBROUTES = {"revision", "tree", "refs", "commits", "paths-info", "preupload", "commit"}


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(ts: _dt.datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class HubFile:
    """One file version. ``blob_oid`` is what git would store (the LFS pointer for LFS files)."""

    data: bytes
    sha256: str
    lfs: bool
    blob_oid: str
    pointer_size: int | None

    @classmethod
    def from_bytes(cls, path: str, data: bytes) -> HubFile:
        sha256 = hashlib.sha256(data).hexdigest()
        lfs = path.lower().endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE
        if not lfs:
            return cls(data, sha256, False, _git_blob_oid(data), None)
        pointer = (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
        ).encode()
        return cls(data, sha256, True, _git_blob_oid(pointer), len(pointer))

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def etag(self) -> str:
        """The ETag the Hub sends: git blob sha1 for regular files, sha256 for LFS files."""
        return self.sha256 if self.lfs else self.blob_oid


@dataclass
class HubCommit:
    sha: str
    message: str
    files: dict[str, HubFile]  # full snapshot of the repo at this commit: path -> file
    parent: str | None
    date: _dt.datetime
    author: str

    @property
    def title(self) -> str:
        return self.message.split("\n", 1)[0]


@dataclass
class HubRepo:
    repo_id: str
    repo_type: str
    created_at: _dt.datetime
    commits: dict[str, HubCommit] = field(default_factory=dict)  # sha -> commit, oldest first
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> sha
    private: bool = False

    def resolve(self, revision: str) -> HubCommit | None:
        """Branch name, full commit sha, or an unambiguous sha prefix (>= 7 hex chars)."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        rev = revision.lower()
        if len(rev) >= 7 and all(c in "0123456789abcdef" for c in rev):
            found = [c for sha, c in self.commits.items() if sha.startswith(rev)]
            if len(found) == 1:
                return found[0]
        return None

    def history(self, head: HubCommit) -> list[HubCommit]:
        """``head`` and its ancestors, newest first."""
        out = [head]
        while out[-1].parent is not None:
            out.append(self.commits[out[-1].parent])
        return out


class RecordedRequest(NamedTuple):
    """One request seen by the server. ``headers`` keys are lower-case."""

    method: str
    path: str  # as sent, including the query string
    headers: dict[str, str]


@dataclass
class _Failure:
    remaining: int
    status: int
    path_contains: str | None
    method: str | None


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


def _json_response(status: int, obj: Any, headers: Iterable[tuple[str, str]] = ()) -> _Response:
    return _Response(
        status,
        json.dumps(obj).encode(),
        [("Content-Type", "application/json; charset=utf-8"), *headers],
    )


def _hub_error(
    status: int, code: str | None, message: str, extra: Iterable[tuple[str, str]] = ()
) -> _Response:
    header_safe = message.encode("ascii", "backslashreplace").decode("ascii")
    headers = [("X-Error-Message", header_safe), *extra]
    if code is not None:
        headers.insert(0, ("X-Error-Code", code))
    return _json_response(status, {"error": message}, headers)


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: LoopbackHub

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def close_open_connections(self) -> None:
        """Drop keep-alive connections too, so a stopped hub really stops answering."""
        with self.connections_lock:
            connections = list(self.open_connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), which can stall without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Never print to stderr; keep the traceback for debugging (``LoopbackHub.errors``).
        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionError, TimeoutError)):
            self.hub._record_error(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/1.0"
    timeout = 30  # idle keep-alive connections are dropped after this many seconds
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.open_connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.open_connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self) -> None:
        hub = self.server.hub
        body = self._read_body()
        headers: dict[str, str] = {}
        for key, value in self.headers.items():
            key = key.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        hub._record_request(RecordedRequest(self.command, self.path, headers))
        try:
            response = hub._failure_for(self.command, self.path) or hub._dispatch(
                self.command, self.path, headers, body
            )
        except Exception:
            hub._record_error(traceback.format_exc())
            response = _json_response(500, {"error": "LoopbackHub internal error"})
        self.send_response(response.status)
        for key, value in response.headers:
            self.send_header(key, value)
        if not any(k.lower() == "content-length" for k, _ in response.headers):
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD" and response.body:
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class LoopbackHub:
    """An in-memory, Hub-compatible HTTP server on 127.0.0.1.

    The socket is bound in ``__init__`` (so ``url`` is known at once); ``start()`` begins serving
    in a daemon thread. Usable as a context manager (``with LoopbackHub() as hub: ...``).
    """

    def __init__(self, port: int = 0) -> None:
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], HubRepo] = {}
        self._url_files: dict[str, bytes] = {}
        self._failures: list[_Failure] = []
        self._requests: list[RecordedRequest] = []
        self._errors: list[str] = []
        self._server = _Server((HOST, port), _Handler)
        self._server.hub = self
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> LoopbackHub:
        """Start serving (idempotent)."""
        if self._closed:
            raise RuntimeError("LoopbackHub was stopped; create a new one")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"LoopbackHub:{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()
        self._server.close_open_connections()

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget all repos, URL files, pending failures, recorded requests and errors."""
        with self._lock:
            self._repos.clear()
            self._url_files.clear()
            self._failures.clear()
            self._requests.clear()
            self._errors.clear()

    # -- content -----------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | os.PathLike[str]],
        repo_type: str = "model",
        message: str = "init",
        *,
        branch: str = "main",
        delete: Iterable[str] = (),
        author: str = "loopback-user",
    ) -> str:
        """Create the repo if needed and add one commit on ``branch``; return its sha (40 hex).

        ``files`` maps repo paths to content: ``bytes``, ``str`` (the text itself, UTF-8), or a
        ``pathlib.Path`` / ``os.PathLike`` (read that file). A commit adds/overwrites these files on
        top of the branch's previous snapshot and removes the paths in ``delete``. A new branch
        starts from the current ``main`` (or empty).
        """
        additions: dict[str, bytes] = {}
        for path, content in files.items():
            if isinstance(content, bytes):
                additions[path] = content
            elif isinstance(content, str):
                additions[path] = content.encode("utf-8")
            elif isinstance(content, os.PathLike):
                additions[path] = Path(content).read_bytes()
            else:
                raise TypeError(f"unsupported content for {path!r}: {type(content).__name__}")
        return self._create_commit(
            repo_id, repo_type, additions, list(delete), message, branch=branch, author=author
        )

    def _create_commit(
        self,
        repo_id: str,
        repo_type: str,
        additions: Mapping[str, bytes],
        deletions: Iterable[str],
        message: str,
        *,
        branch: str = "main",
        author: str = "loopback-user",
    ) -> str:
        """The storage primitive (future upload endpoints will call this too)."""
        if repo_type not in ("model", "dataset", "space", "kernel"):
            raise ValueError(f"bad repo_type {repo_type!r}")
        parts = repo_id.split("/")
        if not 1 <= len(parts) <= 2 or not all(parts) or "--" in repo_id:
            raise ValueError(f"bad repo_id {repo_id!r}")
        for path in additions:
            if not path or path.startswith("/") or ".." in path.split("/") or path.endswith("/"):
                raise ValueError(f"bad file path {path!r}")
        now = _dt.datetime.now(_dt.timezone.utc)
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                repo = HubRepo(repo_id=repo_id, repo_type=repo_type, created_at=now)
                self._repos[(repo_type, repo_id)] = repo
            parent = repo.branches.get(branch) or repo.branches.get("main")
            snapshot = dict(repo.commits[parent].files) if parent else {}
            for path in deletions:
                snapshot.pop(path, None)
            for path, data in additions.items():
                snapshot[path] = HubFile.from_bytes(path, bytes(data))
            seed = f"{repo_type}/{repo_id}\0{parent}\0{message}\0{uuid.uuid4()}\0"
            seed += "\0".join(f"{p}:{f.blob_oid}" for p, f in sorted(snapshot.items()))
            sha = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[sha] = HubCommit(sha, message, snapshot, parent, now, author)
            repo.branches[branch] = sha
            return sha

    def get_repo(self, repo_id: str, repo_type: str = "model") -> HubRepo | None:
        """The stored repo (commits, branches), for assertions."""
        with self._lock:
            return self._repos.get((repo_type, repo_id))

    def add_url_file(self, path: str, data: bytes) -> str:
        """Serve ``data`` at ``path`` (e.g. ``/downloads/x.pth``) for GET/HEAD; return its URL."""
        if not path.startswith("/"):
            path = "/" + path
        with self._lock:
            self._url_files[path] = bytes(data)
        return self.url + path

    # -- fault injection & observation -------------------------------------------------------

    def fail_next(
        self,
        n: int,
        status: int = 500,
        path_contains: str | None = None,
        *,
        method: str | None = None,
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` (429 adds ``Retry-After: 0``).

        A request matches if ``path_contains`` is None or a substring of its path (query
        included), and ``method`` is None or equal to its method.
        """
        with self._lock:
            self._failures.append(_Failure(n, status, path_contains, method and method.upper()))

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot (a new list) of every request seen, oldest first, as (method, path, headers)."""
        with self._lock:
            return list(self._requests)

    def count(self, method: str | None = None, path_contains: str | None = None) -> int:
        """Number of recorded requests with this method and/or path substring."""
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method.upper())
            and (path_contains is None or path_contains in r.path)
        )

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    @property
    def errors(self) -> list[str]:
        """Tracebacks of exceptions raised inside the server (should stay empty)."""
        with self._lock:
            return list(self._errors)

    def _record_request(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _record_error(self, text: str) -> None:
        with self._lock:
            self._errors.append(text)

    def _failure_for(self, method: str, path: str) -> _Response | None:
        with self._lock:
            for failure in self._failures:
                if failure.remaining <= 0:
                    continue
                if failure.path_contains is not None and failure.path_contains not in path:
                    continue
                if failure.method is not None and failure.method != method:
                    continue
                failure.remaining -= 1
                status = failure.status
                break
            else:
                return None
            self._failures = [f for f in self._failures if f.remaining > 0]
        extra = [("Retry-After", "0")] if status == 429 else []
        return _json_response(status, {"error": f"LoopbackHub injected failure ({status})"}, extra)

    # -- routing -----------------------------------------------------------------------------

    def _dispatch(
        self, method: str, raw_target: str, headers: dict[str, str], body: bytes
    ) -> _Response:
        split = urlsplit(raw_target)
        raw_path = split.path
        query = parse_qs(split.query, keep_blank_values=True)
        with self._lock:
            url_file = self._url_files.get(unquote(raw_path))
        if url_file is not None and method in ("GET", "HEAD"):
            return _file_response(url_file, headers, [("Content-Type", "application/octet-stream")])

        segments = raw_path.strip("/").split("/")
        if segments[0] == "api":
            if segments[1:] == ["agent-harnesses"] and method == "GET":
                return _json_response(200, {"standardEnvVars": [], "harnesses": {}})
            if len(segments) >= 3 and segments[1] in _API_REPO_TYPES:
                return self._api_repo(
                    method, _API_REPO_TYPES[segments[1]], segments[2:], query, body
                )
            return _json_response(404, {"error": f"Not found: {raw_path}"})
        if "resolve" in segments and method in ("GET", "HEAD"):
            return self._resolve(segments, headers)
        return _json_response(404, {"error": f"Not found: {raw_path}"})

    def _find_repo(
        self, repo_type: str, segments: list[str]
    ) -> tuple[str, HubRepo | None, list[str]]:
        """Split ``owner/name/rest...`` (or ``name/rest...``) into repo id, repo, rest."""
        with self._lock:
            for n in (2, 1):
                repo_id = unquote("/".join(segments[:n]))
                if len(segments) >= n and (repo_type, repo_id) in self._repos:
                    return repo_id, self._repos[(repo_type, repo_id)], segments[n:]
        n = 2 if len(segments) >= 2 and segments[1] not in _API_SUBROUTES else 1
        return unquote("/".join(segments[:n])), None, segments[n:]

    @staticmethod
    def _resolve_revision(
        repo_id: str, repo: HubRepo | None, revision: str
    ) -> HubCommit | _Response:
        if repo is None:
            return _hub_error(404, "RepoNotFound", "Repository not found")
        commit = repo.resolve(revision)
        if commit is None:
            return _hub_error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _resolve(self, segments: list[str], headers: dict[str, str]) -> _Response:
        repo_type = "model"
        if segments[0] in _REPO_TYPE_PREFIXES:
            repo_type = _REPO_TYPE_PREFIXES[segments[0]]
            segments = segments[1:]
        i = segments.index("resolve") if "resolve" in segments else -1
        if i not in (1, 2) or len(segments) < i + 3:
            return _json_response(404, {"error": "Not found"})
        repo_id = unquote("/".join(segments[:i]))
        revision = unquote(segments[i + 1])
        filename = unquote("/".join(segments[i + 2 :]))
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            commit = self._resolve_revision(repo_id, repo, revision)
        if isinstance(commit, _Response):
            return commit
        entry = commit.files.get(filename)
        if entry is None:
            return _hub_error(
                404,
                "EntryNotFound",
                f"{filename} does not exist on {revision!r}",
                [("X-Repo-Commit", commit.sha)],
            )
        extra = [
            ("Content-Type", "application/octet-stream"),
            ("X-Repo-Commit", commit.sha),
            ("ETag", f'"{entry.etag}"'),
        ]
        if entry.lfs:
            extra += [("X-Linked-Etag", f'"{entry.sha256}"'), ("X-Linked-Size", str(entry.size))]
        return _file_response(entry.data, headers, extra)

    def _api_repo(
        self,
        method: str,
        repo_type: str,
        segments: list[str],
        query: dict[str, list[str]],
        body: bytes,
    ) -> _Response:
        repo_id, repo, rest = self._find_repo(repo_type, segments)
        route = rest[0] if rest else ""
        with self._lock:
            if method == "GET" and route in ("", "revision"):
                revision = unquote("/".join(rest[1:])) if route else "main"
                commit = self._resolve_revision(repo_id, repo, revision)
                if isinstance(commit, _Response):
                    return commit
                assert repo is not None
                return _json_response(200, _repo_info(repo, commit, query))
            if method == "GET" and route == "tree" and len(rest) >= 2:
                commit = self._resolve_revision(repo_id, repo, unquote(rest[1]))
                if isinstance(commit, _Response):
                    return commit
                assert repo is not None
                base = unquote("/".join(rest[2:])).strip("/")
                recursive = _truthy(query.get("recursive", ["false"])[-1])
                expand = _truthy(query.get("expand", ["false"])[-1])
                entries = _tree(repo, commit, base, recursive, expand)
                if entries is None:
                    return _hub_error(
                        404, "EntryNotFound", f"{base} does not exist on {unquote(rest[1])!r}"
                    )
                return _json_response(200, entries)
            if method == "POST" and route == "paths-info" and len(rest) >= 2:
                commit = self._resolve_revision(repo_id, repo, unquote(rest[1]))
                if isinstance(commit, _Response):
                    return commit
                assert repo is not None
                form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
                expand = _truthy(form.get("expand", ["false"])[-1])
                wanted = {p.strip("/") for p in form.get("paths", [])}
                entries = [
                    e for e in _tree(repo, commit, "", True, expand) or [] if e["path"] in wanted
                ]
                return _json_response(200, entries)
            if method == "GET" and route == "refs":
                if repo is None:
                    return _hub_error(404, "RepoNotFound", "Repository not found")
                branches = [
                    {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                    for name, sha in repo.branches.items()
                ]
                refs = {"branches": branches, "tags": [], "converts": [], "pullRequests": []}
                return _json_response(200, refs)
            if method == "GET" and route == "commits" and len(rest) >= 2:
                commit = self._resolve_revision(repo_id, repo, unquote(rest[1]))
                if isinstance(commit, _Response):
                    return commit
                assert repo is not None
                return _json_response(200, [_commit_json(c) for c in repo.history(commit)])
        return _json_response(404, {"error": f"Not found: {method} {'/'.join(segments)}"})


# --------------------------------------------------------------------------------------------
# Response builders
# --------------------------------------------------------------------------------------------


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _file_response(
    data: bytes, headers: Mapping[str, str], extra: list[tuple[str, str]]
) -> _Response:
    """200 with the whole file, or 206/416 for a single ``Range: bytes=...`` request."""
    size = len(data)
    extra = [*extra, ("Accept-Ranges", "bytes")]
    spec = headers.get("range", "").strip()
    if not spec.lower().startswith("bytes=") or "," in spec:
        return _Response(200, data, extra)
    start_s, _, end_s = spec[6:].strip().partition("-")
    try:
        if start_s:
            start = int(start_s)
            end = min(int(end_s), size - 1) if end_s else size - 1
        else:  # suffix range: the last N bytes
            start, end = max(size - int(end_s), 0), size - 1
    except ValueError:
        return _Response(200, data, extra)
    if start >= size or end < start:
        return _Response(416, b"", [*extra, ("Content-Range", f"bytes */{size}")])
    return _Response(
        206, data[start : end + 1], [*extra, ("Content-Range", f"bytes {start}-{end}/{size}")]
    )


def _repo_info(repo: HubRepo, commit: HubCommit, query: dict[str, list[str]]) -> dict[str, Any]:
    with_blobs = _truthy(query.get("blobs", ["false"])[-1])
    siblings = []
    for path, entry in sorted(commit.files.items()):
        sibling: dict[str, Any] = {"rfilename": path}
        if with_blobs:
            sibling.update(size=entry.size, blobId=entry.blob_oid)
            if entry.lfs:
                sibling["lfs"] = {
                    "sha256": entry.sha256,
                    "size": entry.size,
                    "pointerSize": entry.pointer_size,
                }
        siblings.append(sibling)
    author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
    info: dict[str, Any] = {
        "_id": hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
        "id": repo.repo_id,
        "author": author,
        "sha": commit.sha,
        "lastModified": _iso(commit.date),
        "createdAt": _iso(repo.created_at),
        "private": repo.private,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": siblings,
        "usedStorage": sum(f.size for f in commit.files.values()),
    }
    if repo.repo_type == "model":
        info["modelId"] = repo.repo_id
    expand = query.get("expand") or query.get("expand[]")
    if expand:
        info = {k: v for k, v in info.items() if k in {"_id", "id", *expand}}
    return info


def _tree(
    repo: HubRepo, commit: HubCommit, base: str, recursive: bool, expand: bool
) -> list[dict[str, Any]] | None:
    """Tree listing under ``base`` ("" = root); None if ``base`` is not a folder."""
    prefix = f"{base}/" if base else ""
    files = {p: f for p, f in commit.files.items() if p.startswith(prefix)}
    if base and not files:
        return None
    folders: set[str] = set()
    entries: list[dict[str, Any]] = []
    for path in sorted(files):
        rel = path[len(prefix) :]
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            folders.add(prefix + "/".join(parts[:depth]))
        if not recursive and len(parts) > 1:
            continue
        entry = files[path]
        item: dict[str, Any] = {
            "type": "file",
            "oid": entry.blob_oid,
            "size": entry.size,
            "path": path,
        }
        if entry.lfs:
            item["lfs"] = {
                "oid": entry.sha256,
                "size": entry.size,
                "pointerSize": entry.pointer_size,
            }
        if expand:
            item["lastCommit"] = _last_commit(repo, commit, path)
        entries.append(item)
    if not recursive:
        folders = {f for f in folders if "/" not in f[len(prefix) :]}
    for folder in sorted(folders):
        oid = hashlib.sha1(f"tree\0{commit.sha}\0{folder}".encode()).hexdigest()
        item = {"type": "directory", "oid": oid, "path": folder}
        if expand:
            item["lastCommit"] = _last_commit(repo, commit, folder)
        entries.append(item)
    return entries


def _last_commit(repo: HubRepo, commit: HubCommit, path: str) -> dict[str, str]:
    """The newest commit (ancestor of ``commit``) that changed ``path`` (a file or folder)."""

    def view(c: HubCommit) -> dict[str, str]:
        return {p: f.blob_oid for p, f in c.files.items() if p == path or p.startswith(path + "/")}

    history = repo.history(commit)
    last = history[0]
    for older in history[1:]:
        if view(older) != view(last):
            break
        last = older
    return {"id": last.sha, "title": last.title, "date": _iso(last.date)}


def _commit_json(c: HubCommit) -> dict[str, Any]:
    return {
        "id": c.sha,
        "title": c.title,
        "message": c.message.split("\n", 1)[1].lstrip("\n") if "\n" in c.message else "",
        "authors": [{"user": c.author}],
        "date": _iso(c.date),
    }


# --------------------------------------------------------------------------------------------
# Import-time environment (see module docstring) and the session server
# --------------------------------------------------------------------------------------------

if "huggingface_hub.constants" in sys.modules:
    raise RuntimeError(
        "tests.hubserver must be imported before huggingface_hub (or timm): huggingface_hub reads "
        "HF_ENDPOINT / HF_HOME / HF_HUB_CACHE at import time. Load it from tests/conftest.py with "
        "`pytest_plugins = ('tests.hubserver',)` and do not import huggingface_hub in plugins "
        "loaded before it."
    )

_TMP_ROOT = Path(tempfile.mkdtemp(prefix="mimcli-hubtests-"))
atexit.register(shutil.rmtree, _TMP_ROOT, ignore_errors=True)

_SESSION_HUB = LoopbackHub()
HUB_URL = _SESSION_HUB.url

for _var in (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_OIDC_RESOURCE",
    "HF_OIDC_ID_TOKEN",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HUGGINGFACE_CO_STAGING",
    "HUGGINGFACE_HUB_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_HUB_ENABLE_HF_TRANSFER",
):
    os.environ.pop(_var, None)
os.environ.update(
    {
        "HF_ENDPOINT": HUB_URL,
        "HF_HOME": str(_TMP_ROOT / "hf-home"),
        "HF_HUB_CACHE": str(_TMP_ROOT / "hf-home" / "hub"),
        "TORCH_HOME": str(_TMP_ROOT / "torch-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }
)
for _var in ("NO_PROXY", "no_proxy"):
    _hosts = [h for h in os.environ.get(_var, "").split(",") if h.strip()]
    os.environ[_var] = ",".join([*_hosts, "127.0.0.1", "localhost"])
del _var, _hosts


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hub_server() -> Iterator[LoopbackHub]:
    """The session's LoopbackHub, serving at ``HF_ENDPOINT``; stopped at the end of the session."""
    import huggingface_hub.constants as hf_constants

    if hf_constants.ENDPOINT != HUB_URL:
        pytest.fail(
            f"huggingface_hub.constants.ENDPOINT is {hf_constants.ENDPOINT!r}, not {HUB_URL!r}: "
            "huggingface_hub was imported before tests.hubserver set HF_ENDPOINT."
        )
    _SESSION_HUB.start()
    yield _SESSION_HUB
    _SESSION_HUB.stop()


@pytest.fixture
def hub(hub_server: LoopbackHub) -> Iterator[LoopbackHub]:
    """The session LoopbackHub, emptied (repos, URL files, failures, request log) for this test.

    Fails the test at teardown if the server itself raised while handling a request.
    """
    hub_server.reset()
    yield hub_server
    errors = hub_server.errors
    hub_server.reset()
    if errors:
        pytest.fail("LoopbackHub raised while serving:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture
def fresh_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache directory for one test.

    Pass it as ``cache_dir=`` to ``hf_hub_download`` / ``snapshot_download`` /
    ``timm.create_model``; it is also exported as ``HF_HUB_CACHE`` for subprocesses (the
    in-process ``huggingface_hub.constants.HF_HUB_CACHE`` cannot change after import).
    """
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache
