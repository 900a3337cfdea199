"""Reading a store over HTTP(S): range reads that stay correct on a server that ignores ``Range``, and that a
hostile server cannot turn into unbounded memory, time or redirects.

Every answer is read as sent (``Accept-Encoding: identity``; an answer with a ``Content-Encoding`` is refused, so
a 2 MB gzip cannot unpack to gigabytes), within :data:`REQUEST_DEADLINE` seconds in all (a server trickling bytes
is cut off, not waited for), and only up to what the object may hold: :data:`MAX_METADATA_BYTES` for a
``zarr.json`` (nested at most :data:`MAX_JSON_DEPTH` deep), the asked-for range for a range read, and for a whole
chunk or shard what its array's metadata allows (the spec's limits at most). Redirects are followed only to
http(s) on the same host and port (``storage_options={"allow_other_hosts": True}`` lifts the host rule).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
import urllib.parse
import warnings
import weakref
from typing import Any

from ..errors import StoreFormatError
from .spec import MAX_AUGMENTATIONS, MAX_BLOCK_RECORD_BYTES, MAX_CHUNK_BYTES

MAX_METADATA_BYTES = 16 << 20
"""Largest ``zarr.json`` read (a store's consolidated metadata is tens of kilobytes)."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects in a ``zarr.json`` (a store's is about 10)."""
MAX_OBJECT_BYTES = MAX_BLOCK_RECORD_BYTES + 16 * MAX_AUGMENTATIONS + (1 << 20)
"""Most bytes of any other object (a ``records`` shard, its index and codec overhead) before its array's
metadata is known."""
REQUEST_DEADLINE = 300.0
"""Seconds one request may take in all, besides aiohttp's timeouts per read."""
MAX_REDIRECTS = 5
_READ_SIZE = 1 << 20


