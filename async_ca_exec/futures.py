"""CallFuture: an :class:`asyncio.Future` for one remote call, with its stats and logs."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .invoker import Request
    from .jobs import Job


class CallFuture(asyncio.Future):  # type: ignore[type-arg]
    """The pending result of one call.

    Awaitable (``await fut`` returns the result or raises the call's exception) and usable
    with :func:`asyncio.wait`, :func:`asyncio.gather` and :func:`asyncio.as_completed`.
    ``result()`` raises :class:`asyncio.InvalidStateError` until the call is done.
    Cancelling it aborts the request and, on the runtime, kills the worker running it.
    """

    __slots__ = (
        "_attempts",
        "_call_id",
        "_collected",
        "_job",
        "_logs",
        "_received",
        "_request",
        "_sent",
        "_submitted",
        "_worker",
        "index",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, job: Job, index: int, submitted: float) -> None:
        super().__init__(loop=loop)
        self._call_id: str | None = None
        #: Position of the call in its job (``map`` input order).
        self.index = index
        self._job = job
        self._request: Request | None = None
        self._submitted = submitted
        self._sent: float | None = None
        self._received: float | None = None
        self._attempts = 0
        # started, finished, cpu seconds, peak rss, worker pid, replica
        self._worker: tuple[float, float, float, int, int, str] | None = None
        self._logs: list[str] | None = None
        self._collected = False  # awaited or result() read: get_result() need not keep it

    def __await__(self) -> Any:
        self._collected = True
        return super().__await__()

    __iter__ = __await__

    def result(self) -> Any:
        self._collected = True
        return super().result()

    @property
    def call_id(self) -> str:
        """The call's id, unique per executor (``<executor>-<job>-<index>``); retries keep it."""
        return self._call_id or self._job.call_id(self.index)

    @call_id.setter
    def call_id(self, value: str) -> None:
        self._call_id = value

    def cancel(self, msg: Any | None = None) -> bool:
        if self.done():
            return False
        cancelled = super().cancel(msg)
        if cancelled:
            req = self._request
            if req is not None:
                req.item_cancelled()
            self._job.item_done(self)
        return cancelled

    @property
    def stats(self) -> dict[str, Any]:
        """Timestamps (epoch seconds), worker CPU seconds, peak RSS bytes, attempts, replica."""
        w = self._worker
        return {
            "call_id": self.call_id,
            "submitted": self._submitted,
            "sent": self._sent,
            "started": w[0] if w else None,
            "finished": w[1] if w else None,
            "received": self._received,
            "worker_cpu_seconds": w[2] if w else None,
            "peak_rss_bytes": w[3] if w else None,
            "worker_pid": w[4] if w else None,
            "replica": w[5] if w else None,
            "attempts": self._attempts,
        }

    @property
    def logs(self) -> str:
        """What the call wrote to stdout and stderr, in order."""
        return "".join(self._logs) if self._logs else ""

    def _add_log(self, text: str) -> None:
        if self._logs is None:
            self._logs = [text]
        else:
            self._logs.append(text)

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled() else "done" if self.done() else "pending"
        return f"<CallFuture {self.call_id} {state}>"
