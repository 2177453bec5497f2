"""Jobs (a function pickled once, and its calls) and the executor's running statistics."""

from __future__ import annotations

import asyncio
import time
from array import array
from typing import Any, Callable

from .futures import CallFuture


class Stats:
    """Counters and timings over every call of one executor."""

    def __init__(self) -> None:
        self.submitted = 0
        self.succeeded = 0
        self.failed = 0
        self.cancelled = 0
        self.requests = 0
        self.retries = 0
        self.latencies = array("d")
        self.worker_seconds = 0.0
        self.cpu_seconds = 0.0
        self.first_submitted: float | None = None
        self.last_received: float | None = None

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
        if w is not None:
            self.worker_seconds += w[1] - w[0]
            self.cpu_seconds += w[2]

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            if not lat:
                return None
            return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))]

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
            "wall_seconds": wall,
            "calls_per_second": (self.succeeded + self.failed) / wall if wall else None,
            "latency_seconds": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": lat[-1] if lat else None},
            "worker_seconds": self.worker_seconds,
            "worker_cpu_seconds": self.cpu_seconds,
        }


class Job:
    """One function, pickled once, and the calls made with it.

    ``item_done`` is called exactly once per call future, when it gets a result, an
    exception or is cancelled; a job that is waited on as a whole (``map``) wakes its waiter
    when the last call is done or, with ``fail_fast``, at the first failure.
    """

    __slots__ = (
        "key", "fn", "fn_hash", "timeout", "stats", "pending", "sealed", "fail_fast", "failed",
        "sink", "_waiter", "next_index",
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
    ) -> None:
        self.key = key
        self.fn = fn
        self.fn_hash = fn_hash
        self.timeout = timeout
        self.stats = stats
        self.pending = 0
        self.sealed = False
        self.fail_fast = fail_fast
        self.failed: CallFuture | None = None
        self.sink = sink
        self._waiter: asyncio.Future[None] | None = None
        self.next_index = 0

    def new_future(self, loop: asyncio.AbstractEventLoop) -> CallFuture:
        i = self.next_index
        self.next_index += 1
        now = time.time()
        fut = CallFuture(loop, f"{self.key}-{i:05d}", i, self, now)
        self.pending += 1
        st = self.stats
        st.submitted += 1
        if st.first_submitted is None:
            st.first_submitted = now
        return fut

    def item_done(self, fut: CallFuture) -> None:
        self.pending -= 1
        self.stats.record(fut)
        if self.sink is not None:
            self.sink(fut)
        if self.fail_fast and self.failed is None and not fut.cancelled() and fut.exception() is not None:
            self.failed = fut
        w = self._waiter
        if w is not None and not w.done() and (self.failed is not None or (self.sealed and self.pending == 0)):
            w.set_result(None)

    async def wait(self) -> None:
        """Until every call is done (or, with ``fail_fast``, one has failed)."""
        self.sealed = True
        if self.pending == 0 or self.failed is not None:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter
