"""The embedded local runtime: replicas on one loopback port, and no orphans, ever."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from async_ca_exec import AsyncExecutor, RuntimeStartError

from conftest import TREE_SNIPPET, children, replica_with_a_running_call, wait_gone

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
    import time

    time.sleep(0.01)  # long enough that the map keeps many connections open at once
    return os.environ["ACX_REPLICA_ID"]


async def test_replicas_share_one_port_and_all_serve_calls() -> None:
    async with AsyncExecutor(config={"localhost": {"replicas": 3, "worker_processes": 1}}) as ex:
        assert ex.endpoint is not None and ex.endpoint.url.startswith("http://127.0.0.1:")
        # One call per request: "auto" rightly packs 300 quick calls into a few requests, and a
        # few connections can all land on two of the three replicas (CI saw local-0 get none).
        replicas = set(await ex.map(identify, range(300), chunksize=1))
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


CTRL_C_SCRIPTS = {
    "map": LONG_MAP,
    "imap": textwrap.dedent("""
        import asyncio, time
        from async_ca_exec import AsyncExecutor

        def nap(x):
            time.sleep(60)

        async def main():
            async with AsyncExecutor() as ex:
                async for _ in ex.imap(nap, range(4), chunksize=1):
                    pass

        async def outer():
            task = asyncio.ensure_future(main())
            await asyncio.sleep(1.0)
            print('PIDS', *sorted(tree(_os.getpid())), flush=True)
            await task

        asyncio.run(outer())
    """),
    "facade": textwrap.dedent("""
        import os as _os, time
        import async_ca_exec as acx

        def nap(x):
            time.sleep(60)

        fexec = acx.FunctionExecutor()
        fexec.map(nap, range(4))
        time.sleep(1.0)
        print('PIDS', *sorted(tree(_os.getpid())), flush=True)
        fexec.get_result()
    """),
}
CTRL_C_LINES = {
    "map": "async_ca_exec: interrupted (Ctrl-C): map(nap) stopped with 0 of 4 calls finished; the others were cancelled",
    "imap": "async_ca_exec: interrupted (Ctrl-C): imap(nap) stopped with 0 of 4 calls finished; the others were cancelled",
    "facade": "async_ca_exec: interrupted (Ctrl-C): get_result() stopped waiting with 0 of 4 calls finished",
}


@pytest.mark.parametrize("run", range(3))
@pytest.mark.parametrize("form", list(CTRL_C_SCRIPTS))
def test_ctrl_c_says_in_one_line_how_far_the_job_got_and_stops_its_runtime(tmp_path: Path, form: str, run: int) -> None:
    """No asyncio traceback; and the replicas stop on SIGTERM (the client would say it had to
    SIGKILL one: that took the 5 s grace when a worker being started was missed)."""
    proc, pids = _start(CTRL_C_SCRIPTS[form], tmp_path)
    time.sleep(0.5)  # from printing the pids into the wait (the facade's get_result) or the map
    proc.send_signal(signal.SIGINT)
    try:
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGINT  # Python's exit for an interrupted script (130 in a shell)
    assert err == CTRL_C_LINES[form] + "\n", err
    assert not wait_gone(pids), "servers or workers outlived Ctrl-C"


def test_a_ctrl_c_outside_any_job_keeps_pythons_traceback(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import asyncio, os, signal
        from async_ca_exec import AsyncExecutor

        async def main():
            async with AsyncExecutor() as ex:
                await ex.map(abs, [1])
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.sleep(30)

        asyncio.run(main())
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGINT and "Traceback" in r.stderr and "KeyboardInterrupt" in r.stderr
    assert "async_ca_exec: interrupted" not in r.stderr


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


# -- a replica that dies is replaced, as Container Apps does (issue 13) ------------------------


def nap_noting(x: int, path: str) -> int:
    """Note the replica serving this call (the worker's parent pid), then nap a little."""
    with open(path, "a") as f:
        f.write(f"{os.getppid()}\n")
    time.sleep(0.01)
    return x


@pytest.mark.parametrize("replicas", [1, 3])
@pytest.mark.parametrize("chunksize", [1, "auto"])
async def test_a_killed_replica_is_replaced_and_its_calls_are_retried(
    tmp_path: Path, replicas: int, chunksize: int | str
) -> None:
    marker = tmp_path / "replicas"
    config = {"localhost": {"replicas": replicas, "worker_processes": 2}}
    async with AsyncExecutor(config=config, max_concurrency=16) as ex:
        rt: Any = ex.runtime
        job = asyncio.ensure_future(ex.map(functools.partial(nap_noting, path=str(marker)), range(400), chunksize=chunksize))
        victim = await replica_with_a_running_call(marker, rt.pids)
        index = rt.pids.index(victim)
        workers = children(victim)
        os.kill(victim, signal.SIGKILL)
        assert await asyncio.wait_for(job, 120) == list(range(400))
        for _ in range(200):  # the replacement may still be starting if no call needed it
            if rt.restarts:
                break
            await asyncio.sleep(0.05)
        assert victim not in rt.pids and len(rt.pids) == replicas and rt.restarts == 1
        assert not wait_gone(workers), "the killed replica's workers outlived it"
        summary = ex.job_summary()
        assert summary["retries"] >= 1 and summary["calls"]["succeeded"] == 400 and summary["calls"]["pending"] == 0
        # The executor keeps working (on the replacement, when it is the only replica).
        served = set(await ex.map(identify, range(200)))
        assert f"local-{index}" not in served and (replicas > 1 or served == {f"local-{index}.1"}), served
        assert await ex.map(abs, range(-20, 0)) == list(range(20, 0, -1))


async def test_every_replica_killed_at_once_is_replaced_without_a_refused_connection(tmp_path: Path) -> None:
    """The runtime holds the listening socket: connections made while no replica runs wait in
    its queue (they are not refused), so only calls that were on the dead replicas are retried."""
    async with AsyncExecutor(config={"localhost": {"replicas": 2, "worker_processes": 1}}) as ex:
        rt: Any = ex.runtime
        await ex.map(abs, range(10))
        for pid in rt.pids:
            os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.05)  # before the supervisor has noticed
        assert await ex.map(abs, range(-50, 0), chunksize=1) == list(range(50, 0, -1))
        assert rt.restarts == 2


