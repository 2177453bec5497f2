"""Where the client's CPU goes per call: CPU us per call, and a cProfile of the same job.

    python benchmarks/client_profile.py [--calls 20000] [--concurrency 64] [--chunksize 1] [--top 20]

Runs ``map(add7, range(--calls))`` on the embedded local runtime twice in this process (after
a warm-up): once plain, for the client's CPU time per call (``time.process_time()``; the
replica and its workers are other processes), and once under cProfile, whose table says where
that time goes: the functions with the most time of their own, and the same time summed by
area (the SDK's own code, asyncio, socket system calls, pickling, hashing, the rest). cProfile
slows Python code more than C code, so read the areas as shares, next to the plain figure.
Beside it, the raw aiohttp floor's client (fanout.py's bare aiohttp client and server) at the
same concurrency. Target: at chunksize 1, at most 1.4x the raw client's CPU per call (what the
SDK adds on top of aiohttp: signing, framing, stats, futures). For a sampling profile
of a running job instead, ``py-spy record -p <pid> -f raw`` works on any of these processes.

Exits non-zero if the target is missed (so `nox -s bench` fails loudly). Never run by tests.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import time
from typing import Any

from async_ca_exec import AsyncExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fanout import bench_raw  # the raw floor, not copied here

TARGET_RATIO = 1.4


def add7(x: int) -> int:
    return x + 7


#: (area, test on a profile entry's (file, line, function name)), first match wins.
AREAS: list[tuple[str, Any]] = [
    ("socket system calls", lambda f, n: f == "~" and any(s in n for s in ("send", "recv", "poll", "socket", "connect"))),
    ("pickling", lambda f, n: "pickle" in f or (f == "~" and ("pickle" in n or "dumps" in n or "loads" in n))),
    ("hashing, HMAC", lambda f, n: "hmac" in f or "hashlib" in f or (f == "~" and ("sha256" in n or "digest" in n))),
    ("async_ca_exec (the SDK)", lambda f, n: f"{os.sep}async_ca_exec{os.sep}" in f),
    (
        "aiohttp (its Python code)",
        lambda f, n: f"{os.sep}aiohttp{os.sep}" in f or f"{os.sep}multidict{os.sep}" in f or f"{os.sep}yarl{os.sep}" in f,
    ),
    ("garbage collection", lambda f, n: f == "~" and "gc" in n.split(".")[-1]),
    ("asyncio event loop", lambda f, n: f"{os.sep}asyncio{os.sep}" in f or "selectors" in f),
]


def area_of(file: str, name: str) -> str:
    for area, test in AREAS:
        if test(file, name):
            return area
    return "other (builtins, json, struct, ...)"


async def run(calls: int, concurrency: int, chunksize: int, profiler: cProfile.Profile | None) -> float:
    async with AsyncExecutor(max_concurrency=concurrency, progress=False) as ex:
        await ex.map(add7, range(2000), chunksize=chunksize)  # warm: workers, connections, imports
        cpu = time.process_time()
        if profiler is not None:
            profiler.enable()
        results = await ex.map(add7, range(calls), chunksize=chunksize)
        if profiler is not None:
            profiler.disable()
        cpu = time.process_time() - cpu
        assert results == [i + 7 for i in range(calls)]
    return cpu / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--chunksize", type=int, default=1)
    p.add_argument("--top", type=int, default=20)
    a = p.parse_args(argv)

    plain = asyncio.run(run(a.calls, a.concurrency, a.chunksize, None))
    profiler = cProfile.Profile()
    profiled = asyncio.run(run(a.calls, a.concurrency, a.chunksize, profiler))
    stats = pstats.Stats(profiler)
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in entries.values()) or 1.0

    print(f"client CPU per call: map(add7, range({a.calls:,})), chunksize {a.chunksize}, concurrency {a.concurrency}, "
          f"local runtime; {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")  # fmt: skip
    print(f"  plain run          {plain:7.1f} us per call")
    print(f"  under cProfile     {profiled:7.1f} us per call (the profiler's own cost included)\n")

    areas: dict[str, float] = {}
    for (file, _line, name), (_cc, _nc, tt, _ct, _callers) in entries.items():
        area = area_of(file, name)
        areas[area] = areas.get(area, 0.0) + tt
    print("time of its own, by area                    share   of the plain run's us/call")
    for area, tt in sorted(areas.items(), key=lambda kv: -kv[1]):
        print(f"  {area:<40} {tt / total:6.1%}   {plain * tt / total:6.1f}")

    print(f"\nthe {a.top} functions with the most time of their own   share   calls per call")
    rows = sorted(entries.items(), key=lambda kv: -kv[1][2])[: a.top]
    for (file, line, name), (_cc, nc, tt, _ct, _callers) in rows:
        where = name if file == "~" else f"{name} ({os.path.basename(file)}:{line})"
        print(f"  {where[:58]:<58} {tt / total:6.1%}   {nc / a.calls:6.2f}")

    raw = min(c for _, c in bench_raw(a.calls, 2, a.concurrency)) * 1e6
    ratio = plain / raw
    ok = ratio <= TARGET_RATIO or a.chunksize != 1
    print(f"\nclient CPU per call {plain:.1f} us = {ratio:.2f}x the raw aiohttp client's {raw:.1f} us "
          f"(target <= {TARGET_RATIO}x at chunksize 1)  {'ok' if ok else 'MISSED'}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
