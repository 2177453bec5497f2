"""Hostile input against a real server process: replays, slow clients, fuzzing.

The "nothing ran, nothing was unpickled" checks use payloads whose mere unpickling creates a
file: if any refused request had reached a worker, the file would exist.
"""

from __future__ import annotations

import builtins
import http.client
import json
import logging
import os
import pickle
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_ca_exec import protocol, serialize

from conftest import ServerProcess, free_port, start_server, stop_server


class CreatesFileWhenUnpickled:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (builtins.open, (self.path, "w"))


def append_line(path: str) -> str:
    with open(path, "a") as f:
        f.write("ran\n")
    return "ok"


def envelope(fn: Any, *args: Any, call_id: str) -> bytes:
    fn_bytes, fn_hash = serialize.dumps_function(fn)
    items = serialize.dumps_items([(args, {})], call_id)
    return protocol.encode_invocation(call_id=call_id, n=1, fn=fn_bytes, fn_hash=fn_hash, items=items, timeout=30)


def booby_trapped(marker: Path, call_id: str) -> bytes:
    """A well-formed envelope whose arguments, once unpickled, create ``marker``."""
    items = pickle.dumps([((CreatesFileWhenUnpickled(str(marker)),), {})])
    fn_bytes, fn_hash = serialize.dumps_function(len)
    return protocol.encode_invocation(call_id=call_id, n=1, fn=fn_bytes, fn_hash=fn_hash, items=items, timeout=30)


