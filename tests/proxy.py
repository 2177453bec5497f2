"""A corporate forwarding proxy and a TLS "ingress", both on 127.0.0.1, for tests/test_proxy.py.

:class:`ForwardProxy` speaks the two ways a client uses an HTTP proxy: ``CONNECT host:port``
(a tunnel, for https) and absolute-URI requests (``POST http://host:port/path``, for http). It
records every request it sees and knows names DNS does not (``hosts``): a client can reach those
only through it. :class:`TLSFront` terminates TLS with a given certificate in front of a plain
HTTP server (the replica), as Container Apps' ingress does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from http import HTTPStatus
from urllib.parse import urlsplit

#: Request heads larger than this are refused (no client of these tests sends one).
MAX_HEAD = 64 * 1024
#: Hop-by-hop fields a forwarding proxy does not pass on (RFC 9110 section 7.6.1).
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"te", b"upgrade"}


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
        while data := await r.read(65536):
            w.write(data)
            await w.drain()


async def _splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter], b: tuple[asyncio.StreamReader, asyncio.StreamWriter]
) -> None:
    """Bytes both ways until either side ends; then both are closed."""
    tasks = {asyncio.ensure_future(_pipe(a[0], b[1])), asyncio.ensure_future(_pipe(b[0], a[1]))}
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (a[1], b[1]):
            w.close()


class _Servers:
    """Connection handlers tracked, so stop() ends them all (Python 3.11's wait_closed does not)."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def _listen(self, ssl_ctx: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ssl_ctx)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._handlers.add(me)
        self._writers.add(w)
        try:
            await self.serve(r, w)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:  # only stop() cancels a handler: it ends quietly
            pass
        finally:
            self._handlers.discard(me)
            self._writers.discard(w)
            w.close()

    async def serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for w in list(self._writers):
            w.close()
        if self._handlers:  # closed: their reads end; cancelled if one does not within 5 s
            _, late = await asyncio.wait(set(self._handlers), timeout=5)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None


class ForwardProxy(_Servers):
    """An HTTP proxy on 127.0.0.1: ``CONNECT`` tunnels and absolute-URI forwarding.

    ``hosts``: name -> address it resolves to (nothing else is reachable through it: 502).
    ``auth``: (user, password) a request must bring in ``Proxy-Authorization`` (Basic), else 407.
    ``refuse``: answer every request with this status instead (403: this proxy forbids it).
    ``seen``: (method, target) of every request, in order.
    """

    def __init__(self, hosts: dict[str, str], *, auth: tuple[str, str] | None = None, refuse: int | None = None) -> None:
        super().__init__()
        self.hosts = {k.lower(): v for k, v in hosts.items()}
        self.auth = None if auth is None else b"Basic " + base64.b64encode(":".join(auth).encode())
        self.refuse = refuse
        self.seen: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> ForwardProxy:
        await self._listen()
        return self

    async def serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        r._limit = MAX_HEAD  # type: ignore[attr-defined]
        head = await r.readuntil(b"\r\n\r\n")
        request_line, *fields = head[:-4].split(b"\r\n")
        method, target, _version = request_line.decode("latin-1").split(" ", 2)
        self.seen.append((method, target))
        if self.refuse is not None:
            await self._answer(w, self.refuse)
            return
        if self.auth is not None:
            given = [f.split(b":", 1)[1].strip() for f in fields if f.split(b":", 1)[0].strip().lower() == b"proxy-authorization"]
            if given != [self.auth]:
                await self._answer(w, 407)
                return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            upstream = await self._open(w, host, int(port))
            if upstream is None:
                return
            w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await w.drain()
            await _splice((r, w), upstream)
            return
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            await self._answer(w, 400)  # origin-form to a proxy, or https:// without CONNECT
            return
        upstream = await self._open(w, parts.hostname, parts.port or 80)
        if upstream is None:
            return
        # One request per connection: the replica is told to close after its answer, so the
        # client sees "Connection: close" and sends its next request (recorded) on a new one.
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        kept = [f for f in fields if f.split(b":", 1)[0].strip().lower() not in HOP_BY_HOP]
        out = b"\r\n".join([f"{method} {path} HTTP/1.1".encode(), *kept, b"Connection: close"]) + b"\r\n\r\n"
        upstream[1].write(out)
        await upstream[1].drain()
        await _splice((r, w), upstream)

    async def _open(
        self, w: asyncio.StreamWriter, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        address = self.hosts.get(host.lower())
        if address is None:
            await self._answer(w, 502, f"{host} is not known to this proxy")
            return None
        try:
            return await asyncio.open_connection(address, port)
        except OSError as exc:
            await self._answer(w, 502, f"{host}:{port}: {exc}")
            return None

    @staticmethod
    async def _answer(w: asyncio.StreamWriter, status: int, text: str = "") -> None:
        body = (text or HTTPStatus(status).phrase).encode()
        extra = b'Proxy-Authenticate: Basic realm="corp"\r\n' if status == 407 else b""
        w.write(
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()
            + extra
            + f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await w.drain()


class TLSFront(_Servers):
    """TLS on 127.0.0.1 (``ssl_ctx``'s certificate) in front of the plain HTTP server at
    127.0.0.1:``upstream_port``; ``connections``: TLS connections accepted."""

    def __init__(self, ssl_ctx: ssl.SSLContext, upstream_port: int) -> None:
        super().__init__()
        self.ssl_ctx = ssl_ctx
        self.upstream_port = upstream_port
        self.connections = 0

    async def start(self) -> TLSFront:
        await self._listen(self.ssl_ctx)
        return self

    async def serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await _splice((r, w), upstream)
