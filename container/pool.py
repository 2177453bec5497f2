"""The worker processes of one replica and the queue of calls waiting for them.

The server's event loop talks to each worker over a Unix socket (an asyncio Protocol, so no
thread or feeder queue sits on the hot path) and reads its progress block to enforce
timeouts. A worker that dies, times out or is killed because its call was cancelled is
replaced; the item it was running fails alone and the rest of its work is handed to another
worker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import pickle
import signal
import socket
import sys
import time
from typing import Any

from async_ca_exec import protocol

from . import ipc

log = logging.getLogger("acx_server.pool")

#: A worker that dies before it is ready this many times in a row marks the pool broken.
MAX_START_FAILURES = 3
#: A task re-queued this many times because its worker died before reaching it fails.
MAX_REQUEUES = 3
#: Hand several queued tasks to one worker at once only while tasks are this short (seconds).
PIPELINE_BELOW = 0.005
MAX_PIPELINE = 16
WATCHDOG_INTERVAL = 0.05


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "disappeared"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if -returncode == signal.SIGKILL:
            return f"was killed by {name} (out of memory, or killed from outside)"
        if -returncode == signal.SIGSEGV:
            return f"was killed by {name} (a crash in native code)"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


class Task:
    """One request's work for one worker: ``n`` items of one function."""

    __slots__ = (
        "alive_interval",
        "call_id",
        "cancelled",
        "dispatched",
        "durable",
        "finished",
        "fn",
        "fn_hash",
        "frames",
        "heartbeat_due",
        "history",
        "id",
        "inline_limit",
        "items",
        "last_write",
        "n",
        "out_prefix",
        "out_url",
        "remaining",
        "reported_upto",
        "requeues",
        "skip",
        "streaming",
        "timeout",
        "waiter",
    )

    def __init__(
        self,
        task_id: int,
        inv: protocol.Invocation,
        fn: bytes | memoryview | None = None,
        items: bytes | memoryview | None = None,
    ) -> None:
        self.id = task_id
        self.call_id = inv.call_id
        self.n = inv.n
        self.fn_hash = bytes.fromhex(inv.fn_hash)
        self.fn: bytes | memoryview = inv.fn if fn is None else fn
        self.items: bytes | memoryview = inv.items if items is None else items
        self.timeout = inv.timeout
        self.frames: list[bytes] = []
        self.skip: list[int] = list(inv.skip)  # resolved on an earlier attempt, or charged here
        self.remaining = inv.n - len(self.skip)
        self.reported_upto = 0
        self.finished = False
        self.cancelled = False
        self.waiter: asyncio.Future[None] | None = None
        self.streaming = False
        self.last_write = time.monotonic()
        self.requeues = 0
        self.dispatched = 0.0
        self.heartbeat_due = False
        # Blob storage the request lends the runtime: a container URL with a create/write SAS.
        header = inv.header
        self.out_url: str | None = header.get("out_url")
        self.out_prefix: str = str(header.get("out_prefix") or "")
        self.inline_limit: int = int(header.get("inline_limit") or (1 << 62))
        self.durable = bool(header.get("durable")) and self.out_url is not None
        self.alive_interval = float(header.get("alive_interval") or 20.0)
        self.history: list[bytes] = []

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def add_frame(self, data: bytes) -> None:
        if self.cancelled:
            return
        self.frames.append(data)
        if self.streaming:
            self.wake()

    def take_frames(self) -> list[bytes]:
        frames, self.frames = self.frames, []
        return frames

    def finish(self) -> None:
        self.finished = True
        self.fn = self.items = memoryview(b"")  # release the request body
        self.wake()

    def todo(self) -> list[int]:
        skip = set(self.skip)
        return [i for i in range(self.reported_upto, self.n) if i not in skip]

    def fail_items(self, indices: list[int], info: dict[str, Any], replica: str) -> None:
        """Charge ``indices`` with an error produced by the server (timeout, crash...)."""
        if not indices:
            return
        indices = sorted(indices)
        runs: list[list[int]] = [[indices[0]]]
        for i in indices[1:]:
            (runs[-1].append(i) if i == runs[-1][-1] + 1 else runs.append([i]))
        now = time.time()
        for run in runs:
            k = len(run)
            meta = {"first": run[0], "n": k, "replica": replica, "errors": {str(i): info for i in run}}
            blob = pickle.dumps(([None] * k, {}, ([now] * k, [now] * k, [0.0] * k)))
            self.add_frame(_outcome_frame(protocol.encode_outcome_payload(meta, blob)))
        self.skip.extend(indices)
        self.remaining -= len(indices)


