"""Robustness: no hangs, no lost calls, no wrong charges, no unbounded growth, no pre-auth reads."""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from acx_server import ipc
from acx_server.pool import Task, WorkerPool
from async_ca_exec import AsyncExecutor, ConfigError, RuntimeStartError, protocol

from conftest import ServerProcess


def nap(x: float) -> float:
    time.sleep(x)
    return x


async def test_sequential_submits_with_a_single_lane_never_stall() -> None:
    async with AsyncExecutor(max_concurrency=1) as ex:
        for i in range(30):
            assert await asyncio.wait_for(ex.submit(abs, -i), 30) == i
        assert await asyncio.wait_for(ex.map_reduce(abs, range(-4, 0), sum), 30) == 10


async def test_a_runtime_that_fails_to_start_fails_the_calls_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AZURE_SUBSCRIPTION_ID", raising=False)
    broken = tmp_path / "python-broken"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    ex = AsyncExecutor(config={"localhost": {"runtime": str(broken)}})
    try:
        with pytest.raises(RuntimeStartError):
            await asyncio.wait_for(ex.map(abs, [1, 2]), 60)
        fut = ex.submit(abs, 1)
        with pytest.raises(RuntimeStartError):
            await asyncio.wait_for(fut, 60)
    finally:
        await ex.aclose()
    # A start that fails before any process or request: the Azure backend without its settings.
    ex = AsyncExecutor(backend="azure", config={})
    with pytest.raises(ConfigError, match=r"azure\.subscription_id"):
        await asyncio.wait_for(ex.map(abs, [1]), 60)
    await ex.aclose()


async def test_aclose_settles_every_call_still_in_flight() -> None:
    ex = AsyncExecutor(config={"localhost": {"replicas": 1, "worker_processes": 1}})
    await ex.start()
    futures = [ex.submit(nap, 30) for _ in range(2)]
    mapping = asyncio.ensure_future(ex.map(nap, [30, 30]))
    await asyncio.sleep(0.5)
    await asyncio.wait_for(ex.aclose(), 30)
    assert all(f.cancelled() for f in futures)
    with pytest.raises(RuntimeError, match="closed"):
        await asyncio.wait_for(mapping, 10)


async def test_time_queued_on_a_replica_does_not_count_against_the_call_timeout() -> None:
    config = {"localhost": {"replicas": 1, "worker_processes": 1}}
    async with AsyncExecutor(timeout=0.6, max_concurrency=8, config=config) as ex:
        # Eight 0.3 s calls on one worker: the last waits ~2 s in the queue, runs 0.3 s.
        assert await ex.map(nap, [0.3] * 8) == [0.3] * 8


async def test_an_exception_whose_str_raises_is_reported_not_a_crash(ex: AsyncExecutor) -> None:
    def hostile(x: int) -> int:
        class Nasty(Exception):
            def __str__(self) -> str:
                raise RuntimeError("no str for you")

        if x == 1:
            raise Nasty()
        return x

    results = await ex.map(hostile, [0, 1, 2], return_exceptions=True)
    assert results[0] == 0 and results[2] == 2
    assert type(results[1]).__name__ == "Nasty"  # its own type, not WorkerCrashedError
    assert "hostile" in results[1].__cause__.tb


async def test_awaited_submit_futures_are_not_kept_forever() -> None:
    async with AsyncExecutor() as ex:
        for i in range(3000):
            await ex.submit(abs, i)
        assert len(ex._uncollected) < 2048
        assert await ex.get_result() == []
        ex.submit(abs, -5)
        assert await ex.get_result() == 5


