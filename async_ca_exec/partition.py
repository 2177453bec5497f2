"""Object partitioning, as Lithops does it: one call per byte range of a blob or URL.

``await ex.map(fn, "az://container/prefix/", obj_chunk_size=1 << 20)`` gives each call an
``obj`` (a :class:`CloudObject`) whose ``data_stream`` reads only its byte range, aligned on
newlines: a line belongs to the partition it starts in, so no line is cut or counted twice.
The worker reads the range itself over HTTP (a short-lived read-only SAS for blobs), so the
data never passes through the client.

This module is imported on workers (to unpickle a CloudObject) and uses only the standard
library there.
"""

from __future__ import annotations

import io
import math
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .storage import Storage

PREFIX = "acx"  # the package's own blobs (as in storage.PREFIX; not imported: workers load this)

_BLOCK = 1 << 20


@dataclass
class CloudObject:
    """One partition of an object, handed to a call as ``obj``.

    ``bucket``/``key`` name the object (for a URL: its host and path), ``part`` is this
    partition's number out of ``total_parts``, ``data_byte_range`` the inclusive (start, end)
    byte range it owns, ``chunk_size`` the partition size asked for.
    """

    bucket: str
    key: str
    part: int
    total_parts: int
    data_byte_range: tuple[int, int]
    chunk_size: int | None
    size: int
    newline: bytes = b"\n"
    url: str = field(default="", repr=False)  # holds a SAS for blobs: never shown

    @property
    def data_stream(self) -> io.BufferedReader:
        """The partition's bytes, line-aligned: read(), readline() or iterate over lines."""
        raw = _PartitionReader(self._chunks())
        return io.BufferedReader(raw, buffer_size=_BLOCK)

    def _get(self, start: int, end: int) -> bytes:
        """Bytes start..end (inclusive) of the object."""
        if end < start:
            return b""
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={start}-{end}"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            if resp.status != 206 and (start > 0 or end < self.size - 1):
                raise OSError(
                    f"{self.bucket}/{self.key}: the server ignores HTTP Range requests, so it cannot be read in "
                    "parts; map over it without obj_chunk_size/obj_chunk_number"
                )
            return bytes(resp.read())

    def _chunks(self) -> Iterator[bytes]:
        start, end = self.data_byte_range
        size, nl = self.size, self.newline
        k = len(nl)
        if size == 0 or end < start:
            return
        pos = start
        if start > 0 and self._get(max(0, start - k), start - 1) != nl:
            # The line at `start` began in the previous partition: it is that partition's.
            # (A newline may straddle `start`: look from k-1 bytes before it.)
            pos = self._after_newline(max(0, start - (k - 1)))
            if pos > end:
                return  # no line starts in this partition
        tail = b""
        while pos <= end:
            data = self._get(pos, min(end, pos + _BLOCK - 1))
            if not data:
                return
            yield data
            tail = (tail + data)[-k:]
            pos += len(data)
        if tail == nl or pos >= size:
            return
        # The partition's last line runs on into the next one: read it to its newline.
        stop = self._after_newline(max(0, pos - (k - 1)))
        for at in range(pos, stop, _BLOCK):
            yield self._get(at, min(stop, at + _BLOCK) - 1)

    def _after_newline(self, pos: int) -> int:
        """The position just after the first newline that starts at or after ``pos`` (or the size)."""
        size, nl = self.size, self.newline
        k = len(nl)
        carry = b""  # the last k-1 bytes read: a newline may be split between two blocks
        at = pos
        while at < size:
            block = self._get(at, min(size, at + _BLOCK) - 1)
            if not block:
                break
            data = carry + block
            i = data.find(nl)
            if i >= 0:
                return at - len(carry) + i + k
            carry = data[-(k - 1) :] if k > 1 else b""
            at += len(block)
        return size


class _PartitionReader(io.RawIOBase):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


# ------------------------------------------------------------------------------------
# client side


def is_object_source(items: Any) -> bool:
    """True for what partitioning takes: an az:// or http(s):// reference, or a list of them."""
    if isinstance(items, str):
        return items.startswith(("az://", "https://", "http://"))
    if isinstance(items, (list, tuple)) and items:
        return all(isinstance(x, str) and x.startswith(("az://", "https://", "http://")) for x in items)
    return False


def _ranges(size: int, chunk_size: int | None, chunk_number: int | None) -> tuple[list[tuple[int, int]], int | None]:
    if size == 0:
        return [(0, -1)], chunk_size
    if chunk_number:
        chunk_size = max(1, math.ceil(size / chunk_number))
    if not chunk_size:
        return [(0, size - 1)], None
    return [(s, min(size, s + chunk_size) - 1) for s in range(0, size, chunk_size)], chunk_size


async def partition(
    source: str | list[str] | tuple[str, ...],
    *,
    storage: Storage | None,
    chunk_size: int | None = None,
    chunk_number: int | None = None,
    newline: str = "\n",
    why_no_storage: str | None = None,
) -> list[CloudObject]:
    """Split objects into partitions: ``az://container/prefix`` (every blob under it), a blob
    (``az://container/name``) or an http(s) URL, or a list of those. ``why_no_storage``: why
    ``storage`` is None, for the error an az:// source then gets."""
    from .errors import ConfigError, StorageError

    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"obj_chunk_size={chunk_size} must be a positive number of bytes")
    if chunk_number is not None and chunk_number < 1:
        raise ValueError(f"obj_chunk_number={chunk_number} must be a positive number")
    sources = [source] if isinstance(source, str) else list(source)
    objects: list[tuple[str, str, int, str]] = []  # bucket, key, size, url
    for src in sources:
        if src.startswith("az://"):
            if storage is None:
                why = why_no_storage or "configure azure_storage"
                raise ConfigError(f"{src}: reading az:// objects needs Blob storage: {why}")
            container, _, prefix = src[len("az://") :].partition("/")
            st = storage if container == storage.container else storage.sibling(container)
            try:
                # The package's own data (acx/) is never an input, unless asked for by name.
                blobs = [b for b in await st.list(prefix) if prefix.startswith(PREFIX + "/")
                         or not b.name.startswith(PREFIX + "/")]  # fmt: skip
                exact = [b for b in blobs if b.name == prefix]
                blobs = exact or blobs
                if not blobs:
                    raise StorageError(f"{src}: no blob there")
                for b in sorted(blobs, key=lambda b: b.name):
                    objects.append((container, b.name, b.size, await st.read_url(b.name)))
            finally:
                if st is not storage:
                    await st.aclose()
        else:
            objects.append((*_url_parts(src), await _url_size(src), src))
    nl = newline.encode()
    out: list[CloudObject] = []
    for bucket, key, size, url in objects:
        ranges, cs = _ranges(size, chunk_size, chunk_number)
        for part, brange in enumerate(ranges):
            out.append(CloudObject(bucket, key, part, len(ranges), brange, cs, size, nl, url))
    return out


def _url_parts(url: str) -> tuple[str, str]:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    return u.netloc, u.path.lstrip("/")


async def _url_size(url: str) -> int:
    import aiohttp

    from .errors import StorageError

    async with aiohttp.ClientSession() as s, s.head(url, allow_redirects=True) as r:
        if r.status != 200 or r.content_length is None:
            raise StorageError(f"{url.partition('?')[0]}: HEAD answered HTTP {r.status} without a size")
        return int(r.content_length)
