"""Long-running reliability figures on the embedded local runtime, beside their baselines.

    python benchmarks/soak.py [--imap-items 1000000] [--map-items 100000] [--chunksize 1]
                              [--flood-calls 20000] [--attackers 2] [--connections 1024]
                              [--repeat 3] [--only memory|flood]

Memory: the client's peak RSS (``ru_maxrss`` of a fresh process, so nothing else counts) for

    imap over --imap-items items     target < 300 MB
    map  of   --map-items  items     target < 1 GB

each next to its same-run baseline: the same process doing the same work over 1,000 items
(the fixed cost of Python, aiohttp and the SDK), and for ``map`` also a process that only
builds the same result list locally (the cost of the results themselves).

Flood: calls/s of ``map(add7, range(--flood-calls))`` with nobody else around (the baseline),
then while attacker processes send the server as many refused requests as they can --
unsigned, signed with a wrong key, stale, tampered, and replays of a captured valid request
-- over fresh and kept-alive connections. Target: at least 50 % of the baseline. Every
attacker answer is checked (401 or 409 "replayed"; a 200 would be a breach and aborts).

Exits non-zero if a target is missed (so `nox -s bench` fails loudly). Never run by tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from async_ca_exec import AsyncExecutor, protocol, serialize


def add7(x: int) -> int:
    return x + 7


# --- memory: each figure from a fresh child process -------------------------------------


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


async def _memory_job(kind: str, n: int, chunksize: int) -> float:
    """Run the job; return the peak RSS before ``job_summary()`` (which sorts the latencies)."""
    if kind == "local-list":
        results = [add7(i) for i in range(n)]
        assert len(results) == n
        return _peak_rss_mb()
    async with AsyncExecutor() as ex:
        if kind == "imap":
            count = total = 0
            async for r in ex.imap(add7, range(n), chunksize=chunksize):
                count += 1
                total += r
            assert count == n and total == n * (n - 1) // 2 + 7 * n, (count, total)
        else:
            results = await ex.map(add7, range(n), chunksize=chunksize)
            assert results == [i + 7 for i in range(n)]
        before_summary = _peak_rss_mb()
        s = ex.job_summary()
        assert s["calls"]["succeeded"] == n and s["calls"]["failed"] == 0, s
        return before_summary


def _child(kind: str, n: int, chunksize: int) -> None:
    t = time.perf_counter()
    before_summary = asyncio.run(_memory_job(kind, n, chunksize))
    print(json.dumps({"rss_mb": _peak_rss_mb(), "before_summary_mb": before_summary, "seconds": time.perf_counter() - t}))


def measure(kind: str, n: int, chunksize: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(n), str(chunksize)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{kind} over {n} items failed:\n{out.stderr[-4000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run_memory(a: argparse.Namespace) -> bool:
    print(f"\nclient peak RSS (chunksize {a.chunksize}); each line is a fresh process")
    rows = [
        ("imap", a.imap_items, 300.0),
        ("map", a.map_items, 1024.0),
    ]
    ok = True
    for kind, n, limit in rows:
        base = measure(kind, 1000, a.chunksize)
        big = measure(kind, n, a.chunksize)
        line = (
            f"  {kind:<4} {n:>9,} items  {big['rss_mb']:7.1f} MB  ({big['seconds']:6.1f} s, "
            f"{n / big['seconds']:,.0f} calls/s; {big['before_summary_mb']:.1f} MB before job_summary())"
            f"   same over 1,000 items {base['rss_mb']:6.1f} MB"
        )
        if kind == "map":
            local = measure("local-list", n, 1)
            line += f"   result list built locally {local['rss_mb']:6.1f} MB"
        status = "ok" if big["rss_mb"] < limit else "MISSED"
        ok &= big["rss_mb"] < limit
        print(f"{line}\n       target < {limit:.0f} MB: {status}")
    return ok


# --- flood ------------------------------------------------------------------------------


def _attacker(url: str, key: bytes, connections: int, stop: Any, counts: Any, ready: Any) -> None:
    """Send refused requests as fast as one process can, and check every answer."""
    import aiohttp

    host_port = url.split("//", 1)[1]
    host, port = host_port.rsplit(":", 1)

    def valid(call_id: str) -> tuple[bytes, dict[str, str]]:
        fn, fn_hash = serialize.dumps_function(add7)
        items = serialize.dumps_items([((1,), {})], call_id)
        body = protocol.encode_invocation(call_id=call_id, n=1, fn=fn, fn_hash=fn_hash, items=items, timeout=30)
        return body, protocol.signed_headers(key, "POST", protocol.INVOKE_PATH, call_id, body)

    captured_body, captured_headers = valid(f"captured-{os.getpid()}")
    wrong_key_headers = protocol.signed_headers(b"x" * 43, "POST", protocol.INVOKE_PATH, "wk", captured_body)
    an_hour_ago = time.time() - 3600
    stale_headers = protocol.signed_headers(key, "POST", protocol.INVOKE_PATH, "stale", captured_body, now=an_hour_ago)
    tampered = captured_body[:-1] + bytes([captured_body[-1] ^ 1])
    attacks: list[tuple[bytes, dict[str, str]]] = [
        (captured_body, {"Content-Type": "application/octet-stream"}),  # unsigned
        (captured_body, wrong_key_headers),
        (captured_body, stale_headers),
        (tampered, captured_headers),
        (captured_body, captured_headers),  # a replay (the first copy is sent below, once)
    ]

    async def raw_flood() -> None:
        # Fresh connection per request, the way a refused client is treated (the server closes).
        reqs = []
        for body, headers in attacks:
            head = f"POST {protocol.INVOKE_PATH} HTTP/1.1\r\nHost: {host_port}\r\nContent-Length: {len(body)}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items() if k.lower() != "content-length")
            reqs.append(head.encode() + b"\r\n" + body)
        i = 0
        while not stop.is_set():
            req = reqs[i % len(reqs)]
            i += 1
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(req)
                status_line = await reader.readline()
                writer.close()
            except OSError:
                counts[2] += 1
                continue
            status = int(status_line.split()[1]) if status_line else 0
            if status == 200:
                counts[3] += 1  # a breach: reported and fails the run
            counts[0] += 1

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            # The "captured" request is a real one: it runs once, and every later copy is refused.
            async with s.post(url + protocol.INVOKE_PATH, data=captured_body, headers=captured_headers) as r:
                assert r.status == 200, r.status
                await r.read()
        ready.set()
        await asyncio.gather(*(raw_flood() for _ in range(connections)))

    asyncio.run(main())


async def _legit_rate(ex: AsyncExecutor, n: int) -> float:
    t = time.perf_counter()
    results = await ex.map(add7, range(n), chunksize=1)  # a request per call: what a flood competes with
    dt = time.perf_counter() - t
    assert results == [i + 7 for i in range(n)]
    return n / dt


def run_flood(a: argparse.Namespace) -> bool:
    async def run() -> tuple[list[float], list[float], list[int], float]:
        async with AsyncExecutor() as ex:
            await ex.map(add7, range(2000), chunksize=1)  # warm up
            endpoint = ex.endpoint
            assert endpoint is not None
            base = [await _legit_rate(ex, a.flood_calls) for _ in range(a.repeat)]

            ctx = multiprocessing.get_context("spawn")
            stop, counts = ctx.Event(), ctx.Array("q", 4)
            readies = [ctx.Event() for _ in range(a.attackers)]
            procs = [ctx.Process(target=_attacker, args=(endpoint.url, endpoint.key, a.connections, stop, counts, r), daemon=True)
                     for r in readies]  # fmt: skip
            for p in procs:
                p.start()
            try:
                for r in readies:
                    if not await asyncio.to_thread(r.wait, 60):
                        raise RuntimeError("an attacker process did not start")
                await asyncio.sleep(2)  # let the flood reach full speed
                before, t0 = counts[0], time.perf_counter()
                flooded = [await _legit_rate(ex, a.flood_calls) for _ in range(a.repeat)]
                attack_rate = (counts[0] - before) / (time.perf_counter() - t0)
            finally:
                stop.set()
                for p in procs:
                    p.join(10)
                    if p.is_alive():
                        p.kill()
                        p.join()
            return base, flooded, list(counts), attack_rate

    base, flooded, counts, attack_rate = asyncio.run(run())
    ratio = max(flooded) / max(base)
    print(f"\nflood: map(add7, range({a.flood_calls:,})), chunksize 1, best of {a.repeat}")
    print(f"  alone                 {max(base):>9,.0f} calls/s (median {statistics.median(base):,.0f})")
    print(f"  under flood           {max(flooded):>9,.0f} calls/s (median {statistics.median(flooded):,.0f})")
    print(f"  attackers: {a.attackers} processes x {a.connections} connections, {attack_rate:,.0f} refused requests/s answered "
          f"({counts[0]:,} in all, {counts[2]:,} connection errors, {counts[3]} accepted)")  # fmt: skip
    ok = ratio >= 0.5 and counts[3] == 0
    print(f"  under flood vs alone  {ratio:6.1%}  (target >= 50 %, no attack accepted)  {'ok' if ok else 'MISSED'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--imap-items", type=int, default=1_000_000)
    p.add_argument("--map-items", type=int, default=100_000)
    p.add_argument("--chunksize", type=int, default=1)
    p.add_argument("--flood-calls", type=int, default=20_000)
    p.add_argument("--attackers", type=int, default=2)
    p.add_argument("--connections", type=int, default=1024, help="concurrent connections per attacker")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", choices=["memory", "flood"])
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(a.child[0], int(a.child[1]), int(a.child[2]))
        return 0
    print(f"soak on {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    ok = True
    if a.only in (None, "memory"):
        ok &= run_memory(a)
    if a.only in (None, "flood"):
        ok &= run_flood(a)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
