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
- it starts with one active replica and scales as Container Apps does, on the scaling model the
  tests' ARM endpoint runs (``tests/scaling.py``, with the Microsoft pages it follows): the HTTP
  rule (``--concurrent-requests``, default ``--workers``) from the requests *arriving* per
  ``--http-window`` (15 s), and the demand queue the runtime keeps at the replicas its calls
  need (as the Azure runtime does; read every ``--polling`` s), growing by 4 or 100 % per
  window, up to ``--replicas``; a decided replica starts ``--control-delay`` s later, and a
  scale-in (after ``--cooldown`` s) takes replicas out of the rotation;
- requests go round-robin over the active replicas. The first replica is started by the first
  request (a cold start of ``--cold-start`` s, which every request routed to it waits for);
  a scaled-out replica is started when the scaler decides and joins the rotation once its
  cold start is over, as the ingress waits for a replica's readiness probe (with
  ``--route-to-cold``, it joins at once and its first request starts it and waits).

The client is an ``AsyncExecutor(max_concurrency=--concurrency)`` whose runtime is swapped for
these replicas behind the proxy (an internal: ``create_runtime`` is patched for the run). Per
latency it runs ``map(add7, range(--calls))`` at chunksize 1 (without and with ``prewarm=True``,
which asks for every replica through the demand queue, as on Azure) and at chunksize "auto",
each on
a fresh executor and fresh (cold) replicas, and prints the job's wall time next to

    ideal = cold start + ceil(calls / concurrency) x 2 x latency

(the network floor: one cold start, then waves of ``concurrency`` calls, each wave one round
trip; compute, scale-out and the local machine's limits cost nothing), and the client
process's CPU time per call (``time.process_time()``; the proxy and the servers are other
processes). Target, on the row of the default chunksize ("auto"; the chunksize 1 rows are
reported beside it):

    wall time / ideal          <= 1.0

With ``--slow-replica MS`` (e.g. ``--replicas 10 --start-active 10 --cold-start 0 --calls 5000
--concurrency 200 --slow-replica 2000``) replica 0 answers MS ms late, and the job runs at
chunksize 1 without and with straggler hedging (``map(..., hedge=--hedge)``); the target is
that with hedging no call waits for the slow replica (the slowest call takes less than MS).

With ``--work MS`` (e.g. ``--replicas 6 --workers 4 --concurrent-requests 4 --work 100 --calls
2000 --concurrency 48``) each call sleeps MS ms on its worker, so the job's pace is set by how
many replicas are up; it runs at chunksize 1 on the HTTP rule alone (no demand queue: Azure
without ``azure_storage``), with the demand queue, and with it and ``prewarm=True``; the target
is that the demand queue makes the job faster than the HTTP rule alone.

Exits non-zero if a target is missed (so `nox -s bench` fails loudly). Never run by tests.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
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
from collections.abc import Callable
from typing import Any, TypeVar, cast
from unittest import mock
from urllib.parse import urlsplit

import aiohttp

from async_ca_exec import executor as executor_module
from async_ca_exec.config import AzureContainersSection
from async_ca_exec.executor import AsyncExecutor
from async_ca_exec.runtimes import create_runtime
from async_ca_exec.runtimes import demand as demand_module
from async_ca_exec.runtimes import local as local_module

# The platform's scaling model is the tests' (one model of Container Apps for both stand-ins).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
from scaling import HTTP_WINDOW, ScaleModel, ScaleSettings


def add7(x: int) -> int:
    return x + 7


def slow_add7(x: int, seconds: float) -> int:
    """A call that takes ``seconds`` of a worker (sleeping: the CPU stays free for the rest)."""
    time.sleep(seconds)
    return x + 7


# --- the ingress: a proxy process -------------------------------------------------------
#
# The proxy shares the machine's cores with the client and the servers, so it is built to cost
# little CPU per request: asyncio protocols and callbacks (no task, coroutine or asyncio.sleep
# per request); a request is forwarded as the bytes that came, and so is the replica's answer,
# of which only the framing (Content-Length or chunked) is followed, to know where it ends; and
# the latency is a delay line: one fixed delay keeps what goes in in time order, so a queue
# with one timer serves every request and answer piece (and keeps their order, which asyncio's
# timer heap does not do for equal deadlines).

