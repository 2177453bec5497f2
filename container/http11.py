"""The replica's HTTP/1.1 layer: one asyncio protocol per connection, nothing on top.

Why not ``aiohttp.web``: measured on 2 cores (benchmarks/cloud_sim.py, and a bare server
answering a 600-byte POST from this SDK's client), aiohttp's server costs about 80 us of CPU
per small request (request, stream, response and header objects, a task and writer per
request); a protocol that parses the head with bytes methods costs about 30 us, syscalls
included. On the call path that is a third of a replica's CPU per call, and in the
benchmarks it shares the client's cores. The replica speaks to two clients only, the SDK
(through the Container Apps ingress) and the platform's probes, so it needs only:

- HTTP/1.1 requests (1.0 is answered, then the connection closed) with a ``Content-Length``
  body or none; a chunked request body gets 411 (the SDK always sends a length);
- keep-alive, ``Connection: close``, ``Expect: 100-continue``, HEAD;
- responses with a length, or streamed in chunks (heartbeats while a call runs).

It is strict: a head that is malformed, too large (over ``MAX_HEAD`` bytes or ``MAX_FIELDS``
fields), has a control character, a duplicated framing or ``X-Acx-*`` field, or an
unparseable length gets a 4xx naming the problem, and the connection is closed (the rest of
its bytes cannot be trusted to be framed as the client meant). Slow clients are cut by the
deadline the server's sweeper checks (``check``): headers must arrive within
``header_timeout`` of the connection opening or going busy after an idle spell, and an idle
keep-alive connection may stay ``idle_timeout``. A handler is a coroutine run as a task per
request, cancelled if the client goes away.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import re
import time
from collections.abc import Awaitable
from http import HTTPStatus
from typing import Any, Protocol

log = logging.getLogger("acx_server")

#: Largest request head (request line and fields), and most fields, accepted.
MAX_HEAD = 16 * 1024
MAX_FIELDS = 100
#: Bytes read ahead of what the current request needs (its body not asked for yet, or a
#: pipelined next request) before reading from the socket pauses.
READ_AHEAD = 256 * 1024
#: After an answer that closes the connection, how long the rest of what the client sends
#: (say the body of a request refused before it was read) is read and dropped, so that a
#: client still sending gets to read the answer instead of a reset (as aiohttp's lingering).
LINGER = 10.0

# Field names are tokens; values are visible characters, spaces and tabs (and obs-text).
_FIELDS = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n){0," + str(MAX_FIELDS).encode() + rb"}\Z")
_TARGET = re.compile(rb"/[\x21-\x7e]*\Z")
_METHOD = re.compile(rb"[A-Z]{1,20}\Z")
#: Fields a request may carry once only: framing, and everything the signature covers.
_SINGLE = frozenset({"content-length", "transfer-encoding", "host", "expect", "connection"})
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class HttpError(Exception):
    """A request that cannot be handled as sent: answered with ``status`` and closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Headers(dict[str, str]):
    """A request's fields by lower-case name, looked up in any case (as aiohttp's are)."""

    __slots__ = ()

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())


class Request:
    """One request: its head, parsed; its body once it has arrived (see :meth:`read`)."""

    __slots__ = (
        "_conn",
        "body",
        "content_length",
        "expect_continue",
        "headers",
        "keep_alive",
        "method",
        "path",
        "query",
        "version",
    )  # fmt: skip

    def __init__(self, method: str, path: str, query: str, version: str, headers: Headers, content_length: int | None,
                 keep_alive: bool, expect_continue: bool) -> None:  # fmt: skip
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        #: The whole body once it has arrived (b"" without one); None while it is on its way.
        self.body: bytes | None = b"" if not content_length else None
        self._conn: HttpConnection | None = None

    async def read(self) -> bytes:
        """The whole body, waiting for the rest of it if need be (the caller keeps a deadline)."""
        if self.body is not None:
            return self.body
        assert self._conn is not None
        return await self._conn.wait_body(self)


class Response:
    """A whole response, written at once (head and body in one write)."""

    __slots__ = ("body", "close", "content_type", "headers", "status")

    def __init__(self, status: int = 200, body: bytes = b"", content_type: str = "application/octet-stream",
                 headers: dict[str, str] | bytes | None = None, close: bool = False) -> None:  # fmt: skip
        self.status = status
        self.body = body
        self.content_type = content_type
        #: Extra fields: a dict, or bytes already formatted ("Name: value\r\n" each).
        self.headers = headers
        #: Close the connection after this response (a refused or unread request).
        self.close = close


def json_response(status: int, doc: Any, *, close: bool = False, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(doc).encode(), "application/json", headers, close)


