"""AsyncExecutor end to end on the real local runtime (real servers, real worker processes)."""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import textwrap
import time
import traceback
from pathlib import Path

import pytest

from async_ca_exec import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    AsyncExecutor,
    CallFuture,
    CallTimeoutError,
    ConfigError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    WorkerCrashedError,
)

from conftest import children, wait_gone


def add7(x: int) -> int:
    return x + 7


class DomainError(Exception):
    """An exception class that exists only in this test module."""


def fail_on_three(x: int) -> int:
    if x == 3:
        raise DomainError(f"three is not allowed (got {x})")
    return x


def sleep_then(x: float) -> float:
    time.sleep(x)
    return x


def exit_on(x: int) -> int:
    if x == 2:
        os._exit(1)
    return x * 10


async def test_map_preserves_input_order_over_1000_items(ex: AsyncExecutor) -> None:
    assert await ex.map(add7, range(1000)) == [i + 7 for i in range(1000)]


@pytest.mark.parametrize("chunksize", [1, 7, 100, 1000])
async def test_map_gives_one_result_per_item_whatever_the_chunksize(ex: AsyncExecutor, chunksize: int) -> None:
    assert await ex.map(add7, range(250), chunksize=chunksize) == [i + 7 for i in range(250)]


async def test_closures_lambdas_partials_and_builtins_round_trip(ex: AsyncExecutor) -> None:
    offset = 100

    def closure(x: int) -> int:
        return x + offset

    assert await ex.map(closure, [1, 2]) == [101, 102]
    assert await ex.map(lambda x: x * 2, [1, 2]) == [2, 4]
    assert await ex.map(functools.partial(pow, 2), [3, 4]) == [8, 16]
    assert await ex.map(abs, [-1, -2]) == [1, 2]
    assert await ex.submit(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]


async def test_functions_from_a_local_module_travel_with_the_job(ex: AsyncExecutor, tmp_path: Path) -> None:
    # A module next to the user's script: importable in the client only.
    moddir = tmp_path / "userdir"
    moddir.mkdir()
    (moddir / "acx_user_helpers.py").write_text(
        textwrap.dedent("""
        import math

        SCALE = 3

        class Point:
            def __init__(self, x):
                self.x = x

        def scaled(x):
            return Point(math.floor(x * SCALE))
    """)
    )
    sys.path.insert(0, str(moddir))
    try:
        import acx_user_helpers  # type: ignore[import-not-found]

        results = await ex.map(acx_user_helpers.scaled, [1, 2.5])
        assert [r.x for r in results] == [3, 7]
        assert all(isinstance(r, acx_user_helpers.Point) for r in results)
        # The worker really lacks the module: importing it there fails.
        with pytest.raises(ModuleNotFoundError):
            await ex.submit(__import__, "acx_user_helpers")
    finally:
        sys.path.remove(str(moddir))
        sys.modules.pop("acx_user_helpers", None)


async def test_remote_exception_keeps_its_type_and_carries_the_remote_traceback(ex: AsyncExecutor) -> None:
    with pytest.raises(DomainError, match="three is not allowed") as info:
        await ex.map(fail_on_three, range(6))
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "fail_on_three" in cause.tb and "raise DomainError" in cause.tb
    printed = "".join(traceback.format_exception(info.value))
    assert "RemoteTraceback" in printed and "fail_on_three" in printed


async def test_builtin_exceptions_keep_their_type(ex: AsyncExecutor) -> None:
    with pytest.raises(ZeroDivisionError):
        await ex.submit(lambda: 1 / 0)
    with pytest.raises(KeyError):
        await ex.submit(lambda: {}["missing"])


async def test_exception_that_cannot_be_recreated_becomes_remote_error(ex: AsyncExecutor) -> None:
    def raise_odd() -> None:
        class Odd(Exception):
            def __init__(self, a: int, b: int) -> None:  # unpickling calls Odd(msg): TypeError
                super().__init__(f"{a}/{b}")

        raise Odd(1, 2)

    with pytest.raises(RemoteError) as info:
        await ex.submit(raise_odd)
    assert "Odd" in info.value.type_name and "1/2" in str(info.value)
    assert isinstance(info.value.__cause__, RemoteTraceback)


async def test_system_exit_in_a_call_does_not_stop_the_client(ex: AsyncExecutor) -> None:
    with pytest.raises(RemoteError, match="SystemExit"):
        await ex.submit(sys.exit, 3)


async def test_return_exceptions_puts_errors_in_the_result_list(ex: AsyncExecutor) -> None:
    results = await ex.map(fail_on_three, range(6), return_exceptions=True)
    assert results[:3] == [0, 1, 2] and results[4:] == [4, 5]
    assert isinstance(results[3], DomainError)


async def test_a_worker_that_exits_fails_only_its_own_call(ex: AsyncExecutor) -> None:
    results = await ex.map(exit_on, range(6), return_exceptions=True)
    assert isinstance(results[2], WorkerCrashedError)
    assert "exited with code 1" in str(results[2])
    assert [r for i, r in enumerate(results) if i != 2] == [0, 10, 30, 40, 50]
    # The dead worker was replaced: the runtime keeps serving.
    assert await ex.map(add7, range(20)) == [i + 7 for i in range(20)]


async def test_a_crash_inside_a_batch_fails_only_the_item_that_was_running(ex: AsyncExecutor) -> None:
    results = await ex.map(exit_on, range(6), chunksize=6, return_exceptions=True)
    assert isinstance(results[2], WorkerCrashedError)
    assert [r for i, r in enumerate(results) if i != 2] == [0, 10, 30, 40, 50]


async def test_a_call_past_its_timeout_fails_while_the_others_finish() -> None:
    async with AsyncExecutor(timeout=1.0, config={"localhost": {"replicas": 1, "worker_processes": 2}}) as ex:
        t = time.monotonic()
        results = await ex.map(sleep_then, [0.1, 30, 0.2, 0.1], return_exceptions=True)
        assert time.monotonic() - t < 15
        assert results[0] == 0.1 and results[2] == 0.2 and results[3] == 0.1
        assert isinstance(results[1], CallTimeoutError) and isinstance(results[1], TimeoutError)
        assert "timeout of 1 s" in str(results[1])
        assert await ex.map(add7, [1]) == [8]


async def test_per_call_timeout_argument_beats_the_executor_default(ex: AsyncExecutor) -> None:
    results = await ex.map(sleep_then, [5, 0.01], timeout=0.5, return_exceptions=True)
    assert isinstance(results[0], CallTimeoutError) and results[1] == 0.01