SIM = "/_sim"  # the proxy's own paths (reset, stats); everything else is forwarded
_SIM = SIM.encode()
#: An idle connection to a replica is not reused after this long (as the SDK's TCPConnector; replicas cut at 75 s).
_UPSTREAM_IDLE = 60.0
#: How often the ingress reads its scale rules (the model limits what a read may change).
_TICK = 0.1
#: asyncio runs a timer when the clock is within this of its time: pieces due that soon go with it.
_CLOCK = time.get_clock_info("monotonic").resolution

# How a piece of an answer ends, as it is passed back to the client (see _Downstream.back).
_MORE = 0  # more of the answer follows
_END = 1  # the answer is complete: the client's connection takes its next request
_CLOSE = 2  # complete, and the client's connection closes (an answer with no framing ends at EOF)
_CUT = 3  # the replica's connection broke before the answer was complete: so does the client's

# Header fields looked up in a lower-cased head (the request or status line comes first, so a
# field always follows a CRLF).
_CONTENT_LENGTH = b"\r\ncontent-length:"
_TRANSFER_ENCODING = b"\r\ntransfer-encoding:"
_CONNECTION = b"\r\nconnection:"

_T = TypeVar("_T")
_Piece = tuple[bytes, int]  # answer bytes and how they end (_MORE, _END, _CLOSE or _CUT)


def _header(lower: bytes, key: bytes) -> bytes | None:
    """A field's value in a lower-cased head (without its blank line); ``key`` is b"\\r\\nname:"."""
    i = lower.find(key)
    if i < 0:
        return None
    i += len(key)
    j = lower.find(b"\r\n", i)
    return lower[i : j if j >= 0 else len(lower)].strip()


def _length(value: bytes) -> int:
    """A Content-Length value; ValueError if it is not one."""
    if not value.isdigit():
        raise ValueError(f"not a length: {value[:40]!r}")
    return int(value)


class _Chunks:
    """Where a chunked body ends, fed its bytes as they come: size lines, chunk data, the last
    (empty) chunk, then trailer lines up to a blank one (the replicas send none)."""

    __slots__ = ("last", "left", "line")

    def __init__(self) -> None:
        self.left = 0  # bytes of the current chunk, and its CRLF, still to come
        self.line = b""  # the start of a size or trailer line, from an earlier piece
        self.last = False  # the last chunk has come: trailer lines follow

    def feed(self, data: bytes | bytearray, pos: int) -> int:
        """Follows ``data[pos:]``: the offset just past the body's end, or -1 if it goes on.
        Raises ValueError on a malformed size line."""
        n = len(data)
        while pos < n:
            if self.left:
                step = min(self.left, n - pos)
                self.left -= step
                pos += step
                continue
            eol = data.find(b"\n", pos)
            if eol < 0:
                self.line += data[pos:]
                return -1
            line = (self.line + data[pos:eol]).strip()
            self.line = b""
            pos = eol + 1
            if self.last:
                if not line:  # the blank line after the trailers: the end
                    return pos
            else:
                size = int(line.split(b";", 1)[0], 16)  # a size, then perhaps extensions
                if size:
                    self.left = size + 2
                else:
                    self.last = True
        return -1


