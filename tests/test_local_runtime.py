"""The embedded local runtime: replicas on one loopback port, and no orphans, ever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from async_ca_exec import AsyncExecutor, RuntimeStartError

from conftest import TREE_SNIPPET, children, wait_gone

LONG_MAP = textwrap.dedent("""
    import asyncio, sys, time
    from async_ca_exec import AsyncExecutor

    def nap(x):
        time.sleep(60)

    async def main():
        async with AsyncExecutor() as ex:
            task = asyncio.ensure_future(ex.map(nap, range(4)))
            await asyncio.sleep(1.0)
            print('PIDS', *sorted(tree(_os.getpid())), flush=True)
            await task

    asyncio.run(main())
""")


def identify(x: int) -> str:
    import os

    return os.environ["ACX_REPLICA_ID"]


async def test_replicas_share_one_port_and_all_serve_calls() -> None:
    async with AsyncExecutor(config={"localhost": {"replicas": 3, "worker_processes": 1}}) as ex:
        assert ex.endpoint is not None and ex.endpoint.url.startswith("http://127.0.0.1:")
        replicas = set(await ex.map(identify, range(300)))
    assert replicas == {"local-0", "local-1", "local-2"}


def _start(code: str, tmp: Path) -> tuple[subprocess.Popen[str], set[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", TREE_SNIPPET + code], cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PIDS"):
        proc.kill()
        _out, err = proc.communicate(timeout=10)
        raise AssertionError(f"the script did not start: {err}")
    return proc, {int(p) for p in line.split()[1:]}


def test_a_killed_client_leaves_no_orphans(tmp_path: Path) -> None:
    proc, pids = _start(LONG_MAP, tmp_path)
    proc.kill()
    proc.communicate(timeout=10)
    assert len(pids) >= 3  # a replica and its workers, busy with the map
    assert not wait_gone(pids), "servers or workers outlived a SIGKILLed client"


def test_ctrl_c_stops_the_script_and_its_runtime(tmp_path: Path) -> None:
    proc, pids = _start(LONG_MAP, tmp_path)
    proc.send_signal(signal.SIGINT)
    try:
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert not wait_gone(pids), "servers or workers outlived Ctrl-C"


async def test_a_runtime_that_cannot_start_says_why(tmp_path: Path) -> None:
    broken = tmp_path / "python-broken"
    broken.write_text("#!/bin/sh\necho 'no such module: acx_server' >&2\nexit 3\n")
    broken.chmod(0o755)
    ex = AsyncExecutor(config={"localhost": {"runtime": str(broken)}})
    with pytest.raises(RuntimeStartError, match=r"code 3[\s\S]*no such module"):
        await ex.start()
    await ex.aclose()


async def test_garbage_collected_executor_stops_its_runtime() -> None:
    import gc

    before = children(os.getpid())
    ex = AsyncExecutor()
    await ex.start()
    tree = children(os.getpid()) - before
    assert tree
    runtime = ex.runtime
    await ex._invoker.aclose()  # type: ignore[union-attr]  # the user forgot aclose(); drop every reference
    del ex, runtime
    gc.collect()
    assert not wait_gone(tree), "a forgotten executor's runtime survived garbage collection"
