"""Batching by default: map, starmap, imap, map_reduce and the facade's map send many fast calls
per request (chunksize="auto"), and every guarantee stays per call (issue 13)."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time

import pytest

from async_ca_exec import AsyncExecutor, CallTimeoutError, FunctionExecutor, WorkerCrashedError
from async_ca_exec.config import load_config


def add7(x: int) -> int:
    return x + 7


def mul(a: int, b: int) -> int:
    return a * b


def total(xs: list[int]) -> int:
    return sum(xs)


async def requests_for(ex: AsyncExecutor, job: object) -> int:
    before = ex.job_summary()["requests"]
    await job  # type: ignore[misc]
    return ex.job_summary()["requests"] - before  # type: ignore[no-any-return]


async def test_the_default_chunksize_is_auto() -> None:
    assert load_config(env={}).lithops.chunksize == "auto"
    async with AsyncExecutor() as ex:
        assert await requests_for(ex, ex.map(add7, range(3000))) <= 600
        assert await requests_for(ex, ex.starmap(mul, [(i, 2) for i in range(3000)])) <= 600

        async def drain() -> list[int]:
            return [x async for x in ex.imap(add7, range(3000), ordered=True)]

        assert await requests_for(ex, drain()) <= 600
        assert await requests_for(ex, ex.map_reduce(add7, range(3000), total)) <= 600 + 1
        # chunksize=1 still means one call per request
        assert await requests_for(ex, ex.map(add7, range(300), chunksize=1)) == 300
        assert await ex.map_reduce(add7, range(3000), total) == sum(range(3000)) + 7 * 3000


def test_the_facades_map_batches_by_default_too() -> None:
    with FunctionExecutor() as fexec:
        fexec.map(add7, range(2000))
        assert fexec.get_result() == [x + 7 for x in range(2000)]
        assert fexec.job_summary()["requests"] <= 400
        fexec.map(add7, range(100), chunksize=1)
        fexec.get_result()
        assert fexec.job_summary()["requests"] >= 100


async def test_the_config_sets_the_default_and_a_call_beats_it() -> None:
    async with AsyncExecutor(config={"lithops": {"chunksize": 1}}) as ex:
        assert await requests_for(ex, ex.map(add7, range(200))) == 200
        assert await requests_for(ex, ex.map(add7, range(2000), chunksize="auto")) <= 400


def everything_at_once(x: int) -> int:
    """Prints its own line; raises for some, crashes for one, hangs for one (all in batches)."""
    print(f"call {x} says hi")
    print(f"call {x} on stderr", file=sys.stderr)
    if x == 123:
        os._exit(7)
    if x == 321:
        time.sleep(3600)
    if x % 50 == 7:
        raise ValueError(f"bad {x}")
    return x * 2


async def test_per_call_errors_crashes_and_timeouts_inside_default_batches() -> None:
    async with AsyncExecutor(timeout=3) as ex:
        results = await ex.map(everything_at_once, range(400), return_exceptions=True)
        summary = ex.job_summary()
    assert summary["requests"] < 400  # they were batched
    for i, r in enumerate(results):
        if i == 123:
            assert isinstance(r, WorkerCrashedError) and "exit" in str(r), r
        elif i == 321:
            assert isinstance(r, CallTimeoutError), r
        elif i % 50 == 7:
            assert isinstance(r, ValueError) and str(r) == f"bad {i}", r
        else:
            assert r == i * 2, (i, r)
    calls = summary["calls"]
    assert calls["failed"] == 2 + len([i for i in range(400) if i % 50 == 7]) and calls["pending"] == 0


def test_per_call_logs_and_stats_inside_default_batches() -> None:
    with FunctionExecutor() as fexec:
        futures = fexec.map(everything_at_once, [x for x in range(300) if x not in (123, 321)])
        fexec.wait(futures, throw_except=False)
        assert fexec.job_summary()["requests"] < len(futures)
        for f in futures:
            x = int(f.logs.split()[1])
            assert f.logs == f"call {x} says hi\ncall {x} on stderr\n", f.logs  # its own output only
            stats = f.stats
            assert stats["started"] <= stats["finished"] and stats["attempts"] == 1
        # Each call timed on its own, not once per batch: on one worker, calls run one after
        # another, so each starts no earlier than the one before it finished (times shared by a
        # batch would overlap). Two fast calls may still get the same clock reading.
        by_worker: dict[int, list[tuple[float, float]]] = {}
        for f in futures:
            by_worker.setdefault(f.stats["worker_pid"], []).append((f.stats["started"], f.stats["finished"]))
        for times in by_worker.values():
            times.sort()
            assert all(prev_end <= start for (_s, prev_end), (start, _e) in itertools.pairwise(times)), times
        assert len({f.stats["finished"] for f in futures}) > len(futures) // 2


async def test_streamed_logs_name_each_calls_own_index_inside_default_batches(capfd: pytest.CaptureFixture[str]) -> None:
    async with AsyncExecutor(logs="stream") as ex:
        await ex.map(everything_at_once, [x for x in range(200) if x not in (123, 321)], return_exceptions=True)
        assert ex.job_summary()["requests"] < 198
    out = capfd.readouterr().out.splitlines()
    items = [x for x in range(200) if x not in (123, 321)]
    assert sorted(out) == sorted(f"[{i}] call {x} says hi" for i, x in enumerate(items))


async def test_cancelling_a_default_batched_map_cancels_every_call_once() -> None:
    async with AsyncExecutor(max_concurrency=2) as ex:
        job = asyncio.ensure_future(ex.map(time.sleep, [0.02] * 2000))
        while ex.job_summary()["calls"]["succeeded"] < 20:  # noqa: ASYNC110 - a test watching progress
            await asyncio.sleep(0.01)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        calls = ex.job_summary()["calls"]
    assert calls["pending"] == 0 and calls["succeeded"] + calls["cancelled"] == calls["submitted"] == 2000
