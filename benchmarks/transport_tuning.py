"""What each aiohttp client setting is worth on the invoke path, in one run.

    python benchmarks/transport_tuning.py [--calls 20000] [--repeat 3] [--concurrency 64]

Runs ``map(add7, range(N))`` at chunksize 1 on the local runtime with the invoke path's
``AiohttpTransport`` first as one would write it from aiohttp's docs (a ``TCPConnector`` of the
executor's size and nothing else: aiohttp's cookie jar, decompression, ``Accept`` headers, and a
``ClientTimeout`` built per request), then with each of the settings the SDK uses added in turn,
up to the SDK's own transport; beside them the raw aiohttp floor of ``fanout.py`` and, for
scale, the tuned transport without keep-alive (``force_close``). Prints calls/s (best of the
runs) and the client's CPU per call (``time.process_time()``; replicas are other processes).
No targets: it explains the figures ``fanout.py`` checks. Never run by tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
from collections.abc import Mapping
from typing import Any

import aiohttp

from async_ca_exec import invoker, transport

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fanout import bench_local, bench_raw  # (the same job and floor, not copied here)

#: The SDK's settings, in the order they are added (each row has those before it too).
STEPS = (
    ("one ClientTimeout for the session, none per request", "session_timeout"),
    ("+ DummyCookieJar", "no_cookies"),
    ("+ auto_decompress=False", "no_decompress"),
    ("+ skip_auto_headers Accept, Accept-Encoding", "no_accept"),
    ("+ keepalive_timeout 60 s, limit_per_host 0 = the SDK's transport", "connector"),
)


def transport_with(steps: set[str], force_close: bool = False) -> type[transport.AiohttpTransport]:
    class Tuned(transport.AiohttpTransport):
        def connector_options(self, limit: int, ssl_context: ssl.SSLContext | None) -> dict[str, Any]:
            options = super().connector_options(limit, ssl_context)
            if "connector" not in steps:
                options = {"limit": limit, "ssl": options["ssl"]}
            if force_close:
                options.pop("keepalive_timeout", None)
                options["force_close"] = True
            return options

        def session_options(self, host: str, connect_timeout: float, read_timeout: float | None) -> dict[str, Any]:
            options = super().session_options(host, connect_timeout, read_timeout)
            self._per_request = None if "session_timeout" in steps else options.pop("timeout")
            if "no_cookies" not in steps:
                del options["cookie_jar"]
            if "no_decompress" not in steps:
                del options["auto_decompress"]
            if "no_accept" not in steps:
                del options["skip_auto_headers"]
            return options

        async def post(self, headers: Mapping[str, str], body: bytes) -> transport.AiohttpReply:
            if self._per_request is None:
                return await super().post(headers, body)
            timeout = aiohttp.ClientTimeout(  # as a per-request timeout is usually written
                total=None, sock_connect=self._per_request.sock_connect, sock_read=self._per_request.sock_read
            )
            try:
                resp = await self._session.post(self.url, data=body, headers=headers, timeout=timeout)
            except transport._ERRORS as exc:
                raise transport._translate(exc) from None
            return transport.AiohttpReply(resp)

    return Tuned


def run_with(cls: type[transport.AiohttpTransport], calls: int, repeat: int, concurrency: int) -> list[tuple[float, float]]:
    def factory(endpoint: invoker.Endpoint, limit: int, read_timeout: float) -> transport.Transport:
        return cls(
            endpoint.url,
            limit=limit,
            ssl_context=endpoint.ssl,
            connect_timeout=invoker.CONNECT_TIMEOUT,
            read_timeout=read_timeout,
            path=invoker.protocol.INVOKE_PATH,
        )

    saved = invoker._aiohttp_transport
    invoker._aiohttp_transport = factory  # type: ignore[assignment]
    try:
        return asyncio.run(bench_local(calls, repeat, [1], concurrency))[1]
    finally:
        invoker._aiohttp_transport = saved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64)
    a = p.parse_args(argv)
    print(
        f"map(add7, range({a.calls})) at chunksize 1, concurrency {a.concurrency}, best of {a.repeat}; "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}",
        flush=True,
    )
    rows: list[tuple[str, list[tuple[float, float]]]] = []
    rows.append(("aiohttp as its docs show it (untuned)", run_with(transport_with(set()), a.calls, a.repeat, a.concurrency)))
    done: set[str] = set()
    for name, step in STEPS:
        done.add(step)
        rows.append((name, run_with(transport_with(set(done)), a.calls, a.repeat, a.concurrency)))
        print(f"  {name} ...", flush=True)
    rows.append(
        (
            "the SDK's transport with force_close (no keep-alive)",
            run_with(transport_with(done, True), a.calls, a.repeat, a.concurrency),
        )
    )
    rows.append(("raw aiohttp floor (bare client and server, no SDK)", bench_raw(a.calls, a.repeat, a.concurrency)))
    width = max(len(n) for n, _ in rows)
    print(f"\n{'':<{width}}  {'best calls/s':>13}  {'client CPU us/call':>18}")
    for name, runs in rows:
        print(f"{name:<{width}}  {max(r for r, _ in runs):>13,.0f}  {min(c for _, c in runs) * 1e6:>18.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
