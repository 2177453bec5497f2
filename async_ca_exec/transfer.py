"""What requests need from Blob storage: uploads, SAS URLs for the runtime, downloads, cleanup.

A request whose pickled arguments exceed ``inline_limit`` sends them as a blob the runtime reads
with a read-only SAS (and checks against the SHA-256 in the signed request); a job's large
function goes up once per executor, by content hash. Every request lends the runtime a
create/write SAS on the container, under which it puts outcomes too large for the response
(the client checks each against the SHA-256 the response names) and, for a durable call whose
stream was cut, an ``alive`` blob it renews while the call runs and, at the end, everything the
call produced, signed with the runtime's key. Blobs a request leaves behind are deleted once its
results are in, unless ``keep_data`` is set.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, StorageError
from .storage import PREFIX, Storage

if TYPE_CHECKING:
    from .invoker import Request
    from .jobs import Job

log = logging.getLogger("async_ca_exec.transfer")

#: Renew SAS URLs given out when they have less than this many seconds left.
_RENEW_BEFORE = 3600.0
_SAS_SECONDS = 6 * 3600.0
#: A durable call whose stream was cut is reported alive by its runtime this often (seconds);
#: silent for three times that, it is presumed dead and sent again.
ALIVE_INTERVAL = 20.0
#: How long after a cut the runtime has to say the call is alive before it is presumed dead.
ALIVE_GRACE = 30.0


class Transfers:
    def __init__(
        self, storage: Storage, *, inline_limit: int, keep_data: bool, call_limit: float | None, executor_id: str
    ) -> None:
        if storage.lends_user_sas:
            raise ConfigError(
                "azure_storage.sas_token alone cannot be narrowed into per-call SAS URLs for the runtime: configure "
                "storage_account_key (or a connection string), or account_url with an Entra credential"
            )
        self.storage = storage
        self.inline_limit = inline_limit
        self.keep_data = keep_data
        self.call_limit = call_limit
        self.executor_id = executor_id
        self.key = b""  # the runtime's HMAC key: it signs durable outcomes
        self._write_url: tuple[str, float] | None = None
        self._functions: dict[str, tuple[asyncio.Task[str], float]] = {}
        self._function_blobs: list[str] = []
        self._trash: list[str] = []
        self._dirty: set[str] = set()
        self._flushing: asyncio.Task[None] | None = None
        self.uploads = 0
        self.downloads = 0

    def prefix(self, job: Job, call_id: str) -> str:
        return f"{PREFIX}/jobs/{job.key}/{call_id}"

    def durable(self, req: Request) -> bool:
        """A call that may outlive the ingress's cut returns through Blob if its stream is cut."""
        return self.call_limit is not None and req.job.timeout * req.n > self.call_limit

    async def write_url(self) -> str:
        now = time.monotonic()
        if self._write_url is None or self._write_url[1] - now < _RENEW_BEFORE:
            self._write_url = (await self.storage.write_url(), now + _SAS_SECONDS)
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
            extra["alive_interval"] = ALIVE_INTERVAL
            self._dirty.add(f"{PREFIX}/jobs/{req.job.key}/")
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
            extra["items_sha256"] = hashlib.sha256(req.items).hexdigest()
        fn_inline = len(req.job.fn) <= self.inline_limit
        if not fn_inline:
            extra["fn_url"] = await self._function_url(req.job)
        return extra, items_inline, fn_inline

    async def _function_url(self, job: Job) -> str:
        """Upload a job's function once per executor (by content hash: jobs of the same
        function share it); the upload is its own task, so one caller's cancellation does not
        break it for the others."""
        entry = self._functions.get(job.fn_hash)
        if entry is None or entry[0].cancelled() or (entry[0].done() and entry[0].exception() is not None) or (
            entry[1] - time.monotonic() < _RENEW_BEFORE
        ):  # fmt: skip
            task = asyncio.get_running_loop().create_task(self._upload_function(job))
            entry = (task, time.monotonic() + _SAS_SECONDS)
            self._functions[job.fn_hash] = entry
        return await asyncio.shield(entry[0])

    async def _upload_function(self, job: Job) -> str:
        # Per executor: another client's cleanup can never remove a function this one still needs.
        key = f"{PREFIX}/functions/{self.executor_id}/{job.fn_hash}.fn"
        if key not in self._function_blobs:
            await self.storage.put(key, job.fn)
            self.uploads += 1
            self._function_blobs.append(key)
        return await self.storage.read_url(key)

    async def fetch(self, name: str, sha256: str, req: Request) -> bytes:
        data = await self.storage.get(name)
        self.downloads += 1
        req.blobs.append(name)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StorageError(f"blob {name} does not hold what the runtime wrote (its SHA-256 differs)")
        return data

    async def final(self, req: Request) -> bytes | None:
        """A durable call's outcome blob, once the runtime has written it (checked: signed with
        the runtime's key), or None."""
        name = f"{self.prefix(req.job, req.call_id)}/final.out"
        if not await self.storage.exists(name):
            return None
        data = await self.storage.get(name)
        self.downloads += 1
        mac, body = data[:32], data[32:]
        if not hmac.compare_digest(mac, hmac.new(self.key, body, hashlib.sha256).digest()):
            raise StorageError(f"blob {name} is not signed by the runtime; it was not written by it")
        return body

    async def alive(self, req: Request) -> str | None:
        """The ETag of a durable call's ``alive`` blob (it changes each time the runtime renews it)."""
        return await self.storage.etag(f"{self.prefix(req.job, req.call_id)}/alive")

    # -- cleanup -------------------------------------------------------------------------

    def done(self, req: Request, *, recovered: bool = False) -> None:
        """The request's results are in: its blobs can go (all under its prefix, if it was recovered)."""
        if self.keep_data:
            return
        if recovered:
            self._trash.append(f"{self.prefix(req.job, req.call_id)}/")  # a prefix: listed when flushed
        self._trash.extend(req.blobs)
        req.blobs = []
        if self._trash and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._trash:
            batch, self._trash = self._trash[:256], self._trash[256:]
            try:
                names = [n for n in batch if not n.endswith("/")]
                for prefix in (n for n in batch if n.endswith("/")):
                    names += [b.name for b in await self.storage.list(prefix)]
                await self.storage.delete(*names)
            except Exception as exc:  # noqa: BLE001 - leftovers are removed by `acx clean`
                log.warning("could not delete %d temporary blob(s): %s (acx clean removes them)", len(batch), exc)

    async def clean(self, *, functions: bool = False) -> int:
        """Delete this executor's job data now (what ``keep_data`` kept, what a crash left), and
        with ``functions`` its function blobs; return how many blobs went."""
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        names = [b.name for b in await self.storage.list(f"{PREFIX}/jobs/{self.executor_id}-")]
        if functions:
            names += [b.name for b in await self.storage.list(f"{PREFIX}/functions/{self.executor_id}/")]
            self._functions.clear()
            self._function_blobs.clear()
        if names:
            await self.storage.delete(*names)
        return len(names)

    async def aclose(self) -> None:
        """Delete what is left to delete (and, unless kept, this executor's functions and what
        abandoned durable calls left), then close."""
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        for entry in self._functions.values():
            entry[0].cancel()
        if not self.keep_data:
            self._trash.extend(self._function_blobs)
            self._trash.extend(sorted(self._dirty))
            await self._flush()
        await self.storage.aclose()
