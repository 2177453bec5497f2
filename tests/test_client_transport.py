"""The invoke path's transport (aiohttp) against scripted servers on 127.0.0.1: framing,
keep-alive reuse, each failure typed as the invoker needs it, and a corpus of malformed answers
(each refused with a clear error, none mis-framing the next request on a reused connection)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import aiohttp.http_parser
import pytest
import trustme

from async_ca_exec import transport

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serve(script: Script, *, ssl_ctx: ssl.SSLContext | None = None) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server on 127.0.0.1 running ``script`` per connection; yields its URL and the bodies
    of the requests it received (``read_request`` notes them)."""
    received: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        r.received = received  # type: ignore[attr-defined]
        try:
            await script(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if ssl_ctx else 'http'}://127.0.0.1:{port}", received
    finally:
        server.close()
        await server.wait_closed()


async def read_request(r: asyncio.StreamReader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    body = await r.readexactly(length)
    r.received.append(body)  # type: ignore[attr-defined]
    return body


def answers(*responses: bytes, then_close: bool = False) -> Script:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for resp in responses:
            await read_request(r)
            w.write(resp)
            await w.drain()
        if not then_close:
            await r.read()  # until the client goes

    return script


def opened_counter() -> tuple[aiohttp.TraceConfig, list[int]]:
    opened: list[int] = []

    async def on_connect(*_: object) -> None:
        opened.append(1)

    traces = aiohttp.TraceConfig()
    traces.on_connection_create_end.append(on_connect)
    return traces, opened


def make(url: str, **options: object) -> transport.AiohttpTransport:
    options.setdefault("read_timeout", 5.0)
    return transport.AiohttpTransport(url, limit=10, path="/v1/invoke", **options)  # type: ignore[arg-type]


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_aiohttps_c_parsers_are_what_runs() -> None:
    """llhttp (aiohttp's C extension) parses every answer and request, not the pure-Python fallback."""
    from aiohttp import _http_parser

    assert aiohttp.http_parser.HttpResponseParser is _http_parser.HttpResponseParser
    assert aiohttp.http_parser.HttpRequestParser is _http_parser.HttpRequestParser


async def test_content_length_and_chunked_bodies_reuse_one_kept_alive_connection() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
    traces, opened = opened_counter()
    async with serve(answers(OK, chunked, OK)) as (url, received):
        tp = make(url, trace_configs=[traces])
        for want in (b"ok", b"abcde", b"ok"):
            reply = await tp.post({"X-Test": "1"}, b"hello")
            assert reply.status == 200 and await reply.read() == want
            reply.release()
        await tp.aclose()
    assert received == [b"hello"] * 3 and len(opened) == 1


async def test_frames_are_read_as_they_arrive() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await w.drain()
        await asyncio.sleep(0.3)
        w.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await r.read()

    async with serve(script) as (url, _):
        tp = make(url)
        reply = await tp.post({}, b"x")
        assert await reply.readexactly(5) == b"first"
        assert await reply.readexactly(6) == b"second"
        assert await reply.read_upto(10) == b""
        reply.release()
        await tp.aclose()


async def test_connection_close_and_http10_answers_are_not_reused() -> None:
    close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    http10 = b"HTTP/1.0 200 OK\r\n\r\nuntil-close"
    traces, opened = opened_counter()
    async with serve(answers(close, then_close=True)) as (url, _):
        tp = make(url, trace_configs=[traces])
        for _ in range(2):
            reply = await tp.post({}, b"x")
            assert await reply.read() == b"ok"
            reply.release()
        await tp.aclose()
    assert len(opened) == 2
    async with serve(answers(http10, then_close=True)) as (url, _):
        tp = make(url)
        reply = await tp.post({}, b"x")
        assert await reply.read() == b"until-close"
        reply.release()
        await tp.aclose()


async def test_a_cut_mid_body_is_a_disconnect() -> None:
    async with serve(answers(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly some", then_close=True)) as (url, _):
        tp = make(url)
        reply = await tp.post({}, b"x")
        with pytest.raises(transport.DisconnectedError):
            await reply.read()
        reply.close()
        await tp.aclose()
    chunked_cut = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort"
    async with serve(answers(chunked_cut, then_close=True)) as (url, _):
        tp = make(url)
        reply = await tp.post({}, b"x")
        with pytest.raises(transport.DisconnectedError):
            await reply.readexactly(16)
        reply.close()
        await tp.aclose()


async def test_a_silent_server_is_a_read_timeout() -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        await r.read()

    async with serve(silent) as (url, _):
        tp = make(url, read_timeout=0.3)
        with pytest.raises(transport.ReadTimeoutError):
            await tp.post({}, b"x")
        await tp.aclose()


async def test_a_slow_but_live_stream_is_not_timed_out() -> None:
    async def trickle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(6):  # 1.2 s in all, never 0.4 s without a byte
            await asyncio.sleep(0.2)
            w.write(b"1\r\n.\r\n")
            await w.drain()
        w.write(b"0\r\n\r\n")
        await r.read()

    async with serve(trickle) as (url, _):
        tp = make(url, read_timeout=0.4)
        reply = await tp.post({}, b"x")
        assert await reply.read() == b"......"
        reply.release()
        await tp.aclose()


async def test_interim_answers_are_skipped_and_the_request_is_sent_once() -> None:
    """A 100 Continue or 103 Early Hints before the answer is not the answer."""
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + OK
    async with serve(answers(interim)) as (url, received):
        tp = make(url)
        reply = await tp.post({}, b"once")
        assert reply.status == 200 and await reply.read() == b"ok"
        reply.release()
        await tp.aclose()
    assert received == [b"once"]


#: Answers aiohttp's parser (llhttp) refuses. Each must fail the request it answers, never
#: hand part of itself to the next request on the same connection.
MALFORMED = {
    "not HTTP": b"SMTP ready\r\n\r\n",
    "a header line without a colon": b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    "a Content-Length that is not a number": b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
    "a superscript digit as Content-Length": "HTTP/1.1 200 OK\r\nContent-Length: \u00b2\r\n\r\n".encode("latin-1"),
    "a 40-digit Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 40 + b"\r\n\r\n",
    "a duplicated Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 7\r\n\r\nokSMUGGL",
    "a non-numeric status": "HTTP/1.1 \u00b2\u00b2\u00b2 OK\r\n\r\n".encode("latin-1"),
    "an obs-folded header": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n folded: x\r\n\r\nok",
    "a chunk size that is not hex": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "a chunk size 0x2": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nok\r\n0\r\n\r\n",
    "a chunk size +2": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+2\r\nok\r\n0\r\n\r\n",
    "a chunk size 1_0": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
    "Transfer-Encoding: xchunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "a head without end": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000,
    "unbounded trailers": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n" + b"X-T: y\r\n" * 20_000,
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_answer_fails_its_request_and_the_next_one_gets_its_own_answer(raw: bytes) -> None:
    second = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"
    connections: list[int] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        connections.append(1)
        first = len(connections) == 1
        await answers(raw if first else second, second)(r, w)

    async with serve(script) as (url, received):
        tp = make(url, read_timeout=2.0)
        reply = None
        with pytest.raises(transport.TransportError):
            reply = await tp.post({}, b"first")
            await reply.read()
        if reply is not None:
            reply.close()
        # The next request on the same transport gets its own answer, never the first one's leftovers.
        reply = await tp.post({}, b"next")
        assert await reply.read() == b"second"
        reply.release()
        await tp.aclose()
    assert received[0] == b"first" and received[-1] == b"next"


async def test_transfer_encoding_where_chunked_is_not_last_is_read_until_close() -> None:
    """``chunked, gzip``: chunked is not the final coding, so (RFC 9112 6.3) the body runs to the
    connection's end; it is never read as chunks (a substring match would), and the invoker then
    finds no END frame in it."""
    chunks = b"2\r\nok\r\n0\r\n\r\n"
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n" + chunks
    async with serve(answers(raw, then_close=True)) as (url, _):
        tp = make(url)
        reply = await tp.post({}, b"x")
        assert await reply.read() == chunks
        reply.release()
        await tp.aclose()


async def test_nothing_listening_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        tp = make(f"http://127.0.0.1:{port}")
        with pytest.raises(transport.ConnectError, match=f"127.0.0.1:{port}"):
            await tp.post({}, b"x")
        await tp.aclose()


async def test_tls_is_verified_and_an_unknown_ca_is_a_tls_error() -> None:
    ca, other = trustme.CA(), trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    async with serve(answers(OK), ssl_ctx=server_ctx) as (url, _):
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        tp = make(url, ssl_context=trusting)
        reply = await tp.post({}, b"x")
        assert await reply.read() == b"ok"
        reply.release()
        await tp.aclose()
        stranger = ssl.create_default_context()
        other.configure_trust(stranger)
        tp = make(url, ssl_context=stranger)
        with pytest.raises(transport.TLSError, match="CERTIFICATE_VERIFY_FAILED"):
            await tp.post({}, b"x")
        await tp.aclose()
        tp = make(url)  # the system's CAs only: still verified, still refused
        with pytest.raises(transport.TLSError):
            await tp.post({}, b"x")
        await tp.aclose()


async def test_an_idle_connection_the_server_closed_is_replaced() -> None:
    traces, opened = opened_counter()
    async with serve(answers(OK, then_close=True)) as (url, received):
        tp = make(url, trace_configs=[traces])
        reply = await tp.post({}, b"x")
        assert await reply.read() == b"ok"
        reply.release()
        await asyncio.sleep(0.2)  # the server has closed its side
        reply = await tp.post({}, b"y")
        assert await reply.read() == b"ok"
        reply.release()
        await tp.aclose()
    assert len(opened) == 2 and received == [b"x", b"y"]


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="not an http"):
        transport.AiohttpTransport("ftp://example", limit=1)
