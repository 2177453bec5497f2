"""The replica's HTTP server: raw ``aiohttp.web``, three routes, nothing on top.

``POST /v1/invoke`` checks the timestamp before reading the body, the HMAC signature before
looking at the envelope, and the envelope's structure before handing it to a worker; it never
unpickles anything. A call that finishes within one heartbeat interval is answered with one
plain response; a longer one gets a streamed response with heartbeat frames until it ends.
A client that disconnects cancels its calls: queued ones are dropped, running ones have their
worker killed.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

from aiohttp import web

from async_ca_exec import protocol

from .pool import Task, WorkerPool
from .settings import Settings, available_cpus, available_memory

log = logging.getLogger("acx_server")

_SECRET_ENV = ("ACX_HMAC_KEY", "ACX_HMAC_KEY_STDIN", "ACX_PARENT_FD", "ACX_READY_FD")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def runtime_meta(settings: Settings) -> dict[str, Any]:
    """What a client needs to know to decide whether it can talk to this runtime."""
    import cloudpickle

    import async_ca_exec

    return {
        "protocol": protocol.PROTOCOL_VERSION,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "packages": {
            "async_ca_exec": getattr(async_ca_exec, "__version__", None),
            "cloudpickle": cloudpickle.__version__,
            "aiohttp": _version("aiohttp"),
        },
        "cloudpickle_protocol": cloudpickle.DEFAULT_PROTOCOL,
        "vcpus": available_cpus(),
        "memory_bytes": available_memory(),
        "worker_processes": settings.workers,
        "replica": settings.replica,
        "max_body_bytes": settings.max_body,
        "max_timeout": settings.max_timeout,
        "heartbeat": settings.heartbeat,
        "platform": sys.platform,
    }


class FunctionCache:
    """Pickled functions by SHA-256, so a large one crosses the network once per replica."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._data: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    def get(self, digest: str) -> bytes | None:
        fn = self._data.get(digest)
        if fn is not None:
            self._data.move_to_end(digest)
        return fn

    def put(self, digest: str, fn: bytes | memoryview) -> bytes | memoryview:
        """Remember ``fn`` (if it fits); return the bytes to use from now on."""
        known = self.get(digest)
        if known is not None:
            return known
        if len(fn) > self.max_bytes // 4:
            return fn
        data = bytes(fn)
        self._data[digest] = data
        self.size += len(data)
        while self.size > self.max_bytes:
            _old, dropped = self._data.popitem(last=False)
            self.size -= len(dropped)
        return data


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._key = settings.key
        self.draining = False
        self.active: set[Task] = set()
        self._stop = asyncio.Event()
        self._grace = settings.shutdown_grace
        self._workdir = tempfile.mkdtemp(prefix="acx-worker-")
        env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
        env["ACX_REPLICA_ID"] = settings.replica
        self.pool = WorkerPool(settings.workers, replica=settings.replica, env=env, cwd=self._workdir)
        self.runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._meta: bytes | None = None
        self.functions = FunctionCache(settings.fn_cache_bytes)

    # -- routes ----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body)
        app.router.add_post(protocol.INVOKE_PATH, self.invoke)
        app.router.add_get(protocol.HEALTH_PATH, self.health)
        app.router.add_get(protocol.META_PATH, self.meta)
        return app

    def _error(self, status: int, message: str, code: str | None = None, **headers: str) -> web.Response:
        doc = {"error": message, "replica": self.settings.replica}
        if code:
            doc["code"] = code
        body = json.dumps(doc).encode()
        return web.Response(status=status, body=body, content_type="application/json", headers=headers)

    async def health(self, request: web.Request) -> web.Response:
        ready = self.pool.ready_workers
        if self.draining:
            return self._error(503, "shutting down", **{"Retry-After": "1"})
        if self.pool.broken:
            return self._error(503, self.pool.broken)
        body = json.dumps({"status": "ok" if ready else "starting", "ready_workers": ready}).encode()
        return web.Response(status=200 if ready else 503, body=body, content_type="application/json")

    async def meta(self, request: web.Request) -> web.Response:
        try:
            protocol.verify(self._key, "GET", protocol.META_PATH, request.headers, b"", window=self.settings.signature_window)
        except protocol.ProtocolError as exc:
            return self._error(exc.status, str(exc))
        if self._meta is None:
            self._meta = json.dumps(runtime_meta(self.settings)).encode()
        return web.Response(body=self._meta, content_type="application/json")

    async def invoke(self, request: web.Request) -> web.StreamResponse:
        settings = self.settings
        if self.draining:
            return self._error(503, "this replica is shutting down; send the call to another one", **{"Retry-After": "1"})
        headers = request.headers
        length = request.content_length
        try:
            # Authenticate what the headers say before reading (and hashing) any body.
            protocol.verify_head(self._key, "POST", protocol.INVOKE_PATH, headers, length,
                                 window=settings.signature_window)  # fmt: skip
        except protocol.SignatureError as exc:
            return self._error(401, str(exc))
        assert length is not None
        if length > settings.max_body:
            return self._too_large(length)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(None)
        try:
            call_id = protocol.verify(self._key, "POST", protocol.INVOKE_PATH, headers, body, window=settings.signature_window)
            inv = protocol.decode_invocation(body, max_timeout=settings.max_timeout)
            if inv.call_id != call_id:
                raise protocol.ProtocolError("the envelope's call id differs from the signed header")
        except protocol.ProtocolError as exc:
            return self._error(exc.status, str(exc))
        if len(inv.fn):
            fn = self.functions.put(inv.fn_hash, inv.fn)
        else:
            cached = self.functions.get(inv.fn_hash)
            if cached is None:
                return self._error(409, "this replica does not have the function; send it along", code=protocol.UNKNOWN_FUNCTION)
            fn = cached
        return await self._run(request, Task(self.pool.new_task_id(), inv, fn))

    def _too_large(self, length: int | None) -> web.Response:
        size = f" of {length} bytes" if length is not None else ""
        return self._error(
            413,
            f"request body{size} exceeds this runtime's limit of {self.settings.max_body} bytes; "
            "pass large data through blob storage or raise the runtime's ACX_MAX_BODY_BYTES",
        )

    async def _run(self, request: web.Request, task: Task) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        self.active.add(task)
        try:
            self.pool.submit(task)
            if not task.finished:
                task.waiter = loop.create_future()
                await task.waiter
            hdrs = {protocol.H_REPLICA: self.settings.replica}
            if task.finished:
                frames = task.take_frames()
                frames.append(protocol.END_FRAME)
                return web.Response(body=b"".join(frames), content_type=protocol.RESPONSE_CONTENT_TYPE, headers=hdrs)
            # A slow call: stream, so the client sees heartbeats and knows the replica lives.
            resp = web.StreamResponse(headers=hdrs)
            resp.content_type = protocol.RESPONSE_CONTENT_TYPE
            await resp.prepare(request)
            task.streaming = True
            while True:
                frames = task.take_frames()
                if task.heartbeat_due:
                    task.heartbeat_due = False
                    frames.append(protocol.HEARTBEAT_FRAME)
                if frames:
                    await resp.write(b"".join(frames))
                    task.last_write = time.monotonic()
                if task.finished:
                    break
                task.waiter = loop.create_future()
                await task.waiter
            await resp.write(protocol.END_FRAME)
            await resp.write_eof()
            return resp
        finally:
            self.active.discard(task)
            if not task.finished:
                self.pool.cancel(task)

    async def _tick(self) -> None:
        """Mark calls that have been silent for a heartbeat interval; their handler writes one."""
        hb = self.settings.heartbeat
        while True:
            await asyncio.sleep(min(hb / 2, 1.0))
            now = time.monotonic()
            for t in self.active:
                if not t.finished and now - t.last_write >= hb:
                    t.heartbeat_due = True
                    t.wake()

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> list[Any]:
        await self.pool.start()
        self.runner = web.AppRunner(
            self.app(),
            handler_cancellation=True,
            access_log=log if self.settings.log_level == "DEBUG" else None,
            shutdown_timeout=self.settings.shutdown_grace,
        )
        await self.runner.setup()
        site = web.TCPSite(
            self.runner, self.settings.host, self.settings.port, reuse_port=self.settings.reuse_port or None, backlog=1024
        )
        await site.start()
        self._ticker = asyncio.get_running_loop().create_task(self._tick())
        addresses = list(self.runner.addresses)
        log.info(
            "acx_server %s listening on %s with %d worker processes", self.settings.replica, addresses, self.settings.workers
        )
        return addresses

    def request_stop(self, grace: float | None = None) -> None:
        if grace is not None:
            self._grace = min(self._grace, grace)
        self._stop.set()

    async def run_until_stopped(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        self.draining = True
        log.info("acx_server %s shutting down (grace %.0f s)", self.settings.replica, self._grace)
        if self.runner is not None:
            self.runner.server.shutdown_timeout = self._grace  # type: ignore[union-attr]
            try:
                await asyncio.wait_for(self.runner.cleanup(), self._grace + 5)
            except asyncio.TimeoutError:
                log.warning("in-flight calls did not finish within the grace period")
        if self._ticker is not None:
            self._ticker.cancel()
        await self.pool.close()
        shutil.rmtree(self._workdir, ignore_errors=True)


async def serve(settings: Settings) -> None:
    """Run a replica until SIGTERM/SIGINT (or, for a local runtime, until its parent exits)."""
    loop = asyncio.get_running_loop()
    server = Server(settings)

    def parent_gone() -> None:
        try:
            data = os.read(settings.parent_fd, 1)  # type: ignore[arg-type]
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(settings.parent_fd)  # type: ignore[arg-type]
            log.info("parent process exited; stopping")
            server.request_stop(grace=1.0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    if settings.parent_fd is not None:
        loop.add_reader(settings.parent_fd, parent_gone)
    try:
        addresses = await server.start()
    except BaseException:
        await server.pool.close()
        raise
    if settings.ready_fd is not None:
        port = addresses[0][1] if addresses else settings.port
        msg = json.dumps({"pid": os.getpid(), "port": port, "replica": settings.replica}) + "\n"
        os.write(settings.ready_fd, msg.encode())
        os.close(settings.ready_fd)
    await server.run_until_stopped()
    await server.shutdown()
