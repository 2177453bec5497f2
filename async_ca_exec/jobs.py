"""Jobs (a function pickled once, and its calls) and the executor's running statistics.

A job's calls report either through a :class:`CallFuture` each (``submit``, ``imap``, the
Lithops facade) or, for ``map``, straight into the job's result list: ``map`` returns a list,
so a future per item would only cost time.
"""

from __future__ import annotations

import asyncio
import math
import time
from array import array
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .futures import CallFuture

if TYPE_CHECKING:
    from .invoker import Request


#: Per-call timing rows kept for ``plot()``: the first this many calls to get an answer.
ROW_LIMIT = 100_000
#: Distinct replica names kept; calls on further replicas are filed under ``OTHER_REPLICAS``.
REPLICA_LIMIT = 1024
OTHER_REPLICAS = "(other replicas)"
_NAN = math.nan
#: Straggler hedging: latencies kept per job, answers needed before the first backup, how
#: often the threshold is recomputed, its floors (x the median; seconds) and the budget.
HEDGE_SAMPLES = 512
HEDGE_MIN_SAMPLES = 16
HEDGE_EVERY = 16
HEDGE_MEDIAN_FACTOR = 1.5
HEDGE_FLOOR = 0.005
HEDGE_BUDGET = 2.0


class CallRows:
    """Timing rows of the first ``limit`` calls to get an answer, stored column-wise.

    Columns (epoch seconds, NaN when unknown): submitted, sent, started, finished, received,
    and an index into :attr:`replicas` (``""``: not known). 42 bytes a call; calls after the
    first ``limit`` are only counted in :attr:`dropped`, so a million-call ``imap`` keeps
    its memory flat. ``started``/``finished`` come from the worker's clock.
    """

    __slots__ = (
        "_replica_ids",
        "dropped",
        "finished",
        "limit",
        "received",
        "replica",
        "replicas",
        "sent",
        "started",
        "submitted",
    )

    def __init__(self, limit: int = ROW_LIMIT) -> None:
        self.limit = limit
        self.dropped = 0
        self.submitted = array("d")
        self.sent = array("d")
        self.started = array("d")
        self.finished = array("d")
        self.received = array("d")
        self.replica = array("H")
        self.replicas: list[str] = []
        self._replica_ids: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.received)

    @property
    def full(self) -> bool:
        return len(self.received) >= self.limit

    def _replica_id(self, name: str) -> int:
        k = self._replica_ids.get(name)
        if k is None:
            if len(self.replicas) >= REPLICA_LIMIT:
                name = OTHER_REPLICAS
                k = self._replica_ids.get(name)
            if k is None:
                k = self._replica_ids[name] = len(self.replicas)
                self.replicas.append(name)
        return k

    def add(
        self, submitted: float, sent: float | None, started: float | None, finished: float | None, received: float, replica: str
    ) -> None:
        if len(self.received) >= self.limit:
            self.dropped += 1
            return
        self.submitted.append(submitted)
        self.sent.append(_NAN if sent is None else sent)
        self.started.append(_NAN if started is None else started)
        self.finished.append(_NAN if finished is None else finished)
        self.received.append(received)
        self.replica.append(self._replica_id(replica))

    def add_many(
        self,
        submitted: float,
        sent: float | None,
        started: Sequence[float] | None,
        finished: Sequence[float] | None,
        received: float,
        replica: str,
        n: int,
    ) -> None:
        """``n`` rows that share a request's times (and, if given, each its worker's times):
        one extend per column instead of six appends per call."""
        take = min(n, self.limit - len(self.received))
        self.dropped += n - take
        if take == 0:
            return
        self.submitted.extend(array("d", (submitted,)) * take)
        self.sent.extend(array("d", (_NAN if sent is None else sent,)) * take)
        if started is None or finished is None:
            self.started.extend(array("d", (_NAN,)) * take)
            self.finished.extend(array("d", (_NAN,)) * take)
        else:
            self.started.fromlist(list(started[:take]))
            self.finished.fromlist(list(finished[:take]))
        self.received.extend(array("d", (received,)) * take)
        self.replica.extend(array("H", (self._replica_id(replica),)) * take)


class Stats:
    """Counters and timings over every call of one executor."""

    def __init__(self) -> None:
        self.submitted = 0
        self.succeeded = 0
        self.failed = 0
        self.cancelled = 0
        self.requests = 0
        self.retries = 0
        self.function_uploads = 0
        self.recovered = 0
        self.latencies = array("d")
        self.worker_seconds = 0.0
        self.cpu_seconds = 0.0
        self.first_submitted: float | None = None
        self.last_received: float | None = None
        #: Per-call timing rows (bounded) for plot().
        self.rows = CallRows()
        #: Adaptive concurrency: how often the window was halved, and its lowest size.
        self.concurrency_cuts = 0
        self.concurrency_low: int | None = None
        #: Straggler hedging: backup requests sent, and those that answered first.
        self.hedges = 0
        self.hedges_won = 0

    def submitting(self, n: int, now: float) -> None:
        self.submitted += n
        if self.first_submitted is None:
            self.first_submitted = now

    def record(self, fut: CallFuture) -> None:
        if fut.cancelled():
            self.cancelled += 1
            return
        if fut.exception() is None:
            self.succeeded += 1
        else:
            self.failed += 1
        if fut._received is not None:
            self.latencies.append(fut._received - fut._submitted)
            self.last_received = fut._received
            w = fut._worker
            if w is None:
                self.rows.add(fut._submitted, fut._sent, None, None, fut._received, "")
            else:
                self.rows.add(fut._submitted, fut._sent, w[0], w[1], fut._received, w[5])

    def record_outcome(self, n: int, failed: int, latency: float, received: float) -> None:
        self.succeeded += n - failed
        self.failed += failed
        self.latencies.extend([latency] * n)
        self.last_received = received

    def record_work(self, seconds: float, cpu: list[float]) -> None:
        self.worker_seconds += seconds
        self.cpu_seconds += sum(cpu)

    def record_rows(
        self,
        submitted: float,
        sent: float | None,
        received: float,
        items: Sequence[int],
        timing: tuple[list[float], list[float]] | None,
        replica: str,
    ) -> None:
        """Timing rows for calls answered without a future (``map``'s result list).

        ``items`` are the indices into ``timing``'s (started, finished) lists of the calls
        answered now (without ``timing``: calls that failed before a worker reported times).
        """
        if timing is None:
            self.rows.add_many(submitted, sent, None, None, received, replica, len(items))
            return
        started, finished = timing
        if items == range(len(started)):  # every call of the request, in order
            self.rows.add_many(submitted, sent, started, finished, received, replica, len(items))
        else:
            self.rows.add_many(
                submitted, sent, [started[k] for k in items], [finished[k] for k in items], received, replica, len(items)
            )

    def summary(
        self, *, memory_mb: int | None = None, vcpus: float | None = None, prices: tuple[float, float] | None = None
    ) -> dict[str, Any]:
        """The counters, latency percentiles and resource use.

        ``memory_mb`` and ``vcpus``: what one call's worker is given (None: not known), for
        GiB-seconds and vCPU-seconds; ``prices``: USD per vCPU-second and per GiB-second, for
        an estimated cost (None: no cost, e.g. the local runtime).
        """
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return percentile(lat, p)

        wall = (
            self.last_received - self.first_submitted
            if self.last_received is not None and self.first_submitted is not None
            else None
        )
        done = self.succeeded + self.failed + self.cancelled
        return {
            "calls": {
                "submitted": self.submitted,
                "succeeded": self.succeeded,
                "failed": self.failed,
                "cancelled": self.cancelled,
                "pending": self.submitted - done,
            },
            "requests": self.requests,
            "retries": self.retries,
            "concurrency": {"halvings": self.concurrency_cuts, "lowest": self.concurrency_low},
            "hedges": {"sent": self.hedges, "won": self.hedges_won},
            "function_uploads": self.function_uploads,
            "recovered_from_storage": self.recovered,
            "wall_seconds": wall,
            "calls_per_second": (self.succeeded + self.failed) / wall if wall else None,
            "latency_seconds": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": lat[-1] if lat else None},
            "worker_seconds": self.worker_seconds,
            "worker_cpu_seconds": self.cpu_seconds,
            **self._usage(memory_mb, vcpus, prices),
        }

    def _usage(self, memory_mb: int | None, vcpus: float | None, prices: tuple[float, float] | None) -> dict[str, Any]:
        gib_seconds = self.worker_seconds * memory_mb / 1024 if memory_mb else None
        vcpu_seconds = self.worker_seconds * vcpus if vcpus is not None else None
        cost = None
        if prices is not None and gib_seconds is not None and vcpu_seconds is not None:
            cost = vcpu_seconds * prices[0] + gib_seconds * prices[1]
        return {
            "gib_seconds": gib_seconds,
            "vcpu_seconds": vcpu_seconds,
            "estimated_cost": cost,
            "currency": "USD" if cost is not None else None,
            "cost_basis": (
                "estimate: worker (active) seconds x the replica's vCPUs and GiB x the configured prices; "
                "ignores the monthly free grant, idle charges and request charges"
                if cost is not None
                else None
            ),
        }


def percentile(ordered: Any, p: float) -> float | None:
    """The nearest-rank ``p``-th percentile of the sorted sequence ``ordered`` (None if empty)."""
    if not len(ordered):
        return None
    return float(ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))])


class Job:
    """One function, pickled once, and the calls made with it.

    Completion is counted per call: through :meth:`item_done` (futures) or
    :meth:`slots_done` (result list). A job that is waited on as a whole (``map``) wakes its
    waiter when the last call is done or, with ``fail_fast``, at the first failure.
    """

    __slots__ = (
        "_changed",
        "_hedge_after",
        "_hedge_samples",
        "_hedge_seen",
        "_waiter",
        "errors",
        "fail_fast",
        "failed",
        "fn",
        "fn_hash",
        "hedge",
        "hedges",
        "key",
        "next_index",
        "pending",
        "requests",
        "results",
        "sealed",
        "sink",
        "stats",
        "timeout",
        "work_items",
        "work_seconds",
    )

    def __init__(
        self,
        key: str,
        fn: bytes,
        fn_hash: str,
        timeout: float,
        stats: Stats,
        *,
        fail_fast: bool = False,
        sink: Callable[[CallFuture], None] | None = None,
        collect: bool = False,
        hedge: float | None = None,
    ) -> None:
        self.key = key
        self.fn = fn
        self.fn_hash = fn_hash
        self.timeout = timeout
        self.stats = stats
        self.pending = 0
        self.sealed = False
        self.fail_fast = fail_fast
        #: The first failure: its exception (and, in result-list mode, its index).
        self.failed: tuple[int, BaseException] | None = None
        #: Calls that ended in an error so far (for progress bars).
        self.errors = 0
        #: Calls timed by a worker, and their seconds there (for chunksize="auto").
        self.work_items = 0
        self.work_seconds = 0.0
        self.sink = sink
        self._waiter: asyncio.Future[None] | None = None
        self._changed: asyncio.Future[None] | None = None
        self.next_index = 0
        #: Result-list mode: results (or exceptions) by input position.
        self.results: list[Any] | None = [] if collect else None
        self.requests: list[Request] = []
        #: Straggler hedging: the latency percentile after which a request gets a backup (None:
        #: off), the last HEDGE_SAMPLES request latencies, and the threshold they give.
        self.hedge = hedge
        self.hedges = 0
        self._hedge_samples = array("d")
        self._hedge_seen = 0
        self._hedge_after: float | None = None

    def note_latency(self, seconds: float) -> None:
        """A request of a hedged job was answered after ``seconds``: update the threshold now and
        then (a sort of at most HEDGE_SAMPLES values every HEDGE_EVERY answers)."""
        samples = self._hedge_samples
        if len(samples) < HEDGE_SAMPLES:
            samples.append(seconds)
        else:
            samples[self._hedge_seen % HEDGE_SAMPLES] = seconds
        self._hedge_seen += 1
        seen = self._hedge_seen
        if seen >= HEDGE_MIN_SAMPLES and (seen == HEDGE_MIN_SAMPLES or seen % HEDGE_EVERY == 0):
            ordered = sorted(samples)
            assert self.hedge is not None
            tail = ordered[min(len(ordered) - 1, int(self.hedge * len(ordered)))]
            self._hedge_after = max(tail, HEDGE_MEDIAN_FACTOR * ordered[len(ordered) // 2], HEDGE_FLOOR)

    def hedge_after(self) -> float | None:
        """Seconds after which a request of this job gets a backup; None until enough answers."""
        return self._hedge_after

    def may_hedge(self) -> bool:
        """Within the budget: backups stay below HEDGE_BUDGET x the tail share of the requests
        answered so far (a percentile of 0.9 allows one backup per five answers)."""
        assert self.hedge is not None
        return self.hedges < max(1.0, HEDGE_BUDGET * (1.0 - self.hedge) * self._hedge_seen)

    def call_id(self, index: int) -> str:
        return f"{self.key}-{index:05d}"

    def new_futures(self, loop: asyncio.AbstractEventLoop, n: int) -> list[CallFuture]:
        i = self.next_index
        self.next_index += n
        now = time.time()
        self.pending += n
        self.stats.submitting(n, now)
        return [CallFuture(loop, self, k, now) for k in range(i, i + n)]

    def new_slots(self, n: int) -> tuple[int, float]:
        """Reserve ``n`` places in the result list; return the first index and the time."""
        assert self.results is not None
        i = self.next_index
        self.next_index += n
        self.results.extend([None] * n)
        now = time.time()
        self.pending += n
        self.stats.submitting(n, now)
        return i, now

    def item_done(self, fut: CallFuture) -> None:
        self.pending -= 1
        if not fut.cancelled() and fut.exception() is not None:
            self.errors += 1
        self.stats.record(fut)
        if self.sink is not None:
            self.sink(fut)
        if self.fail_fast and self.failed is None and not fut.cancelled():
            exc = fut.exception()
            if exc is not None:
                self.failed = (fut.index, exc)
        self._wake()

    def record_work(self, t0: list[float], t1: list[float], cpu: list[float]) -> None:
        """Worker times of calls answered now: the executor's totals and this job's (which
        ``chunksize="auto"`` sizes batches from)."""
        seconds = sum(t1) - sum(t0)
        self.work_items += len(t0)
        self.work_seconds += seconds
        self.stats.record_work(seconds, cpu)
        self._note_change()

    def changed(self) -> asyncio.Future[None]:
        """A future set at this job's next outcome, worker timing or failure (what
        ``chunksize="auto"`` waits for while it sizes batches)."""
        f = self._changed
        if f is None or f.done():
            f = self._changed = asyncio.get_running_loop().create_future()
        return f

    def _note_change(self) -> None:
        f = self._changed
        if f is not None and not f.done():
            f.set_result(None)

    def slots_done(self, n: int, first_error: tuple[int, BaseException] | None, failed: int = 0) -> None:
        self.pending -= n
        self.errors += failed
        if self.fail_fast and self.failed is None and first_error is not None:
            self.failed = first_error
        self._wake()

    def _wake(self) -> None:
        self._note_change()
        w = self._waiter
        if w is not None and not w.done() and (self.failed is not None or (self.sealed and self.pending == 0)):
            w.set_result(None)

    def cancel(self) -> None:
        """Abandon every request of this job that is still queued or in flight; their calls
        not answered yet end as cancelled (so ``pending`` returns to 0)."""
        unanswered = 0
        for req in self.requests:
            if not req.cancelled:
                unanswered += req.unresolved
                req.unresolved = 0
                req.cancel()
        self.requests.clear()
        if unanswered:
            self.stats.cancelled += unanswered
            self.pending -= unanswered
            self._wake()

    async def wait(self) -> None:
        """Until every call is done (or, with ``fail_fast``, one has failed)."""
        self.sealed = True
        if self.pending == 0 or self.failed is not None:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter
