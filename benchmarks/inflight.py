"""Client memory per call in flight, on the embedded local runtime.

    python benchmarks/inflight.py [--calls 10000] [--concurrency 10000]

Runs ``map`` over ``--calls`` items with ``max_concurrency`` set to ``--concurrency``, of a
function that holds its worker until every request of the job has been sent (it waits for a
marker file the client creates then; the replica queues the calls its workers cannot run
yet), so that all ``--calls`` are in flight at once; and beside it the same job at concurrency
64 (the baseline, never held). Each in a fresh process: prints the peak number of requests in
flight, the client's peak RSS growth over the job, and that growth per call in flight.
Target: at most 5 KB per call in flight. Exits non-zero if missed. Never run by tests.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from async_ca_exec import AsyncExecutor

TARGET_BYTES = 5 * 1024


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


def measure(calls: int, concurrency: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(calls), str(concurrency)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"the job at concurrency {concurrency} failed:\n{out.stderr[-4000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=10_000)
    p.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(asyncio.run(_job(*a.child))))
        return 0
    rows = [("baseline", measure(a.calls, 64)), ("wide", measure(a.calls, a.concurrency))]
    print(f"map(held, range({a.calls:,})) on the local runtime, the wide job held until all are sent; each row a fresh process")
    for name, r in rows:
        per = r["growth"] / max(r["in_flight"], 1)
        print(f"  {name:<8} peak in flight {r['in_flight']:>6,.0f}   RSS growth {r['growth'] / 2**20:6.1f} MB   "
              f"{per / 1024:6.1f} KB per call in flight   ({r['seconds']:.1f} s)")  # fmt: skip
    wide = rows[1][1]
    extra = (wide["growth"] - rows[0][1]["growth"]) / max(wide["in_flight"] - rows[0][1]["in_flight"], 1)
    ok = extra <= TARGET_BYTES
    print(f"  beyond the baseline: {extra / 1024:.1f} KB per extra call in flight (target <= 5 KB)  {'ok' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
