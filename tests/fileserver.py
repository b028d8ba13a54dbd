"""A plain HTTP file server on 127.0.0.1 for download tests: Range requests (206/416) or not
(always 200), a connection dropped after some bytes, a slow body; every request is recorded.

``with FileServer() as server: url = server.add("/x.th", data)``.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Served:
    """One file and how it is served.

    Attributes:
        data: the bytes.
        ranges: honour ``Range: bytes=N-`` (206, 416 past the end); else always 200.
        drop_after: answer with the full Content-Length but close the connection after this many
            body bytes, for the next ``drops`` requests.
        delay: seconds to wait before answering (to overlap two clients).
    """

    data: bytes
    ranges: bool = True
    drop_after: int | None = None
    drops: int = 0
    delay: float = 0.0


@dataclass
class Request:
    path: str
    range: str | None
    status: int = 0
    body_bytes: int = 0


@dataclass
class FileServer:
    files: dict[str, Served] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add(self, path: str, data: bytes, **how: Any) -> str:
        """Serve ``data`` at ``path``; return its URL."""
        self.files[path] = Served(data, **how)
        return self.url + path

    def gets(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _make_handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            record = Request(self.path, self.headers.get("Range"))
            with server.lock:
                server.requests.append(record)
            served = server.files.get(self.path)
            if served is None:
                record.status = 404
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            time.sleep(served.delay)
            data, start = served.data, 0
            if served.ranges and record.range and record.range.startswith("bytes="):
                start = int(record.range[len("bytes=") :].split("-")[0])
                if start >= len(data):
                    record.status = 416
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                record.status = 206
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                record.status = 200
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes" if served.ranges else "none")
            self.end_headers()
            if served.drops > 0 and served.drop_after is not None:
                served.drops -= 1
                self.wfile.write(body[: served.drop_after])
                self.wfile.flush()
                record.body_bytes = min(len(body), served.drop_after)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)
            record.body_bytes = len(body)

    return Handler
