"""What each aiohttp client setting is worth on the invoke path, in one run.

    python benchmarks/transport_tuning.py [--calls 20000] [--repeat 4] [--concurrency 64]

Runs ``map(add7, range(N))`` at chunksize 1 on the local runtime with the invoke path's
``AiohttpTransport`` first as one would write it from aiohttp's docs (a ``TCPConnector`` of the
executor's size and nothing else: aiohttp's cookie jar, decompression, ``Accept`` headers, and a
``ClientTimeout`` built per request), then with each of the settings the SDK uses added in turn,
up to the SDK's own transport; beside them the raw aiohttp floor of ``fanout.py`` and, for
scale, the tuned transport without keep-alive (``force_close``). The rows take turns: each of
``--repeat`` rounds runs every row once, so the machine's drift does not favour one row. Prints
calls/s (best and median of the rounds) and the client's CPU per call (least and median;
``time.process_time()``; replicas are other processes). No targets: it explains the figures
``fanout.py`` checks. Never run by tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
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
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=64)
    a = p.parse_args(argv)
    print(
        f"map(add7, range({a.calls})) at chunksize 1, concurrency {a.concurrency}, {a.repeat} rounds, each row once per round; "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}",
        flush=True,
    )
    variants: list[tuple[str, Any]] = [("aiohttp as its docs show it (untuned)", transport_with(set()))]
    done: set[str] = set()
    for name, step in STEPS:
        done.add(step)
        variants.append((name, transport_with(set(done))))
    variants.append(("the SDK's transport with force_close (no keep-alive)", transport_with(done, True)))
    raw = "raw aiohttp floor (bare client and server, no SDK)"
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in variants}
    runs[raw] = []
    # Round-robin: each round runs every variant once, so the machine's drift (calls/s move by
    # up to a third within minutes here) spreads over all rows instead of favouring the first.
    for k in range(a.repeat):
        for name, cls in variants:
            runs[name] += run_with(cls, a.calls, 1, a.concurrency)
        runs[raw] += bench_raw(a.calls, 1, a.concurrency)
        print(f"  round {k + 1} of {a.repeat} done", flush=True)
    rows = list(runs.items())
    width = max(len(n) for n, _ in rows)
    print(f"\n{'':<{width}}  {'best calls/s':>13}  {'median':>8}  {'client CPU us/call':>18}  {'median':>7}")
    for name, row in rows:
        rates, cpus = [r for r, _ in row], [c * 1e6 for _, c in row]
        print(
            f"{name:<{width}}  {max(rates):>13,.0f}  {statistics.median(rates):>8,.0f}"
            f"  {min(cpus):>18.1f}  {statistics.median(cpus):>7.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
