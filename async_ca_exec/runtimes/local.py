"""The embedded local runtime: the container's server, started as processes on loopback.

``replicas`` server processes share one port on 127.0.0.1 (SO_REUSEPORT), as a Container
App's ingress spreads connections over replicas; each runs its own worker processes. A fresh
random key signs every request. The servers live in their own session (a terminal's Ctrl-C
reaches only the client, which stops them in order) and watch a pipe from this process: when
the client exits in any way, even SIGKILL, the pipe closes and they stop, and their workers
die with them. ``aclose()``, interpreter exit and garbage collection all stop them too.
"""

from __future__ import annotations

import asyncio
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
import time
import weakref
from pathlib import Path
from typing import Any

from ..config import Config, default_local_layout
from ..errors import ConfigError, RuntimeStartError
from ..invoker import Endpoint
from .common import check_compatible, fetch_meta

log = logging.getLogger("async_ca_exec.local")

START_TIMEOUT = 120.0
STOP_GRACE = 5.0


def _reserve_port() -> socket.socket:
    """Bind (not listen) a loopback port with SO_REUSEPORT so the replicas can share it."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    return s


def _stop_processes(procs: list[subprocess.Popen[bytes]], parent_w: list[int], rundir: str, grace: float) -> None:
    """Stop server processes (SIGTERM, then SIGKILL after ``grace``); safe to call twice."""
    while parent_w:
        try:
            os.close(parent_w.pop())
        except OSError:
            pass
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
            p.kill()
            p.wait()
    procs.clear()
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
    """Replicas of the container server on 127.0.0.1."""

    name = "local"

    def __init__(self, config: Config, *, log_level: str | None = None, credential: Any = None) -> None:
        self.replicas, self.worker_processes = default_local_layout(config)
        self.python = _python_for(config)
        self.heartbeat = config.localhost.heartbeat
        self.runtime_timeout = config.localhost.runtime_timeout
        self.log_level = log_level or "WARNING"
        self.runtime_memory = config.localhost.runtime_memory
        self._procs: list[subprocess.Popen[bytes]] = []
        self._parent_w: list[int] = []
        self._rundir = ""
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self.port: int | None = None
        self.endpoint: Endpoint | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    async def start(self) -> Endpoint:
        if self.endpoint is not None:
            return self.endpoint
        key = secrets.token_urlsafe(32)
        pythonpath = _pythonpath()
        self._rundir = tempfile.mkdtemp(prefix="acx-local-")
        reservation = _reserve_port()
        self.port = reservation.getsockname()[1]
        parent_r, parent_w = os.pipe()
        self._parent_w.append(parent_w)
        self._finalizer = weakref.finalize(self, _stop_processes, self._procs, self._parent_w, self._rundir, 2.0)
        readers: list[tuple[int, subprocess.Popen[bytes], Path]] = []
        try:
            for i in range(self.replicas):
                ready_r, ready_w = os.pipe()
                logfile = Path(self._rundir) / f"replica-{i}.log"
                env = dict(os.environ)
                env.update(
                    {
                        "ACX_SERVER_HOST": "127.0.0.1",
                        "ACX_SERVER_PORT": str(self.port),
                        "ACX_SERVER_REUSE_PORT": "1",
                        "ACX_HMAC_KEY_STDIN": "1",
                        "ACX_WORKER_PROCESSES": str(self.worker_processes),
                        "ACX_REPLICA_ID": f"local-{i}",
                        "ACX_PARENT_FD": str(parent_r),
                        "ACX_READY_FD": str(ready_w),
                        "ACX_HEARTBEAT_INTERVAL": str(self.heartbeat),
                        "ACX_RUNTIME_TIMEOUT": str(self.runtime_timeout),
                        "ACX_LOG_LEVEL": self.log_level,
                        "ACX_SHUTDOWN_GRACE": str(STOP_GRACE),
                        "PYTHONPATH": pythonpath,
                    }
                )
                env.pop("ACX_HMAC_KEY", None)
                if self.runtime_memory:  # each worker process (each call) gets runtime_memory MB
                    env["ACX_WORKER_MEMORY_MB"] = str(self.runtime_memory)
                # Blocking calls, on purpose: a fork/exec takes a millisecond and keeps the
                # process handle usable from atexit and finalizers, where no loop runs.
                with open(logfile, "wb") as logf:  # noqa: ASYNC230
                    proc = subprocess.Popen(  # noqa: ASYNC220
                        [self.python, "-m", "acx_server"],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL,
                        stderr=logf,
                        pass_fds=(parent_r, ready_w),
                        cwd=self._rundir,
                        env=env,
                        start_new_session=True,
                    )
                self._procs.append(proc)
                os.close(ready_w)
                assert proc.stdin is not None
                try:
                    proc.stdin.write(key.encode() + b"\n")
                    proc.stdin.flush()
                except BrokenPipeError:  # it died at once; _wait_ready reports why
                    pass
                finally:
                    with contextlib.suppress(BrokenPipeError):
                        proc.stdin.close()
                readers.append((ready_r, proc, logfile))
            os.close(parent_r)
            parent_r = -1
            await self._wait_ready(readers)
        except BaseException:
            for fd, _p, _l in readers:
                _close(fd)
            if parent_r >= 0:
                _close(parent_r)
            reservation.close()
            await self.aclose()
            raise
        reservation.close()
        url = f"http://127.0.0.1:{self.port}"
        meta = await fetch_meta(url, key.encode())
        check_compatible(meta, where="the local runtime")
        self.endpoint = Endpoint(
            url=url,
            key=key.encode(),
            heartbeat=self.heartbeat,
            max_body=int(meta.get("max_body_bytes") or 0) or Endpoint.max_body,
            meta=meta,
        )
        log.info("local runtime: %d replicas x %d workers on %s", self.replicas, self.worker_processes, url)
        return self.endpoint

    async def _wait_ready(self, readers: list[tuple[int, subprocess.Popen[bytes], Path]]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        waiting = {fd: (proc, logfile, b"") for fd, proc, logfile in readers}
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
                        os.close(fd)
                    continue
                if chunk == b"" or proc.poll() is not None:
                    proc.wait(5)
                    raise RuntimeStartError(
                        f"a local runtime server exited during start-up (code {proc.returncode}); its log says:\n{_tail(logfile)}"
                    )
            if time.monotonic() > deadline:
                raise RuntimeStartError(f"the local runtime did not start within {START_TIMEOUT:.0f} s")
            if waiting:
                await asyncio.sleep(0.01)

    def replicas_for(self, requests: int) -> int:
        return self.replicas

    async def warm(self, replicas: int, *, lease: float) -> int:
        """Nothing to do: every local replica runs from start to close. Returns their number."""
        log.debug("warm(%d): the local runtime's %d replicas are always warm", replicas, self.replicas)
        return self.replicas

    async def cool(self) -> None:
        pass

    async def aclose(self) -> None:
        """Stop every server process (and so their workers); idempotent."""
        if self._finalizer is not None and self._finalizer.alive:
            self._finalizer.detach()
            await asyncio.get_running_loop().run_in_executor(
                None, _stop_processes, self._procs, self._parent_w, self._rundir, STOP_GRACE
            )
        self.endpoint = None


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