class _DelayLine:
    """A one-way trip of ``delay`` seconds: ``put(fn, arg)`` runs ``fn(arg)`` that much later.

    The delay is the same for everything put in, so the queue is in time order: one timer, for
    its head, serves it all, and things put in one after the other come out in that order."""

    __slots__ = ("delay", "loop", "queue", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.queue: collections.deque[tuple[float, Callable[[Any], None], Any]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None

    def put(self, fn: Callable[[_T], None], arg: _T) -> None:
        self.queue.append((self.loop.time() + self.delay, fn, arg))
        if self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self._run)

    def _run(self) -> None:
        self.timer = None
        queue = self.queue
        until = self.loop.time() + _CLOCK
        try:
            while queue and queue[0][0] <= until:
                _, fn, arg = queue.popleft()
                fn(arg)
        finally:  # (an error in one is the loop's to report; the line goes on)
            if queue and self.timer is None:
                self.timer = self.loop.call_at(queue[0][0], self._run)


class _Ready:
    """A replica's readiness (its cold start over), and the requests routed to it that wait for it, in order."""

    __slots__ = ("is_set", "waiters")

    def __init__(self) -> None:
        self.is_set = False
        self.waiters: list[Callable[[], None]] = []

    def set(self) -> None:
        self.is_set = True
        waiters, self.waiters = self.waiters, []
        for send in waiters:
            send()


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
    http_window: float = HTTP_WINDOW
    polling: float = 5.0  # the demand queue's pollingInterval
    cooldown: float = 300.0
    demand: bool = True  # the app has the demand-queue rule (queueLength 1)

    def scale(self) -> ScaleSettings:
        return ScaleSettings(
            min_replicas=self.start_active,  # in rotation from the start: as a minReplicas would keep them
            max_replicas=len(self.upstreams),
            polling=self.polling,
            cooldown=self.cooldown,
            http_target=self.concurrent_requests,
            queue_target=1 if self.demand else None,
        )


class Ingress:
    """Latency both ways, cold starts, and Container Apps' scaler (in the proxy process).

    A request is in flight from its arrival (all of it) until its answer is passed back in full,
    or cut, or its client goes."""

    def __init__(self, s: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.s = s
        self.loop = loop
        self.addresses = [(parts.hostname or "127.0.0.1", parts.port or 80) for parts in map(urlsplit, s.upstreams)]
        #: Each replica's kept-alive connections with no request, the most recently used last.
        self.idle: list[list[_Upstream]] = [[] for _ in s.upstreams]
        self.connecting: set[asyncio.Task[Any]] = set()
        self.line = _DelayLine(loop, s.latency)  # the network, either way
        #: The slow replica's first answer bytes (the rest of its answer follows them).
        self.slow_line = _DelayLine(loop, s.latency + s.slow) if s.slow else None
        self.ticker: asyncio.TimerHandle | None = None
        self.reset()

    def reset(self) -> None:
        self.t0 = time.monotonic()
        self.active = max(1, min(self.s.start_active, len(self.s.upstreams)))
        self.started = self.active  # replicas 0 .. started - 1 are started (or start on their first request)
        self.starting = 0  # decided, not in rotation yet
        self.messages = 0  # the demand queue's message count, as the runtime keeps it
        self.model = ScaleModel(self.s.scale(), time.monotonic, http_window=self.s.http_window)
        if self.ticker is not None:
            self.ticker.cancel()
        self.ticker = self.loop.call_later(_TICK, self._tick)
        self.rr = 0
        self.inflight = 0
        self.peak_inflight = 0
        self.ready: list[_Ready | None] = [None] * len(self.s.upstreams)
        self.routed = [0] * len(self.s.upstreams)
        self.events: list[str] = []

    def _note(self, what: str) -> None:
        self.events.append(f"{time.monotonic() - self.t0:.2f}s {what}")

    def _tick(self) -> None:
        """Container Apps reading its scale rules: the demand queue every polling interval, the
        HTTP rule every window; the model decides the replica count."""
        model = self.model
        if model.queue_due():
            model.queue_reading(self.messages)
        current = self.active + self.starting
        n = model.decide(current)
        if n > current:
            self._note(f"scale to {n} ({self.inflight} requests in flight, {self.messages} demand messages)")
            for _ in range(n - current):
                self.starting += 1
                self.loop.call_later(self.s.control_delay, self._scale_out)
        elif n < self.active and not self.starting:
            self._note(f"scale in to {max(1, n)} (out of rotation)")
            self.active = self.started = max(1, n)
        self.ticker = self.loop.call_later(_TICK, self._tick)

    def _scale_out(self) -> None:
        i = self.started
        if i >= len(self.s.upstreams):  # (the model never asks past maxReplicas)
            self.starting -= 1
            return
        self.started += 1
        self._note(f"replica {i} started ({self.inflight} requests in flight)")
        if self.s.route_to_cold:  # routed to at once; its first request starts it and waits
            self._join(i)
            return
        if self.ready[i] is None:  # started now, routed to once ready (a readiness probe)
            ready = self.ready[i] = _Ready()
            ready.set()
        self.loop.call_later(self.s.cold_start, self._join, i)

    def _join(self, i: int) -> None:
        self.starting -= 1
        self.active = max(self.active, i + 1)
        self._note(f"replica {i} in rotation")

    def sim(self, path: str, body: bytes) -> dict[str, Any]:
        """The proxy's own endpoints (answered at once, not counted in flight)."""
        if path == f"{SIM}/reset":
            self.reset()
        elif path == f"{SIM}/demand":  # the runtime setting its demand queue's message count
            self.messages = int(json.loads(body)["n"])
        elif path == f"{SIM}/stats":
            return {"active": self.active, "routed": self.routed, "peak_inflight": self.peak_inflight, "events": self.events}
        return {}

    # -- a request's way: in (latency), routed (waiting out a cold start), to a replica --

    def arrived(self, down: _Downstream) -> None:
        """A client's request has arrived in full: it is in flight, and crosses the way in."""
        self.inflight += 1
        if self.inflight > self.peak_inflight:
            self.peak_inflight = self.inflight
        self.model.arrival()
        self.line.put(self._route, down)

    def _route(self, down: _Downstream) -> None:
        """Round-robin over the active replicas; a replica not ready yet is waited for (a cold
        start, begun by the first request routed to a replica no one has started)."""
        if down.closed:  # the client went on the way
            return
        i = self.rr % self.active
        self.rr += 1
        self.routed[i] += 1
        ready = self.ready[i]
        if ready is None:
            ready = self.ready[i] = _Ready()
            self._note(f"replica {i} cold start")
            self.loop.call_later(self.s.cold_start, ready.set)
        if ready.is_set:
            self._send(i, down)
        else:
            ready.waiters.append(functools.partial(self._send, i, down))

    def _send(self, i: int, down: _Downstream) -> None:
        """Writes ``down``'s request to replica ``i``: on its last used idle connection, else a new one."""
        if down.closed:
            return
        idle = self.idle[i]
        now = self.loop.time()
        while idle:
            up = idle.pop()
            if now - up.idle_since < _UPSTREAM_IDLE:
                up.send(down)
                return
            up.close()
        up = _Upstream(self, i)
        up.take(down)  # written once connected (a task per new connection, not per request)
        task = self.loop.create_task(self.loop.create_connection(lambda: up, *self.addresses[i]))
        self.connecting.add(task)
        task.add_done_callback(functools.partial(self._connected, up))

    def _connected(self, up: _Upstream, task: asyncio.Task[Any]) -> None:
        self.connecting.discard(task)
        if task.cancelled() or task.exception() is not None:
            up.lost()  # its request's client sees a cut, as when the replica goes mid-answer

    def close(self) -> None:
        if self.ticker is not None:
            self.ticker.cancel()
        for task in self.connecting:
            task.cancel()
        for idle in self.idle:
            for up in list(idle):
                up.close()


class _Upstream(asyncio.Protocol):
    """A kept-alive connection to one replica, carrying one request at a time. The answer's bytes
    are passed back as they come; its framing is followed to know where it ends, so that the
    connection can carry the next request (back among the idle ones at once, while the answer is
    still on its way back)."""

    def __init__(self, ingress: Ingress, replica: int) -> None:
        self.ingress = ingress
        self.replica = replica
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.down: _Downstream | None = None  # the client whose request this connection carries
        # The answer being read:
        self.head = b""  # its head as far as it has come, while incomplete
        self.in_head = True
        self.first = True  # none of it passed back yet
        self.left = 0  # bytes of the body still to come, by its Content-Length (-1: chunked, or up to EOF)
        self.chunks: _Chunks | None = None  # the chunked body's framing
        self.keep_alive = True

    def take(self, down: _Downstream) -> None:
        """Carries ``down``'s request (written by the caller, or once connected)."""
        self.down = down
        down.up = self
        self.head, self.in_head, self.first = b"", True, True

    def send(self, down: _Downstream) -> None:
        self.take(down)
        assert self.transport is not None
        self.transport.write(down.request)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)
        if self.down is not None:
            t.write(self.down.request)
        else:  # its client went while it connected: nothing was sent, it can carry another
            self._idle()

    def data_received(self, data: bytes) -> None:
        """Bytes of the answer: passed back as they come, up to its end."""
        down = self.down
        if down is None:  # bytes no request asked for: not a connection to use again
            self.close()
            return
        pos = 0
        while self.in_head:
            if self.head:
                data, self.head = self.head + data, b""
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                self.head = data[pos:]  # the head is passed back whole, once all of it has come
                if pos:
                    self._back(down, data[:pos], _MORE)
                return
            head = data[pos:end]
            try:
                interim, hop = self._framing(head, down)
            except ValueError:  # not an answer this proxy can follow
                self.lost()
                return
            if hop:  # a Connection field: the replica's own connection's (the client's stays open)
                head = b"\r\n".join(line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:"))
                data = data[:pos] + head + data[end:]
                end = pos + len(head)
            pos = end + 4
            self.in_head = interim  # a 1xx answer (100 Continue): the real one follows
        if self.chunks is not None:
            try:
                stop = self.chunks.feed(data, pos)
            except ValueError:
                self.lost()
                return
        elif self.left >= 0:
            stop = pos + self.left
            if stop > len(data):
                self.left = stop - len(data)
                stop = -1
        else:  # the body ends at EOF
            stop = -1
        if stop < 0:
            self._back(down, data, _MORE)
            return
        # The answer is complete: the connection is free for the next request.
        self.down = None
        down.up = None
        if stop < len(data):  # more bytes than the answer: framing that cannot be trusted
            data = data[:stop]
            self.keep_alive = False
        if self.keep_alive:
            self._idle()
        else:
            self.close()
        self._back(down, data, _END)

    def _framing(self, head: bytes, down: _Downstream) -> tuple[bool, bool]:
        """Reads how the answer's body is framed from its head: whether it is an interim (1xx)
        answer (the real one follows), and whether it has a Connection field (hop by hop)."""
        lower = head.lower()
        status = int(lower[9:12])
        connection = _header(lower, _CONNECTION)
        self.keep_alive = lower.startswith(b"http/1.1 ") and (connection is None or b"close" not in connection)
        self.chunks = None
        if 100 <= status < 200:
            return True, connection is not None
        te = _header(lower, _TRANSFER_ENCODING)
        length = _header(lower, _CONTENT_LENGTH)
        if down.head_only or status in (204, 304):
            self.left = 0
        elif te is not None and b"chunked" in te:
            self.left = -1
            self.chunks = _Chunks()
        elif length is not None:
            self.left = _length(length)
        else:  # up to EOF
            self.left = -1
            self.keep_alive = False
        return False, connection is not None

    def _back(self, down: _Downstream, data: bytes, end: int) -> None:
        first, self.first = self.first, False
        down.back(data, end, late=first and self.replica == 0)

    def eof_received(self) -> bool | None:
        self.lost()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost()

    def lost(self) -> None:
        """The connection is gone (or never came, or broke the protocol): an answer it was carrying
        is cut, unless its body was to end at EOF."""
        if self.closed:
            return
        self.close()
        down, self.down = self.down, None
        if down is not None:
            down.up = None
            complete = not self.in_head and self.chunks is None and self.left < 0
            self._back(down, b"", _CLOSE if complete else _CUT)

    def cut(self) -> None:
        """Its client went mid-request: the replica sees the connection cut (and cancels the call)."""
        self.down = None
        if self.transport is not None:
            self.closed = True
            self.transport.abort()
        # (Still connecting: nothing was sent, so once connected it is an idle connection.)

    def _idle(self) -> None:
        self.idle_since = self.ingress.loop.time()
        self.ingress.idle[self.replica].append(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(ValueError):
                self.ingress.idle[self.replica].remove(self)
            if self.transport is not None:
                self.transport.close()


class _Downstream(asyncio.Protocol):
    """One client connection to the ingress, its requests one at a time (as the SDK sends them;
    bytes that come early wait in the buffer). A request crosses the way in, is routed and
    written to a replica, and the answer's bytes cross the way back as they come (so heartbeats
    still flow). If the client goes mid-request, its request to the replica is cut too."""

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self.busy = False  # a request of this connection is in flight
        self.request = b""  # that request, as it came (head and body)
        self.head_only = False  # it is a HEAD request: its answer has no body
        self.up: _Upstream | None = None  # the replica connection carrying it, until its answer has come
        self.held: list[_Piece] | None = None  # answer pieces waiting behind the slow replica's first

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.up is not None:
            self.up.cut()
            self.up = None
        self._done()

    def _next(self) -> None:
        """Takes the complete requests from the buffer: the proxy's own are answered at once; the
        first other one is sent on its way (the rest wait until it is answered)."""
        buf = self.buf
        while buf and not self.closed:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            lower = head.lower()
            start = end + 4
            try:
                te = _header(lower, _TRANSFER_ENCODING)
                if te is not None and b"chunked" in te:  # (not sent by the SDK: followed from the start each time)
                    stop = _Chunks().feed(buf, start)
                    if stop < 0:
                        return
                else:
                    stop = start + _length(_header(lower, _CONTENT_LENGTH) or b"0")
                    if len(buf) < stop:
                        return
                method, target, _version = head.split(b" ", 2)
            except ValueError:  # not a request this proxy can follow
                self.abort()
                return
            request = bytes(buf) if stop == len(buf) else bytes(buf[:stop])
            del buf[:stop]
            if target.startswith(_SIM):
                self.reply(200, json.dumps(self.ingress.sim(target.decode("latin-1"), request[start:])).encode())
                continue
            self.busy = True
            self.request = request
            self.head_only = method == b"HEAD"
            self.ingress.arrived(self)
            return

    def _done(self) -> None:
        """The request in flight is over: answered in full, cut, or its client gone."""
        if self.busy:
            self.busy = False
            self.request = b""
            self.ingress.inflight -= 1

    # -- the answer's way back ----------------------------------------------------------

    def back(self, data: bytes, end: int, *, late: bool) -> None:
        """A piece of the answer, from the replica, sent on its way back; ``late``: the first piece
        of the slow replica's answer, which waits its delay too (the pieces after it wait for it)."""
        ingress = self.ingress
        if late and ingress.slow_line is not None:
            self.held = []
            ingress.slow_line.put(self._late_piece, (data, end))
        else:
            ingress.line.put(self._piece, (data, end))

    def _piece(self, piece: _Piece) -> None:
        if self.held is not None:
            self.held.append(piece)
        else:
            self._deliver(piece)

    def _late_piece(self, piece: _Piece) -> None:
        held, self.held = self.held or [], None
        self._deliver(piece)
        for p in held:
            self._deliver(p)

    def _deliver(self, piece: _Piece) -> None:
        data, end = piece
        if self.closed or self.transport is None:
            return
        if data:
            self.transport.write(data)
        if end == _MORE:
            return
        if end == _CUT:
            self.abort()
        elif end == _CLOSE:
            self.closed = True
            self.transport.close()
        self._done()
        if self.buf:
            self._next()

    def reply(self, status: int, body: bytes) -> None:
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
            )

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _proxy_main(settings: Settings, conn: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ingress = Ingress(settings, loop)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = await loop.create_server(lambda: _Downstream(ingress), sock=sock, backlog=4096)
        conn.send(sock.getsockname()[1])
        try:
            await asyncio.Event().wait()
        finally:
            server.close()
            ingress.close()

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
        self.inner: list[Any] = []  # local runtimes
        for _ in range(sim["replicas"]):
            rt: Any = create_runtime(config, **kw)
            rt.replicas = 1  # each on its own port, so the proxy can route to it
            self.inner.append(rt)
        self.proxy: Any = None
        self.url = ""
        # The demand queue, as the Azure runtime keeps it: replicas for the calls in flight and
        # queued, or warm()'s floor; here its count is told to the ingress every SAMPLE seconds.
        self._demand_of: Callable[[], int] = lambda: 0
        self._floor = 0
        self._asking: asyncio.Task[None] | None = None

    def track_demand(self, demand: Callable[[], int]) -> None:
        self._demand_of = demand

    def _wanted(self) -> int:
        need = demand_module.replicas_needed(self._demand_of(), int(self.sim["concurrent_requests"]), len(self.inner))
        return max(need, self._floor)

    async def _ask(self) -> None:
        told = -1
        async with aiohttp.ClientSession() as s:
            while True:
                n = self._wanted() if self.sim["demand"] else 0
                if n != told:
                    async with s.post(f"{self.url}{SIM}/demand", json={"n": n}) as r:
                        r.raise_for_status()
                    told = n
                await asyncio.sleep(self.sim["sample"])

    @property
    def pids(self) -> list[int]:
        return [pid for rt in self.inner for pid in rt.pids]

    def replicas_for(self, requests: int) -> int:
        return min(len(self.inner), math.ceil(requests / int(self.sim["concurrent_requests"])))

    async def warm(self, replicas: int, *, lease: float) -> int:
        """As the Azure runtime does: a floor under the demand queue's count (no template change)."""
        self._floor = replicas
        return replicas

    async def cool(self) -> None:
        self._floor = 0

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
                http_window=self.sim["http_window"],
                polling=self.sim["polling"],
                cooldown=self.sim["cooldown"],
                demand=self.sim["demand"],
            )
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            self.proxy = ctx.Process(target=_proxy_main, args=(settings, child), daemon=True, name="cloud-sim-ingress")
            self.proxy.start()
            _PROXIES.append(self.proxy)
            if not await asyncio.to_thread(parent.poll, 60):
                raise RuntimeError("the ingress proxy did not start")
            self.url = f"http://127.0.0.1:{parent.recv()}"
            self._asking = asyncio.create_task(self._ask())
        except BaseException:
            await self.aclose()
            raise
        return dataclasses.replace(endpoints[0], url=self.url)

    async def aclose(self) -> None:
        if self._asking is not None:
            self._asking.cancel()
            with contextlib.suppress(BaseException):
                await self._asking
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
    demand: bool = True
    wall: float = math.nan
    cpu_us: float = math.nan
    #: CPU per call of the other processes on this machine: replica servers, their workers, the proxy.
    others_us: dict[str, float] = dataclasses.field(default_factory=dict)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str = ""

    @property
    def label(self) -> str:
        return f"{self.chunksize}{'+warm' if self.prewarm else ''}"


async def run_row(
    a: argparse.Namespace,
    latency_ms: float,
    chunksize: int | str,
    hedge: float | bool = False,
    slow: bool = True,
    prewarm: bool = False,
    demand: bool = True,
) -> Row:
    row = Row(latency_ms, chunksize, hedge, slow, prewarm, demand)
    sim = {
        "replicas": a.replicas,
        "latency": latency_ms / 1000,
        "cold_start": a.cold_start,
        "control_delay": a.control_delay,
        "concurrent_requests": a.concurrent_requests or a.workers,
        "route_to_cold": a.route_to_cold,
        "start_active": a.start_active,
        "slow": a.slow_replica / 1000 if slow else 0.0,
        "http_window": a.http_window,
        "polling": a.polling,
        "cooldown": a.cooldown,
        "demand": demand,
        "sample": 0.5,  # as the Azure runtime's DemandQueue samples the executor
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
    return float(a.cold_start + math.ceil(a.calls / a.concurrency) * 2 * latency_ms / 1000)


def hedging(a: argparse.Namespace) -> int:
    """One slow replica among ``--replicas``: the same job without and with hedging."""
    print(
        f"cloud in a box, one slow replica: map(add7, range({a.calls:,})), max_concurrency {a.concurrency:,}, "
        f"{a.replicas} replicas x {a.workers} workers ({a.start_active} in rotation from the start), replica 0 answers "
        f"{a.slow_replica:g} ms late; {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    )
    rows: list[Row] = []
    for latency in a.latency:
        rows.append(asyncio.run(run_row(a, latency, 1, False, slow=False)))
        for hedge in (False, a.hedge):
            rows.append(asyncio.run(run_row(a, latency, 1, hedge)))
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


def _scaling(a: argparse.Namespace) -> str:
    return (
        f"Container Apps' scaler (tests/scaling.py): HTTP rule {a.concurrent_requests or a.workers} per replica over "
        f"{a.http_window:g} s windows, demand queue read every {a.polling:g} s, cooldown {a.cooldown:g} s; a new "
        f"replica starts {a.control_delay:g} s after the decision, cold start {a.cold_start:g} s"
    )


def prewarming(a: argparse.Namespace) -> int:
    """Calls that take a worker ``--work`` ms: capacity grows with replicas, so how soon they
    are there decides the job time: on the HTTP rule alone (arrivals per window), with the
    demand queue (the calls waiting, read each polling interval), and with prewarm=True too."""
    print(
        f"cloud in a box, scaling: map(sleep {a.work:g} ms, range({a.calls:,})), max_concurrency {a.concurrency:,}, "
        f"up to {a.replicas} replicas x {a.workers} workers; {os.cpu_count()} CPUs\n{_scaling(a)}"
    )
    modes = (("HTTP rule only", False, False), ("demand queue", True, False), ("demand + prewarm", True, True))
    rows: list[tuple[str, Row]] = []
    for latency in a.latency:
        for label, demand, prewarm in modes:
            row = asyncio.run(run_row(a, latency, 1, prewarm=prewarm, demand=demand))
            rows.append((label, row))
            print(f"  {label}: " + "; ".join(row.stats["events"]))
    capacity = a.replicas * a.workers / (a.work / 1000)
    ideal = a.cold_start + a.calls / min(capacity, a.concurrency / (a.work / 1000 + 2 * a.latency[0] / 1000))
    print(f"\n{'latency':>8}  {'scaling':>16}  {'wall s':>7}  {'calls/s':>8}  routed")
    for label, row in rows:
        print(f"{row.latency_ms:>6g}ms  {label:>16}  {row.wall:>7.2f}  {a.calls / row.wall:>8,.0f}  {row.stats['routed']}")
    ok = True
    for (_, http), (_, queue), (_, warm) in zip(rows[::3], rows[1::3], rows[2::3], strict=True):
        gain = http.wall / queue.wall
        ok &= gain > 1.0
        print(
            f"{http.latency_ms:g} ms: the demand queue cuts the job from {http.wall:.2f} s (HTTP rule only) to "
            f"{queue.wall:.2f} s ({gain:.2f}x; target > 1: {'ok' if gain > 1.0 else 'MISSED'}), {warm.wall:.2f} s with "
            f"prewarm=True; with every replica warm from the first cold start it could take about {ideal:.2f} s"
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
    p.add_argument("--concurrent-requests", type=int, default=0, help="HTTP scale rule per replica (default: --workers)")
    p.add_argument("--http-window", type=float, default=HTTP_WINDOW, help="seconds: the HTTP rule's window (Azure: 15)")
    polling = AzureContainersSection.model_fields["scale_polling_interval"].default
    p.add_argument("--polling", type=float, default=polling, help="seconds between reads of the demand queue (the SDK's default)")
    cooldown = AzureContainersSection.model_fields["scale_cooldown"].default
    p.add_argument("--cooldown", type=float, default=cooldown, help="seconds without demand before a scale-in")
    p.add_argument("--no-demand", action="store_true", help="no demand queue: the HTTP rule alone (the default rows)")
    p.add_argument(
        "--route-to-cold",
        action="store_true",
        help="route to a scaled-out replica at once (its first request waits the cold start), not once it is ready",
    )
    p.add_argument("--start-active", type=int, default=1, help="replicas in rotation from the start (the app's minReplicas)")
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
        help="each call sleeps MS ms on its worker: compare the HTTP rule alone, the demand queue, and prewarm=True",
    )
    a = p.parse_args(argv)
    _raise_nofile()
    try:
        if a.slow_replica:
            return hedging(a)
        if a.work:
            return prewarming(a)
        return default_rows(a)
    finally:
        for proc in _PROXIES:  # every proxy started, whatever went wrong
            _stop_process(proc)


def default_rows(a: argparse.Namespace) -> int:
    """Chunksize 1 (without and with pre-warming) and "auto" per latency, against the ideal."""
    print(
        f"cloud in a box: map(add7, range({a.calls:,})), max_concurrency {a.concurrency:,}; {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}\n"
        f"ingress proxy (own process): up to {a.replicas} replicas x {a.workers} workers, each replica its own "
        f"local-runtime server and port; {_scaling(a)}{' (no demand queue)' if a.no_demand else ''};\n"
        f"a new replica is routed to "
        f"{'at once (its first request waits its cold start)' if a.route_to_cold else 'once its cold start is over'}\n"
        f"ideal = cold start + ceil(calls / concurrency) x 2 x latency"
    )
    rows: list[Row] = []
    for latency in a.latency:
        for cs, prewarm in ((1, False), (1, True), ("auto", False)):
            row = asyncio.run(run_row(a, latency, cs, prewarm=prewarm, demand=not a.no_demand))
            rows.append(row)
            if row.stats:
                print(f"  {latency:g} ms, chunksize {cs}{', prewarm' if prewarm else ''}: routed {row.stats['routed']}, "
                      f"peak in flight {row.stats['peak_inflight']}; " + "; ".join(row.stats["events"]))  # fmt: skip

    head = f"{'latency':>8}  {'chunksize':>9}  {'wall s':>7}  {'ideal s':>7}  {'ratio':>6}  {'calls/s':>8}  {'CPU us/call':>11}"
    print("\nCPU us per call of every process on the machine (client = the SDK; the others stand in for Azure):")
    for row in rows:
        if row.others_us:
            total = row.cpu_us + sum(row.others_us.values())
            print(f"  {row.latency_ms:g} ms, chunksize {row.label}: client {row.cpu_us:.0f}, "
                  + ", ".join(f"{k} {v:.0f}" for k, v in row.others_us.items()) + f"; total {total:.0f}")  # fmt: skip
    print(f"\n{head}  targets")
    ok = True
    for row in rows:
        if row.error:
            print(f"{row.latency_ms:>6g}ms  {row.chunksize!s:>9}  not available ({row.error})")
            continue
        ideal = ideal_seconds(a, row.latency_ms)
        ratio = row.wall / ideal
        line = (
            f"{row.latency_ms:>6g}ms  {row.label:>9}  {row.wall:>7.2f}  {ideal:>7.2f}  {ratio:>6.2f}  "
            f"{a.calls / row.wall:>8,.0f}  {row.cpu_us:>11.0f}  "
        )
        if row.chunksize == "auto":
            r_ok = ratio <= 1.0
            ok &= r_ok
            line += f"ratio <= 1.0 {'ok' if r_ok else 'MISSED'}"
        else:
            line += "(no target)"
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