async def test_a_body_is_not_read_before_its_headers_are_authenticated(server: ServerProcess) -> None:
    # Announce 100 MB, send none of it: a server that waited for the body would never answer.
    ts = f"{time.time():.3f}"
    head = (
        f"POST {protocol.INVOKE_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000000\r\n"
        f"{protocol.H_TIMESTAMP}: {ts}\r\n{protocol.H_CALL_ID}: c-1\r\n"
        f"{protocol.H_HEAD_SIGNATURE}: {'0' * 64}\r\n{protocol.H_SIGNATURE}: {'0' * 64}\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(head.encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
    finally:
        writer.close()
    assert b" 401 " in status_line


async def test_chunked_uploads_without_a_length_are_refused(server: ServerProcess) -> None:
    body = b"x" * 10
    headers = protocol.signed_headers(server.key, "POST", protocol.INVOKE_PATH, "c-1", body)

    async def gen():  # type: ignore[no-untyped-def]
        yield body

    import aiohttp

    async with aiohttp.ClientSession() as s, s.post(server.url + protocol.INVOKE_PATH, data=gen(), headers=headers) as r:
        assert r.status == 411 and "Content-Length" in (await r.json())["error"]


# -- the pool's cancel decision, on real Task objects and a stand-in worker -----------------


class FakeWorker:
    """Stands in for a WorkerProc: an in-flight queue, a progress block, a kill switch."""

    def __init__(self, progress: tuple[int, int, float, int], inflight: list[Task]) -> None:
        self._progress = progress
        self.inflight = collections.deque(inflight)
        self.killed: str | None = None

    @property
    def progress(self) -> Any:
        return self

    def get(self) -> tuple[int, int, float, int]:
        return self._progress

    def read(self) -> tuple[int, int, float, int] | None:
        return self._progress

    def kill(self, reason: str) -> None:
        self.killed = reason


def _task(task_id: int) -> Task:
    body = protocol.encode_invocation(call_id=f"t-{task_id}", n=1, fn=b"f", fn_hash=_sha(b"f"), items=b"i", timeout=5)
    return Task(task_id, protocol.decode_invocation(body))


def _sha(b: bytes) -> str:
    import hashlib

    return hashlib.sha256(b).hexdigest()


@pytest.mark.parametrize(
    ("running", "state", "expect_kill"),
    [
        ("A", ipc.STATE_RUNNING, True),  # running the cancelled call: kill
        ("old", ipc.STATE_IDLE, True),  # about to start it: kill
        ("B", ipc.STATE_RUNNING, False),  # already past it, on another client's call: spare
        ("A", ipc.STATE_IDLE, False),  # finished it, last outcome in transit: spare
    ],
)
def test_cancelling_a_call_kills_its_worker_only_when_that_worker_is_on_it(running: str, state: int, expect_kill: bool) -> None:
    a, b = _task(10), _task(11)
    tid = {"A": a.id, "B": b.id, "old": 3}[running]
    worker = FakeWorker((tid, 0, time.monotonic(), state), [a, b])
    pool = WorkerPool(1, replica="test")
    pool.workers = {worker}  # type: ignore[arg-type]
    pool.cancel(a)
    assert (worker.killed == "cancel") is expect_kill
    assert a.cancelled


def _write_progress(fd: int, seconds: float) -> None:
    """A worker's progress writes, as fast as they go: (k, k % 2**32, float(k), k % 4)."""
    progress = ipc.Progress(fd)
    deadline, k = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        for _ in range(1000):
            k += 1
            progress.set(k, k % 2**32, float(k), k % 4)


def test_the_server_never_reads_half_of_one_progress_write_and_half_of_another() -> None:
    """The watchdog reads a worker's progress block from another process at any moment; a
    read that took the new task id with a half-written start time once killed a worker for
    'running past its timeout of 3600 s' a few ms into a big fast map (seen at 1,000 calls
    in flight). Every read here must be one whole write."""
    import multiprocessing

    progress = ipc.Progress()
    writer = multiprocessing.get_context("fork").Process(target=_write_progress, args=(progress.fd, 2.0))
    writer.start()
    try:
        reads, changed, last = 0, 0, None
        while writer.is_alive() or reads == 0:
            value = progress.read()
            if value is None:  # every try met a write under way: said so, not guessed
                continue
            k, index, started, state = value
            assert (index, started, state) == (k % 2**32, float(k), k % 4), f"a torn read: {value}"
            reads += 1
            changed += value != last
            last = value
        assert reads > 1_000 and changed > 100  # the reads did meet the writes under way
    finally:
        writer.join(10)
        progress.close()
    assert writer.exitcode == 0


async def test_a_worker_starting_while_the_pool_closes_is_stopped_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replacement worker that was being started when close() began (a call cut by Ctrl-C had
    its worker killed just before) was not in the pool yet, so close() did not kill it: the
    replica then waited 10 s and was SIGKILLed by the client after its 5 s grace."""
    import acx_server.pool as pool_module

    real = asyncio.create_subprocess_exec
    starting = asyncio.Event()
    proceed = asyncio.Event()
    replacement: list[Any] = []

    async def slow_start(*args: Any, **kwargs: Any) -> Any:
        proc = await real(*args, **kwargs)
        if pool_ready.is_set():  # the replacement, not the first worker
            replacement.append(proc)
            starting.set()
            await proceed.wait()  # close() runs now
        return proc

    pool_ready = asyncio.Event()
    monkeypatch.setattr(pool_module.asyncio, "create_subprocess_exec", slow_start)
    pool = WorkerPool(1, replica="test")
    await pool.start()
    pool_ready.set()
    (first,) = pool.workers
    first.kill("a cut call")  # its supervisor starts a replacement
    await asyncio.wait_for(starting.wait(), 30)
    closing = asyncio.ensure_future(pool.close())
    await asyncio.sleep(0)  # close() has looked at the pool's workers
    proceed.set()
    await asyncio.wait_for(closing, 30)
    assert not pool.workers and not pool._supervisors
    (proc,) = replacement
    # Killed by close() (not left to exit when its socket closed after close() gave up on it).
    assert proc.returncode == -signal.SIGKILL, proc.returncode
