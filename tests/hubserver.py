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
``get_paths_info``, timm's ``hf-hub:`` loading, and for writing ``HfApi.whoami`` / ``create_repo``
/ ``delete_repo`` / ``create_branch`` / ``delete_branch`` / ``create_commit`` / ``upload_file`` /
``upload_folder`` (incl. ``create_pr=True``) / ``delete_file`` / ``delete_folder``):

* ``HEAD|GET /[datasets/|spaces/]{repo_id}/resolve/{revision}/{path}`` - 200 with ``X-Repo-Commit``,
  ``ETag`` (git blob sha1 for regular files; sha256 plus ``X-Linked-Etag``/``X-Linked-Size`` for
  LFS-like files, see ``LFS_SUFFIXES``), ``Content-Length``, ``Accept-Ranges``; ``Range`` -> 206.
  Never a redirect, never xet headers. Errors: 404 with ``X-Error-Code`` ``RepoNotFound`` /
  ``RevisionNotFound`` / ``EntryNotFound`` (the latter with ``X-Repo-Commit``, as the Hub does).
  ``{revision}`` is a branch, a (short) sha, or a ref such as ``refs/pr/1`` (quoted as the client
  does, ``refs%2Fpr%2F1``, or not).
* ``GET /api/{models|datasets|spaces}/{repo_id}[/revision/{rev}]`` (``blobs=true``, ``expand=``),
  ``.../tree/{rev}[/{path}]`` (``recursive``, ``expand``), ``.../refs`` (``include_prs=1``),
  ``.../commits/{rev}``, ``POST .../paths-info/{rev}``, and ``GET /api/agent-harnesses`` (empty
  registry). None of these check the token (private repos are readable by anyone).
* Writes. Tokens are accepted only once registered with ``add_token(token, user, role)``
  (``reset()`` forgets them). Write calls without ``Authorization: Bearer <token>`` or with an
  unknown token get 401, with a ``"read"`` token 403; the token's user is the commit author.

  - ``GET /api/whoami-v2`` - the Hub's user document (``type``, ``name``, ``orgs: []``,
    ``auth.accessToken.role``...); 401 without a token or with an unknown one.
  - ``POST /api/repos/create`` (``{name, organization, type, visibility}``) - 200 ``{url, name}``
    and an initial commit adding ``.gitattributes`` on ``main``; 409 if the repo exists (what
    ``exist_ok=True`` relies on). No ``organization`` means the token user's namespace.
  - ``DELETE /api/repos/delete`` - 200, or 404 ``RepoNotFound``.
  - ``POST|DELETE /api/{type}s/{repo_id}/branch/{branch}`` (``{startingPoint}``, default ``main``)
    - 409 if it exists, 400 for a ``refs/...`` name, 404 for an unknown starting point.
  - ``POST /api/{type}s/{repo_id}/preupload/{rev}`` - every file ``uploadMode: "regular"``,
    ``shouldIgnore: false``, ``oid`` = git blob sha1 of the *content* now at that path on ``rev``
    (null if absent): exactly what the client compares with its local oid to drop unchanged files.
    After ``offer_lfs()``, LFS-like paths (``LFS_SUFFIXES``, or a ``size`` >= ``LFS_MIN_SIZE``)
    get ``uploadMode: "lfs"`` and ``oid`` = the stored content's sha256 instead, as the Hub
    answers; the client then uploads them through the LFS batch API below before committing.
  - ``POST /[datasets/|spaces/]{repo_id}.git/info/lfs/objects/batch`` - the Git LFS batch API of a
    Hub without Xet storage: ``{"transfer": "basic", "objects": [...]}``, each object either
    without ``actions`` (content already stored) or with an ``upload`` action (``PUT
    /lfs-objects/{oid}``, no token needed, as for a presigned storage URL; the body must have that
    sha256 and size; sending a stored object again is accepted) and a ``verify`` action (``POST
    /lfs-objects/verify``, write token). No Xet: neither header nor transfer, and
    ``.../xet-write-token/...`` is a 404 like any unknown route.
    ``lfs_objects`` lists what arrived this way.
  - ``POST /api/{type}s/{repo_id}/commit/{branch}`` (NDJSON: ``header`` with ``summary``,
    ``description``, ``parentCommit``; ``file`` (base64 or utf-8), ``deletedFile``,
    ``deletedFolder``, ``lfsFile`` - only for an oid already stored: uploaded through the LFS
    batch API, or a server-side copy; anything else is 400). ``create_pr=1`` creates
    ``refs/pr/N`` (N = 1, 2, ...) from the branch head (or ``parentCommit``) and commits there.
    200 ``{success, commitOid, commitUrl, [pullRequestUrl]}``; 412 if ``parentCommit`` is not the
    branch head; 404 ``EntryNotFound`` for deleting a missing file; 404 ``RevisionNotFound`` if
    ``{branch}`` is not a branch.
  - ``POST /api/validate-yaml`` - 400 if a README's YAML front matter does not parse, else 200.

