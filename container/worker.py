"""A worker process: runs calls handed over by its replica's server, one at a time.

Started by the server as ``python -m acx_server.worker <socket fd> <progress fd> <server pid>``. It reads
task messages from the socket, unpickles the function (cached by content hash) and the items,
runs each item with stdout/stderr captured, and sends outcomes back in groups. Before each
item it writes (task, item, start time) to the shared progress block, so the server can kill
it on timeout or charge a crash to the right item. It exits when the socket closes, and the
kernel kills it if its server dies (PR_SET_PDEATHSIG; where that is missing, as on macOS, a thread
watching its parent does), so no worker outlives its replica.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle

from async_ca_exec import protocol
from async_ca_exec.serialize import PROTOCOL as _PROTOCOL
from async_ca_exec.serialize import is_plain

from . import ipc

#: Send the outcomes of finished items of a batch at least this often (seconds), so a crash
#: later in the batch re-runs at most this much already finished work.
FLUSH_INTERVAL = 0.02
#: Captured output kept per call; the rest is cut with a note.
MAX_LOG_CHARS = 1 << 20
#: A running call's output goes to the client at least this often (seconds), whole lines.
LOG_INTERVAL = 0.1
MAX_TRACEBACK_CHARS = 100_000
MAX_MESSAGE_CHARS = 10_000
_FN_CACHE_LIMIT = 64


#: Without a parent-death signal: seconds between looks at whether the server is still there.
PARENT_POLL = 0.25


def _set_parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when the server that started it dies; False where
    there is no such call (macOS, a libc without prctl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        return int(libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)) == 0
    except (OSError, AttributeError, TypeError, ValueError):
        return False


def _watch_parent(server_pid: int) -> None:
    """The portable stand-in for the death signal: a daemon thread that ends the process once
    its server is gone (re-parented: getppid() changes), even while a call holds the main thread."""

    def watch() -> None:
        while os.getppid() == server_pid:
            time.sleep(PARENT_POLL)
        os._exit(1)

    threading.Thread(target=watch, name="acx-parent-watch", daemon=True).start()


def _qualname(tp: type) -> str:
    mod = getattr(tp, "__module__", None) or "builtins"
    return f"{mod}.{tp.__qualname__}"


def _format_tb(exc: BaseException) -> str:
    # Drop this module's own frame so the traceback starts in the user's function.
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:  # noqa: BLE001 - a hostile __str__/__repr__
        text = "".join(traceback.format_tb(tb)) + f"{_qualname(type(exc))}: <str() failed>\n"
    if len(text) > MAX_TRACEBACK_CHARS:
        text = text[: MAX_TRACEBACK_CHARS // 2] + "\n... traceback cut ...\n" + text[-MAX_TRACEBACK_CHARS // 2 :]
    return text


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_safe_str(exc)}"


def _safe_str(exc: BaseException) -> str:
    # str() runs the user's __str__, which can itself raise.
    try:
        return str(exc)
    except BaseException as inner:  # noqa: BLE001
        return f"<str() of the exception failed: {type(inner).__name__}>"


def _error_info(kind: str, exc: BaseException, message: str | None = None) -> dict[str, Any]:
    msg = message if message is not None else _safe_str(exc)
    return {
        "kind": kind,
        "type": _qualname(type(exc)),
        "message": msg[:MAX_MESSAGE_CHARS],
        "traceback": _format_tb(exc),
    }


class _Capture(io.TextIOBase):
    """A text stream that keeps what is written, up to a limit per call.

    Written from the call's thread (its prints) and taken from the log flusher's thread too:
    a lock keeps every character in exactly one taken part.
    """

    def __init__(self, written: list[int] | None = None) -> None:
        self._parts: list[str] = []
        self.size = 0  # characters waiting to be taken
        self.total = 0  # characters written during the current call
        self.cut = False
        self._lock = threading.Lock()
        #: Set to 1 on every write (shared by stdout's and stderr's captures), so the call loop
        #: looks at the captures only after a call that printed.
        self.written = written if written is not None else [0]

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if not s:
            return 0
        self.written[0] = 1
        with self._lock:
            if self.total < MAX_LOG_CHARS:
                self._parts.append(s[: MAX_LOG_CHARS - self.total])
                self.size += min(len(s), MAX_LOG_CHARS - self.total)
                if self.total + len(s) > MAX_LOG_CHARS:
                    self.cut = True
            self.total += len(s)
        return len(s)

    def take(self, *, whole_lines: bool = False) -> str:
        """What was written since the last take (with ``whole_lines``, up to its last newline)."""
        with self._lock:
            text = "".join(self._parts)
            rest = ""
            if whole_lines:
                end = text.rfind("\n") + 1
                text, rest = text[:end], text[end:]
            elif self.cut:
                text += f"\n[output cut at {MAX_LOG_CHARS} characters]\n"
                self.cut = False
            self._parts = [rest] if rest else []
            self.size = len(rest)
            return text

    def new_call(self) -> None:
        with self._lock:
            self.total = self.size


class Worker:
    def __init__(self, sock: socket.socket, progress: ipc.Progress) -> None:
        self.sock = sock
        self.rfile = sock.makefile("rb", buffering=1 << 16)
        self.progress = progress
        self.fns: dict[bytes, Callable[..., Any]] = {}
        self.pid = os.getpid()
        self.replica = os.environ.get("ACX_REPLICA_ID", "")
        self.out = _Capture()
        self.err = _Capture(self.out.written)
        self._send_lock = threading.Lock()
        self._log_lock = threading.Lock()
        #: (task id, item) of the call running now, for the log flusher; None between calls.
        self.current: tuple[int, int] | None = None
        os.register_at_fork(after_in_child=self._after_fork)
        threading.Thread(target=self._stream_logs, name="acx-log-flusher", daemon=True).start()

    def _after_fork(self) -> None:
        # A call that forks: the child has no flusher thread, and a lock it held is not held.
        self._send_lock = threading.Lock()
        self._log_lock = threading.Lock()
        self.out._lock = threading.Lock()
        self.err._lock = threading.Lock()

    # -- io --------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def _stream_logs(self) -> None:
        """Send a running call's whole lines of output every LOG_INTERVAL, so its prints reach
        the client while it runs (what remains goes when the call ends)."""
        while True:
            time.sleep(LOG_INTERVAL)
            with self._log_lock:  # the call cannot end (and send the rest) while its lines go
                current = self.current
                if current is None:
                    continue
                for stream, cap in ((protocol.STDOUT, self.out), (protocol.STDERR, self.err)):
                    if cap.size:
                        text = cap.take(whole_lines=True)
                        if text:
                            try:
                                self._send_log(current[0], current[1], stream, text)
                            except OSError:  # the server went away: the main loop notices
                                return

    def read_message(self) -> tuple[int, memoryview] | None:
        hdr = self.rfile.read(ipc.HDR.size)
        if len(hdr) < ipc.HDR.size:
            return None
        size, mtype = ipc.HDR.unpack(hdr)
        payload = self.rfile.read(size - 1)
        if len(payload) < size - 1:
            return None
        return mtype, memoryview(payload)

    # -- main loop -------------------------------------------------------------------

    def serve(self) -> None:
        self.send(ipc.message(ipc.M_READY, json.dumps({"pid": self.pid}).encode()))
        while True:
            msg = self.read_message()
            if msg is None:
                return
            mtype, payload = msg
            if mtype == ipc.M_TASK:
                self.run_task(payload)
            else:  # pragma: no cover - server bug
                raise RuntimeError(f"unexpected message type {mtype}")

    def run_task(self, payload: memoryview) -> None:
        task_id, first, n, flags, nforget, nskip, fn_hash, fn_len = ipc.TASK_HEAD.unpack_from(payload)
        off = ipc.TASK_HEAD.size
        for _ in range(nforget):
            self.fns.pop(bytes(payload[off : off + 32]), None)
            off += 32
        skip = set()
        for _ in range(nskip):
            skip.add(ipc.U32.unpack_from(payload, off)[0])
            off += 4
        fn_bytes = payload[off : off + fn_len]
        off += fn_len
        items_bytes = payload[off:]
        self.progress.set(task_id, first, time.monotonic(), ipc.STATE_PREPARING)
        todo = [i for i in range(first, n) if i not in skip]
        if not todo:  # nothing left to run: just say the task is done
            self.send(ipc.message(ipc.M_OUTCOME, ipc.TASK_OUTCOME.pack(task_id, first, 0, ipc.OUTCOME_LAST)))
            return

        fn = self.fns.get(fn_hash)
        if flags & ipc.FLAG_HAS_FN:
            try:
                fn = pickle.loads(fn_bytes)
            except BaseException as exc:  # noqa: BLE001 - any failure is reported, not fatal
                # Not cached: the server sends the function again with its next task here.
                self._fail_all(
                    task_id,
                    todo,
                    protocol.ERR_SERIALIZATION,
                    exc,
                    f"the function could not be unpickled on the worker: {_describe(exc)}",
                    ipc.OUTCOME_FN_FAILED,
                )
                return
            if len(self.fns) >= _FN_CACHE_LIMIT:
                self.fns.pop(next(iter(self.fns)))
            self.fns[fn_hash] = fn
        if fn is None:
            error = RuntimeError("the server referred to a function this worker does not have")
            self._fail_all(task_id, todo, protocol.ERR_INTERNAL, error, None, ipc.OUTCOME_FN_FAILED)
            return
        try:
            items = pickle.loads(items_bytes)
            if not isinstance(items, list) or len(items) != n:
                raise ValueError(f"expected a list of {n} (args, kwargs) pairs")
        except BaseException as exc:  # noqa: BLE001
            self._fail_all(
                task_id,
                todo,
                protocol.ERR_SERIALIZATION,
                exc,
                f"the arguments could not be unpickled on the worker: {_describe(exc)}",
            )
            return
        self._run_items(task_id, fn, items, todo)

    def _run_items(self, task_id: int, fn: Callable[..., Any], items: list[Any], todo: list[int]) -> None:
        group: list[int] = []
        values: list[Any] = []
        errors: dict[int, tuple[dict[str, Any], BaseException | None]] = {}
        t0s: list[float] = []
        t1s: list[float] = []
        clock = time.time
        mono = time.monotonic
        cpu_clock = time.process_time
        last_flush = clock()
        group_cpu = cpu_clock()
        set_progress, running = self.progress.set, ipc.STATE_RUNNING
        # Progress.set inlined (the seqlock's three writes): on a batch of fast calls the
        # loop's own cost is what counts.
        pack_progress, progress_mm, words = ipc.PROGRESS.pack_into, self.progress.mm, self.progress.words
        out, err = self.out, self.err
        real_out, real_err = sys.stdout, sys.stderr
        last_pos = len(todo) - 1
        written = out.written
        written[0] = 1  # output from before this task: counted afresh below
        sys.stdout, sys.stderr = out, err
        try:
            for pos, i in enumerate(todo):
                t0 = clock()
                seq = words[0] | 1
                words[0] = seq
                pack_progress(progress_mm, 8, task_id, i, mono(), running)
                words[0] = seq + 1
                if written[0]:  # the last call (or a thread) wrote: count this one's output afresh
                    written[0] = 0
                    out.new_call()
                    err.new_call()
                self.current = (task_id, i)
                try:
                    args, kwargs = items[i]
                    value = fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - the user's exception is the result
                    value = None
                    errors[i] = (_error_info(protocol.ERR_USER, exc), exc)
                t1 = clock()
                if written[0]:  # the log flusher may be sending this call's lines: not in the middle
                    with self._log_lock:
                        self.current = None
                else:  # nothing printed: the flusher has nothing of this call to send
                    self.current = None
                items[i] = None  # let arguments go as soon as they are used
                if written[0] and (out.size or err.size or out.cut or err.cut):
                    self._send_logs(task_id, i)
                group.append(i)
                values.append(value)
                t0s.append(t0)
                t1s.append(t1)
                # Outcomes cover contiguous items: an index skipped (already answered, or charged
                # with a crash) ends a group, as do the last item and the flush interval.
                if pos == last_pos or todo[pos + 1] != i + 1 or t1 - last_flush >= FLUSH_INTERVAL:
                    now_cpu = cpu_clock()
                    self._flush(task_id, group, values, errors, t0s, t1s, now_cpu - group_cpu, pos == last_pos)
                    group, values, errors, t0s, t1s = [], [], {}, [], []
                    last_flush = clock()
                    group_cpu = cpu_clock()
        finally:
            self.current = None
            sys.stdout, sys.stderr = real_out, real_err
        set_progress(task_id, todo[-1], mono(), ipc.STATE_IDLE)

    def _send_logs(self, task_id: int, i: int) -> None:
        for stream, cap in ((protocol.STDOUT, self.out), (protocol.STDERR, self.err)):
            if cap.size or cap.cut:
                text = cap.take()
                if text:
                    self._send_log(task_id, i, stream, text)

    def _send_log(self, task_id: int, i: int, stream: int, text: str) -> None:
        self.send(ipc.message(ipc.M_LOG, ipc.TASK_LOG.pack(task_id, i, stream), text.encode("utf-8", "replace")))

    def _fail_all(
        self, task_id: int, todo: list[int], kind: str, exc: BaseException, message: str | None, flags: int = 0
    ) -> None:
        info = _error_info(kind, exc, message)
        # Contiguous runs only: the skip list may have punched holes.
        runs: list[list[int]] = [[todo[0]]]
        for i in todo[1:]:
            if i == runs[-1][-1] + 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        now = time.time()
        for k, run in enumerate(runs):
            errs: dict[int, tuple[dict[str, Any], BaseException | None]] = {i: (info, None) for i in run}
            last = k == len(runs) - 1
            self._flush(task_id, run, [None] * len(run), errs, [now] * len(run), [now] * len(run), 0.0, last, flags)

    def _flush(
        self,
        task_id: int,
        group: list[int],
        values: list[Any],
        errors: dict[int, tuple[dict[str, Any], BaseException | None]],
        t0s: list[float],
        t1s: list[float],
        cpu: float,
        last: bool,
        flags: int = 0,
    ) -> None:
        self.progress.set(task_id, group[-1], time.monotonic(), ipc.STATE_REPORTING)
        first = group[0]
        # CPU time is read once per group and shared out by wall time within it: a clock
        # read per item would cost more than the calls of a fast batch.
        walls = [b - a for a, b in zip(t0s, t1s, strict=True)]
        total = sum(walls)
        cpus = [cpu * w / total for w in walls] if total > 0 else [cpu / len(group)] * len(group)
        exc_blobs: dict[int, bytes] = {}
        for i, (info, exc) in errors.items():
            if exc is None:
                continue
            try:
                exc_blobs[i] = cloudpickle.dumps(exc)
            except BaseException as pexc:  # noqa: BLE001
                info["unpicklable"] = f"{type(pexc).__name__}: {pexc}"
        timing = (t0s, t1s, cpus)
        try:
            if not exc_blobs and is_plain(values):  # the C pickler: the same bytes, no Pickler to set up
                blob = pickle.dumps((values, exc_blobs, timing), _PROTOCOL)
            else:
                blob = cloudpickle.dumps((values, exc_blobs, timing))
        except BaseException:  # noqa: BLE001 - find the culprit(s), fail only those items
            for k, v in enumerate(values):
                try:
                    cloudpickle.dumps(v)
                except BaseException as pexc:  # noqa: BLE001
                    values[k] = None
                    errors[first + k] = (
                        _error_info(
                            protocol.ERR_SERIALIZATION,
                            pexc,
                            f"the result (a {_qualname(type(v))}) could not be pickled on the worker: "
                            f"{type(pexc).__name__}: {pexc}; return plain data or a picklable object",
                        ),
                        None,
                    )
            blob = cloudpickle.dumps((values, exc_blobs, timing))
        meta: dict[str, Any] = {
            "first": first,
            "n": len(group),
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024),
            "pid": self.pid,
            "replica": self.replica,
        }
        if errors:
            meta["errors"] = {str(i): info for i, (info, _exc) in errors.items()}
        body = protocol.encode_outcome_payload(meta, blob)
        self.send(
            ipc.message(
                ipc.M_OUTCOME, ipc.TASK_OUTCOME.pack(task_id, first, len(group), flags | (ipc.OUTCOME_LAST if last else 0)), body
            )
        )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        raise SystemExit("usage: python -m acx_server.worker <socket fd> <progress fd> <server pid>")
    armed = _set_parent_death_signal()
    # Under memory pressure (a container's limit), the kernel should kill a worker, whose
    # call then fails alone, rather than the server that all calls of the replica go through.
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("500")
    except OSError:
        pass
    # A server that died before the death signal was armed left us re-parented: leave too.
    if os.getppid() != int(argv[2]):
        raise SystemExit(0)
    if not armed:
        _watch_parent(int(argv[2]))
    # Ctrl-C in a terminal is the server's business; it stops workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    progress = ipc.Progress(int(argv[1]))
    try:
        Worker(sock, progress).serve()
    except (BrokenPipeError, ConnectionResetError):
        pass


if __name__ == "__main__":
    main()
