"""The replica's server: three routes on aiohttp's low-level server (web.py), no framework on top.

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
import errno
import hashlib
import hmac
import importlib.metadata
import json
import logging
import os
import pickle
import platform
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.parse
from typing import Any

import aiohttp
from aiohttp import web

from async_ca_exec import protocol

from .pool import Task, WorkerPool, _outcome_frame
from .settings import Settings, available_cpus, available_memory
from .web import WebServer, busy, json_response

log = logging.getLogger("acx_server")

#: Fields a request may carry once only: everything the signature covers, and the replica's
#: own. (aiohttp refuses a duplicated Content-Length or Transfer-Encoding itself.)
_SINGLE_FIELDS = (protocol.H_TIMESTAMP, protocol.H_CALL_ID, protocol.H_SIGNATURE, protocol.H_HEAD_SIGNATURE,
                  protocol.H_ATTEMPT, "Expect")  # fmt: skip

_SECRET_ENV = ("ACX_HMAC_KEY", "ACX_HMAC_KEY_STDIN", "ACX_PARENT_FD", "ACX_READY_FD", "ACX_LISTEN_FD")


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


class BlobError(Exception):
    """A blob transfer with a request's SAS URL failed (the message never holds the SAS)."""


def redact(url: str) -> str:
    return url.partition("?")[0]


def _storage_failure(first: int, n: int, message: str, replica: str, skip: tuple[int, ...] = ()) -> bytes:
    """Outcome frames failing items first..first+n-1 (but those in ``skip``) with a storage error."""
    info = {"kind": protocol.ERR_STORAGE, "type": "StorageError", "message": message, "traceback": ""}
    skipped = set(skip)
    runs: list[list[int]] = []
    for i in range(first, first + n):
        if i in skipped:
            continue
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    now = time.time()
    out = []
    for run in runs:
        k = len(run)
        meta = {"first": run[0], "n": k, "replica": replica, "errors": {str(i): info for i in run}}
        blob = pickle.dumps(([None] * k, {}, ([now] * k, [now] * k, [0.0] * k)))
        out.append(_outcome_frame(protocol.encode_outcome_payload(meta, blob)))
    return b"".join(out)


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


