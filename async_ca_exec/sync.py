"""FunctionExecutor: the synchronous, Lithops-compatible face of :class:`AsyncExecutor`.

An :class:`AsyncExecutor` runs on a private event loop in a background thread owned by the
FunctionExecutor; every method hands it a coroutine and waits for the answer. So the same
code works in a plain script, in a thread, and straight from a coroutine or a notebook cell
whose own loop is running (it never calls ``asyncio.run`` inside a running loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

from . import interrupt
from .errors import ConfigError
from .executor import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, AsyncExecutor
from .futures import CallFuture
from .progress import Progress

#: Lithops' ``wait`` constants (``return_when`` is a percentage of the futures there).
ALWAYS = 0
ANY_COMPLETED = -1
LITHOPS_ALL_COMPLETED = 100

T = TypeVar("T")
_RESERVED = ("storage", "ibm_cos", "rabbitmq")


class _Flag(int):
    """A bool that can also be called: ``fut.done`` (Lithops) and ``fut.done()`` (stdlib) both work."""

    def __call__(self) -> bool:
        return bool(self)

    def __repr__(self) -> str:
        return repr(bool(self))


class _LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="async_ca_exec-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T] | Callable[[], Coroutine[Any, Any, T]], timeout: float | None = None) -> T:
        """Run ``coro`` (or what ``coro()`` makes: then a Ctrl-C cannot fall between making the
        coroutine and handing it over) on the loop and wait for it."""
        fut: concurrent.futures.Future[T] | None = None
        made: Coroutine[Any, Any, T] | None = None
        try:
            made = coro if inspect.iscoroutine(coro) else coro()  # type: ignore[operator]
            if threading.current_thread() is self.thread:
                raise RuntimeError("FunctionExecutor methods cannot be called from inside its own calls' callbacks")
            fut = asyncio.run_coroutine_threadsafe(made, self.loop)
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            if fut is None or fut.done():  # the coroutine's own TimeoutError (the same class on 3.11+)
                raise
            fut.cancel()
            raise TimeoutError(f"no answer within {timeout} s") from None
        except BaseException:
            if fut is not None:
                fut.cancel()  # Ctrl-C while waiting cancels what was being waited for
            elif made is not None:
                made.close()  # never handed over: not left unawaited
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
        if not self.thread.is_alive():
            self.loop.close()


def _shutdown(lt: _LoopThread, ex: AsyncExecutor) -> None:
    """Close the executor and stop the loop; run by close(), garbage collection or exit."""
    if lt.thread.is_alive() and not lt.loop.is_closed():
        # Restoring a pre-warmed app is an ARM long-running operation: give it time (it costs money otherwise).
        timeout = 300 if ex._warm_pending else 30
        try:
            asyncio.run_coroutine_threadsafe(ex.aclose(), lt.loop).result(timeout)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
    lt.stop()


class ResponseFuture:
    """A call's future as Lithops users know it: ``result()``, ``done``, ``ready``, ``stats``..."""

    __slots__ = ("__weakref__", "_fut", "_lt", "_owner", "_produce_output", "_read")

    def __init__(self, fut: CallFuture, lt: _LoopThread, owner: FunctionExecutor | None = None) -> None:
        self._fut = fut
        self._lt = lt
        #: The executor that made it (weakly: a future kept does not keep its executor open).
        self._owner = weakref.ref(owner) if owner is not None else None
        self._read = False
        self._produce_output = True

    @property
    def call_id(self) -> str:
        return self._fut.call_id

    @property
    def done(self) -> _Flag:
        return _Flag(self._fut.done())

    @property
    def ready(self) -> _Flag:
        return _Flag(self._fut.done())

    @property
    def running(self) -> _Flag:
        return _Flag(not self._fut.done())

    @property
    def success(self) -> _Flag:
        f = self._fut
        return _Flag(f.done() and not f.cancelled() and f.exception() is None)

    @property
    def error(self) -> _Flag:
        f = self._fut
        return _Flag(f.done() and not f.cancelled() and f.exception() is not None)

    def cancelled(self) -> bool:
        return self._fut.cancelled()

    def cancel(self) -> bool:
        if self._fut.done():
            return False
        self._lt.loop.call_soon_threadsafe(self._fut.cancel)
        return True

    @property
    def stats(self) -> dict[str, Any]:
        return self._fut.stats

    @property
    def logs(self) -> str:
        return self._fut.logs

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._fut.exception()

    def result(self, throw_except: bool = True, timeout: float | None = None) -> Any:
        """The call's result; its exception is raised (or ``None`` returned with ``throw_except=False``)."""
        self._wait(timeout)
        f = self._fut
        if f.cancelled() or f.exception() is not None:
            if throw_except:
                return f.result()  # raises
            return None
        return f.result()

    def _wait(self, timeout: float | None) -> None:
        if not self._fut.done():
            self._lt.run(_wait_one(self._fut, timeout))

    def __repr__(self) -> str:
        return f"<ResponseFuture {self._fut.call_id} {'done' if self._fut.done() else 'running'}>"


async def _wait_one(fut: CallFuture, timeout: float | None) -> None:
    _done, pending = await asyncio.wait([fut], timeout=timeout)
    if pending:
        raise TimeoutError(f"call {fut.call_id} did not finish within {timeout} s")


def _lithops_item(data: Any, extra_args: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(data, tuple):
        if extra_args is not None:
            if not isinstance(extra_args, tuple):
                raise ValueError("extra_args must be a tuple when the items are tuples")
            data = data + extra_args
        return data, {}
    if isinstance(data, dict):
        kwargs = dict(data)
        if extra_args is not None:
            if not isinstance(extra_args, dict):
                raise ValueError("extra_args must be a dict when the items are dicts")
            kwargs.update(extra_args)
        return (), kwargs
    if extra_args is None:
        return (data,), {}
    if isinstance(extra_args, dict):
        return (data,), dict(extra_args)
    return (data, *extra_args), {}


def _reserved_params(fn: Callable[..., Any]) -> tuple[bool, list[str]]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False, []
    return "id" in params, [p for p in _RESERVED if p in params]


class FunctionExecutor:
    """Lithops' ``FunctionExecutor``, on top of :class:`AsyncExecutor`.

    >>> fexec = FunctionExecutor()                       # doctest: +SKIP
    >>> fexec.call_async(lambda x: x + 7, 3)
    >>> fexec.get_result()
    10

    Takes :class:`AsyncExecutor`'s keyword arguments, plus Lithops' ``config_file``,
    ``mode`` and ``monitoring``; other keyword arguments set keys of the backend's config
    section (``worker_processes=2``), as in Lithops.
    """

    def __init__(
        self,
        *,
        backend: str | None = None,
        runtime: str | None = None,
        runtime_memory: int | None = None,
        timeout: float | None = None,
        max_concurrency: int | None = None,
        retries: int | None = None,
        config: str | Path | dict[str, Any] | None = None,
        storage: str | None = None,
        credential: Any = None,
        progress: bool | None = None,
        log_level: str | bool | None = None,
        keep_data: bool | None = None,
        config_file: str | Path | None = None,
        mode: str | None = None,
        monitoring: str | None = None,
        **backend_options: Any,
    ) -> None:
        if config is not None and config_file is not None:
            raise ConfigError("give config= or config_file=, not both")
        if backend is None and mode in ("localhost", "local"):
            backend = "local"
        self._ex = AsyncExecutor(
            backend=backend,
            runtime=runtime,
            runtime_memory=runtime_memory,
            timeout=timeout,
            max_concurrency=max_concurrency,
            retries=retries,
            config=config if config is not None else config_file,
            storage=storage,
            credential=credential,
            progress=progress,
            log_level=log_level if isinstance(log_level, str) else None,
            keep_data=keep_data,
        )
        if backend_options:
            section = self._ex.config.backend_section
            for key, value in backend_options.items():
                if key not in type(section).model_fields:
                    raise ConfigError(
                        f"unknown argument {key!r}: not an executor argument nor a key of the "
                        f"{self._ex.config.backend} backend's section ({', '.join(sorted(type(section).model_fields))})"
                    )
                try:
                    setattr(section, key, value)
                except ValueError as exc:
                    raise ConfigError(f"{key}={value!r}: {exc}") from None
        self.config = self._ex.config
        self.executor_id = self._ex.executor_id
        self._lt = _LoopThread()
        self.futures: list[ResponseFuture] = []
        self.last_call: str | None = None
        self._finalizer = weakref.finalize(self, _shutdown, self._lt, self._ex)

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> FunctionExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the runtime's processes and the background loop; idempotent."""
        self._finalizer()

    def _run(self, coro: Coroutine[Any, Any, T] | Callable[[], Coroutine[Any, Any, T]], timeout: float | None = None) -> T:
        if not self._finalizer.alive:
            if inspect.iscoroutine(coro):
                coro.close()
            raise RuntimeError("this FunctionExecutor is closed; create a new one")
        return self._lt.run(coro, timeout)

    def _wrap(self, futures: list[CallFuture]) -> list[ResponseFuture]:
        wrapped = [ResponseFuture(f, self._lt, self) for f in futures]
        self.futures.extend(wrapped)
        return wrapped

    # -- calls -----------------------------------------------------------------------

    def call_async(
        self,
        func: Callable[..., Any],
        data: Any,
        extra_env: dict[str, str] | None = None,
        runtime_memory: int | None = None,
        timeout: float | None = None,
        include_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
    ) -> ResponseFuture:
        """Run ``func(data)`` (tuple: positional args, dict: keyword args) once; returns its future."""
        futures = self._map(func, [data], None, 1, timeout, extra_env, kind="A")
        self.last_call = "call_async"
        return futures[0]

    def map(
        self,
        map_function: Callable[..., Any],
        map_iterdata: Iterable[Any],
        chunksize: int | None = None,
        extra_args: Any = None,
        extra_env: dict[str, str] | None = None,
        runtime_memory: int | None = None,
        obj_chunk_size: int | None = None,
        obj_chunk_number: int | None = None,
        obj_newline: str = "\n",
        timeout: float | None = None,
        include_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        prewarm: bool = False,
        hedge: bool | float = False,
    ) -> list[ResponseFuture]:
        """One call per item; returns the futures (collect them with :meth:`get_result`).

        ``prewarm=True`` (Azure): as :meth:`AsyncExecutor.map`'s; the warmth is restored once
        every one of these calls is done. ``hedge``: straggler hedging for idempotent
        functions, as in :meth:`AsyncExecutor.map`."""
        futures = self._map(
            map_function, map_iterdata, extra_args, chunksize, timeout, extra_env, kind="M",
            obj=(obj_chunk_size, obj_chunk_number, obj_newline), prewarm=prewarm, hedge=hedge,
        )  # fmt: skip
        self.last_call = "map"
        return futures

    def _map(
        self,
        fn: Callable[..., Any],
        iterdata: Iterable[Any],
        extra_args: Any,
        chunksize: int | None,
        timeout: float | None,
        extra_env: dict[str, str] | None,
        *,
        kind: str,
        obj: tuple[int | None, int | None, str] = (None, None, "\n"),
        prewarm: bool = False,
        hedge: bool | float = False,
    ) -> list[ResponseFuture]:
        if isinstance(iterdata, (str, bytes, dict)):
            iterdata = [iterdata]
        wants_id, reserved = _reserved_params(fn)
        if extra_env:
            fn = WithEnv(fn, extra_env)
        if reserved:
            raise NotImplementedError(
                f"the reserved parameter(s) {', '.join(reserved)} of {getattr(fn, '__name__', fn)} need "
                "storage, which is not available in this release yet"
            )
        counter = iter(range(1 << 62))

        def to_item(x: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
            args, kwargs = _lithops_item(x, extra_args)
            i = next(counter)
            if wants_id and "id" not in kwargs:
                kwargs["id"] = i
            return args, kwargs

        async def submit() -> list[CallFuture]:
            ex = self._ex
            items, convert = await ex._objects(fn, iterdata, to_item, *obj)
            size = ex._chunksize(chunksize or None, hedge)
            warming = ex._prewarm_begin(prewarm, items, size)
            try:
                futures = await ex._map_futures(
                    fn, items, to_item=convert, chunksize=size, timeout=timeout, kind=kind, hedge=hedge
                )
            except BaseException:
                ex._prewarm_end(warming)
                raise
            ex._prewarm_end_when_done(warming, futures)
            return futures

        try:
            return self._wrap(self._run(submit))
        except KeyboardInterrupt as exc:
            interrupt.note(exc, "the calls were being sent (the runtime may still have been starting); "
                                "none is left running once the executor closes")  # fmt: skip
            raise

    def map_reduce(
        self,
        map_function: Callable[..., Any],
        map_iterdata: Iterable[Any],
        reduce_function: Callable[..., Any],
        chunksize: int | None = None,
        extra_args: Any = None,
        extra_args_reduce: Any = None,
        extra_env: dict[str, str] | None = None,
        map_runtime_memory: int | None = None,
        reduce_runtime_memory: int | None = None,
        timeout: float | None = None,
        obj_chunk_size: int | None = None,
        obj_chunk_number: int | None = None,
        obj_newline: str = "\n",
        obj_reduce_by_key: bool = False,
        spawn_reducer: int = 20,
        include_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        prewarm: bool = False,
    ) -> list[ResponseFuture]:
        """Map, then one reducer called with the list of map results; get_result returns its
        value. ``prewarm``: as in :meth:`map` (for the map step)."""
        if obj_reduce_by_key:
            raise NotImplementedError("obj_reduce_by_key is not available in this release yet")
        map_futs = self._map(
            map_function, map_iterdata, extra_args, chunksize, timeout, extra_env, kind="M",
            obj=(obj_chunk_size, obj_chunk_number, obj_newline), prewarm=prewarm,
        )  # fmt: skip
        for f in map_futs:
            f._read = True
            f._produce_output = False
        ex = self._ex

        async def reduce() -> CallFuture:
            results = await asyncio.gather(*(f._fut for f in map_futs))
            args = (results, *extra_args_reduce) if isinstance(extra_args_reduce, tuple) else (results,)
            kwargs = extra_args_reduce if isinstance(extra_args_reduce, dict) else {}
            invoker = ex._ensure_started()
            job = ex._new_job(reduce_function, timeout, "R")
            (fut,) = ex._submit_items(invoker, job, [(args, kwargs)])
            return fut

        async def spawn() -> CallFuture:
            loop = asyncio.get_running_loop()
            outer = CallFuture(loop, _NullJob(f"{ex.executor_id}-reduce"), 0, time.time())  # type: ignore[arg-type]

            async def chain() -> None:
                try:
                    inner = await reduce()
                    res = await inner
                except BaseException as exc:  # noqa: BLE001 - becomes the reducer's outcome
                    if not outer.done():
                        outer.set_exception(exc)
                    return
                outer._worker = inner._worker
                outer._logs = inner._logs
                outer._received, outer._sent, outer._attempts = inner._received, inner._sent, inner._attempts
                outer.call_id = inner.call_id
                if not outer.done():
                    outer.set_result(res)

            task = loop.create_task(chain())
            outer.add_done_callback(lambda _f: task.cancel() if not task.done() else None)
            return outer

        (red,) = self._wrap([self._run(spawn())])
        self.last_call = "map_reduce"
        return [*map_futs, red]

    # -- pre-warming -----------------------------------------------------------------

    def warm(self, replicas: int, *, lease: float = 3600.0) -> int:
        """:meth:`AsyncExecutor.warm`: keep at least ``replicas`` replicas running until
        :meth:`close` (Azure: the app's minReplicas); returns the minimum now in effect."""
        return self._run(self._ex.warm(replicas, lease=lease))

    # -- waiting and results ---------------------------------------------------------

    def _select(self, fs: ResponseFuture | Iterable[ResponseFuture] | None) -> list[ResponseFuture]:
        if fs is None:
            return list(self.futures)
        if isinstance(fs, ResponseFuture):
            return [fs]
        return list(fs)

    def wait(
        self,
        fs: ResponseFuture | Iterable[ResponseFuture] | None = None,
        throw_except: bool = True,
        return_when: int | str = LITHOPS_ALL_COMPLETED,
        download_results: bool = False,
        timeout: float | None = None,
        threadpool_size: int = 64,
        wait_dur_sec: float | None = None,
        show_progressbar: bool = True,
    ) -> tuple[list[ResponseFuture], list[ResponseFuture]]:
        """``(done, not_done)``. ``return_when``: ALWAYS, ANY_COMPLETED, ALL_COMPLETED, a
        percentage (Lithops), or the stdlib's FIRST_COMPLETED / FIRST_EXCEPTION / ALL_COMPLETED."""
        futures = self._select(fs)
        if not futures:
            return [], []
        need, first_exception = wait_need(return_when, len(futures)), return_when == FIRST_EXCEPTION
        inner = [f._fut for f in futures]
        if need:
            self._run_waiting("wait", inner, need, first_exception, timeout, show_progressbar)
        done = [f for f in futures if f._fut.done()]
        not_done = [f for f in futures if not f._fut.done()]
        if throw_except:
            for f in done:
                if not f._fut.cancelled() and f._fut.exception() is not None:
                    f._read = True
                    raise f._fut.exception()  # type: ignore[misc]
        return done, not_done

    def get_result(
        self,
        fs: ResponseFuture | Iterable[ResponseFuture] | None = None,
        throw_except: bool = True,
        timeout: float | None = None,
        threadpool_size: int = 64,
        wait_dur_sec: float | None = None,
        show_progressbar: bool = True,
    ) -> Any:
        """Results of ``fs``, or of every future not yet collected: one value after a single
        ``call_async``, a list after a ``map``; errors are raised unless ``throw_except=False``."""
        if fs is None:
            futures = [f for f in self.futures if not f._read and f._produce_output]
        else:
            futures = [f for f in self._select(fs) if f._produce_output]
        if futures:
            inner = [f._fut for f in futures]
            self._run_waiting("get_result", inner, len(inner), False, timeout, show_progressbar)
        out = []
        for f in futures:
            value = f.result(throw_except=throw_except)
            f._read = True
            out.append(value)
        if len(out) == 1 and self.last_call != "map":
            return out[0]
        return out

    def _run_waiting(
        self, desc: str, futures: list[CallFuture], need: int, first_exception: bool, timeout: float | None, bar: bool
    ) -> None:
        try:
            self._run(lambda: self._waiting(desc, futures, need, first_exception, timeout, bar))
        except KeyboardInterrupt as exc:  # Ctrl-C in the waiting thread: say how far the calls got
            finished = sum(f.done() for f in futures)
            interrupt.note(exc, f"{desc}() stopped waiting with {finished} of {len(futures)} calls finished")
            raise

    async def _waiting(
        self, desc: str, futures: list[CallFuture], need: int, first_exception: bool, timeout: float | None, bar: bool
    ) -> None:
        """:func:`_wait_count` under a progress bar (Lithops' ``show_progressbar``, within the
        executor's ``progress`` setting: only on a terminal or in Jupyter unless it says so)."""
        setting = self.config.lithops.progress if bar else False
        if all(f.done() for f in futures):
            setting = False  # nothing to wait for: no bar

        def counts() -> tuple[int, int, int, int | None]:
            done = failed = 0
            for f in futures:
                if f.done():
                    done += 1
                    failed += not f.cancelled() and f.exception() is not None
            return done, failed, len(futures) - done, len(futures)

        async with Progress(desc, counts, setting):
            await _wait_count(futures, need, first_exception, timeout)

    # -- reporting -------------------------------------------------------------------

    def job_summary(self, cloud_objects_n: int = 0) -> dict[str, Any]:
        return self._ex.job_summary()

    def plot(self, fs: Any = None, dst: str | Path | None = None, figsize: tuple[int, int] = (10, 6)) -> list[Path]:
        return self._ex.plot(dst or ".")

    def clean(
        self,
        fs: Any = None,
        cs: Any = None,
        clean_cloudobjects: bool = True,
        clean_fn: bool = False,
        force: bool = False,
        on_exit: bool = False,
    ) -> None:
        """Delete this executor's temporary data in Blob storage now: what ``keep_data`` kept
        (and, with ``clean_fn``, its function blobs). Without storage there is none: calls carry
        their data inline. Other executors' data is never touched (``acx clean`` does that)."""
        if on_exit:
            return None  # done anyway when the executor closes (unless keep_data)
        transfers = self._ex._transfers
        if transfers is not None:
            self._run(transfers.clean(functions=clean_fn))
        return None


class LocalhostExecutor(FunctionExecutor):
    """Lithops' ``LocalhostExecutor``: a :class:`FunctionExecutor` on the embedded local runtime,
    whatever the config's backend."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("backend", None)
        super().__init__(backend="local", **kwargs)


class ServerlessExecutor(FunctionExecutor):
    """Lithops' ``ServerlessExecutor``: a :class:`FunctionExecutor` on the config's backend
    (Azure Container Apps when configured; the local runtime when nothing is)."""


def wait_need(return_when: int | str, n: int) -> int:
    """How many of ``n`` futures a wait with ``return_when`` waits for: ALWAYS (0),
    ANY_COMPLETED, ALL_COMPLETED or a percentage (Lithops), or the stdlib's FIRST_COMPLETED,
    FIRST_EXCEPTION (all, unless one fails first: the caller watches for that), ALL_COMPLETED."""
    if return_when in (ALL_COMPLETED, LITHOPS_ALL_COMPLETED, FIRST_EXCEPTION):
        return n
    if return_when in (FIRST_COMPLETED, ANY_COMPLETED):
        return min(1, n)
    if isinstance(return_when, int) and 0 <= return_when <= 100:
        return math.ceil(n * return_when / 100)
    raise ValueError(
        f"return_when={return_when!r}: use ALWAYS, ANY_COMPLETED, ALL_COMPLETED, a percentage 0..100, "
        "FIRST_COMPLETED or FIRST_EXCEPTION"
    )


def _futures(fs: ResponseFuture | Iterable[ResponseFuture]) -> list[ResponseFuture]:
    return [fs] if isinstance(fs, ResponseFuture) else list(fs)


def _by_owner(futures: list[ResponseFuture]) -> list[tuple[FunctionExecutor | None, list[ResponseFuture]]]:
    groups: dict[int, tuple[FunctionExecutor | None, list[ResponseFuture]]] = {}
    for f in futures:
        owner = f._owner() if f._owner is not None else None
        groups.setdefault(id(owner), (owner, []))[1].append(f)
    return list(groups.values())


def wait(
    fs: ResponseFuture | Iterable[ResponseFuture],
    throw_except: bool = True,
    return_when: int | str = LITHOPS_ALL_COMPLETED,
    download_results: bool = False,
    timeout: float | None = None,
    threadpool_size: int = 64,
    wait_dur_sec: float | None = None,
    show_progressbar: bool = True,
) -> tuple[list[ResponseFuture], list[ResponseFuture]]:
    """Lithops' module-level ``wait``: :meth:`FunctionExecutor.wait` over futures of any
    executors. ``(done, not_done)``, in the order given."""
    futures = _futures(fs)
    groups = _by_owner(futures)
    if len(groups) == 1 and groups[0][0] is not None:
        return groups[0][0].wait(
            futures, throw_except, return_when, download_results, timeout, threadpool_size, wait_dur_sec, show_progressbar
        )
    # Futures of several executors (or of closed ones, which are all done): each is watched
    # from here, as Lithops' wait polls, every wait_dur_sec (50 ms by default).
    need = wait_need(return_when, len(futures))
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.05 if wait_dur_sec is None else max(0.01, float(wait_dur_sec))
    while True:
        done = sum(f._fut.done() for f in futures)
        failed = return_when == FIRST_EXCEPTION and any(
            f._fut.done() and not f._fut.cancelled() and f._fut.exception() is not None for f in futures
        )
        if done >= need or failed:
            break
        if deadline is not None and time.monotonic() >= deadline:  # as FunctionExecutor.wait does
            raise TimeoutError(f"{need - done} of {len(futures)} calls unfinished after {timeout} s")
        time.sleep(pause)
    done_fs = [f for f in futures if f._fut.done()]
    if throw_except:
        for f in done_fs:
            if not f._fut.cancelled() and f._fut.exception() is not None:
                f._read = True
                raise f._fut.exception()  # type: ignore[misc]
    return done_fs, [f for f in futures if not f._fut.done()]


def get_result(
    fs: ResponseFuture | Iterable[ResponseFuture],
    throw_except: bool = True,
    timeout: float | None = None,
    threadpool_size: int = 64,
    wait_dur_sec: float | None = None,
    show_progressbar: bool = True,
) -> Any:
    """Lithops' module-level ``get_result``: the results of ``fs`` (futures of any executors),
    a list, or one value for a single future; errors are raised unless ``throw_except=False``."""
    futures = [f for f in _futures(fs) if f._produce_output]
    wait(futures, throw_except=False, timeout=timeout, wait_dur_sec=wait_dur_sec, show_progressbar=show_progressbar)
    out = []
    for f in futures:
        out.append(f.result(throw_except=throw_except, timeout=0 if timeout is not None else None))
        f._read = True
    return out[0] if isinstance(fs, ResponseFuture) else out


class WithEnv:
    """``fn`` run with extra environment variables (Lithops' ``extra_env``), set in the worker
    for the call and restored after it (a worker runs one call at a time)."""

    def __init__(self, fn: Callable[..., Any], env: dict[str, str]) -> None:
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise TypeError("extra_env must be a dict of str to str, like os.environ")
        if any(not k or "=" in k or "\0" in k or "\0" in v for k, v in env.items()):
            raise ValueError("extra_env names must be non-empty without '=' or NUL, values without NUL")
        self.fn = fn
        self.env = dict(env)
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)
        self.__wrapped__ = fn  # inspect.signature() sees fn's parameters

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import os

        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            return self.fn(*args, **kwargs)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


class _NullJob:
    """Job stand-in for futures the facade makes itself (the reducer's)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def call_id(self, index: int) -> str:
        return self.key

    def item_done(self, fut: CallFuture) -> None:
        pass


async def _wait_count(futures: list[CallFuture], need: int, first_exception: bool, timeout: float | None) -> None:
    """Until ``need`` futures are done (or one failed, with ``first_exception``)."""

    def failed(f: CallFuture) -> bool:
        return f.done() and not f.cancelled() and f.exception() is not None

    count = sum(1 for f in futures if f.done())
    if count >= need or (first_exception and any(failed(f) for f in futures)):
        return
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_done(f: CallFuture) -> None:
        nonlocal count
        count += 1
        if not waiter.done() and (count >= need or (first_exception and failed(f))):
            waiter.set_result(None)

    pending = [f for f in futures if not f.done()]
    for f in pending:
        f.add_done_callback(on_done)
    try:
        await asyncio.wait_for(waiter, timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(f"{need - count} of {len(futures)} calls unfinished after {timeout} s") from None
    finally:
        for f in pending:
            f.remove_done_callback(on_done)
