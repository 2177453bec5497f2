"""A "cloud in a box": the local runtime behind a proxy that behaves like the ACA ingress.

    python benchmarks/cloud_sim.py [--calls 20000] [--concurrency 1000] [--latency 50 [30 80 ...]]
                                   [--replicas 2] [--workers 1] [--cold-start 2] [--control-delay 1]
                                   [--concurrent-requests W]

Everything runs on 127.0.0.1. ``--replicas`` copies of the real server (the embedded local
runtime, one replica of ``--workers`` worker processes each, on its own port, all sharing one
signing key) stand behind a proxy, in its own (spawned) process so that its CPU is not the
client's. The proxy stands in for the Container Apps ingress and its scaler:

- every request waits ``--latency`` ms before it is forwarded and its response waits as long
  again before it is passed back (streamed, chunk by chunk, so heartbeats still flow);
- it starts with one active replica; when the requests in flight exceed
  ``--concurrent-requests`` (default ``--workers``) x active replicas, one more replica is
  activated ``--control-delay`` s later, up to ``--replicas``;
- requests go round-robin over the active replicas. The first replica is started by the first
  request (a cold start of ``--cold-start`` s, which every request routed to it waits for);
  a scaled-out replica is started when the scaler decides and joins the rotation once its
  cold start is over, as the ingress waits for a replica's readiness probe (with
  ``--route-to-cold``, it joins at once and its first request starts it and waits).

The client is an ``AsyncExecutor(max_concurrency=--concurrency)`` whose runtime is swapped for
these replicas behind the proxy (an internal: ``create_runtime`` is patched for the run). Per
latency it runs ``map(add7, range(--calls))`` at chunksize 1 (without and with ``prewarm=True``,
which here starts every replica's cold start at once, as a raised minReplicas would) and at
chunksize "auto", each on
a fresh executor and fresh (cold) replicas, and prints the job's wall time next to

    ideal = cold start + ceil(calls / concurrency) x 2 x latency

(the network floor: one cold start, then waves of ``concurrency`` calls, each wave one round
trip; compute, scale-out and the local machine's limits cost nothing), and the client
process's CPU time per call (``time.process_time()``; the proxy and the servers are other
processes). Targets, on the chunksize 1 rows:

    wall time / ideal          <= 1.3
    client CPU per call        <= 100 us

With ``--slow-replica MS`` (e.g. ``--replicas 10 --start-active 10 --cold-start 0 --calls 5000
--concurrency 200 --slow-replica 2000``) replica 0 answers MS ms late, and the job runs at
chunksize 1 without and with straggler hedging (``map(..., hedge=--hedge)``); the target is
that with hedging no call waits for the slow replica (the slowest call takes less than MS).

With ``--work MS`` (e.g. ``--replicas 6 --workers 4 --concurrent-requests 4 --work 100 --calls
2000 --concurrency 48``) each call sleeps MS ms on its worker, so the job's pace is set by how
many replicas are up; it runs at chunksize 1 without and with ``prewarm=True``.

Exits non-zero if a target is missed (so `nox -s bench` fails loudly). Never run by tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import resource
import socket
import sys
import time
import types
from typing import Any
from unittest import mock

import aiohttp

from async_ca_exec import AsyncExecutor, wire
from async_ca_exec import executor as executor_module
from async_ca_exec.runtimes import create_runtime
from async_ca_exec.runtimes import local as local_module


def add7(x: int) -> int:
    return x + 7


def slow_add7(x: int, seconds: float) -> int:
    """A call that takes ``seconds`` of a worker (sleeping: the CPU stays free for the rest)."""
    time.sleep(seconds)
    return x + 7


# --- the ingress: a proxy process -------------------------------------------------------

SIM = "/_sim"  # the proxy's own paths (reset, stats); everything else is forwarded
_HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"}


@dataclasses.dataclass
class Settings:
    upstreams: list[str]
    latency: float
    cold_start: float
    control_delay: float
    concurrent_requests: int
    route_to_cold: bool
    start_active: int = 1
    slow: float = 0.0  # replica 0 answers this many seconds late (a slow replica)


class Ingress:
    """Latency both ways, cold starts, and a scaler on requests in flight (in the proxy process)."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.pools: list[wire.Pool] = []
        self.reset()

    def reset(self) -> None:
        self.t0 = time.monotonic()
        self.active = max(1, min(self.s.start_active, len(self.s.upstreams)))
        self.scaling = False
        self.rr = 0
        self.inflight = 0
        self.peak_inflight = 0
        self.ready: list[asyncio.Event | None] = [None] * len(self.s.upstreams)
        self.routed = [0] * len(self.s.upstreams)
        self.events: list[str] = []

    def _note(self, what: str) -> None:
        self.events.append(f"{time.monotonic() - self.t0:.2f}s {what}")

    def _maybe_scale(self) -> None:
        if self.scaling or self.active >= len(self.s.upstreams):
            return
        if self.inflight > self.s.concurrent_requests * self.active:
            self.scaling = True
            asyncio.get_running_loop().call_later(self.s.control_delay, self._scale_out)

    def _scale_out(self) -> None:
        i = self.active
        if i >= len(self.s.upstreams) or self.ready[i] is not None:  # all there, or already starting (pre-warmed)
            self.scaling = False
            return
        self._note(f"replica {i} started ({self.inflight} requests in flight)")
        if self.s.route_to_cold:  # routed to at once; its first request starts it and waits
            self._join(i)
            return
        ev = self.ready[i] = asyncio.Event()  # started now, routed to once ready (a readiness probe)
        ev.set()
        asyncio.get_running_loop().call_later(self.s.cold_start, self._join, i)

    def warm(self, n: int) -> None:
        """Pre-warming (minReplicas raised): start the cold starts of replicas up to ``n`` at once."""
        loop = asyncio.get_running_loop()
        self._note(f"warm to {n} replicas")
        for i in range(min(n, len(self.s.upstreams))):
            if self.ready[i] is None:
                ev = self.ready[i] = asyncio.Event()
                loop.call_later(self.s.cold_start, ev.set)
                if i >= self.active:
                    loop.call_later(self.s.cold_start, self._join, i)

    def _join(self, i: int) -> None:
        self.scaling = False
        if i < self.active:
            return
        self.active = i + 1
        self._note(f"replica {i} in rotation")
        self._maybe_scale()

    async def _route(self) -> int:
        i = self.rr % self.active
        self.rr += 1
        self.routed[i] += 1
        ev = self.ready[i]
        if ev is None:
            ev = self.ready[i] = asyncio.Event()
            self._note(f"replica {i} cold start")
            asyncio.get_running_loop().call_later(self.s.cold_start, ev.set)
        if not ev.is_set():
            await ev.wait()
        return i

    async def serve(self, down: _Downstream, method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytes) -> None:
        path = target.decode("latin-1")
        if path.startswith(SIM):
            down.reply(200, json.dumps(self._sim(path, body)).encode())
            return
        self.inflight += 1
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        try:
            self._maybe_scale()
            await asyncio.sleep(self.s.latency)  # the way in
            i = await self._route()
            await self._forward(down, i, method, target, headers, body, self.s.slow if i == 0 else 0.0)
        finally:
            self.inflight -= 1

    def _sim(self, path: str, body: bytes) -> dict[str, Any]:
        if path == f"{SIM}/reset":
            self.reset()
        elif path == f"{SIM}/warm":
            self.warm(int(json.loads(body)["n"]))
        elif path == f"{SIM}/stats":
            return {"active": self.active, "routed": self.routed, "peak_inflight": self.peak_inflight, "events": self.events}
        return {}

    async def _forward(
        self, down: _Downstream, i: int, method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytes, slow: float
    ) -> None:
        loop = asyncio.get_running_loop()
        pool = self.pools[i]
        conn = await pool.acquire()
        reuse = False
        try:
            fields = b"".join([k + b": " + v + b"\r\n" for k, v in headers.items() if k.decode() not in _HOP_BY_HOP])
            head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n" % (
                method,
                target,
                pool.authority.encode(),
                fields,
                len(body),
            )
            conn.send(head, body, None)
            up = await conn.read_head()
            out = b"HTTP/1.1 %d X\r\n" % up.status + b"".join(
                b"%s: %s\r\n" % (name.encode(), up.headers[name].encode())
                for name in ("content-type", "x-acx-replica", "retry-after")
                if name in up.headers
            )
            if up.content_length is not None:
                data = await up.read()
                await asyncio.sleep(self.s.latency + slow)  # the way back
                down.write(out + b"Content-Length: %d\r\n\r\n" % len(data) + data)
            else:
                first = True
                while True:
                    # A chunk that had to be waited for has just arrived and waits the latency;
                    # one already buffered arrived during the previous wait (late enough already).
                    asked = loop.time()
                    chunk = await up.read_some(1 << 16)
                    if not chunk:
                        break
                    if first or loop.time() - asked > 0.001:
                        await asyncio.sleep(self.s.latency + (slow if first else 0.0))
                    if first:
                        down.write(out + b"Transfer-Encoding: chunked\r\n\r\n")
                        first = False
                    down.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                if first:
                    await asyncio.sleep(self.s.latency + slow)
                    down.write(out + b"Transfer-Encoding: chunked\r\n\r\n")
                down.write(b"0\r\n\r\n")
            reuse = up.keep_alive
        except wire.WireError:
            down.abort()  # the replica went away: so does the answer
        finally:
            pool.release(conn, reuse=reuse)


