"""AsyncExecutor: run Python functions on a runtime, with the asyncio vocabulary."""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import logging
import secrets
import sys
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

from . import interrupt, serialize
from . import partition as partitioning
from .config import Config, load_config, memory_pair
from .errors import ConfigError, RuntimeNotFoundError, SerializationError
from .futures import CallFuture
from .invoker import Endpoint, FutureRequest, Invoker, SliceRequest
from .jobs import Job, Stats
from .progress import Progress
from .runtimes import Runtime, create_runtime
from .storage import Storage
from .transfer import Transfers

log = logging.getLogger("async_ca_exec")

ALL_COMPLETED = asyncio.ALL_COMPLETED
FIRST_COMPLETED = asyncio.FIRST_COMPLETED
FIRST_EXCEPTION = asyncio.FIRST_EXCEPTION

T = TypeVar("T")
Item = tuple[tuple[Any, ...], dict[str, Any]]
#: Submitting yields to the event loop this often, so sending starts while a long input is read.
_YIELD_EVERY = 256

#: chunksize="auto": the largest batch; a batch carries about AUTO_TARGET seconds of work.
AUTO_MAX = 1000
AUTO_IMAP_MAX = 100
AUTO_TARGET = 0.02
#: ...and at least this many seconds of work per request when spreading over the slots.
AUTO_MIN_WORK = 0.005
#: Items sent one by one before sizing, and how long to wait for their first timing.
AUTO_PROBE = 4
AUTO_PROBE_WAIT = 0.25
#: ``map(prewarm=True)``: seconds the raised minimum stays if this process dies before restoring it.
PREWARM_LEASE = 3600.0
#: ``hedge=True``: a request waiting longer than this percentile of its job's gets a backup.
DEFAULT_HEDGE_PERCENTILE = 0.95


def _configure_logging(level: str | None) -> None:
    if not level:
        return
    logger = logging.getLogger("async_ca_exec")
    logger.setLevel(level)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
        logger.addHandler(handler)


