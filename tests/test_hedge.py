"""Straggler hedging: a backup for a request that outlasts its job's latency percentile; the first
answer wins and the loser is cut, so its replica stops running it."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from pathlib import Path

import pytest

from async_ca_exec import AsyncExecutor, FunctionExecutor
from async_ca_exec.invoker import Outcome, SliceRequest
from async_ca_exec.jobs import Job, Stats

from conftest import alive, first_run, wait_gone

STRAGGLER = 7
LAYOUT = {"localhost": {"replicas": 1, "worker_processes": 3}}


def straggle_once(x: int, path: str) -> int:
    """Item STRAGGLER's first run hangs (a straggler); every other run answers at once. Each run
    notes "start <worker pid>" and, if it gets there, "end" in ``path``/<x>."""
    log = Path(path, str(x))
    with open(log, "a") as f:
        f.write(f"start {os.getpid()}\n")
    if x == STRAGGLER and first_run(path, f"{x}.first"):
        time.sleep(3600)
    with open(log, "a") as f:
        f.write("end\n")
    return 2 * x


def runs_of(path: Path, x: int) -> list[str]:
    return (path / str(x)).read_text().splitlines()


async def test_a_straggler_gets_a_backup_that_wins_and_the_loser_is_stopped_on_the_replica(tmp_path: Path) -> None:
    async with AsyncExecutor(max_concurrency=4, config=LAYOUT) as ex:
        fn = functools.partial(straggle_once, path=str(tmp_path))
        # Without a backup this map would wait an hour for item 7: the guard fails it instead.
        results = await asyncio.wait_for(ex.map(fn, range(40), hedge=True), 120)
        assert results == [2 * x for x in range(40)]
        hedges = ex.job_summary()["hedges"]
        assert hedges["won"] >= 1 and hedges["sent"] >= hedges["won"]
        straggler = runs_of(tmp_path, STRAGGLER)
        assert straggler[0].startswith("start ") and straggler.count("end") == 1
        first_worker = int(straggler[0].split()[1])
        # The loser's connection was cut: the replica killed the worker still sleeping in it.
        assert not await asyncio.to_thread(wait_gone, {first_worker}), "the losing attempt still runs on the replica"
        # ...and replaced it: the runtime still serves.
        assert await ex.map(abs, [-1, -2]) == [1, 2]
    # Every other item ran exactly once and finished.
    for x in range(40):
        if x != STRAGGLER:
            assert runs_of(tmp_path, x)[1:] == ["end"]


async def test_imap_hedges_calls_with_futures(tmp_path: Path) -> None:
    async with AsyncExecutor(max_concurrency=4, config=LAYOUT) as ex:
        fn = functools.partial(straggle_once, path=str(tmp_path))

        async def collect() -> list[int]:
            return [r async for r in ex.imap(fn, range(30), hedge=0.9)]

        results = await asyncio.wait_for(collect(), 120)
        assert sorted(results) == [2 * x for x in range(30)]
        assert ex.job_summary()["hedges"]["won"] >= 1
        assert runs_of(tmp_path, STRAGGLER).count("end") == 1


async def test_hedging_stays_within_its_budget_on_an_even_job() -> None:
    async with AsyncExecutor(max_concurrency=8, config=LAYOUT) as ex:
        assert await ex.map(abs, range(-300, 0), hedge=0.9) == list(range(300, 0, -1))
        # At most two backups per ten answers past the percentile's share (here 2 x 10 %).
        assert ex.job_summary()["hedges"]["sent"] <= 0.2 * 300 + 1
        assert ex.job_summary()["calls"]["succeeded"] == 300


async def test_a_failing_call_is_reported_once_under_hedging() -> None:
    async with AsyncExecutor(max_concurrency=4, config=LAYOUT) as ex:
        results = await ex.map(int, ["1", "x", "3"] * 10, hedge=True, return_exceptions=True)
        errors = [r for r in results if isinstance(r, ValueError)]
        assert len(errors) == 10 and [r for r in results if not isinstance(r, ValueError)] == [1, 3] * 10
        assert ex.job_summary()["calls"]["failed"] == 10


@pytest.mark.parametrize("bad", [0.2, 1.0, 1, "yes", -0.5])
async def test_a_bad_hedge_value_names_the_allowed_ones(bad: object) -> None:
    async with AsyncExecutor(config=LAYOUT) as ex:
        with pytest.raises(ValueError, match=r"hedge=.* must be True, False or a latency percentile between 0.5 and 1"):
            await ex.map(abs, [1], hedge=bad)  # type: ignore[arg-type]
        pids = list(ex.runtime.pids)  # type: ignore[union-attr]
    assert not [p for p in pids if alive(p)]


def test_the_facade_map_hedges_too(tmp_path: Path) -> None:
    with FunctionExecutor(max_concurrency=4, config=LAYOUT) as fexec:
        fexec.map(functools.partial(straggle_once, path=str(tmp_path)), range(30), hedge=True)
        assert fexec.get_result() == [2 * x for x in range(30)]
        assert fexec.job_summary()["hedges"]["won"] >= 1
    assert runs_of(tmp_path, STRAGGLER).count("end") == 1


def test_a_request_answered_in_full_twice_keeps_the_first_answer_and_counts_once() -> None:
    """Both sides of a hedged request may bring every outcome before the loser is cut."""
    stats = Stats()
    job = Job("j", b"fn", "0" * 64, 60.0, stats, collect=True, hedge=0.9)
    offset, now = job.new_slots(2)
    req = SliceRequest("j-00000:2", job, offset, 2, b"", now)

    def outcome(values: list[int]) -> Outcome:
        return Outcome(0, 2, values, {}, None, {}, None, {}, time.time())

    req.apply(outcome([1, 2]))
    req.apply(outcome([10, 20]))  # the other attempt's answer, all of it
    assert job.results == [1, 2] and req.unresolved == 0 and job.pending == 0
    assert stats.succeeded == 2
