"""The replica's HTTP layer (aiohttp's server, container/web.py), on a real server process, byte by byte.

The SDK's client exercises it everywhere else; here are the parts of HTTP/1.1 it never sends:
pipelining, bodies in pieces, HTTP/1.0, Expect: 100-continue, HEAD, and a corpus of hostile
requests (each refused with a 4xx on a closed connection, none framing a later request wrongly,
none running a call, while the server goes on serving).
"""

from __future__ import annotations

import json
import pickle
import signal
import socket
import time
from pathlib import Path

import pytest

from acx_server import web
from async_ca_exec import protocol, serialize

from conftest import ServerProcess, start_server, stop_server


@pytest.fixture(scope="module")
def srv(quick_server: ServerProcess) -> ServerProcess:
    return quick_server


def call(srv: ServerProcess, call_id: str, fn: object = len, *args: object) -> bytes:
    """A signed POST /v1/invoke request, as bytes on the wire."""
    fn_bytes, fn_hash = serialize.dumps_function(fn)
    items = serialize.dumps_items([(args or ("abc",), {})], call_id)
    body = protocol.encode_invocation(call_id=call_id, n=1, fn=fn_bytes, fn_hash=fn_hash, items=items, timeout=30)
    headers = protocol.signed_headers(srv.key, "POST", protocol.INVOKE_PATH, call_id, body)
    fields = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST {protocol.INVOKE_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{fields}\r\n".encode() + body


def read_response(sock: socket.socket, buf: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One response from ``sock`` (bytes beyond it stay in ``buf``): status, fields, body."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"connection closed before a whole head: {bytes(buf)!r}"
        buf += data
    end = buf.index(b"\r\n\r\n")
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[: end + 4]
    status = int(lines[0].split(" ")[1])
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" in fields:
        n = int(fields["content-length"])
        while len(buf) < n:
            data = sock.recv(65536)
            assert data, "connection closed mid-body"
            buf += data
        body = bytes(buf[:n])
        del buf[:n]
    elif fields.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            while b"\r\n" not in buf:
                buf += sock.recv(65536)
            line_end = buf.index(b"\r\n")
            size = int(bytes(buf[:line_end]), 16)
            while len(buf) < line_end + 2 + size + 2:
                buf += sock.recv(65536)
            body += bytes(buf[line_end + 2 : line_end + 2 + size])
            del buf[: line_end + 2 + size + 2]
            if size == 0:
                break
    else:  # delimited by the connection's end
        while data := sock.recv(65536):
            buf += data
        body = bytes(buf)
        buf.clear()
    return status, fields, body


def exchange(srv: ServerProcess, data: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    """Send ``data`` on a new connection; the first response, and whether the server then closed."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(data)
        buf = bytearray()
        status, fields, body = read_response(sock, buf)
        try:
            closed = not buf and sock.recv(1) == b""
        except ConnectionResetError:
            closed = True
    return status, fields, body, closed


def result_of(body: bytes) -> object:
    frames = list(protocol.iter_frames(body))
    assert frames[-1][0] == protocol.F_END
    outcome = next(payload for ftype, payload in frames if ftype == protocol.F_OUTCOME)
    values, _exc, _timing = pickle.loads(protocol.decode_outcome_payload(outcome)[1])
    return values[0]


def test_pipelined_calls_are_answered_in_order_on_one_connection(srv: ServerProcess) -> None:
    requests = [call(srv, f"pipe-{i:05d}", len, "x" * i) for i in range(5)]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(b"".join(requests))  # all at once: the server answers one after another
        buf = bytearray()
        answers = [read_response(sock, buf) for _ in requests]
        assert [status for status, _, _ in answers] == [200] * 5
        assert [result_of(body) for _, _, body in answers] == [0, 1, 2, 3, 4]
        sock.sendall(call(srv, "pipe-after"))  # and the connection is still good
        assert read_response(sock, buf)[0] == 200


def test_a_body_that_arrives_byte_by_byte_is_read_whole(srv: ServerProcess) -> None:
    data = call(srv, "trickle-00001", len, "abcdef")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head_end = data.index(b"\r\n\r\n") + 4
        sock.sendall(data[:head_end])
        for i in range(head_end, len(data), 37):
            sock.sendall(data[i : i + 37])
            time.sleep(0.002)
        status, _, body = read_response(sock, bytearray())
    assert status == 200 and result_of(body) == 6


def test_http_1_0_is_answered_then_closed(srv: ServerProcess) -> None:
    status, _, body, closed = exchange(srv, f"GET {protocol.HEALTH_PATH} HTTP/1.0\r\n\r\n".encode())
    assert status == 200 and json.loads(body)["status"] == "ok" and closed


def test_connection_close_is_honoured(srv: ServerProcess) -> None:
    status, _, _, closed = exchange(srv, f"GET {protocol.HEALTH_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status == 200 and closed


def test_keep_alive_is_the_default(srv: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        buf = bytearray()
        for _ in range(3):
            sock.sendall(f"GET {protocol.HEALTH_PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, fields, _ = read_response(sock, buf)
            assert status == 200 and "connection" not in fields and fields["date"].endswith("GMT")


def test_head_gets_the_fields_and_no_body(srv: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        health = f"{protocol.HEALTH_PATH} HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(f"HEAD {health}GET {health}".encode())
        buf = bytearray()
        head = bytearray()
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        end = head.index(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: " in head[:end]
        buf += head[end + 4 :]
        # The next bytes are the GET's response, not a body of the HEAD's.
        while not buf.startswith(b"HTTP/1.1 "):
            buf += sock.recv(65536)
        assert read_response(sock, buf)[0] == 200


def test_expect_100_continue_gets_an_interim_answer(srv: ServerProcess) -> None:
    data = call(srv, "expect-00001", len, "abcd")
    head_end = data.index(b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(data[:head_end] + b"\r\nExpect: 100-continue\r\n\r\n")
        interim = sock.recv(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(data[head_end + 4 :])
        status, _, body = read_response(sock, bytearray())
    assert status == 200 and result_of(body) == 4


def test_unknown_paths_and_methods(srv: ServerProcess) -> None:
    status, _, body, _ = exchange(srv, b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 404 and protocol.INVOKE_PATH in json.loads(body)["error"]
    status, fields, body, _ = exchange(
        srv, f"DELETE {protocol.INVOKE_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert status == 405 and fields["allow"] == "POST" and "DELETE" in json.loads(body)["error"]


#: Refused by the replica itself, with its JSON error naming the problem.
OWN_REFUSALS = {
    "a chunked request body": (b"POST /v1/invoke HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                               411, "Content-Length"),
    "a duplicated signed field": (b"POST /v1/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nX-Acx-Call-Id: a\r\n"
                                  b"x-acx-call-id: b\r\n\r\n", 400, "more than once"),
    "an unknown expectation": (b"POST /v1/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nExpect: something\r\n\r\n",
                               417, "Expect"),
}  # fmt: skip


@pytest.mark.parametrize(("head", "status", "words"), OWN_REFUSALS.values(), ids=OWN_REFUSALS.keys())
def test_requests_the_replica_refuses_get_its_json_error_and_the_connection_closes(
    srv: ServerProcess, head: bytes, status: int, words: str
) -> None:
    got, _, body, closed = exchange(srv, head)
    assert got == status, body
    assert words in json.loads(body)["error"] and closed


#: Refused by aiohttp's parser (llhttp): its own text answer (400), the connection closed.
MALFORMED = {
    "a duplicated Content-Length": b"POST /v1/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "Content-Length and Transfer-Encoding": b"POST /v1/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                                            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "a superscript digit as Content-Length": b"POST /v1/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: \xc2\xb2\r\n\r\n",
    "a negative Content-Length": b"POST /v1/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "Content-Length 1e3": b"POST /v1/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n",
    "Transfer-Encoding: xchunked": b"POST /v1/invoke HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n",
    "a chunk size 0x2": b"POST /v1/invoke HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nab\r\n0\r\n\r\n",
    "a control character in a name": b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Bad\x01: y\r\n\r\n",
    "a bare CR in a value": b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Bad: a\rb\r\n\r\n",
    "an obs-folded line": b"GET /v1/health HTTP/1.1\r\nHost: x\r\n Folded: x\r\n\r\n",
    "a line without a colon": b"GET /v1/health HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
    "a request line with four parts": b"GET /v1/health HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    "a lower-case method": b"get /v1/health HTTP/1.1\r\nHost: x\r\n\r\n",
    "no Host": b"GET /v1/health HTTP/1.1\r\n\r\n",
    "a field longer than the limit": b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * (web.MAX_FIELD + 10) + b"\r\n\r\n",
}  # fmt: skip


@pytest.mark.parametrize("head", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_get_a_4xx_and_the_connection_closes_and_nothing_runs(srv: ServerProcess, head: bytes) -> None:
    marker = srv.log.parent / f"smuggled-{abs(hash(head))}"
    smuggled = call(srv, f"smuggle-{abs(hash(head)) % 99999:05d}", Path.touch, marker)
    # A well-formed signed call right behind it: it must not be framed out of the first one's bytes.
    got, _, body, closed = exchange(srv, head + smuggled)
    assert 400 <= got < 500 and closed, (got, body)
    assert not marker.exists()
    assert exchange(srv, f"GET {protocol.HEALTH_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())[0] == 200


def test_a_head_larger_than_the_limit_is_refused_before_it_ends(srv: ServerProcess) -> None:
    """The server does not wait for (or buffer) a head that can only be refused."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nX-Big: " + b"y" * (web.MAX_FIELD + 10))  # no end in sight
        status, _, _ = read_response(sock, bytearray())
    assert status == 400


def test_a_partial_head_then_eof_is_closed_without_an_answer(srv: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(b"GET /v1/heal")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""


def slow_touch(path: str) -> str:
    time.sleep(1.5)
    with open(path, "w") as f:
        f.write("ran")
    return "done"


def test_a_client_that_closes_its_end_is_gone_and_its_call_is_stopped(tmp_path: Path) -> None:
    """EOF from the client (an ingress that gave up closes so) cuts the request in hand: no
    answer, and the call's worker is stopped before it gets to its side effect."""
    srv = start_server(tmp_path, workers=1)  # its own: the stopped worker is replaced
    try:
        closed_mid_call(srv, tmp_path / "ran")
    finally:
        stop_server(srv)


def closed_mid_call(srv: ServerProcess, marker: Path) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(call(srv, "halfclose-00001", slow_touch, str(marker)))
        time.sleep(0.5)  # running on its worker by now
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""
    time.sleep(2)
    assert not marker.exists()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:  # and the replica serves on
        sock.sendall(call(srv, "halfclose-00002", len, "abc"))
        status, _, body = read_response(sock, bytearray())
        assert status == 200 and result_of(body) == 3


def test_an_unread_body_closes_the_connection_after_the_refusal(srv: ServerProcess) -> None:
    """A request refused before its body arrived: the rest of its bytes cannot be framed, so the
    connection is closed rather than the body read as the next request."""
    data = call(srv, "unsigned-00001").replace(protocol.H_HEAD_SIGNATURE.encode(), b"X-Acx-Nothing")
    head_end = data.index(b"\r\n\r\n") + 4
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(data[:head_end])  # the head alone: the body never comes
        buf = bytearray()
        status, fields, _ = read_response(sock, buf)
        assert status == 401 and fields["connection"] == "close"
        assert sock.recv(100) == b""


def test_a_streamed_answer_to_http_1_0_ends_with_the_connection(tmp_path: Path) -> None:
    srv = start_server(tmp_path, extra_env={"ACX_HEARTBEAT_INTERVAL": "0.2"})
    try:
        data = call(srv, "stream10-00001", time.sleep, 0.7).replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
        status, fields, body, closed = exchange(srv, data)
        assert status == 200 and "content-length" not in fields and "transfer-encoding" not in fields
        kinds = [ftype for ftype, _ in protocol.iter_frames(body)]
        assert protocol.F_HEARTBEAT in kinds and kinds[-1] == protocol.F_END and closed
    finally:
        stop_server(srv)


def test_a_client_still_sending_a_refused_body_gets_the_answer(tmp_path: Path) -> None:
    """413 is decided from the head; a client that sends the whole body before reading (as
    http.client does) still reads the 413, not a reset: the server reads and drops the rest."""
    srv = start_server(tmp_path, extra_env={"ACX_MAX_BODY_BYTES": "100000"})
    try:
        data = call(srv, "big-00001", len, "x" * 3_000_000)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
            sock.sendall(data)
            status, fields, body = read_response(sock, bytearray())
            assert status == 413 and "100000" in json.loads(body)["error"] and fields["connection"] == "close"
            assert sock.recv(100) == b""
    finally:
        stop_server(srv)


def big_result(n: int, delay: float) -> bytes:
    time.sleep(delay)
    return b"x" * n


def read_all_after(sock: socket.socket, wait: float) -> tuple[int, bytes]:
    time.sleep(wait)  # the answer meanwhile fills the socket buffers and waits in the server
    status, _, body = read_response(sock, bytearray())
    return status, body


def test_an_answer_still_being_sent_is_not_cut_by_the_idle_deadline(tmp_path: Path) -> None:
    srv = start_server(tmp_path, extra_env={"ACX_IDLE_TIMEOUT": "1", "ACX_HEADER_TIMEOUT": "1"})
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
            sock.sendall(call(srv, "idle-00001", big_result, 40_000_000, 0.0))
            status, body = read_all_after(sock, 3)  # three idle timeouts before the first byte is read
        assert status == 200 and result_of(body) == b"x" * 40_000_000
    finally:
        stop_server(srv)


def test_sigterm_lets_an_answer_on_its_way_out_arrive_whole(tmp_path: Path) -> None:
    srv = start_server(tmp_path, extra_env={"ACX_SHUTDOWN_GRACE": "10"})
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
            sock.sendall(call(srv, "term-00001", big_result, 20_000_000, 0.5))
            time.sleep(0.2)
            srv.proc.send_signal(signal.SIGTERM)  # the call ends 0.3 s later, well within the grace
            status, body = read_all_after(sock, 2)
        assert status == 200 and result_of(body) == b"x" * 20_000_000
        assert srv.proc.wait(30) == 0
    finally:
        stop_server(srv)


def test_bare_lf_heads_are_refused_at_once_and_leading_empty_lines_ignored(srv: ServerProcess) -> None:
    # Answered (a head held until the header timeout would be cut without an answer).
    status, _, body, closed = exchange(srv, b"GET /v1/health HTTP/1.1\nHost: x\n\n")
    assert status == 400 and closed, body
    status, _, _, _ = exchange(srv, f"\r\nGET {protocol.HEALTH_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status == 200


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the replica's RSS from /proc (Linux)")
def test_a_client_that_pipelines_without_reading_cannot_grow_the_replicas_memory(srv: ServerProcess) -> None:
    """300 MB of pipelined requests whose answers are never read: the replica stops reading
    (its queue of parsed requests and its buffers are bounded), so the sender is held back by
    TCP and the replica's memory stays flat."""
    before = rss_kb(srv.proc.pid)
    request = f"GET {protocol.HEALTH_PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    block = request * (1_000_000 // len(request))
    sent = 0
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.settimeout(3.0)  # the replica stopped reading once this long: held back
        try:
            while sent < 300_000_000:
                sock.sendall(block)
                sent += len(block)
        except TimeoutError:
            pass
        grown = rss_kb(srv.proc.pid) - before
    assert grown < 40_000, f"RSS grew by {grown} KB after {sent / 1e6:.0f} MB pipelined"
    assert sent < 300_000_000  # held back, not read and dropped as fast as it came
    assert exchange(srv, f"GET {protocol.HEALTH_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())[0] == 200


def test_a_stream_of_empty_lines_before_a_request_is_bounded(srv: ServerProcess) -> None:
    """A megabyte of CRLFs: refused or skipped, and the replica goes on serving."""
    before = rss_kb(srv.proc.pid) if Path("/proc/self/status").exists() else 0
    status, _, _, _ = exchange(
        srv, b"\r\n" * 500_000 + f"GET {protocol.HEALTH_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert status in (200, 400)
    if before:
        assert rss_kb(srv.proc.pid) - before < 20_000
    assert exchange(srv, f"GET {protocol.HEALTH_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())[0] == 200