# -- platforms: no SO_REUSEPORT, no prctl (macOS has neither) ----------------------------------

NO_LINUX_EXTRAS = textwrap.dedent("""
    # Loaded by every interpreter of the test (client, replicas, workers): take away what
    # Linux has and macOS lacks.
    import ctypes, socket
    if hasattr(socket, "SO_REUSEPORT"):
        del socket.SO_REUSEPORT

    class _NoPrctl(ctypes.CDLL):
        def __getattr__(self, name):
            if name == "prctl":
                raise AttributeError("prctl: not on this platform (test)")
            return super().__getattr__(name)

    ctypes.CDLL = _NoPrctl
""")

WITHOUT_LINUX_EXTRAS = textwrap.dedent("""
    import asyncio, os, signal, socket, sys, time
    from async_ca_exec import AsyncExecutor

    def probe(_):
        from acx_server.worker import _set_parent_death_signal
        return hasattr(socket, "SO_REUSEPORT"), _set_parent_death_signal(), os.environ["ACX_REPLICA_ID"]

    def hang(path):
        with open(path, "w") as f:
            f.write(f"{os.getpid()} {os.getppid()}")
        time.sleep(600)

    async def main():
        assert not hasattr(socket, "SO_REUSEPORT")
        async with AsyncExecutor(config={"localhost": {"replicas": 2, "worker_processes": 1}}) as ex:
            seen = await ex.map(probe, range(200), chunksize=1)
            assert {s[:2] for s in seen} == {(False, False)}, seen  # neither, in the workers too
            print("REPLICAS", *sorted({s[2] for s in seen}), flush=True)
            stuck = ex.submit(hang, sys.argv[1])
            while not os.path.exists(sys.argv[1]) or not open(sys.argv[1]).read():
                await asyncio.sleep(0.05)
            worker, server = map(int, open(sys.argv[1]).read().split())
            os.kill(server, signal.SIGKILL)  # its worker must not outlive it, without prctl
            for _ in range(100):
                try:
                    os.kill(worker, 0)
                except ProcessLookupError:
                    break
                await asyncio.sleep(0.05)
            else:
                raise SystemExit(f"worker {worker} outlived its server {server}")
            stuck.cancel()
            print("RESULTS", sum(await ex.map(abs, range(-100, 0))), flush=True)

    asyncio.run(main())
""")


def test_the_local_runtime_runs_without_so_reuseport_or_prctl(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_LINUX_EXTRAS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    before = children(os.getpid())
    r = subprocess.run([sys.executable, "-c", WITHOUT_LINUX_EXTRAS, str(tmp_path / "hang")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=180)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines["REPLICAS"] == "local-0 local-1"  # both replicas took connections from the shared socket
    assert lines["RESULTS"] == str(sum(range(1, 101)))
    assert not wait_gone(children(os.getpid()) - before)


@pytest.mark.parametrize("form", ["async", "facade"])
def test_ctrl_c_while_the_runtime_starts_is_one_line_too(tmp_path: Path, form: str) -> None:
    code = {
        "async": "import asyncio\nfrom async_ca_exec import AsyncExecutor\nasync def main():\n"
                 "    print('GO', flush=True)\n    async with AsyncExecutor() as ex:\n        await asyncio.sleep(60)\n"
                 "asyncio.run(main())\n",
        "facade": "from async_ca_exec import FunctionExecutor\nprint('GO', flush=True)\nfexec = FunctionExecutor()\n"
                  "fexec.map(abs, range(400))\nimport time\ntime.sleep(60)\n",
    }[form]  # fmt: skip
    before = children(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "GO\n"
    time.sleep(0.2)  # the runtime is starting (about a second here)
    proc.send_signal(signal.SIGINT)
    try:
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert err.startswith("async_ca_exec: interrupted (Ctrl-C): ") and err.count("\n") == 1, err
    assert "runtime was starting" in err or "calls were being sent" in err, err
    assert not wait_gone(children(os.getpid()) - before)
