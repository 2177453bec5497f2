"""FunctionExecutor, the Lithops-compatible synchronous facade, on the real local runtime."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import async_ca_exec as acx
from async_ca_exec import ALWAYS, ANY_COMPLETED, FunctionExecutor

from conftest import TREE_SNIPPET, children, run_python, wait_gone

#: The seed's exact snippet, kept in examples/ (which test_examples also runs).
SEED = (Path(__file__).resolve().parent.parent / "examples" / "lithops_seed.py").read_text()


def add7(x: int) -> int:
    return x + 7


def slow(x: float) -> float:
    time.sleep(x)
    return x


@pytest.fixture
def fexec() -> Iterator[FunctionExecutor]:
    with FunctionExecutor(config={"localhost": {"replicas": 1, "worker_processes": 2}}) as f:
        yield f


def test_the_seed_snippet_runs_unchanged_in_a_script(tmp_path: Path) -> None:
    r = run_python(SEED, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["10", "[8, 9, 10]"]
    assert r.stderr == ""


def test_a_script_that_never_closes_its_executor_leaves_no_process(tmp_path: Path) -> None:
    code = TREE_SNIPPET + SEED + "\nprint('PIDS', *sorted(tree(_os.getpid())))\n"
    r = run_python(code, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pids = {int(p) for p in r.stdout.splitlines()[-1].split()[1:]}
    assert len(pids) >= 3  # the replicas and their workers were running at exit
    assert not wait_gone(pids), "runtime processes outlived a script that forgot to close"


def test_call_async_and_map_then_get_result(fexec: FunctionExecutor) -> None:
    fexec.call_async(add7, 3)
    assert fexec.get_result() == 10
    futures = fexec.map(add7, [1, 2, 3])
    assert len(futures) == 3
    assert fexec.get_result() == [8, 9, 10]
    assert fexec.get_result() == []  # already collected
    assert fexec.get_result(fs=futures) == [8, 9, 10]
    fexec.map(add7, [5])
    assert fexec.get_result() == [12]  # a map's result is a list even for one item


def test_items_follow_lithops_rules(fexec: FunctionExecutor) -> None:
    def show(*args: object, **kwargs: object) -> tuple[object, ...]:
        return (args, kwargs)

    fexec.map(show, [(1, 2), {"a": 1}, [1, 2], "s"])
    assert fexec.get_result() == [((1, 2), {}), ((), {"a": 1}), (([1, 2],), {}), (("s",), {})]
    fexec.map(show, [(1,), 2], extra_args=(9,))
    assert fexec.get_result() == [((1, 9), {}), ((2, 9), {})]
    fexec.map(show, [{"a": 1}], extra_args={"b": 2})
    assert fexec.get_result() == [((), {"a": 1, "b": 2})]


def test_reserved_id_parameter_gets_the_call_index(fexec: FunctionExecutor) -> None:
    def which(x: int, id: int) -> tuple[int, int]:
        return (x, id)

    fexec.map(which, [10, 20, 30])
    assert fexec.get_result() == [(10, 0), (20, 1), (30, 2)]


def test_futures_have_lithops_properties(fexec: FunctionExecutor) -> None:
    fut = fexec.call_async(slow, 0.5)
    assert fut.running and not fut.done and not fut.ready
    assert fut.result() == 0.5
    assert fut.done and fut.done() and fut.ready and not fut.running and fut.success and not fut.error
    assert fut.stats["received"] >= fut.stats["submitted"] and fut.call_id


def test_errors_raise_from_get_result_unless_told_otherwise(fexec: FunctionExecutor) -> None:
    fexec.map(lambda x: 1 // x, [1, 0])
    with pytest.raises(ZeroDivisionError):
        fexec.get_result()
    futures = fexec.map(lambda x: 1 // x, [1, 0])
    assert fexec.get_result(fs=futures, throw_except=False) == [1, None]
    assert futures[1].error and not futures[1].success


def test_wait_understands_lithops_and_stdlib_constants(fexec: FunctionExecutor) -> None:
    futures = fexec.map(slow, [0.01, 3])
    done, not_done = fexec.wait(futures, return_when=ALWAYS)
    assert len(done) + len(not_done) == 2
    done, not_done = fexec.wait(futures, return_when=ANY_COMPLETED)
    assert [f.result() for f in done] == [0.01] and len(not_done) == 1
    done, not_done = fexec.wait(futures, return_when=acx.ALL_COMPLETED)
    assert len(done) == 2 and not not_done
    with pytest.raises(TimeoutError):
        fexec.wait(fexec.map(slow, [5]), timeout=0.3)


def test_map_reduce_returns_the_reducer_value(fexec: FunctionExecutor) -> None:
    fexec.map_reduce(add7, range(5), sum)
    assert fexec.get_result() == sum(range(7, 12))


def test_works_inside_a_thread(fexec: FunctionExecutor) -> None:
    out: list[object] = []
    t = threading.Thread(target=lambda: (fexec.map(add7, [1, 2]), out.append(fexec.get_result())))
    t.start()
    t.join(60)
    assert out == [[8, 9]]


async def test_works_when_called_straight_from_a_coroutine() -> None:
    # A notebook cell: a loop is running in this thread; the facade must neither deadlock
    # nor refuse.
    with FunctionExecutor(config={"localhost": {"replicas": 1, "worker_processes": 1}}) as f:
        f.call_async(add7, 1)
        assert f.get_result() == 8
        assert asyncio.get_running_loop().is_running()


def test_close_stops_every_process() -> None:
    before = children(os.getpid())
    f = FunctionExecutor()
    f.map(add7, [1])
    assert f.get_result() == [8]
    tree = children(os.getpid()) - before
    assert tree
    f.close()
    f.close()
    assert not wait_gone(tree)
    with pytest.raises(RuntimeError, match="closed"):
        f.map(add7, [1])


def test_backend_section_keys_as_keyword_arguments() -> None:
    with FunctionExecutor(worker_processes=1, replicas=1) as f:
        assert f.config.localhost.worker_processes == 1
        f.map(add7, [1])
        assert f.get_result() == [8]
    with pytest.raises(acx.ConfigError, match="runtime_memroy"):
        FunctionExecutor(runtime_memroy=1024)


def read_env(name: str) -> str | None:
    import os

    return os.environ.get(name)


def test_extra_env_is_set_for_those_calls_only() -> None:
    with acx.FunctionExecutor() as fexec:
        fexec.map(read_env, ["ACX_TEST_COLOUR", "ACX_TEST_SIZE"], extra_env={"ACX_TEST_COLOUR": "blue", "ACX_TEST_SIZE": "9"})
        assert fexec.get_result() == ["blue", "9"]
        fexec.map(read_env, ["ACX_TEST_COLOUR"])  # the same workers, no extra_env: gone again
        assert fexec.get_result() == [None]
        fexec.map_reduce(read_env, ["ACX_TEST_COLOUR"], lambda xs: xs, extra_env={"ACX_TEST_COLOUR": "red"})
        assert fexec.get_result() == ["red"]
        with pytest.raises(TypeError, match="extra_env must be a dict of str to str"):
            fexec.map(read_env, ["X"], extra_env={"X": 1})  # type: ignore[dict-item]


def test_a_config_warning_points_at_the_users_line(tmp_path: Path) -> None:
    (tmp_path / "lithops.yaml").write_text("aws_lambda: {}\n")
    script = tmp_path / "job.py"
    script.write_text("import async_ca_exec as acx\nfexec = acx.FunctionExecutor(config='lithops.yaml')\nfexec.close()\n")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"{script}:2: UserWarning: config section 'aws_lambda'"), r.stderr


def test_module_wait_and_get_result_take_futures_of_several_executors(fexec: FunctionExecutor) -> None:
    """Lithops' ``lithops.wait`` / ``lithops.get_result``: futures of any executors, in the order given."""
    with acx.LocalhostExecutor(config={"localhost": {"replicas": 1, "worker_processes": 1}}) as other:
        assert other.config.backend == "local"
        mine, theirs = fexec.map(slow, [0.01, 2]), other.map(add7, [1, 2])
        done, not_done = acx.wait([*mine, *theirs], return_when=acx.ANY_COMPLETED)
        assert done and not_done and all(f.done for f in done)
        assert acx.get_result([*mine, *theirs]) == [0.01, 2, 8, 9]
        assert acx.get_result(theirs[0]) == 8  # one future: one value
        done, not_done = acx.wait([*mine, *theirs])
        assert len(done) == 4 and not not_done
        with pytest.raises(TimeoutError, match="1 of 2 calls unfinished"):
            acx.wait([*fexec.map(slow, [5]), *other.map(add7, [3])], timeout=0.3)
        failing = other.map(lambda x: 1 // x, [0])
        with pytest.raises(ZeroDivisionError):
            acx.wait([*failing, *fexec.map(add7, [1])])
        assert acx.get_result([*failing, *mine], throw_except=False) == [None, 0.01, 2]
    # One executor's futures: its own wait (progress bar and all).
    assert acx.get_result(fexec.map(add7, [5])) == [12]


def test_serverless_executor_is_the_function_executor_on_the_configs_backend() -> None:
    with acx.ServerlessExecutor(config={"localhost": {"replicas": 1, "worker_processes": 1}}) as f:
        assert isinstance(f, FunctionExecutor) and f.config.backend == "local"  # nothing configured: local
        assert f.call_async(add7, 1).result() == 8
