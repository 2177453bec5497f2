"""Client memory per call in flight, on the embedded local runtime.

    python benchmarks/inflight.py [--calls 10000] [--concurrency 10000]

Runs ``map`` over ``--calls`` items with ``max_concurrency`` set to ``--concurrency``, of a
function that holds its worker until every request of the job has been sent (it waits for a
marker file the client creates then; the replica queues the calls its workers cannot run
yet), so that all ``--calls`` are in flight at once; and beside it the same job at concurrency
64 (the baseline, never held). Each in a fresh process: prints the peak number of requests in
flight, the client's peak RSS growth over the job, and that growth per call in flight.

Beside them, the same two jobs from a bare aiohttp client (``ClientSession.post`` of
``cloudpickle.dumps((held, i))`` per call, a ``TCPConnector`` as wide as the job) against a bare
aiohttp server that holds every request until all have arrived: what aiohttp itself costs per
request in flight. Target: the SDK's memory per extra call in flight <= 1.3x the bare
client's. Exits non-zero if missed. Never run by tests.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import aiohttp
import cloudpickle
from aiohttp import web

from async_ca_exec import AsyncExecutor

TARGET_RATIO = 1.3


def held(x: int, marker: str) -> int:
    """Return ``x`` once ``marker`` exists (the client creates it when all is sent)."""
    while not os.path.exists(marker):
        time.sleep(0.001)
    return x


def _touch(path: str) -> None:
    with open(path, "w"):
        pass


async def _job(calls: int, concurrency: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        marker = os.path.join(tmp, "go")
        _touch(marker)  # not held while warming up, nor in the baseline
        fn = functools.partial(held, marker=marker)
        async with AsyncExecutor(max_concurrency=concurrency) as ex:
            await ex.map(fn, range(200), chunksize=1)  # warm: workers, connections, imports
            hold = concurrency > 64
            if hold:
                os.unlink(marker)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            invoker = ex._invoker
            assert invoker is not None
            peak = 0

            async def watch() -> None:
                nonlocal peak
                deadline = time.monotonic() + 120
                while True:
                    peak = max(peak, invoker.in_flight)
                    if hold and (peak >= min(calls, concurrency) or time.monotonic() > deadline):
                        _touch(marker)  # all sent: let the calls run
                        return
                    await asyncio.sleep(0.005)

            watcher = asyncio.ensure_future(watch())
            t = time.perf_counter()
            results = await ex.map(fn, range(calls), chunksize=1)  # a request per call: memory per call in flight
            seconds = time.perf_counter() - t
            watcher.cancel()
            assert results == list(range(calls))
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"in_flight": peak, "growth": after - before, "seconds": seconds}


# --- the bare aiohttp baseline ---------------------------------------------------------


def _bare_server(port: int, hold: int) -> None:
    """Answer each request with its pickled ``(fn, arg)``'s result, once ``hold`` requests are in."""

    async def main() -> None:
        arrived, everyone = 0, asyncio.Event()

        async def handler(request: web.Request) -> web.Response:
            nonlocal arrived
            _fn, arg = cloudpickle.loads(await request.read())
            if hold and "X-Hold" in request.headers:  # the warm-up is answered at once
                arrived += 1
                if arrived >= hold:
                    everyone.set()
                await everyone.wait()
            return web.Response(body=cloudpickle.dumps(arg))

        app = web.Application()
        app.router.add_post("/", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def _bare(calls: int, concurrency: int) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hold = calls if concurrency > 64 else 0
    cmd = [sys.executable, __file__, "--bare-server", str(port), str(hold)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        return asyncio.run(_bare_job(calls, concurrency, port, hold))
    finally:
        server.kill()
        server.wait()


async def _bare_job(calls: int, concurrency: int, port: int, hold: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}/"
    fn = functools.partial(held, marker=os.devnull)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        sem = asyncio.Semaphore(concurrency)
        in_flight = peak = 0

        async def one(i: int, headers: dict[str, str]) -> Any:
            nonlocal in_flight, peak
            async with sem:
                in_flight += 1
                peak = max(peak, in_flight)
                try:
                    async with session.post(url, data=cloudpickle.dumps((fn, i)), headers=headers) as resp:
                        return cloudpickle.loads(await resp.read())
                finally:
                    in_flight -= 1

        await asyncio.gather(*(one(i, {}) for i in range(200)))  # warm: connections, imports
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t = time.perf_counter()
        results = await asyncio.gather(*(one(i, {"X-Hold": "1"}) for i in range(calls)))
        seconds = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert results == list(range(calls))
    return {"in_flight": peak, "growth": after - before, "seconds": seconds}


def measure(calls: int, concurrency: int, bare: bool = False) -> dict[str, float]:
    mode = "--bare-child" if bare else "--child"
    out = subprocess.run(
        [sys.executable, __file__, mode, str(calls), str(concurrency)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"the job at concurrency {concurrency} failed:\n{out.stderr[-4000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=10_000)
    p.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    p.add_argument("--bare-child", nargs=2, type=int, help=argparse.SUPPRESS)
    p.add_argument("--bare-server", nargs=2, type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(asyncio.run(_job(*a.child))))
        return 0
    if a.bare_child:
        print(json.dumps(_bare(*a.bare_child)))
        return 0
    if a.bare_server:
        _bare_server(*a.bare_server)
        return 0
    print(f"map(held, range({a.calls:,})), the wide job held until all are sent; each row a fresh process", flush=True)
    extra: dict[str, float] = {}
    for who, bare in (("async_ca_exec (local runtime)", False), ("bare aiohttp client", True)):
        rows = [("baseline", measure(a.calls, 64, bare)), ("wide", measure(a.calls, a.concurrency, bare))]
        print(f"{who}:")
        for name, r in rows:
            per = r["growth"] / max(r["in_flight"], 1)
            print(f"  {name:<8} peak in flight {r['in_flight']:>6,.0f}   RSS growth {r['growth'] / 2**20:6.1f} MB   "
                  f"{per / 1024:6.1f} KB per call in flight   ({r['seconds']:.1f} s)")  # fmt: skip
        wide = rows[1][1]
        extra[who] = (wide["growth"] - rows[0][1]["growth"]) / max(wide["in_flight"] - rows[0][1]["in_flight"], 1)
        print(f"  beyond the baseline: {extra[who] / 1024:.1f} KB per extra call in flight", flush=True)
    ratio = extra["async_ca_exec (local runtime)"] / extra["bare aiohttp client"]
    ok = ratio <= TARGET_RATIO
    print(f"async_ca_exec vs bare aiohttp, memory per extra call in flight: {ratio:.2f}x (target <= {TARGET_RATIO}x)  "
          f"{'ok' if ok else 'MISSED'}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
