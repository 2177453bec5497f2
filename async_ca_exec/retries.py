"""RetryingFunctionExecutor: Lithops' wrapper that runs a failed call again, with backoff and a
filter on which errors are worth another try.

These are retries of the *user's* errors (a call that raised). The executor's own ``retries``
setting is another thing: it sends a call again when the platform lost it (a replica killed, a
connection cut), and the call's function never sees it.

>>> with RetryingFunctionExecutor(FunctionExecutor(), backoff=1.0) as fexec:   # doctest: +SKIP
...     futures = fexec.map(flaky, range(10), retries=3)
...     done, not_done = fexec.wait(futures, throw_except=False)
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from .executor import FIRST_EXCEPTION
from .sync import ALWAYS, ANY_COMPLETED, LITHOPS_ALL_COMPLETED, FunctionExecutor, ResponseFuture, wait_need

#: Which errors a call is retried on: exception classes, or a predicate on the exception.
RetryOn = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]


class RetryingFuture:
    """One item's future across its attempts: ``response_future`` is the latest attempt's."""

    def __init__(
        self,
        response_future: ResponseFuture,
        map_function: Callable[..., Any],
        input: Any,
        retries: int,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.response_future = response_future
        self.map_function = map_function
        self.input = input
        self.retries = retries
        self.failure_count = 0
        self.cancelled = False
        #: When the next attempt may be sent (backoff), while one is due.
        self._due: float | None = None
        self._options = options or {}  # the map's arguments, for the next attempt
        self._counted: ResponseFuture | None = None  # the failed attempt counted last

    def cancel(self) -> None:
        """No further attempts (the one running, if any, runs on)."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        """Succeeded, or failed and :meth:`RetryingFunctionExecutor.wait` decided on no retry."""
        f = self.response_future
        return self._due is None and bool(f.done) and (not f.error or self._counted is f)

    @property
    def error(self) -> bool:
        return self.done and bool(self.response_future.error)

    @property
    def stats(self) -> dict[str, Any]:
        return self.response_future.stats

    def result(self, throw_except: bool = True, timeout: float | None = None) -> Any:
        """The last attempt's result; its error is raised unless ``throw_except=False``."""
        return self.response_future.result(throw_except=throw_except, timeout=timeout)

    def __repr__(self) -> str:
        return f"<RetryingFuture {self.response_future.call_id} failures={self.failure_count}/{self.retries}>"


