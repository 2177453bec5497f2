"""Delivers requests to a runtime: one pool of keep-alive connections, bounded concurrency, retries.

Requests wait in a FIFO; at most ``max_concurrency`` *lanes* (tasks) take them one at a
time, so a million queued calls cost a million small objects, not a million tasks. A lane
sends a request, reads its response frames as they arrive and resolves each call's future.
Transport failures (connection errors, 429/5xx, a cut stream) are retried with jittered
exponential backoff honouring ``Retry-After``; a call whose user code raised is never re-run,
and a retried request names the items already resolved so they are not run or counted twice.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import protocol, serialize, transport
from .errors import (
    AsyncCAExecError,
    AuthenticationError,
    CallTimeoutError,
    InvocationError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    StorageError,
    WorkerCrashedError,
)
from .futures import CallFuture
from .jobs import Job, Stats
from .progress import LogPrinter
from .storage import runtime_sas_hint
from .transfer import Transfers

log = logging.getLogger("async_ca_exec.invoker")

BACKOFF_BASE = 0.1
BACKOFF_CAP = 10.0
RETRY_AFTER_CAP = 60.0


@dataclass(frozen=True)
class Endpoint:
    """Where a runtime listens and how to talk to it."""

    url: str
    key: bytes = field(repr=False)
    heartbeat: float = protocol.DEFAULT_HEARTBEAT
    max_body: int = protocol.DEFAULT_MAX_BODY
    ssl: Any = None
    meta: dict[str, Any] = field(default_factory=dict, repr=False)
    #: Keep retrying "unavailable" answers (refused connections, 502/503/504/429) this many
    #: seconds, beyond the retry count: a Container App scaling from zero takes a while.
    startup_timeout: float = 0.0


class Outcome(NamedTuple):
    """What one OUTCOME frame says about items ``first .. first + n - 1`` of a request."""

    first: int
    n: int
    values: list[Any] | None  # None: the results could not be unpickled (load_error says why)
    exc_blobs: dict[int, bytes]  # pickled exceptions by item index
    timing: Any  # (started, finished, cpu seconds) lists, as the worker sent them
    errors: dict[str, Any]  # error descriptions by item index (as a string, JSON keys)
    load_error: BaseException | None
    meta: dict[str, Any]
    received: float


class Request:
    """One HTTP request: ``n`` calls of one job, their arguments pickled together.

    Subclasses decide where outcomes go: a future per call, or the job's result list.
    """

    __slots__ = (
        "_resolved", "blobs", "call_id", "cancelled", "durable", "items", "items_url", "job", "lane", "log_parts",
        "log_parts_streamed", "n", "sends", "unresolved", "with_fn",
    )  # fmt: skip

    def __init__(self, call_id: str, job: Job, n: int, items: bytes) -> None:
        self.call_id = call_id
        self.job = job
        self.n = n
        self.items = items
        self.lane: asyncio.Task[None] | None = None
        self.unresolved = n
        self.cancelled = False
        self._resolved: bytearray | None = None  # only once outcomes arrive piecemeal
        #: Send the function's bytes, not just its hash (small functions always go along).
        self.with_fn = len(job.fn) <= protocol.FN_INLINE_LIMIT
        #: Blob storage: where the arguments were put, blobs to delete once done, and whether
        #: the call may outlive the ingress (its outcome then also goes to Blob).
        self.items_url: str | None = None
        self.blobs: list[str] = []
        self.durable = False
        #: HTTP sends so far: each is signed with its own number, so a runtime can tell a retry
        #: from a replay of a request it has already seen.
        self.sends = 0
        #: Output parts received per item, and how many of them came on the response stream
        #: (created with the first part: most requests print nothing).
        self.log_parts: dict[int, int] | None = None
        self.log_parts_streamed: dict[int, int] | None = None

    def cancel(self) -> None:
        """Stop caring about this request: skip it if queued, abort it if in flight."""
        self.cancelled = True
        if self.lane is not None:
            self.lane.cancel()

    def item_cancelled(self) -> None:
        self.unresolved -= 1
        if self.unresolved == 0:
            self.cancel()

    def is_resolved(self, k: int) -> bool:
        return self.unresolved == 0 or (self._resolved is not None and bool(self._resolved[k]))

    def _claim(self, first: int, n: int) -> list[int] | None:
        """Mark items resolved; return those that already were (None when none were)."""
        if self._resolved is None:
            if self.unresolved == 0:  # answered in full already (by a hedged request's other attempt)
                return list(range(first, first + n))
            if first == 0 and n == self.n and self.unresolved == self.n:
                self.unresolved = 0
                return None
            self._resolved = bytearray(self.n)
        seen = [k for k in range(first, first + n) if self._resolved[k]]
        self._resolved[first : first + n] = b"\x01" * n
        self.unresolved -= n - len(seen)
        return seen or None

    def skipped(self) -> list[int]:
        """Items already answered (by an earlier attempt): the retry must not run them again."""
        if self._resolved is None:
            return []
        return [k for k in range(self.n) if self._resolved[k]]

    def body(self, extra: dict[str, Any] | None = None, *, items_inline: bool = True, fn_inline: bool = True) -> bytes:
        skip = self.skipped()
        fields = dict(extra or {})
        if skip:
            fields["skip"] = skip
        return protocol.encode_invocation(
            call_id=self.call_id,
            n=self.n,
            fn=self.job.fn if self.with_fn and fn_inline else b"",
            fn_hash=self.job.fn_hash,
            items=self.items if items_inline else b"",
            timeout=self.job.timeout,
            extra=fields or None,
        )

    def note_sent(self, now: float, attempt: int) -> None:
        pass

    def apply(self, o: Outcome) -> None:
        raise NotImplementedError

    def fail(self, exc: BaseException, now: float) -> None:
        raise NotImplementedError

    def release(self) -> None:
        self.items = b""


class FutureRequest(Request):
    """Calls that each have a :class:`CallFuture` (submit, imap, the Lithops facade)."""

    __slots__ = ("futures",)

    def __init__(self, call_id: str, job: Job, futures: list[CallFuture], items: bytes) -> None:
        super().__init__(call_id, job, len(futures), items)
        self.futures = futures
        for f in futures:
            f._request = self

    def is_resolved(self, k: int) -> bool:
        return self.futures[k].done()

    def skipped(self) -> list[int]:
        return [k for k, f in enumerate(self.futures) if f.done()]

    def note_sent(self, now: float, attempt: int) -> None:
        for f in self.futures:
            if f._sent is None:
                f._sent = now
            f._attempts = attempt + 1

    def apply(self, o: Outcome) -> None:
        first, n, values, errors, now = o.first, o.n, o.values, o.errors, o.received
        t0, t1, cpu = _timing(o.timing, n)
        timed = bool(t0)
        if timed:
            self.job.record_work(t0, t1, cpu)
        meta = o.meta
        rss, pid, replica = int(meta.get("rss") or 0), int(meta.get("pid") or 0), str(meta.get("replica") or "")
        futures = self.futures
        for k in range(n):
            i = first + k
            fut = futures[i]
            if fut.done():
                continue
            fut._received = now
            if timed:
                fut._worker = (t0[k], t1[k], cpu[k], rss, pid, replica)
            info = errors.get(str(i)) if errors else None
            if info is not None:
                fut.set_exception(build_error(info, o.exc_blobs.get(i), fut.call_id))
            elif values is None:
                fut.set_exception(_unpickle_error(fut.call_id, o.load_error))
            else:
                fut.set_result(values[k])
            self.unresolved -= 1
            self.job.item_done(fut)

    def fail(self, exc: BaseException, now: float) -> None:
        for f in self.futures:
            if not f.done():
                f._received = now
                f.set_exception(exc)
                self.unresolved -= 1
                self.job.item_done(f)

    def release(self) -> None:
        for f in self.futures:
            f._request = None
        self.items = b""


class SliceRequest(Request):
    """Calls whose outcomes go straight into the job's result list at ``offset`` (map)."""

    __slots__ = ("offset", "sent", "submitted")

    def __init__(self, call_id: str, job: Job, offset: int, n: int, items: bytes, submitted: float) -> None:
        super().__init__(call_id, job, n, items)
        self.offset = offset
        self.submitted = submitted
        self.sent: float | None = None  # first sent (the calls have no futures to keep it)

    def note_sent(self, now: float, attempt: int) -> None:
        if self.sent is None:
            self.sent = now

    def apply(self, o: Outcome) -> None:
        if self.cancelled:
            return
        first, n, values, errors, now = o.first, o.n, o.values, o.errors, o.received
        already = self._claim(first, n)
        job = self.job
        results = job.results
        assert results is not None
        base = self.offset + first
        if values is None:
            values = [_unpickle_error(job.call_id(base + k), o.load_error) for k in range(n)]
            errors = {str(first + k): None for k in range(n)}
        if already:  # a retried request answered twice: keep the first outcome
            keep = set(already)
            for k in range(n):
                if first + k not in keep:
                    results[base + k] = values[k]
        else:
            results[base : base + n] = values
        first_error: tuple[int, BaseException] | None = None
        failed = 0
        for key, info in (errors or {}).items():
            i = int(key)
            if not first <= i < first + n or (already and i in already):
                continue
            pos = self.offset + i
            exc = results[pos] if info is None else build_error(info, o.exc_blobs.get(i), job.call_id(pos))
            results[pos] = exc
            failed += 1
            if first_error is None:
                first_error = (pos, exc)
        fresh = n - (len(already) if already else 0)
        stats = job.stats
        stats.record_outcome(fresh, failed, now - self.submitted, now)
        t0, t1, cpu = _timing(o.timing, n)
        if t0:
            job.record_work(t0, t1, cpu)
        answered = range(n) if not already else [k for k in range(n) if first + k not in keep]
        replica = str(o.meta.get("replica") or "")
        stats.record_rows(self.submitted, self.sent, now, answered, (t0, t1) if t0 else None, replica)
        job.slots_done(fresh, first_error, failed)

    def fail(self, exc: BaseException, now: float) -> None:
        if self.cancelled or self.unresolved == 0:
            return
        job = self.job
        results = job.results
        assert results is not None
        todo = [k for k in range(self.n) if not self.is_resolved(k)]
        for k in todo:
            results[self.offset + k] = exc
        self.unresolved = 0
        job.stats.record_outcome(len(todo), len(todo), now - self.submitted, now)
        job.stats.record_rows(self.submitted, self.sent, now, range(len(todo)), None, "")
        job.slots_done(len(todo), (self.offset + todo[0], exc) if todo else None, len(todo))