class _Downstream(asyncio.Protocol):
    """One client connection to the ingress: requests one at a time (as the SDK sends them),
    each served by a task that is cancelled if the client goes (so is the upstream request)."""

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.task is None:
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.task is not None:
            self.task.cancel()

    def _next(self) -> None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = bytes(buf[:end]).split(b"\r\n")
        method, target, _version = lines[0].split(b" ", 2)
        headers: dict[bytes, bytes] = {}
        for raw in lines[1:]:
            name, _, value = raw.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.pop(b"content-length", b"0"))
        if len(buf) < end + 4 + length:
            return
        body = bytes(buf[end + 4 : end + 4 + length])
        del buf[: end + 4 + length]
        self.task = asyncio.get_running_loop().create_task(self.ingress.serve(self, method, target, headers, body))
        self.task.add_done_callback(self._served)

    def _served(self, _task: asyncio.Task[None]) -> None:
        self.task = None
        if not self.closed and self.buf:
            self._next()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def reply(self, status: int, body: bytes) -> None:
        self.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _proxy_main(settings: Settings, conn: Any) -> None:
    async def main() -> None:
        ingress = Ingress(settings)
        ingress.pools = [wire.Pool(url) for url in settings.upstreams]
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = await loop.create_server(lambda: _Downstream(ingress), sock=sock, backlog=4096)
        conn.send(sock.getsockname()[1])
        try:
            await asyncio.Event().wait()
        finally:
            server.close()
            for pool in ingress.pools:
                await pool.aclose()

    _raise_nofile()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- the runtime the executor sees: replicas behind the proxy ----------------------------