class RemoteReadError(StoreFormatError):
    """A remote store's server answered beyond the limits: too much, too slowly, compressed, or redirected
    elsewhere."""


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in the JSON text ``raw`` (brackets inside strings skipped),
    counted without parsing, so a hostile document cannot make a parser recurse."""
    depth = deepest = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub(b'""', raw)):
        depth += 1 if match.group() in (b"[", b"{") else -1
        deepest = max(deepest, depth)
    return deepest


def check_redirect(source: str, target: str, allow_other_hosts: bool) -> str | None:
    """Why the redirect from ``source`` to ``target`` is refused (``None``: it may be followed): only http(s),
    never from https to http, and, unless ``allow_other_hosts``, the same host and port."""
    before, after = urllib.parse.urlsplit(source), urllib.parse.urlsplit(target)
    if after.scheme not in ("http", "https") or (before.scheme == "https" and after.scheme == "http"):
        return f"{source} redirects to {target[:200]}: refused (only redirects to http(s), never from https to http, " \
               "are followed)"
    if not allow_other_hosts and (before.hostname, before.port) != (after.hostname, after.port):
        return f"{source} redirects to another host ({after.netloc[:100]}): refused"
    return None


def _object_limits(metadata: dict[str, Any]) -> dict[str, int]:
    """Most bytes of one stored object of each array (``name/`` -> bytes) from consolidated metadata: a chunk
    (or shard) of its declared shape and data type, within the spec's limits, plus codec and index overhead."""
    limits = {}
    consolidated = metadata.get("consolidated_metadata")
    nodes = consolidated.get("metadata") if isinstance(consolidated, dict) else None
    for name, node in (nodes or {}).items() if isinstance(nodes, dict) else ():
        try:
            shape = node["chunk_grid"]["configuration"]["chunk_shape"]
            itemsize = int(re.sub(r"\D", "", str(node["data_type"])) or 8) // 8 or 1
            declared = math.prod(int(side) for side in shape) * itemsize
            inner = node["codecs"][0].get("configuration", {}).get("chunk_shape")
            chunks = math.prod(-(-int(a) // int(b)) for a, b in zip(shape, inner)) if inner else 1
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError):
            continue
        limit = MAX_BLOCK_RECORD_BYTES if inner else MAX_CHUNK_BYTES
        limits[f"{name}/"] = min(declared, limit) + declared // 64 + 96 * chunks + 4096
    return limits


def http_store(url: str, *, read_only: bool, storage_options: dict[str, Any]) -> Any:
    """A zarr store over HTTP(S) whose range reads stay correct on a server that ignores ``Range``.

    Such a server (``python -m http.server`` is one) answers a range request with the whole file and status
    200; fsspec would hand that to zarr as the range, which then fails its checksums. Here the asked-for bytes
    are cut out of the whole file instead, with a warning that every read now downloads whole shard files.
    """
    from zarr.storage import FsspecStore

    fs = _range_checking_http_filesystem()(asynchronous=True, **storage_options)
    return FsspecStore(fs=fs, path=url.rstrip("/"), read_only=read_only)


@functools.cache
def _range_checking_http_filesystem() -> type:
    """fsspec's HTTP filesystem, checking that a range request got a range (status 206) back.

    One class per process, made on first use (fsspec's HTTP support is optional), so fsspec's instance cache
    shares one filesystem, and one connection pool, between the stores opened with the same options.
    """
    from fsspec.implementations.http import HTTPFileSystem

    class RangeCheckingHTTPFileSystem(HTTPFileSystem):
        def __init__(self, *args: Any, allow_other_hosts: bool = False, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.allow_other_hosts = allow_other_hosts
            self.object_limits: dict[str, int] = {}
            """Most bytes of an object below a URL prefix (``.../store/records/``), learnt from the consolidated
            metadata of each store read."""

        async def set_session(self):  # type: ignore[no-untyped-def]
            fresh = self._session is None
            session = await super().set_session()
            if fresh:  # fsspec closes only a synchronous instance's session; closed here at exit, quietly
                weakref.finalize(self, self.close_session, self.loop, session)
            return session

        async def _cat_file(self, url, start=None, end=None, **kwargs):  # type: ignore[no-untyped-def]
            if start is not None and start == end:
                return b""
            try:
                async with asyncio.timeout(REQUEST_DEADLINE):
                    return await self._read(url, start, end, kwargs)
            except TimeoutError:
                raise RemoteReadError(f"{url}: not received within {REQUEST_DEADLINE:.0f} s (the server sends too "
                                      "slowly): refused") from None

        def _limit(self, url: str) -> int:
            if url.endswith("zarr.json"):
                return MAX_METADATA_BYTES
            matches = [prefix for prefix in self.object_limits if url.startswith(prefix)]
            return self.object_limits[max(matches, key=len)] if matches else MAX_OBJECT_BYTES

        async def _get(self, url: str, headers: dict[str, str], options: dict[str, Any]) -> Any:
            """The response to GET ``url``, following redirects only where :func:`check_redirect` allows."""
            session = await self.set_session()
            options.pop("allow_redirects", None)
            for _ in range(MAX_REDIRECTS + 1):
                response = await session.get(self.encode_url(url), headers=headers, allow_redirects=False,
                                             **options)
                if response.status not in (301, 302, 303, 307, 308):
                    return response
                target = urllib.parse.urljoin(url, response.headers.get("Location", ""))
                response.release()
                refused = check_redirect(url, target, self.allow_other_hosts)
                if refused:
                    raise RemoteReadError(refused + ("" if "another host" not in refused else
                                                     ' (storage_options={"allow_other_hosts": true} follows it)'))
                url = target
            raise RemoteReadError(f"{url}: more than {MAX_REDIRECTS} redirects: refused")

        async def _read(self, url: str, start: int | None, end: int | None, kwargs: dict[str, Any]) -> bytes:
            options = {**self.kwargs, **kwargs}
            headers = {**options.pop("headers", {}), "Accept-Encoding": "identity"}
            ranged = not (start in (None, 0) and end is None)
            if ranged:
                headers["Range"] = await self._process_limits(url, start, end)
            limit = self._limit(url)
            response = await self._get(url, headers, options)
            async with response:
                self._raise_not_found_for_status(response, url)
                encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise RemoteReadError(f"{url}: the server sends it with Content-Encoding {encoding[:40]!r} "
                                          "although identity was asked for: refused (a compressed answer can unpack "
                                          "to far more than the object holds)")
                if not ranged:
                    data = await self._bounded(response, url, limit)
                elif response.status == 206:
                    asked = (end - start) if start is not None and start >= 0 and end is not None else None
                    asked = -start if start is not None and start < 0 else asked
                    data = await self._bounded(response, url, min(limit, asked) if asked is not None else limit)
                else:
                    self._warn_range(url)
                    data = await self._slice(response, url, start, end, limit)
            if url.endswith("zarr.json") and not ranged:
                self._learn_limits(url, data)
            return data

        @staticmethod
        async def _bounded(response: Any, url: str, limit: int) -> bytes:
            if response.content_length is not None and response.content_length > limit:
                raise RemoteReadError(f"{url}: the server announces {response.content_length:,} bytes, more than "
                                      f"the {limit:,} the object may hold: refused")
            data = bytearray()
            async for chunk in response.content.iter_chunked(_READ_SIZE):
                data += chunk
                if len(data) > limit:
                    raise RemoteReadError(f"{url}: the server sends more than the {limit:,} bytes the object may "
                                          "hold: refused")
            return bytes(data)

        @staticmethod
        async def _slice(response: Any, url: str, start: int | None, end: int | None, limit: int) -> bytes:
            """Bytes ``[start:end]`` of a whole object sent instead of a range, read no further than needed and
            keeping no more than the range (a suffix keeps a rolling tail)."""
            start = start or 0
            kept, seen = bytearray(), 0
            async for chunk in response.content.iter_chunked(_READ_SIZE):
                if start >= 0:
                    kept += chunk[max(start - seen, 0):]
                    seen += len(chunk)
                    if end is not None and end >= 0 and seen >= end:
                        return bytes(kept[:end - max(start, 0)])
                else:
                    seen += len(chunk)
                    kept = (kept + chunk)[start:]
                if seen > limit:
                    raise RemoteReadError(f"{url}: the server ignores Range and sends more than the {limit:,} bytes "
                                          "the object may hold: refused")
            return bytes(kept if start < 0 else kept[:None if end is None else end - start])

        def _warn_range(self, url: str) -> None:
            if not getattr(self, "_warned_about_range", False):
                self._warned_about_range = True
                warnings.warn(
                    f"the web server of {url} ignores HTTP Range requests (it answered one with the whole file, "
                    "status 200, as `python -m http.server` does): reading on by downloading whole shard "
                    "files, up to num_augmentations times the bytes an epoch needs. Serve the store with a server "
                    "that supports Range requests (nginx, Apache, caddy, object storage) or copy it to a local "
                    "disk", RuntimeWarning, stacklevel=2)

        def _learn_limits(self, url: str, data: bytes) -> None:
            if json_depth(data) > MAX_JSON_DEPTH:
                raise RemoteReadError(f"{url} nests arrays or objects more than {MAX_JSON_DEPTH} deep: refused")
            try:
                metadata = json.loads(data)
            except (ValueError, RecursionError):
                return  # zarr reports invalid metadata itself
            if isinstance(metadata, dict):
                root = url[:-len("zarr.json")]
                for prefix, limit in _object_limits(metadata).items():
                    self.object_limits[root + prefix] = limit

    return RangeCheckingHTTPFileSystem