def _timing(timing: Any, n: int) -> tuple[list[float], list[float], list[float]]:
    """Per-item (started, finished, cpu seconds) lists from an outcome, or empty ones."""
    try:
        t0, t1, cpu = timing
        if len(t0) == n and len(t1) == n and len(cpu) == n:
            return t0, t1, cpu
    except (TypeError, ValueError):
        pass
    return [], [], []


def _unpickle_error(call_id: str, load_error: BaseException | None) -> SerializationError:
    err = SerializationError(
        f"the result of call {call_id} could not be unpickled here: "
        f"{type(load_error).__name__}: {load_error}; return plain data or types importable on the client"
    )
    err.__cause__ = load_error
    return err


class _SendFunction(Exception):
    """The replica lacks a function sent by reference: send the request again with it."""


#: Seconds between two halvings of the concurrency window (a burst of refusals is one event).
CONGESTION_GAP = 0.2
#: Seconds to open a connection to the runtime before it counts as unavailable.
CONNECT_TIMEOUT = 30.0
#: Straggler hedging: how often a hedged request looks again while its job has no latency
#: percentile yet, and the share of max_concurrency that backups may add in flight.
HEDGE_POLL = 0.1
HEDGE_SHARE = 0.25
#: Backups per request at most: a backup may meet the same slow replica (the ingress picks),
#: so a second one goes out if the first is as late.
HEDGE_MAX_BACKUPS = 2


