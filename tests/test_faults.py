"""Load and faults: a fault-injecting proxy, killed and stopped replicas, memory, timeouts.

The proxy (tests/fault_proxy.py) sits between the client and the local runtime. Every check is
on what happened (results, how often a call ran, which call ids came back with which attempt),
never on how long it took.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import re
import resource
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fault_proxy import FaultProxy

from async_ca_exec import AsyncExecutor, CallTimeoutError, InvocationError, WorkerCrashedError
from async_ca_exec import executor as executor_module
from async_ca_exec.invoker import BACKOFF_CAP
from async_ca_exec.runtimes import create_runtime

from conftest import children, first_run, nap_noting_replica, replica_with_a_running_call, wait_gone


class ProxiedRuntime:
    """The local runtime, reached through a FaultProxy."""

    name = "local"

    def __init__(self, inner: Any, **proxy: Any) -> None:
        self.inner = inner
        self.proxy_args = proxy
        self.proxy: FaultProxy | None = None

    @property
    def pids(self) -> list[int]:
        return list(self.inner.pids)

    async def start(self) -> Any:
        endpoint = await self.inner.start()
        try:
            self.proxy = FaultProxy(endpoint.url, **self.proxy_args)
            await asyncio.to_thread(self.proxy.start)
        except BaseException:
            await self.inner.aclose()
            raise
        return dataclasses.replace(endpoint, url=self.proxy.url)

    async def aclose(self) -> None:
        if self.proxy is not None:
            await asyncio.to_thread(self.proxy.stop)
        await self.inner.aclose()


@pytest.fixture
def proxied(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Executors made in the test reach their runtime through a proxy set up from this dict."""
    settings: dict[str, Any] = {}
    monkeypatch.setattr(
        executor_module, "create_runtime", lambda config, **kw: ProxiedRuntime(create_runtime(config, **kw), **settings)
    )
    yield settings


def proxy_of(ex: AsyncExecutor) -> FaultProxy:
    rt = ex.runtime
    assert isinstance(rt, ProxiedRuntime) and rt.proxy is not None
    return rt.proxy


def square_and_record(x: int, path: str) -> int:
    with open(path, "a") as f:  # one short line per run: O_APPEND keeps lines whole
        f.write(f"{x}\n")
    return x * x


def nap_and_record(x: float, path: str) -> float:
    """Note the serving replica in ``path``.started as the call starts, the worker in ``path`` as it ends."""
    nap_noting_replica(x, path + ".started")
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return x


