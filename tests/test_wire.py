"""The lean HTTP/1.1 client of the invoke path, against scripted servers on 127.0.0.1: framing
(Content-Length, chunked with extensions and trailers, until close), keep-alive reuse, and
each failure typed as the invoker needs it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trustme

from async_ca_exec import wire

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEAD = b"POST /v1/invoke HTTP/1.1\r\nHost: x\r\n"


@contextlib.asynccontextmanager
async def serve(script: Script, *, ssl_ctx: ssl.SSLContext | None = None) -> AsyncIterator[tuple[str, list[int]]]:
    """A server on 127.0.0.1 running ``script`` per connection; yields its URL and a list that
    counts connections."""
    conns: list[int] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(1)
        try:
            await script(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if ssl_ctx else 'http'}://127.0.0.1:{port}", conns
    finally:
        server.close()
        await server.wait_closed()


async def read_request(r: asyncio.StreamReader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return await r.readexactly(length)


def answers(*responses: bytes, then_close: bool = False) -> Script:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for resp in responses:
            await read_request(r)
            w.write(resp)
            await w.drain()
        if not then_close:
            await r.read()  # until the client goes

    return script


async def post(pool: wire.Pool, body: bytes = b"hello", timeout: float | None = 5.0) -> tuple[wire.Connection, wire.Response]:
    conn = await pool.acquire()
    conn.send(HEAD + b"Content-Length: %d\r\n\r\n" % len(body), body, timeout)
    return conn, await conn.read_head()


async def test_content_length_bodies_reuse_one_kept_alive_connection() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Acx-Replica: r1\r\n\r\nworld"
    async with serve(answers(ok, ok, ok)) as (url, conns):
        pool = wire.Pool(url)
        for _ in range(3):
            conn, resp = await post(pool)
            assert resp.status == 200 and resp.headers["x-acx-replica"] == "r1" and resp.keep_alive
            assert await resp.read() == b"world" and await resp.drain()
            pool.release(conn, reuse=True)
        assert len(conns) == 1 and pool.opened == 1
        await pool.aclose()


async def test_chunked_bodies_with_extensions_and_trailers_are_decoded_and_the_connection_reused() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n"
    async with serve(answers(chunked, chunked)) as (url, conns):
        pool = wire.Pool(url)
        conn, resp = await post(pool)
        assert resp.chunked and resp.content_length is None
        assert await resp.readexactly(2) == b"ab" and await resp.readexactly(6) == b"c01234"
        assert await resp.read() == b"56789" and resp.eof
        pool.release(conn, reuse=await resp.drain())
        conn, resp = await post(pool)
        assert await resp.read() == b"abc0123456789"
        pool.release(conn, reuse=True)
        assert len(conns) == 1
        await pool.aclose()


async def test_connection_close_http10_and_unframed_bodies_are_not_reused() -> None:
    close = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    http10 = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    unframed = b"HTTP/1.1 200 OK\r\n\r\nto the end"
    for raw in (close, http10, unframed):
        async with serve(answers(raw, then_close=True)) as (url, _):
            pool = wire.Pool(url)
            conn, resp = await post(pool)
            assert not resp.keep_alive
            assert await resp.read() in (b"ok", b"to the end")
            pool.release(conn, reuse=resp.keep_alive)
            assert pool.open_connections == 0
            await pool.aclose()


async def test_a_cut_mid_body_is_server_disconnected() -> None:
    async def cut(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await w.drain()

    async with serve(cut) as (url, _):
        pool = wire.Pool(url)
        conn, resp = await post(pool)
        with pytest.raises(wire.ServerDisconnectedError, match="closed the connection before the answer was complete"):
            await resp.read()
        pool.release(conn, reuse=False)
        await pool.aclose()


async def test_a_silent_server_is_a_read_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "SWEEP_EVERY", 0.05)

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        await r.read()

    async with serve(silent) as (url, _):
        pool = wire.Pool(url)
        with pytest.raises(wire.ReadTimeoutError, match=r"no data from the server for 0.3 s"):
            await post(pool, timeout=0.3)
        await pool.aclose()


async def test_a_slow_but_live_stream_is_not_timed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "SWEEP_EVERY", 0.05)

    async def trickle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(8):  # a byte every 0.1 s: never 0.3 s of silence, 0.8 s in all
            await asyncio.sleep(0.1)
            w.write(b"1\r\nx\r\n")
            await w.drain()
        w.write(b"0\r\n\r\n")
        await w.drain()
        await r.read()

    async with serve(trickle) as (url, _):
        pool = wire.Pool(url)
        conn, resp = await post(pool, timeout=0.3)
        assert await resp.read() == b"x" * 8
        pool.release(conn, reuse=True)
        await pool.aclose()


async def test_a_slow_upload_is_not_a_read_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The silence counts from the last byte either way: a 16 MB body read by the server at
    about 4 MB/s outlasts the 2 s timeout, but moves all along."""
    monkeypatch.setattr(wire, "SWEEP_EVERY", 0.05)
    body = b"x" * (16 << 20)

    async def slow_reader(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        left = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while left:
            left -= len(await r.readexactly(min(256 * 1024, left)))
            await asyncio.sleep(0.0625)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await r.read()

    async with serve(slow_reader) as (url, _):
        pool = wire.Pool(url)
        conn, resp = await post(pool, body, timeout=2.0)
        assert await resp.read() == b"ok"
        pool.release(conn, reuse=True)
        await pool.aclose()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"SMTP ready\r\n\r\n", "not an HTTP/1.1 status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "a malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "a malformed Content-Length"),
        ("HTTP/1.1 200 OK\r\nContent-Length: \u00b2\r\n\r\n".encode("latin-1"), "a malformed Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 40 + b"\r\n\r\n", "a malformed Content-Length"),
        ("HTTP/1.1 \u00b2\u00b2\u00b2 OK\r\n\r\n".encode("latin-1"), "not an HTTP/1.1 status line"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "a malformed chunk size line"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (wire.MAX_HEAD + 10), "a response head of more than"),
    ],
)
async def test_malformed_answers_are_protocol_errors(raw: bytes, message: str) -> None:
    async with serve(answers(raw)) as (url, _):
        pool = wire.Pool(url)
        with pytest.raises(wire.HttpProtocolError, match=message):
            _conn, resp = await post(pool)
            await resp.read()
        await pool.aclose()


async def test_nothing_listening_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        pool = wire.Pool(f"http://127.0.0.1:{port}")
        with pytest.raises(wire.ConnectError, match=f"cannot connect to 127.0.0.1:{port}"):
            await pool.acquire()
        await pool.aclose()


async def test_tls_is_verified_and_an_unknown_ca_is_a_tls_error() -> None:
    ca, other = trustme.CA(), trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with serve(answers(ok), ssl_ctx=server_ctx) as (url, _):
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        pool = wire.Pool(url, ssl_context=trusting)
        conn, resp = await post(pool)
        assert await resp.read() == b"ok"
        pool.release(conn, reuse=True)
        await pool.aclose()
        stranger = ssl.create_default_context()
        other.configure_trust(stranger)
        pool = wire.Pool(url, ssl_context=stranger)
        with pytest.raises(wire.TLSError, match="CERTIFICATE_VERIFY_FAILED"):
            await pool.acquire()
        await pool.aclose()


async def test_an_idle_connection_the_server_closed_is_replaced() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with serve(answers(ok, then_close=True)) as (url, conns):
        pool = wire.Pool(url)
        conn, resp = await post(pool)
        assert await resp.read() == b"ok"
        pool.release(conn, reuse=True)
        for _ in range(100):  # the server closes its side after one answer
            if not conn.usable:
                break
            await asyncio.sleep(0.01)
        fresh = await pool.acquire()
        assert fresh is not conn and pool.opened == 2 and len(conns) == 2
        pool.release(fresh, reuse=False)
        await pool.aclose()


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="not an http"):
        wire.Pool("ftp://example")
