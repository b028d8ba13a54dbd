"""Plain-URL downloads (mimcli.hub.urls) against a local HTTP server on 127.0.0.1: a dropped
connection or a killed process resumes with Range, a server ignoring Range restarts, sizes are
checked before the rename, offline and unreachable hosts are one line, one downloader per URL."""

from __future__ import annotations

import random
import socket
import threading

import pytest

from mimcli.errors import MimcliError, RemoteError
from mimcli.hub import urls
from mimcli.hub.urls import download_url, partial_path, url_cache_path
from tests.fileserver import FileServer

DATA = random.Random(0).randbytes(3 << 20)  # 3 MiB: several reads of urls.CHUNK_BYTES


@pytest.fixture
def server():
    with FileServer() as s:
        yield s


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMCLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(urls, "BACKOFF_SECONDS", 0.0)


def test_dropped_connection_resumes_where_it_stopped(server):
    url = server.add("/m.th", DATA, drop_after=1_500_000, drops=1)
    path = download_url(url, progress=False)
    assert path == url_cache_path(url) and path.read_bytes() == DATA
    first, second = server.gets("/m.th")
    assert (first.range, first.status, first.body_bytes) == (None, 200, 1_500_000)
    # the second request asks only for the rest, and only the rest is sent
    assert (second.range, second.status) == ("bytes=1500000-", 206)
    assert second.body_bytes == len(DATA) - 1_500_000
    assert not partial_path(path).exists()
    assert download_url(url, progress=False) == path and len(server.gets("/m.th")) == 2


def test_partial_file_of_a_killed_process_is_resumed(server):
    url = server.add("/m.th", DATA)
    partial = partial_path(url_cache_path(url))
    partial.parent.mkdir(parents=True)
    partial.write_bytes(DATA[:1_000_000])
    path = download_url(url, progress=False)
    assert path.read_bytes() == DATA and not partial.exists()
    [request] = server.gets("/m.th")
    assert (request.range, request.status) == ("bytes=1000000-", 206)
    assert request.body_bytes == len(DATA) - 1_000_000


def test_server_ignoring_range_restarts_from_the_first_byte(server):
    url = server.add("/m.th", DATA, ranges=False)
    partial = partial_path(url_cache_path(url))
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 1000)  # not the file's first bytes: must not survive
    assert download_url(url, progress=False).read_bytes() == DATA
    [request] = server.gets("/m.th")
    assert (request.range, request.status) == ("bytes=1000-", 200)


def test_complete_partial_is_renamed_and_oversized_one_starts_over(server):
    url = server.add("/m.th", DATA)
    partial = partial_path(url_cache_path(url))
    partial.parent.mkdir(parents=True)
    partial.write_bytes(DATA)  # a process killed between the last byte and the rename
    assert download_url(url, progress=False).read_bytes() == DATA
    assert [r.status for r in server.gets("/m.th")] == [416]

    url2 = server.add("/n.th", DATA)
    partial2 = partial_path(url_cache_path(url2))
    partial2.write_bytes(DATA + b"more")
    assert download_url(url2, progress=False).read_bytes() == DATA
    assert [(r.range, r.status) for r in server.gets("/n.th")] == [
        (f"bytes={len(DATA) + 4}-", 416),
        (None, 200),
    ]


def test_transfers_that_never_finish_give_up_and_keep_the_bytes(server):
    url = server.add("/m.th", DATA, ranges=False, drop_after=1000, drops=100)
    with pytest.raises(RemoteError, match="after 3 attempts.*1,000 bytes are kept") as err:
        download_url(url, progress=False)
    assert err.value.exit_code == 1 and "stopped at 1,000 of 3,145,728 bytes" in str(err.value)
    assert not url_cache_path(url).exists()  # never renamed while incomplete
    assert partial_path(url_cache_path(url)).stat().st_size == 1000
    # one attempt that brought bytes, then three in a row that brought none
    assert len(server.gets("/m.th")) == 4


def test_progress_reaches_a_callback_and_long_downloads_print_on_stderr(
    server, monkeypatch, capsys
):
    url = server.add("/m.th", DATA)
    seen: list[tuple[str, int, int]] = []
    download_url(url, progress=lambda name, done, total: seen.append((name, done, total)))
    assert seen[-1] == ("m.th", len(DATA), len(DATA))
    assert [d for _, d, _ in seen] == sorted(d for _, d, _ in seen) and len(seen) >= 3

    monkeypatch.setattr(urls, "BAR_MIN_BYTES", 1 << 20)  # stderr is not a terminal: lines
    download_url(server.add("/big.th", DATA))
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[-1] == "downloading big.th: 3 MiB of 3 MiB" and len(lines) <= 10
    download_url(server.add("/small.th", DATA[:1000]))
    assert capsys.readouterr().err == ""


def test_offline_mode_is_one_line_naming_the_url(server, monkeypatch):
    from huggingface_hub import constants

    url = server.add("/m.th", DATA)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MimcliError) as err:
        download_url(url, progress=False, label="mim-refiner:x")
    line = str(err.value)
    assert "\n" not in line and err.value.exit_code == 2
    assert line.startswith(f"mim-refiner:x: cannot download {url} (offline mode is on: HF_HUB")
    assert line.endswith("download that file and pass its path instead of mim-refiner:x")
    assert server.gets("/m.th") == []


def test_unreachable_host_is_one_line_and_mentions_kept_bytes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with-block ends
    url = f"http://127.0.0.1:{port}/m.th"
    partial = partial_path(url_cache_path(url))
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"abc")
    with pytest.raises(MimcliError) as err:
        download_url(url, progress=False)
    line = str(err.value)
    assert err.value.exit_code == 2
    assert f"cannot download {url} (127.0.0.1 cannot be reached: Connection refused)" in line
    assert "3 bytes of it are kept; online, the download resumes" in line
    assert line.endswith("download it elsewhere and pass its path instead")


def test_one_process_downloads_a_url_at_a_time(server):
    url = server.add("/m.th", DATA, delay=0.5)
    paths = []
    threads = [
        threading.Thread(target=lambda: paths.append(download_url(url, progress=False)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(paths) == 2 and paths[0] == paths[1] and paths[0].read_bytes() == DATA
    assert len(server.gets("/m.th")) == 1  # the second waited and found the finished file