class RetryingFunctionExecutor:
    """Lithops' ``RetryingFunctionExecutor(executor)``: ``map(..., retries=N)`` and ``wait``
    send a call whose function raised again, up to ``N`` more times (``retries`` in the
    constructor sets the default). Beyond Lithops:

    * ``backoff``: seconds before the first retry, times ``backoff_factor`` for each next one,
      at most ``max_backoff`` (0: at once, as Lithops);
    * ``retry_on``: the errors worth another try: exception classes, or a predicate on the
      exception (default: any ``Exception``); any other error ends the item at once.
    """

    def __init__(
        self,
        executor: FunctionExecutor,
        *,
        retries: int = 0,
        backoff: float = 0.0,
        backoff_factor: float = 2.0,
        max_backoff: float = 60.0,
        retry_on: RetryOn = Exception,
    ) -> None:
        if retries < 0 or backoff < 0 or backoff_factor < 1 or max_backoff < 0:
            raise ValueError("retries, backoff and max_backoff must be >= 0, and backoff_factor >= 1")
        self.executor = executor
        self.retries = retries
        self.backoff = backoff
        self.backoff_factor = backoff_factor
        self.max_backoff = max_backoff
        self.retry_on = retry_on

    def __enter__(self) -> RetryingFunctionExecutor:
        self.executor.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.executor.__exit__(*exc)

    def map(
        self,
        map_function: Callable[..., Any],
        map_iterdata: Iterable[Any],
        chunksize: int | None = None,
        extra_args: Any = None,
        extra_env: dict[str, str] | None = None,
        runtime_memory: int | None = None,
        timeout: float | None = None,
        include_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        retries: int | None = None,
        **kwargs: Any,
    ) -> list[RetryingFuture]:
        n = self.retries if retries is None else retries
        if n < 0:
            raise ValueError(f"retries={n}: must be >= 0")
        if isinstance(map_iterdata, (str, bytes)) or {"obj_chunk_size", "obj_chunk_number"} & kwargs.keys():
            raise ValueError(
                "RetryingFunctionExecutor.map retries items, not object sources (an az:// prefix, obj_chunk_size): "
                "use FunctionExecutor.map for those"
            )
        items = [map_iterdata] if isinstance(map_iterdata, dict) else list(map_iterdata)
        options = {
            "chunksize": chunksize, "extra_args": extra_args, "extra_env": extra_env, "runtime_memory": runtime_memory,
            "timeout": timeout, "include_modules": include_modules, "exclude_modules": exclude_modules, **kwargs,
        }  # fmt: skip
        futures = self.executor.map(map_function, items, **options)
        return [RetryingFuture(f, map_function, item, n, options) for f, item in zip(futures, items, strict=True)]

    def _retryable(self, exc: BaseException | None) -> bool:
        if exc is None:
            return False
        rule = self.retry_on
        if isinstance(rule, type) or isinstance(rule, tuple):
            return isinstance(exc, rule)
        return bool(rule(exc))

    def _delay(self, failures: int) -> float:
        if not self.backoff:
            return 0.0
        if self.backoff_factor > 1 and failures - 1 > math.log(
            max(self.max_backoff, self.backoff) / self.backoff, self.backoff_factor
        ):
            return self.max_backoff  # (and no float overflow after a thousand failures)
        return float(min(self.max_backoff, self.backoff * self.backoff_factor ** (failures - 1)))

    def _send_due(self, futures: list[RetryingFuture]) -> None:
        """Send the next attempt of every item whose backoff is over: one map per original map
        (one job, the function serialised once). A cancelled item is not sent: it ends with its
        last error."""
        now = time.monotonic()
        batches: dict[tuple[int, int], list[RetryingFuture]] = {}
        for rf in futures:
            if rf._due is not None and (rf.cancelled or rf._due <= now):
                if rf.cancelled:
                    rf._due = None
                else:
                    batches.setdefault((id(rf.map_function), id(rf._options)), []).append(rf)
        for batch in batches.values():
            first = batch[0]
            # Each retry is a call of its own (chunksize 1), and warms nothing (prewarm was the map's).
            options = {k: v for k, v in first._options.items() if k not in ("chunksize", "prewarm")}
            attempts = self.executor.map(first.map_function, [rf.input for rf in batch], chunksize=1, **options)
            for rf, attempt in zip(batch, attempts, strict=True):
                old, rf.response_future, rf._due = rf.response_future, attempt, None
                # The failed attempt is superseded: the executor's own get_result()/wait() skip it.
                old._read, old._produce_output = True, False
                with contextlib.suppress(ValueError):
                    self.executor.futures.remove(old)

    def wait(
        self,
        fs: RetryingFuture | Iterable[RetryingFuture],
        throw_except: bool = True,
        return_when: int | str = LITHOPS_ALL_COMPLETED,
        download_results: bool = False,
        timeout: float | None = None,
        threadpool_size: int = 64,
        wait_dur_sec: float | None = None,
        show_progressbar: bool = True,
    ) -> tuple[list[RetryingFuture], list[RetryingFuture]]:
        """``(done, not_done)`` as :meth:`FunctionExecutor.wait`, where an item is done once it
        succeeded, or failed with no retry left (or an error ``retry_on`` does not take). With
        ``throw_except``, the first such failure is raised. Retries happen while it waits."""
        futures = [fs] if isinstance(fs, RetryingFuture) else list(fs)
        n = len(futures)
        need = wait_need(return_when, n)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._send_due(futures)  # attempts whose backoff is over
            for rf in futures:  # attempts that failed: another one, or the item is done
                attempt = rf.response_future
                if rf._due is None and attempt.done and attempt.error and rf._counted is not attempt:
                    retry = not rf.cancelled and rf.failure_count + 1 <= rf.retries and self._retryable(attempt.exception())
                    delay = self._delay(rf.failure_count + 1) if retry else 0.0
                    rf.failure_count += 1
                    rf._counted = attempt
                    if retry:
                        rf._due = time.monotonic() + delay
            done = [rf for rf in futures if rf.done]  # one snapshot for both lists
            failed = [rf for rf in done if rf.error]
            if len(done) >= need or (return_when == FIRST_EXCEPTION and failed) or return_when == ALWAYS:
                self._send_due(futures)  # (what is due now goes out, not at the next wait)
                break
            running = [rf.response_future for rf in futures if rf._due is None and not rf.response_future.done]
            dues = [rf._due for rf in futures if rf._due is not None]
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"{need - len(done)} of {n} calls unfinished after {timeout} s")
            step = min([d - time.monotonic() for d in dues] + ([left] if left is not None else []), default=None)
            if running:
                try:
                    self.executor.wait(
                        running, throw_except=False, return_when=ANY_COMPLETED, timeout=None if step is None else max(0.0, step),
                        show_progressbar=False,
                    )  # fmt: skip
                except TimeoutError:
                    pass  # a backoff is over, or the deadline: looked at above
            elif step is not None:
                time.sleep(max(0.0, step))
        if throw_except:
            for rf in done:
                if rf.error:
                    rf.result()  # raises the last attempt's error
        ended = set(map(id, done))
        return done, [rf for rf in futures if id(rf) not in ended]

    def get_result(
        self, fs: RetryingFuture | Iterable[RetryingFuture], throw_except: bool = True, timeout: float | None = None
    ) -> Any:
        """Wait for ``fs`` (retrying as :meth:`wait` does), then their results."""
        futures = [fs] if isinstance(fs, RetryingFuture) else list(fs)
        self.wait(futures, throw_except=throw_except, timeout=timeout)
        out = []
        for rf in futures:
            out.append(rf.result(throw_except=throw_except))
            rf.response_future._read = True
        return out[0] if isinstance(fs, RetryingFuture) else out

    def clean(self, *args: Any, **kwargs: Any) -> None:
        self.executor.clean(*args, **kwargs)