async def test_cancelling_a_map_of_long_calls_frees_the_workers() -> None:
    config = {"localhost": {"replicas": 1, "worker_processes": 2}}
    async with AsyncExecutor(config=config) as ex:
        task = asyncio.create_task(ex.map(sleep_then, [60] * 6))
        await asyncio.sleep(1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        t = time.monotonic()
        assert await ex.map(sleep_then, [0.01] * 4) == [0.01] * 4
        # Not delayed by the cancelled 60 s calls: their workers were killed and replaced.
        assert time.monotonic() - t < 20


async def test_cancelling_one_future_leaves_the_others_running(ex: AsyncExecutor) -> None:
    slow = ex.submit(sleep_then, 60)
    fast = ex.submit(sleep_then, 0.05)
    await asyncio.sleep(0.5)
    assert slow.cancel()
    assert await fast == 0.05
    assert slow.cancelled()


async def test_submit_and_call_async_return_awaitable_futures(ex: AsyncExecutor) -> None:
    fut = ex.submit(pow, 2, 10)
    assert isinstance(fut, CallFuture)
    with pytest.raises(asyncio.InvalidStateError):
        fut.result()
    assert await fut == 1024
    assert fut.done() and fut.result() == 1024 and fut.exception() is None
    assert await ex.call_async(pow, (3, 2)) == 9
    assert await ex.call_async(divmod, {"a": 7, "b": 2} if False else (7, 2)) == (3, 1)
    assert await ex.call_async(add7, 1) == 8
    assert await ex.call_async(dict, {"a": 1}) == {"a": 1}


async def test_future_stats_and_logs_describe_the_call(ex: AsyncExecutor) -> None:
    def noisy(x: int) -> int:
        print("hello from", x)
        print("warning", x, file=sys.stderr)
        return x

    fut = ex.submit(noisy, 5)
    assert await fut == 5
    assert fut.logs == "hello from 5\nwarning 5\n"
    s = fut.stats
    assert s["submitted"] <= s["sent"] <= s["started"] <= s["finished"] <= s["received"]
    assert s["attempts"] == 1 and s["replica"].startswith("local-") and s["peak_rss_bytes"] > 0
    assert s["worker_cpu_seconds"] >= 0 and s["call_id"] == fut.call_id


async def test_starmap_unpacks_each_item(ex: AsyncExecutor) -> None:
    assert await ex.starmap(pow, [(2, 3), (3, 2)]) == [8, 9]


async def test_map_accepts_async_iterables_and_generators(ex: AsyncExecutor) -> None:
    async def agen():  # type: ignore[no-untyped-def]
        for i in range(5):
            await asyncio.sleep(0)
            yield i

    assert await ex.map(add7, agen()) == [7, 8, 9, 10, 11]
    assert await ex.map(add7, (i for i in range(3))) == [7, 8, 9]


async def test_imap_yields_as_completed_or_in_order(ex: AsyncExecutor) -> None:
    delays = [0.6, 0.01, 0.3, 0.02]
    unordered = [r async for r in ex.imap(sleep_then, delays)]
    assert sorted(unordered) == sorted(delays) and unordered != delays
    ordered = [r async for r in ex.imap(sleep_then, delays, ordered=True)]
    assert ordered == delays


async def test_imap_reads_its_input_lazily_within_the_window(ex: AsyncExecutor) -> None:
    consumed = 0

    def source():  # type: ignore[no-untyped-def]
        nonlocal consumed
        for i in range(10_000):
            consumed += 1
            yield i

    seen = 0
    async for _ in ex.imap(add7, source(), window=50):
        seen += 1
        assert consumed <= seen + 50
        if seen == 100:
            break
    assert consumed <= 150


async def test_imap_raises_the_first_error_unless_asked_to_return_it(ex: AsyncExecutor) -> None:
    with pytest.raises(DomainError):
        async for _ in ex.imap(fail_on_three, range(6), ordered=True):
            pass
    got = [r async for r in ex.imap(fail_on_three, range(6), ordered=True, return_exceptions=True)]
    assert isinstance(got[3], DomainError) and got[:3] == [0, 1, 2]


async def test_map_reduce_runs_both_steps_remotely(ex: AsyncExecutor) -> None:
    assert await ex.map_reduce(add7, range(10), sum, chunksize=3) == sum(range(7, 17))


async def test_wait_and_as_completed_follow_concurrent_futures(ex: AsyncExecutor) -> None:
    futs = [ex.submit(sleep_then, d) for d in (0.01, 2.0)]
    done, pending = await ex.wait(futs, return_when=FIRST_COMPLETED)
    assert [f.result() for f in done] == [0.01] and len(pending) == 1
    done, pending = await ex.wait(futs, return_when=ALL_COMPLETED)
    assert len(done) == 2 and not pending
    failing = [ex.submit(fail_on_three, 3), ex.submit(sleep_then, 2.0)]
    done, pending = await ex.wait(failing, return_when=FIRST_EXCEPTION)
    assert failing[0] in done
    await failing[1]  # every worker idle again, so the next two calls run side by side
    order = [f.result() async for f in ex.as_completed([ex.submit(sleep_then, d) for d in (0.8, 0.01)])]
    assert order == [0.01, 0.8]
    with pytest.raises(TimeoutError):
        async for _ in ex.as_completed([ex.submit(sleep_then, 5)], timeout=0.2):
            pass
    assert await ex.wait([]) == (set(), set())


async def test_get_result_collects_each_future_once(ex: AsyncExecutor) -> None:
    ex.call_async(add7, 3)
    assert await ex.get_result() == 10
    a, b = ex.submit(add7, 1), ex.submit(add7, 2)
    assert await ex.get_result() == [8, 9]
    assert await ex.get_result() == []
    assert await ex.get_result([a, b]) == [8, 9]
    assert await ex.get_result(a) == 8


async def test_job_summary_counts_calls_and_worker_time(ex: AsyncExecutor) -> None:
    await ex.map(add7, range(50), chunksize=10)
    await ex.map(fail_on_three, range(5), return_exceptions=True)
    s = ex.job_summary()
    assert s["calls"]["submitted"] == 55 and s["calls"]["succeeded"] == 54 and s["calls"]["failed"] == 1
    assert s["calls"]["pending"] == 0 and s["requests"] == 10 and s["retries"] == 0
    assert s["worker_seconds"] >= 0 and s["latency_seconds"]["p50"] is not None


async def test_unpicklable_argument_fails_that_call_naming_its_type(ex: AsyncExecutor) -> None:
    import threading

    results = await ex.map(type, [1, threading.Lock(), "x"], return_exceptions=True)
    assert results[0] is int and results[2] is str
    assert isinstance(results[1], SerializationError) and "lock" in str(results[1])


async def test_unpicklable_result_fails_that_call_naming_its_type(ex: AsyncExecutor) -> None:
    def make(x: int) -> object:
        import threading

        return threading.Lock() if x == 1 else x

    results = await ex.map(make, [0, 1, 2], return_exceptions=True)
    assert results[0] == 0 and results[2] == 2
    assert isinstance(results[1], SerializationError) and "lock" in str(results[1]).lower()


async def test_executor_starts_lazily_without_async_with() -> None:
    ex = AsyncExecutor(config={"localhost": {"replicas": 1, "worker_processes": 1}})
    try:
        fut = ex.submit(add7, 1)
        assert await fut == 8
        assert await ex.map(add7, [2]) == [9]
    finally:
        await ex.aclose()
        await ex.aclose()  # idempotent


async def test_after_aclose_no_child_process_remains() -> None:
    before = children(os.getpid())  # (a session's Azurite, say)
    async with AsyncExecutor() as ex:
        await ex.map(add7, range(10))
        tree = children(os.getpid()) - before
        assert len(tree) >= 2  # a replica and its workers
    assert not wait_gone(tree), "runtime processes survived aclose()"
    with pytest.raises(RuntimeError, match="closed"):
        ex.submit(add7, 1)


async def test_bad_config_is_refused_before_anything_starts() -> None:
    with pytest.raises(ConfigError, match="512, 1024"):
        AsyncExecutor(runtime_memory=1000)
    with pytest.raises(ConfigError, match="backend"):
        AsyncExecutor(backend="kubernetes")


def test_executor_needs_a_running_loop_for_submit() -> None:
    ex = AsyncExecutor()
    with pytest.raises(RuntimeError, match="FunctionExecutor"):
        ex.submit(add7, 1)


# -- chunksize="auto" ----------------------------------------------------------------------


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def exit_on_13(x: int) -> int:
    if x == 13:
        os._exit(3)
    return x


async def test_auto_batching_packs_tiny_calls_and_spreads_slow_ones() -> None:
    async with AsyncExecutor() as ex:
        assert await ex.map(add7, range(3000), chunksize="auto") == [x + 7 for x in range(3000)]
        tiny_requests = ex.job_summary()["requests"]
        assert tiny_requests <= 3000 // 5, tiny_requests  # batched, once the first calls were timed
        assert await ex.map(nap, [0.3] * 6, chunksize="auto") == [0.3] * 6
        assert ex.job_summary()["requests"] - tiny_requests == 6  # slow calls: one per request
        got = sorted([x async for x in ex.imap(add7, range(500), chunksize="auto")])
        assert got == [x + 7 for x in range(500)]
        with pytest.raises(ValueError, match="positive integer or 'auto'"):
            await ex.map(add7, range(3), chunksize="big")  # type: ignore[arg-type]


async def test_a_crash_inside_an_auto_batch_fails_only_that_call() -> None:
    async with AsyncExecutor() as ex:
        results = await ex.map(exit_on_13, range(400), chunksize="auto", return_exceptions=True)
    assert isinstance(results[13], WorkerCrashedError)
    assert [r for i, r in enumerate(results) if i != 13] == [i for i in range(400) if i != 13]


# -- job_summary(): every call ends in exactly one state ---------------------------------------


def settled(ex: AsyncExecutor) -> dict[str, int]:
    calls = ex.job_summary()["calls"]
    assert calls["pending"] == 0, calls
    assert calls["succeeded"] + calls["failed"] + calls["cancelled"] == calls["submitted"], calls
    return calls  # type: ignore[no-any-return]


@pytest.mark.parametrize("chunksize", [1, 5])
async def test_a_map_cancelled_midway_counts_its_unfinished_calls_as_cancelled(chunksize: int) -> None:
    async with AsyncExecutor(max_concurrency=4) as ex:
        job = asyncio.ensure_future(ex.map(nap, [0.05] * 100, chunksize=chunksize))
        while ex.job_summary()["calls"]["succeeded"] < 10:  # noqa: ASYNC110 - a test watching progress
            await asyncio.sleep(0.01)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        calls = settled(ex)
        assert calls["submitted"] == 100 and calls["cancelled"] > 0 and calls["succeeded"] >= 10
        assert await ex.map(add7, range(3)) == [7, 8, 9]  # the executor goes on
        assert settled(ex)["succeeded"] == calls["succeeded"] + 3


def fail_on_five(x: float) -> float:
    if x == 5:
        raise DomainError("five")
    time.sleep(0.02)
    return x


async def test_a_map_aborted_by_its_first_error_counts_the_rest_as_cancelled() -> None:
    async with AsyncExecutor(max_concurrency=8) as ex:
        with pytest.raises(DomainError):
            await ex.map(fail_on_five, range(40), chunksize=1)
        calls = settled(ex)
        assert calls["failed"] >= 1 and calls["cancelled"] >= 1, calls


async def test_cancelled_submit_and_imap_calls_are_counted_once() -> None:
    async with AsyncExecutor(max_concurrency=2) as ex:
        futs = [ex.submit(nap, 0.2) for _ in range(6)]
        await asyncio.sleep(0.05)
        for f in futs[2:]:
            f.cancel()
        await asyncio.gather(*futs, return_exceptions=True)
        async for _ in ex.imap(nap, [0.01] * 50, chunksize=1):
            break  # leaving early cancels the rest (once the loop has finalised the generator)
        for _ in range(100):
            if ex.job_summary()["calls"]["pending"] == 0:
                break
            await asyncio.sleep(0.01)
        calls = settled(ex)
        assert calls["cancelled"] >= 4 + 1, calls
