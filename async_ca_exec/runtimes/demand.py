"""The demand queue: how an executor tells Container Apps how many replicas its calls need.

Container Apps' HTTP scale rule counts requests *arriving* in 15 s windows, not requests in
flight (https://learn.microsoft.com/azure/container-apps/scale-app#http): a burst of long calls
reads as ~0 once it has arrived, and the app scales in replicas still running them. So each
runtime's app also has an ``azure-queue`` scale rule on a queue of its own in the user's storage
account, with ``queueLength`` 1: the platform runs one replica per message
(``desiredReplicas = ceil(messages / queueLength)``, scale-app "Scale behavior"; the scaler
counts visible and invisible messages, https://keda.sh/docs/latest/scalers/azure-storage-queue/).
The executor keeps as many messages there as it needs replicas, for the calls it has in flight
and queued, and for :meth:`warm`'s floor.

Every message has a time-to-live (``demand_ttl``): the executor replaces its messages before
they expire, so a client that dies (SIGKILL, a lost network) stops asking on its own, and the
app scales to zero a cooldown after that. Changing the count changes no template, so it creates
no revision (unlike raising minReplicas).

The app reads the queue with a connection string holding a queue SAS with read permission only
(Queue service SAS "r": read metadata, including the message count; peek), kept as an app
secret; the executor writes with the account's own credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..config import Config
from ..errors import ConfigError

log = logging.getLogger("async_ca_exec")

#: The app secret with the read-only connection string, and the scale rule using it.
DEMAND_SECRET = "acx-demand-connection"
DEMAND_RULE = "acx-demand"
#: How long the app's read-only SAS is valid; every deploy and update writes a new one.
SAS_DAYS = 365
#: An executor starting this close to the SAS's expiry (or after it) warns: run `acx runtime update`.
SAS_WARN_DAYS = 30
#: At most this many queue requests at once (a job that needs hundreds of replicas).
PARALLEL = 16


def queue_name(app: str) -> str:
    """The app's demand queue: 3-63 lowercase letters, digits and single hyphens, starting and
    ending with a letter or digit (Storage's naming rules for queues)."""
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"acx-demand-{app}".lower())).strip("-")
    return name[:63].rstrip("-")


@dataclass(frozen=True)
class QueueAccount:
    """Where the demand queues live and the key that signs their SAS (never logged)."""

    account: str
    endpoint: str  # https://<account>.queue.core.windows.net, or Azurite's
    key: str

    def __repr__(self) -> str:
        return f"QueueAccount({self.account!r}, {self.endpoint!r})"


def queue_account(cfg: Config) -> tuple[QueueAccount | None, str]:
    """The account for demand queues, or None and why there is none (for the warning)."""
    if not cfg.azure_containers.demand_queue:
        return None, "azure_containers.demand_queue is off"
    s = cfg.azure_storage
    if s.connection_string is not None:
        from azure.storage.queue import QueueServiceClient

        try:
            svc = QueueServiceClient.from_connection_string(s.connection_string.get_secret_value())
        except ValueError:
            return None, "azure_storage.connection_string cannot be parsed"
        cred = svc.credential
        if not getattr(cred, "account_key", None):
            return None, "azure_storage.connection_string holds no account key (a SAS cannot sign the app's read-only SAS)"
        return QueueAccount(str(svc.account_name), svc.url.rstrip("/"), cred.account_key), ""
    if s.storage_account_name and s.storage_account_key is not None:
        endpoint = f"https://{s.storage_account_name}.queue.core.windows.net"
        if s.blob_endpoint:  # another cloud (core.chinacloudapi.cn, ...): its queue service beside the blobs
            parts = urlsplit(s.blob_endpoint)
            if ".blob." not in (parts.hostname or ""):
                return None, (
                    f"the queue service of azure_storage.blob_endpoint {s.blob_endpoint} is not known (not a *.blob.* "
                    "host): give azure_storage a connection_string with its QueueEndpoint"
                )
            endpoint = urlunsplit(parts._replace(netloc=parts.netloc.replace(".blob.", ".queue.", 1))).rstrip("/")
        return QueueAccount(s.storage_account_name, endpoint, s.storage_account_key.get_secret_value()), ""
    if cfg.storage_configured:
        return None, "azure_storage has no account key (a SAS or an Entra credential cannot sign the app's read-only SAS)"
    return None, "azure_storage is not configured"


