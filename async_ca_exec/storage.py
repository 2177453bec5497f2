"""Azure Blob storage: big payloads and results, long calls' results, user data.

:class:`Storage` is the package's async Blob API (``azure.storage.blob.aio``) with bounded
concurrent transfers. The runtime never holds a storage credential: for each request that needs
Blob, the client hands it short-lived SAS URLs (read one blob, or create blobs in the container),
inside the signed request. Everything the package writes lives under ``acx/`` in the container;
``acx clean`` removes it.

>>> async with Storage() as st:                       # doctest: +SKIP
...     await st.put("data/x.txt", b"hello")
...     print(await st.get("data/x.txt"))
b'hello'
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from .config import Config, load_config, storage_problem
from .errors import AuthenticationError, ConfigError, StorageError

log = logging.getLogger("async_ca_exec.storage")

#: Prefix of every blob the package writes (jobs' temporary data, cached functions, metadata).
PREFIX = "acx"
DEFAULT_CONTAINER = "acx-data"
#: SAS lifetime for a job's blobs: long enough for the longest call, short enough to be useless later.
SAS_LIFETIME = dt.timedelta(hours=6)
_CONTAINER_RE = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}$")
#: The role an Entra identity needs for this package's Blob use: its data actions (read, write,
#: delete blobs) and generateUserDelegationKey, which signs the SAS URLs the runtime gets. A
#: user delegation SAS grants "the intersection of the permissions that were granted to the
#: security principal that requested the user delegation key and the permissions that were
#: granted to the resource on the SAS token" (create-user-delegation-sas, learn.microsoft.com/
#: rest/api/storageservices), so the runtime's writes need the signer to hold write itself;
#: Storage Blob Delegator alone holds only the key action and grants no data access.
DATA_ROLE = "Storage Blob Data Contributor"
_RUNTIME_SAS_403 = re.compile(r"HTTP 403 (?:reading|writing) (\S+)")


@dataclass(frozen=True)
class BlobInfo:
    name: str
    size: int
    last_modified: dt.datetime | None


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Storage:
    """Async Azure Blob storage in one container (``azure_storage.container``, default acx-data).

    Credentials, in order: ``connection_string``; ``storage_account_name`` +
    ``storage_account_key`` (Lithops' keys; ``blob_endpoint`` for other clouds or Azurite);
    ``account_url`` with ``sas_token`` or an Entra credential (``credential=``, else
    ``DefaultAzureCredential``). The container is created on first use.
    """

    def __init__(
        self,
        config: Config | str | dict[str, Any] | None = None,
        *,
        credential: Any = None,
        container: str | None = None,
    ) -> None:
        cfg = config if isinstance(config, Config) else load_config(config)
        s = cfg.azure_storage
        self.container = container or s.container or s.storage_bucket or DEFAULT_CONTAINER
        if not _CONTAINER_RE.match(self.container):
            raise ConfigError(
                f"azure_storage.container={self.container!r} is not a valid container name: 3-63 lowercase "
                "letters, digits and single hyphens, starting with a letter or digit"
            )
        self._section = s
        self._credential = credential
        self._own_credential = False
        self._service: Any = None
        self._container_client: Any = None
        self._created = False
        self._delegation: tuple[Any, dt.datetime] | None = None
        self._limit = asyncio.Semaphore(s.max_concurrency)
        problem = storage_problem(s)
        if problem is not None:
            raise ConfigError(problem)

    def sibling(self, container: str) -> Storage:
        """The same account and credentials, another container (open it before use)."""
        other = Storage.__new__(Storage)
        other.__dict__.update(self.__dict__)
        other.container = container
        other._service = other._container_client = None
        other._created = False
        other._own_credential = False  # the credential stays this Storage's to close
        other._limit = asyncio.Semaphore(self._section.max_concurrency)
        return other

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Storage:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        if self._service is not None:
            return
        from azure.storage.blob.aio import BlobServiceClient, ExponentialRetry

        s = self._section
        options: dict[str, Any] = {
            "retry_policy": ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=s.retries),
            "connection_timeout": 10,
            "read_timeout": 120,
        }
        if s.connection_string is not None:
            try:
                self._service = BlobServiceClient.from_connection_string(s.connection_string.get_secret_value(), **options)
            except ValueError as exc:  # the SDK's message never holds the string itself
                raise ConfigError(
                    f"azure_storage.connection_string cannot be used: {_first_line(exc)} (copy it whole from the "
                    "portal's Access keys page, or `az storage account show-connection-string`)"
                ) from None
        elif s.storage_account_name and s.storage_account_key is not None:
            url = s.blob_endpoint or f"https://{s.storage_account_name}.blob.core.windows.net"
            cred = {"account_name": s.storage_account_name, "account_key": s.storage_account_key.get_secret_value()}
            self._service = BlobServiceClient(url, credential=cred, **options)
        else:
            assert s.account_url is not None
            credential: Any
            if s.sas_token is not None:
                credential = s.sas_token.get_secret_value()
            else:
                if self._credential is None:
                    from .credentials import default_credential

                    self._credential = default_credential()
                    self._own_credential = True
                credential = self._credential
            self._service = BlobServiceClient(s.account_url, credential=credential, **options)
        self._container_client = self._service.get_container_client(self.container)

    async def aclose(self) -> None:
        if self._service is not None:
            await self._service.close()
            self._service = None
        if self._own_credential and self._credential is not None:
            await self._credential.close()
            self._credential = None

    @property
    def endpoint(self) -> str:
        """The blob endpoint, for messages (never with credentials)."""
        if self._service is None:
            return self._section.blob_endpoint or self._section.account_url or "Azure Blob storage"
        url = urlsplit(self._service.url)
        return f"{url.scheme}://{url.netloc}{url.path}".rstrip("/")

    @property
    def _c(self) -> Any:
        if self._container_client is None:
            raise RuntimeError("Storage is not open: use `async with Storage() as st`")
        return self._container_client

    @contextlib.asynccontextmanager
    async def _errors(self, what: str) -> AsyncIterator[None]:
        from azure.core.exceptions import (
            ClientAuthenticationError,
            HttpResponseError,
            ResourceNotFoundError,
            ServiceRequestError,
            ServiceResponseError,
        )

        try:
            yield
        except ResourceNotFoundError:
            raise StorageError(f"{what}: no such blob or container in {self.endpoint}/{self.container}") from None
        except ClientAuthenticationError as exc:
            if getattr(exc, "status_code", None) is None:  # no token could be got: nothing was refused
                raise AuthenticationError(
                    f"no Azure credential could be used for Blob storage at {self.endpoint} while {what}: "
                    f"{_first_line(exc).rstrip('.')}; sign in with `az login`, or set AZURE_CLIENT_ID / AZURE_TENANT_ID / "
                    "AZURE_CLIENT_SECRET, or pass credential=, or use a sas_token or account key instead"
                ) from None
            raise AuthenticationError(
                f"Azure Blob storage at {self.endpoint} refused the credentials while {what}: {_first_line(exc)}; "
                "check azure_storage.storage_account_key / connection_string / sas_token"
            ) from None
        except HttpResponseError as exc:
            if getattr(exc, "status_code", None) == 403 and self.signs_in_with_entra:
                raise AuthenticationError(
                    f"Azure Blob storage at {self.endpoint} denied {what} to the signed-in identity: {_first_line(exc)}; "
                    f"it needs {DATA_ROLE} on storage account {self.account or '?'}: {role_command(self.account)}"
                ) from None
            if getattr(exc, "status_code", None) == 403:
                raise AuthenticationError(
                    f"Azure Blob storage at {self.endpoint} denied {what}: {_first_line(exc)}; check the account key or "
                    "the SAS permissions"
                ) from None
            raise StorageError(f"Azure Blob storage failed while {what}: {_first_line(exc)}") from None
        except (ServiceRequestError, ServiceResponseError, OSError, asyncio.TimeoutError) as exc:
            raise StorageError(
                f"Azure Blob storage at {self.endpoint} cannot be reached while {what}: {_first_line(exc)}"
            ) from None

    async def ensure_container(self) -> None:
        if self._created:
            return
        from azure.core.exceptions import ResourceExistsError

        await self.open()
        async with self._errors(f"creating container {self.container}"):
            with contextlib.suppress(ResourceExistsError):
                await self._c.create_container()
        self._created = True

    # -- blobs -------------------------------------------------------------------------

    async def put(self, key: str, data: bytes | bytearray | memoryview, *, overwrite: bool = True) -> None:
        """Write a blob (created or replaced)."""
        await self.ensure_container()
        async with self._limit, self._errors(f"writing blob {key}"):
            await self._c.upload_blob(key, bytes(data), overwrite=overwrite, max_concurrency=4)

    async def get(self, key: str, *, offset: int | None = None, length: int | None = None) -> bytes:
        """Read a blob, or ``length`` bytes of it from ``offset``."""
        await self.open()
        async with self._limit, self._errors(f"reading blob {key}"):
            stream = await self._c.download_blob(key, offset=offset, length=length, max_concurrency=4)
            return bytes(await stream.readall())

    async def size(self, key: str) -> int:
        await self.open()
        async with self._errors(f"reading the properties of blob {key}"):
            props = await self._c.get_blob_client(key).get_blob_properties()
        return int(props.size)

    async def etag(self, key: str) -> str | None:
        """The blob's ETag (it changes whenever the blob is written), or None if there is none."""
        from azure.core.exceptions import ResourceNotFoundError

        await self.open()
        async with self._errors(f"reading the properties of blob {key}"):
            try:
                props = await self._c.get_blob_client(key).get_blob_properties()
            except ResourceNotFoundError:
                return None
        return str(props.etag)

    @property
    def signs_in_with_entra(self) -> bool:
        """True when Blob is reached with an Entra credential (account_url, no key or SAS)."""
        s = self._section
        return (
            s.connection_string is None
            and not (s.storage_account_name and s.storage_account_key is not None)
            and s.sas_token is None
        )

    @property
    def account(self) -> str | None:
        """The storage account's name, for messages."""
        name = getattr(self._service, "account_name", None) if self._service is not None else None
        return name or self._section.storage_account_name or account_of(self.endpoint)

    @property
    def lends_user_sas(self) -> bool:
        """True when only a user-given SAS token is configured: nothing narrower can be minted."""
        s = self._section
        return s.sas_token is not None and s.connection_string is None and s.storage_account_key is None

    async def exists(self, key: str) -> bool:
        await self.open()
        async with self._errors(f"looking for blob {key}"):
            return bool(await self._c.get_blob_client(key).exists())

    async def list(self, prefix: str = "") -> list[BlobInfo]:
        """Blobs whose names start with ``prefix``."""
        await self.open()
        out = []
        async with self._errors(f"listing blobs under {prefix!r}"):
            try:
                async for b in self._c.list_blobs(name_starts_with=prefix or None):
                    out.append(BlobInfo(b.name, int(b.size or 0), b.last_modified))
            except Exception as exc:  # a container that does not exist yet holds nothing
                if type(exc).__name__ == "ResourceNotFoundError":
                    return []
                raise
        return out

    async def delete(self, *keys: str) -> int:
        """Delete blobs (missing ones are fine); returns how many were deleted."""
        from azure.core.exceptions import ResourceNotFoundError

        await self.open()
        deleted = 0

        async def one(key: str) -> None:
            nonlocal deleted
            async with self._limit, self._errors(f"deleting blob {key}"):
                try:
                    await self._c.delete_blob(key)
                    deleted += 1
                except ResourceNotFoundError:
                    pass

        await asyncio.gather(*(one(k) for k in keys))
        return deleted

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every blob under ``prefix``."""
        if not prefix:
            raise ValueError("refusing to delete every blob of the container: give a prefix")
        return await self.delete(*(b.name for b in await self.list(prefix)))

    # -- URLs for the runtime ----------------------------------------------------------

    def blob_url(self, key: str) -> str:
        return f"{self._c.url.rstrip('/')}/{quote(key)}"

    async def _sas(self, *, blob: str | None, permission: str, expiry: dt.datetime) -> str:
        from azure.storage.blob import (
            BlobSasPermissions,
            ContainerSasPermissions,
            generate_blob_sas,
            generate_container_sas,
        )

        svc = self._service
        account = svc.account_name
        key = getattr(svc.credential, "account_key", None)
        signing: dict[str, Any]
        if key:
            signing = {"account_key": key}
        elif self.lends_user_sas:
            raise ConfigError("a configured sas_token cannot be narrowed: SAS URLs need an account key or Entra")
        else:  # Entra credential: a user delegation key signs the SAS
            if self._delegation is None or self._delegation[1] < expiry:
                start = _utcnow() - dt.timedelta(minutes=5)
                until = _utcnow() + dt.timedelta(days=1)
                udk = await self._user_delegation_key(start, until)
                self._delegation = (udk, until)
            signing = {"user_delegation_key": self._delegation[0]}
        start = _utcnow() - dt.timedelta(minutes=5)  # tolerate clock skew
        if blob is None:
            return str(generate_container_sas(account, self.container, permission=ContainerSasPermissions.from_string(
                permission), expiry=expiry, start=start, **signing))  # fmt: skip
        return str(generate_blob_sas(account, self.container, blob, permission=BlobSasPermissions.from_string(
            permission), expiry=expiry, start=start, **signing))  # fmt: skip

    async def _user_delegation_key(self, start: dt.datetime, until: dt.datetime) -> Any:
        from azure.core.exceptions import HttpResponseError

        async with self._errors("getting a user delegation key"):
            try:
                return await self._service.get_user_delegation_key(start, until)
            except HttpResponseError as exc:
                if getattr(exc, "status_code", None) != 403:
                    raise
                acct = self.account
                raise AuthenticationError(
                    f"Azure Blob storage at {self.endpoint} refused the signed-in identity a user delegation key "
                    f"({_first_line(exc)}): the SAS URLs this client lends the runtime are signed with that key and "
                    f"carry only what the identity may do itself, so it needs {DATA_ROLE} on storage account "
                    f"{acct or '?'} (the role includes the key; Storage Blob Delegator adds only the key, for an identity "
                    f"whose data role is scoped to a container): {role_command(acct)}"
                ) from None

    async def read_url(self, key: str, lifetime: dt.timedelta = SAS_LIFETIME) -> str:
        """A URL that lets its holder read one blob until it expires (a secret: never log it)."""
        await self.open()
        return f"{self.blob_url(key)}?{await self._sas(blob=key, permission='r', expiry=_utcnow() + lifetime)}"

    async def write_url(self, lifetime: dt.timedelta = SAS_LIFETIME) -> str:
        """A container URL that lets its holder create and write blobs (not read, list or delete)."""
        await self.ensure_container()
        sas = await self._sas(blob=None, permission="cw", expiry=_utcnow() + lifetime)
        return f"{self._c.url.rstrip('/')}?{sas}"


def account_of(url: str) -> str | None:
    """The storage account of a blob URL: the host's first label on Azure
    (https://<account>.blob.core.windows.net/...), the path's first segment on an emulator
    (http://127.0.0.1:10000/<account>/...)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ".blob." in host:
        return host.split(".", 1)[0]
    first = parts.path.strip("/").split("/", 1)[0]
    return first or None


def role_command(account: str | None) -> str:
    """The `az` line that gives an identity the data role on ``account`` (placeholders for what
    this client cannot know: who signs in, and the account's subscription and resource group)."""
    acct = account or "<account>"
    return (
        f'`az role assignment create --assignee <your user, app id or object id> --role "{DATA_ROLE}" --scope '
        f"/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Storage/storageAccounts/{acct}` (`az storage "
        f"account show -n {acct} --query id -o tsv` prints the scope)"
    )


def runtime_sas_hint(message: str) -> str | None:
    """What to do about a runtime's report that Blob storage refused (403) a SAS URL this client
    lent it; None for any other message."""
    m = _RUNTIME_SAS_403.search(message)
    if m is None:
        return None
    account = account_of(m.group(1))
    return (
        f"storage account {account or '?'} refused the SAS URL this client lent the runtime. With an Entra credential "
        "(azure_storage.account_url without a key or sas_token) that SAS carries only what the signed-in identity may "
        f"do itself, so the identity needs {DATA_ROLE} on the account: {role_command(account)}; with an account key, "
        "check that the key is current (rotating it voids the SAS URLs signed with it)"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # azure-core messages can carry the request URL; never let a SAS signature through.
    text = re.sub(r"(sig|se|sp|sv|st|sr|skoid|sktid|skt|ske|sks|skv)=[^&\s]+", r"\1=***", text)
    return text.splitlines()[0] if text else type(exc).__name__


def redact(url: str) -> str:
    """A URL without its query (SAS tokens are secrets)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
