"""Delivery: retries on transport failures only, one pickle per job, one session per executor."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from async_ca_exec import AsyncExecutor, InvocationError, invoker, serialize
from async_ca_exec.invoker import backoff

from conftest import nap_noting_replica, replica_with_a_running_call


def record_then_fail(path: str) -> None:
    with open(path, "a") as f:
        f.write("ran\n")
    raise ValueError("user code failed")


async def test_calls_on_a_killed_replica_are_retried_on_the_others(tmp_path: Path) -> None:
    marker = tmp_path / "replicas"
    async with AsyncExecutor(config={"localhost": {"replicas": 2, "worker_processes": 2}}) as ex:
        task = asyncio.ensure_future(ex.map(functools.partial(nap_noting_replica, path=str(marker)), [1.5] * 8))
        victim = await replica_with_a_running_call(marker, ex.runtime.pids)  # type: ignore[union-attr]
        os.kill(victim, signal.SIGKILL)
        results = await asyncio.wait_for(task, 120)
        assert results == [1.5] * 8
        summary = ex.job_summary()
        assert summary["retries"] >= 1 and summary["calls"]["succeeded"] == 8


async def test_a_call_whose_code_raised_is_never_run_again(tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    async with AsyncExecutor(retries=5) as ex:
        with pytest.raises(ValueError, match="user code failed"):
            await ex.submit(record_then_fail, str(marker))
        assert ex.job_summary()["retries"] == 0
    assert marker.read_text() == "ran\n"


async def test_the_function_is_pickled_once_per_map(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = serialize.dumps_function

    def counting(fn):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return real(fn)

    monkeypatch.setattr(serialize, "dumps_function", counting)
    opened = 0

    async def on_connect(*_: Any) -> None:
        nonlocal opened
        opened += 1

    traces = aiohttp.TraceConfig()
    traces.on_connection_create_end.append(on_connect)
    monkeypatch.setattr(invoker, "_aiohttp_transport", functools.partial(invoker._aiohttp_transport, trace_configs=[traces]))
    async with AsyncExecutor() as ex:
        assert await ex.map(abs, range(-500, 0), chunksize=1) == list(range(500, 0, -1))
        assert calls == 1
        session = ex._invoker._transport  # type: ignore[union-attr]
        first = opened
        await ex.map(abs, range(10), chunksize=3)
        assert calls == 2 and ex._invoker._transport is session  # type: ignore[union-attr]
        # Kept-alive connections: at most one per request in flight, and room for hedged
        # backups; the second map reuses the first one's.
        limit = ex._invoker.connection_limit  # type: ignore[union-attr]
        assert 0 < first <= limit and opened == first
        assert 0 < limit - ex.config.max_concurrency <= ex.config.max_concurrency // 4 + 1


async def test_a_runtime_whose_replicas_keep_dying_fails_calls_after_the_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    from async_ca_exec.runtimes import local

    monkeypatch.setattr(local, "MAX_RESTARTS", 2)  # the supervisor gives up on the third exit
    async with AsyncExecutor(retries=2, config={"localhost": {"replicas": 1, "worker_processes": 1}}) as ex:
        await ex.map(abs, [1])
        rt: Any = ex.runtime
        for _ in range(3):
            pid = rt.pids[0]
            os.kill(pid, signal.SIGKILL)
            for _ in range(200):  # until the supervisor has noticed (and replaced it, twice)
                if rt.pids[0] != pid or 0 in rt._given_up:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
        assert rt.restarts == 2 and 0 in rt._given_up
        with pytest.raises(InvocationError) as info:
            await ex.submit(abs, -1)
        msg = str(info.value)
        assert "could not be delivered after 3 attempt(s)" in msg and "-A" in msg
        assert ex.job_summary()["retries"] == 2


def test_backoff_is_jittered_bounded_and_honours_retry_after() -> None:
    delays = [backoff(a) for a in range(12) for _ in range(50)]
    assert all(0 <= d <= 10 for d in delays) and len(set(delays)) > 100
    assert all(backoff(0, retry_after=3) >= 3 for _ in range(20))
    assert backoff(0, retry_after=10_000) <= 60


async def test_a_large_function_crosses_the_network_once_per_replica_not_once_per_call() -> None:
    table = bytes(range(256)) * (4 * 1024)  # a 1 MiB closure

    def lookup(i: int) -> int:
        return table[i % len(table)]

    async with AsyncExecutor(max_concurrency=4, config={"localhost": {"replicas": 2, "worker_processes": 1}}) as ex:
        assert await ex.map(lookup, range(400), chunksize=1) == [i % 256 for i in range(400)]
        s = ex.job_summary()
    assert s["requests"] == 400
    # Sent with the first requests each replica sees (at most one per connection), then by hash.
    assert 1 <= s["function_uploads"] <= 4 + 2, s


async def test_small_functions_travel_inline_with_every_request() -> None:
    async with AsyncExecutor() as ex:
        await ex.map(abs, range(10), chunksize=1)
        assert ex.job_summary()["function_uploads"] == 10