#: Bytes read after a streamed answer's END frame (its closing chunk) before its connection
#: may be reused.
_MAX_TRAILING = 64 * 1024


def _aiohttp_transport(endpoint: Endpoint, limit: int, read_timeout: float, **options: Any) -> transport.Transport:
    return transport.AiohttpTransport(
        endpoint.url,
        limit=limit,
        ssl_context=endpoint.ssl,
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=read_timeout,
        path=protocol.INVOKE_PATH,
        **options,
    )


class _Retry(Exception):
    """A transport failure worth another attempt; ``unavailable``: nothing ran (the runtime is
    not there yet: refused connection, 502/503/504/429)."""

    def __init__(
        self, cause: str, retry_after: float | None = None, *, unavailable: bool = False, maybe_ran: bool = False
    ) -> None:
        super().__init__(cause)
        self.retry_after = retry_after
        self.unavailable = unavailable
        #: A gateway's 502/504: the call may have started behind it (and, if durable, run on).
        self.maybe_ran = maybe_ran


def build_error(info: dict[str, Any], exc_blob: bytes | None, call_id: str) -> BaseException:
    """The exception a call's error outcome stands for, with the remote traceback attached."""
    kind = info.get("kind")
    message = str(info.get("message", ""))
    tb = str(info.get("traceback", "") or "")
    type_name = str(info.get("type", "Exception"))
    exc: BaseException
    if kind == protocol.ERR_USER:
        restored: Any = None
        if exc_blob is not None:
            try:
                restored = serialize.loads(exc_blob)
            except Exception:  # noqa: BLE001 - fall back to RemoteError below
                restored = None
        if isinstance(restored, Exception):
            exc = restored
        else:
            why = info.get("unpicklable")
            note = f" (its type could not be recreated here{': ' + str(why) if why else ''})"
            exc = RemoteError(type_name, message + note, tb, call_id=call_id)
    elif kind == protocol.ERR_TIMEOUT:
        exc = CallTimeoutError(f"call {call_id}: {message}; give it a larger timeout= or split the work")
    elif kind == protocol.ERR_CRASHED:
        exc = WorkerCrashedError(
            f"call {call_id}: {message}; the other calls are unaffected. If it ran out of memory, "
            "give it more with runtime_memory="
        )
    elif kind == protocol.ERR_SERIALIZATION:
        exc = SerializationError(f"call {call_id}: {message}")
    elif kind == protocol.ERR_STORAGE:
        hint = runtime_sas_hint(message)
        exc = StorageError(f"call {call_id}: {message}" + (f"; {hint}" if hint else ""))
    else:
        exc = RemoteError(type_name, f"the runtime failed running call {call_id}: {message}", tb, call_id=call_id)
    if tb:
        exc.__cause__ = RemoteTraceback(serialize.add_source_lines(tb))
    return exc


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff(attempt: int, retry_after: float | None = None) -> float:
    """Full-jitter exponential backoff; never shorter than a server's Retry-After."""
    delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP))
    return delay


class Invoker:
    def __init__(self, *, max_concurrency: int, retries: int, stats: Stats, max_frame: int = protocol.DEFAULT_MAX_FRAME) -> None:
        self._limit = max_concurrency
        #: Adaptive concurrency: requests allowed in flight now (at most ``max_concurrency``).
        #: Halved (at most every CONGESTION_GAP s) when the runtime says it is unavailable or
        #: throttled (refused connection, 429, 503); one more per request delivered, so it
        #: regains its size in a few round trips once replicas are there.
        self._window = float(max_concurrency)
        self._last_cut = 0.0
        self._retries = retries
        #: What to do with calls' output: "collect" (futures' logs), "stream" (also print it
        #: as it comes) or "off".
        self.logs = "collect"
        self.log_printer = LogPrinter()
        self._stats = stats
        self._max_frame = max_frame
        self._pending: collections.deque[Request] = collections.deque()
        self._inflight: set[Request] = set()
        self._lanes: set[asyncio.Task[None]] = set()
        self._ready: asyncio.Future[Endpoint] = asyncio.get_running_loop().create_future()
        self._endpoint: Endpoint | None = None
        self._transport: transport.Transport | None = None
        #: Makes the transport once the runtime is up (a test puts a double here).
        self.transport_factory: Callable[[Endpoint, int, float], transport.Transport] | None = None
        self._url = ""
        self._read_timeout = 0.0
        self._unavailable_since: float | None = None
        self._transfers: Transfers | None = None
        self._closing = False
        #: Straggler hedging: backups in flight, and at most how many (beyond max_concurrency).
        self._hedging = 0
        self._hedge_limit = max(1, int(max_concurrency * HEDGE_SHARE))

    # -- lifecycle -------------------------------------------------------------------

    def attach(self, endpoint: Endpoint, transfers: Transfers | None = None) -> None:
        """The runtime is up: open the session and let the lanes go."""
        self._transfers = transfers
        # No overall deadline: a call may wait in a replica's queue for a long time, and the
        # runtime enforces the call's own timeout. Liveness comes from heartbeats instead: no
        # byte for three of them means the replica or the connection died.
        self._read_timeout = 3 * endpoint.heartbeat + 5
        factory = self.transport_factory or _aiohttp_transport
        self._transport = factory(endpoint, self.connection_limit, self._read_timeout)
        self._endpoint = endpoint
        self._url = endpoint.url.rstrip("/") + protocol.INVOKE_PATH
        if not self._ready.done():
            self._ready.set_result(endpoint)

    def fail_start(self, exc: BaseException) -> None:
        if not self._ready.done():
            self._ready.set_exception(exc)
            self._ready.exception()  # retrieved: lanes report it per call

    async def aclose(self) -> None:
        """Abandon every queued and in-flight call, stop the lanes, close the session."""
        self._closing = True
        closed = RuntimeError("the executor was closed before the call finished")
        for req in [*self._inflight, *self._pending]:
            self._abandon(req, closed)
        self._pending.clear()
        for lane in list(self._lanes):
            lane.cancel()
        if self._lanes:
            await asyncio.gather(*self._lanes, return_exceptions=True)
        if not self._ready.done():
            self._ready.cancel()
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None

    def _abandon(self, req: Request, exc: BaseException) -> None:
        """Settle a request nobody will deliver: futures are cancelled, a map's job fails."""
        if isinstance(req, FutureRequest):
            for f in req.futures:
                f.cancel("the executor was closed")
        else:
            req.fail(exc, time.time())
        req.cancel()
        req.release()

    # -- queueing --------------------------------------------------------------------

    def enqueue(self, req: Request) -> None:
        if self._closing:
            raise RuntimeError("the executor is closed")
        self._pending.append(req)
        self._add_lanes()

    def _add_lanes(self) -> None:
        if not self._pending:
            return
        want = min(int(self._window), len(self._lanes) + len(self._pending))
        loop = asyncio.get_running_loop()
        while len(self._lanes) < want:
            self._lanes.add(loop.create_task(self._lane()))

    def _congested(self) -> None:
        now = time.monotonic()
        if now - self._last_cut < CONGESTION_GAP:
            return
        self._last_cut = now
        self._window = max(1.0, self._window / 2)
        stats = self._stats
        stats.concurrency_cuts += 1
        stats.concurrency_low = min(stats.concurrency_low or self._limit, int(self._window))

    def _delivered(self) -> None:
        if self._window < self._limit:
            self._window = min(float(self._limit), self._window + 1)
            self._add_lanes()

    @property
    def connection_limit(self) -> int:
        """Connections the session may open: one per request in flight, and room for backups."""
        return self._limit + self._hedge_limit

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def demand(self) -> int:
        """Requests this client would have in flight now: sent, and queued up to max_concurrency
        (the runtime sizes its replicas from it)."""
        return min(self._limit, len(self._inflight) + len(self._pending))

    def calls_in_flight(self, job: Job) -> int:
        """Calls of ``job`` sent and not answered yet."""
        return sum(r.unresolved for r in self._inflight if r.job is job)

    async def _lane(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        try:
            await self._lane_loop(me)  # type: ignore[arg-type]
        finally:
            # Leave the count in the same step as the last look at the queue, so a request
            # enqueued right after always finds a lane or starts one.
            self._lanes.discard(me)  # type: ignore[arg-type]

    async def _lane_loop(self, me: asyncio.Task[None]) -> None:
        ready = self._ready
        if not ready.done():
            try:
                await asyncio.shield(ready)
            except asyncio.CancelledError:
                if self._closing or not ready.cancelled():
                    raise
            except BaseException:  # noqa: BLE001 - the runtime did not start: handled below
                pass
        if ready.cancelled():
            self._fail_all_pending(RuntimeError("the executor was closed before its runtime started"))
            return
        start_error = ready.exception()
        if start_error is not None:
            self._fail_all_pending(start_error)
            return
        pending = self._pending
        while pending:
            if len(self._lanes) > int(self._window):  # the window shrank: this lane goes
                return
            req = pending.popleft()
            if req.unresolved == 0 or req.cancelled:
                req.release()
                continue
            req.lane = me
            self._inflight.add(req)
            try:
                await self._deliver(req)
            except asyncio.CancelledError:
                if self._closing or not req.cancelled:
                    raise
                # The request was abandoned (its calls cancelled): the lane carries on.
                uncancel = getattr(me, "uncancel", None)
                if uncancel is not None:
                    uncancel()
            finally:
                self._inflight.discard(req)
                req.lane = None
                if self._transfers is not None:
                    self._transfers.done(req)
                req.release()

    def _fail_all_pending(self, exc: BaseException) -> None:
        while self._pending:
            req = self._pending.popleft()
            self._fail(req, exc)
            req.release()

    # -- delivery --------------------------------------------------------------------

    async def _deliver(self, req: Request) -> None:
        self._stats.requests += 1
        ep = self._endpoint
        assert ep is not None
        last: _Retry | None = None
        attempt = 0
        while True:
            try:
                if req.job.hedge is not None:
                    await self._hedged(req, attempt, ep)
                else:  # _send, inlined: one coroutine frame less per call in flight (inflight.py)
                    try:
                        await self._attempt(req, attempt, ep)
                    except _SendFunction:
                        req.with_fn = True
                        await self._attempt(req, attempt, ep)
                self._unavailable_since = None  # the runtime answers
                self._delivered()
                return
            except _Retry as r:
                if r.unavailable:
                    self._congested()
                if req.unresolved == 0:
                    return
                last = r
                attempt += 1
                starting = False
                if r.unavailable and ep.startup_timeout:
                    # One window for the whole runtime, not one per request: once it has been
                    # unavailable for startup_timeout, every call fails at once instead of
                    # waiting a window each, wave after wave.
                    now = time.monotonic()
                    if self._unavailable_since is None:
                        self._unavailable_since = now
                    starting = now - self._unavailable_since < ep.startup_timeout
                    if not starting:
                        break
                if attempt > self._retries and not starting:
                    break
                self._stats.retries += 1
                delay = backoff(min(attempt - 1, 7), r.retry_after)
                log.debug("retrying %s in %.2f s after: %s", req.call_id, delay, r)
                await asyncio.sleep(delay)
            except AsyncCAExecError as exc:
                self._fail(req, exc)
                return
            except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # a bug must fail its calls, not kill the lane and hang them
                log.exception("delivering %s failed unexpectedly", req.call_id)
                self._fail(req, InvocationError(f"call {req.call_id} failed in the client: {type(exc).__name__}: {exc}"))
                return
        if last is not None and last.unavailable and ep.startup_timeout and self._unavailable_since is not None:
            waited = time.monotonic() - self._unavailable_since
            message = (
                f"call {req.call_id} could not be delivered: the runtime was unavailable for {waited:.0f} s "
                f"(startup_timeout={ep.startup_timeout:g} s); it may be failing to start, see its logs "
                f"(az containerapp logs show); last error: {last}"
            )
        else:
            message = f"call {req.call_id} could not be delivered after {attempt} attempt(s); last error: {last}"
        self._fail(req, InvocationError(message))

    def _fail(self, req: Request, exc: BaseException) -> None:
        req.fail(exc, time.time())

    async def _send(self, req: Request, attempt: int, ep: Endpoint) -> None:
        """One attempt; sent again at once with the function if the runtime does not have it."""
        try:
            await self._attempt(req, attempt, ep)
        except _SendFunction:
            req.with_fn = True
            await self._attempt(req, attempt, ep)

    async def _hedged(self, req: Request, attempt: int, ep: Endpoint) -> None:
        """Straggler hedging: one attempt and, if it outlasts the job's latency percentile, a
        backup (signed as a new attempt, so a replica takes it as such), and a second one if
        that is as late. The first to answer every call wins; the others are cut, which closes
        their connections, so their runtimes drop the call (killing the worker running it). An
        error counts only once every attempt has failed."""
        job = req.job
        loop = asyncio.get_running_loop()
        attempts: set[asyncio.Future[None]] = set()
        primary = asyncio.ensure_future(self._contend(req, attempt, ep, attempts, backup=False))
        attempts.add(primary)
        last_sent = loop.time()
        backups = 0
        error: BaseException | None = None
        denied = False  # a backup was due but over budget: look again in HEDGE_POLL
        try:
            while attempts:
                timeout = None
                if backups < HEDGE_MAX_BACKUPS:
                    after = job.hedge_after()
                    if after is None or denied:
                        timeout = HEDGE_POLL
                    else:
                        timeout = max(0.0, last_sent + after - loop.time())
                done, _ = await asyncio.wait(attempts, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    attempts.discard(t)
                    if t.cancelled():  # cut by the winner, whose own end is in ``done`` too
                        continue
                    exc = t.exception()
                    if exc is None or req.unresolved == 0:
                        return
                    if error is None or t is primary:
                        error = exc
                if done or backups >= HEDGE_MAX_BACKUPS:
                    continue
                after = job.hedge_after()
                now = loop.time()
                if after is None or now - last_sent < after:
                    continue
                denied = not self._may_hedge(req)
                if denied:
                    continue
                backups += 1
                job.hedges += 1
                self._stats.hedges += 1
                self._hedging += 1
                log.debug("call %s: no answer %.3f s after its last send: backup %d", req.call_id, now - last_sent, backups)
                last_sent = now
                backup = asyncio.ensure_future(self._contend(req, attempt + backups, ep, attempts, backup=True))
                backup.add_done_callback(self._hedge_done)
                attempts.add(backup)
            assert error is not None
            raise error
        finally:
            for t in attempts:
                t.cancel()
            if attempts:
                await asyncio.gather(*attempts, return_exceptions=True)

    async def _contend(
        self, req: Request, attempt: int, ep: Endpoint, attempts: set[asyncio.Future[None]], *, backup: bool
    ) -> None:
        """One side of a hedged request. The winner cuts the others as soon as its answer is
        complete (an outcome the other side brings meanwhile is dropped: see ``_claim``)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self._send(req, attempt, ep)
        req.job.note_latency(loop.time() - started)
        if backup:
            self._stats.hedges_won += 1
        me = asyncio.current_task()
        for t in attempts:
            if t is not me:
                t.cancel()

    def _may_hedge(self, req: Request) -> bool:
        if req.unresolved == 0 or req.cancelled or self._hedging >= self._hedge_limit:
            return False
        if req.durable:  # its outcome may come through Blob storage: one attempt at a time
            return False
        return req.job.may_hedge()

    def _hedge_done(self, _fut: asyncio.Future[None]) -> None:
        self._hedging -= 1

    async def _attempt(self, req: Request, attempt: int, ep: Endpoint) -> None:
        t = self._transfers
        if t is not None:
            req.durable = t.durable(req)
            extra, items_inline, fn_inline = await t.header(req)
            body = req.body(extra, items_inline=items_inline, fn_inline=fn_inline)
        else:
            body = req.body()
        if len(body) > ep.max_body:
            raise SerializationError(
                f"call {req.call_id}: its request is {len(body)} bytes, more than the runtime accepts "
                f"({ep.max_body} bytes); configure azure_storage so large arguments go through Blob storage, "
                "or read large data inside the function"
            )
        headers = protocol.signed_headers(ep.key, "POST", protocol.INVOKE_PATH, req.call_id, body, attempt=req.sends)
        req.sends += 1
        req.note_sent(time.time(), attempt)
        if req.with_fn:
            self._stats.function_uploads += 1
        tp = self._transport
        assert tp is not None
        headers["Content-Type"] = protocol.REQUEST_CONTENT_TYPE
        try:
            reply = await tp.post(headers, body)
        except transport.TLSError as exc:
            raise InvocationError(
                f"TLS verification of {self._url} failed: {exc}; behind a proxy or with a private CA, "
                "name its certificates with azure.ca_bundle"
            ) from None
        except transport.ProxyError as exc:
            if exc.status >= 500:  # the proxy could not reach the runtime (yet): as a refused connection
                raise _Retry(str(exc), unavailable=True) from None
            raise InvocationError(  # 407 wants credentials, 403 forbids the host: no retry mends that
                f"the proxy refused to connect to {self._url}: {exc}; check HTTPS_PROXY/HTTP_PROXY (credentials "
                "go in its URL: http://user:password@host:port) or name the runtime's host in NO_PROXY"
            ) from None
        except transport.ConnectError as exc:  # nothing was sent: the runtime is not there
            raise _Retry(str(exc), unavailable=True) from None
        except (transport.DisconnectedError, transport.ReadTimeoutError) as exc:
            if not req.durable:
                raise _Retry(self._cause(exc)) from None
            # Sent, and no answer's head came: a durable call may be running on, its outcome
            # bound for Blob storage (a resend would run it twice).
            await self._recover(req, self._cause(exc))
            return
        except transport.TransportError as exc:
            raise _Retry(self._cause(exc)) from None
        del headers, body  # sent: not kept while the call runs
        #: A durable call whose answer was cut: why. Recovered from Blob storage only once the
        #: connection is closed, so the runtime sees the cut and sends the outcome there
        #: instead of running on for a client that is not reading.
        recover: str | None = None
        ended = False
        #: Read to its end: its connection may carry the next request. Otherwise (an error, a
        #: cut, cancellation by a hedge's winner or the map) it is closed, so the runtime sees it.
        reusable = False
        try:
            if reply.status != 200:
                try:
                    await self._refused(reply, req)
                except _Retry as r:
                    if not (r.maybe_ran and req.durable):
                        raise
                    recover = str(r)  # a gateway timeout: the call may run on
            if recover is None:
                if reply.content_length is not None:
                    data = await reply.read()
                    ended = reusable = await self._frames(req, protocol.iter_frames(data, max_frame=self._max_frame))
                else:
                    ended = await self._stream(req, reply)
                    # The body's last chunk follows the END frame: read it, so the connection
                    # is at a request boundary (no bytes after the END frame) and may be reused.
                    reusable = ended and not await reply.read_upto(_MAX_TRAILING)
        except transport.TransportError as exc:
            if not req.durable:
                raise _Retry(self._cause(exc)) from None
            recover = self._cause(exc)  # the call may be running on: its outcome comes through Blob storage
        except protocol.ProtocolError as exc:
            raise _Retry(f"malformed response: {exc}") from None
        finally:
            if reusable:
                reply.release()
            else:
                reply.close()
        if recover is None and not ended:
            if not req.durable:
                raise _Retry("the response ended before all results arrived")
            recover = "the response ended early"
        if recover is not None:
            await self._recover(req, recover)

    def _cause(self, exc: transport.TransportError) -> str:
        if isinstance(exc, transport.ReadTimeoutError):
            return f"no data from the runtime for {self._read_timeout:.0f} s"
        return str(exc)

    async def _recover(self, req: Request, cause: str) -> None:
        """A durable call's stream was cut: the runtime goes on with it, says it is alive in Blob
        storage and writes its outcome there at the end. Wait for that; send the call again only
        if its runtime is silent (then it has died)."""
        t = self._transfers
        assert t is not None
        from . import transfer

        deadline = time.monotonic() + req.job.timeout * req.n + 2 * transfer.ALIVE_GRACE
        cut = last_change = time.monotonic()
        last_alive: str | None = None
        delay = 0.25
        log.debug("call %s: stream cut (%s); waiting for its outcome in Blob storage", req.call_id, cause)
        while time.monotonic() < deadline:
            try:
                data = await t.final(req)
                if data is not None:
                    if not await self._frames(req, protocol.iter_frames(data, max_frame=self._max_frame), replay=True):
                        raise protocol.ProtocolError("it ends early")
                    self._stats.recovered += 1
                    t.done(req, recovered=True)
                    return
            except protocol.ProtocolError as exc:
                raise InvocationError(f"call {req.call_id}: its outcome in Blob storage is malformed: {exc}") from None
            alive = await t.alive(req)
            now = time.monotonic()
            if alive != last_alive:
                last_alive, last_change = alive, now
            silent = now - last_change
            if (alive is None and now - cut > transfer.ALIVE_GRACE) or (
                alive is not None and silent > 3 * transfer.ALIVE_INTERVAL
            ):
                raise _Retry(f"the runtime running it went silent after the stream was cut ({cause})")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 5.0)
        raise InvocationError(
            f"call {req.call_id}: its connection was cut ({cause}) and its outcome did not reach Blob storage "
            f"within its timeout; the runtime may have lost it"
        )

    async def _refused(self, resp: transport.Reply, req: Request) -> None:
        raw = await resp.read_upto(4096)
        try:
            doc = json.loads(raw)
            message, code = str(doc.get("error", "")), doc.get("code")
        except (ValueError, AttributeError):
            message, code = raw.decode("utf-8", "replace").strip()[:500], None
        status = resp.status
        if status == 429 or status >= 500:
            raise _Retry(
                f"HTTP {status}: {message}",
                _retry_after(resp.headers.get("retry-after")),
                # 503 and 429 mean the call never started (no replica yet, a draining one, or
                # throttling); after a 502/504 it may have run, so those count as retries.
                unavailable=status in (429, 503),
                maybe_ran=status in (502, 504),
            )
        if status == 409 and code == protocol.UNKNOWN_FUNCTION and not req.with_fn:
            raise _SendFunction()
        if (status == 409 and code == protocol.REPLAYED) or status == 408:
            # Not this client's doing (a proxy sent the request twice, or it crawled): send anew.
            raise _Retry(f"HTTP {status}: {message}")
        if status == 401:
            raise AuthenticationError(
                f"the runtime refused the signature of call {req.call_id}: {message}. The client's key "
                "does not match the runtime's; redeploy the runtime or fix its key"
            )
        if status == 413:
            raise SerializationError(f"call {req.call_id} is too large for the runtime: {message}")
        if status == 400:
            raise InvocationError(f"the runtime rejected call {req.call_id} as malformed (HTTP 400): {message}")
        if status == 404:
            raise InvocationError(f"{self._url} answered 404: the endpoint is not an async_ca_exec runtime of this version")
        raise InvocationError(f"the runtime answered HTTP {status} to call {req.call_id}: {message}")

    async def _stream(self, req: Request, reader: transport.Reply) -> bool:
        max_frame = self._max_frame
        while True:
            hdr = await reader.readexactly(protocol.FRAME_HEADER)
            ftype, length = protocol.parse_frame_header(hdr, max_frame=max_frame)
            payload = memoryview(await reader.readexactly(length)) if length else memoryview(b"")
            if await self._frames(req, iter(((ftype, payload),))):
                return True

    async def _frames(self, req: Request, frames: Any, *, replay: bool = False) -> bool:
        """Apply frames to the request's calls; True once the END frame is seen. ``replay``: the
        frames of a durable call from Blob, which repeat the logs the stream already brought."""
        if replay and req.log_parts is not None:
            req.log_parts = {}  # count again, to skip the parts the stream brought
        for ftype, payload in frames:
            if ftype == protocol.F_OUTCOME:
                self._outcome(req, payload)
            elif ftype == protocol.F_REF:
                ref = protocol.decode_ref(payload)
                if self._transfers is None:
                    raise protocol.ProtocolError("a reference frame, but this client has no Blob storage")
                if any(not req.is_resolved(i) for i in range(ref["first"], min(req.n, ref["first"] + ref["n"]))):
                    data = await self._transfers.fetch(ref["blob"], ref["sha256"], req)
                    self._outcome(req, memoryview(data))
                else:
                    req.blobs.append(ref["blob"])
            elif ftype == protocol.F_LOG:
                if self.logs == "off":
                    continue
                index, stream, text = protocol.decode_log(payload)
                if not 0 <= index < req.n or req.is_resolved(index):
                    continue
                if req.log_parts is None or req.log_parts_streamed is None:
                    req.log_parts, req.log_parts_streamed = {}, {}
                seen = req.log_parts[index] = req.log_parts.get(index, 0) + 1
                if replay and seen <= req.log_parts_streamed.get(index, 0):
                    continue  # already came on the stream before the cut
                if not replay:
                    req.log_parts_streamed[index] = seen
                if isinstance(req, FutureRequest):
                    fut = req.futures[index]
                    fut._add_log(text)
                    job_index = fut.index
                else:
                    job_index = req.offset + index if isinstance(req, SliceRequest) else index
                if self.logs == "stream":
                    self.log_printer.write(job_index, stream, text)
            elif ftype == protocol.F_END:
                if req.unresolved > 0:
                    raise protocol.ProtocolError(f"response ended with {req.unresolved} call(s) unanswered")
                return True
        return False

    def _outcome(self, req: Request, payload: memoryview) -> None:
        meta, blob = protocol.decode_outcome_payload(payload)
        first, n = meta["first"], meta["n"]
        if first + n > req.n:
            raise protocol.ProtocolError(f"outcome for items {first}..{first + n - 1} of a request of {req.n}")
        values: list[Any] | None
        exc_blobs: dict[int, bytes] = {}
        load_error: BaseException | None = None
        timing: Any = None
        try:
            values, exc_blobs, timing = serialize.loads(blob)
            if len(values) != n:
                raise ValueError(f"{len(values)} results for {n} items")
        except Exception as exc:  # noqa: BLE001 - every item of the outcome gets the error
            values, load_error = None, exc
        req.apply(Outcome(first, n, values, exc_blobs, timing, meta.get("errors") or {}, load_error, meta, time.time()))