_PROXIES: list[Any] = []  # every proxy process started, so main() can stop them on any error


class SimCloudRuntime:
    """``replicas`` local runtimes of one replica each (one shared key), behind an Ingress process."""

    name = "local"

    def __init__(self, config: Any, sim: dict[str, Any], **kw: Any) -> None:
        self.sim = sim
        self.inner = []
        for _ in range(sim["replicas"]):
            rt = create_runtime(config, **kw)
            rt.replicas = 1  # each on its own port, so the proxy can route to it
            self.inner.append(rt)
        self.proxy: Any = None
        self.url = ""

    @property
    def pids(self) -> list[int]:
        return [pid for rt in self.inner for pid in rt.pids]

    def replicas_for(self, requests: int) -> int:
        return min(len(self.inner), math.ceil(requests / self.sim["concurrent_requests"]))

    async def warm(self, replicas: int, *, lease: float) -> int:
        """As the Azure runtime raises minReplicas: the ingress starts that many replicas now."""
        while not self.url:  # noqa: ASYNC110 - called as the executor starts: one look per 10 ms
            await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as s, s.post(f"{self.url}{SIM}/warm", json={"n": replicas}) as r:
            r.raise_for_status()
        return replicas

    async def cool(self) -> None:
        pass

    async def start(self) -> Any:
        key = os.urandom(24).hex()
        try:
            with mock.patch.object(local_module, "secrets", types.SimpleNamespace(token_urlsafe=lambda n=None: key)):
                endpoints = [await rt.start() for rt in self.inner]
            settings = Settings(
                upstreams=[ep.url for ep in endpoints],
                latency=self.sim["latency"],
                cold_start=self.sim["cold_start"],
                control_delay=self.sim["control_delay"],
                concurrent_requests=self.sim["concurrent_requests"],
                route_to_cold=self.sim["route_to_cold"],
                start_active=self.sim["start_active"],
                slow=self.sim["slow"],
            )
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            self.proxy = ctx.Process(target=_proxy_main, args=(settings, child), daemon=True, name="cloud-sim-ingress")
            self.proxy.start()
            _PROXIES.append(self.proxy)
            if not await asyncio.to_thread(parent.poll, 60):
                raise RuntimeError("the ingress proxy did not start")
            self.url = f"http://127.0.0.1:{parent.recv()}"
        except BaseException:
            await self.aclose()
            raise
        return dataclasses.replace(endpoints[0], url=self.url)

    async def aclose(self) -> None:
        if self.proxy is not None:
            await asyncio.to_thread(_stop_process, self.proxy)
        for rt in self.inner:
            await rt.aclose()