class App(Protocol):
    """What a connection needs from the server it belongs to."""

    connections: dict[asyncio.BaseTransport, HttpConnection]
    slow_clients_cut: int

    @property
    def header_timeout(self) -> float: ...

    @property
    def idle_timeout(self) -> float: ...

    @property
    def access_log(self) -> bool: ...

    def dispatch(self, request: Request, conn: HttpConnection) -> Awaitable[Response | None]: ...

    def error(self, status: int, message: str) -> Response: ...


def parse_head(head: bytes) -> Request:
    """A request from its head (up to, not including, the blank line); HttpError if malformed."""
    line_end = head.find(b"\r\n")
    if line_end < 0:
        line, fields = head, b""
    else:
        line, fields = head[:line_end], head[line_end + 2 :] + b"\r\n"
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line: expected 'METHOD /path HTTP/1.1'")
    method, target, version = parts
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        if version.startswith(b"HTTP/"):
            raise HttpError(505, "only HTTP/1.1 is spoken here")
        raise HttpError(400, "malformed request line: expected 'METHOD /path HTTP/1.1'")
    if not _METHOD.match(method):
        raise HttpError(400, "malformed request method")
    if not _TARGET.match(target):
        raise HttpError(400, "the request target must be a path starting with '/', in visible ASCII")
    if not _FIELDS.match(fields):
        if fields.count(b"\r\n") > MAX_FIELDS:
            raise HttpError(431, f"more than {MAX_FIELDS} header fields")
        raise HttpError(400, "malformed header field (a field is 'Name: value' on one line, without control characters)")
    headers = Headers()
    for raw in fields.decode("latin-1").split("\r\n")[:-1]:
        name, _, value = raw.partition(":")
        name = name.lower()
        value = value.strip(" \t")
        if name in headers:
            if name in _SINGLE or name.startswith("x-acx-"):
                raise HttpError(400, f"header field {name!r} appears more than once")
            value = f"{headers[name]}, {value}"
        dict.__setitem__(headers, name, value)
    if "transfer-encoding" in headers:
        raise HttpError(411, "a chunked request body is not accepted: send the body with a Content-Length")
    length: int | None = None
    cl = dict.get(headers, "content-length")
    if cl is not None:
        if not (cl.isascii() and cl.isdigit()) or len(cl) > 18:
            raise HttpError(400, "malformed Content-Length")
        length = int(cl)
    connection = dict.get(headers, "connection", "").lower()
    if version == b"HTTP/1.1":
        keep_alive = "close" not in connection
    else:
        keep_alive = False  # HTTP/1.0: one request (no persistent-connection framing promises)
    expect = dict.get(headers, "expect")
    if expect is not None and expect.lower() != "100-continue":
        raise HttpError(417, f"Expect: {expect[:40]!r} is not supported")
    path, _, query = target.decode("ascii").partition("?")
    return Request(method.decode("ascii"), path, query, version.decode("ascii"), headers, length, keep_alive,
                   expect is not None)  # fmt: skip


class _Date:
    """The Date field's value, formatted once a second."""

    second = -1
    value = b""

    @classmethod
    def now(cls) -> bytes:
        t = int(time.time())
        if t != cls.second:
            cls.second, cls.value = t, email.utils.formatdate(t, usegmt=True).encode()
        return cls.value


def _head(status: int, content_type: str | None, headers: dict[str, str] | bytes | None, framing: bytes, close: bool) -> bytes:
    if headers is None:
        extra = b""
    elif isinstance(headers, bytes):
        extra = headers
    else:
        extra = b"".join(b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())
    return b"HTTP/1.1 %d %s\r\nDate: %s\r\n%s%s%s%s\r\n" % (
        status,
        _REASONS.get(status, b"Unknown"),
        _Date.now(),
        b"Content-Type: %s\r\n" % content_type.encode() if content_type else b"",
        extra,
        framing,
        b"Connection: close\r\n" if close else b"",
    )


