"""Progress bars and calls' output, as a user sees them, on the real local runtime."""

from __future__ import annotations

import asyncio
import re
import sys
import time

import pytest

from async_ca_exec import AsyncExecutor, FunctionExecutor


def square(x: int) -> int:
    return x * x


def slow_square(x: int) -> int:
    import time

    time.sleep(0.5)
    return x * x


def fail_on_threes(x: int) -> int:
    if x % 3 == 0:
        raise ValueError(f"no threes: {x}")
    return x


def chatty(x: int) -> int:
    print(f"starting {x}")
    print(f"warning from {x}", file=sys.stderr)
    time.sleep(0.05)
    print(f"done {x}")
    return x


def slow_talker(seconds: float) -> str:
    print("first line", flush=True)
    time.sleep(seconds)
    print("last line")
    return "ok"


# -- progress -----------------------------------------------------------------------------


async def test_map_draws_a_bar_with_done_failed_in_flight_and_rate(capsys: pytest.CaptureFixture[str]) -> None:
    async with AsyncExecutor(progress=True) as ex:
        results = await ex.map(fail_on_threes, range(30), return_exceptions=True)
    assert sum(isinstance(r, ValueError) for r in results) == 10
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("map: 100%") and "30/30" in final, err
    assert "failed 10, in flight 0" in final and re.search(r"\d+(\.\d+)?call/s", final), final


async def test_progress_false_or_a_pipe_draws_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    async with AsyncExecutor() as ex:  # progress unset, stderr is not a terminal under pytest
        assert await ex.map(square, range(10)) == [x * x for x in range(10)]
        assert await ex.map(square, range(10), progress=False) == [x * x for x in range(10)]
    async with AsyncExecutor(progress=False) as ex:
        assert await ex.map_reduce(square, range(5), sum, progress=None) == 30
    assert capsys.readouterr().err == ""


async def test_imap_and_map_reduce_bars(capsys: pytest.CaptureFixture[str]) -> None:
    async with AsyncExecutor(progress=True) as ex:
        got = sorted([r async for r in ex.imap(square, (x for x in range(12)))])  # length unknown up front
        assert got == sorted(x * x for x in range(12))
        assert await ex.map_reduce(square, range(8), sum) == sum(x * x for x in range(8))
    err = capsys.readouterr().err.replace("\r", "\n")
    assert re.search(r"imap: .*12/12", err) and re.search(r"map_reduce: 100%.*8/8", err), err


def test_the_facade_shows_a_bar_while_waiting(capsys: pytest.CaptureFixture[str]) -> None:
    with FunctionExecutor(progress=True) as fexec:
        fexec.map(square, range(6))
        assert fexec.get_result() == [x * x for x in range(6)]
        futures = fexec.map(slow_square, range(4))  # still running when wait() starts
        fexec.wait(futures)
        assert fexec.get_result(futures, show_progressbar=False) == [0, 1, 4, 9]
    err = capsys.readouterr().err.replace("\r", "\n")
    assert re.search(r"get_result: 100%.*6/6", err) and re.search(r"wait: 100%.*4/4", err), err
    assert err.count("get_result") == err.count("get_result: ")  # one bar per call shown


# -- logs ---------------------------------------------------------------------------------


async def test_streamed_output_arrives_while_the_call_runs(capsys: pytest.CaptureFixture[str]) -> None:
    async with AsyncExecutor(logs="stream") as ex:
        fut = ex.submit(slow_talker, 3.0)
        seen = ""
        while "[0] first line" not in seen:
            assert not fut.done(), "the first line only came with the result"
            await asyncio.sleep(0.05)
            seen += capsys.readouterr().out
        assert await fut == "ok"
    out = seen + capsys.readouterr().out
    assert out.index("[0] first line") < out.index("[0] last line")
    assert fut.logs == "first line\nlast line\n"  # collected as well


async def test_streamed_map_output_is_prefixed_with_each_calls_index(capsys: pytest.CaptureFixture[str]) -> None:
    async with AsyncExecutor(logs="stream") as ex:
        assert await ex.map(chatty, range(8), chunksize=3) == list(range(8))
    captured = capsys.readouterr()
    for i in range(8):
        assert f"[{i}] starting {i}\n" in captured.out and f"[{i}] done {i}\n" in captured.out
        assert f"[{i}] warning from {i}\n" in captured.err and f"warning from {i}" not in captured.out


async def test_collect_keeps_output_in_the_future_and_off_drops_it(capsys: pytest.CaptureFixture[str]) -> None:
    async with AsyncExecutor() as ex:  # collect is the default
        fut = ex.submit(chatty, 5)
        assert await fut == 5
        # stdout and stderr are captured apart: each keeps its order, and both are there
        assert sorted(fut.logs.splitlines()) == ["done 5", "starting 5", "warning from 5"]
        assert fut.logs.index("starting 5") < fut.logs.index("done 5")
    async with AsyncExecutor(logs="off") as ex:
        fut = ex.submit(chatty, 6)
        assert await fut == 6 and fut.logs == ""
    assert capsys.readouterr().out == ""  # neither printed anything


def test_logs_setting_is_checked() -> None:
    from async_ca_exec import ConfigError

    with pytest.raises(ConfigError, match="logs"):
        AsyncExecutor(logs="loud")
