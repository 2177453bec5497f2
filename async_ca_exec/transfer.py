"""What requests need from Blob storage: uploads, SAS URLs for the runtime, downloads, cleanup.

A request whose pickled arguments exceed ``inline_limit`` sends them as a blob the runtime reads
with a read-only SAS; a job's large function goes up once, by content hash. Every request lends
the runtime a create/write SAS on the container, under which it puts outcomes too large for the
response and, for durable calls (longer than the ingress lets a response live), everything the
call produced. Blobs a request leaves behind are deleted once its results are in, unless
``keep_data`` is set.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import TYPE_CHECKING, Any

from .storage import PREFIX, Storage

if TYPE_CHECKING:
    from .invoker import Request
    from .jobs import Job

log = logging.getLogger("async_ca_exec.transfer")

#: Renew the runtime's write SAS when it has less than this left.
_RENEW_BEFORE = dt.timedelta(hours=1)


class Transfers:
    def __init__(self, storage: Storage, *, inline_limit: int, keep_data: bool, call_limit: float | None) -> None:
        self.storage = storage
        self.inline_limit = inline_limit
        self.keep_data = keep_data
        self.call_limit = call_limit
        self._write_url: tuple[str, float] | None = None
        self._functions: dict[str, asyncio.Future[str]] = {}
        self._function_blobs: list[str] = []
        self._trash: list[str] = []
        self._flushing: asyncio.Task[None] | None = None
        self.uploads = 0
        self.downloads = 0

    def prefix(self, job: Job, call_id: str) -> str:
        return f"{PREFIX}/jobs/{job.key}/{call_id}"

    def durable(self, req: Request) -> bool:
        """A call that may outlive the ingress's cut returns through Blob if its stream is cut."""
        return self.call_limit is not None and req.job.timeout * req.n > self.call_limit

    async def write_url(self) -> str:
        now = time.time()
        if self._write_url is None or self._write_url[1] - now < _RENEW_BEFORE.total_seconds():
            url = await self.storage.write_url()
            self._write_url = (url, now + 6 * 3600)
        return self._write_url[0]

    async def header(self, req: Request) -> tuple[dict[str, Any], bool, bool]:
        """Extra envelope fields for ``req``, and whether its items and its function go inline."""
        extra: dict[str, Any] = {
            "out_url": await self.write_url(),
            "out_prefix": self.prefix(req.job, req.call_id),
            "inline_limit": self.inline_limit,
        }
        if req.durable:
            extra["durable"] = True
        items_inline = len(req.items) <= self.inline_limit
        if not items_inline:
            if req.items_url is None:
                key = f"{self.prefix(req.job, req.call_id)}.in"
                await self.storage.put(key, req.items)
                self.uploads += 1
                req.items_url = await self.storage.read_url(key)
                req.blobs.append(key)
            extra["items_url"] = req.items_url
            extra["items_size"] = len(req.items)
        fn_inline = len(req.job.fn) <= self.inline_limit
        if not fn_inline:
            extra["fn_url"] = await self._function_url(req.job)
        return extra, items_inline, fn_inline

    async def _function_url(self, job: Job) -> str:
        """Upload a job's function once (by content hash, shared by jobs of the same function)."""
        fut = self._functions.get(job.fn_hash)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._functions[job.fn_hash] = fut
            key = f"{PREFIX}/functions/{job.fn_hash}.fn"
            try:
                if not await self.storage.exists(key):
                    await self.storage.put(key, job.fn)
                    self.uploads += 1
                self._function_blobs.append(key)
                fut.set_result(await self.storage.read_url(key))
            except BaseException as exc:
                del self._functions[job.fn_hash]
                fut.set_exception(exc)
                fut.exception()  # retrieved: the caller gets it below
                raise
        return await asyncio.shield(fut)

    async def fetch(self, name: str, req: Request) -> bytes:
        data = await self.storage.get(name)
        self.downloads += 1
        req.blobs.append(name)
        return data

    async def final(self, req: Request) -> bytes | None:
        """A durable call's outcome blob, if the runtime has written it."""
        name = f"{self.prefix(req.job, req.call_id)}/final.out"
        if not await self.storage.exists(name):
            return None
        return await self.fetch(name, req)

    # -- cleanup -------------------------------------------------------------------------

    def done(self, req: Request) -> None:
        """The request's results are in: its blobs can go."""
        if self.keep_data or not req.blobs:
            return
        self._trash.extend(req.blobs)
        req.blobs = []
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._trash:
            batch, self._trash = self._trash[:256], self._trash[256:]
            try:
                await self.storage.delete(*batch)
            except Exception as exc:  # noqa: BLE001 - leftovers are removed by `acx clean`
                log.warning("could not delete %d temporary blob(s): %s (acx clean removes them)", len(batch), exc)

    async def aclose(self) -> None:
        """Delete what is left to delete (and, unless kept, the functions uploaded), then close."""
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        if not self.keep_data:
            self._trash.extend(self._function_blobs)
            await self._flush()
        await self.storage.aclose()
