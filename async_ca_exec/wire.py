"""A lean HTTP/1.1 client for the invoke hot path: pooled keep-alive connections on asyncio
protocols, one POST at a time per connection.

Why not aiohttp here: per call it builds a request, a response, a parser, a stream reader and
timers, which is about a third of the client's CPU at chunksize 1 and most of its memory per
call in flight (benchmarks/peers.py, benchmarks/inflight.py). This client speaks exactly what
the runtime and the Container Apps ingress answer: a status line, headers, then a body with a
Content-Length or chunked, on a connection kept alive unless the server says ``close``.
Everything else (Blob storage, ARM, probes) still goes through aiohttp and the Azure SDKs.

Errors are typed so the invoker can tell what was sent: :class:`ConnectError` (nothing was
sent: the runtime is not there), :class:`TLSError`, :class:`ServerDisconnectedError` and
:class:`ReadTimeoutError` (a request may have run), :class:`HttpProtocolError` (a malformed
answer).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import time
from urllib.parse import urlsplit

#: A status line and headers longer than this are refused (the runtime sends a few hundred bytes).
MAX_HEAD = 64 * 1024
#: After a response, the unread rest of a body is drained for reuse up to this size, else the
#: connection is closed.
MAX_DRAIN = 64 * 1024
#: How often the pool looks for reads that have waited longer than their timeout (seconds).
SWEEP_EVERY = 1.0


def _digits(text: str | bytes, most: int) -> bool:
    """ASCII digits only, at most ``most`` of them (``isdigit`` alone accepts "²")."""
    return 0 < len(text) <= most and text.isascii() and text.isdigit()


class WireError(Exception):
    """A transport failure on the invoke path."""


class ConnectError(WireError):
    """The connection could not be made: nothing was sent."""


class TLSError(ConnectError):
    """The TLS handshake failed (certificate verification, most likely)."""


class ServerDisconnectedError(WireError):
    """The connection closed before the answer was complete."""


class ReadTimeoutError(WireError):
    """No byte arrived for the read timeout."""


class HttpProtocolError(WireError):
    """The answer is not well-formed HTTP/1.1."""


class Connection(asyncio.Protocol):
    """One keep-alive connection: bytes in a buffer, read by the coroutine that sent the request.

    Kept small (it lives as long as a call is in flight): no timer per wait; the pool's sweeper
    fails a read that has had no byte for ``timeout`` seconds."""

    __slots__ = (
        "_buf", "_closed", "_exc", "_loop", "_pos", "_waiter", "_wsize", "idle_since", "last_data", "timeout", "transport",
    )  # fmt: skip

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._pos = 0
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._exc: BaseException | None = None
        self.idle_since = 0.0
        self.last_data = 0.0
        self.timeout: float | None = None
        self._wsize = 0  # request bytes not yet sent, at the sweeper's last look

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self.last_data = self._loop.time()
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def eof_received(self) -> bool | None:
        self._lost(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)

    def _lost(self, exc: BaseException | None) -> None:
        self._closed = True
        if self._exc is None:
            self._exc = exc
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    # -- state -------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Open, nothing unread: fit for the next request."""
        t = self.transport
        return not self._closed and t is not None and not t.is_closing() and not self._unread and not t.get_write_buffer_size()

    @property
    def _unread(self) -> int:
        return len(self._buf) - self._pos

    def close(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.abort()  # no lingering: a cut request must reach the server now

    def expire_if_silent(self, now: float) -> None:
        """The sweeper's look: a wait with no byte for ``timeout`` seconds fails."""
        w = self._waiter
        if w is None or self.timeout is None:
            return
        # A request still being sent (a big body on a slow uplink) is alive while it moves:
        # the silence counts from the last byte in either direction.
        size = self.transport.get_write_buffer_size() if self.transport is not None else 0
        if size and size != self._wsize:
            self.last_data = now
        self._wsize = size
        if now - self.last_data >= self.timeout:
            self._waiter = None
            if not w.done():
                w.set_exception(ReadTimeoutError(f"no data from the server for {self.timeout:g} s"))

    # -- reading -------------------------------------------------------------------------

    def _more(self) -> asyncio.Future[None]:
        """A future done when more bytes (or the end of the connection) arrive."""
        if self._closed:
            why = f": {self._exc}" if self._exc else ""
            raise ServerDisconnectedError(f"the server closed the connection before the answer was complete{why}")
        w = self._waiter = self._loop.create_future()
        return w

    def _compact(self) -> None:
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0

    async def _line(self, sep: bytes = b"\r\n", limit: int = MAX_HEAD) -> bytes:
        """Bytes up to ``sep`` (consumed, not returned)."""
        start = self._pos
        while True:
            i = self._buf.find(sep, start)
            if i >= 0:
                line = bytes(self._buf[self._pos : i])
                self._pos = i + len(sep)
                self._compact()
                return line
            if len(self._buf) - self._pos > limit:
                raise HttpProtocolError(f"a response line or head of more than {limit} bytes")
            start = max(self._pos, len(self._buf) - len(sep) + 1)
            await self._more()

    async def _exactly(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n:
            await self._more()
        data = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        self._compact()
        return data

    # -- one exchange --------------------------------------------------------------------

    def send(self, head: bytes, body: bytes, timeout: float | None) -> None:
        """Write a request (``head`` ends with the blank line); ``timeout``: the longest silence
        allowed while reading its answer."""
        assert self.transport is not None
        self._buf.clear()
        self._pos = 0
        self.timeout = timeout
        self.last_data = self._loop.time()
        if len(body) < 16384:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.transport.write(body)

    async def read_head(self) -> Response:
        """The answer's status line and headers."""
        buf = self._buf
        while True:
            i = buf.find(b"\r\n\r\n")
            if i >= 0:
                break
            if len(buf) > MAX_HEAD:
                raise HttpProtocolError(f"a response head of more than {MAX_HEAD} bytes")
            await self._more()
        lines = bytes(buf[:i]).split(b"\r\n")
        self._pos = i + 4
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not _digits(status_line[1], 3):
            raise HttpProtocolError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for raw in lines[1:]:
            name, sep, value = raw.partition(b":")
            if not sep:
                raise HttpProtocolError(f"a malformed header line: {raw[:80]!r}")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        return Response(self, int(status_line[1]), headers, status_line[0] == b"HTTP/1.0")


class Response:
    """The answer to one request: its status, headers (names lower-cased) and body, read from
    the connection as asked for."""

    __slots__ = (
        "_chunk_left",
        "_conn",
        "_left",
        "chunked",
        "content_length",
        "eof",
        "headers",
        "keep_alive",
        "status",
    )

    def __init__(self, conn: Connection, status: int, headers: dict[str, str], http10: bool) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers
        te = headers.get("transfer-encoding", "").lower()
        self.chunked = "chunked" in te
        cl = headers.get("content-length")
        if cl is not None and not self.chunked:
            if not _digits(cl, 18):
                raise HttpProtocolError(f"a malformed Content-Length: {cl[:40]!r}")
            self.content_length: int | None = int(cl)
        else:
            self.content_length = None
        conn_header = headers.get("connection", "").lower()
        framed = self.chunked or self.content_length is not None
        self.keep_alive = framed and "close" not in conn_header and (not http10 or "keep-alive" in conn_header)
        self._left = self.content_length  # fixed-length bytes still to read (None: chunked or to close)
        self._chunk_left = 0
        self.eof = self.content_length == 0

    async def read(self) -> bytes:
        """The whole (rest of the) body."""
        if self.content_length is not None:
            data = await self._conn._exactly(self._left or 0)
            self._left = 0
            self.eof = True
            return data
        parts = []
        while not self.eof:
            parts.append(await self.read_some(1 << 20))
        return b"".join(parts)

    async def read_some(self, n: int) -> bytes:
        """Up to ``n`` bytes of the body (b"" at its end)."""
        conn = self._conn
        if self.eof:
            return b""
        if self.content_length is not None:
            assert self._left is not None
            want = min(n, self._left)
            if conn._unread == 0:
                await conn._more()
            take = min(want, conn._unread)
            data = await conn._exactly(take)
            self._left -= take
            self.eof = self._left == 0
            return data
        if not self.chunked:  # until the server closes
            if conn._unread == 0:
                try:
                    await conn._more()
                except ServerDisconnectedError:
                    self.eof = True
                    return b""
            return await conn._exactly(min(n, conn._unread))
        if self._chunk_left == 0:
            await self._next_chunk()
            if self.eof:
                return b""
        if conn._unread == 0:
            await conn._more()
        take = min(n, self._chunk_left, conn._unread)
        data = await conn._exactly(take)
        self._chunk_left -= take
        if self._chunk_left == 0:
            await self._chunk_end()
        return data

    async def read_upto(self, n: int) -> bytes:
        """Up to ``n`` bytes of the body, fewer only at its end (for error messages)."""
        parts = []
        got = 0
        while got < n and not self.eof:
            part = await self.read_some(n - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes of the body; ServerDisconnectedError if it ends first."""
        if self.content_length is not None and self._left is not None and self._left >= n:
            data = await self._conn._exactly(n)
            self._left -= n
            self.eof = self._left == 0
            return data
        if self.chunked and self._chunk_left >= n:
            data = await self._conn._exactly(n)
            self._chunk_left -= n
            if self._chunk_left == 0:
                await self._chunk_end()
            return data
        parts = []
        got = 0
        while got < n:
            part = await self.read_some(n - got)
            if not part:
                raise ServerDisconnectedError(f"the response ended {n - got} bytes early")
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    async def _next_chunk(self) -> None:
        line = await self._conn._line(limit=1024)
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HttpProtocolError(f"a malformed chunk size line: {line[:40]!r}") from None
        if size < 0:
            raise HttpProtocolError("a negative chunk size")
        if size == 0:
            while await self._conn._line(limit=8192):  # trailers, up to the blank line
                pass
            self.eof = True
        self._chunk_left = size

    async def _chunk_end(self) -> None:
        if await self._conn._line(limit=2):
            raise HttpProtocolError("a chunk does not end with CRLF")

    async def drain(self) -> bool:
        """Read what is left of a small body, so the connection can serve the next request;
        False when that is not possible (a big or endless body, or a broken one)."""
        left = MAX_DRAIN
        try:
            while not self.eof:
                part = await self.read_some(left)
                left -= len(part)
                if left <= 0 and not self.eof:
                    return False
        except WireError:
            return False
        return True


class Pool:
    """Keep-alive connections to one origin (``http://host:port`` or ``https://host``)."""

    def __init__(
        self, url: str, *, ssl_context: ssl.SSLContext | None = None, connect_timeout: float = 30.0, idle_timeout: float = 60.0
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        default_port = self.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = host if default_port else f"{host}:{self.port}"
        self.ssl: ssl.SSLContext | None = None
        if self.tls:
            self.ssl = ssl_context or ssl.create_default_context()
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._idle: collections.deque[Connection] = collections.deque()
        self._all: set[Connection] = set()
        self._busy: set[Connection] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.opened = 0
        self._closed = False

    async def acquire(self) -> Connection:
        """An idle live connection (the most recently used), or a new one."""
        if self._closed:
            raise RuntimeError("the connection pool is closed")
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        idle = self._idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.usable and now - conn.idle_since < self.idle_timeout:
                self._busy.add(conn)
                return conn
            self._discard(conn)
        conn = await self._connect()
        self._busy.add(conn)
        return conn

    async def _sweep(self) -> None:
        """Every SWEEP_EVERY seconds, fail the reads that have waited longer than their timeout."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = loop.time()
            for conn in list(self._busy):
                conn.expire_if_silent(now)

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        conn = Connection(loop)
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: conn, self.host, self.port, ssl=self.ssl, server_hostname=self.host if self.tls else None
                ),
                self.connect_timeout,
            )
        except ssl.SSLError as exc:
            raise TLSError(f"{type(exc).__name__}: {exc}") from None
        except asyncio.TimeoutError:
            raise ConnectError(f"could not connect to {self.authority} within {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {self.authority}: {exc.strerror or exc}") from None
        self.opened += 1
        self._all.add(conn)
        return conn

    def release(self, conn: Connection, *, reuse: bool) -> None:
        """Back to the pool if ``reuse`` and it is fit for it; closed otherwise."""
        self._busy.discard(conn)
        if reuse and not self._closed and conn.usable:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            self._discard(conn)

    def _discard(self, conn: Connection) -> None:
        conn.close()
        self._all.discard(conn)
        self._busy.discard(conn)

    @property
    def open_connections(self) -> int:
        return len(self._all)

    async def aclose(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        self._busy.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing
