"""Jobs (a function pickled once, and its calls) and the executor's running statistics.

A job's calls report either through a :class:`CallFuture` each (``submit``, ``imap``, the
Lithops facade) or, for ``map``, straight into the job's result list: ``map`` returns a list,
so a future per item would only cost time.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .futures import CallFuture

if TYPE_CHECKING:
    from .invoker import Request


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

    def record_outcome(self, n: int, failed: int, latency: float, received: float) -> None:
        self.succeeded += n - failed
        self.failed += failed
        self.latencies.extend([latency] * n)
        self.last_received = received

    def record_work(self, t0: list[float], t1: list[float], cpu: list[float]) -> None:
        self.worker_seconds += sum(t1) - sum(t0)
        self.cpu_seconds += sum(cpu)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            if not lat:
                return None
            return lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))]

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
            "function_uploads": self.function_uploads,
            "recovered_from_storage": self.recovered,
            "wall_seconds": wall,
            "calls_per_second": (self.succeeded + self.failed) / wall if wall else None,
            "latency_seconds": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": lat[-1] if lat else None},
            "worker_seconds": self.worker_seconds,
            "worker_cpu_seconds": self.cpu_seconds,
        }


class Job:
    """One function, pickled once, and the calls made with it.

    Completion is counted per call: through :meth:`item_done` (futures) or
    :meth:`slots_done` (result list). A job that is waited on as a whole (``map``) wakes its
    waiter when the last call is done or, with ``fail_fast``, at the first failure.
    """

    __slots__ = (
        "_waiter",
        "fail_fast",
        "failed",
        "fn",
        "fn_hash",
        "key",
        "next_index",
        "pending",
        "requests",
        "results",
        "sealed",
        "sink",
        "stats",
        "timeout",
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
        self.sink = sink
        self._waiter: asyncio.Future[None] | None = None
        self.next_index = 0
        #: Result-list mode: results (or exceptions) by input position.
        self.results: list[Any] | None = [] if collect else None
        self.requests: list[Request] = []

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
        self.stats.record(fut)
        if self.sink is not None:
            self.sink(fut)
        if self.fail_fast and self.failed is None and not fut.cancelled():
            exc = fut.exception()
            if exc is not None:
                self.failed = (fut.index, exc)
        self._wake()

    def slots_done(self, n: int, first_error: tuple[int, BaseException] | None) -> None:
        self.pending -= n
        if self.fail_fast and self.failed is None and first_error is not None:
            self.failed = first_error
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done() and (self.failed is not None or (self.sealed and self.pending == 0)):
            w.set_result(None)

    def cancel(self) -> None:
        """Abandon every request of this job that is still queued or in flight."""
        for req in self.requests:
            req.cancel()
        self.requests.clear()

    async def wait(self) -> None:
        """Until every call is done (or, with ``fail_fast``, one has failed)."""
        self.sealed = True
        if self.pending == 0 or self.failed is not None:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter
