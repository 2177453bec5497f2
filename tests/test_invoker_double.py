"""The invoker against a transport double that answers as a replica does, without sockets:
retries, backoff, the concurrency window, hedging and durable recovery, each in milliseconds.

The double (:class:`Replica`, reached through :class:`ReplicaTransport`) takes every request
through the checks ``container/server.py`` makes, in its order: the head signature, replays
(its own ``ReplayGuard``), the body's signature, the envelope, the function cache (409
``unknown-function``). It then runs the function in this process, item by item (skipping the
items a retry names), with scripted delays, and answers as the server does: one plain answer
when the call ends within a heartbeat, otherwise a stream of heartbeats, outcomes and END; 503
with ``Retry-After: 1`` while draining. A client that goes away (``Reply.close``, a cancelled
``post``) stops its call, as the server kills the worker; a durable call instead runs on and
writes ``alive`` and a signed ``final.out`` to Blob storage (an in-memory :class:`BlobStore`).

Scripted :class:`Fault` s stand for what lies between client and replica: a refused
connection, a reset before any byte, an answer lost after the call ran, an ingress's 429,
502 or 504, a cut mid-stream, a replica that dies. Where the server leaves a choice, the double
takes the one hardest on the client: a cut comes after the next item has run (so its outcome
is lost and it runs again), a gateway's 502/504 comes after the call ran.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import hmac
import itertools
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, NoReturn

import cloudpickle
import pytest
from multidict import CIMultiDict

from acx_server.server import FunctionCache, ReplayGuard
from acx_server.worker import FLUSH_INTERVAL, _error_info
from async_ca_exec import executor as executor_module
from async_ca_exec import invoker, protocol, serialize, transfer
from async_ca_exec.errors import AuthenticationError, InvocationError
from async_ca_exec.executor import AsyncExecutor
from async_ca_exec.futures import CallFuture
from async_ca_exec.invoker import Endpoint, FutureRequest, Invoker
from async_ca_exec.jobs import Job, Stats
from async_ca_exec.storage import BlobInfo
from async_ca_exec.transfer import Transfers
from async_ca_exec.transport import ConnectError, DisconnectedError, TLSError, TransportError

# What aiohttp's failures read as once transport.py has translated them.
CONNECT_REFUSED = "ClientConnectorError: Cannot connect to host replica.invalid:443 ssl:default [Connect call failed]"
DISCONNECTED = "ServerDisconnectedError: Server disconnected"
CUT = "the answer's body is incomplete or malformed: Response payload is not completed"
TLS_FAILED = "ClientConnectorCertificateError: certificate verify failed: unable to get local issuer certificate"
DRAINING = "this replica is shutting down; send the call to another one"
#: What Container Apps' ingress (Envoy) answers for a replica it lost or waited too long for.
GATEWAY_BODIES = {
    502: b"upstream connect error or disconnect/reset before headers. reset reason: connection termination",
    504: b"upstream request timeout",
}
URL = "https://replica.invalid"

# Backoff small enough for milliseconds (the real base is 0.1 s, the Retry-After cap 60 s).
BACKOFF_BASE = 0.0002
BACKOFF_CAP = 0.02
RETRY_AFTER_CAP = 0.02


# --------------------------------------------------------------------------------------
# the double


@dataclasses.dataclass(frozen=True)
class Fault:
    """What goes wrong with one request.

    ``kind``: ``connect`` (refused: nothing sent), ``tls``, ``reset`` (the connection drops
    before any byte of the answer; the replica never got the request), ``reset-after-run``
    (the call ran, its answer was lost before its head), ``503`` (a draining replica),
    ``429`` (the ingress throttles), ``502``/``504`` (the ingress gives up on the replica:
    once the call ran, or ``after`` seconds), ``cut`` (the connection drops mid-answer: when the
    outcome after the first ``outcomes`` is ready, or ``after`` seconds; ``crash``: the replica
    dies with it, so a durable call is not finished either).
    """

    kind: str
    retry_after: str | None = None
    outcomes: int = 0
    after: float | None = None
    crash: bool = False


class _Body:
    """An answer's body as it arrives: what was fed before a cut can still be read."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buf

    def feed(self, data: bytes) -> None:
        self._buf += data
        self._wake()

    def end(self) -> None:
        self._eof = True
        self._wake()

    def cut(self, exc: BaseException) -> None:
        self._exc = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _more(self) -> None:
        if self._exc is not None:
            raise self._exc
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if self._eof:
                raise DisconnectedError(f"the answer ended {n} bytes short of a frame")
            await self._more()
        return self._take(n)

    async def read_upto(self, n: int) -> bytes:
        while len(self._buf) < n and not self._eof:
            await self._more()
        return self._take(n)

    async def read(self) -> bytes:
        while not self._eof:
            await self._more()
        return self._take(len(self._buf))


class Reply:
    """transport.Reply, as AiohttpReply behaves: the head is in, the body comes as it is fed."""

    def __init__(self, exchange: Exchange, status: int, headers: Mapping[str, str], content_length: int | None) -> None:
        self._exchange = exchange
        self._status = status
        self._headers: CIMultiDict[str] = CIMultiDict(headers)
        self._length = content_length
        self.body = _Body()
        self.released = False
        self.closed = False

    @property
    def status(self) -> int:
        return self._status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def content_length(self) -> int | None:
        return self._length

    async def read(self) -> bytes:
        return await self.body.read()

    async def read_upto(self, n: int) -> bytes:
        return await self.body.read_upto(n)

    async def readexactly(self, n: int) -> bytes:
        return await self.body.readexactly(n)

    def release(self) -> None:
        self.released = True
        if not self.body.at_eof:  # aiohttp closes a connection released mid-body
            self._exchange.released_early = True
            self._exchange.disconnect()
        self._exchange.end("released")

    def close(self) -> None:
        self.closed = True
        self._exchange.disconnect()
        self._exchange.end("closed")


class Exchange:
    """One request as the double received it, and what became of it."""

    def __init__(self, replica: Replica, transport: ReplicaTransport, headers: Mapping[str, str], body: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.replica = replica
        self.transport = transport
        self.seq = len(replica.exchanges)
        self.at = loop.time()  # when the client posted it (the loop's clock)
        self.headers = dict(headers)
        self.body = body
        self.call_id = self.headers.get(protocol.H_CALL_ID, "")
        self.attempt = int(self.headers.get(protocol.H_ATTEMPT) or 0)
        # Decoded for scripts and assertions; the replica checks and decodes it again itself.
        inv = protocol.decode_invocation(body)
        self.skip = inv.skip
        self.header = inv.header
        self.with_fn = len(inv.fn) > 0
        self.args = [args[0] if args else None for args, _ in cloudpickle.loads(inv.items)]
        self.fault: Fault | None = None
        self.reached = False  # the replica got it
        self.status: int | None = None
        self.code: str | None = None
        self.reply: Reply | None = None
        #: Why the replica lost the connection before its answer was out: "client" or "cut".
        self.lost: str | None = None
        self.crashed = False
        #: How the exchange ended: released, closed, failed (post raised) or cancelled.
        self.ended: str | None = None
        self.released_early = False
        self.head: asyncio.Future[Reply] = loop.create_future()
        self.handler: asyncio.Task[None] | None = None
        self.slot: asyncio.Semaphore | None = None

    @property
    def streamed(self) -> bool:
        return self.reply is not None and self.reply.content_length is None

    def answer(self, status: int, headers: Mapping[str, str], length: int | None) -> Reply:
        reply = self.reply = Reply(self, status, headers, length)
        self.status = status
        if not self.head.done():
            self.head.set_result(reply)
        return reply

    def answer_all(self, status: int, body: bytes, headers: Mapping[str, str]) -> Reply:
        reply = self.answer(status, headers, len(body))
        reply.body.feed(body)
        reply.body.end()
        return reply

    def fail(self, exc: TransportError) -> None:
        if not self.head.done():
            self.head.set_exception(exc)

    def cut(self) -> NoReturn:
        """The connection drops now (the ingress, the network): the client reads what came."""
        self.lost = "cut"
        assert self.reply is not None
        self.reply.body.cut(DisconnectedError(CUT))
        if self.fault is not None and self.fault.crash:
            self.crashed = True
        raise ConnectionResetError("the connection was cut")

    def disconnect(self) -> None:
        """The client closed the connection: the replica's handler is cancelled (aiohttp's
        handler_cancellation), as the server's is."""
        if self.handler is not None and not self.handler.done():
            self.lost = self.lost or "client"
            self.handler.cancel()

    def end(self, how: str) -> None:
        if self.ended is not None:
            return
        self.ended = how
        if self.slot is not None:
            self.slot.release()
        self.replica.outstanding -= 1


class _Call:
    """A request's run on the replica (the server's pool.Task): its frames as they come."""

    def __init__(self, inv: protocol.Invocation) -> None:
        self.n = inv.n
        self.skip = set(inv.skip)
        header = inv.header
        self.out_prefix = str(header.get("out_prefix") or "")
        self.durable = bool(header.get("durable")) and header.get("out_url") is not None
        self.alive_interval = float(header.get("alive_interval") or 20.0)
        self.frames: list[bytes] = []
        self.history: list[bytes] = []
        self.finished = False
        self.wake = asyncio.Event()

    def add(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.wake.set()

    def take(self) -> list[bytes]:
        frames, self.frames = self.frames, []
        if self.durable:
            self.history.extend(frames)
        return frames

    def finish(self) -> None:
        self.finished = True
        self.wake.set()


async def _wait_event(event: asyncio.Event, seconds: float) -> None:
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=seconds)
    finally:
        waiter.cancel()


class Replica:
    """One replica behind an ingress, answering as container/server.py does (see the module)."""

    def __init__(
        self, *, heartbeat: float = 0.002, flush_interval: float = FLUSH_INTERVAL, storage: BlobStore | None = None
    ) -> None:
        self.key = secrets.token_bytes(32)
        #: The key the client is given (another one: its signatures fail).
        self.endpoint_key = self.key
        self.heartbeat = heartbeat
        self.flush_interval = flush_interval
        self.storage = storage
        self.name = "replica-0"
        #: The fault for a request (None: it goes through).
        self.script: Callable[[Exchange], Fault | None] = lambda ex: None
        #: Seconds item ``x`` (its first argument) runs on ``attempt``.
        self.delay: Callable[[Any, int], float] = lambda x, attempt: 0.0
        self.exchanges: list[Exchange] = []
        #: Runs per item (by first argument): begun, and run to their end.
        self.started: collections.Counter[Any] = collections.Counter()
        self.completed: collections.Counter[Any] = collections.Counter()
        #: Requests the client has posted and not finished with (waiting for a connection too).
        self.outstanding = 0
        self.peak = 0
        self.limits: list[int] = []
        self.replays = ReplayGuard(protocol.DEFAULT_SIGNATURE_WINDOW)
        self.functions = FunctionCache(64 << 20)
        #: Refusals a test expects (a wrong key's 401); any other is a problem.
        self.expected_statuses: set[int] = set()
        self.problems: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- the client's side ---------------------------------------------------------------

    def transport(self, endpoint: Endpoint, limit: int, read_timeout: float) -> ReplicaTransport:
        """Invoker.transport_factory."""
        assert endpoint.key == self.endpoint_key and endpoint.heartbeat == self.heartbeat
        assert read_timeout == 3 * self.heartbeat + 5
        self.limits.append(limit)
        return ReplicaTransport(self, limit)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        return task

    async def settle(self) -> None:
        """Wait for the replica's work to end (a test's last step)."""
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=2)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late)
                self.problems.append(f"{len(late)} replica task(s) still running at the end")

    def check(self) -> None:
        """What must hold after every test, whatever it scripted."""
        assert not self.problems, self.problems
        unended = [(ex.call_id, ex.attempt) for ex in self.exchanges if ex.ended is None]
        assert not unended, f"answers neither read to their end nor closed: {unended}"
        assert not [ex for ex in self.exchanges if ex.released_early], "a connection was released mid-answer"
        assert self.outstanding == 0

    # -- the replica's side (server.invoke, server._run) ----------------------------------

    async def handle(self, ex: Exchange) -> None:
        try:
            await self._handle(ex)
        except (asyncio.CancelledError, ConnectionError):
            pass  # the client or the ingress went away: _run did what the server does then
        except Exception as exc:  # noqa: BLE001 - a bug of the double's own: the test fails on it
            self.problems.append(f"the double failed on {ex.call_id}: {type(exc).__name__}: {exc}")
            ex.fail(DisconnectedError("the double failed"))

    def refuse(self, ex: Exchange, status: int, message: str, code: str | None = None, **headers: str) -> None:
        doc = {"error": message, "replica": self.name}
        if code:
            doc["code"] = code
        ex.code = code
        if status not in self.expected_statuses and code != protocol.UNKNOWN_FUNCTION and status != 503:
            self.problems.append(f"HTTP {status} to {ex.call_id} attempt {ex.attempt}: {message}")
        ex.answer_all(status, json.dumps(doc).encode(), {"Content-Type": "application/json", **headers})

    async def _handle(self, ex: Exchange) -> None:
        await asyncio.sleep(0)  # on its way
        fault = ex.fault = self.script(ex)
        kind = fault.kind if fault is not None else ""
        if kind == "connect":
            return ex.fail(ConnectError(CONNECT_REFUSED))
        if kind == "tls":
            return ex.fail(TLSError(TLS_FAILED))
        if kind == "reset":
            return ex.fail(DisconnectedError(DISCONNECTED))
        if kind == "429":  # the ingress's, before any replica
            headers = {"Content-Type": "text/plain"}
            if fault is not None and fault.retry_after is not None:
                headers["Retry-After"] = fault.retry_after
            ex.answer_all(429, b"Too Many Requests", headers)
            return None
        ex.reached = True
        if kind == "503":
            assert fault is not None
            return self.refuse(ex, 503, DRAINING, **{"Retry-After": fault.retry_after or "1"})
        headers = ex.headers
        try:
            protocol.verify_head(self.key, "POST", protocol.INVOKE_PATH, headers, len(ex.body))
            attempt = protocol.attempt_of(headers)
        except protocol.SignatureError as exc:
            return self.refuse(ex, 401, str(exc))
        if self.replays.seen(ex.call_id, attempt):
            return self.refuse(ex, 409, f"call {ex.call_id} attempt {attempt} was already received", protocol.REPLAYED)
        try:
            call_id = protocol.verify(self.key, "POST", protocol.INVOKE_PATH, headers, ex.body)
        except protocol.ProtocolError as exc:
            return self.refuse(ex, exc.status, str(exc))
        if not self.replays.add(call_id, attempt):
            return self.refuse(ex, 409, f"call {call_id} attempt {attempt} was already received", protocol.REPLAYED)
        try:
            inv = protocol.decode_invocation(ex.body)
            if inv.call_id != call_id:
                raise protocol.ProtocolError("the envelope's call id differs from the signed header")
        except protocol.ProtocolError as exc:
            return self.refuse(ex, exc.status, str(exc))
        if len(inv.fn):
            fn = self.functions.put(inv.fn_hash, inv.fn)
        else:
            cached = self.functions.get(inv.fn_hash)
            if cached is None:
                return self.refuse(ex, 409, "this replica does not have the function; send it along", protocol.UNKNOWN_FUNCTION)
            fn = cached
        assert len(inv.items), "arguments by Blob URL: not in this double"
        await self._run(ex, inv, fn, inv.items)
        return None

    async def _run(self, ex: Exchange, inv: protocol.Invocation, fn: bytes | memoryview, items: memoryview) -> None:
        loop = asyncio.get_running_loop()
        call = _Call(inv)
        runner = self._spawn(self._execute(ex, call, fn, items))
        fault = ex.fault
        kind = fault.kind if fault is not None else ""
        delivered = False
        hdrs = {protocol.H_REPLICA: self.name, "Content-Type": protocol.RESPONSE_CONTENT_TYPE}
        try:
            if kind in ("reset-after-run", "502", "504"):
                assert fault is not None
                await asyncio.wait({runner}, timeout=fault.after)
                ex.lost = "cut"
                if kind == "reset-after-run":
                    ex.fail(DisconnectedError(DISCONNECTED))
                else:
                    ex.answer_all(int(kind), GATEWAY_BODIES[int(kind)], {"Content-Type": "text/plain"})
                raise ConnectionResetError("the ingress dropped the connection to the replica")
            cut_at = loop.time() + fault.after if fault is not None and kind == "cut" and fault.after is not None else None
            cut_by_outcome = fault is not None and kind == "cut" and fault.after is None
            outcomes = fault.outcomes if fault is not None else 0

            def feed(reply: Any, frames: list[bytes]) -> None:
                """Write ``frames``; a "cut" fault after N outcomes cuts before the (N+1)th."""
                nonlocal outcomes
                for f in frames:
                    if cut_by_outcome and f[0] == protocol.F_OUTCOME:
                        if outcomes == 0:
                            ex.cut()
                        outcomes -= 1
                    reply.body.feed(f)

            await asyncio.wait({runner}, timeout=self.heartbeat)
            if call.finished:  # within a heartbeat: one plain answer
                frames = [*call.take(), protocol.END_FRAME]
                reply = ex.answer(200, hdrs, sum(map(len, frames)))
                feed(reply, frames)
                reply.body.end()
                delivered = True
                return
            # A slow call: streamed, with a heartbeat whenever it has been silent for one.
            reply = ex.answer(200, hdrs, None)
            last_write = loop.time()
            heartbeat_due = True
            while True:
                call.wake.clear()
                frames = call.take()
                if heartbeat_due:
                    frames.append(protocol.HEARTBEAT_FRAME)
                feed(reply, frames)
                if frames:
                    last_write = loop.time()
                if call.finished:
                    break
                now = loop.time()
                wait = max(0.0, last_write + self.heartbeat - now)
                if cut_at is not None:
                    wait = min(wait, max(0.0, cut_at - now))
                await _wait_event(call.wake, wait)
                if cut_at is not None and loop.time() >= cut_at:
                    ex.cut()
                heartbeat_due = loop.time() - last_write >= self.heartbeat
            reply.body.feed(protocol.END_FRAME)
            reply.body.end()
            delivered = True
        except (asyncio.CancelledError, ConnectionError):
            if call.durable and not delivered and not ex.crashed:
                # The connection went before the outcome got through: the call goes on, and its
                # outcome goes to Blob for the client.
                self._spawn(self._finish_durable(call, runner))
            raise
        finally:
            if not runner.done() and (ex.crashed or not (call.durable and not delivered)):
                runner.cancel()  # the server kills the worker running it

    async def _execute(self, ex: Exchange, call: _Call, fn: bytes | memoryview, items: memoryview) -> None:
        """The worker's loop: items in order, those to skip skipped, outcomes in groups of
        contiguous items (one per flush_interval at least)."""
        try:
            func = cloudpickle.loads(fn)
            pairs = cloudpickle.loads(items)
            todo = [i for i in range(call.n) if i not in call.skip]
            group: list[int] = []
            values: list[Any] = []
            errors: dict[int, BaseException] = {}
            t0s: list[float] = []
            t1s: list[float] = []
            last_flush = time.time()
            for pos, i in enumerate(todo):
                args, kwargs = pairs[i]
                key = args[0] if args else None
                self.started[key] += 1
                t0 = time.time()
                pause = self.delay(key, ex.attempt)
                if pause > 0:
                    await asyncio.sleep(pause)
                try:
                    value = func(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - the user's exception is the result
                    value = None
                    errors[i] = exc
                self.completed[key] += 1
                t1 = time.time()
                group.append(i)
                values.append(value)
                t0s.append(t0)
                t1s.append(t1)
                if pos == len(todo) - 1 or todo[pos + 1] != i + 1 or t1 - last_flush >= self.flush_interval:
                    call.add(self._outcome(group, values, errors, t0s, t1s))
                    group, values, errors, t0s, t1s = [], [], {}, [], []
                    last_flush = time.time()
        finally:
            call.finish()

    def _outcome(
        self, group: list[int], values: list[Any], errors: dict[int, BaseException], t0s: list[float], t1s: list[float]
    ) -> bytes:
        meta: dict[str, Any] = {"first": group[0], "n": len(group), "rss": 0, "pid": os.getpid(), "replica": self.name}
        exc_blobs: dict[int, bytes] = {}
        if errors:
            meta["errors"] = {str(i): _error_info(protocol.ERR_USER, exc) for i, exc in errors.items()}
            exc_blobs = {i: cloudpickle.dumps(exc) for i, exc in errors.items()}
        blob = cloudpickle.dumps((values, exc_blobs, (t0s, t1s, [0.0] * len(group))))
        return protocol.frame(protocol.F_OUTCOME, protocol.encode_outcome_payload(meta, blob))

    async def _finish_durable(self, call: _Call, runner: asyncio.Task[None]) -> None:
        """server._finish_durable: say it is alive until the call ends, then write all it
        produced to Blob, signed with the replica's key."""
        storage = self.storage
        assert storage is not None, "a durable call on a replica without Blob storage"
        alive = f"{call.out_prefix}/alive"
        await storage.put(alive, str(time.time()).encode())
        while not runner.done():
            done, _ = await asyncio.wait({runner}, timeout=call.alive_interval)
            if not done:
                await storage.put(alive, str(time.time()).encode())
        call.take()
        body = b"".join(call.history) + protocol.END_FRAME
        await storage.put(f"{call.out_prefix}/final.out", hmac.new(self.key, body, hashlib.sha256).digest() + body)


class ReplicaTransport:
    """transport.Transport to the double. At most ``limit`` requests hold a connection at once
    (aiohttp's TCPConnector limit): others wait for one, as they would."""

    def __init__(self, replica: Replica, limit: int) -> None:
        self.replica = replica
        self._connections = asyncio.Semaphore(limit)
        self.closed = False

    async def post(self, headers: Mapping[str, str], body: bytes) -> Reply:
        assert not self.closed, "a request on a closed transport"
        replica = self.replica
        ex = Exchange(replica, self, headers, body)
        replica.exchanges.append(ex)
        replica.outstanding += 1
        replica.peak = max(replica.peak, replica.outstanding)
        try:
            await self._connections.acquire()
        except BaseException:
            ex.end("cancelled")
            raise
        ex.slot = self._connections
        ex.handler = replica._spawn(replica.handle(ex))
        try:
            return await ex.head
        except TransportError:
            ex.end("failed")
            raise
        except BaseException:  # cancelled before the head came: the client closed the connection
            ex.disconnect()
            ex.end("cancelled")
            raise

    async def aclose(self) -> None:
        """The session closes its connections. Every answer should have been read or closed
        by then: one still open is a leak."""
        self.closed = True
        for ex in self.replica.exchanges:
            if ex.transport is self and ex.ended is None:
                self.replica.problems.append(f"{ex.call_id} attempt {ex.attempt} was still open when the session closed")
                ex.disconnect()
                ex.end("closed")


class BlobStore:
    """Blob storage in memory, with the calls Transfers makes of storage.Storage."""

    lends_user_sas = False

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.etags: dict[str, str] = {}
        self.writes: list[str] = []
        self.closed = False

    async def write_url(self, lifetime: Any = None) -> str:
        return "https://account.blob.core.windows.net/acx-data?sp=cw&sig=double"

    async def read_url(self, key: str, lifetime: Any = None) -> str:
        return f"https://account.blob.core.windows.net/acx-data/{key}?sp=r&sig=double"

    async def put(self, key: str, data: bytes | bytearray | memoryview, *, overwrite: bool = True) -> None:
        await asyncio.sleep(0)
        self.blobs[key] = bytes(data)
        self.writes.append(key)
        self.etags[key] = f'"0x{len(self.writes):x}"'  # a new one each write

    async def get(self, key: str, *, offset: int | None = None, length: int | None = None) -> bytes:
        await asyncio.sleep(0)
        return self.blobs[key]

    async def exists(self, key: str) -> bool:
        return key in self.blobs

    async def etag(self, key: str) -> str | None:
        return self.etags.get(key) if key in self.blobs else None

    async def list(self, prefix: str = "") -> list[BlobInfo]:
        return [BlobInfo(k, len(v), None) for k, v in sorted(self.blobs.items()) if k.startswith(prefix)]

    async def delete(self, *keys: str) -> int:
        gone = [k for k in keys if self.blobs.pop(k, None) is not None]
        return len(gone)

    async def aclose(self) -> None:
        self.closed = True


class DoubleRuntime:
    """runtimes.Runtime for the double: started at once, one replica."""

    name = "double"

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    async def start(self) -> Endpoint:
        return Endpoint(url=URL, key=self.replica.endpoint_key, heartbeat=self.replica.heartbeat)

    async def aclose(self) -> None:
        pass

    def replicas_for(self, requests: int) -> int:
        return 1

    async def warm(self, replicas: int, *, lease: float) -> int:
        return replicas

    async def cool(self) -> None:
        pass


# --------------------------------------------------------------------------------------
# wiring


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(invoker, "BACKOFF_BASE", BACKOFF_BASE)
    monkeypatch.setattr(invoker, "BACKOFF_CAP", BACKOFF_CAP)
    monkeypatch.setattr(invoker, "RETRY_AFTER_CAP", RETRY_AFTER_CAP)


@pytest.fixture
async def replica(monkeypatch: pytest.MonkeyPatch, fast_backoff: None) -> AsyncIterator[Replica]:
    """The double; executors made in the test reach it (as tests/test_faults.py reaches its proxy)."""
    r = Replica()
    monkeypatch.setattr(executor_module, "create_runtime", lambda config, **kw: DoubleRuntime(r))
    yield r
    await r.settle()
    r.check()


@contextlib.asynccontextmanager
async def executor(replica: Replica, **options: Any) -> AsyncIterator[AsyncExecutor]:
    ex = AsyncExecutor(config={"localhost": {"replicas": 1, "worker_processes": 1}}, progress=False, **options)
    ex._ensure_started().transport_factory = replica.transport  # before the runtime attaches
    try:
        await ex.start()
        yield ex
    finally:
        await ex.aclose()


@contextlib.asynccontextmanager
async def durable_invoker(replica: Replica, store: BlobStore) -> AsyncIterator[tuple[Invoker, Stats]]:
    """An invoker with Blob storage whose calls outlive the ingress (call_limit 1 s), so each
    is durable, as the executor builds one for Azure with azure_storage."""
    stats = Stats()
    inv = Invoker(max_concurrency=2, retries=2, stats=stats)
    inv.transport_factory = replica.transport
    transfers = Transfers(store, inline_limit=1 << 20, keep_data=False, call_limit=1.0, executor_id="e0")  # type: ignore[arg-type]
    transfers.key = replica.endpoint_key
    inv.attach(Endpoint(url=URL, key=replica.endpoint_key, heartbeat=replica.heartbeat), transfers)
    try:
        yield inv, stats
    finally:
        await inv.aclose()
        await transfers.aclose()
        await replica.settle()
        replica.check()


def submit_batch(inv: Invoker, stats: Stats, fn: Callable[[Any], Any], xs: list[Any]) -> list[CallFuture]:
    """One request of ``fn(x)`` for each of ``xs``, a future each (as executor.submit builds it)."""
    fn_bytes, fn_hash = serialize.dumps_function(fn)
    job = Job("e0-A001", fn_bytes, fn_hash, 60.0, stats)
    futures = job.new_futures(asyncio.get_running_loop(), len(xs))
    call_id = job.call_id(0) if len(xs) == 1 else f"{job.call_id(0)}:{len(xs)}"
    inv.enqueue(FutureRequest(call_id, job, futures, serialize.dumps_items([((x,), {}) for x in xs], call_id)))
    return futures


def record_backoff(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, float | None, float]]:
    """(attempt, retry_after, delay) of every backoff the invoker computes."""
    calls: list[tuple[int, float | None, float]] = []
    real = invoker.backoff

    def recording(attempt: int, retry_after: float | None = None) -> float:
        delay = real(attempt, retry_after)
        calls.append((attempt, retry_after, delay))
        return delay

    monkeypatch.setattr(invoker, "backoff", recording)
    return calls


class _NoJitter:
    """invoker's ``random``, drawing the top of each range: a delay is its bound."""

    @staticmethod
    def uniform(a: float, b: float) -> float:
        return b


def gaps(replica: Replica) -> list[float]:
    sent = [ex.at for ex in replica.exchanges]
    return [b - a for a, b in itertools.pairwise(sent)]


def attempts_by_call(replica: Replica) -> dict[str, list[int]]:
    out: dict[str, list[int]] = collections.defaultdict(list)
    for ex in replica.exchanges:
        out[ex.call_id].append(ex.attempt)
    return dict(out)


def triple(x: int) -> int:
    return 3 * x


def triple_unless_one(x: int) -> int:
    if x == 1:
        raise ValueError(f"no {x}")
    return 3 * x


def make_lookup() -> Callable[[int], int]:
    table = bytes(range(256)) * 512  # 128 KiB: the function pickles above FN_INLINE_LIMIT

    def lookup(i: int) -> int:
        return table[i % len(table)]

    return lookup


SUMMARY_ONE_OK = {"submitted": 1, "succeeded": 1, "failed": 0, "cancelled": 0, "pending": 0}


# --------------------------------------------------------------------------------------
# the double itself


async def test_the_double_answers_plainly_or_streams_and_every_answer_read_to_its_end_is_reused(replica: Replica) -> None:
    replica.delay = lambda x, attempt: 0.01 if x % 2 else 0.0  # odd items outlast a heartbeat
    async with executor(replica) as ex:
        results = await ex.map(triple_unless_one, range(8), chunksize=1, return_exceptions=True)
        summary = ex.job_summary()
    assert results[0] == 0 and results[2:] == [6, 9, 12, 15, 18, 21]
    assert isinstance(results[1], ValueError) and str(results[1]) == "no 1"
    assert {ex.streamed for ex in replica.exchanges} == {True, False}  # plain answers and heartbeat streams
    assert all(ex.ended == "released" and ex.status == 200 for ex in replica.exchanges)
    assert replica.completed == collections.Counter(range(8))
    assert summary["retries"] == 0 and summary["calls"]["succeeded"] == 7 and summary["calls"]["failed"] == 1


# --------------------------------------------------------------------------------------
# retries


#: A fault on a call's first send: the runs it costs on the replica, whether it says the
#: runtime is unavailable (which halves the window), and how the client ends that exchange.
FIRST_SEND_FAULTS = {
    "connect": (Fault("connect"), 0, True, "failed"),
    "reset before any byte": (Fault("reset"), 0, False, "failed"),
    "reset after the run": (Fault("reset-after-run"), 1, False, "failed"),
    "503 draining": (Fault("503"), 0, True, "closed"),
    "429 ingress": (Fault("429", retry_after="0"), 0, True, "closed"),
    "502 gateway": (Fault("502"), 1, False, "closed"),
    "504 gateway": (Fault("504"), 1, False, "closed"),
    "cut mid-stream": (Fault("cut"), 1, False, "closed"),
}


@pytest.mark.parametrize(("fault", "ran", "unavailable", "ended"), FIRST_SEND_FAULTS.values(), ids=FIRST_SEND_FAULTS.keys())
async def test_a_failed_send_is_sent_again_as_a_new_attempt_and_the_result_arrives_once(
    replica: Replica, fault: Fault, ran: int, unavailable: bool, ended: str
) -> None:
    replica.delay = lambda x, attempt: 0.01 if attempt == 0 else 0.0  # the first run streams heartbeats
    replica.script = lambda ex: fault if ex.attempt == 0 else None
    async with executor(replica, retries=2) as ex:
        fut = ex.submit(triple, 7)
        assert await fut == 21
        summary = ex.job_summary()
    first, second = replica.exchanges
    # The same call id, signed as the next attempt (a replica would refuse a replay).
    assert first.call_id == second.call_id == fut.call_id and (first.attempt, second.attempt) == (0, 1)
    # At least once: the first send ran only where the fault came after the run.
    assert replica.completed[7] == ran + 1 and first.reached == (fault.kind not in ("connect", "reset", "429"))
    assert first.ended == ended and second.ended == "released"
    assert summary["retries"] == 1 and summary["calls"] == SUMMARY_ONE_OK
    assert summary["concurrency"]["halvings"] == (1 if unavailable else 0)


@pytest.mark.parametrize("api", ["map", "imap"])
async def test_a_batch_cut_mid_stream_is_sent_again_without_the_items_already_answered(replica: Replica, api: str) -> None:
    replica.flush_interval = 0  # the worker sends each item's outcome as it ends
    replica.delay = lambda x, attempt: 0.01
    # Two outcomes get through; item 2 runs, and the connection drops before its outcome.
    replica.script = lambda ex: Fault("cut", outcomes=2) if ex.attempt == 0 else None
    async with executor(replica, retries=2) as ex:
        if api == "map":
            results = await ex.map(triple_unless_one, range(6), chunksize=6, return_exceptions=True)
        else:
            results = [r async for r in ex.imap(triple_unless_one, range(6), chunksize=6, ordered=True, return_exceptions=True)]
        summary = ex.job_summary()
    assert results[0] == 0 and isinstance(results[1], ValueError) and results[2:] == [6, 9, 12, 15]
    first, retry = replica.exchanges
    assert first.call_id == retry.call_id and (first.attempt, retry.attempt) == (0, 1)
    assert first.streamed and first.lost == "cut"
    # The retry names the items answered (item 1's code raised: it is never run again)...
    assert first.skip == () and retry.skip == (0, 1)
    # ...so they ran once; item 2 ran twice (its outcome was lost), as at-least-once allows.
    assert replica.completed == collections.Counter({0: 1, 1: 1, 2: 2, 3: 1, 4: 1, 5: 1})
    assert summary["retries"] == 1
    assert summary["calls"] == {"submitted": 6, "succeeded": 5, "failed": 1, "cancelled": 0, "pending": 0}


@pytest.mark.parametrize(
    ("fault", "cause"),
    [(Fault("connect"), CONNECT_REFUSED), (Fault("503"), f"HTTP 503: {DRAINING}"), (Fault("reset"), DISCONNECTED),
     (Fault("cut"), CUT)],
    ids=["connect", "503", "reset", "cut"],
)  # fmt: skip
async def test_retries_stop_at_the_limit_with_an_error_naming_the_call_and_the_last_cause(
    replica: Replica, fault: Fault, cause: str
) -> None:
    replica.script = lambda ex: fault
    async with executor(replica, retries=3) as ex:
        fut = ex.submit(triple, 7)
        with pytest.raises(InvocationError) as info:
            await fut
        summary = ex.job_summary()
    assert str(info.value) == f"call {fut.call_id} could not be delivered after 4 attempt(s); last error: {cause}"
    assert [ex.attempt for ex in replica.exchanges] == [0, 1, 2, 3]
    assert replica.completed[7] == (4 if fault.kind == "cut" else 0)  # a cut came after each run
    assert summary["retries"] == 3 and summary["calls"]["failed"] == 1 and summary["calls"]["succeeded"] == 0


async def test_a_tls_failure_is_not_retried(replica: Replica) -> None:
    replica.script = lambda ex: Fault("tls")
    async with executor(replica, retries=3) as ex:
        with pytest.raises(InvocationError, match=r"TLS verification of https://replica\.invalid/v1/invoke failed: .*ca_bundle"):
            await ex.submit(triple, 7)
        assert ex.job_summary()["retries"] == 0
    assert len(replica.exchanges) == 1


async def test_a_signature_the_replica_refuses_is_not_retried(replica: Replica) -> None:
    replica.endpoint_key = secrets.token_bytes(32)  # the client was given another key
    replica.expected_statuses = {401}
    async with executor(replica, retries=3) as ex:
        with pytest.raises(AuthenticationError, match=r"refused the signature of call .*signature mismatch"):
            await ex.submit(triple, 7)
        assert ex.job_summary()["retries"] == 0
    (only,) = replica.exchanges
    assert only.status == 401 and only.ended == "closed" and replica.started[7] == 0


async def test_a_large_function_goes_by_hash_and_along_only_when_the_replica_lacks_it(replica: Replica) -> None:
    async with executor(replica, max_concurrency=1) as ex:
        assert await ex.map(make_lookup(), range(5), chunksize=1) == list(range(5))
        summary = ex.job_summary()
    assert [ex.with_fn for ex in replica.exchanges] == [False, True, False, False, False, False]
    refused, resent = replica.exchanges[:2]
    assert (refused.status, refused.code) == (409, protocol.UNKNOWN_FUNCTION) and refused.ended == "closed"
    assert resent.call_id == refused.call_id and (refused.attempt, resent.attempt) == (0, 1)
    assert summary["function_uploads"] == 1 and summary["retries"] == 0


# --------------------------------------------------------------------------------------
# backoff


async def test_backoff_doubles_per_attempt_up_to_its_cap_and_each_delay_is_waited(
    replica: Replica, monkeypatch: pytest.MonkeyPatch
) -> None:
    backoffs = record_backoff(monkeypatch)
    monkeypatch.setattr(invoker, "random", _NoJitter())
    replica.script = lambda ex: Fault("reset") if ex.attempt < 9 else None
    async with executor(replica, retries=9) as ex:
        assert await ex.submit(triple, 5) == 15
        assert ex.job_summary()["retries"] == 9
    assert [a for a, _, _ in backoffs] == [0, 1, 2, 3, 4, 5, 6, 7, 7]  # the exponent stops at 7
    delays = [d for _, _, d in backoffs]
    assert delays == pytest.approx([min(BACKOFF_CAP, BACKOFF_BASE * 2**k) for k in [0, 1, 2, 3, 4, 5, 6, 7, 7]])
    assert all(b == pytest.approx(2 * a) for a, b in itertools.pairwise(delays[:7]))  # doubling...
    assert delays[7] == delays[8] == BACKOFF_CAP < BACKOFF_BASE * 2**7  # ...up to the cap
    # Each send waited at least its delay after the one before (the loop's clock, at the double).
    assert len(gaps(replica)) == 9 and all(g >= d - 1e-6 for g, d in zip(gaps(replica), delays, strict=True))


async def test_retry_after_is_a_floor_under_the_jitter_up_to_its_cap(replica: Replica, monkeypatch: pytest.MonkeyPatch) -> None:
    backoffs = record_backoff(monkeypatch)
    faults = {0: Fault("429", retry_after="0.015"), 1: Fault("503"), 2: Fault("reset")}  # the replica's 503 says 1 s
    replica.script = lambda ex: faults.get(ex.attempt)
    async with executor(replica, retries=5) as ex:
        assert await ex.submit(triple, 5) == 15
        assert ex.job_summary()["retries"] == 3
    assert [(a, ra) for a, ra, _ in backoffs] == [(0, 0.015), (1, 1.0), (2, None)]
    throttled, draining, reset = (d for _, _, d in backoffs)
    assert throttled == 0.015  # jitter alone: at most 0.2 ms
    assert draining == RETRY_AFTER_CAP  # 1 s, capped
    assert 0 <= reset <= BACKOFF_BASE * 2**2  # no Retry-After: jitter within its bound
    assert all(g >= d - 1e-6 for g, d in zip(gaps(replica), (throttled, draining, reset), strict=True))


# --------------------------------------------------------------------------------------
# the concurrency window


async def test_no_more_than_max_concurrency_requests_are_in_flight_and_all_complete(replica: Replica) -> None:
    replica.delay = lambda x, attempt: 0.005
    async with executor(replica, max_concurrency=3) as ex:
        assert await ex.map(triple, range(30), chunksize=1) == [3 * x for x in range(30)]
        summary = ex.job_summary()
    assert replica.peak == 3  # the window is used, and never exceeded
    assert replica.limits == [3 + 1]  # connections: the window and the hedging allowance
    assert len(replica.exchanges) == 30 and replica.completed == collections.Counter(range(30))
    assert summary["calls"]["succeeded"] == 30 and summary["retries"] == 0


async def test_refusals_halve_the_window_and_every_call_still_completes_once(replica: Replica) -> None:
    replica.delay = lambda x, attempt: 0.005
    replica.script = lambda ex: Fault("503") if ex.seq < 8 else None  # the first wave meets a draining replica
    async with executor(replica, max_concurrency=8) as ex:
        assert await ex.map(triple, range(40), chunksize=1) == [3 * x for x in range(40)]
        summary = ex.job_summary()
    assert replica.peak <= 8
    halvings = summary["concurrency"]["halvings"]
    assert halvings >= 1 and summary["concurrency"]["lowest"] == 8 // 2**halvings
    assert summary["retries"] == 8 and summary["calls"]["succeeded"] == 40
    assert replica.completed == collections.Counter(range(40))