class ReplayGuard:
    """The (call id, attempt) pairs of requests received within the signature window: a second
    request with the same pair is a replay (a client signs each send with its own attempt).

    Three generations of one window each, so a pair is remembered for two to three windows
    (a timestamp is accepted for two: ±window), as a 64-bit keyed hash (Python's hash of the
    pair: SipHash with this process's random seed; about 80 bytes each). Only requests whose
    signature checked out are remembered, so a collision could only refuse a request that
    collides with one sent before, which nobody without the key can aim at.
    At most ``max_entries`` are kept (80 MB for a million): past that the oldest generation
    is dropped early, with a warning. It guards this replica only, and only while it runs: a
    replay sent to another replica is refused only once its timestamp leaves the window.
    """

    def __init__(self, window: float, max_entries: int = 1_000_000) -> None:
        self.window = window
        self.max_entries = max_entries
        self._generations: list[set[int]] = [set(), set(), set()]
        self._rotated = time.monotonic()
        self._warned = 0.0

    def _rotate(self) -> None:
        now = time.monotonic()
        if now - self._rotated < self.window:
            return
        while now - self._rotated >= self.window:
            self._generations = [set(), *self._generations[:2]]
            self._rotated += self.window
            if now - self._rotated > 3 * self.window:  # idle for long: start afresh
                self._rotated = now

    def seen(self, call_id: str, attempt: int) -> bool:
        self._rotate()
        d = hash((call_id, attempt))
        g0, g1, g2 = self._generations
        return d in g0 or d in g1 or d in g2

    def add(self, call_id: str, attempt: int) -> bool:
        """Remember a request; False if it was already there (a replay)."""
        self._rotate()
        d = hash((call_id, attempt))
        g0, g1, g2 = self._generations
        if d in g0 or d in g1 or d in g2:
            return False
        g0.add(d)
        if len(self._generations[0]) + len(self._generations[1]) + len(self._generations[2]) > self.max_entries:
            self._generations = [set(), *self._generations[:2]]  # the oldest go early
            now = time.monotonic()
            if now - self._warned > 60:
                self._warned = now
                log.warning("more than %d requests within %.0f s: replays of the oldest are no longer detected "
                            "(add replicas)", self.max_entries, 3 * self.window)  # fmt: skip
        return True

    def __len__(self) -> int:
        return sum(len(g) for g in self._generations)


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._key = settings.key
        self.draining = False
        #: The local runtime's client is gone: shut down without waiting for anything.
        self.orphaned = False
        self.active: set[Task] = set()
        self._stop = asyncio.Event()
        self._grace = settings.shutdown_grace
        self._workdir = tempfile.mkdtemp(prefix="acx-worker-", dir=settings.work_dir)
        env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
        env["ACX_REPLICA_ID"] = settings.replica
        self.pool = WorkerPool(
            settings.workers, replica=settings.replica, env=env, cwd=self._workdir, memory_limit=settings.worker_memory
        )
        self._ticker: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._meta: bytes | None = None
        self.functions = FunctionCache(settings.fn_cache_bytes)
        self._http: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.replays = ReplayGuard(settings.signature_window)
        self.web = WebServer(self.handle, header_timeout=settings.header_timeout, idle_timeout=settings.idle_timeout,
                             access_log=settings.log_level == "DEBUG")  # fmt: skip
        #: Requests being handled now (their handlers' tasks).
        self.handling: set[asyncio.Task[Any]] = set()
        self._sockets: list[socket.socket] = []
        self._acceptors: list[asyncio.Task[None]] = []
        #: The health port's: open until the calls have drained, so probes still get answers.
        self._probe_sockets: list[socket.socket] = []
        self._probe_acceptors: list[asyncio.Task[None]] = []
        #: Requests refused (bad signature, replay), and those waiting out the delay now.
        self.refused = 0
        self._delayed = 0
        self._accepting = asyncio.Event()
        self._accepting.set()
        #: Requests whose body came too slowly (the sweeper's cuts are counted in ``web``).
        self.slow_bodies_cut = 0
        self._replica_field = {protocol.H_REPLICA: settings.replica.encode("latin-1", "replace").decode("latin-1")}

    # -- routes ----------------------------------------------------------------------

    @property
    def slow_clients_cut(self) -> int:
        """Connections cut for sending their head or body too slowly."""
        return self.web.slow_clients_cut + self.slow_bodies_cut

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self.handling.add(task)
        busy(request, True)
        try:
            return await self.dispatch(request)
        finally:
            busy(request, False)
            self.handling.discard(task)

    async def dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        path, method = request.path, request.method
        if path == protocol.INVOKE_PATH:
            if method == "POST":
                return await self.invoke(request)
            allowed = "POST"
        elif path == protocol.HEALTH_PATH or path == protocol.META_PATH or path == protocol.LIVE_PATH:
            if method == "GET" or method == "HEAD":
                if path == protocol.LIVE_PATH:
                    return self.live()
                return await (self.health() if path == protocol.HEALTH_PATH else self.meta(request))
            allowed = "GET, HEAD"
        else:
            return self.error(404, f"no such path: {path[:100]!r} (the paths are {protocol.INVOKE_PATH}, "
                                   f"{protocol.HEALTH_PATH}, {protocol.LIVE_PATH} and {protocol.META_PATH})")  # fmt: skip
        return self.error(405, f"method {method} is not allowed for {path} (only {allowed})", headers={"Allow": allowed})

    async def _unauthenticated(self, exc: protocol.ProtocolError, request: web.BaseRequest) -> web.Response:
        """401 for a request whose signature failed."""
        call_id = request.headers.get(protocol.H_CALL_ID, "-")[:80]
        return await self._refuse(self.error(exc.status, str(exc)), f"{request.method} {request.path} {call_id!r}: {exc}")

    async def _refuse(self, resp: web.Response, what: str) -> web.Response:
        """Answer a refused request after ``auth_delay``, on a closed connection (a tarpit).

        A flooder's connections are held rather than turned over, so a flood costs it a
        connection per request per delay. The delay grows with the number held, from
        ``auth_delay`` to four times that when ``refusal_slots`` are held; then the replica
        also stops accepting connections until one is answered: the flood waits in the
        kernel's queue, and the calls on already open (pooled) connections go on. A flood is
        so held to about ``refusal_slots / (4 * auth_delay)`` requests per second.
        """
        self.refused += 1
        settings = self.settings
        log.debug("refused %s", what)
        if settings.auth_delay > 0:
            self._delayed += 1
            if self._delayed >= settings.refusal_slots and self._accepting.is_set():
                log.warning("%d refused requests held: not accepting connections until one is answered",
                            self._delayed)  # fmt: skip
                self._accepting.clear()
            try:
                await asyncio.sleep(settings.auth_delay * (1 + 3 * min(1.0, self._delayed / settings.refusal_slots)))
            finally:
                self._delayed -= 1
                if self._delayed < settings.refusal_slots and not self._accepting.is_set():
                    log.info("accepting connections again (%d refused requests held)", self._delayed)
                    self._accepting.set()
        resp.force_close()
        return resp

    def error(self, status: int, message: str, code: str | None = None, *, close: bool = False,
              headers: dict[str, str] | None = None) -> web.Response:  # fmt: skip
        """An error answer in this server's JSON form (``close``: the connection closes after it)."""
        doc = {"error": message, "replica": self.settings.replica}
        if code:
            doc["code"] = code
        return json_response(status, doc, headers=headers, close=close)

    def live(self) -> web.Response:
        """The liveness probe's answer: alive unless the workers cannot start. Draining is
        alive too: a replica finishing its calls after SIGTERM must not be restarted."""
        if self.pool.broken:
            return self.error(503, self.pool.broken)
        return json_response(200, {"status": "alive", "draining": self.draining})

    async def health(self) -> web.Response:
        ready = self.pool.ready_workers
        if self.draining:
            return self.error(503, "shutting down", headers={"Retry-After": "1"})
        if self.pool.broken:
            return self.error(503, self.pool.broken)
        return json_response(200 if ready else 503, {"status": "ok" if ready else "starting", "ready_workers": ready})

    async def meta(self, request: web.BaseRequest) -> web.Response:
        try:
            protocol.verify(self._key, "GET", protocol.META_PATH, request.headers, b"", window=self.settings.signature_window)
        except protocol.ProtocolError as exc:
            return await self._unauthenticated(exc, request)
        if self._meta is None:
            self._meta = json.dumps(runtime_meta(self.settings)).encode()
        return web.Response(body=self._meta, content_type="application/json")

    async def invoke(self, request: web.BaseRequest) -> web.StreamResponse:
        settings = self.settings
        if self.draining:
            # Closing the connection sends the retry to another replica (this one stopped listening).
            return self.error(503, "this replica is shutting down; send the call to another one", close=True,
                              headers={"Retry-After": "1"})  # fmt: skip
        headers = request.headers
        if "Transfer-Encoding" in headers:
            return self.error(411, "a chunked request body is not accepted: send the body with a Content-Length",
                              close=True)  # fmt: skip
        for name in _SINGLE_FIELDS:
            if len(headers.getall(name, ())) > 1:
                return self.error(400, f"header field {name!r} appears more than once", close=True)
        expect = headers.get("Expect")
        if expect is not None and expect.lower() != "100-continue":
            return self.error(417, f"Expect: {expect[:40]!r} is not supported", close=True)
        length = request.content_length
        try:
            # Authenticate what the headers say before reading (and hashing) any body.
            protocol.verify_head(self._key, "POST", protocol.INVOKE_PATH, headers, length,
                                 window=settings.signature_window)  # fmt: skip
            attempt = protocol.attempt_of(headers)
        except protocol.SignatureError as exc:
            return await self._unauthenticated(exc, request)
        assert length is not None
        if self.replays.seen(headers[protocol.H_CALL_ID], attempt):
            return await self._replayed(headers[protocol.H_CALL_ID], attempt)
        if length > settings.max_body:
            return self._too_large(length)
        if expect is not None:
            if request.version >= (1, 1):
                # aiohttp's low-level server leaves expectations to the handler (its router
                # answers them the same way): the client may send the body now.
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        content = request.content
        try:
            if not length:
                body = b""
            elif content.is_eof():  # all here already (a small body): no deadline to keep
                body = await content.readexactly(length)
            else:
                body = await asyncio.wait_for(content.readexactly(length),
                                              settings.header_timeout + length / settings.min_body_rate)  # fmt: skip
        except asyncio.IncompleteReadError:
            raise ConnectionResetError("the client closed the connection before its body arrived") from None
        except asyncio.TimeoutError:
            self.slow_bodies_cut += 1
            return self.error(408, f"the request body ({length} bytes) arrived too slowly (slower than "
                                   f"{settings.min_body_rate / 1024:.0f} KiB/s)", close=True)  # fmt: skip
        try:
            call_id = protocol.verify(self._key, "POST", protocol.INVOKE_PATH, headers, body, window=settings.signature_window)
        except protocol.ProtocolError as exc:
            return await self._unauthenticated(exc, request)
        if not self.replays.add(call_id, attempt):  # the same request, twice at once
            return await self._replayed(call_id, attempt)
        try:
            inv = protocol.decode_invocation(body, max_timeout=settings.max_timeout)
            if inv.call_id != call_id:
                raise protocol.ProtocolError("the envelope's call id differs from the signed header")
        except protocol.ProtocolError as exc:
            return self.error(exc.status, str(exc))
        header = inv.header
        if len(inv.fn):
            fn: bytes | memoryview = self.functions.put(inv.fn_hash, inv.fn)
        else:
            cached = self.functions.get(inv.fn_hash)
            if cached is None and header.get("fn_url"):
                try:
                    data = await self._fetch_blob(header["fn_url"])
                except BlobError as exc:
                    return self._failed(inv, f"the runtime could not read the function from Blob storage: {exc}")
                if hashlib.sha256(data).hexdigest() != inv.fn_hash:
                    return self.error(400, "the function blob does not match header field 'fn' (its SHA-256)")
                cached = bytes(self.functions.put(inv.fn_hash, data))
            if cached is None:
                return self.error(409, "this replica does not have the function; send it along", code=protocol.UNKNOWN_FUNCTION)
            fn = cached
        items: bytes | memoryview = inv.items
        if not len(items):
            try:
                items = await self._fetch_blob(header["items_url"], expected=header.get("items_size"))
            except BlobError as exc:
                return self._failed(inv, f"the runtime could not read the arguments from Blob storage: {exc}")
            # The blob is only as trustworthy as the container: its digest is in the signed header.
            if hashlib.sha256(items).hexdigest() != header.get("items_sha256"):
                return self.error(400, "the arguments blob does not match header field 'items_sha256'")
        return await self._run(request, Task(self.pool.new_task_id(), inv, fn, items))

    async def _replayed(self, call_id: str, attempt: int) -> web.Response:
        return await self._refuse(self.error(
            409, f"call {call_id} attempt {attempt} was already received: a request is run once (a retry is signed "
            "as a new attempt)", code=protocol.REPLAYED,
        ), f"{call_id!r} attempt {attempt}: a replay")  # fmt: skip

    def _failed(self, inv: protocol.Invocation, message: str) -> web.Response:
        """Every item of a request fails with a storage error (a 200 with error frames: the
        request itself was fine, and sending it again as it is would not help)."""
        frames = _storage_failure(0, inv.n, message, self.settings.replica, skip=inv.skip)
        return web.Response(body=frames + protocol.END_FRAME, content_type=protocol.RESPONSE_CONTENT_TYPE)

    def _too_large(self, length: int | None) -> web.Response:
        size = f" of {length} bytes" if length is not None else ""
        return self.error(
            413,
            f"request body{size} exceeds this runtime's limit of {self.settings.max_body} bytes; "
            "pass large data through blob storage or raise the runtime's ACX_MAX_BODY_BYTES",
            close=True,  # its body is not read: dropped while aiohttp lingers, then the connection closes
        )

    async def _run(self, request: web.BaseRequest, task: Task) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        self.active.add(task)
        delivered = False
        try:
            self.pool.submit(task)
            if not task.finished:
                task.waiter = loop.create_future()
                await task.waiter
            hdrs = self._replica_field
            if task.finished:
                frames = await self._take(task)
                frames.append(protocol.END_FRAME)
                body = b"".join(frames)
                resp = web.Response(body=body, content_type=protocol.RESPONSE_CONTENT_TYPE, headers=hdrs)
                if not task.durable and len(body) < _WRITE_HERE:
                    return resp
                # Written here, so the request counts as handled (for shutdown's grace and the
                # connection's deadlines) until the client has taken the answer in; a durable
                # one, so a cut is seen (and the outcome goes to Blob instead): it is delivered
                # once all of it is with the kernel.
                await resp.prepare(request)
                await resp.write_eof()
                if task.durable:
                    await _flushed(request)
                    delivered = True
                return resp
            # A slow call: stream, so the client sees heartbeats and knows the replica lives.
            stream = web.StreamResponse(headers=hdrs)
            stream.content_type = protocol.RESPONSE_CONTENT_TYPE
            if request.version >= (1, 1):
                stream.enable_chunked_encoding()
            await stream.prepare(request)
            task.streaming = True
            while True:
                frames = await self._take(task)
                if task.heartbeat_due:
                    task.heartbeat_due = False
                    frames.append(protocol.HEARTBEAT_FRAME)
                if frames:
                    await stream.write(b"".join(frames))
                    task.last_write = time.monotonic()
                if task.finished:
                    break
                task.waiter = loop.create_future()
                await task.waiter
            await stream.write(protocol.END_FRAME)
            await stream.write_eof()
            delivered = True
            return stream
        except (asyncio.CancelledError, ConnectionError):
            if task.durable and not delivered:
                # The connection was cut (an ingress limit, most likely) before the outcome got
                # through: the call goes on, and its outcome goes to Blob for the client.
                self._own(self._finish_durable(task))
            raise
        finally:
            self.active.discard(task)
            if not task.finished and not (task.durable and not delivered):
                self.pool.cancel(task)

    def _own(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def _finish_durable(self, task: Task) -> None:
        """Until the call ends, say it is alive; then write all it produced to Blob, signed."""
        loop = asyncio.get_running_loop()
        prefix = task.out_prefix
        await self._put_quietly(task, f"{prefix}/alive", str(time.time()).encode())
        while not task.finished:
            task.waiter = loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(task.waiter), task.alive_interval)
            except asyncio.TimeoutError:
                await self._put_quietly(task, f"{prefix}/alive", str(time.time()).encode())
        task.history.extend(task.take_frames())
        body = b"".join(task.history) + protocol.END_FRAME
        signed = hmac.new(self._key, body, hashlib.sha256).digest() + body
        for attempt in range(4):
            try:
                await self._put_blob(task, f"{prefix}/final.out", signed)
                return
            except BlobError as exc:
                log.warning("could not write the outcome of %s to Blob storage (%d): %s", task.call_id, attempt, exc)
                await asyncio.sleep(2**attempt)

    async def _put_quietly(self, task: Task, name: str, data: bytes) -> None:
        try:
            await self._put_blob(task, name, data)
        except BlobError as exc:
            log.warning("could not write %s for %s: %s", name.rsplit("/", 1)[-1], task.call_id, exc)

    async def _take(self, task: Task) -> list[bytes]:
        """The task's new frames, large outcomes moved to Blob storage (when the request allows).

        A durable call keeps its frames as they came (before any move to Blob), so that if its
        stream is cut, even while a move is under way, all of it can still go to final.out.
        """
        frames = task.take_frames()
        if task.durable:
            task.history.extend(frames)
        if task.out_url is not None and frames:
            frames = [await self._offload(task, f) for f in frames]
        return frames

    async def _offload(self, task: Task, data: bytes) -> bytes:
        if data[0] != protocol.F_OUTCOME or len(data) - protocol.FRAME_HEADER <= task.inline_limit:
            return data
        payload = memoryview(data)[protocol.FRAME_HEADER :]
        meta, _blob = protocol.decode_outcome_payload(payload)
        first, n = int(meta["first"]), int(meta["n"])
        name = f"{task.out_prefix}/{first}.out"
        try:
            await self._put_blob(task, name, payload)
        except BlobError as exc:
            log.warning("could not write the result of %s to Blob storage: %s", task.call_id, exc)
            message = f"the runtime could not write the result to Blob storage: {exc}"
            return _storage_failure(first, n, message, self.settings.replica)
        return protocol.encode_ref(first, n, name, len(payload), hashlib.sha256(payload).hexdigest())

    # -- blob transfers with the request's SAS URLs ---------------------------------------

    async def _fetch_blob(self, url: str, *, expected: int | None = None) -> bytes:
        assert self._http is not None
        limit = self.settings.max_blob
        try:
            async with self._http.get(url) as resp:
                if resp.status != 200:
                    raise BlobError(f"HTTP {resp.status} reading {redact(url)}")
                if resp.content_length is not None and resp.content_length > limit:
                    raise BlobError(f"{redact(url)} holds {resp.content_length} bytes, above ACX_MAX_BLOB_BYTES={limit}")
                data = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise BlobError(f"{type(exc).__name__} reading {redact(url)}") from None
        if expected is not None and len(data) != expected:
            raise BlobError(f"{redact(url)} holds {len(data)} bytes, {expected} were announced")
        return data

    async def _put_blob(self, task: Task, name: str, data: bytes | memoryview) -> None:
        assert self._http is not None and task.out_url is not None
        base, _, sas = task.out_url.partition("?")
        url = f"{base.rstrip('/')}/{urllib.parse.quote(name)}?{sas}"
        try:
            async with self._http.put(url, data=data, headers={"x-ms-blob-type": "BlockBlob"}) as resp:
                if resp.status not in (200, 201):
                    raise BlobError(f"HTTP {resp.status} writing {redact(url)}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise BlobError(f"{type(exc).__name__} writing {redact(url)}") from None

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

    async def _sweep_connections(self) -> None:
        """Cut the connections past their head deadline (see web.Connection), looking often
        enough for it to be kept within a quarter of itself."""
        every = min(1.0, self.settings.header_timeout / 4)
        while True:
            await asyncio.sleep(every)
            self.web.sweep(time.monotonic())

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> list[Any]:
        loop = asyncio.get_running_loop()
        if self.settings.health_port:
            # Health probes get a port of their own, never paused by the tarpit and not behind
            # the ingress: a flood cannot make the platform think this replica is down. It
            # listens before the workers start (which can take a while on a small replica), so
            # startup and liveness probes see the server up; readiness says 503 until workers are.
            probe_sockets = _listening_sockets(self.settings.host, self.settings.health_port, False)
            self._probe_sockets = probe_sockets
            self._probe_acceptors = [loop.create_task(self._accept(sock, self.web, pausable=False)) for sock in probe_sockets]
        try:
            await self.pool.start()
        except BaseException:
            await self._stop_listening(probes=True)
            raise
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300), auto_decompress=False
        )
        # Our own accept loop rather than loop.create_server: accepting pauses while the
        # refusal tarpit is full.
        if self.settings.listen_fd is not None:
            self._sockets = [_inherited_socket(self.settings.listen_fd)]
        else:
            self._sockets = _listening_sockets(self.settings.host, self.settings.port, self.settings.reuse_port)
        self._acceptors = [loop.create_task(self._accept(sock, self.web)) for sock in self._sockets]
        addresses = [sock.getsockname() for sock in self._sockets]
        self._ticker = loop.create_task(self._tick())
        self._sweeper = loop.create_task(self._sweep_connections())
        log.info(
            "acx_server %s listening on %s with %d worker processes", self.settings.replica, addresses, self.settings.workers
        )
        return addresses

    async def _accept(self, sock: socket.socket, factory: Any, *, pausable: bool = True) -> None:
        loop = asyncio.get_running_loop()
        # Taking turns costs accept rate, so only when other replicas accept from the same socket.
        shared = (
            self.settings.listen_fd is not None and sock.fileno() == self.settings.listen_fd and self.settings.listen_shared > 1
        )
        while True:
            if pausable:
                await self._accepting.wait()
            try:
                conn, _ = await (_accept_when_woken(loop, sock) if shared else loop.sock_accept(sock))
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:  # let some connections close first
                    log.warning("could not accept a connection (%s); trying again in 1 s", exc.strerror or exc)
                    await asyncio.sleep(1)
                continue  # otherwise the peer gave up before we got to it
            try:
                if pausable and not self._accepting.is_set():
                    # Accepted just as the tarpit filled: it waits like those in the kernel's queue.
                    await self._accepting.wait()
                await loop.connect_accepted_socket(factory, conn)
            except OSError:  # the peer went away already
                conn.close()
            except BaseException:
                conn.close()
                raise
            if shared:
                await asyncio.sleep(SHARED_ACCEPT_PAUSE)  # the other replicas' turn

    async def _stop_listening(self, *, probes: bool = False) -> None:
        """Close the main port (and, with ``probes``, the health port)."""
        acceptors, sockets = self._acceptors, self._sockets
        self._acceptors, self._sockets = [], []
        if probes:
            acceptors, sockets = acceptors + self._probe_acceptors, sockets + self._probe_sockets
            self._probe_acceptors, self._probe_sockets = [], []
        for task in acceptors:
            task.cancel()
        await asyncio.gather(*acceptors, return_exceptions=True)
        for sock in sockets:
            sock.close()

    def request_stop(self, grace: float | None = None) -> None:
        if grace is not None:
            self._grace = min(self._grace, grace)
        self._stop.set()

    async def run_until_stopped(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        self.draining = True
        log.info("acx_server %s shutting down (grace %.0f s)", self.settings.replica, self._grace)
        await self._stop_listening()  # no new connections: the client's retries go to other replicas
        for conn in self.web.connections:  # idle ones close now, the others once their answer is written
            conn.close()
        deadline = time.monotonic() + self._grace
        handling = list(self.handling)
        if handling:
            _done, late = await asyncio.wait(handling, timeout=self._grace)
            if late and self.orphaned:
                log.info("stopping %d in-flight calls: their client is gone", len(late))
            elif late:
                log.warning("%d in-flight calls did not finish within the grace period", len(late))
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late, timeout=5)
        # Answers still on their way out get the rest of the grace (at least a second) to go.
        for conn in self.web.connections:
            tr = conn.transport
            if tr is not None and not tr.get_write_buffer_size():
                tr.abort()
            elif tr is not None:
                tr.close()  # after what it holds is sent
        until = deadline if self.orphaned else max(deadline, time.monotonic() + 1.0)
        while self.web.connections and time.monotonic() < until:  # noqa: ASYNC110 - once, at shutdown
            await asyncio.sleep(0.05)
        for conn in self.web.connections:
            if conn.transport is not None:
                conn.transport.abort()
        if self._ticker is not None:
            self._ticker.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._background:  # durable calls finishing after their client was cut off
            await asyncio.wait(self._background, timeout=self._grace)
        # Until here the probes were answered (alive; not ready): a draining replica is not
        # restarted for a failed liveness probe while it finishes its calls.
        await self._stop_listening(probes=True)
        await self.pool.close()
        if self._http is not None:
            await self._http.close()
        shutil.rmtree(self._workdir, ignore_errors=True)