def runs(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def concurrency_for_this_machine(wanted: int) -> int:
    """Each call in flight holds three descriptors here (client, proxy in, proxy out)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return max(64, min(wanted, (soft - 256) // 3))


async def test_10000_calls_through_latency_and_faults_each_give_one_result_in_order(
    proxied: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proxied.update(latency=0.05, fault_rate=0.02, seed=7)
    marker = tmp_path / "runs"
    caplog.set_level(logging.DEBUG, logger="async_ca_exec.invoker")
    config = {"localhost": {"replicas": 2, "worker_processes": 2}}
    async with AsyncExecutor(config=config, max_concurrency=concurrency_for_this_machine(1000), retries=6) as ex:
        # One call per request, so that faults (injected per request) meet thousands of them.
        results = await ex.map(functools.partial(square_and_record, path=str(marker)), range(10_000), chunksize=1)
        proxy = proxy_of(ex)
        summary = ex.job_summary()
    assert results == [i * i for i in range(10_000)]  # each result once, in input order
    assert summary["calls"] == {"submitted": 10_000, "succeeded": 10_000, "failed": 0, "cancelled": 0, "pending": 0}
    # Every injected fault cost exactly one retry, and job_summary() counts them.
    assert proxy.total_injected > 100 and set(proxy.injected) == set(proxy.faults)
    assert summary["retries"] == proxy.total_injected
    # A retry is the same call id, signed as the next attempt.
    assert len(proxy.attempts) == 10_000
    assert all(a == list(range(len(a))) for a in proxy.attempts.values())
    # Calls ran at least once; more only where a fault hit after the runtime had run them.
    ran = runs(marker)
    assert sorted(set(ran), key=int) == [str(i) for i in range(10_000)]
    ran_after_forwarding = proxy.injected["reset-after"] + proxy.injected["504"] + proxy.injected["truncate"]
    assert len(ran) - 10_000 <= ran_after_forwarding
    # Retries honour Retry-After (the delay the client chose, not the wall clock, is checked).
    waits = [float(m.group(1)) for r in caplog.records
             if (m := re.search(r"in ([0-9.]+) s after: HTTP \d+: injected \d+-retry-after", r.getMessage()))]  # fmt: skip
    assert len(waits) == proxy.injected["503-retry-after"] + proxy.injected["429-retry-after"]
    assert waits and min(waits) >= 1.0
    # Other retries are jittered (spread over 0..0.1 s for a first retry) and bounded.
    others = [float(m.group(1)) for r in caplog.records
              if (m := re.search(r"in ([0-9.]+) s after: (?!HTTP \d+: injected \d+-retry-after)", r.getMessage()))]  # fmt: skip
    assert len(others) > 50 and len(set(others)) >= 8 and max(others) <= BACKOFF_CAP


async def test_imap_through_faults_resolves_each_future_once(proxied: dict[str, Any]) -> None:
    proxied.update(latency=0.01, fault_rate=0.05, seed=3)
    async with AsyncExecutor(config={"localhost": {"replicas": 1, "worker_processes": 2}}, retries=6) as ex:
        seen = [x async for x in ex.imap(abs, range(-2000, 0), ordered=False, chunksize=1)]
        assert proxy_of(ex).total_injected > 20
    assert sorted(seen) == list(range(1, 2001))


def stall_first_attempt(x: int, path: str) -> int:
    """Every 100th item's first attempt stalls for 10 s (a straggler); the rest answer at once."""
    if x % 100 == 3 and first_run(path, str(x)):
        time.sleep(10)
    return -x


async def test_hedged_calls_through_faults_give_each_result_once(proxied: dict[str, Any], tmp_path: Path) -> None:
    """Backups and retries together: a backup may meet a fault too, a retried request may get a
    backup; every call still ends with exactly one result, in order, and no straggler holds the job."""
    proxied.update(latency=0.02, fault_rate=0.05, seed=11, faults=("reset", "reset-after", "truncate", "503", "502"))
    config = {"localhost": {"replicas": 1, "worker_processes": 3}}
    async with AsyncExecutor(config=config, retries=8, max_concurrency=6) as ex:
        fn = functools.partial(stall_first_attempt, path=str(tmp_path))
        # Correctness, not speed: a stall no backup rescues (both backups meeting faults, or
        # calls queued behind a stalled worker beyond the backup budget) costs its 10 s.
        results = await asyncio.wait_for(ex.map(fn, range(-1500, 0), hedge=0.9), 300)
        summary = ex.job_summary()
        assert proxy_of(ex).total_injected > 20
    assert results == list(range(1500, 0, -1))
    assert summary["calls"]["succeeded"] == 1500 and summary["calls"]["failed"] == 0
    assert summary["hedges"]["won"] >= 1 and summary["retries"] >= 1


@pytest.mark.parametrize(("fault", "cause"), [("503", "HTTP 503: injected 503"), ("reset", "ServerDisconnectedError")])
async def test_when_retries_run_out_the_error_names_the_call_and_the_last_cause(
    proxied: dict[str, Any], fault: str, cause: str
) -> None:
    proxied.update(fault_rate=1.0, faults=(fault,))
    async with AsyncExecutor(config={"localhost": {"replicas": 1, "worker_processes": 1}}, retries=3) as ex:
        with pytest.raises(InvocationError) as info:
            await ex.submit(abs, -1)
        message = str(info.value)
        assert re.search(r"call [0-9a-f]{12}-A\d{3}-00000 could not be delivered after 4 attempt\(s\)", message), message
        assert f"last error: {cause}" in message
        assert ex.job_summary()["retries"] == 3 and proxy_of(ex).total_injected == 4


async def test_a_replica_killed_mid_job_loses_nothing_and_its_calls_come_back_once(
    proxied: dict[str, Any], tmp_path: Path
) -> None:
    marker = tmp_path / "runs"
    async with AsyncExecutor(config={"localhost": {"replicas": 2, "worker_processes": 2}}) as ex:
        task = asyncio.ensure_future(ex.map(functools.partial(nap_and_record, path=str(marker)), [1.0] * 12))
        victim = await replica_with_a_running_call(marker.with_suffix(".started"), ex.runtime.pids)  # type: ignore[union-attr]
        os.kill(victim, signal.SIGKILL)
        results = await asyncio.wait_for(task, 120)
        proxy = proxy_of(ex)
        summary = ex.job_summary()
    assert results == [1.0] * 12 and summary["calls"]["succeeded"] == 12
    retried = {cid: a for cid, a in proxy.attempts.items() if len(a) > 1}
    # The same call id, attempts 0, 1 (and 2 if the retry met a connection the kill also cut).
    assert retried and all(a == list(range(len(a))) for a in retried.values()), retried
    assert summary["retries"] == sum(len(a) - 1 for a in retried.values())
    assert len(runs(marker)) <= 12 + summary["retries"]  # those cut short may have finished before the kill


async def test_sigterm_lets_a_replica_finish_its_calls_and_sends_new_ones_elsewhere(tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    async with AsyncExecutor(config={"localhost": {"replicas": 2, "worker_processes": 2}}) as ex:
        first = asyncio.ensure_future(ex.map(functools.partial(nap_and_record, path=str(marker)), [0.5] * 8))
        await asyncio.sleep(0.3)
        rt: Any = ex.runtime
        victim = rt._ps.procs[0]
        workers = children(victim.pid)
        victim.send_signal(signal.SIGTERM)
        later = await ex.map(functools.partial(nap_and_record, path=str(marker)), [0.1] * 8)
        assert await asyncio.wait_for(first, 60) == [0.5] * 8 and later == [0.1] * 8
        assert await asyncio.to_thread(victim.wait, 30) == 0
        assert not wait_gone(workers)
        log = Path(rt._rundir, "replica-0.log").read_text()
        assert "did not finish within the grace period" not in log
        # The other replica still serves.
        assert await ex.map(abs, [-1, -2]) == [1, 2]
    assert len(runs(marker)) == 16  # every call ran exactly once: none was cut, none lost


def grow(step_mb: int, total_mb: int) -> int:
    """Allocates ``total_mb`` step by step (slowly enough for the runtime to notice)."""
    held = []
    for _ in range(total_mb // step_mb):
        held.append(bytearray(step_mb << 20))
        time.sleep(0.02)
    return sum(len(h) for h in held) >> 20


async def test_a_call_over_runtime_memory_fails_alone_saying_it_ran_out_of_memory() -> None:
    config = {"localhost": {"replicas": 1, "worker_processes": 2, "runtime_memory": 512}}
    async with AsyncExecutor(config=config) as ex:
        results = await ex.starmap(grow, [(4, 64), (32, 3072), (4, 64)], return_exceptions=True)
        assert results[0] == 64 and results[2] == 64
        err = results[1]
        assert isinstance(err, WorkerCrashedError), err
        assert "ran out of memory" in str(err) and "limit of 512 MB per worker (runtime_memory)" in str(err)
        assert await ex.map(abs, [-3]) == [3]  # its worker was replaced


async def test_a_call_that_never_returns_times_out_and_its_worker_is_replaced(tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    config = {"localhost": {"replicas": 1, "worker_processes": 2}}
    async with AsyncExecutor(timeout=1.0, config=config) as ex:
        server = ex.runtime.pids[0]  # type: ignore[union-attr]
        before = children(server)
        results = await ex.map(functools.partial(nap_and_record, path=str(marker)), [0.1, 3600, 0.2], return_exceptions=True)
        assert results[0] == 0.1 and results[2] == 0.2 and isinstance(results[1], CallTimeoutError)
        gone = before - children(server)
        assert len(gone) == 1  # the stuck worker was killed...
        for _ in range(100):  # ...and replaced
            if len(children(server)) == len(before):
                break
            await asyncio.sleep(0.05)
        assert len(children(server)) == len(before)
        assert await ex.map(abs, [-5]) == [5]