async def test_with_hedging_no_more_than_max_concurrency_and_its_backups_are_in_flight(replica: Replica) -> None:
    stragglers = {20, 21, 22, 40, 50}  # three at once: backups for two would be due together
    replica.delay = lambda x, attempt: 30.0 if x in stragglers and attempt == 0 else 0.01
    async with executor(replica, max_concurrency=4) as ex:
        results = await asyncio.wait_for(ex.map(triple, range(60), hedge=True), 10)
        summary = ex.job_summary()
    assert results == [3 * x for x in range(60)]
    assert replica.limits == [4 + 1]
    assert replica.peak == 4 + 1  # the window and HEDGE_SHARE of it (one backup at a time), never more
    # No straggler's first send finished: each result came from a backup.
    assert all(replica.completed[x] == 1 for x in range(60))
    assert summary["hedges"]["won"] >= len(stragglers) and summary["calls"]["succeeded"] == 60


# --------------------------------------------------------------------------------------
# hedging


async def test_a_straggler_gets_a_backup_whose_answer_wins_and_the_loser_is_closed(replica: Replica) -> None:
    replica.delay = lambda x, attempt: 30.0 if x == 30 and attempt == 0 else 0.01
    async with executor(replica, max_concurrency=4) as ex:
        # Without a backup, item 30 would take 30 s.
        results = await asyncio.wait_for(ex.map(triple, range(40), hedge=True), 10)
        summary = ex.job_summary()
    assert results == [3 * x for x in range(40)]
    primary, backup, *_ = (ex for ex in replica.exchanges if ex.args == [30])
    assert primary.call_id == backup.call_id and (primary.attempt, backup.attempt) == (0, 1)
    assert backup.status == 200 and backup.ended == "released"
    # The loser's answer (heartbeats so far) is cut, so the replica stops running it.
    assert primary.reply is not None and primary.reply.closed and not primary.reply.released
    assert primary.lost == "client" and replica.completed[30] == 1
    backups = sum(len(a) - 1 for a in attempts_by_call(replica).values())
    assert summary["hedges"]["sent"] == backups >= 1 and summary["hedges"]["won"] >= 1
    assert summary["retries"] == 0
    assert summary["calls"] == {"submitted": 40, "succeeded": 40, "failed": 0, "cancelled": 0, "pending": 0}


# --------------------------------------------------------------------------------------
# durable calls (Blob storage, a call longer than the ingress allows)


async def test_a_durable_batch_cut_mid_stream_is_recovered_from_blob_storage_and_not_run_again(fast_backoff: None) -> None:
    store = BlobStore()
    replica = Replica(storage=store, flush_interval=0)
    replica.delay = lambda x, attempt: 0.02
    replica.script = lambda ex: Fault("cut", outcomes=1) if ex.attempt == 0 else None  # item 1 ran; its outcome is cut off
    async with durable_invoker(replica, store) as (inv, stats):
        results = await asyncio.wait_for(asyncio.gather(*submit_batch(inv, stats, triple, [0, 1, 2])), 5)
    assert results == [0, 3, 6]
    (only,) = replica.exchanges  # not sent again
    assert only.header["durable"] is True and only.lost == "cut"
    assert replica.completed == collections.Counter({0: 1, 1: 1, 2: 1})
    prefix = only.header["out_prefix"]
    assert f"{prefix}/alive" in store.writes and store.writes[-1] == f"{prefix}/final.out"
    # final.out repeats item 0's outcome, which the stream brought: counted once.
    assert stats.recovered == 1 and stats.retries == 0 and (stats.succeeded, stats.failed) == (3, 0)
    assert store.blobs == {}  # read, then deleted


async def test_a_durable_call_a_gateway_timed_out_is_recovered_from_blob_storage(fast_backoff: None) -> None:
    store = BlobStore()
    replica = Replica(storage=store)
    replica.delay = lambda x, attempt: 0.05
    replica.script = lambda ex: Fault("504", after=0.01) if ex.attempt == 0 else None  # while it runs
    async with durable_invoker(replica, store) as (inv, stats):
        (fut,) = submit_batch(inv, stats, triple, [4])
        assert await asyncio.wait_for(fut, 5) == 12
    (only,) = replica.exchanges
    assert only.status == 504 and replica.completed[4] == 1
    assert stats.recovered == 1 and stats.retries == 0 and store.blobs == {}


async def test_a_durable_call_whose_replica_dies_with_the_cut_is_sent_again(
    fast_backoff: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "ALIVE_GRACE", 0.05)  # 30 s: how long a replica has to say it is alive
    store = BlobStore()
    replica = Replica(storage=store)
    replica.delay = lambda x, attempt: 0.05
    replica.script = lambda ex: Fault("cut", after=0.01, crash=True) if ex.attempt == 0 else None
    async with durable_invoker(replica, store) as (inv, stats):
        (fut,) = submit_batch(inv, stats, triple, [4])
        assert await asyncio.wait_for(fut, 5) == 12
    assert [ex.attempt for ex in replica.exchanges] == [0, 1]
    assert store.writes == []  # the dead replica said nothing: no alive, no final.out
    assert (replica.started[4], replica.completed[4]) == (2, 1)  # the first run died with it
    assert stats.retries == 1 and stats.recovered == 0 and stats.succeeded == 1


async def test_a_durable_call_whose_answer_is_lost_before_its_head_is_recovered_not_run_again(fast_backoff: None) -> None:
    store = BlobStore()
    replica = Replica(storage=store)
    replica.script = lambda ex: Fault("reset-after-run") if ex.attempt == 0 else None
    async with durable_invoker(replica, store) as (inv, stats):
        (fut,) = submit_batch(inv, stats, triple, [4])
        assert await asyncio.wait_for(fut, 5) == 12
    assert replica.completed[4] == 1 and stats.recovered == 1 and stats.retries == 0
