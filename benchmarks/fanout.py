"""Fan-out throughput on the embedded local runtime, beside its baselines, in one run.

    python benchmarks/fanout.py [--calls 20000] [--repeat 3] [--concurrency 64 1000]

Measures ``map(add7, range(N))`` at chunksize 1 (at each ``--concurrency``) and 100 on the
local runtime, next to ``ProcessPoolExecutor(2).map`` on the same inputs and the raw floor of
this design: a bare aiohttp server that unpickles and calls the function per request, driven
by a bare aiohttp client (``ClientSession.post`` per call, as its docs show it; no signing, no
worker processes, no framing). Prints calls/s (best of ``--repeat`` runs), the client's CPU
per call (``time.process_time()`` of this process, which runs the client only: replicas and
the raw server are other processes) and the ratios the targets are stated in:

    local chunksize 1     >= 70 % of the raw floor's calls/s, at each concurrency
    client CPU per call   <= 1.4x the raw floor client's, at each concurrency
    local chunksize 100   >= 25 % of ProcessPoolExecutor's chunksize-100 rate

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


async def _raw_client(port: int, n: int, concurrency: int) -> tuple[float, float]:
    """(calls/s, client CPU seconds per call)."""
    url = f"http://127.0.0.1:{port}/"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> Any:
            async with sem, session.post(url, data=cloudpickle.dumps((add7, i))) as resp:
                return pickle.loads(await resp.read())

        c, t = time.process_time(), time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(n)))
        dt, dc = time.perf_counter() - t, time.process_time() - c
    assert results == [i + 7 for i in range(n)]
    return n / dt, dc / n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_raw(n: int, repeat: int, concurrency: int) -> list[tuple[float, float]]:
    """``repeat`` runs of the raw floor: (calls/s, client CPU seconds per call) each."""
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


async def bench_local(n: int, repeat: int, chunksizes: list[Any], concurrency: int) -> dict[Any, list[tuple[float, float]]]:
    """Per chunksize, ``repeat`` runs of the SDK: (calls/s, client CPU seconds per call) each."""
    out: dict[Any, list[tuple[float, float]]] = {}
    async with AsyncExecutor(max_concurrency=concurrency) as ex:
        for cs in chunksizes:
            await ex.map(add7, range(min(n, 5 * concurrency, 5000)), chunksize=cs)  # warm up (connections too)
            runs = []
            for _ in range(repeat):
                c, t = time.process_time(), time.perf_counter()
                results = await ex.map(add7, range(n), chunksize=cs)
                dt, dc = time.perf_counter() - t, time.process_time() - c
                runs.append((n / dt, dc / n))
                assert results == [i + 7 for i in range(n)]
            out[cs] = runs
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--concurrency", type=int, nargs="+", default=[64, 1000])
    a = p.parse_args(argv)

    print(
        f"fan-out of add7 over range({a.calls}), best of {a.repeat}; {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, concurrency {a.concurrency}",
        flush=True,
    )
    runs: dict[str, list[tuple[float, float]]] = {}
    checks: list[tuple[str, float, float, str]] = []  # (name, value, target, ">=" or "<=")
    for conc in a.concurrency:
        sdk, raw = f"async_ca_exec local, chunksize 1, concurrency {conc}", f"raw aiohttp floor, concurrency {conc}"
        runs[sdk] = asyncio.run(bench_local(a.calls, a.repeat, [1], conc))[1]
        runs[raw] = bench_raw(a.calls, a.repeat, conc)
        rate, cpu = (lambda k: max(r for r, _ in runs[k])), (lambda k: min(c for _, c in runs[k]))
        checks.append((f"chunksize 1 vs raw floor, concurrency {conc}", rate(sdk) / rate(raw), 0.70, ">="))
        checks.append((f"client CPU per call vs raw client, concurrency {conc}", cpu(sdk) / cpu(raw), 1.4, "<="))
    cs100 = f"async_ca_exec local, chunksize 100, concurrency {a.concurrency[0]}"
    runs[cs100] = asyncio.run(bench_local(a.calls, a.repeat, [100], a.concurrency[0]))[100]
    ppe1, ppe100 = "ProcessPoolExecutor(2), chunksize 1", "ProcessPoolExecutor(2), chunksize 100"
    runs[ppe1] = [(r, float("nan")) for r in bench_ppe(a.calls, a.repeat, 1)]
    runs[ppe100] = [(r, float("nan")) for r in bench_ppe(a.calls, a.repeat, 100)]
    top100 = max(r for r, _ in runs[cs100]) / max(r for r, _ in runs[ppe100])
    checks.append(("chunksize 100 vs ProcessPoolExecutor chunksize 100", top100, 0.25, ">="))

    width = max(len(k) for k in runs)
    print(f"\n{'':<{width}}  {'best calls/s':>13}  {'median':>10}  {'client CPU us/call':>18}")
    for name, rs in runs.items():
        rates, cpus = [r for r, _ in rs], [c for _, c in rs]
        cpu_us = "" if cpus[0] != cpus[0] else f"{min(cpus) * 1e6:18.1f}"
        print(f"{name:<{width}}  {max(rates):>13,.0f}  {statistics.median(rates):>10,.0f}  {cpu_us}")
    print("(client CPU: the least of the runs, this process only)\n")
    ok = True
    for name, value, target, way in checks:
        hit = value >= target if way == ">=" else value <= target
        ok &= hit
        shown = f"{value:6.1%}" if way == ">=" else f"{value:5.2f}x"
        want = f"{target:.0%}" if way == ">=" else f"{target:.1f}x"
        print(f"{name:<56} {shown}  (target {way} {want})  {'ok' if hit else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
