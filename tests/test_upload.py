"""Uploads (mimcli.hub.upload) without a Hub: repo ids by the Hub's rules, option clashes, and
which failures are retried (the loopback-Hub round trips are in test_push.py)."""

from __future__ import annotations

from types import SimpleNamespace

import httpx2
import pytest
from huggingface_hub.errors import HfHubHTTPError

from mimcli.errors import MimcliError, RemoteError
from mimcli.hub.upload import check_push_options, normalize_repo_id, with_retries


def test_repo_ids_follow_the_hub_rules():
    assert normalize_repo_id("hf-hub:alice/x") == "alice/x"
    assert normalize_repo_id(" alice/x ") == "alice/x"
    assert normalize_repo_id("tiny") == "tiny"
    for bad in ("alice/x..", "-x/y", "a/b/c", "alice/", "x" * 97, "alice/my model"):
        with pytest.raises(MimcliError, match="--repo"):
            normalize_repo_id(bad)


def test_create_pr_goes_only_with_main():
    with pytest.raises(MimcliError, match="--create-pr"):
        check_push_options("dev", True)
    check_push_options("main", True)
    check_push_options("dev", False)


class Refused(Exception):
    """A failed call that got an HTTP answer (``response.status_code``), like the client's."""

    def __init__(self, status: int, retry_after: str | None = None) -> None:
        super().__init__(f"HTTP {status}")
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        self.response = SimpleNamespace(status_code=status, headers=headers)


def flaky(*failures: BaseException):
    """A call that raises ``failures`` in turn, then returns "done"; and its call count."""
    calls = []

    def call() -> str:
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return "done"

    return call, calls


def test_connection_errors_are_retried_with_backoff(monkeypatch):
    slept = []
    monkeypatch.setattr("mimcli.hub.upload.time.sleep", slept.append)
    call, calls = flaky(ConnectionError("reset"), TimeoutError())
    messages = []
    assert with_retries("uploading", call, 3, 0.5, messages.append) == ("done", 3)
    assert slept == [0.5, 1.0] and len(calls) == 3
    assert messages == [
        "uploading: ConnectionError; retrying in 0.5s (1/3)",
        "uploading: TimeoutError; retrying in 1.0s (2/3)",
    ]


def test_retries_run_out_or_the_hub_refuses(monkeypatch):
    monkeypatch.setattr("mimcli.hub.upload.time.sleep", lambda s: None)
    call, calls = flaky(*[ConnectionError()] * 3)
    with pytest.raises(RemoteError, match=r"uploading failed after 3 attempts \(ConnectionError\)"):
        with_retries("uploading", call, 2, 0.0)
    assert len(calls) == 3
    for status in (401, 403):  # a bad token is the user's to fix: exit 2, no retry
        call, calls = flaky(Refused(status))
        with pytest.raises(MimcliError, match=f"refused the token \\(HTTP {status}\\)") as err:
            with_retries("creating a/b", call, 4, 0.0)
        assert not isinstance(err.value, RemoteError) and len(calls) == 1
    call, calls = flaky(ValueError("a bug"))  # anything else is not the Hub's: raised as is
    with pytest.raises(ValueError, match="a bug"):
        with_retries("x", call, 4, 0.0)
    assert len(calls) == 1


def hub_error(status: int, retry_after: str | None = None) -> HfHubHTTPError:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    request = httpx2.Request("POST", "http://hub.invalid/api/repos/create")
    return HfHubHTTPError(
        f"{status} from the Hub", response=httpx2.Response(status, headers=headers, request=request)
    )


def test_hub_answers_are_retried_by_status(monkeypatch):
    slept = []
    monkeypatch.setattr("mimcli.hub.upload.time.sleep", slept.append)
    call, calls = flaky(hub_error(429, "7"), hub_error(503), hub_error(500, "600"))
    messages = []
    assert with_retries("creating a/b", call, 4, 2.0, messages.append) == ("done", 4)
    # Retry-After wins over the backoff (2 * 2**attempt), and no wait exceeds a minute
    assert slept == [7.0, 4.0, 60.0]
    assert [m.split("; ")[0] for m in messages] == [
        "creating a/b: HTTP 429",
        "creating a/b: HTTP 503",
        "creating a/b: HTTP 500",
    ]
    call, calls = flaky(hub_error(404))  # not transient: one line, exit 1, no retry
    with pytest.raises(RemoteError, match="creating a/b: the Hub refused: 404 from the Hub"):
        with_retries("creating a/b", call, 4, 0.0)
    assert len(calls) == 1
