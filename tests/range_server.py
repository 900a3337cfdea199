"""A static file server on 127.0.0.1 that honours HTTP Range requests and logs every request.

Python's ``http.server`` ignores ``Range``; remote zarr reads need it. Used by the remote-reading tests
and by ``benchmarks/storage.py`` to count requests and bytes served. ``RangeServer(root, honour_range=False)``
answers like ``python -m http.server``: the whole file with status 200 whatever the ``Range`` header asks.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import os
import re
import threading
from pathlib import Path


@dataclasses.dataclass
class Request:
    method: str
    path: str
    status: int
    bytes: int


class _Handler(http.server.SimpleHTTPRequestHandler):
    log: list[Request]

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._serve(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.server.log.append(Request(self.command, self.path, 404, 0))  # type: ignore[attr-defined]
            self.send_error(404)
            return
        data = Path(path).read_bytes()
        status, part, extra = 200, data, {}
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "") or "")
        if match and self.server.honour_range:  # type: ignore[attr-defined]
            first, last = match.groups()
            if first:
                start, stop = int(first), (int(last) + 1 if last else len(data))
            else:
                start, stop = max(len(data) - int(last), 0), len(data)
            part, status = data[start:stop], 206
            extra["Content-Range"] = f"bytes {start}-{start + len(part) - 1}/{len(data)}"
        # Logged before the response is sent, so a client that has its answer always finds it in the log.
        self.server.log.append(Request(self.command, self.path, status, len(part) if body else 0))  # type: ignore
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(part)))
        if self.server.honour_range:  # type: ignore[attr-defined]
            self.send_header("Accept-Ranges", "bytes")
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(part)

    def log_message(self, format: str, *args: object) -> None:
        pass


class RangeServer:
    """``with RangeServer(root) as server: server.url`` serves ``root``; ``server.log`` lists the requests.

    ``honour_range=False`` ignores ``Range`` headers, as ``python -m http.server`` does.
    """

    def __init__(self, root: str | os.PathLike[str], *, honour_range: bool = True) -> None:
        handler = functools.partial(_Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.log = []  # type: ignore[attr-defined]
        self.httpd.honour_range = honour_range  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def log(self) -> list[Request]:
        return self.httpd.log  # type: ignore[attr-defined]

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
