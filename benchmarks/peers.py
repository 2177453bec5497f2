"""Fan-out throughput of the embedded local runtime beside its peers, all in one run on this machine.

    python benchmarks/peers.py [--calls 20000] [--lithops-calls 500] [--lithops-repeat 1] [--repeat 3] [--concurrency 64]

Measures ``add7`` over ``range(N)`` on:

    async_ca_exec local runtime   chunksize 1, 100 and "auto" (if this version has it)
    ProcessPoolExecutor(cpus)     chunksize 1, and its best of chunksize 100 and 1000
    Lithops localhost backend     map + get_result (it starts a Python process per call: a smaller N
                                  and fewer runs, --lithops-calls and --lithops-repeat)
    Ray local tasks               ray.get([f.remote(x) for x in ...])
    Dask LocalCluster             client.map + client.gather (one process per CPU, 1 thread each)
    raw aiohttp+cloudpickle       the floor of this design (fanout.py's bench_raw)

Everything listens on 127.0.0.1 and every process or cluster started is stopped again, on
error too. A peer that is not installed is printed as such (``nox -s bench`` installs them).
Prints calls/s (best and median of ``--repeat`` runs) and the ratios the targets are stated in:

    local chunksize "auto"   >= 25 % of ProcessPoolExecutor's best rate, >= 2x Ray, >= 50x Lithops localhost
    local chunksize 1        >= 2x Ray, >= 50x Lithops localhost, >= 70 % of the raw floor
    client CPU per call      <= 1.4x the raw floor client's at chunksize 1 (time.process_time() of this process)

Exits non-zero if a target is missed (a target whose peer is missing is skipped). Never run by tests.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from async_ca_exec import AsyncExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fanout import bench_raw  # the raw floor, not copied here

CPUS = os.cpu_count() or 1
NOT_INSTALLED = "not installed (nox -s bench installs it)"
LOCAL1, LOCALAUTO, RAW = (
    "async_ca_exec local, chunksize 1",
    'async_ca_exec local, chunksize "auto"',
    "raw aiohttp+cloudpickle floor",
)
PPE1, PPEBEST = f"ProcessPoolExecutor({CPUS}), chunksize 1", f"ProcessPoolExecutor({CPUS}), best chunksize"
LITHOPS, RAY, DASK = "Lithops localhost", f"Ray local tasks ({CPUS} CPUs)", f"Dask LocalCluster ({CPUS} procs x 1 thread)"


def add7(x: int) -> int:
    return x + 7


@dataclass
class Row:
    calls: int = 0
    rates: list[float] = field(default_factory=list)
    note: str = ""  # why there are no rates


def _timed(n: int, repeat: int, run: Callable[[int], list[Any]]) -> list[float]:
    """calls/s of ``run(n)`` (which returns the results, checked) over ``repeat`` runs."""
    rates = []
    for _ in range(repeat):
        t = time.perf_counter()
        results = run(n)
        rates.append(n / (time.perf_counter() - t))
        assert results == [i + 7 for i in range(n)], "wrong results"
    return rates


def _guard(fn: Callable[[], Row]) -> Row:
    """Run one peer; a peer that fails (not this SDK) becomes a row saying so, not a crash."""
    try:
        return fn()
    except ImportError:
        return Row(note=NOT_INSTALLED)
    except Exception as e:  # noqa: BLE001 - a peer's failure is reported in its row
        first = (str(e).splitlines() or [""])[0]
        return Row(note=f"failed: {type(e).__name__}: {first[:50]}")


# --- this SDK ---------------------------------------------------------------------------


async def _bench_local(n: int, repeat: int, concurrency: int) -> tuple[dict[str, Row], list[float]]:
    """Rows for chunksize 1, 100 and "auto", and the client CPU seconds per call at chunksize 1."""
    rows: dict[str, Row] = {}
    cpu_per_call: list[float] = []
    chunksizes: list[Any] = [1, 100, "auto"]
    async with AsyncExecutor(max_concurrency=concurrency) as ex:
        for cs in chunksizes:
            try:
                await ex.map(add7, range(1000), chunksize=cs)  # warm up
            except (TypeError, ValueError):
                if cs != "auto":
                    raise
                rows[cs] = Row(note='not available (no chunksize="auto" in this version)')
                continue
            rates = []
            for _ in range(repeat):
                c, t = time.process_time(), time.perf_counter()
                results = await ex.map(add7, range(n), chunksize=cs)
                dt, dc = time.perf_counter() - t, time.process_time() - c
                rates.append(n / dt)
                if cs == 1:
                    cpu_per_call.append(dc / n)
                assert results == [i + 7 for i in range(n)]
            rows[cs] = Row(n, rates)
    return rows, cpu_per_call


# --- ProcessPoolExecutor ----------------------------------------------------------------


def bench_ppe(n: int, repeat: int) -> dict[int, Row]:
    with ProcessPoolExecutor(CPUS) as pool:
        list(pool.map(add7, range(1000)))  # warm up (starts the workers)
        return {
            cs: Row(n, _timed(n, repeat, lambda k, cs=cs: list(pool.map(add7, range(k), chunksize=cs)))) for cs in (1, 100, 1000)
        }


# --- peers ------------------------------------------------------------------------------


def bench_lithops(n: int, repeat: int) -> Row:
    import lithops

    logging.getLogger("lithops").setLevel(logging.WARNING)
    config = {
        "lithops": {"backend": "localhost", "storage": "localhost", "log_level": "WARNING"},
        "localhost": {"runtime": sys.executable},  # this interpreter, not whichever "python" is first on PATH
    }
    with lithops.FunctionExecutor(config=config, backend="localhost", storage="localhost", log_level="WARNING") as fexec:
        try:  # leaving the block stops the localhost runner and its worker processes

            def run(k: int) -> list[Any]:
                futures = fexec.map(add7, range(k))
                return list(fexec.get_result(futures))

            run(10)  # warm up (starts the local runner)
            return Row(n, _timed(n, repeat, run))
        finally:
            fexec.clean(clean_cloudobjects=True)


def bench_ray(n: int, repeat: int) -> Row:
    import ray

    options: dict[str, Any] = {"num_cpus": CPUS, "include_dashboard": False, "log_to_driver": False}
    options["_node_ip_address"] = "127.0.0.1"  # keep the GCS, raylet and workers on loopback
    try:
        ray.init(**options, configure_logging=False)
        f = ray.remote(add7)

        def run(k: int) -> list[Any]:
            return list(ray.get([f.remote(x) for x in range(k)]))

        run(1000)  # warm up (starts the worker processes)
        return Row(n, _timed(n, repeat, run))
    finally:
        ray.shutdown()


def bench_dask(n: int, repeat: int) -> Row:
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=CPUS,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.WARNING,
    )
    try:
        with Client(cluster) as client:

            def run(k: int) -> list[Any]:
                futures = client.map(add7, range(k), pure=False)  # pure=False: no reuse of the last run's results
                try:
                    return list(client.gather(futures))
                finally:
                    client.cancel(futures)

            run(1000)  # warm up
            return Row(n, _timed(n, repeat, run))
    finally:
        cluster.close()


RAW_CPU: list[float] = []  # the raw floor client's CPU seconds per call, per run


def bench_raw_floor(n: int, repeat: int, concurrency: int) -> Row:
    runs = bench_raw(n, repeat, concurrency)
    RAW_CPU.extend(c for _, c in runs)
    return Row(n, [r for r, _ in runs])


# --- report -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20_000)
    p.add_argument("--lithops-calls", type=int, default=500, help="N for Lithops localhost (one process per call)")
    p.add_argument("--lithops-repeat", type=int, default=1, help="runs for Lithops localhost (about 5 calls/s on 2 CPUs)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64)
    a = p.parse_args(argv)

    print(
        f"fan-out of add7 over range(N), best and median of the runs; {CPUS} CPUs, "
        f"Python {sys.version.split()[0]}, concurrency {a.concurrency}",
        flush=True,
    )
    rows: dict[str, Row] = {}
    local, cpu_per_call = asyncio.run(_bench_local(a.calls, a.repeat, a.concurrency))
    rows[LOCAL1] = local[1]  # type: ignore[index]
    rows["async_ca_exec local, chunksize 100"] = local[100]  # type: ignore[index]
    rows[LOCALAUTO] = local["auto"]  # type: ignore[index]
    ppe = bench_ppe(a.calls, a.repeat)
    best_cs = max((100, 1000), key=lambda cs: max(ppe[cs].rates))
    rows[PPE1] = ppe[1]
    ppe_best = f"{PPEBEST} ({best_cs})"
    rows[ppe_best] = ppe[best_cs]
    for name, run in (
        (LITHOPS, lambda: bench_lithops(a.lithops_calls, a.lithops_repeat)),
        (RAY, lambda: bench_ray(a.calls, a.repeat)),
        (DASK, lambda: bench_dask(a.calls, a.repeat)),
        (RAW, lambda: bench_raw_floor(a.calls, a.repeat, a.concurrency)),
    ):
        print(f"  {name} ...", flush=True)
        rows[name] = _guard(run)

    width = max(len(k) for k in rows)
    print(f"\n{'':<{width}}  {'N':>7}  {'runs':>4}  {'best calls/s':>13}  {'median':>10}")
    for name, row in rows.items():
        if row.rates:
            top, median = max(row.rates), statistics.median(row.rates)
            print(f"{name:<{width}}  {row.calls:>7,}  {len(row.rates):>4}  {top:>13,.0f}  {median:>10,.0f}")
        else:
            print(f"{name:<{width}}  {'':>7}  {'':>4}  {row.note}")

    def best(k: str) -> float | None:
        return max(rows[k].rates) if rows[k].rates else None

    def ratio(k: str, peer: str, peer_scale: float = 1.0) -> tuple[float | None, str]:
        if best(k) is None:
            return None, f"skipped ({k.split(', ')[-1]} not available)"
        if best(peer) is None:
            why = "peer not installed" if rows[peer].note == NOT_INSTALLED else "peer " + rows[peer].note
            return None, f"skipped ({why})"
        return best(k) / (best(peer) * peer_scale), ""  # type: ignore[operator]

    checks = [  # (name, (ratio, skip reason), target, format)
        ('chunksize "auto" vs ProcessPoolExecutor best', ratio(LOCALAUTO, ppe_best), 0.25, "%"),
        ('chunksize "auto" vs Ray', ratio(LOCALAUTO, RAY), 2.0, "x"),
        ('chunksize "auto" vs Lithops localhost', ratio(LOCALAUTO, LITHOPS), 50.0, "x"),
        ("chunksize 1 vs Ray", ratio(LOCAL1, RAY), 2.0, "x"),
        ("chunksize 1 vs Lithops localhost", ratio(LOCAL1, LITHOPS), 50.0, "x"),
        ("chunksize 1 vs raw floor", ratio(LOCAL1, RAW), 0.70, "%"),
    ]
    print()
    ok = True
    for name, (r, skipped), target, fmt in checks:
        if r is None:
            print(f"{name:<46} {skipped}")
            continue
        hit = r >= target
        ok &= hit
        shown, want = (f"{r:7.1f}x", f"{target:.0f}x") if fmt == "x" else (f"{r:8.1%}", f"{target:.0%}")
        print(f"{name:<46} {shown}  (target >= {want})  {'ok' if hit else 'MISSED'}")
    us = min(cpu_per_call) * 1e6
    if RAW_CPU:
        raw_us = min(RAW_CPU) * 1e6
        hit = us <= 1.4 * raw_us
        ok &= hit
        status = "ok" if hit else "MISSED"
        print(
            f"{'client CPU per call, chunksize 1':<46} {us:6.1f} us = {us / raw_us:.2f}x the raw client's {raw_us:.1f} us"
            f"  (target <= 1.4x)  {status}"
        )
    else:
        print(f"{'client CPU per call, chunksize 1':<46} {us:6.1f} us  (skipped: no raw floor run)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