* Plain files registered with ``add_url_file`` at any other path (``GET``/``HEAD``/``Range``).

``fail_next`` applies to every request above, before any other handling. Nothing is printed;
requests are recorded with their headers (so tests can check what was sent - tokens included).

Dropped connections
-------------------
``drop_next(n, path_contains, method=..., when=...)`` makes the next ``n`` matching requests end
in a real TCP drop instead of an HTTP answer: the server closes the socket (``SO_LINGER`` 0, so
the client sees the connection end or reset, never a status line). ``when="body"`` drops it after
reading only the start of the request body (half of it, at most 64 KiB; the request is never
handled: nothing is stored or committed); ``when="response"`` handles the request completely (a
commit is applied, an LFS object stored) and drops the connection before a byte of the answer is
sent, as when a response is lost on the way back. Drops are checked before ``fail_next`` and
listed in ``drops``; a dropped request is still recorded in ``requests``.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import datetime as _dt
import hashlib
import json
import os
import shutil
import socket
import socketserver
import struct
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
    "RecordedDrop",
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
_API_SUBROUTES = {
    "revision",
    "tree",
    "refs",
    "commits",
    "paths-info",
    "preupload",
    "commit",
    "branch",
}
# URL prefix of a repo's web pages (commit / discussion URLs) per repo type.
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
_REPO_TYPES = tuple(_URL_PREFIXES)
# What ``POST /api/repos/create`` commits first, like the Hub's default ``.gitattributes``.
DEFAULT_GITATTRIBUTES = (
    "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
    + "*tfevents* filter=lfs diff=lfs merge=lfs -text\n"
)


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(ts: _dt.datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def _repo_id_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` is not a valid ``name`` or ``namespace/name`` (None if it is)."""
    parts = repo_id.split("/")
    if not 1 <= len(parts) <= 2 or not all(parts) or "--" in repo_id or ".." in repo_id:
        return f"bad repo_id {repo_id!r}"
    if any(c.isspace() for c in repo_id):
        return f"bad repo_id {repo_id!r}"
    return None


def _path_problem(path: str) -> str | None:
    """Why ``path`` cannot be a file path in a repo (None if it can)."""
    if not path or path.startswith("/") or path.endswith("/") or ".." in path.split("/"):
        return f"bad file path {path!r}"
    if path == ".git" or path.startswith(".git/"):
        return f"bad file path {path!r}"
    return None


def _normalize_ref(revision: str) -> str:
    """``refs/heads/main`` -> ``main`` (branches are stored by short name)."""
    return revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision


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
    # branch name -> sha; pull requests are stored here too, as "refs/pr/N"
    branches: dict[str, str] = field(default_factory=dict)
    private: bool = False
    pull_requests: int = 0  # number of pull requests opened so far (the last N in refs/pr/N)

    def resolve(self, revision: str) -> HubCommit | None:
        """Branch name (or ``refs/heads/<name>``, ``refs/pr/N``), full commit sha, or an
        unambiguous sha prefix (>= 7 hex chars)."""
        revision = _normalize_ref(revision)
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


@dataclass(frozen=True)
class _Token:
    user: str
    role: str  # "read" or "write"
    name: str


class RecordedRequest(NamedTuple):
    """One request seen by the server. ``headers`` keys are lower-case."""

    method: str
    path: str  # as sent, including the query string
    headers: dict[str, str]


class RecordedDrop(NamedTuple):
    """One connection the server dropped on purpose (``LoopbackHub.drop_next``)."""

    method: str
    path: str  # as sent, including the query string
    when: str  # "body" (dropped mid-body, not handled) or "response" (handled, answer lost)
    received: int  # body bytes read before the drop


@dataclass
class _Failure:
    remaining: int
    status: int
    path_contains: str | None
    method: str | None


@dataclass
class _Drop:
    remaining: int
    when: str
    path_contains: str | None
    method: str | None


DROP_WHEN = ("body", "response")
# at most this many body bytes are read before a ``when="body"`` drop
DROP_BODY_MAX = 64 * 1024


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

    def _read_body_start(self) -> int:
        """Read only the start of the body (for a ``when="body"`` drop); the bytes read."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return len(self.rfile.read1(DROP_BODY_MAX))
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0:
            return 0
        return len(self.rfile.read(min(max(length // 2, 1), DROP_BODY_MAX)))

    def _drop_connection(self) -> None:
        """End the TCP connection without an answer: shut it down now and reset it on close."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _handle(self) -> None:
        hub = self.server.hub
        headers: dict[str, str] = {}
        for key, value in self.headers.items():
            key = key.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        drop = hub._drop_for(self.command, self.path)
        if drop == "body":
            received = self._read_body_start()
            hub._record_request(RecordedRequest(self.command, self.path, headers))
            hub._record_drop(RecordedDrop(self.command, self.path, drop, received))
            self._drop_connection()
            return
        body = self._read_body()
        hub._record_request(RecordedRequest(self.command, self.path, headers))
        try:
            response = hub._failure_for(self.command, self.path) or hub._dispatch(
                self.command, self.path, headers, body
            )
        except Exception:
            hub._record_error(traceback.format_exc())
            response = _json_response(500, {"error": "LoopbackHub internal error"})
        if drop == "response":
            hub._record_drop(RecordedDrop(self.command, self.path, drop, len(body)))
            self._drop_connection()
            return
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
        self._drops: list[_Drop] = []
        self._dropped: list[RecordedDrop] = []
        self._requests: list[RecordedRequest] = []
        self._errors: list[str] = []
        self._tokens: dict[str, _Token] = {}
        self._lfs_offered = False
        self._lfs_objects: dict[str, bytes] = {}  # sha256 -> content, uploaded through LFS
        self._lfs_pending: dict[str, int] = {}  # sha256 -> size, announced by a batch request
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
        """Forget all repos, URL files, tokens, pending failures and drops, recorded requests,
        drops and errors."""
        with self._lock:
            self._repos.clear()
            self._url_files.clear()
            self._tokens.clear()
            self._lfs_offered = False
            self._lfs_objects.clear()
            self._lfs_pending.clear()
            self._failures.clear()
            self._drops.clear()
            self._dropped.clear()
            self._requests.clear()
            self._errors.clear()

    def add_token(
        self,
        token: str,
        user: str = "loopback-user",
        role: str = "write",
        *,
        name: str = "loopback-token",
    ) -> str:
        """Accept ``token`` (sent as ``Authorization: Bearer <token>``) for ``user``; return it.

        ``role`` is ``"write"`` (may create repos, branches and commits anywhere) or ``"read"``
        (write calls get 403). ``name`` is the token's display name in ``whoami``.
        """
        if role not in ("read", "write"):
            raise ValueError(f"role must be 'read' or 'write', not {role!r}")
        if not token or any(c.isspace() for c in token):
            raise ValueError("a token is a non-empty string without whitespace")
        with self._lock:
            self._tokens[token] = _Token(user, role, name)
        return token

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
        """The storage primitive, used by ``add_repo`` and the commit endpoints.

        Commits on top of ``branch`` (a branch name or ``refs/pr/N``; a new branch starts from
        ``main``, or empty), creating the repo if needed. Deletions are applied before additions.
        """
        if repo_type not in _REPO_TYPES:
            raise ValueError(f"bad repo_type {repo_type!r}")
        problem = _repo_id_problem(repo_id) or next(
            (p for p in map(_path_problem, additions) if p), None
        )
        if problem:
            raise ValueError(problem)
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

    def offer_lfs(self, offered: bool = True) -> None:
        """Answer ``preupload`` with ``uploadMode: "lfs"`` for LFS-like files (until ``reset()``),
        as a Hub without Xet storage does: the client then uploads them through the LFS batch API.
        """
        with self._lock:
            self._lfs_offered = offered

    @property
    def lfs_objects(self) -> dict[str, int]:
        """sha256 -> size of every object uploaded through the LFS batch API (``PUT``)."""
        with self._lock:
            return {oid: len(data) for oid, data in self._lfs_objects.items()}

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

    def drop_next(
        self,
        n: int,
        path_contains: str | None = None,
        *,
        method: str | None = None,
        when: str = "body",
    ) -> None:
        """Drop the TCP connection of the next ``n`` matching requests instead of answering.

        ``when="body"``: after reading only the start of the body (half, at most
        ``DROP_BODY_MAX`` bytes); the request is not handled. ``when="response"``: after handling
        it completely (its change stands), before sending anything back. Matching as for
        ``fail_next``; drops are checked first. What happened is listed in ``drops``.
        """
        if when not in DROP_WHEN:
            raise ValueError(f"when must be one of {DROP_WHEN}, not {when!r}")
        if n < 1:
            raise ValueError(f"n must be at least 1, not {n}")
        with self._lock:
            self._drops.append(_Drop(n, when, path_contains, method and method.upper()))

    @property
    def drops(self) -> list[RecordedDrop]:
        """Snapshot of the connections dropped by ``drop_next``, oldest first."""
        with self._lock:
            return list(self._dropped)

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

    def _record_drop(self, drop: RecordedDrop) -> None:
        with self._lock:
            self._dropped.append(drop)

    def _drop_for(self, method: str, path: str) -> str | None:
        """``"body"`` / ``"response"`` if a pending ``drop_next`` takes this request, else None."""
        with self._lock:
            for drop in self._drops:
                if drop.path_contains is not None and drop.path_contains not in path:
                    continue
                if drop.method is not None and drop.method != method:
                    continue
                drop.remaining -= 1
                self._drops = [d for d in self._drops if d.remaining > 0]
                return drop.when
        return None

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

        if method == "POST" and raw_path.endswith(_LFS_BATCH_SUFFIX):
            return self._lfs_batch(raw_path[: -len(_LFS_BATCH_SUFFIX)], headers, body)
        if raw_path.startswith("/lfs-objects/"):
            return self._lfs_object(method, raw_path[len("/lfs-objects/") :], headers, body)

        segments = raw_path.strip("/").split("/")
        if segments[0] == "api":
            route = (method, "/".join(segments[1:]))
            if route == ("GET", "agent-harnesses"):
                return _json_response(200, {"standardEnvVars": [], "harnesses": {}})
            if route == ("GET", "whoami-v2"):
                return self._whoami(headers)
            if route == ("POST", "repos/create"):
                return self._create_repo(headers, body)
            if route == ("DELETE", "repos/delete"):
                return self._delete_repo(headers, body)
            if route == ("POST", "validate-yaml"):
                return _validate_yaml(body)
            if len(segments) >= 3 and segments[1] in _API_REPO_TYPES:
                return self._api_repo(
                    method, _API_REPO_TYPES[segments[1]], segments[2:], query, headers, body
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
        rev_end = i + 2  # the revision is one segment, ``refs%2Fpr%2F1`` - or ``refs/pr/1``
        if (
            segments[i + 1] == "refs"
            and len(segments) >= i + 5
            and segments[i + 2] in ("pr", "heads")
        ):
            rev_end = i + 4
        revision = unquote("/".join(segments[i + 1 : rev_end]))
        filename = unquote("/".join(segments[rev_end:]))
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
        headers: dict[str, str],
        body: bytes,
    ) -> _Response:
        repo_id, repo, rest = self._find_repo(repo_type, segments)
        route = rest[0] if rest else ""
        if route in ("preupload", "commit", "branch") and len(rest) >= 2:
            revision = unquote("/".join(rest[1:]))
            if method == "POST" and route == "preupload":
                return self._preupload(repo_id, repo, revision, headers, body)
            if method == "POST" and route == "commit":
                create_pr = _truthy(query.get("create_pr", ["0"])[-1])
                return self._commit(repo_type, repo_id, repo, revision, create_pr, headers, body)
            if method in ("POST", "DELETE") and route == "branch":
                return self._branch(method, repo_id, repo, revision, headers, body)
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
                    if not name.startswith("refs/")
                ]
                refs: dict[str, Any] = {"branches": branches, "tags": [], "converts": []}
                if _truthy(query.get("include_prs", ["0"])[-1]):
                    refs["pullRequests"] = [
                        {"name": name, "ref": name, "targetCommit": sha}
                        for name, sha in repo.branches.items()
                        if name.startswith("refs/pr/")
                    ]
                return _json_response(200, refs)
            if method == "GET" and route == "commits" and len(rest) >= 2:
                commit = self._resolve_revision(repo_id, repo, unquote(rest[1]))
                if isinstance(commit, _Response):
                    return commit
                assert repo is not None
                return _json_response(200, [_commit_json(c) for c in repo.history(commit)])
        return _json_response(404, {"error": f"Not found: {method} {'/'.join(segments)}"})

    # -- write endpoints ---------------------------------------------------------------------

    def _web_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.url}/{_URL_PREFIXES[repo_type]}{repo_id}"

    def _authorize(self, headers: Mapping[str, str], *, write: bool) -> _Token | _Response:
        """The token's owner, or the 401/403 response the Hub would give."""
        value = headers.get("authorization", "").strip()
        if not value:
            return _hub_error(401, None, "You must be authenticated: no Authorization header")
        scheme, _, token = value.partition(" ")
        with self._lock:
            info = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if info is None:
            return _hub_error(401, None, "Invalid credentials in Authorization header")
        if write and info.role != "write":
            return _hub_error(
                403,
                None,
                f"You don't have the rights to do this: token {info.name!r} of {info.user!r}"
                " is a read token",
            )
        return info

    def _whoami(self, headers: Mapping[str, str]) -> _Response:
        token = self._authorize(headers, write=False)
        if isinstance(token, _Response):
            return token
        user_id = hashlib.sha1(f"user/{token.user}".encode()).hexdigest()[:24]
        return _json_response(
            200,
            {
                "type": "user",
                "id": user_id,
                "name": token.user,
                "fullname": token.user,
                "email": f"{token.user}@loopback.invalid",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {
                        "displayName": token.name,
                        "role": token.role,
                        "createdAt": "2024-01-01T00:00:00.000Z",
                    },
                },
            },
        )

    @staticmethod
    def _repo_from_payload(
        payload: Any, token: _Token
    ) -> tuple[str, str] | _Response:  # (repo_type, repo_id)
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            return _hub_error(400, None, "Expected a JSON object with a 'name'")
        organization = payload.get("organization") or token.user
        repo_type = payload.get("type") or "model"
        if repo_type not in _REPO_TYPES or not isinstance(organization, str):
            return _hub_error(400, None, f"Invalid repo type or organization: {payload!r}")
        repo_id = f"{organization}/{payload['name']}"
        problem = _repo_id_problem(repo_id)
        if problem:
            return _hub_error(400, None, problem)
        return repo_type, repo_id

    def _create_repo(self, headers: Mapping[str, str], body: bytes) -> _Response:
        token = self._authorize(headers, write=True)
        if isinstance(token, _Response):
            return token
        payload = _json_or_none(body)
        found = self._repo_from_payload(payload, token)
        if isinstance(found, _Response):
            return found
        repo_type, repo_id = found
        private = payload.get("visibility") in ("private", "protected") or bool(
            payload.get("private")
        )
        url = self._web_url(repo_type, repo_id)
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                message = f"You already created this {repo_type} repo"
                return _json_response(
                    409, {"error": message, "url": url}, [("X-Error-Message", message)]
                )
            now = _dt.datetime.now(_dt.timezone.utc)
            repo = HubRepo(repo_id=repo_id, repo_type=repo_type, created_at=now, private=private)
            self._repos[(repo_type, repo_id)] = repo
            gitattributes = {".gitattributes": DEFAULT_GITATTRIBUTES.encode()}
            self._create_commit(
                repo_id, repo_type, gitattributes, (), "initial commit", author=token.user
            )
        return _json_response(200, {"url": url, "name": repo_id, "id": _repo_oid(repo)})

    def _delete_repo(self, headers: Mapping[str, str], body: bytes) -> _Response:
        token = self._authorize(headers, write=True)
        if isinstance(token, _Response):
            return token
        found = self._repo_from_payload(_json_or_none(body), token)
        if isinstance(found, _Response):
            return found
        with self._lock:
            if self._repos.pop(found, None) is None:
                return _hub_error(404, "RepoNotFound", "Repository not found")
        return _json_response(200, {})

    def _branch(
        self,
        method: str,
        repo_id: str,
        repo: HubRepo | None,
        branch: str,
        headers: Mapping[str, str],
        body: bytes,
    ) -> _Response:
        token = self._authorize(headers, write=True)
        if isinstance(token, _Response):
            return token
        if repo is None:
            return _hub_error(404, "RepoNotFound", "Repository not found")
        branch = _normalize_ref(branch)
        if method == "DELETE":
            with self._lock:
                if branch == "main":
                    return _hub_error(403, None, "Cannot delete the default branch")
                if branch.startswith("refs/") or repo.branches.pop(branch, None) is None:
                    return _hub_error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
            return _json_response(200, {})
        if (
            branch.startswith("refs/")
            or _path_problem(branch)
            or any(c.isspace() or c in "~^:?*[\\" for c in branch)
        ):
            return _hub_error(400, None, f"Invalid reference for a branch: {branch!r}")
        payload = _json_or_none(body) if body.strip() else {}
        if not isinstance(payload, dict):
            return _hub_error(400, None, "Expected a JSON object")
        starting_point = payload.get("startingPoint") or "main"
        with self._lock:
            if branch in repo.branches:
                return _hub_error(409, None, f"Reference already exists: refs/heads/{branch}")
            start = self._resolve_revision(repo_id, repo, str(starting_point))
            if isinstance(start, _Response):
                return start
            repo.branches[branch] = start.sha
        return _json_response(200, {})

    def _preupload(
        self,
        repo_id: str,
        repo: HubRepo | None,
        revision: str,
        headers: Mapping[str, str],
        body: bytes,
    ) -> _Response:
        token = self._authorize(headers, write=True)
        if isinstance(token, _Response):
            return token
        payload = _json_or_none(body)
        files = payload.get("files") if isinstance(payload, dict) else None
        if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("path"), str) for f in files
        ):
            return _hub_error(400, None, "Expected {'files': [{'path': ..., ...}, ...]}")
        with self._lock:
            commit = self._resolve_revision(repo_id, repo, revision)
            if isinstance(commit, _Response):
                return commit
            answer = []
            for item in files:
                stored = commit.files.get(item["path"])
                size = item.get("size")
                lfs = self._lfs_offered and (
                    item["path"].lower().endswith(LFS_SUFFIXES)
                    or (isinstance(size, int) and size >= LFS_MIN_SIZE)
                )
                # What the client computes for its file: sha256 in "lfs" mode, else the git blob
                # sha1 of the content (for LFS-like files that is not ``blob_oid``, the pointer's).
                oid = None
                if stored is not None:
                    oid = stored.sha256 if lfs else _git_blob_oid(stored.data)
                answer.append(
                    {
                        "path": item["path"],
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": oid,
                    }
                )
        return _json_response(200, {"files": answer, "commitOid": commit.sha})

    def _lfs_batch(self, repo_path: str, headers: Mapping[str, str], body: bytes) -> _Response:
        """``POST {repo}.git/info/lfs/objects/batch``: upload actions for what is not stored yet."""
        token = self._authorize(headers, write=True)
        if isinstance(token, _Response):
            return token
        segments = repo_path.strip("/").split("/")
        repo_type = "model"
        if segments[0] in _REPO_TYPE_PREFIXES:
            repo_type = _REPO_TYPE_PREFIXES[segments[0]]
            segments = segments[1:]
        repo_id = unquote("/".join(segments))
        repo_id = repo_id[: -len(".git")] if repo_id.endswith(".git") else repo_id
        if self.get_repo(repo_id, repo_type) is None:
            return _hub_error(404, "RepoNotFound", "Repository not found")
        payload = _json_or_none(body)
        if not isinstance(payload, dict):
            payload = {}
        objects = payload.get("objects")
        if (
            payload.get("operation") != "upload"
            or "basic" not in (payload.get("transfers") or ["basic"])
            or not isinstance(objects, list)
            or not all(
                isinstance(o, dict)
                and isinstance(o.get("oid"), str)
                and len(o["oid"]) == 64
                and isinstance(o.get("size"), int)
                for o in objects
            )
        ):
            return _hub_error(400, None, "Expected an LFS upload batch with 'basic' transfer")
        answer = []
        for item in objects:
            oid, size = item["oid"].lower(), item["size"]
            if self._stored_by_sha256(oid) is not None:
                answer.append({"oid": oid, "size": size})  # no actions: nothing to upload
                continue
            with self._lock:
                self._lfs_pending[oid] = size
            actions = {
                "upload": {"href": f"{self.url}/lfs-objects/{oid}"},
                "verify": {"href": f"{self.url}/lfs-objects/verify"},
            }
            answer.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        return _Response(
            200,
            json.dumps({"transfer": "basic", "objects": answer}).encode(),
            [("Content-Type", "application/vnd.git-lfs+json")],
        )

    def _lfs_object(
        self, method: str, rest: str, headers: Mapping[str, str], body: bytes
    ) -> _Response:
        """``PUT /lfs-objects/{oid}`` (the upload action) and ``POST /lfs-objects/verify``."""
        if method == "POST" and rest == "verify":
            token = self._authorize(headers, write=True)
            if isinstance(token, _Response):
                return token
            payload = _json_or_none(body)
            oid = str(payload.get("oid", "")).lower() if isinstance(payload, dict) else ""
            with self._lock:
                data = self._lfs_objects.get(oid)
            if data is None or len(data) != payload.get("size"):
                return _hub_error(404, None, f"LFS object {oid!r} was not uploaded")
            return _json_response(200, {})
        if method != "PUT":
            return _json_response(404, {"error": f"Not found: {method} /lfs-objects/{rest}"})
        oid = rest.lower()
        with self._lock:
            size = self._lfs_pending.get(oid)
            if size is None and oid in self._lfs_objects:  # sent again, as a storage URL allows
                size = len(self._lfs_objects[oid])
        if size is None:
            return _hub_error(403, None, f"no upload of LFS object {oid!r} was announced")
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            return _hub_error(400, None, f"the body is not LFS object {oid!r} of {size} bytes")
        with self._lock:
            self._lfs_objects[oid] = body
            self._lfs_pending.pop(oid, None)
        return _Response(200, b"", [("ETag", f'"{oid}"')])

    def _stored_by_sha256(self, sha256: str) -> bytes | None:
        with self._lock:
            if sha256 in self._lfs_objects:
                return self._lfs_objects[sha256]
            for repo in self._repos.values():
                for commit in repo.commits.values():
                    for entry in commit.files.values():
                        if entry.sha256 == sha256:
                            return entry.data
        return None

    def _commit(
        self,
        repo_type: str,
        repo_id: str,
        repo: HubRepo | None,
        revision: str,
        create_pr: bool,
        headers: Mapping[str, str],
        body: bytes,
    ) -> _Response:
        token = self._authorize(headers, write=True)
        if isinstance(token, _Response):
            return token
        if repo is None:
            return _hub_error(404, "RepoNotFound", "Repository not found")
        parsed = _parse_commit_payload(body)
        if isinstance(parsed, _Response):
            return parsed
        header, operations = parsed
        branch = _normalize_ref(revision)
        summary = str(header.get("summary") or "").strip()
        if not summary:
            return _hub_error(400, None, "The commit summary (title) must not be empty")
        description = str(header.get("description") or "").strip()
        message = f"{summary}\n\n{description}" if description else summary
        parent_commit = header.get("parentCommit")
        with self._lock:
            if self._repos.get((repo_type, repo_id)) is not repo:  # deleted meanwhile
                return _hub_error(404, "RepoNotFound", "Repository not found")
            if branch not in repo.branches or (create_pr and branch.startswith("refs/")):
                return _hub_error(
                    404, "RevisionNotFound", f"Invalid rev id: {revision} (not a branch)"
                )
            base = repo.branches[branch]
            if parent_commit is not None:
                parent = repo.resolve(str(parent_commit)) if parent_commit else None
                if create_pr:
                    if parent is None:
                        return _hub_error(
                            404, "RevisionNotFound", f"Invalid rev id: {parent_commit}"
                        )
                    base = parent.sha
                elif parent is None or parent.sha != base:
                    return _hub_error(
                        412,
                        None,
                        f"A commit has happened since {parent_commit}: {branch!r} is at {base}."
                        " Please refresh and try again.",
                    )
            present = set(repo.commits[base].files)
            additions: dict[str, bytes] = {}
            deletions: set[str] = set()
            for key, value in operations:
                path = value["path"]
                if key in ("file", "lfsFile"):
                    problem = _path_problem(path)
                    if problem:
                        return _hub_error(400, None, problem)
                    if key == "file":
                        data = value["data"]
                    else:
                        data = self._stored_by_sha256(str(value.get("oid", "")).lower())
                        if data is None:
                            return _hub_error(
                                400,
                                None,
                                f"lfsFile {path!r}: LFS object {value.get('oid')!r} was never"
                                " uploaded (through the LFS batch API, or stored before)",
                            )
                    additions[path] = data
                    deletions.discard(path)
                    present.add(path)
                    continue
                if key == "deletedFile":
                    gone = {path} & present
                else:  # deletedFolder
                    prefix = path.strip("/") + "/"
                    gone = {p for p in present if p.startswith(prefix)}
                if not gone:
                    return _hub_error(
                        404,
                        "EntryNotFound",
                        f"A file with this name doesn't exist: {path!r}"
                        if key == "deletedFile"
                        else f"A folder with this name doesn't exist: {path!r}",
                    )
                present -= gone
                deletions |= gone
                for p in gone:
                    additions.pop(p, None)
            target = branch
            if create_pr:
                repo.pull_requests += 1
                target = f"refs/pr/{repo.pull_requests}"
                repo.branches[target] = base
            sha = self._create_commit(
                repo_id, repo_type, additions, deletions, message, branch=target, author=token.user
            )
        web = self._web_url(repo_type, repo_id)
        answer: dict[str, Any] = {
            "success": True,
            "commitOid": sha,
            "commitUrl": f"{web}/commit/{sha}",
            "hookOutput": "",
        }
        if create_pr:
            answer["pullRequestUrl"] = f"{web}/discussions/{repo.pull_requests}"
        return _json_response(200, answer)


# --------------------------------------------------------------------------------------------
# Response builders
# --------------------------------------------------------------------------------------------


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _repo_oid(repo: HubRepo) -> str:
    return hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24]


_COMMIT_KEYS = ("file", "lfsFile", "deletedFile", "deletedFolder")
_LFS_BATCH_SUFFIX = "/info/lfs/objects/batch"


def _parse_commit_payload(body: bytes) -> tuple[dict[str, Any], list[tuple[str, dict]]] | _Response:
    """NDJSON ``{"key": ..., "value": ...}`` lines: one ``header``, then operations.

    ``file`` values get their decoded bytes under ``"data"``.
    """
    header: dict[str, Any] | None = None
    operations: list[tuple[str, dict]] = []
    for number, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        item = _json_or_none(line)
        key = item.get("key") if isinstance(item, dict) else None
        value = item.get("value") if isinstance(item, dict) else None
        if not isinstance(value, dict):
            return _hub_error(400, None, f"commit payload line {number}: not a key/value object")
        if key == "header":
            header = value
            continue
        if key not in _COMMIT_KEYS:
            return _hub_error(400, None, f"commit payload line {number}: unknown key {key!r}")
        if not isinstance(value.get("path"), str) or not value["path"]:
            return _hub_error(400, None, f"commit payload line {number}: missing path")
        if key == "file":
            encoding = str(value.get("encoding", "utf-8")).lower()
            content = value.get("content")
            if not isinstance(content, str) or encoding not in ("base64", "utf-8"):
                return _hub_error(400, None, f"commit payload line {number}: bad file content")
            try:
                data = (
                    base64.b64decode(content, validate=True)
                    if encoding == "base64"
                    else content.encode("utf-8")
                )
            except (binascii.Error, ValueError):
                return _hub_error(400, None, f"commit payload line {number}: bad base64")
            value = {**value, "data": data}
        operations.append((key, value))
    if header is None:
        return _hub_error(400, None, "commit payload: no header line")
    return header, operations


def _validate_yaml(body: bytes) -> _Response:
    """``POST /api/validate-yaml``: 400 if the README's YAML front matter does not parse."""
    payload = _json_or_none(body)
    content = payload.get("content") if isinstance(payload, dict) else None
    if not isinstance(content, str):
        return _hub_error(400, None, "Expected {'content': ..., 'repoType': ...}")
    errors: list[dict[str, str]] = []
    lines = content.replace("\r\n", "\n").split("\n")
    if lines and lines[0].strip() == "---":
        end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
        if end is None:
            errors.append({"message": "YAML front matter is not closed with '---'"})
        else:
            try:
                import yaml
            except ImportError:  # pragma: no cover - PyYAML comes with huggingface_hub
                yaml = None
            if yaml is not None:
                try:
                    meta = yaml.safe_load("\n".join(lines[1:end]))
                except yaml.YAMLError as exc:
                    errors.append({"message": f"Invalid YAML: {exc}"})
                else:
                    if meta is not None and not isinstance(meta, dict):
                        errors.append({"message": "YAML front matter must be a mapping"})
    if errors:
        return _json_response(400, {"errors": errors, "warnings": []})
    return _json_response(200, {"errors": [], "warnings": []})


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
        "_id": _repo_oid(repo),
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
