"""The container server faced directly: signatures, hostile input, health and metadata."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from async_ca_exec import protocol, serialize

from conftest import ServerProcess, children, free_port, start_server, stop_server, wait_gone


def touch(path: str) -> str:
    with open(path, "w") as f:
        f.write("ran")
    return "touched"


def make_body(fn: Any, *args: Any, call_id: str = "test-00001", timeout: float = 30.0) -> bytes:
    fn_bytes, fn_hash = serialize.dumps_function(fn)
    items = serialize.dumps_items([(args, {})], call_id)
    return protocol.encode_invocation(call_id=call_id, n=1, fn=fn_bytes, fn_hash=fn_hash, items=items, timeout=timeout)


async def post(server: ServerProcess, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.post(server.url + protocol.INVOKE_PATH, data=body, headers=headers) as r:
        return r.status, await r.read()


def signed(server: ServerProcess, body: bytes, call_id: str = "test-00001", **kw: Any) -> dict[str, str]:
    return protocol.signed_headers(server.key, "POST", protocol.INVOKE_PATH, call_id, body, **kw)


def decode_result(raw: bytes) -> Any:
    frames = list(protocol.iter_frames(raw))
    assert frames[-1][0] == protocol.F_END
    outcomes = [p for t, p in frames if t == protocol.F_OUTCOME]
    meta, blob = protocol.decode_outcome_payload(outcomes[0])
    values, _exc, _timing = pickle.loads(blob)
    return meta, values


async def test_signed_call_runs_and_streams_its_result(server: ServerProcess, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    body = make_body(touch, str(marker))
    status, raw = await post(server, body, signed(server, body))
    assert status == 200
    meta, values = decode_result(raw)
    assert values == ["touched"] and meta["replica"] == "test-replica" and "errors" not in meta
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("attack", ["unsigned", "wrong key", "tampered body", "stale", "replayed header on other body"])
async def test_unauthenticated_requests_get_401_and_nothing_runs(server: ServerProcess, tmp_path: Path, attack: str) -> None:
    marker = tmp_path / f"ran-{attack.replace(' ', '-')}"
    body = make_body(touch, str(marker))
    headers = signed(server, body)
    if attack == "unsigned":
        headers = {}
    elif attack == "wrong key":
        headers = protocol.signed_headers(b"w" * 43, "POST", protocol.INVOKE_PATH, "test-00001", body)
    elif attack == "tampered body":
        body = body.replace(b"ran-", b"RAN-")
    elif attack == "stale":
        headers = signed(server, body, now=time.time() - 3600)
    elif attack == "replayed header on other body":
        body = make_body(touch, str(marker) + "-other")
    status, raw = await post(server, body, headers)
    assert status == 401, raw
    assert "error" in json.loads(raw)
    await asyncio.sleep(0.2)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("ran-")], "the function ran for an unauthenticated request"
    # ...and the server still serves valid calls
    good = make_body(touch, str(tmp_path / "ok"))
    assert (await post(server, good, signed(server, good)))[0] == 200


@pytest.mark.parametrize(
    "body",
    [b"", b"garbage", b"ACXQ" + b"\x01" * 30, b"{" * 100],
    ids=["empty", "garbage", "bad-lengths", "json-ish"],
)
async def test_malformed_signed_bodies_get_400(server: ServerProcess, body: bytes) -> None:
    status, raw = await post(server, body, signed(server, body))
    assert status == 400
    assert json.loads(raw)["error"]


async def test_envelope_call_id_must_match_the_signed_one(server: ServerProcess, tmp_path: Path) -> None:
    body = make_body(touch, str(tmp_path / "x"), call_id="test-00001")
    status, raw = await post(server, body, signed(server, body, call_id="test-00002"))
    assert status == 400 and b"call id" in raw
    assert not (tmp_path / "x").exists()


async def test_oversized_request_gets_413_naming_the_limit(tmp_path: Path) -> None:
    srv = start_server(tmp_path, extra_env={"ACX_MAX_BODY_BYTES": "100000"})
    try:
        body = make_body(len, b"x" * 200_000)
        status, raw = await post(srv, body, signed(srv, body))
        assert status == 413 and b"100000" in raw
        small = make_body(len, b"x" * 10)
        status, raw = await post(srv, small, signed(srv, small))
        assert status == 200 and decode_result(raw)[1] == [10]
    finally:
        stop_server(srv)


async def test_health_is_open_and_meta_needs_a_signature(server: ServerProcess) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(server.url + protocol.HEALTH_PATH) as r:
            assert r.status == 200 and (await r.json())["ready_workers"] == 2
        async with s.get(server.url + protocol.META_PATH) as r:
            assert r.status == 401
        headers = protocol.signed_headers(server.key, "GET", protocol.META_PATH, "meta", b"")
        async with s.get(server.url + protocol.META_PATH, headers=headers) as r:
            meta = await r.json()
        assert r.status == 200
        assert meta["protocol"] == protocol.PROTOCOL_VERSION and meta["worker_processes"] == 2
        assert meta["python"].count(".") == 2 and meta["packages"]["cloudpickle"]
        async with s.get(server.url + "/nope") as r:
            assert r.status == 404


async def test_a_draining_replica_is_alive_but_not_ready(tmp_path: Path) -> None:
    """After SIGTERM, with a call still running: the main port takes no new connection;
    on the health port readiness (/v1/health) says 503 so no traffic comes, and liveness
    (/v1/live) stays 200 so the platform does not restart the replica and kill the call,
    whose answer still arrives."""
    probes = free_port()
    srv = start_server(tmp_path, extra_env={"ACX_SHUTDOWN_GRACE": "30", "ACX_HEALTH_PORT": str(probes)})
    probe_url = f"http://127.0.0.1:{probes}"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(probe_url + protocol.LIVE_PATH) as r:
                assert r.status == 200 and (await r.json()) == {"status": "alive", "draining": False}
            body = make_body(time.sleep, 2.0)
            call = asyncio.ensure_future(post(srv, body, signed(srv, body)))
            await asyncio.sleep(0.5)
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with aiohttp.ClientSession() as fresh:  # new connections, as probes make them
                async with fresh.get(probe_url + protocol.HEALTH_PATH) as r:
                    assert r.status == 503
                async with fresh.get(probe_url + protocol.LIVE_PATH) as r:
                    assert r.status == 200 and (await r.json())["draining"] is True
                with pytest.raises(aiohttp.ClientConnectionError):
                    await fresh.get(srv.url + protocol.HEALTH_PATH)  # the main port is closed
            status, raw = await call
            assert status == 200 and decode_result(raw)[1] == [None]
        assert srv.proc.wait(15) == 0
    finally:
        stop_server(srv)


async def test_timeout_above_the_runtime_maximum_is_refused(tmp_path: Path) -> None:
    srv = start_server(tmp_path, extra_env={"ACX_RUNTIME_TIMEOUT": "5"})
    try:
        body = make_body(len, "abc", timeout=60)
        status, raw = await post(srv, body, signed(srv, body))
        assert status == 400 and b"maximum of 5 s" in raw
    finally:
        stop_server(srv)


async def test_slow_call_streams_heartbeats_until_its_result(tmp_path: Path) -> None:
    srv = start_server(tmp_path, extra_env={"ACX_HEARTBEAT_INTERVAL": "0.2"})
    try:
        body = make_body(time.sleep, 1.2)
        async with (
            aiohttp.ClientSession() as s,
            s.post(srv.url + protocol.INVOKE_PATH, data=body, headers=signed(srv, body)) as r,
        ):
            assert r.status == 200 and r.content_length is None  # streamed
            kinds = []
            while True:
                hdr = await r.content.readexactly(protocol.FRAME_HEADER)
                ftype, length = protocol.parse_frame_header(hdr)
                await r.content.readexactly(length)
                kinds.append(ftype)
                if ftype == protocol.F_END:
                    break
        assert kinds.count(protocol.F_HEARTBEAT) >= 3
        assert kinds[-2:] == [protocol.F_OUTCOME, protocol.F_END]
    finally:
        stop_server(srv)


def test_server_refuses_to_start_without_a_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("ACX_")}
    r = subprocess.run([sys.executable, "-m", "acx_server"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "ACX_HMAC_KEY" in r.stderr


def test_sigterm_stops_the_server_and_its_workers(tmp_path: Path) -> None:
    srv = start_server(tmp_path, workers=3)
    kids = children(srv.proc.pid)
    assert len(kids) == 3
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(15) == 0
    assert not wait_gone(kids)


def test_workers_die_with_a_killed_server(tmp_path: Path) -> None:
    srv = start_server(tmp_path, workers=2)
    kids = children(srv.proc.pid)
    srv.proc.kill()
    srv.proc.wait(10)
    assert not wait_gone(kids), "workers outlived their server"


async def test_function_sent_by_reference_needs_to_be_cached_first(server: ServerProcess) -> None:
    fn_bytes, fn_hash = serialize.dumps_function(len)
    items = serialize.dumps_items([(("abcd",), {})], "test-00001")

    def body(with_fn: bool) -> bytes:
        return protocol.encode_invocation(
            call_id="test-00001", n=1, fn=fn_bytes if with_fn else b"", fn_hash=fn_hash, items=items, timeout=5
        )

    by_ref = body(False)
    status, raw = await post(server, by_ref, signed(server, by_ref))
    assert status == 409 and json.loads(raw)["code"] == protocol.UNKNOWN_FUNCTION
    full = body(True)  # the retry: a new attempt of the same call id
    assert (await post(server, full, signed(server, full, attempt=1)))[0] == 200
    status, raw = await post(server, by_ref, signed(server, by_ref, attempt=2))
    assert status == 200 and decode_result(raw)[1] == [4]
