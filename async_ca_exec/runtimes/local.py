"""The embedded local runtime: the container's server, started as processes on loopback.

``replicas`` server processes take connections from one listening socket on 127.0.0.1 that
this process opens and hands to each of them, as a Container App's ingress spreads requests
over replicas; each runs its own worker processes. A fresh random key signs every request.

Like Container Apps, the runtime replaces a replica that exits: a supervisor task starts a new
one in its place, and since this process holds the listening socket, connections made
meanwhile wait in its queue instead of being refused; the calls that were on the dead replica
are retried by the client (at least once, as on Azure). A replica that keeps exiting
(``MAX_RESTARTS`` times within ``RESTART_WINDOW`` seconds) is given up on, with its log in the
warning. Sharing one socket needs no SO_REUSEPORT, so the same code runs on Linux and macOS.

The servers live in their own session (a terminal's Ctrl-C reaches only the client, which stops
them in order) and watch a pipe from this process: when the client exits in any way, even
SIGKILL, the pipe closes and they stop, and their workers die with them. ``aclose()``,
interpreter exit and garbage collection all stop them too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Config, default_local_layout
from ..errors import ConfigError, RuntimeStartError
from ..invoker import Endpoint
from .common import check_compatible, fetch_meta

log = logging.getLogger("async_ca_exec.local")

START_TIMEOUT = 120.0
STOP_GRACE = 5.0
#: How often the supervisor looks for replicas that exited.
SUPERVISE_EVERY = 0.1
#: A replica that exits this many times within RESTART_WINDOW seconds is not started again.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: Connections waiting for a replica to accept them (while one restarts, all of them).
BACKLOG = 4096


def _listen() -> socket.socket:
    """A loopback listening socket for the replicas to share (each gets a copy of it)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        s.listen(BACKLOG)
        s.setblocking(False)  # the replicas' copies share this flag: they accept without blocking
    except BaseException:
        s.close()
        raise
    return s