class HttpConnection(asyncio.Protocol):
    """One client connection: requests one after another, each handled by a task."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        #: The request being handled, and its task (None between requests).
        self.request: Request | None = None
        self.task: asyncio.Task[None] | None = None
        self._body_waiter: asyncio.Future[bytes] | None = None
        self._body_asked = False
        self._reading_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._streaming = False
        #: Close once the current response is written (shutting down, or the client asked for it).
        self.close_after = False
        self._closing = False
        self.closed = False
        self.idle = False
        #: When the connection is cut unless a request is being handled (None: not watched).
        #: No timer per request: the server's sweeper looks at every connection a few times a second.
        self.deadline: float | None = None

    # -- the slow-client guard ----------------------------------------------------------

    def _arm(self, seconds: float, *, earlier_only: bool = False) -> None:
        deadline = time.monotonic() + seconds
        if earlier_only and self.deadline is not None and self.deadline <= deadline:
            return
        self.deadline = deadline

    def check(self, now: float) -> None:
        """The sweeper's look: past its deadline with no request being handled, the connection goes."""
        if self.deadline is not None and now >= self.deadline:
            self.deadline = None
            if self.request is None and self.transport is not None and not self.closed:
                if not self._closing:  # (a lingering connection's time is up: not a slow client)
                    self.app.slow_clients_cut += 1
                self.transport.abort()

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.app.connections[transport] = self
        self._arm(self.app.header_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.deadline = None
        if self.transport is not None:
            self.app.connections.pop(self.transport, None)
        if self.task is not None:  # the client went away: so does its request
            self.task.cancel()
        if self._body_waiter is not None and not self._body_waiter.done():
            self._body_waiter.cancel()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client closed the connection"))
            self._drain.exception()  # retrieved: nobody may be waiting

    def data_received(self, data: bytes) -> None:
        if self._closing:  # answered and closing (lingering): what follows is dropped
            return
        if self.idle:  # a new request begins: its head has header_timeout to arrive
            self.idle = False
            self._arm(self.app.header_timeout, earlier_only=True)
        buf = self.buf
        buf += data
        req = self.request
        if req is None:
            self._next()
        elif req.body is None:
            if len(buf) >= req.content_length:  # type: ignore[operator]
                self._take_body(req)
            elif not self._body_asked and len(buf) > READ_AHEAD:
                self._pause_reading()  # the handler decides first whether it wants the body
        elif len(buf) > READ_AHEAD:
            self._pause_reading()  # a pipelined request waits for this one's answer

    def eof_received(self) -> bool:
        # The client's end of the connection is closed: it is gone (an ingress that gave up on
        # a request closes it so), and so is its request in hand: the transport closes, and
        # connection_lost cancels the handler (a call's worker is stopped, a durable call goes
        # on and leaves its outcome in Blob storage).
        return False

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    # -- requests -----------------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def _next(self) -> None:
        """Start handling the next request in the buffer, if its head is all there."""
        buf = self.buf
        while buf.startswith(b"\r\n"):  # empty lines before a request line are ignored (RFC 9112 2.2)
            del buf[:2]
        end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            if len(buf) > MAX_HEAD:
                self._fail(HttpError(431, f"request head larger than {MAX_HEAD} bytes"))
            elif b"\n\n" in buf or b"\n\r\n" in buf:  # a head ended with bare LFs
                self._fail(HttpError(400, "malformed request head: lines must end with CRLF"))
            return
        head = bytes(buf[:end])
        del buf[: end + 4]
        try:
            req = parse_head(head)
        except HttpError as exc:
            self._fail(exc)
            return
        self.deadline = None  # being handled: the handler keeps its own deadlines
        req._conn = self
        self.request = req
        self._body_asked = False
        if req.body is None and len(buf) >= req.content_length:  # type: ignore[operator]
            self._take_body(req)
        self.task = asyncio.get_running_loop().create_task(self._handle(req))

    def _take_body(self, req: Request) -> None:
        n = req.content_length
        assert n is not None
        buf = self.buf
        if len(buf) == n:
            req.body, self.buf = bytes(buf), bytearray()
        else:
            req.body = bytes(buf[:n])
            del buf[:n]
        waiter, self._body_waiter = self._body_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(req.body)

    async def wait_body(self, req: Request) -> bytes:
        if self.closed:
            raise ConnectionResetError("the client closed the connection")
        self._body_asked = True
        if req.expect_continue and req.version == "HTTP/1.1" and self.transport is not None:
            req.expect_continue = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._resume_reading()
        self._body_waiter = asyncio.get_running_loop().create_future()
        return await self._body_waiter

    async def _handle(self, req: Request) -> None:
        try:
            resp = await self.app.dispatch(req, self)
        except asyncio.CancelledError:
            raise
        except ConnectionError:  # the client went away while we wrote
            self._close()
            return
        except Exception:
            log.exception("error handling %s %s", req.method, req.path)
            if self._streaming:  # too late for a status: cut, so the client sees it incomplete
                self._close(abort=True)
                return
            resp = self.app.error(500, "internal error in the replica's server (see its log)")
            resp.close = True
        if resp is not None:
            self.respond(resp)
        try:
            # An answer counts as given once the client has taken it in (down to the transport's
            # low-water mark): until then nothing else is read or answered on this connection,
            # and neither the idle deadline nor a shutdown may cut it.
            await self.drain()
        except ConnectionError:
            self._close()
            return
        self._finished(req)

    def respond(self, resp: Response) -> None:
        """Write a whole response to the request in hand (head and body at once)."""
        req = self.request
        assert req is not None and self.transport is not None
        close = resp.close or self.close_after or not req.keep_alive or req.body is None
        body = resp.body
        head = _head(resp.status, resp.content_type, resp.headers, b"Content-Length: %d\r\n" % len(body), close)
        if req.method == "HEAD":
            body = b""
        if not (self._closing or self.transport.is_closing()):
            if len(body) < 65536:
                self.transport.write(head + body)
            else:
                self.transport.writelines((head, body))
        if self.app.access_log:
            log.debug('"%s %s HTTP/%s" %d %d', req.method, req.path, req.version[5:], resp.status, len(body))
        if close:
            self.close_after = True

    def _finished(self, req: Request) -> None:
        self.request = None
        self.task = None
        self._streaming = False
        self._body_waiter = None
        if self.close_after or self.closed:
            self._close()
            return
        self.idle = True
        self._arm(self.app.idle_timeout)
        self._resume_reading()
        if self.buf:
            self._next()
            if self.request is None and self.buf:  # part of the next head is here: it has header_timeout
                self.idle = False
                self._arm(self.app.header_timeout, earlier_only=True)

    def _fail(self, exc: HttpError) -> None:
        """Answer a request that cannot be parsed, and close (its framing is lost)."""
        if self.transport is not None and not (self._closing or self.transport.is_closing()):
            resp = self.app.error(exc.status, str(exc))
            self.transport.write(_head(exc.status, resp.content_type, None, b"Content-Length: %d\r\n" % len(resp.body), True)
                                 + resp.body)  # fmt: skip
        if self.app.access_log:
            log.debug("malformed request: %d %s", exc.status, exc)
        self._close()

    def _close(self, *, abort: bool = False) -> None:
        """Close after what was written; unless aborting, first linger: our side is shut (the
        client sees the answer end), and what it still sends is dropped until it closes its
        side (then eof_received closes) or LINGER seconds pass (then the sweeper cuts)."""
        already = self._closing
        self._closing = True
        self.buf.clear()
        transport = self.transport
        if transport is None or self.closed:
            return
        if abort:
            transport.abort()
        elif not already:
            if transport.can_write_eof():
                transport.write_eof()
                self.request = None  # so the sweeper may cut it
                self.deadline = time.monotonic() + LINGER
                self._resume_reading()
            else:
                transport.close()

    def close_when_idle(self) -> None:
        """Shutting down: close now if no request is in hand, else after its response."""
        self.close_after = True
        if self.request is None:
            self._close()

    # -- streamed responses ---------------------------------------------------------------

    def start_stream(self, status: int, content_type: str, headers: dict[str, str] | bytes | None = None) -> None:
        """Begin a response whose body follows in :meth:`write` calls, ended by :meth:`end_stream`."""
        req = self.request
        assert req is not None
        self._check_open()
        chunked = req.version == "HTTP/1.1"
        if not chunked:  # HTTP/1.0: the end of the body is the end of the connection
            self.close_after = True
        close = self.close_after or not req.keep_alive
        self.transport.write(_head(status, content_type, headers, b"Transfer-Encoding: chunked\r\n" if chunked else b"", close))  # type: ignore[union-attr]
        self._streaming = True
        if close:
            self.close_after = True

    async def write(self, data: bytes) -> None:
        """A piece of a streamed body (waits while the client reads slower than we write)."""
        self._check_open()
        assert self.transport is not None and self.request is not None
        if not data:  # an empty chunk would end the body
            return
        if self.request.version == "HTTP/1.1":
            self.transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.transport.write(data)
        await self.drain()

    async def drain(self) -> None:
        """Wait while the transport holds more than its high-water mark of unsent bytes."""
        if self._writing_paused:
            if self.closed:
                raise ConnectionResetError("the client closed the connection")
            if self._drain is None:
                self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    async def flushed(self, poll: float = 0.01) -> None:
        """Wait until every byte written has been handed to the kernel (for an answer that
        must be known delivered); ConnectionResetError if the client goes first."""
        while True:
            self._check_open()
            assert self.transport is not None
            if not self.transport.get_write_buffer_size():
                return
            await asyncio.sleep(poll)

    def end_stream(self) -> None:
        self._check_open()
        assert self.transport is not None and self.request is not None
        if self.request.version == "HTTP/1.1":
            self.transport.write(b"0\r\n\r\n")
        if self.app.access_log:
            log.debug('"%s %s HTTP/%s" streamed', self.request.method, self.request.path, self.request.version[5:])

    def write_now(self, resp: Response) -> None:
        """Write a whole response at once and raise ConnectionResetError if the client is gone
        (for a caller that must know whether it was handed to the connection)."""
        self._check_open()
        self.respond(resp)

    def _check_open(self) -> None:
        if self.closed or self._closing or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
