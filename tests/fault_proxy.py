"""A fault-injecting HTTP proxy for tests (a test double; it lives only in tests/).

It sits on 127.0.0.1 between a client and a runtime, forwards each request (streaming the
response back as it comes, so heartbeats still flow) after ``latency`` seconds each way, and
replaces a ``fault_rate`` share of them by one of:

- ``reset``: the connection is dropped before the request is forwarded (nothing ran);
- ``reset-after``: forwarded, then dropped instead of answering (it ran; the answer is lost);
- ``truncate``: forwarded, and half of the response is sent before the connection drops;
- ``502``, ``503``, ``429``: answered by the proxy without forwarding;
- ``503-retry-after``, ``429-retry-after``: the same with ``Retry-After: 1``;
- ``504``: forwarded, then a gateway timeout instead of the answer (it ran).

Like the ARM double it runs in a thread with its own event loop, so sync and async tests can
use it alike; ``stop()`` closes everything it opened.
"""

from __future__ import annotations

import asyncio
import collections
import random
import socket
import threading
import time
from typing import Any

import aiohttp
from aiohttp import web

FAULTS = ("reset", "reset-after", "truncate", "502", "503", "503-retry-after", "504", "429", "429-retry-after")
_FORWARDED_HEADERS = ("Content-Type", "X-Acx-Timestamp", "X-Acx-Call-Id", "X-Acx-Attempt", "X-Acx-Signature",
                      "X-Acx-Head-Signature")  # fmt: skip


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        latency: float = 0.0,
        fault_rate: float = 0.0,
        faults: tuple[str, ...] = FAULTS,
        seed: int = 0,
    ) -> None:
        unknown = set(faults) - set(FAULTS)
        assert not unknown, f"unknown faults {unknown}"
        self.upstream = upstream.rstrip("/")
        self.latency = latency
        self.fault_rate = fault_rate
        self.faults = faults
        self._rng = random.Random(seed)
        #: Faults injected, by kind; requests seen; per call id, the attempts it arrived with.
        self.injected: collections.Counter[str] = collections.Counter()
        self.requests = 0
        self.attempts: dict[str, list[int]] = collections.defaultdict(list)
        self.forwarded = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False
        )
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        await web.SockSite(self._runner, sock, backlog=4096).start()

    def stop(self) -> None:
        async def _stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            if self._session is not None:
                await self._session.close()

        try:
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def total_injected(self) -> int:
        return sum(self.injected.values())

    # -- the proxy -----------------------------------------------------------------------

    def _choose(self) -> str | None:
        if self.fault_rate and self._rng.random() < self.fault_rate:
            return self._rng.choice(self.faults)
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests += 1
        call_id = request.headers.get("X-Acx-Call-Id")
        if call_id is not None:
            self.attempts[call_id].append(int(request.headers.get("X-Acx-Attempt") or 0))
        fault = self._choose() if request.path.endswith("/invoke") else None
        if self.latency:
            await asyncio.sleep(self.latency)
        if fault is not None:
            self.injected[fault] += 1
        if fault == "reset":
            return self._drop(request)
        if fault in ("502", "503", "429", "503-retry-after", "429-retry-after"):
            status = int(fault[:3])
            headers = {"Retry-After": "1"} if fault.endswith("retry-after") else {}
            return web.json_response({"error": f"injected {fault}"}, status=status, headers=headers)
        headers = {k: request.headers[k] for k in _FORWARDED_HEADERS if k in request.headers}
        assert self._session is not None
        self.forwarded += 1
        async with self._session.request(request.method, self.upstream + request.path_qs, data=body, headers=headers) as up:
            if fault in ("reset-after", "504"):
                await up.read()  # it ran; the answer is lost
                if fault == "504":
                    return web.json_response({"error": "injected 504"}, status=504)
                return self._drop(request)
            resp = web.StreamResponse(status=up.status)
            for name in ("Content-Type", "X-Acx-Replica", "Retry-After"):
                if name in up.headers:
                    resp.headers[name] = up.headers[name]
            if fault == "truncate":
                data = await up.read()
                resp.content_length = len(data)
                await resp.prepare(request)
                await resp.write(data[: len(data) // 2])
                return self._drop(request)
            if up.content_length is not None:
                resp.content_length = up.content_length
            first = True
            async for chunk in up.content.iter_any():
                if first and self.latency:
                    await asyncio.sleep(self.latency)  # the way back
                if first:
                    await resp.prepare(request)
                    first = False
                await resp.write(chunk)
            if first:
                if self.latency:
                    await asyncio.sleep(self.latency)
                await resp.prepare(request)
            await resp.write_eof()
            return resp

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # nothing more to write on an aborted connection


def wait_until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)