def post(server: ServerProcess, body: bytes, headers: dict[str, str], timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("POST", protocol.INVOKE_PATH, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def signed(server: ServerProcess, body: bytes, call_id: str, **kw: Any) -> dict[str, str]:
    return protocol.signed_headers(server.key, "POST", protocol.INVOKE_PATH, call_id, body, **kw)


@pytest.fixture(scope="module")
def fast_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server that answers refusals at once (no delay) and cuts slow clients after 1 s."""
    tmp = tmp_path_factory.mktemp("hostile")
    s = start_server(tmp, workers=1, extra_env={"ACX_AUTH_DELAY": "0", "ACX_HEADER_TIMEOUT": "1",
                                                "ACX_MIN_BODY_RATE": "50000", "ACX_MAX_BODY_BYTES": "1000000"})  # fmt: skip
    try:
        yield s
    finally:
        stop_server(s)


# -- replays ------------------------------------------------------------------------------


def test_a_replayed_request_is_refused_and_a_retry_is_not(fast_server: ServerProcess, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    body = envelope(append_line, str(marker), call_id="replay-00001")
    headers = signed(fast_server, body, "replay-00001")
    assert post(fast_server, body, headers)[0] == 200
    status, raw = post(fast_server, body, headers)  # the same bytes again, within the window
    assert status == 409 and json.loads(raw)["code"] == protocol.REPLAYED
    assert "replay-00001 attempt 0 was already received" in json.loads(raw)["error"]
    assert marker.read_text() == "ran\n"
    # A retry of the same call is signed as a new attempt: it runs.
    assert post(fast_server, body, signed(fast_server, body, "replay-00001", attempt=1))[0] == 200
    assert marker.read_text() == "ran\nran\n"


def test_a_tampered_copy_sent_first_does_not_block_the_real_request(fast_server: ServerProcess, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    body = envelope(append_line, str(marker), call_id="replay-00002")
    headers = signed(fast_server, body, "replay-00002")
    tampered = body.replace(b"runs", b"RUNS")
    assert post(fast_server, tampered, headers)[0] == 401
    assert post(fast_server, body, headers)[0] == 200
    assert marker.read_text() == "ran\n" and not (tmp_path / "RUNS").exists()


@pytest.mark.parametrize("attack", ["unsigned", "wrong key", "stale", "future", "tampered", "another body's signature",
                                    "oversized", "other call id", "attempt changed"])  # fmt: skip
def test_refused_requests_are_never_unpickled(fast_server: ServerProcess, tmp_path: Path, attack: str) -> None:
    marker = tmp_path / "unpickled"
    cid = f"trap-{os.urandom(4).hex()}"
    body = booby_trapped(marker, cid)
    headers = signed(fast_server, body, cid)
    if attack == "unsigned":
        headers = {}
    elif attack == "wrong key":
        headers = protocol.signed_headers(b"k" * 43, "POST", protocol.INVOKE_PATH, cid, body)
    elif attack in ("stale", "future"):
        headers = signed(fast_server, body, cid, now=time.time() + (-1 if attack == "stale" else 1) * 3600)
    elif attack == "tampered":
        body = body[:-1] + bytes([body[-1] ^ 1])
    elif attack == "another body's signature":
        innocent = booby_trapped(tmp_path / "unpicklex", cid)  # a same-length body...
        assert len(innocent) == len(body)
        headers = signed(fast_server, innocent, cid)  # ...whose signature is replayed on ours
    elif attack == "oversized":
        body = body + b"\0" * 2_000_000  # over this server's limit of 1 MB, signed
        headers = signed(fast_server, body, cid)
    elif attack == "other call id":
        headers[protocol.H_CALL_ID] = "trap-00009"
    elif attack == "attempt changed":
        headers[protocol.H_ATTEMPT] = "1"
    status, raw = post(fast_server, body, headers)
    assert status in (401, 409, 413), raw
    assert json.loads(raw)["error"]
    time.sleep(0.2)
    assert not marker.exists(), f"a refused request ({attack}) was unpickled"
    # A signed one is (the trap works), and the server is still fine.
    ok = booby_trapped(marker, cid + "-ok")
    assert post(fast_server, ok, signed(fast_server, ok, cid + "-ok"))[0] == 200
    assert marker.exists()


# -- slow clients -------------------------------------------------------------------------


def closed_within(sock: socket.socket, trickle: bytes, seconds: float) -> bool:
    """Send ``trickle`` a byte every 0.2 s; True once the server has closed the connection."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + seconds
    for i in range(len(trickle)):
        if time.monotonic() > deadline:
            return False
        try:
            sock.sendall(trickle[i : i + 1])
            data = sock.recv(65536)
            if not data or b" 408 " in data:
                return True
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def test_slow_headers_are_cut(fast_server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", fast_server.port)) as sock:
        trickle = (f"POST {protocol.INVOKE_PATH} HTTP/1.1\r\nHost: x\r\n" + "X-Filler: " + "a" * 1000).encode()
        assert closed_within(sock, trickle, 60)
    with socket.create_connection(("127.0.0.1", fast_server.port)) as sock:  # silent from the start
        sock.settimeout(60)
        assert sock.recv(10) == b""


def test_a_slow_body_is_cut(fast_server: ServerProcess) -> None:
    body = b"x" * 200_000  # at least 50 kB/s wanted: 1 + 4 s for it
    headers = signed(fast_server, body, "slow-00001")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", fast_server.port)) as sock:
        sock.sendall(f"POST {protocol.INVOKE_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode())
        assert closed_within(sock, body, 60)


def test_an_idle_keep_alive_connection_is_kept_then_closed(tmp_path: Path) -> None:
    srv = start_server(tmp_path, extra_env={"ACX_HEADER_TIMEOUT": "0.5", "ACX_IDLE_TIMEOUT": "2"})
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("GET", protocol.HEALTH_PATH)
        assert conn.getresponse().read()
        time.sleep(1)  # longer than header_timeout, shorter than idle_timeout: still open
        conn.request("GET", protocol.HEALTH_PATH)
        assert conn.getresponse().status == 200
        assert conn.sock is not None
        conn.sock.settimeout(60)
        assert conn.sock.recv(10) == b""  # closed after idle_timeout
        conn.close()
    finally:
        stop_server(srv)


# -- floods -------------------------------------------------------------------------------


def test_refused_requests_are_held_and_a_full_tarpit_pauses_accepting(tmp_path: Path) -> None:
    """Refusals are answered after ACX_AUTH_DELAY (longer as more are held) on a closed
    connection; with ACX_REFUSAL_SLOTS of them held the replica accepts no connection until
    one is answered, while calls on already open connections and health probes on the
    probe port go on."""
    probe_port = free_port()
    srv = start_server(tmp_path, extra_env={"ACX_AUTH_DELAY": "1", "ACX_REFUSAL_SLOTS": "2", "ACX_LOG_LEVEL": "DEBUG",
                                            "ACX_HEALTH_PORT": str(probe_port)})  # fmt: skip
    try:
        legit = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        body = envelope(len, "abc", call_id="legit-00001")
        legit.request("POST", protocol.INVOKE_PATH, body=body, headers=signed(srv, body, "legit-00001"))
        assert legit.getresponse().read()  # a pooled connection, open before the flood
        statuses: dict[str, int] = {}

        def refused(name: str) -> None:
            headers = {"Content-Type": "application/octet-stream", protocol.H_CALL_ID: name}
            statuses[name] = post(srv, b"x" * 100, headers, timeout=60)[0]

        def server_log() -> str:
            return srv.log.read_text(errors="replace")

        def wait_for(text: str) -> None:
            deadline = time.monotonic() + 30
            while text not in server_log():
                assert time.monotonic() < deadline, server_log()
                time.sleep(0.02)

        threads = [threading.Thread(target=refused, args=(name,)) for name in ("first", "second")]
        for t in threads:
            t.start()
        wait_for("refused requests held: not accepting")
        threads.append(threading.Thread(target=refused, args=("third",)))
        threads[-1].start()
        # While the tarpit is full: calls on open connections and probes are answered.
        body = envelope(len, "abcd", call_id="legit-00002")
        legit.request("POST", protocol.INVOKE_PATH, body=body, headers=signed(srv, body, "legit-00002"))
        resp = legit.getresponse()
        assert resp.status == 200 and resp.read()
        probe = http.client.HTTPConnection("127.0.0.1", probe_port, timeout=60)
        probe.request("GET", protocol.HEALTH_PATH)
        assert probe.getresponse().status == 200
        probe.close()
        assert "accepting connections again" not in server_log()  # all of that while paused
        for t in threads:
            t.join(60)
        assert statuses == {"first": 401, "second": 401, "third": 401}
        log_text = server_log()
        # The third connection was not even read until a slot was free.
        assert log_text.index("accepting connections again") < log_text.index("'third'")
        legit.close()
    finally:
        stop_server(srv)


# -- fuzzing ------------------------------------------------------------------------------

_HEADER_NAMES = [protocol.H_TIMESTAMP, protocol.H_CALL_ID, protocol.H_ATTEMPT, protocol.H_SIGNATURE,
                 protocol.H_HEAD_SIGNATURE, "Content-Type"]  # fmt: skip
_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(
    body=st.binary(max_size=4096),
    headers=st.dictionaries(
        st.sampled_from(_HEADER_NAMES), st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80)
    ),
)
def test_fuzzed_requests_get_a_4xx_and_nothing_runs(fast_server: ServerProcess, body: bytes, headers: dict[str, str]) -> None:
    status, raw = post(fast_server, body, headers, timeout=20)
    assert status in (400, 401, 409, 413), (status, raw)
    assert json.loads(raw)["error"]


@_FUZZ
@given(body=st.binary(max_size=4096), n=st.integers(0, 10**9))
def test_fuzzed_bodies_with_a_valid_signature_get_400(fast_server: ServerProcess, body: bytes, n: int) -> None:
    call_id = f"fuzz-{n}-{os.urandom(4).hex()}"
    status, raw = post(fast_server, body, signed(fast_server, body, call_id), timeout=20)
    assert status == 400, (status, raw)


@_FUZZ
@given(position=st.integers(0, 10**6), flip=st.integers(1, 255), where=st.sampled_from(["body", *_HEADER_NAMES[:5]]))
def test_any_changed_byte_of_a_signed_request_is_refused(
    fast_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory, position: int, flip: int, where: str
) -> None:
    marker = tmp_path_factory.mktemp("flip") / "unpickled"
    call_id = f"flip-{os.urandom(6).hex()}"
    body = booby_trapped(marker, call_id)
    headers = signed(fast_server, body, call_id)
    if where == "body":
        i = position % len(body)
        body = body[:i] + bytes([body[i] ^ flip]) + body[i + 1 :]
    else:
        value = headers.get(where, "0").encode()
        i = position % len(value)
        changed = bytes([value[i] ^ (flip & 0x1F) or value[i] ^ 1])
        new = (value[:i] + changed + value[i + 1 :]).decode("latin-1")
        if new == headers.get(where) or not new.isprintable() or new != new.strip():
            return  # not a change an HTTP header can carry
        headers[where] = new
    status, raw = post(fast_server, body, headers, timeout=20)
    assert status in (400, 401, 409, 413), (where, status, raw)
    assert not marker.exists()


@_FUZZ
@given(data=st.binary(min_size=1, max_size=2048))
def test_bytes_that_are_not_http_never_hang_or_crash_the_server(fast_server: ServerProcess, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", fast_server.port), timeout=20) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        try:
            answer = sock.recv(64)
        except ConnectionResetError:
            answer = b""
    assert answer == b"" or re.match(rb"HTTP/1\.[01] 4\d\d ", answer), answer
    assert fast_server.proc.poll() is None


def test_the_server_still_serves_after_the_fuzzing(fast_server: ServerProcess, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    body = envelope(append_line, str(marker), call_id="after-00001")
    assert post(fast_server, body, signed(fast_server, body, "after-00001"))[0] == 200
    assert marker.read_text() == "ran\n" and fast_server.proc.poll() is None


def test_the_replay_guard_is_bounded_and_keeps_what_it_can(caplog: pytest.LogCaptureFixture) -> None:
    from acx_server.server import ReplayGuard

    guard = ReplayGuard(window=300, max_entries=1000)
    for i in range(999):
        assert guard.add(f"call-{i}", 0)
    assert not guard.add("call-5", 0) and guard.add("call-5", 1)  # a replay; a retry
    with caplog.at_level(logging.WARNING):
        for i in range(1000, 5000):
            assert guard.add(f"call-{i}", 0)
    assert len(guard) <= 1000
    assert "replays of the oldest are no longer detected" in caplog.text
    assert guard.seen("call-4999", 0)  # the newest are always kept