class AsyncExecutor:
    """Runs functions remotely: one HTTPS request per call (or per chunk of calls).

    >>> async with AsyncExecutor() as ex:                # doctest: +SKIP
    ...     print(await ex.map(lambda x: x + 7, range(3)))
    [7, 8, 9]

    With no configuration the calls run on the embedded local runtime (the same server as
    in the cloud, on loopback). Every argument is keyword-only; arguments beat ``ACX_*``
    environment variables, which beat the config file, which beats the defaults.
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
        config: str | Path | dict[str, Any] | Config | None = None,
        storage: str | None = None,
        credential: Any = None,
        progress: bool | None = None,
        log_level: str | None = None,
        keep_data: bool | None = None,
        logs: str | None = None,
    ) -> None:
        self.config: Config = load_config(
            config,
            arguments={
                "backend": backend,
                "runtime": runtime,
                "runtime_memory": runtime_memory,
                "timeout": timeout,
                "max_concurrency": max_concurrency,
                "retries": retries,
                "storage": storage,
                "progress": progress,
                "log_level": log_level,
                "keep_data": keep_data,
                "logs": logs,
            },
        )
        if self.config.lithops.storage == "azure_storage" and not self.config.storage_configured:
            raise ConfigError(f"storage='azure_storage' needs a usable azure_storage section: {self.config.why_no_storage()}")
        _configure_logging(self.config.lithops.log_level)
        self.credential = credential
        self.executor_id = secrets.token_hex(6)  # call ids must not meet another executor's
        self._stats = Stats()
        self._runtime: Runtime | None = None
        self._invoker: Invoker | None = None
        self._start_task: asyncio.Task[Endpoint] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._jobs = itertools.count(1)
        self._uncollected: list[CallFuture] = []
        self._transfers: Transfers | None = None
        self._inline_limit = int(self.config.lithops.inline_limit * 1024 * 1024)
        self._prune_at = 1024
        self._last_call: str | None = None
        #: Pre-warming: an explicit warm() in effect; calls holding a prewarm; background PATCH tasks.
        self._warm_explicit = False
        self._warm_holds = 0
        self._warm_tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> AsyncExecutor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start the local runtime or resolve the remote one; returns when it can take calls."""
        self._ensure_started()
        assert self._start_task is not None
        try:
            await asyncio.shield(self._start_task)
        except BaseException as exc:
            interrupt.note(exc, f"the {self.config.backend} runtime was starting; no call had been sent")
            raise

    def _ensure_started(self) -> Invoker:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "AsyncExecutor needs a running event loop (call it from a coroutine); "
                "from synchronous code use async_ca_exec.FunctionExecutor"
            ) from None
        if self._closed:
            raise RuntimeError("this executor is closed; create a new one")
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("this executor belongs to another event loop; create one executor per loop")
        if self._invoker is None:
            self._invoker = Invoker(max_concurrency=self.config.max_concurrency, retries=self.config.retries, stats=self._stats)
            self._invoker.logs = self.config.lithops.logs
            self._start_task = loop.create_task(self._start_runtime())
            self._start_task.add_done_callback(_retrieve)
        return self._invoker

    async def _start_runtime(self) -> Endpoint:
        assert self._invoker is not None
        try:
            self._runtime = create_runtime(self.config, log_level=self.config.lithops.log_level, credential=self.credential)
            invoker = self._invoker
            track = getattr(self._runtime, "track_demand", None)  # (a test's runtime double may lack it)
            if track is not None:
                track(lambda: invoker.demand)  # the calls waiting for a cold start too
            endpoint = await self._runtime.start()
            if self.config.storage_configured:
                storage = Storage(self.config, credential=self.credential)
                try:
                    await storage.ensure_container()  # fail at start, not mid-job, on a wrong account
                except BaseException:
                    await storage.aclose()
                    raise
                self._transfers = Transfers(
                    storage,
                    inline_limit=self._inline_limit,
                    keep_data=self.config.lithops.keep_data,
                    call_limit=self.config.call_limit,
                    executor_id=self.executor_id,
                )
                self._transfers.key = endpoint.key
        except BaseException as exc:
            self._invoker.fail_start(exc)
            if self._runtime is not None:  # started before the failure (storage, say): stop it now,
                await asyncio.shield(self._runtime.aclose())  # since `async with` never got an executor
            raise
        self._invoker.attach(endpoint, self._transfers)
        return endpoint

    async def aclose(self) -> None:
        """Cancel what is still running and stop the runtime's processes; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            await asyncio.gather(self._start_task, return_exceptions=True)
        if self._invoker is not None:
            await self._invoker.aclose()
        if self._transfers is not None:
            await self._transfers.aclose()
        if self._warm_tasks:  # a scale change under way ends first (they log their own failures)
            await asyncio.gather(*self._warm_tasks, return_exceptions=True)
        if self._runtime is not None:
            await self._runtime.aclose()  # restores what warm() raised

    @property
    def endpoint(self) -> Endpoint | None:
        """Where the runtime listens, once started."""
        t = self._start_task
        return t.result() if t is not None and t.done() and not t.cancelled() and t.exception() is None else None

    @property
    def runtime(self) -> Runtime | None:
        return self._runtime

    # -- pre-warming -----------------------------------------------------------------

    async def warm(self, replicas: int, *, lease: float = 3600.0) -> int:
        """Keep at least ``replicas`` replicas running for a big job, so its calls do not meet
        cold starts one scale-out at a time; returns the minimum replica count now in effect.

        >>> async with AsyncExecutor(backend="azure") as ex:   # doctest: +SKIP
        ...     await ex.warm(50)
        ...     results = await ex.map(fn, items)             # aclose() ends the warmth

        On Azure with the demand queue (docs/azure.md, "How scaling works") it asks Container
        Apps for at least ``replicas`` replicas through the queue until :meth:`aclose` (or
        ``lease`` seconds): no template change, so no new revision. Without it, it raises the
        Container App's ``minReplicas`` through ARM (never lowering it, nor below
        ``azure_containers.min_workers``), which makes a new revision, and :meth:`aclose`
        restores it; should this process die first, the next executor to start after ``lease``
        seconds does. Either way it returns without waiting for the replicas to be ready;
        above ``max_workers``, or past the environment's free cores, is a ConfigError. Idle
        warm replicas are billed. Locally every replica is always warm: returns their number.
        """
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ValueError(f"replicas={replicas!r} must be a whole number >= 0")
        if not (isinstance(lease, (int, float)) and lease > 0):
            raise ValueError(f"lease={lease!r} must be a positive number of seconds")
        was = self._warm_explicit
        self._warm_explicit = True  # at once: a map's restore starting meanwhile must not undo this warm()
        try:
            return await self._warm_runtime(replicas, float(lease))
        except BaseException:
            self._warm_explicit = was
            raise

    async def _started_runtime(self) -> Runtime:
        """The runtime as soon as the start has made it (it may still be waiting for a replica)."""
        self._ensure_started()
        task = self._start_task
        assert task is not None
        while self._runtime is None and not task.done():  # noqa: ASYNC110 - one turn: the start task makes it first
            await asyncio.sleep(0)
        if self._runtime is None:
            await asyncio.shield(task)  # raises why the start failed
        assert self._runtime is not None
        return self._runtime

    async def _warm_runtime(self, replicas: int, lease: float) -> int:
        runtime = await self._started_runtime()
        try:
            return await runtime.warm(replicas, lease=lease)
        except RuntimeNotFoundError:
            if self._start_task is None or self._start_task.done():
                raise
            await self.start()  # the default runtime is being deployed on first use: warm it once it is there
            return await runtime.warm(replicas, lease=lease)

    def _prewarm_begin(self, prewarm: bool, items: Any, chunksize: int | str) -> asyncio.Task[None] | None:
        """``prewarm=True``: raise the minimum replicas for this call in the background, so their
        cold starts overlap with submission, which does not wait for them. The call passes the
        task to :meth:`_prewarm_end` when it finishes."""
        if not prewarm:
            return None
        n = _length(items)
        if n is not None and isinstance(chunksize, int) and chunksize > 1:
            n = -(-n // chunksize)  # requests, not items
        requests = self.config.max_concurrency if n is None else min(n, self.config.max_concurrency)
        self._warm_holds += 1
        return self._warm_task(self._prewarm(requests))

    async def _prewarm(self, requests: int) -> None:
        try:
            runtime = await self._started_runtime()
            replicas = runtime.replicas_for(requests)
            if replicas > 0:
                in_effect = await self._warm_runtime(replicas, PREWARM_LEASE)
                log.debug("pre-warmed for %d concurrent requests: at least %d replicas", requests, in_effect)
        except Exception as exc:  # noqa: BLE001 - a pre-warm only saves time: the job goes on without it
            start = self._start_task
            if start is not None and start.done() and not start.cancelled() and start.exception() is not None:
                log.debug("no pre-warming: the runtime did not start (%s)", exc)  # the job itself reports that
                return
            log.warning("pre-warming failed, the job runs without it: %s", exc)

    def _prewarm_end(self, task: asyncio.Task[None] | None) -> None:
        """A pre-warming call has finished: unless another still holds the warmth or an explicit
        warm() is in effect, restore in the background (after the pre-warm's own PATCH), so the
        call's results are not held up by ARM; :meth:`aclose` waits for it."""
        if task is None:
            return
        self._warm_holds -= 1
        if self._warm_holds == 0 and not self._warm_explicit and not self._closed:
            self._warm_task(self._cool_after(task))

    def _prewarm_end_when_done(self, task: asyncio.Task[None] | None, futures: list[CallFuture]) -> None:
        """:meth:`_prewarm_end` once every one of ``futures`` is done (the facade's map)."""
        left = [f for f in futures if not f.done()]
        if task is None or not left:
            self._prewarm_end(task)
            return
        count = len(left)

        def one_done(_f: Any) -> None:
            nonlocal count
            count -= 1
            if count == 0:
                self._prewarm_end(task)

        for f in left:
            f.add_done_callback(one_done)

    async def _cool_after(self, task: asyncio.Task[None]) -> None:
        await asyncio.wait([task])
        if self._warm_holds == 0 and not self._warm_explicit and self._runtime is not None:
            await self._runtime.cool()

    @property
    def _warm_pending(self) -> bool:
        """Whether closing has a scale change to wait for or a pre-warm to restore (ARM takes a while)."""
        return bool(self._warm_tasks) or bool(getattr(self._runtime, "leases", None))

    def _warm_task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._warm_tasks.add(task)
        task.add_done_callback(self._warm_tasks.discard)
        return task

    # -- submission ------------------------------------------------------------------

    def _chunksize(self, chunksize: int | str | None, hedge: Any = False) -> int | str:
        """A call's ``chunksize``, or the default: the configured one (``lithops.chunksize``,
        "auto"), but one call per request when hedging, whose backups go out after a percentile
        of the job's request latencies: batches of different sizes would give none worth
        comparing, and too few of them to start with."""
        if chunksize is not None:
            return chunksize
        return 1 if hedge not in (False, None) else self.config.lithops.chunksize

    def _call_timeout(self, timeout: float | None) -> float:
        limit = self.config.runtime_timeout
        if timeout is None:
            return self.config.call_timeout
        if not (isinstance(timeout, (int, float)) and 0 < timeout):
            raise ConfigError(f"timeout={timeout!r} must be a positive number of seconds")
        if timeout > limit:
            raise ConfigError(
                f"timeout={timeout:g} exceeds the runtime's runtime_timeout of {limit:g} s; "
                "raise runtime_timeout in the backend's config section or lower the timeout"
            )
        return float(timeout)

    def _new_job(self, fn: Callable[..., Any], timeout: float | None, kind: str, **job_options: Any) -> Job:
        t = self._call_timeout(timeout)
        fn_bytes, fn_hash = serialize.dumps_function(fn)
        if len(fn_bytes) > self._inline_limit and self.config.backend == "azure" and not self.config.storage_configured:
            raise ConfigError(
                f"function {getattr(fn, '__qualname__', fn)!r} pickles to {len(fn_bytes) / 2**20:.1f} MiB (with what it "
                f"refers to), above lithops.inline_limit={self.config.lithops.inline_limit:g} MiB; on Azure larger "
                "data travels through Blob storage: configure azure_storage, or raise lithops.inline_limit"
            )
        key = f"{self.executor_id}-{kind}{next(self._jobs):03d}"
        return Job(key, fn_bytes, fn_hash, t, self._stats, **job_options)

    def _submit_items(self, invoker: Invoker, job: Job, items: list[Item]) -> list[CallFuture]:
        """Send ``items`` as one request whose calls each get a future."""
        loop = self._loop
        assert loop is not None
        futures = job.new_futures(loop, len(items))
        call_id = _request_id(job, futures[0].index, len(items))
        try:
            blob = self._dumps_items(items, call_id)
        except (SerializationError, ConfigError) as exc:
            for f in futures:
                f.set_exception(exc)
                job.item_done(f)
            return futures
        invoker.enqueue(FutureRequest(call_id, job, futures, blob))
        return futures

    def _dumps_items(self, items: list[Item], call_id: str) -> bytes:
        blob = serialize.dumps_items(items, call_id)
        if len(blob) > self._inline_limit and self.config.backend == "azure" and not self.config.storage_configured:
            raise ConfigError(
                f"the arguments of call {call_id} pickle to {len(blob) / 2**20:.1f} MiB, above "
                f"lithops.inline_limit={self.config.lithops.inline_limit:g} MiB; on Azure larger data travels through "
                "Blob storage: configure azure_storage, or raise lithops.inline_limit"
            )
        return blob

    def _submit_slice(self, invoker: Invoker, job: Job, items: list[Item]) -> None:
        """Send ``items`` as one request whose outcomes land in the job's result list."""
        n = len(items)
        offset, now = job.new_slots(n)
        call_id = _request_id(job, offset, n)
        try:
            blob = self._dumps_items(items, call_id)
        except (SerializationError, ConfigError) as exc:
            assert job.results is not None
            job.results[offset : offset + n] = [exc] * n
            job.stats.record_outcome(n, n, 0.0, now)
            job.slots_done(n, (offset, exc), n)
            return
        req = SliceRequest(call_id, job, offset, n, blob, now)
        job.requests.append(req)
        invoker.enqueue(req)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> CallFuture:
        """Schedule ``fn(*args, **kwargs)``; needs a running event loop.

        >>> fut = ex.submit(pow, 2, 10)                  # doctest: +SKIP
        >>> await fut
        1024
        """
        invoker = self._ensure_started()
        job = self._new_job(fn, None, "A")
        (fut,) = self._submit_items(invoker, job, [(args, kwargs)])
        self._track(fut)
        self._last_call = "call_async"
        return fut

    def _track(self, fut: CallFuture) -> None:
        """Keep ``fut`` for get_result(); forget futures already awaited, so memory stays bounded."""
        self._uncollected.append(fut)
        if len(self._uncollected) >= self._prune_at:
            self._uncollected = [f for f in self._uncollected if not (f._collected and f.done())]
            self._prune_at = max(1024, 2 * len(self._uncollected))

    def call_async(self, fn: Callable[..., Any], data: Any) -> CallFuture:
        """Lithops form of :meth:`submit`: a tuple is positional args, a dict keyword args, else one arg."""
        args, kwargs = _lithops_item(data)
        return self.submit(fn, *args, **kwargs)

    async def _iter_chunks(
        self, items: Iterable[Any] | AsyncIterable[Any], chunksize: int | str, job: Job | None = None, cap: int = AUTO_MAX
    ) -> AsyncGenerator[list[Any], None]:
        """``items`` in lists of ``chunksize`` (``"auto"``: sized from the job's measured call
        time as it runs, at most ``cap``)."""
        if isinstance(items, (str, bytes)):
            raise TypeError("items is a string: pass a list of items (a string would be split into characters)")
        size: Callable[[], Awaitable[int]]
        if chunksize == "auto":
            assert job is not None
            size = _AutoBatch(job, _length(items), self.config.max_concurrency, cap).next_size
        else:
            fixed = int(chunksize)

            async def size() -> int:
                return fixed

        if hasattr(items, "__aiter__"):
            chunk: list[Any] = []
            want = await size()
            async for x in items:  # type: ignore[union-attr]
                chunk.append(x)
                if len(chunk) >= want:
                    yield chunk
                    chunk = []
                    want = await size()
            if chunk:
                yield chunk
            return
        it = iter(items)  # type: ignore[arg-type]
        while True:
            chunk = list(itertools.islice(it, await size()))
            if not chunk:
                return
            yield chunk

    async def _submit_all(
        self,
        job: Job,
        items: Iterable[Any] | AsyncIterable[Any],
        to_item: Callable[[Any], Item],
        chunksize: int | str,
        submit: Callable[[Invoker, Job, list[Item]], Any],
    ) -> None:
        _check_chunksize(chunksize)
        invoker = self._ensure_started()
        n = 0
        async for chunk in self._iter_chunks(items, chunksize, job):
            submit(invoker, job, [to_item(x) for x in chunk])
            n += len(chunk)
            if n >= _YIELD_EVERY:
                n = 0
                await asyncio.sleep(0)
                if job.failed is not None:
                    break

    async def _map_futures(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        to_item: Callable[[Any], Item],
        chunksize: int | str,
        timeout: float | None,
        kind: str = "M",
        hedge: bool | float = False,
    ) -> list[CallFuture]:
        """Submit one call per item, each with a future (the Lithops facade's map)."""
        percentile = _hedge_percentile(hedge)
        self._ensure_started()
        job = self._new_job(fn, timeout, kind, hedge=percentile)
        futures: list[CallFuture] = []

        def submit(invoker: Invoker, job: Job, chunk: list[Item]) -> None:
            futures.extend(self._submit_items(invoker, job, chunk))

        try:
            await self._submit_all(job, items, to_item, chunksize, submit)
        except BaseException:
            _cancel_all(futures)
            raise
        return futures

    async def _objects(
        self,
        fn: Callable[..., Any],
        items: Any,
        to_item: Callable[[Any], Item],
        chunk_size: int | None,
        chunk_number: int | None,
        newline: str,
    ) -> tuple[Any, Callable[[Any], Item]]:
        """Object partitioning (Lithops): az:// or http(s) references become one call per byte
        range, each given a CloudObject (as ``obj=`` when the function takes an ``obj``)."""
        wants_obj = _takes(fn, "obj")
        asked = chunk_size is not None or chunk_number is not None
        if not partitioning.is_object_source(items) or not (asked or wants_obj):
            if asked:
                raise ValueError("obj_chunk_size/obj_chunk_number need az:// or http(s) object references as items")
            return items, to_item
        storage = None
        if self.config.storage_configured:
            await self.start()
            assert self._transfers is not None
            storage = self._transfers.storage
        objects = await partitioning.partition(
            items, storage=storage, chunk_size=chunk_size, chunk_number=chunk_number, newline=newline,
            why_no_storage=None if storage is not None else self.config.why_no_storage(),
        )  # fmt: skip
        return objects, (_as_obj if wants_obj else _single)

    async def _map_list(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        to_item: Callable[[Any], Item],
        chunksize: int | str | None,
        timeout: float | None,
        return_exceptions: bool,
        kind: str = "M",
        obj_chunk_size: int | None = None,
        obj_chunk_number: int | None = None,
        obj_newline: str = "\n",
        progress: bool | None = None,
        desc: str = "map",
        hedge: bool | float = False,
        prewarm: bool = False,
    ) -> list[Any]:
        """Submit one call per item and gather the results in input order."""
        chunksize = self._chunksize(chunksize, hedge)
        percentile = _hedge_percentile(hedge)
        self._ensure_started()
        items, to_item = await self._objects(fn, items, to_item, obj_chunk_size, obj_chunk_number, obj_newline)
        job = self._new_job(fn, timeout, kind, fail_fast=not return_exceptions, collect=True, hedge=percentile)
        warming = self._prewarm_begin(prewarm, items, chunksize)
        try:
            async with self._progress(desc, job, _length(items), progress):
                await self._submit_all(job, items, to_item, chunksize, self._submit_slice)
                await job.wait()
        except BaseException as exc:
            interrupt.note(exc, _how_far(desc, fn, job, _length(items)))
            job.cancel()
            raise
        finally:
            self._prewarm_end(warming)
        if job.failed is not None and not return_exceptions:
            job.cancel()
            raise job.failed[1]
        assert job.results is not None
        return job.results

    async def map(
        self,
        fn: Callable[[Any], T],
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        return_exceptions: bool = False,
        chunksize: int | str | None = None,
        timeout: float | None = None,
        progress: bool | None = None,
        obj_chunk_size: int | None = None,
        obj_chunk_number: int | None = None,
        obj_newline: str = "\n",
        hedge: bool | float = False,
        prewarm: bool = False,
    ) -> list[T]:
        """``[fn(x) for x in items]``, run remotely; results in input order.

        One call per item. ``chunksize="auto"`` (the default, from ``lithops.chunksize``)
        batches calls per request from their measured duration, so fast functions cost little
        per call and slow ones still go one per request; ``chunksize=N`` sends N items per
        request, ``1`` one. Results, errors, timeouts, logs, stats and cancellation stay per
        call whatever the batching: a crash fails only its own call. The first failure cancels the
        calls still running and is raised, unless ``return_exceptions=True``, which puts
        exceptions in the list instead. ``items`` may be an iterable or an async iterable.

        Object partitioning (Lithops): ``items`` an ``az://container/prefix`` (or a blob, an
        http(s) URL, or a list of those) and ``obj_chunk_size`` bytes (or ``obj_chunk_number``
        parts per object): each call gets a :class:`~async_ca_exec.partition.CloudObject`,
        as ``obj=`` when ``fn`` has an ``obj`` parameter.

        Straggler hedging, for idempotent functions only: ``hedge=True`` (or a latency
        percentile such as ``0.9``; True means 0.95) sends a backup of a request that has waited
        longer than that percentile of this job's answered requests; the first answer wins and
        the other request is cut, so its replica drops the call. Counted in
        ``job_summary()["hedges"]``.

        ``prewarm=True`` (Azure): raise the app's minReplicas to what this map's concurrency
        needs (its requests, at most ``max_concurrency``, over each replica's share of the HTTP
        scale rule, at most ``max_workers``) while it is submitted, without waiting for them, and
        restore it in the background when the map ends, unless :meth:`warm` is in effect. See
        :meth:`warm`; a failed pre-warm is logged and the job runs without it.
        """
        return await self._map_list(
            fn, items, to_item=_single, chunksize=chunksize, timeout=timeout, return_exceptions=return_exceptions,
            obj_chunk_size=obj_chunk_size, obj_chunk_number=obj_chunk_number, obj_newline=obj_newline,
            progress=progress, hedge=hedge, prewarm=prewarm,
        )  # fmt: skip

    async def starmap(
        self,
        fn: Callable[..., T],
        items: Iterable[Iterable[Any]] | AsyncIterable[Iterable[Any]],
        *,
        return_exceptions: bool = False,
        chunksize: int | str | None = None,
        timeout: float | None = None,
        progress: bool | None = None,
        hedge: bool | float = False,
        prewarm: bool = False,
    ) -> list[T]:
        """Like :meth:`map`, with each item unpacked as ``fn(*item)``."""
        return await self._map_list(
            fn,
            items,
            to_item=_star,
            chunksize=chunksize,
            timeout=timeout,
            return_exceptions=return_exceptions,
            kind="S",
            progress=progress,
            desc="starmap",
            hedge=hedge,
            prewarm=prewarm,
        )

    async def imap(
        self,
        fn: Callable[[Any], T],
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool = False,
        return_exceptions: bool = False,
        chunksize: int | str | None = None,
        window: int | None = None,
        timeout: float | None = None,
        progress: bool | None = None,
        hedge: bool | float = False,
        prewarm: bool = False,
    ) -> AsyncIterator[T]:
        """Results as calls complete (input order with ``ordered=True``), reading ``items`` lazily.

        At most ``window`` calls (default: twice ``max_concurrency`` times ``chunksize``, or
        times 100 with ``"auto"``, whose batches stay within the window) are in flight or
        waiting to be yielded, so memory does not grow with the input. Leaving the
        loop early cancels the calls still running. ``hedge``, ``prewarm``: as in :meth:`map`
        (the warmth is restored when the iteration ends).
        """
        chunksize = self._chunksize(chunksize, hedge)
        _check_chunksize(chunksize)
        percentile = _hedge_percentile(hedge)
        invoker = self._ensure_started()
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window={window!r} must be a positive whole number of calls")
        per_request = AUTO_IMAP_MAX if chunksize == "auto" else int(chunksize)
        if chunksize == "auto" and window is not None:
            per_request = min(per_request, window)  # batches as large as the window allows
        window = window or 2 * self.config.max_concurrency * per_request
        if window < per_request:
            raise ValueError(f"window={window} must be at least chunksize={chunksize}")
        done: collections.deque[CallFuture] = collections.deque()
        wake: list[asyncio.Future[None] | None] = [None]

        def sink(fut: CallFuture) -> None:
            if not ordered:
                done.append(fut)
            w = wake[0]
            if w is not None and not w.done():
                w.set_result(None)

        job = self._new_job(fn, timeout, "I", sink=sink, hedge=percentile)
        order: collections.deque[CallFuture] = collections.deque()
        live: set[CallFuture] = set()
        job_cap = max(1, min(per_request, window // max(1, self.config.max_concurrency)))
        chunks = self._iter_chunks(items, chunksize, job, cap=job_cap)
        exhausted = False
        loop = asyncio.get_running_loop()
        total = _length(items)
        bar = self._progress("imap", job, total, progress, total=lambda: job.next_index if exhausted else total)
        await bar.__aenter__()
        warming = self._prewarm_begin(prewarm, items, chunksize)
        try:
            while True:
                while not exhausted and len(live) < window:
                    try:
                        chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        exhausted = True
                        break
                    futs = self._submit_items(invoker, job, [_single(x) for x in chunk])
                    live.update(futs)
                    if ordered:
                        order.extend(futs)
                if not live:
                    return
                if ordered:
                    nxt = order[0]
                    while not nxt.done():
                        waiter = wake[0] = loop.create_future()
                        await waiter
                    order.popleft()
                else:
                    while not done:
                        waiter = wake[0] = loop.create_future()
                        await waiter
                    nxt = done.popleft()
                live.discard(nxt)
                if nxt.cancelled():
                    if return_exceptions:
                        yield asyncio.CancelledError(f"call {nxt.call_id} was cancelled")  # type: ignore[misc]
                        continue
                    raise asyncio.CancelledError(f"call {nxt.call_id} was cancelled")
                exc = nxt.exception()
                if exc is not None:
                    if return_exceptions:
                        yield exc  # type: ignore[misc]
                        continue
                    raise exc
                yield nxt.result()
        except BaseException as exc:
            interrupt.note(exc, _how_far("imap", fn, job, total))
            raise
        finally:
            _cancel_all(live)
            _mark_retrieved(live)
            self._prewarm_end(warming)
            await chunks.aclose()
            await bar.__aexit__(None, None, None)

    async def map_reduce(
        self,
        map_fn: Callable[[Any], Any],
        items: Iterable[Any] | AsyncIterable[Any],
        reduce_fn: Callable[[list[Any]], T],
        *,
        chunksize: int | str | None = None,
        timeout: float | None = None,
        obj_chunk_size: int | None = None,
        obj_chunk_number: int | None = None,
        obj_newline: str = "\n",
        progress: bool | None = None,
        hedge: bool | float = False,
        prewarm: bool = False,
    ) -> T:
        """``reduce_fn([map_fn(x) for x in items])`` with both steps run remotely (items may be
        object references, partitioned as in :meth:`map`; ``hedge`` and ``prewarm`` apply to the
        map step: the warmth is restored before the single reduce call)."""
        results = await self._map_list(
            map_fn, items, to_item=_single, chunksize=chunksize, timeout=timeout, return_exceptions=False,
            obj_chunk_size=obj_chunk_size, obj_chunk_number=obj_chunk_number, obj_newline=obj_newline,
            progress=progress, desc="map_reduce", hedge=hedge, prewarm=prewarm,
        )  # fmt: skip
        invoker = self._ensure_started()
        job = self._new_job(reduce_fn, timeout, "R")
        (fut,) = self._submit_items(invoker, job, [((results,), {})])
        return await fut  # type: ignore[no-any-return]

    def _progress(
        self, desc: str, job: Job, length: int | None, setting: bool | None, *, total: Callable[[], int | None] | None = None
    ) -> Progress:
        """A progress bar over ``job``'s calls (``setting`` None: the executor's ``progress``)."""
        invoker = self._invoker

        def counts() -> tuple[int, int, int, int | None]:
            in_flight = invoker.calls_in_flight(job) if invoker is not None else 0
            n = total() if total is not None else (job.next_index if job.sealed else length)
            return job.next_index - job.pending, job.errors, in_flight, n

        return Progress(desc, counts, self.config.lithops.progress if setting is None else setting)

    # -- waiting ---------------------------------------------------------------------

    async def wait(
        self, futures: Iterable[Awaitable[Any]], *, return_when: str = ALL_COMPLETED, timeout: float | None = None
    ) -> tuple[set[Any], set[Any]]:
        """``(done, pending)`` as :func:`concurrent.futures.wait`; never raises the calls' errors."""
        fs = set(futures)
        if not fs:
            return set(), set()
        if return_when not in (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION):
            raise ValueError(f"return_when={return_when!r}: use ALL_COMPLETED, FIRST_COMPLETED or FIRST_EXCEPTION")
        done, pending = await asyncio.wait(fs, timeout=timeout, return_when=return_when)
        return done, pending

    async def as_completed(
        self, futures: Iterable[asyncio.Future[Any]], *, timeout: float | None = None
    ) -> AsyncIterator[asyncio.Future[Any]]:
        """Yield the futures as they finish; ``TimeoutError`` if ``timeout`` seconds pass first."""
        fs = set(futures)
        finished: asyncio.Queue[asyncio.Future[Any]] = asyncio.Queue()
        for f in fs:
            f.add_done_callback(finished.put_nowait)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            for left in range(len(fs), 0, -1):
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    f = await asyncio.wait_for(finished.get(), remaining)
                except asyncio.TimeoutError:
                    raise TimeoutError(f"{left} of {len(fs)} futures unfinished after {timeout} s") from None
                yield f
        finally:
            for f in fs:
                f.remove_done_callback(finished.put_nowait)

    async def get_result(self, futures: CallFuture | Iterable[CallFuture] | None = None) -> Any:
        """Results of ``futures`` (one value for one future), or of every future not yet collected.

        Waits for all of them, then raises the first error in submission order, as Lithops'
        ``get_result`` does. Without ``futures``, a single call's result comes back as a value and
        a map's as a list; futures are collected once.
        """
        if futures is None:
            fs = [f for f in self._uncollected if not (f._collected and f.done())]
            single = len(fs) == 1 and self._last_call != "map"
        elif isinstance(futures, CallFuture):
            fs, single = [futures], True
        else:
            fs, single = list(futures), False
        if fs:
            await asyncio.wait(fs)  # cancelled here, nothing is lost: the futures stay tracked
        if futures is None:
            taken = set(fs)
            self._uncollected = [f for f in self._uncollected if f not in taken]
        out: list[Any] = []
        for k, f in enumerate(fs):
            try:
                out.append(f.result())
            except BaseException:
                if futures is None:  # the ones after the failure stay for the next call
                    self._uncollected[:0] = fs[k + 1 :]
                raise
        return out[0] if single and out else out

    # -- reporting -------------------------------------------------------------------

    def job_summary(self) -> dict[str, Any]:
        """Counts, retries, timings and worker seconds over every call of this executor.

        ``gib_seconds`` and ``vcpu_seconds`` weigh the worker (active) seconds by the runtime's
        memory and, on Azure, its vCPU share (``runtime_memory`` / 2048); ``estimated_cost``
        prices them with ``azure_containers.price_vcpu_second`` and ``price_gib_second`` (USD).
        It is an estimate from active seconds only: no free grant, idle or request charges.
        Locally: ``gib_seconds`` only when ``runtime_memory`` is set, no vCPU share, no cost.
        """
        cfg = self.config
        memory = cfg.runtime_memory
        vcpus: float | None = None
        prices: tuple[float, float] | None = None
        if cfg.backend == "azure" and memory:
            vcpus = memory_pair(memory)[0]
            prices = (cfg.azure_containers.price_vcpu_second, cfg.azure_containers.price_gib_second)
        summary = self._stats.summary(memory_mb=memory, vcpus=vcpus, prices=prices)
        summary["backend"] = self.config.backend
        summary["executor_id"] = self.executor_id
        return summary

    def plot(self, dest_dir: str | Path) -> list[Path]:
        """Write ``<executor_id>_timeline.png`` and ``<executor_id>_histogram.png`` into ``dest_dir``.

        The timeline has a row per call (submission order; the first 100,000 calls to get an
        answer): queued, in transit, running (coloured by replica), result on its way back;
        x is seconds since the first submission. The histogram shows every call's latency
        (received - submitted) with p50/p90/p99. Needs matplotlib (``pip install
        async_ca_exec[plot]``, else ImportError); ValueError if no call has an answer yet.
        """
        from .plot import write_plots

        return write_plots(self._stats, dest_dir, self.executor_id)


def _how_far(desc: str, fn: Any, job: Job, total: int | None) -> str:
    """What an interrupted job had done, for the one line Ctrl-C prints."""
    finished = job.next_index - job.pending
    of = f" of {total}" if total is not None else f" of the {job.next_index} sent"
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{desc}({name}) stopped with {finished}{of} calls finished; the others were cancelled"


def _request_id(job: Job, first: int, n: int) -> str:
    return job.call_id(first) if n == 1 else f"{job.call_id(first)}:{n}"


#: The keyword arguments of an item that has none: one shared dict, never mutated (items are
#: pickled at once), so a batch neither builds a dict per item nor pickles one (the pickle memo
#: refers back to the first).
_NO_KWARGS: dict[str, Any] = {}


def _single(x: Any) -> Item:
    return ((x,), _NO_KWARGS)


def _as_obj(x: Any) -> Item:
    return ((), {"obj": x})


def _takes(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _star(x: Any) -> Item:
    return (tuple(x), _NO_KWARGS)


def _lithops_item(data: Any) -> Item:
    if isinstance(data, tuple):
        return (data, _NO_KWARGS)
    if isinstance(data, dict):
        return ((), dict(data))
    return ((data,), _NO_KWARGS)


def _hedge_percentile(hedge: Any) -> float | None:
    """``hedge`` as a latency percentile (None: no hedging)."""
    if hedge is False or hedge is None:
        return None
    if hedge is True:
        return DEFAULT_HEDGE_PERCENTILE
    if isinstance(hedge, (int, float)) and 0.5 <= hedge < 1:
        return float(hedge)
    raise ValueError(
        f"hedge={hedge!r} must be True, False or a latency percentile between 0.5 and 1 (such as 0.9): a request "
        "that has waited longer than that share of its job's answered requests gets a backup"
    )


def _check_chunksize(chunksize: Any) -> None:
    if chunksize == "auto":
        return
    if not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1:
        raise ValueError(f"chunksize={chunksize!r} must be a positive integer or 'auto'")


class _AutoBatch:
    """Batch sizes for ``chunksize="auto"``: a few single calls first, to time the function on
    a worker; then as many items per request as fill about ``AUTO_TARGET`` seconds of work
    (re-measured as results come), but never so many that fewer requests than
    ``max_concurrency`` remain to spread over the replicas, unless that would leave less than
    ``AUTO_MIN_WORK`` seconds of work per request. A function that takes longer than
    the probe wait goes one call per request, where per-request overhead does not matter."""

    def __init__(self, job: Job, total: int | None, concurrency: int, cap: int) -> None:
        self.job = job
        self.total = total
        self.concurrency = concurrency
        self.cap = cap
        self.sent = 0
        self.probed = False

    async def next_size(self) -> int:
        job = self.job
        if self.sent < AUTO_PROBE:
            self.sent += 1
            return 1
        if not self.probed:
            self.probed = True
            loop = asyncio.get_running_loop()
            deadline = loop.time() + AUTO_PROBE_WAIT
            # Woken by the first outcome (a polling sleep here cost a few ms of every map).
            while job.work_items == 0 and job.errors == 0 and job.failed is None:
                left = deadline - loop.time()
                if left <= 0:
                    break
                await asyncio.wait([job.changed()], timeout=left)
        # Until a worker has timed a call, send no further ahead than the slots can take: items
        # queued now as single calls could not be batched later, when the timing is known
        # (with a cold start or a slow network it takes a while).
        while job.work_items == 0 and job.failed is None and job.pending >= self.concurrency:
            await job.changed()
        if job.work_items == 0:
            size = 1
        else:
            per_call = job.work_seconds / job.work_items
            size = int(AUTO_TARGET / max(per_call, 1e-6))
            if self.total is not None:
                # Enough requests for every slot, but none so small that its overhead outweighs
                # its work: spreading a few milliseconds of work thinner gains nothing.
                left = self.total - self.sent
                floor = int(AUTO_MIN_WORK / max(per_call, 1e-6))
                size = min(size, max(-(-left // self.concurrency), floor))
        size = max(1, min(size, self.cap))
        self.sent += size
        return size


def _length(items: Any) -> int | None:
    """The number of items, when the input says (a list, a range); None for iterators."""
    try:
        return len(items)
    except TypeError:
        return None


def _cancel_all(futures: Iterable[CallFuture]) -> None:
    for f in futures:
        if not f.done():
            f.cancel()


def _mark_retrieved(futures: Iterable[CallFuture]) -> None:
    for f in futures:
        if f.done() and not f.cancelled():
            f.exception()


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