def read_only_connection(acct: QueueAccount, queue: str, *, now: dt.datetime | None = None) -> tuple[str, int]:
    """The connection string the app's scale rule reads the queue with (read permission on that
    one queue only, for SAS_DAYS) and when its SAS expires (epoch seconds)."""
    from azure.storage.queue import QueueSasPermissions, generate_queue_sas

    start = (now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(minutes=5)
    expiry = start + dt.timedelta(days=SAS_DAYS)
    sas = generate_queue_sas(acct.account, queue, acct.key, permission=QueueSasPermissions(read=True), start=start, expiry=expiry)
    return f"QueueEndpoint={acct.endpoint};SharedAccessSignature={sas}", int(expiry.timestamp())


def sas_warning(app: str, expiry: int, *, now: float | None = None) -> str | None:
    """What to say when the app's read-only SAS expires within SAS_WARN_DAYS (None otherwise):
    past it, Container Apps can no longer read the queue, and the app scales on arrivals only."""
    left = expiry - (time.time() if now is None else now)
    if left > SAS_WARN_DAYS * 86400:
        return None
    when = dt.datetime.fromtimestamp(expiry, dt.timezone.utc).strftime("%Y-%m-%d")
    state = f"expired on {when}" if left <= 0 else f"expires on {when} (in {math.ceil(left / 86400)} days)"
    return (
        f"the read-only SAS Container App {app} reads its demand queue with {state}: past it the app scales on "
        "arriving requests only and may scale in replicas running long calls; run `acx runtime update` to renew it"
    )


def scale_rule(acct: QueueAccount, queue: str) -> dict[str, Any]:
    """The app's azure-queue rule: one replica per message."""
    return {
        "name": DEMAND_RULE,
        "azureQueue": {
            "accountName": acct.account,
            "queueName": queue,
            "queueLength": 1,
            "auth": [{"secretRef": DEMAND_SECRET, "triggerParameter": "connection"}],
        },
    }


def queue_client(acct: QueueAccount, queue: str) -> Any:
    from azure.storage.queue.aio import QueueClient

    # The default (exponential) retry policy, fewer retries: the loop retries on its own.
    return QueueClient(
        acct.endpoint, queue, credential={"account_name": acct.account, "account_key": acct.key},
        retry_total=2, initial_backoff=1, increment_base=2, connection_timeout=10, read_timeout=30,
    )  # fmt: skip


async def ensure_queue(acct: QueueAccount, queue: str) -> None:
    """Create the app's demand queue if it is missing (deploy and update)."""
    from azure.core.exceptions import AzureError, ResourceExistsError

    async with queue_client(acct, queue) as client:
        try:
            await client.create_queue()
        except ResourceExistsError:
            pass
        except (AzureError, OSError) as exc:
            raise ConfigError(
                f"could not create the demand queue {queue} at {acct.endpoint}: {_first_line(exc)}; check "
                "azure_storage (the account's queue service must be reachable), or set azure_containers.demand_queue: "
                "false (calls longer than the scale window may then lose their replicas)"
            ) from None


@dataclass
class _Message:
    id: str
    receipt: str
    expires: float  # monotonic


class DemandQueue:
    """Keeps the app's demand queue at ``want()`` messages while it runs.

    ``want`` is sampled every ``sample`` seconds (cheap: the executor's counters); the queue is
    written only when the number changes or messages near their end of life, so a steady job
    costs about two transactions per replica per ``ttl``. Storage errors are logged once and
    retried: a job never fails for its demand queue (the HTTP rule still scales it).
    """

    def __init__(self, client: Any, want: Callable[[], int], *, ttl: int, sample: float = 0.5, name: str = "") -> None:
        self._client = client
        self._want = want
        self.ttl = ttl
        self.sample = min(sample, ttl / 4)
        self.name = name
        self._held: list[_Message] = []
        self._task: asyncio.Task[None] | None = None
        #: One sync at a time (the loop's, warm()'s, cool()'s, aclose()'s): two at once would
        #: each put for the same shortfall and forget the other's messages.
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._stopping = False
        self._failing = False
        self.writes = 0  # queue transactions sent (puts and deletes), for docs and tests

    @property
    def held(self) -> int:
        return len(self._held)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"demand {self.name}")

    def poke(self) -> None:
        """Sync now rather than at the next sample (warm(), cool()): never raises."""
        self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.sync()
                if self._failing:
                    log.info("demand queue %s reachable again", self.name)
                    self._failing = False
            except Exception as exc:  # noqa: BLE001 - logged; the HTTP rule still scales the app
                if not self._failing:
                    log.warning(
                        "could not update the demand queue %s (%s); retrying. Until it works, Container Apps scales "
                        "this app on arrivals only, and may scale in replicas still running long calls",
                        self.name, _first_line(exc),
                    )  # fmt: skip
                    self._failing = True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.sample)
            self._wake.clear()

    async def sync(self) -> None:
        """Make the queue hold ``want()`` live messages: new ones first, then the expiring and
        surplus ones go, so the count never dips below what is wanted. A message is tracked
        from the moment Storage has it, so one put or delete failing loses track of no other."""
        async with self._lock:
            now = time.monotonic()
            target = max(0, int(self._want()))
            # Replaced when less than two sampling periods and a margin are left (the platform
            # counts a message until it expires).
            margin = max(2 * self.sample, self.ttl / 6)
            fresh = [m for m in self._held if m.expires - now > margin]
            doomed = [m for m in self._held if m.expires - now <= margin] + fresh[target:]
            if target > len(fresh):
                await self._gather([self._put() for _ in range(target - len(fresh))])
            if doomed:
                await self._gather([self._delete(m) for m in doomed])

    async def _gather(self, coros: list[Any]) -> None:
        """Run them all (PARALLEL at a time); then raise the first failure, if any."""
        sem = asyncio.Semaphore(PARALLEL)

        async def one(c: Any) -> Any:
            async with sem:
                return await c

        for outcome in await asyncio.gather(*(one(c) for c in coros), return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome

    async def _put(self) -> None:
        msg = await self._client.send_message("1", time_to_live=self.ttl)
        self.writes += 1
        self._held.append(_Message(msg.id, msg.pop_receipt, time.monotonic() + self.ttl))

    async def _delete(self, m: _Message) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            await self._client.delete_message(m.id, m.receipt)
        except ResourceNotFoundError:
            pass  # expired already
        self.writes += 1
        self._held.remove(m)

    async def aclose(self, *, timeout: float = 15.0) -> None:
        """Stop asking: delete this client's messages (the app then scales in after its
        cooldown), close the client. The loop's sync in progress is let finish (a put
        cancelled midway could leave a message no one tracks); the whole close takes at most
        about ``timeout`` seconds, after which what is left expires by itself. Never raises
        but for cancellation."""
        self._want = lambda: 0
        self._stopping = True
        self._wake.set()
        try:
            if self._task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(self._task), timeout / 2)
                except Exception:  # noqa: BLE001 - its failures were logged; a hung one is cancelled below
                    pass
                finally:
                    self._task.cancel()
                    await asyncio.gather(self._task, return_exceptions=True)
                    self._task = None
            try:
                await asyncio.wait_for(self.sync(), timeout / 2)
            except Exception as exc:  # noqa: BLE001 - the messages expire by themselves
                why = "timed out" if isinstance(exc, asyncio.TimeoutError) else _first_line(exc)
                log.warning(
                    "could not empty the demand queue %s (%s): its messages expire within %d s, then the app scales in",
                    self.name, why, self.ttl,
                )  # fmt: skip
        finally:
            await self._client.close()


def _first_line(exc: BaseException) -> str:
    """An error's first line for a log message (its type when it has no text)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def replicas_needed(requests: int, per_replica: int, max_replicas: int) -> int:
    return min(max_replicas, math.ceil(max(0, requests) / max(1, per_replica)))
