"""Reading a store over HTTP(S): range reads that stay correct on a server that ignores ``Range``."""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any


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
        async def set_session(self):  # type: ignore[no-untyped-def]
            fresh = self._session is None
            session = await super().set_session()
            if fresh:  # fsspec closes only a synchronous instance's session; closed here at exit, quietly
                weakref.finalize(self, self.close_session, self.loop, session)
            return session

        async def _cat_file(self, url, start=None, end=None, **kwargs):  # type: ignore[no-untyped-def]
            if (start is None and end is None) or start == end:
                return await super()._cat_file(url, start=start, end=end, **kwargs)
            options = {**self.kwargs, **kwargs}
            headers = {**options.pop("headers", {}), "Range": await self._process_limits(url, start, end)}
            session = await self.set_session()
            async with session.get(self.encode_url(url), headers=headers, **options) as response:
                data = await response.read()
                self._raise_not_found_for_status(response, url)
            if response.status == 206:
                return data
            if not getattr(self, "_warned_about_range", False):
                self._warned_about_range = True
                warnings.warn(
                    f"the web server of {url} ignores HTTP Range requests (it answered one with the whole file, "
                    "status 200, as `python -m http.server` does): reading on by downloading whole shard "
                    "files, up to num_augmentations times the bytes an epoch needs. Serve the store with a server "
                    "that supports Range requests (nginx, Apache, caddy, object storage) or copy it to a local "
                    "disk", RuntimeWarning, stacklevel=2)
            return data[start:end]

    return RangeCheckingHTTPFileSystem