class _Processes:
    """The replicas' processes and what this process holds open for them (the parent pipe's
    ends, the listening socket), shared with the finalizer, which may run in another thread (at
    exit, before the loop's supervisor has stopped): the lock keeps a replacement from being
    started once stopping has begun."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.held: list[Any] = []
        self.lock = threading.Lock()
        self.stopped = False


def _stop_processes(ps: _Processes, rundir: str, grace: float) -> None:
    """Stop server processes (SIGTERM, then SIGKILL after ``grace``) and release what this
    process held for them (the parent pipe's ends, first, then the listening socket); safe to
    call twice."""
    with ps.lock:
        ps.stopped = True
        while ps.held:  # closing the pipe's write end tells the replicas at once, before any signal
            item = ps.held.pop(0)
            if isinstance(item, int):
                _close(item)
            else:
                item.close()
        procs = list(ps.procs)
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("a local runtime replica (pid %d) did not stop within %.0f s of SIGTERM; killed it", p.pid, grace)
            p.kill()
            p.wait()
    ps.procs.clear()
    shutil.rmtree(rundir, ignore_errors=True)


def _python_for(config: Config) -> str:
    rt = config.localhost.runtime
    if rt is None or rt in ("python", "python3", os.path.basename(sys.executable)):
        return sys.executable
    if os.sep in rt or rt.startswith("python"):
        found = shutil.which(rt)
        if not found:
            raise ConfigError(f"localhost.runtime={rt!r} is not an executable Python interpreter")
        return found
    raise ConfigError(
        f"localhost.runtime={rt!r} looks like a container image; the local backend runs a Python "
        "interpreter (leave runtime unset to use this one) — deploy images with backend='azure'"
    )


def _pythonpath() -> str:
    """Make the servers import the same async_ca_exec and acx_server as this client."""
    import async_ca_exec

    spec = importlib.util.find_spec("acx_server")
    if spec is None or not spec.origin:
        raise RuntimeStartError(
            "the runtime server package 'acx_server' is not installed; install async_ca_exec "
            "with pip (pip install .) rather than running it from a source tree"
        )
    dirs = [str(Path(async_ca_exec.__file__).resolve().parent.parent), str(Path(spec.origin).resolve().parent.parent)]
    extra = os.environ.get("PYTHONPATH")
    if extra:
        dirs.append(extra)
    return os.pathsep.join(dict.fromkeys(dirs))


class LocalRuntime:
    """Replicas of the container server on 127.0.0.1, replaced when they exit."""

    name = "local"

    def __init__(self, config: Config, *, log_level: str | None = None, credential: Any = None) -> None:
        self.replicas, self.worker_processes = default_local_layout(config)
        self.python = _python_for(config)
        self.heartbeat = config.localhost.heartbeat
        self.runtime_timeout = config.localhost.runtime_timeout
        self.log_level = log_level or "WARNING"
        self.runtime_memory = config.localhost.runtime_memory
        #: The replicas' processes by replica index (a replaced one is swapped in place), and
        #: what is closed first when stopping: the parent pipe's write end, its read end, the socket.
        self._ps = _Processes()
        self._parent_r = -1
        self._listener: socket.socket | None = None
        self._key = b""
        self._pythonpath = ""
        self._rundir = ""
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        #: Each replica's log file, recent exits and whether it was given up on.
        self._logs: list[Path] = []
        self._exits: dict[int, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._given_up: set[int] = set()
        #: Replicas started in place of ones that exited.
        self.restarts = 0
        self.port: int | None = None
        self.endpoint: Endpoint | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._ps.procs]

    async def start(self) -> Endpoint:
        if self.endpoint is not None:
            return self.endpoint
        key = secrets.token_urlsafe(32)
        self._key = key.encode()
        self._pythonpath = _pythonpath()
        self._rundir = tempfile.mkdtemp(prefix="acx-local-")
        parent_r, parent_w = os.pipe()
        self._ps.held.append(parent_w)
        self._ps.held.append(parent_r)  # kept for replacements; only the write end's close is seen
        self._parent_r = parent_r
        self._finalizer = weakref.finalize(self, _stop_processes, self._ps, self._rundir, 2.0)
        readers: list[tuple[int, subprocess.Popen[bytes], Path]] = []
        try:
            self._listener = _listen()
            self._ps.held.append(self._listener)
            self.port = self._listener.getsockname()[1]
            for i in range(self.replicas):
                ready_r, proc, logfile = self._spawn(i, f"local-{i}", f"replica-{i}.log")
                self._logs.append(logfile)
                readers.append((ready_r, proc, logfile))
            await self._wait_ready(readers)
            url = f"http://127.0.0.1:{self.port}"
            meta = await fetch_meta(url, self._key)
            check_compatible(meta, where="the local runtime")
        except BaseException:
            await self.aclose()
            raise
        self.endpoint = Endpoint(
            url=url,
            key=self._key,
            heartbeat=self.heartbeat,
            max_body=int(meta.get("max_body_bytes") or 0) or Endpoint.max_body,
            meta=meta,
        )
        self._supervisor = asyncio.get_running_loop().create_task(_supervise(weakref.ref(self)))
        log.info("local runtime: %d replicas x %d workers on %s", self.replicas, self.worker_processes, url)
        return self.endpoint

    def _spawn(self, index: int, replica: str, logname: str) -> tuple[int, subprocess.Popen[bytes], Path]:
        """Start one replica; returns the read end of its ready pipe, the process and its log."""
        assert self._listener is not None and self.port is not None
        listen_fd = self._listener.fileno()
        ready_r, ready_w = os.pipe()
        logfile = Path(self._rundir) / logname
        env = dict(os.environ)
        env.update(
            {
                "ACX_SERVER_HOST": "127.0.0.1",
                "ACX_SERVER_PORT": str(self.port),
                "ACX_LISTEN_FD": str(listen_fd),
                "ACX_LISTEN_SHARED": str(self.replicas),
                "ACX_HMAC_KEY_STDIN": "1",
                "ACX_WORKER_PROCESSES": str(self.worker_processes),
                "ACX_REPLICA_ID": replica,
                "ACX_PARENT_FD": str(self._parent_r),
                "ACX_READY_FD": str(ready_w),
                "ACX_HEARTBEAT_INTERVAL": str(self.heartbeat),
                "ACX_RUNTIME_TIMEOUT": str(self.runtime_timeout),
                "ACX_LOG_LEVEL": self.log_level,
                "ACX_SHUTDOWN_GRACE": str(STOP_GRACE),
                # Inside the run directory, removed at the end even if a replica was killed.
                "ACX_WORK_DIR": self._rundir,
                "PYTHONPATH": self._pythonpath,
            }
        )
        env.pop("ACX_HMAC_KEY", None)
        env.pop("ACX_SERVER_REUSE_PORT", None)
        if self.runtime_memory:  # each worker process (each call) gets runtime_memory MB
            env["ACX_WORKER_MEMORY_MB"] = str(self.runtime_memory)
        try:
            with self._ps.lock:
                if self._ps.stopped:
                    raise RuntimeStartError("the local runtime is stopping")
                # Blocking calls, on purpose: a fork/exec takes a millisecond and keeps the
                # process handle usable from atexit and finalizers, where no loop runs.
                with open(logfile, "wb") as logf:
                    proc = subprocess.Popen(
                        [self.python, "-m", "acx_server"],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL,
                        stderr=logf,
                        pass_fds=(self._parent_r, ready_w, listen_fd),
                        cwd=self._rundir,
                        env=env,
                        start_new_session=True,
                    )
                if index < len(self._ps.procs):
                    self._ps.procs[index] = proc
                else:
                    self._ps.procs.append(proc)
        except BaseException:
            _close(ready_r)
            raise
        finally:
            _close(ready_w)
        assert proc.stdin is not None
        try:
            proc.stdin.write(self._key + b"\n")
            proc.stdin.flush()
        except BrokenPipeError:  # it died at once; _wait_ready reports why
            pass
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        return ready_r, proc, logfile

    async def _wait_ready(self, readers: list[tuple[int, subprocess.Popen[bytes], Path]]) -> None:
        """Until every replica in ``readers`` says it listens; closes their ready pipes."""
        deadline = time.monotonic() + START_TIMEOUT
        waiting = {fd: (proc, logfile, b"") for fd, proc, logfile in readers}
        try:
            for fd in waiting:
                os.set_blocking(fd, False)
            while waiting:
                for fd in list(waiting):
                    proc, logfile, got = waiting[fd]
                    try:
                        chunk = os.read(fd, 4096)
                    except BlockingIOError:
                        chunk = None
                    if chunk:
                        got += chunk
                        waiting[fd] = (proc, logfile, got)
                        if got.endswith(b"\n"):
                            json.loads(got)
                            del waiting[fd]
                            _close(fd)
                        continue
                    if chunk == b"" or proc.poll() is not None:
                        proc.wait(5)
                        raise RuntimeStartError(
                            f"a local runtime server exited during start-up (code {proc.returncode}); its log says:\n"
                            f"{_tail(logfile)}"
                        )
                if time.monotonic() > deadline:
                    raise RuntimeStartError(f"the local runtime did not start within {START_TIMEOUT:.0f} s")
                if waiting:
                    await asyncio.sleep(0.01)
        finally:
            for fd in waiting:
                _close(fd)

    async def _check(self) -> None:
        if self._ps.stopped:
            return
        for i, proc in enumerate(list(self._ps.procs)):
            if proc.poll() is not None and i not in self._given_up:
                await self._replace(i, proc)

    async def _replace(self, index: int, dead: subprocess.Popen[bytes]) -> None:
        now = time.monotonic()
        exits = self._exits[index]
        exits.append(now)
        while exits and now - exits[0] > RESTART_WINDOW:
            exits.popleft()
        how = _exit_description(dead.returncode)
        if len(exits) > MAX_RESTARTS:
            self._given_up.add(index)
            log.error(
                "local runtime: replica %d (pid %d) %s, its %d-th exit within %.0f s: it is not started again. "
                "Its log ends:\n%s",
                index, dead.pid, how, len(exits), RESTART_WINDOW, _tail(self._logs[index]),
            )  # fmt: skip
            listener = self._listener
            with self._ps.lock:
                if listener is not None and len(self._given_up) == len(self._ps.procs) and listener in self._ps.held:
                    # Nobody will accept: refuse connections rather than let calls wait for nothing.
                    self._ps.held.remove(listener)
                    listener.close()
            return
        self.restarts += 1
        log.warning(
            "local runtime: replica %d (pid %d) %s; starting a new one (the calls it held are retried)", index, dead.pid, how
        )
        try:
            ready_r, proc, logfile = self._spawn(index, f"local-{index}.{self.restarts}", f"replica-{index}.{self.restarts}.log")
        except RuntimeStartError:  # stopping meanwhile
            return
        self._logs[index] = logfile
        try:
            await self._wait_ready([(ready_r, proc, logfile)])
        except RuntimeStartError as exc:  # it exited too: counted at the next look
            log.warning("local runtime: the replacement of replica %d did not start: %s", index, exc)

    def replicas_for(self, requests: int) -> int:
        return self.replicas

    async def warm(self, replicas: int, *, lease: float) -> int:
        """Nothing to do: every local replica runs from start to close. Returns their number."""
        log.debug("warm(%d): the local runtime's %d replicas are always warm", replicas, self.replicas)
        return self.replicas

    async def cool(self) -> None:
        pass

    def track_demand(self, demand: Callable[[], int]) -> None:
        """Nothing to scale: the local replicas are fixed."""

    async def aclose(self) -> None:
        """Stop every server process (and so their workers); idempotent."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        if self._finalizer is not None and self._finalizer.alive:
            self._finalizer.detach()
            await asyncio.get_running_loop().run_in_executor(None, _stop_processes, self._ps, self._rundir, STOP_GRACE)
        self._listener = None
        self.endpoint = None


async def _supervise(ref: weakref.ref[LocalRuntime]) -> None:
    """Replace replicas that exit, as Container Apps restarts a container that stopped. Holds
    the runtime only while it looks, so a forgotten executor's runtime is still collected (and
    its finalizer stops the processes); the task then ends."""
    while True:
        await asyncio.sleep(SUPERVISE_EVERY)
        runtime = ref()
        if runtime is None:
            return
        await runtime._check()
        del runtime


def _exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(empty log)"
