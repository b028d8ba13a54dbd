"""What one commit of a repo folder carries: the files whose content differs from a Hub revision
(compared by the Hub's own hashes, so an unchanged folder makes no commit), and how the client
sends them: through Xet storage where the Hub offers it, else through Git LFS."""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from huggingface_hub import CommitOperationAdd, HfApi

# the Hub answers at most this many paths per paths-info call (it refuses 1,000 and more)
PATHS_PER_CALL = 500
# answers to the Xet token request of a Hub that has no Xet storage for the repo
NO_XET_STATUS = {404, 405, 501}
_BLOCK = 1 << 20


def folder_files(folder: Path) -> list[str]:
    """The files under ``folder`` as repo paths (``/``-separated, sorted), leaving out what
    ``huggingface_hub`` never uploads: ``.git/`` and its ``.cache/huggingface/`` metadata."""
    paths = []
    for path in folder.rglob("*"):
        parts = path.relative_to(folder).parts
        if ".git" in parts or parts[:2] == (".cache", "huggingface") or not path.is_file():
            continue
        paths.append("/".join(parts))
    return sorted(paths)


def _digest(path: Path, digest: Any) -> str:
    with path.open("rb") as file:
        while block := file.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The id git gives the file's content (what the Hub lists for a regular file)."""
    return _digest(path, hashlib.sha1(b"blob %d\0" % path.stat().st_size))


def file_sha256(path: Path) -> str:
    """The sha256 of the file (what the Hub lists for a file stored in LFS or Xet)."""
    return _digest(path, hashlib.sha256())


def _same_content(path: Path, remote: Any) -> bool:
    """Whether the local file has the content of the Hub's ``RepoFile`` (None: no such file)."""
    if remote is None:
        return False
    size = path.stat().st_size
    if remote.lfs is not None:
        return remote.lfs.size == size and remote.lfs.sha256 == file_sha256(path)
    return remote.size == size and remote.blob_id == git_blob_sha1(path)


def changed_files(api: HfApi, repo_id: str, revision: str, folder: Path) -> list[str]:
    """The files of ``folder`` that ``revision`` of ``repo_id`` lacks or holds with other
    content; files only in the repo are left alone."""
    from huggingface_hub import RepoFile

    paths = folder_files(folder)
    remote: dict[str, Any] = {}
    for start in range(0, len(paths), PATHS_PER_CALL):
        found = api.get_paths_info(
            repo_id, paths[start : start + PATHS_PER_CALL], revision=revision
        )
        remote.update((entry.path, entry) for entry in found if isinstance(entry, RepoFile))
    return [path for path in paths if not _same_content(folder / path, remote.get(path))]


def client_uses_xet() -> bool:
    """Whether ``huggingface_hub`` sends large files through Xet: ``hf_xet`` is installed and
    ``HF_HUB_DISABLE_XET`` was not set when ``huggingface_hub`` was imported."""
    from huggingface_hub import constants

    return not constants.HF_HUB_DISABLE_XET and importlib.util.find_spec("hf_xet") is not None


def hub_offers_xet(api: HfApi, repo_id: str, revision: str | None, create_pr: bool) -> bool:
    """Whether the Hub hands out a Xet write token for the commit, asked the way the client asks
    before a Xet upload (the token in the answer is neither read nor kept). A Hub without Xet
    storage for the repo answers 404/405/501; other failures raise ``HfHubHTTPError``."""
    from huggingface_hub import constants, get_session
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    # a pull request's commit has no branch yet: the client asks for revision "None"
    target = "None" if create_pr else quote(revision or constants.DEFAULT_REVISION, safe="")
    response = get_session().get(
        f"{api.endpoint}/api/models/{repo_id}/xet-write-token/{target}",
        headers=build_hf_headers(token=api.token),
        params={"create_pr": "1"} if create_pr else None,
    )
    if response.status_code in NO_XET_STATUS:
        return False
    hf_raise_for_status(response)
    return True


@contextmanager
def additions(folder: Path, paths: list[str], lfs: bool) -> Iterator[list[CommitOperationAdd]]:
    """One ``CommitOperationAdd`` per path. With ``lfs``, each reads from an open file: the
    client sends file objects through Git LFS, never Xet. The files are closed on exit."""
    from huggingface_hub import CommitOperationAdd

    with ExitStack() as stack:
        yield [
            CommitOperationAdd(
                path_in_repo=path,
                path_or_fileobj=stack.enter_context((folder / path).open("rb"))
                if lfs
                else str(folder / path),
            )
            for path in paths
        ]


def pull_requests(api: HfApi, repo_id: str) -> dict[str, str]:
    """The repo's pull request refs (``refs/pr/N``) and the commit each points at."""
    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    return {ref.ref: ref.target_commit for ref in refs.pull_requests or []}


def opened_pull_request(
    api: HfApi, repo_id: str, known: dict[str, str], folder: Path
) -> tuple[int, str] | None:
    """A pull request not in ``known`` whose head holds every file of ``folder``, as (number,
    head commit): what a commit sent with ``create_pr`` opened when its answer was lost."""
    new = {ref: sha for ref, sha in pull_requests(api, repo_id).items() if ref not in known}
    for ref, sha in sorted(new.items(), key=lambda item: int(item[0].rsplit("/", 1)[-1])):
        if not changed_files(api, repo_id, sha, folder):
            return int(ref.rsplit("/", 1)[-1]), sha
    return None
