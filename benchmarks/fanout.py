"""Fan-out throughput on the embedded local runtime, beside its baselines, in one run.

    python benchmarks/fanout.py [--calls 20000] [--repeat 3] [--concurrency 64]

Measures ``map(add7, range(N))`` at chunksize 1 and 100 on the local runtime, next to
``ProcessPoolExecutor(2).map`` on the same inputs and the raw rate of a bare aiohttp server
that unpickles and calls the function per request (the floor of this design: one HTTP
request per call, no signing, no worker processes, no framing). Prints calls/s (best of
``--repeat`` runs) and the ratios the targets are stated in:

    local chunksize 1   >= 50 % of the raw aiohttp floor
    local chunksize 100 >= 25 % of ProcessPoolExecutor's chunksize-100 rate

Exits non-zero if a target is missed (so `nox -s bench` fails loudly). Never run by tests.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import pickle
import socket
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import aiohttp
import cloudpickle
from aiohttp import web

from async_ca_exec import AsyncExecutor


def add7(x: int) -> int:
    return x + 7


# --- the raw floor: aiohttp + cloudpickle, one request per call -------------------------


def _raw_server(port: int, ready: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        fn, arg = pickle.loads(await request.read())
        return web.Response(body=pickle.dumps(fn(arg)))

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


async def _raw_client(port: int, n: int, concurrency: int) -> float:
    url = f"http://127.0.0.1:{port}/"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> Any:
            async with sem, session.post(url, data=cloudpickle.dumps((add7, i))) as resp:
                return pickle.loads(await resp.read())

        t = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(n)))
        dt = time.perf_counter() - t
    assert results == [i + 7 for i in range(n)]
    return n / dt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_raw(n: int, repeat: int, concurrency: int) -> list[float]:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    port = _free_port()
    proc = ctx.Process(target=_raw_server, args=(port, ready), daemon=True)
    proc.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("raw aiohttp server did not start")
        asyncio.run(_raw_client(port, 1000, concurrency))  # warm up
        return [asyncio.run(_raw_client(port, n, concurrency)) for _ in range(repeat)]
    finally:
        proc.terminate()
        proc.join(10)


# --- ProcessPoolExecutor ----------------------------------------------------------------


def bench_ppe(n: int, repeat: int, chunksize: int) -> list[float]:
    rates = []
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(add7, range(1000), chunksize=chunksize))  # warm up
        for _ in range(repeat):
            t = time.perf_counter()
            results = list(pool.map(add7, range(n), chunksize=chunksize))
            rates.append(n / (time.perf_counter() - t))
            assert results == [i + 7 for i in range(n)]
    return rates


# --- this SDK ---------------------------------------------------------------------------


async def _bench_local(n: int, repeat: int, chunksizes: list[int], concurrency: int) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    async with AsyncExecutor(max_concurrency=concurrency) as ex:
        for cs in chunksizes:
            await ex.map(add7, range(1000), chunksize=cs)  # warm up
            rates = []
            for _ in range(repeat):
                t = time.perf_counter()
                results = await ex.map(add7, range(n), chunksize=cs)
                rates.append(n / (time.perf_counter() - t))
                assert results == [i + 7 for i in range(n)]
            out[cs] = rates
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64)
    a = p.parse_args(argv)

    print(
        f"fan-out of add7 over range({a.calls}), best of {a.repeat}; {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}, concurrency {a.concurrency}"
    )
    results: dict[str, list[float]] = {}
    local = asyncio.run(_bench_local(a.calls, a.repeat, [1, 100], a.concurrency))
    results["async_ca_exec local, chunksize 1"] = local[1]
    results["async_ca_exec local, chunksize 100"] = local[100]
    results["ProcessPoolExecutor(2), chunksize 1"] = bench_ppe(a.calls, a.repeat, 1)
    results["ProcessPoolExecutor(2), chunksize 100"] = bench_ppe(a.calls, a.repeat, 100)
    results["raw aiohttp+cloudpickle floor"] = bench_raw(a.calls, a.repeat, a.concurrency)

    width = max(len(k) for k in results)
    print(f"\n{'':<{width}}  {'best calls/s':>13}  {'median':>10}")
    for name, rates in results.items():
        print(f"{name:<{width}}  {max(rates):>13,.0f}  {statistics.median(rates):>10,.0f}")

    best: Callable[[str], float] = lambda k: max(results[k])  # noqa: E731
    checks = [
        ("chunksize 1 vs raw floor", best("async_ca_exec local, chunksize 1") / best("raw aiohttp+cloudpickle floor"), 0.50),
        (
            "chunksize 100 vs ProcessPoolExecutor chunksize 100",
            best("async_ca_exec local, chunksize 100") / best("ProcessPoolExecutor(2), chunksize 100"),
            0.25,
        ),
    ]
    print()
    ok = True
    for name, ratio, target in checks:
        status = "ok" if ratio >= target else "MISSED"
        ok &= ratio >= target
        print(f"{name:<52} {ratio:6.1%}  (target >= {target:.0%})  {status}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