def _stop_process(proc: Any) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(10)


# --- one row ----------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    latency_ms: float
    chunksize: int | str
    hedge: float | bool = False
    slow: bool = True
    prewarm: bool = False
    wall: float = math.nan
    cpu_us: float = math.nan
    #: CPU per call of the other processes on this machine: replica servers, their workers, the proxy.
    others_us: dict[str, float] = dataclasses.field(default_factory=dict)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str = ""


async def run_row(
    a: argparse.Namespace,
    latency_ms: float,
    chunksize: int | str,
    hedge: float | bool = False,
    slow: bool = True,
    prewarm: bool = False,
) -> Row:
    row = Row(latency_ms, chunksize, hedge, slow, prewarm)
    sim = {
        "replicas": a.replicas,
        "latency": latency_ms / 1000,
        "cold_start": a.cold_start,
        "control_delay": a.control_delay,
        "concurrent_requests": a.concurrent_requests or a.workers,
        "route_to_cold": a.route_to_cold,
        "start_active": a.start_active,
        "slow": a.slow_replica / 1000 if slow else 0.0,
    }
    config = {"localhost": {"replicas": a.replicas, "worker_processes": a.workers}}
    factory = lambda config, **kw: SimCloudRuntime(config, sim, **kw)  # noqa: E731
    with mock.patch.object(executor_module, "create_runtime", factory):
        async with AsyncExecutor(config=config, max_concurrency=a.concurrency) as ex:
            await ex.map(add7, range(1), chunksize=1)  # start the runtime (outside the timed job)
            rt = ex.runtime
            assert isinstance(rt, SimCloudRuntime)
            async with aiohttp.ClientSession() as s:
                async with s.post(f"{rt.url}{SIM}/reset") as r:
                    r.raise_for_status()
                procs = _process_groups(rt)
                before = {k: sum(map(_cpu_seconds, pids)) for k, pids in procs.items()}
                cpu, t = time.process_time(), time.perf_counter()
                try:
                    fn = functools.partial(slow_add7, seconds=a.work / 1000) if a.work else add7
                    results = await ex.map(fn, range(a.calls), chunksize=chunksize, hedge=hedge, prewarm=prewarm)
                except (TypeError, ValueError) as exc:  # chunksize="auto" may not exist yet
                    row.error = f"{type(exc).__name__}: {exc}"[:80]
                    return row
                row.wall = time.perf_counter() - t
                row.cpu_us = (time.process_time() - cpu) / a.calls * 1e6
                row.others_us = {k: (sum(map(_cpu_seconds, pids)) - before[k]) / a.calls * 1e6 for k, pids in procs.items()}
                assert results == [i + 7 for i in range(a.calls)]
                async with s.get(f"{rt.url}{SIM}/stats") as r:
                    row.stats = await r.json()
                summary = ex.job_summary()
                row.stats["latency"] = summary["latency_seconds"]
                row.stats["hedges"] = summary["hedges"]
                # Each call's time on the wire: from its request's first send to its answer.
                calls = ex._stats.rows
                wire = sorted(r - s for s, r in zip(calls.sent, calls.received, strict=True))
                row.stats["wire"] = {"p50": wire[len(wire) // 2], "p99": wire[int(0.99 * len(wire))], "max": wire[-1]}
    return row


def _cpu_seconds(pid: int) -> float:
    """A process's CPU time (user + system), from /proc; NaN where there is no /proc (or it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _process_groups(rt: SimCloudRuntime) -> dict[str, list[int]]:
    """The machine's other processes in a run: replica servers, their worker processes, the proxy.

    Taken after the first call (every replica is started then; the scaler only routes to them).
    A worker replaced during the job is not counted (none is, for add7)."""
    servers = rt.pids
    return {
        "servers": servers,
        "workers": [c for pid in servers for c in _children(pid)],
        "proxy": [rt.proxy.pid] if rt.proxy is not None else [],
    }


def ideal_seconds(a: argparse.Namespace, latency_ms: float) -> float:
    return a.cold_start + math.ceil(a.calls / a.concurrency) * 2 * latency_ms / 1000


def hedging(a: argparse.Namespace) -> int:
    """One slow replica among ``--replicas``: the same job without and with hedging."""
    print(
        f"cloud in a box, one slow replica: map(add7, range({a.calls:,})), max_concurrency {a.concurrency:,}, "
        f"{a.replicas} replicas x {a.workers} workers ({a.start_active} in rotation from the start), replica 0 answers "
        f"{a.slow_replica:g} ms late; {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    )
    rows: list[Row] = []
    try:
        for latency in a.latency:
            rows.append(asyncio.run(run_row(a, latency, 1, False, slow=False)))
            for hedge in (False, a.hedge):
                rows.append(asyncio.run(run_row(a, latency, 1, hedge)))
    finally:
        for proc in _PROXIES:
            _stop_process(proc)
    head = f"{'latency':>8}  {'slow':>4}  {'hedge':>5}  {'wall s':>7}  {'wire p50':>8}  {'p99':>6}  {'max':>6}"
    head += f"  {'hedges sent/won':>15}"
    print(f"\n{head}  routed")
    ok = True
    slow = a.slow_replica / 1000
    for row in rows:
        w, h = row.stats["wire"], row.stats["hedges"]
        print(
            f"{row.latency_ms:>6g}ms  {'yes' if row.slow else 'no':>4}  {row.hedge!s:>5}  {row.wall:>7.2f}  {w['p50']:>8.3f}  "
            f"{w['p99']:>6.3f}  {w['max']:>6.3f}  {h['sent']:>7}/{h['won']:<7}  {row.stats['routed']}"
        )
    print("wire = a call's time from its request's first send to its answer, seconds")
    for base, plain, hedged in zip(rows[::3], rows[1::3], rows[2::3], strict=True):
        tail_ok = hedged.stats["wire"]["p99"] < slow / 2 and plain.stats["wire"]["p99"] >= slow
        ok &= tail_ok
        print(
            f"{base.latency_ms:g} ms: job {base.wall:.2f} s with no slow replica, {plain.wall:.2f} s with one, "
            f"{hedged.wall:.2f} s with one and hedging ({plain.wall / hedged.wall:.1f}x faster); p99 time on the wire "
            f"{plain.stats['wire']['p99']:.2f} s -> {hedged.stats['wire']['p99']:.2f} s: the slow replica no longer sets "
            f"the tail (hedged p99 < half its delay): {'ok' if tail_ok else 'MISSED'}"
        )
    return 0 if ok else 1


def prewarming(a: argparse.Namespace) -> int:
    """Calls that take a worker ``--work`` ms: capacity grows with replicas, so how soon they
    are there decides the job time. Without pre-warming they come one scale-out at a time."""
    print(
        f"cloud in a box, pre-warming: map(sleep {a.work:g} ms, range({a.calls:,})), max_concurrency {a.concurrency:,}, "
        f"up to {a.replicas} replicas x {a.workers} workers, scale out when in-flight > {a.concurrent_requests or a.workers}"
        f" x active, {a.control_delay:g} s later, cold start {a.cold_start:g} s; {os.cpu_count()} CPUs"
    )
    rows: list[Row] = []
    try:
        for latency in a.latency:
            for prewarm in (False, True):
                row = asyncio.run(run_row(a, latency, 1, prewarm=prewarm))
                rows.append(row)
                print(f"  prewarm={prewarm}: " + "; ".join(row.stats["events"]))
    finally:
        for proc in _PROXIES:
            _stop_process(proc)
    capacity = a.replicas * a.workers / (a.work / 1000)
    ideal = a.cold_start + a.calls / min(capacity, a.concurrency / (a.work / 1000 + 2 * a.latency[0] / 1000))
    print(f"\n{'latency':>8}  {'prewarm':>7}  {'wall s':>7}  {'calls/s':>8}  routed")
    for row in rows:
        print(f"{row.latency_ms:>6g}ms  {row.prewarm!s:>7}  {row.wall:>7.2f}  {a.calls / row.wall:>8,.0f}  {row.stats['routed']}")
    ok = True
    for cold, warm in zip(rows[::2], rows[1::2], strict=True):
        gain = cold.wall / warm.wall
        ok &= gain > 1.0
        print(
            f"{cold.latency_ms:g} ms: prewarm=True cuts the job from {cold.wall:.2f} s to {warm.wall:.2f} s ({gain:.2f}x); "
            f"with every replica warm from the first cold start it could take about {ideal:.2f} s"
        )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=1000)
    p.add_argument("--latency", type=float, nargs="+", default=[50.0], help="one-way latency, ms (several: one row each)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="worker processes per replica")
    p.add_argument("--cold-start", type=float, default=2.0, help="seconds")
    p.add_argument("--control-delay", type=float, default=1.0, help="seconds from a scale decision to the new replica")
    p.add_argument("--concurrent-requests", type=int, default=0, help="scale rule per replica (default: --workers)")
    p.add_argument(
        "--route-to-cold",
        action="store_true",
        help="route to a scaled-out replica at once (its first request waits the cold start), not once it is ready",
    )
    p.add_argument("--start-active", type=int, default=1, help="replicas in rotation from the start")
    p.add_argument(
        "--slow-replica",
        type=float,
        default=0.0,
        metavar="MS",
        help="replica 0 answers MS ms late: compare map at chunksize 1 without and with straggler hedging",
    )
    p.add_argument("--hedge", type=float, default=0.8, help="the hedging rows' latency percentile (with --slow-replica)")
    p.add_argument(
        "--work",
        type=float,
        default=0.0,
        metavar="MS",
        help="each call sleeps MS ms on its worker: compare map at chunksize 1 without and with prewarm=True",
    )
    a = p.parse_args(argv)
    _raise_nofile()
    if a.slow_replica:
        return hedging(a)
    if a.work:
        return prewarming(a)

    print(
        f"cloud in a box: map(add7, range({a.calls:,})), max_concurrency {a.concurrency:,}; {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}\n"
        f"ingress proxy (own process): up to {a.replicas} replicas x {a.workers} workers, each replica its own "
        f"local-runtime server and port; cold start {a.cold_start:g} s, scale out when in-flight > "
        f"{a.concurrent_requests or a.workers} x active, {a.control_delay:g} s later; a new replica is routed to "
        f"{'at once (its first request waits its cold start)' if a.route_to_cold else 'once its cold start is over'}\n"
        f"ideal = cold start + ceil(calls / concurrency) x 2 x latency"
    )
    rows: list[Row] = []
    try:
        for latency in a.latency:
            for cs, prewarm in ((1, False), (1, True), ("auto", False)):
                row = asyncio.run(run_row(a, latency, cs, prewarm=prewarm))
                rows.append(row)
                if row.stats:
                    print(f"  {latency:g} ms, chunksize {cs}{', prewarm' if prewarm else ''}: routed {row.stats['routed']}, "
                          f"peak in flight {row.stats['peak_inflight']}; " + "; ".join(row.stats["events"]))  # fmt: skip
    finally:
        for proc in _PROXIES:
            _stop_process(proc)

    head = f"{'latency':>8}  {'chunksize':>9}  {'wall s':>7}  {'ideal s':>7}  {'ratio':>6}  {'calls/s':>8}  {'CPU us/call':>11}"
    print("\nCPU us per call of every process on the machine (client = the SDK; the others stand in for Azure):")
    for row in rows:
        if row.others_us:
            cs_label = f"{row.chunksize}{'+warm' if row.prewarm else ''}"
            total = row.cpu_us + sum(row.others_us.values())
            print(f"  {row.latency_ms:g} ms, chunksize {cs_label}: client {row.cpu_us:.0f}, "
                  + ", ".join(f"{k} {v:.0f}" for k, v in row.others_us.items()) + f"; total {total:.0f}")  # fmt: skip
    print(f"\n{head}  targets")
    ok = True
    for row in rows:
        if row.error:
            print(f"{row.latency_ms:>6g}ms  {row.chunksize!s:>9}  not available ({row.error})")
            continue
        ideal = ideal_seconds(a, row.latency_ms)
        ratio = row.wall / ideal
        cs_label = f"{row.chunksize}{'+warm' if row.prewarm else ''}"
        line = (
            f"{row.latency_ms:>6g}ms  {cs_label:>9}  {row.wall:>7.2f}  {ideal:>7.2f}  {ratio:>6.2f}  "
            f"{a.calls / row.wall:>8,.0f}  {row.cpu_us:>11.0f}  "
        )
        if row.chunksize == 1 and not row.prewarm:
            r_ok, c_ok = ratio <= 1.3, row.cpu_us <= 100
            ok &= r_ok and c_ok
            line += f"ratio <= 1.3 {'ok' if r_ok else 'MISSED'}, CPU <= 100 us {'ok' if c_ok else 'MISSED'}"
        else:
            line += "(no target)"
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
