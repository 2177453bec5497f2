"""RetryingFunctionExecutor: Lithops' retries of calls whose function raised, with backoff and
a filter on the errors worth another try (tests/test_sync.py covers the FunctionExecutor)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import async_ca_exec as acx
from async_ca_exec import FunctionExecutor, RetryingFunctionExecutor


def fail_times(path: str, times: int, value: int, error: str = "ValueError") -> int:
    """Raise ``error`` the first ``times`` calls for this ``path`` (counted in a file: the
    attempts run in separate worker processes), then return ``value``."""
    with open(path, "a") as f:
        f.write("x")
    if os.path.getsize(path) <= times:
        raise {"ValueError": ValueError, "KeyError": KeyError}[error](f"attempt {os.path.getsize(path)} of {path}")
    return value


def attempts(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


@pytest.fixture
def fexec() -> Iterator[FunctionExecutor]:
    with FunctionExecutor(config={"localhost": {"replicas": 1, "worker_processes": 2}}) as f:
        yield f


def test_a_failing_call_is_sent_again_until_it_succeeds_or_its_retries_end(fexec: FunctionExecutor, tmp_path: Path) -> None:
    retrying = RetryingFunctionExecutor(fexec)
    paths = [tmp_path / f"item{i}" for i in range(3)]
    data = [(str(paths[0]), 0, 10), (str(paths[1]), 2, 11), (str(paths[2]), 5, 12)]
    futures = retrying.map(fail_times, data, retries=2)
    done, not_done = retrying.wait(futures, throw_except=False)
    assert len(done) == 3 and not not_done
    assert [f.result(throw_except=False) for f in futures] == [10, 11, None]
    assert [attempts(p) for p in paths] == [1, 3, 3]  # the last: one try and its two retries
    assert [f.failure_count for f in futures] == [0, 2, 3] and futures[2].error and not futures[1].error
    with pytest.raises(ValueError, match="attempt 3"):
        futures[2].result()
    with pytest.raises(ValueError, match="attempt 3"):  # throw_except: the final failure is raised
        retrying.wait(futures)


def test_retry_on_decides_which_errors_get_another_try(fexec: FunctionExecutor, tmp_path: Path) -> None:
    retrying = RetryingFunctionExecutor(fexec, retries=3, retry_on=KeyError)
    key, value = tmp_path / "key", tmp_path / "value"
    futures = retrying.map(fail_times, [(str(key), 1, 1, "KeyError"), (str(value), 1, 2, "ValueError")])
    assert retrying.get_result(futures, throw_except=False) == [1, None]
    assert attempts(key) == 2 and attempts(value) == 1  # a ValueError is not retried
    by_predicate = RetryingFunctionExecutor(fexec, retries=3, retry_on=lambda e: "attempt 1" in str(e))
    again = tmp_path / "again"
    assert by_predicate.get_result(by_predicate.map(fail_times, [(str(again), 2, 3)]), throw_except=False) == [None]
    assert attempts(again) == 2  # retried after "attempt 1", not after "attempt 2"


def test_backoff_waits_between_attempts_and_other_items_go_on(fexec: FunctionExecutor, tmp_path: Path) -> None:
    retrying = RetryingFunctionExecutor(fexec, retries=2, backoff=0.5, backoff_factor=2)
    flaky = tmp_path / "flaky"
    futures = retrying.map(fail_times, [(str(flaky), 2, 1), (str(tmp_path / "fine"), 0, 2)])
    t0 = time.monotonic()
    done, _ = retrying.wait(futures, return_when=acx.ANY_COMPLETED)
    assert [f.result() for f in done] == [2]  # the item that did not fail is done first
    assert retrying.get_result(futures) == [1, 2]
    took = time.monotonic() - t0
    assert attempts(flaky) == 3
    print(f"two retries after 0.5 s and 1 s of backoff: {took:.1f} s")  # (no assertion on wall time)
    assert [f.failure_count for f in futures] == [2, 0]


def test_a_cancelled_item_is_not_retried_and_arguments_are_checked(fexec: FunctionExecutor, tmp_path: Path) -> None:
    retrying = RetryingFunctionExecutor(fexec, retries=5)
    path = tmp_path / "cancelled"
    (future,) = retrying.map(fail_times, [(str(path), 10, 1)])
    future.cancel()
    done, _ = retrying.wait([future], throw_except=False)
    assert done == [future] and attempts(path) == 1 and future.error
    with pytest.raises(ValueError, match="backoff_factor"):
        RetryingFunctionExecutor(fexec, backoff_factor=0.5)
    with pytest.raises(ValueError, match="retries=-1"):
        retrying.map(fail_times, [(str(path), 0, 1)], retries=-1)
    with pytest.raises(TimeoutError, match="1 of 1 calls unfinished"):
        retrying.wait(retrying.map(time.sleep, [5]), timeout=0.3)


def test_it_is_a_context_manager_over_its_executor() -> None:
    with RetryingFunctionExecutor(FunctionExecutor(config={"localhost": {"replicas": 1}})) as retrying:
        assert retrying.get_result(retrying.map(abs, [-1, -2])) == [1, 2]
    with pytest.raises(RuntimeError, match="closed"):
        retrying.map(abs, [-1])


def test_superseded_attempts_leave_the_executors_own_results_alone(fexec: FunctionExecutor, tmp_path: Path) -> None:
    retrying = RetryingFunctionExecutor(fexec, retries=2)
    futures = retrying.map(fail_times, [(str(tmp_path / "a"), 2, 5), (str(tmp_path / "b"), 0, 6)])
    assert retrying.get_result(futures) == [5, 6]
    assert fexec.get_result() == []  # nothing left uncollected: not the failed attempts either
    done, not_done = fexec.wait()  # nor does the executor's wait raise their errors
    assert not not_done and all(f.success for f in done)


def test_cancelling_during_a_backoff_ends_the_item_and_object_sources_are_refused(
    fexec: FunctionExecutor, tmp_path: Path
) -> None:
    retrying = RetryingFunctionExecutor(fexec, retries=3, backoff=30)
    path = tmp_path / "waiting"
    futures = retrying.map(fail_times, [(str(path), 5, 1)])
    with pytest.raises(TimeoutError):
        retrying.wait(futures, timeout=2)  # failed once, its retry 30 s away
    futures[0].cancel()
    done, not_done = retrying.wait(futures, throw_except=False, timeout=5)
    assert done == futures and not not_done and futures[0].error and attempts(path) == 1
    with pytest.raises(ValueError, match="not object sources"):
        retrying.map(fail_times, "az://container/prefix/")
    assert attempts(path) == 1