#: After taking a connection from a socket other replicas share, a replica lets this many seconds
#: pass before taking another, so a burst of new connections is spread over the replicas waiting
#: on it. Measured on 2 cores, 3 replicas, a burst of 1,000 connections: 0.2 ms spreads them
#: 317/319/364 and takes 0.30 s to accept (2 ms: 331/334/335 but 0.95 s, and a single replica
#: paused so took 2 s: the pause applies only when the socket is shared).
SHARED_ACCEPT_PAUSE = 0.0002

#: A whole answer at least this large is written by the handler itself (see ``_run``).
_WRITE_HERE = 64 * 1024


async def _flushed(request: web.BaseRequest, poll: float = 0.01) -> None:
    """Wait until every byte written has been handed to the kernel (for an answer that must be
    known delivered); ConnectionResetError if the client goes first."""
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if not transport.get_write_buffer_size():
            return
        await asyncio.sleep(poll)


_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _listening_sockets(host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """Non-blocking listening sockets for ``host`` (every address it resolves to)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys((i[0], i[1], i[2], None, i[4]) for i in infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address[0], port, *address[2:]))
            if port == 0:  # one ephemeral port for every address
                port = sock.getsockname()[1]
            sock.listen(1024)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def _accept_when_woken(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[socket.socket, Any]:
    """One connection from a socket other replicas accept from too, taken only after the loop
    has seen it readable: every replica waiting on it is woken and one wins. Accepting again at
    once, as ``sock_accept`` does, let the first replica to run drain a burst of new connections
    alone (measured: 61, 3 and 0 of 64 on three replicas); with this and SHARED_ACCEPT_PAUSE,
    21-22 each, more even than SO_REUSEPORT's hashing (14-26)."""
    while True:
        ready = loop.create_future()
        loop.add_reader(sock.fileno(), _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())
        try:
            conn, address = sock.accept()
        except (BlockingIOError, InterruptedError):
            continue  # another replica took it
        conn.setblocking(False)
        return conn, address


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _inherited_socket(fd: int) -> socket.socket:
    """The listening socket the starting process handed over (ACX_LISTEN_FD). Replicas sharing
    one socket take turns accepting from its queue, on every platform (no SO_REUSEPORT needed),
    and the queue outlives any one of them."""
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise OSError(f"ACX_LISTEN_FD={fd} is not a stream socket")
    sock.setblocking(False)
    return sock


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
            # The client that started this replica is gone or stopping it, having given up on
            # every call: no answer can be wanted any more, so nothing is waited for.
            log.info("parent process exited; stopping")
            server.orphaned = True
            server.request_stop(grace=0.0)

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
