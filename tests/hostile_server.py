"""A hostile HTTP server on loopback: endless, trickled, compressed and redirected answers on chosen paths,
files from a folder (with Range) everywhere else.

``with HostileServer(root, {"/manifest.json": endless(b'{"files": ["')}) as server: server.url``.
"""

from __future__ import annotations

import functools
import gzip
import http.server
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from range_server import RangeServer, _Handler

Route = Callable[[http.server.BaseHTTPRequestHandler, threading.Event], None]


def _send(handler: http.server.BaseHTTPRequestHandler, status: int, headers: dict[str, str]) -> None:
    handler.send_response(status)
    for key, value in headers.items():
        handler.send_header(key, value)
    handler.end_headers()


def endless(prefix: bytes = b"", filler: bytes = b" " * 65536) -> Route:
    """200 without a length: ``prefix``, then ``filler`` until the client goes away."""
    def route(handler, stop):
        _send(handler, 200, {"Content-Type": "application/octet-stream", "Connection": "close"})
        handler.close_connection = True
        handler.wfile.write(prefix)
        while not stop.is_set():
            handler.wfile.write(filler)
    return route


def trickle(data: bytes, delay: float) -> Route:
    """``data`` (its length announced) one byte per ``delay`` seconds."""
    def route(handler, stop):
        _send(handler, 200, {"Content-Length": str(len(data))})
        for index in range(len(data)):
            if stop.is_set():
                return
            handler.wfile.write(data[index:index + 1])
            handler.wfile.flush()
            time.sleep(delay)
    return route


def answer(data: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Route:
    def route(handler, stop):
        _send(handler, status, {"Content-Length": str(len(data)), **(headers or {})})
        handler.wfile.write(data)
    return route


def redirect(location: str) -> Route:
    return answer(b"", 302, {"Location": location})


def gzip_bomb(expanded: int, layers: int = 2) -> bytes:
    """``expanded`` zero bytes gzip-compressed ``layers`` times (served with ``Content-Encoding: gzip, gzip``)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    data = b"".join(compressor.compress(block) for _ in range(expanded >> 20)) + compressor.flush()
    for _ in range(layers - 1):
        data = gzip.compress(data, 9)
    return data


class _HostileHandler(_Handler):
    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        route = self.server.routes.get(self.path.split("?")[0])  # type: ignore[attr-defined]
        if route is None:
            super().do_GET()
            return
        try:
            route(self, self.server.stop)  # type: ignore[attr-defined]
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            pass


class HostileServer(RangeServer):
    """Serves ``root`` like :class:`RangeServer`, but ``routes[path]`` answers ``path`` its own way."""

    def __init__(self, root: str | Path, routes: dict[str, Route] | None = None) -> None:
        super().__init__(root)
        self.httpd.RequestHandlerClass = functools.partial(_HostileHandler, directory=str(root))
        self.httpd.routes = dict(routes or {})  # type: ignore[attr-defined]
        self.httpd.stop = threading.Event()  # type: ignore[attr-defined]

    @property
    def routes(self) -> dict[str, Route]:
        return self.httpd.routes  # type: ignore[attr-defined]

    def __exit__(self, *exc: object) -> None:
        self.httpd.stop.set()  # type: ignore[attr-defined]
        super().__exit__(*exc)