def _outcome_frame(payload: bytes | memoryview) -> bytes:
    return protocol.frame_header(protocol.F_OUTCOME, len(payload)) + bytes(payload)


def _log_frame(index: int, stream: int, text: bytes | memoryview) -> bytes:
    return protocol.encode_log(index, stream, text)


class WorkerProc(asyncio.Protocol):
    """The server's side of one worker process."""

    def __init__(self, pool: WorkerPool, progress: ipc.Progress) -> None:
        self.pool = pool
        self.progress = progress
        self.proc: asyncio.subprocess.Process | None = None
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.inflight: collections.deque[Task] = collections.deque()
        self.known: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.ready = False
        self.kill_reason: str | None = None
        self.pid = 0
        self.rss = 0  # bytes, when it was killed for memory
        self.lost: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.lost = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        off = 0
        end = len(buf)
        hdr_size = ipc.HDR.size
        while end - off >= hdr_size:
            size, mtype = ipc.HDR.unpack_from(buf, off)
            if end - off - 4 < size:
                break
            payload = bytes(buf[off + hdr_size : off + 4 + size])
            off += 4 + size
            try:
                self._handle(mtype, payload)
            except Exception:  # pragma: no cover - a bug here must not kill the server
                log.exception("bad message from worker %s", self.pid)
                self.kill("protocol")
                break
        if off:
            del buf[:off]

    def _task(self, task_id: int) -> Task | None:
        if self.inflight and self.inflight[0].id == task_id:
            return self.inflight[0]
        for t in self.inflight:
            if t.id == task_id:
                return t
        return None

    def _handle(self, mtype: int, payload: bytes) -> None:
        if mtype == ipc.M_OUTCOME:
            task_id, first, n, flags = ipc.TASK_OUTCOME.unpack_from(payload)
            last = flags & ipc.OUTCOME_LAST
            task = self._task(task_id)
            if task is None:
                return
            if flags & ipc.OUTCOME_FN_FAILED:  # send the function again next time
                self.known.pop(task.fn_hash, None)
            if n:
                task.add_frame(_outcome_frame(memoryview(payload)[ipc.TASK_OUTCOME.size :]))
                task.remaining -= n
                task.reported_upto = first + n
            if last:
                self.inflight.remove(task)
                self.pool._task_left_worker(self, task)
                if not task.finished and not task.cancelled:
                    if task.remaining > 0:  # pragma: no cover - worker bug
                        task.fail_items(task.todo(), _internal("the worker skipped items"), self.pool.replica)
                    task.finish()
        elif mtype == ipc.M_LOG:
            task_id, index, stream = ipc.TASK_LOG.unpack_from(payload)
            task = self._task(task_id)
            if task is not None:
                task.add_frame(_log_frame(index, stream, memoryview(payload)[ipc.TASK_LOG.size :]))
        elif mtype == ipc.M_READY:
            info = json.loads(payload)
            self.pid = int(info.get("pid", self.pid))
            self.ready = True
            self.pool._worker_ready(self)
        else:
            raise ValueError(f"unknown message type {mtype}")

    # -- commands --------------------------------------------------------------------

    def send(self, tasks: list[Task]) -> None:
        parts: list[bytes | memoryview] = []
        now = time.monotonic()
        for t in tasks:
            forget: list[bytes] = []
            has_fn = t.fn_hash not in self.known
            if has_fn:
                self.known[t.fn_hash] = None
                while len(self.known) > 32:
                    forget.append(self.known.popitem(last=False)[0])
            else:
                self.known.move_to_end(t.fn_hash)
            fn = t.fn if has_fn else b""
            skip = b"".join(ipc.U32.pack(i) for i in t.skip)
            head = ipc.TASK_HEAD.pack(
                t.id,
                t.reported_upto,
                t.n,
                ipc.FLAG_HAS_FN if has_fn else 0,
                len(forget),
                len(t.skip),
                t.fn_hash,
                len(fn),
            )
            size = 1 + len(head) + 32 * len(forget) + len(skip) + len(fn) + len(t.items)
            parts.append(ipc.HDR.pack(size, ipc.M_TASK))
            parts.append(head)
            parts.extend(forget)
            parts.append(skip)
            parts.append(fn)
            parts.append(t.items)
            t.dispatched = now
            self.inflight.append(t)
        assert self.transport is not None
        self.transport.writelines(parts)

    def kill(self, reason: str) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:  # pragma: no cover - already gone
                pass


def _resident(pid: int, page: int) -> int:
    """A process's resident memory in bytes (Linux), 0 if it cannot be read."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * page
    except (OSError, IndexError, ValueError):
        return 0


def _internal(message: str) -> dict[str, Any]:
    return {"kind": protocol.ERR_INTERNAL, "type": "acx_server.InternalError", "message": message, "traceback": ""}


class WorkerPool:
    """``size`` worker processes and a FIFO of tasks."""

    def __init__(
        self, size: int, *, replica: str, env: dict[str, str] | None = None, cwd: str | None = None,
        memory_limit: int = 0,
    ) -> None:  # fmt: skip
        if size < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.size = size
        #: Resident memory a worker may use (bytes; 0: no limit), checked by the watchdog.
        self.memory_limit = memory_limit if sys.platform.startswith("linux") else 0
        self._page = os.sysconf("SC_PAGE_SIZE") if self.memory_limit else 0
        self.replica = replica
        self.env = env
        self.cwd = cwd
        self.queue: collections.deque[Task] = collections.deque()
        self.workers: set[WorkerProc] = set()
        self.idle: list[WorkerProc] = []
        self._supervisors: set[asyncio.Task[Any]] = set()
        self._helpers: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._start_failures = 0
        self._broken: str | None = None
        self._avg_service = 0.0
        self._ready_event: asyncio.Event | None = None
        self._next_id = 0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, timeout: float = 120.0) -> None:
        self._ready_event = asyncio.Event()
        for _ in range(self.size):
            self._spawn_soon()
        self._own(self._watchdog(), self._helpers)
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"worker processes did not start within {timeout:.0f} s") from None
        if self._broken:
            raise RuntimeError(self._broken)

    @property
    def ready_workers(self) -> int:
        return sum(1 for w in self.workers if w.ready and w.kill_reason is None)

    @property
    def broken(self) -> str | None:
        return self._broken

    def new_task_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def close(self) -> None:
        self._closing = True
        for w in list(self.workers):
            w.kill("shutdown")
        for helper in self._helpers:
            helper.cancel()
        pending = self._supervisors | self._helpers
        if pending:
            _done, still = await asyncio.wait(pending, timeout=10)
            for s in still:  # pragma: no cover - a worker that ignores SIGKILL
                s.cancel()
        for t in self.queue:
            if not t.finished:
                t.fail_items(t.todo(), _internal("the runtime shut down before the call ran"), self.replica)
                t.finish()
        self.queue.clear()

    def _own(self, coro: Any, owner: set[asyncio.Task[Any]]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        owner.add(task)
        task.add_done_callback(owner.discard)

    def _spawn_soon(self, delay: float = 0.0) -> None:
        self._own(self._supervise(delay), self._supervisors)

    async def _supervise(self, delay: float) -> None:
        """Start one worker, wait for it to exit, settle its calls and start a replacement."""
        if delay:
            await asyncio.sleep(delay)
        if self._closing:
            return
        loop = asyncio.get_running_loop()
        progress = ipc.Progress()
        parent_sock, child_sock = socket.socketpair()
        w = WorkerProc(self, progress)
        try:
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                f"{__package__}.worker",
                str(child_sock.fileno()),
                str(progress.fd),
                str(os.getpid()),
                pass_fds=(child_sock.fileno(), progress.fd),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sys.stderr.fileno(),  # stray fd-level output lands in the server log
                env=self.env,
                cwd=self.cwd,
            )
        except OSError as exc:
            child_sock.close()
            parent_sock.close()
            progress.close()
            self._start_failed(f"could not start a worker process: {exc}")
            return
        child_sock.close()
        w.pid = w.proc.pid
        try:
            await loop.create_unix_connection(lambda: w, sock=parent_sock)
        except BaseException as exc:
            w.proc.kill()
            await w.proc.wait()
            parent_sock.close()
            progress.close()
            if isinstance(exc, Exception):
                self._start_failed(f"could not connect to a new worker process: {exc}")
                return
            raise
        self.workers.add(w)
        if self._closing:  # close() began while this one was starting: it did not see it to kill
            w.kill("shutdown")
        try:
            returncode = await w.proc.wait()
            if w.lost is not None and w.transport is not None:
                # What it wrote before it died is still in the socket: read it (an outcome
                # sent just before a kill counts), unless a child of its own holds it open.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(w.lost), 1.0)
        finally:
            self.workers.discard(w)
            if w in self.idle:
                self.idle.remove(w)
            if w.transport is not None:
                w.transport.close()
        was_ready = w.ready
        self._settle_dead_worker(w, returncode)
        progress.close()
        if self._closing:
            return
        if not was_ready and w.kill_reason is None:
            self._start_failed(f"a worker process {describe_exit(returncode)} before it was ready")
            return
        self._spawn_soon()

    def _start_failed(self, why: str) -> None:
        self._start_failures += 1
        log.error("%s (attempt %d)", why, self._start_failures)
        if self._start_failures >= MAX_START_FAILURES and not self.workers:
            self._broken = f"{why}; the runtime cannot run calls (see the server log)"
            if self._ready_event is not None:
                self._ready_event.set()
            while self.queue:
                t = self.queue.popleft()
                t.fail_items(t.todo(), _internal(self._broken), self.replica)
                t.finish()
        if not self._closing:
            self._spawn_soon(min(30.0, 0.5 * 2**self._start_failures))

    def _worker_ready(self, w: WorkerProc) -> None:
        self._start_failures = 0
        self._broken = None
        self.idle.append(w)
        if self._ready_event is not None and self.ready_workers >= self.size:
            self._ready_event.set()
        self._dispatch()

    # -- scheduling ------------------------------------------------------------------

    def submit(self, task: Task) -> None:
        if self._broken:
            task.fail_items(task.todo(), _internal(self._broken), self.replica)
            task.finish()
            return
        self.queue.append(task)
        if self.idle:
            self._dispatch()

    def cancel(self, task: Task) -> None:
        """The client went away: drop the task, killing its worker if it is running it."""
        if task.finished or task.cancelled:
            return
        task.cancelled = True
        task.frames = []
        for w in self.workers:
            if task not in w.inflight:
                continue
            now = w.progress.read()
            if now is None:
                # Writing progress without pause: a batch of very fast calls, soon done. Killing
                # on a guess could take an innocent next task with it; its output is dropped.
                return
            tid, _index, _started, state = now
            if tid == task.id and state != ipc.STATE_IDLE:
                w.kill("cancel")  # running it now
            elif w.inflight[0] is task and not any(t.id == tid for t in w.inflight):
                w.kill("cancel")  # about to start it
            # Otherwise it waits behind another task (only short tasks are pipelined) or has
            # finished with its last outcome in transit: let it be and drop its output.
            return

    def _dispatch(self) -> None:
        queue, idle = self.queue, self.idle
        while queue and idle:
            w = idle.pop()
            if w.kill_reason is not None or w.transport is None:
                continue
            depth = 1
            if self._avg_service < PIPELINE_BELOW and len(queue) > len(idle) + 1:
                depth = min(MAX_PIPELINE, math.ceil(len(queue) / (len(idle) + 1)))
            batch: list[Task] = []
            while queue and len(batch) < depth:
                t = queue.popleft()
                if not t.cancelled and not t.finished:
                    batch.append(t)
            if not batch:
                idle.append(w)
                return
            w.send(batch)

    def _task_left_worker(self, w: WorkerProc, task: Task) -> None:
        dt = time.monotonic() - task.dispatched
        self._avg_service = 0.9 * self._avg_service + 0.1 * dt if self._avg_service else dt
        if self.memory_limit and not w.inflight and w.kill_reason is None:
            # Python keeps memory it has used: a worker left above the limit by a call that
            # finished is replaced now, so the watchdog does not blame the next call for it.
            rss = _resident(w.pid, self._page)
            if rss > self.memory_limit:
                log.info("worker %s holds %d MB after its call, above its limit: replacing it", w.pid, rss >> 20)
                w.kill("recycle")
        if not w.inflight and w.kill_reason is None and w.ready:
            self.idle.append(w)
            if self.queue:
                self._dispatch()

    def _settle_dead_worker(self, w: WorkerProc, returncode: int | None) -> None:
        reason = w.kill_reason
        tid, index, _started, state = w.progress.get()
        requeue: list[Task] = []
        for t in w.inflight:
            if t.finished or t.cancelled:
                continue
            if t.id == tid and state != ipc.STATE_IDLE:
                if reason == "timeout":
                    info: dict[str, Any] = {
                        "kind": protocol.ERR_TIMEOUT,
                        "type": "TimeoutError",
                        "traceback": "",
                        "message": f"the call ran longer than its timeout of {t.timeout:g} s and its worker was killed",
                        "timeout": t.timeout,
                    }
                elif reason == "shutdown":
                    info = _internal("the runtime shut down while the call was running")
                elif reason == "memory":
                    info = {
                        "kind": protocol.ERR_CRASHED,
                        "type": "WorkerCrashed",
                        "traceback": "",
                        "message": f"the call ran out of memory: its worker process used {w.rss / 2**20:.0f} MB, above "
                        f"the limit of {self.memory_limit / 2**20:.0f} MB per worker (runtime_memory), and was killed",
                        "exitcode": returncode,
                    }
                else:
                    info = {
                        "kind": protocol.ERR_CRASHED,
                        "type": "WorkerCrashed",
                        "traceback": "",
                        "message": f"the worker process running the call {describe_exit(returncode)}",
                        "exitcode": returncode,
                    }
                todo = t.todo()
                if state == ipc.STATE_PREPARING:
                    charged = todo
                    info["message"] += " while unpickling the function or the arguments"
                else:
                    # The item it was running, or reporting: unless that outcome already arrived.
                    charged = [index] if index in todo else []
                t.fail_items(charged, info, self.replica)
                if t.remaining > 0 and reason != "shutdown":
                    requeue.append(t)
                else:
                    if t.remaining > 0:
                        t.fail_items(t.todo(), info, self.replica)
                    t.finish()
            else:
                if reason != "cancel":  # killed for someone else's cancelled call: not its fault
                    t.requeues += 1
                if t.requeues > MAX_REQUEUES or reason == "shutdown":
                    t.fail_items(
                        t.todo(),
                        {
                            "kind": protocol.ERR_CRASHED,
                            "type": "WorkerCrashed",
                            "traceback": "",
                            "message": f"worker processes died {t.requeues} times before reaching this call "
                            f"(last one {describe_exit(returncode)})",
                        },
                        self.replica,
                    )
                    t.finish()
                else:
                    requeue.append(t)
        w.inflight.clear()
        self.queue.extendleft(reversed(requeue))
        if requeue and self.idle:
            self._dispatch()
        if reason not in (None, "cancel", "timeout", "shutdown", "memory", "recycle"):
            log.warning("worker %s %s (%s)", w.pid, describe_exit(returncode), reason)
        elif reason is None:
            log.warning("worker %s %s", w.pid, describe_exit(returncode))

    async def _watchdog(self) -> None:
        """Kill workers whose current item has run past its task's timeout, or that use more
        memory than they may."""
        page = self._page
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL)
            now = time.monotonic()  # system-wide on Linux and macOS, like the workers' clock
            if self.memory_limit:
                for w in list(self.workers):
                    rss = _resident(w.pid, page)
                    if rss > self.memory_limit and w.kill_reason is None:
                        w.rss = rss
                        log.warning("worker %s uses %d MB, above its limit: killing it", w.pid, rss >> 20)
                        w.kill("memory")
            for w in list(self.workers):
                if not w.inflight or w.kill_reason is not None:
                    continue
                now_at = w.progress.read()
                if now_at is None:  # writing progress as fast as it can: not stuck
                    continue
                tid, _index, started, state = now_at
                head = w.inflight[0]
                if started < head.dispatched - 1.0:
                    continue  # not a time of this task (a record from before it): never kill on it
                if tid != head.id or state == ipc.STATE_IDLE:
                    continue
                limit = head.timeout if state == ipc.STATE_RUNNING else head.timeout + 60.0
                if now - started > limit:
                    w.kill("timeout")
