"""How the invoker reaches a runtime: one small interface, implemented on aiohttp.

The invoker sends a signed request and reads the answer's frames as they arrive through
:class:`Transport`; everything HTTP (connections, keep-alive, TLS, proxies, framing, parsing)
is aiohttp's (:class:`AiohttpTransport`: one long-lived ``ClientSession`` per executor, its
``TCPConnector`` sized to the executor's connections, llhttp parsing every answer). Tests of
retries, backoff, the concurrency window, hedging and recovery put a double in its place
(``tests/test_invoker_double.py``) and run without sockets.

Errors are typed so the invoker can tell what was sent: :class:`ConnectError` (nothing was
sent: the runtime is not there), :class:`TLSError` (a failed certificate check, never
retried), :class:`DisconnectedError` and :class:`ReadTimeoutError` (the request may have
run), :class:`MalformedResponseError` (the answer is not HTTP aiohttp accepts).
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp


class TransportError(Exception):
    """A transport failure on the invoke path."""


class ConnectError(TransportError):
    """The connection could not be made: nothing was sent."""


class TLSError(ConnectError):
    """The TLS handshake failed (certificate verification, most likely)."""


class ProxyError(ConnectError):
    """The proxy (HTTPS_PROXY / HTTP_PROXY) would not open a tunnel to the runtime: nothing was sent."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class DisconnectedError(TransportError):
    """The connection closed before the answer was complete."""


class ReadTimeoutError(TransportError):
    """No byte arrived for the read timeout."""


class MalformedResponseError(TransportError):
    """The answer is not HTTP/1.1 that aiohttp's parser accepts."""


class Reply(Protocol):
    """An answer whose head has arrived; its body is read as it comes."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def content_length(self) -> int | None: ...

    async def read(self) -> bytes:
        """The whole body."""

    async def read_upto(self, n: int) -> bytes:
        """Up to ``n`` bytes of the body (fewer only at its end)."""

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes of the body; DisconnectedError if it ends first."""

    def release(self) -> None:
        """Done with it: its connection may carry another request if it was read to the end."""

    def close(self) -> None:
        """Cut it: its connection is closed now, so the runtime sees the client go."""


class Transport(Protocol):
    async def post(self, headers: Mapping[str, str], body: bytes) -> Reply:
        """Send one signed request to the runtime's invoke path; the answer once its head is in."""

    async def aclose(self) -> None: ...


def trust_env(host: str) -> bool:
    """Whether a session to ``host`` takes proxies from the environment (``HTTPS_PROXY``,
    ``NO_PROXY``): yes, except to loopback (the local runtime), which no proxy can reach."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


class AiohttpReply:
    __slots__ = ("_resp",)

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp

    @property
    def status(self) -> int:
        return self._resp.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._resp.headers

    @property
    def content_length(self) -> int | None:
        return self._resp.content_length

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except _ERRORS as exc:
            raise _translate(exc) from None

    async def read_upto(self, n: int) -> bytes:
        content = self._resp.content
        parts: list[bytes] = []
        got = 0
        try:
            while got < n:
                part = await content.read(n - got)
                if not part:
                    break
                parts.append(part)
                got += len(part)
        except _ERRORS as exc:
            raise _translate(exc) from None
        return b"".join(parts)

    async def readexactly(self, n: int) -> bytes:
        try:
            return await self._resp.content.readexactly(n)
        except asyncio.IncompleteReadError:
            raise DisconnectedError(f"the answer ended {n} bytes short of a frame") from None
        except _ERRORS as exc:
            raise _translate(exc) from None

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        self._resp.close()


#: What aiohttp raises for a failed request (besides cancellation).
_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


def _translate(exc: BaseException) -> TransportError:
    """aiohttp's exception as this module's."""
    if isinstance(exc, (aiohttp.ClientSSLError, ssl.SSLError)):  # certificate errors included
        return TLSError(str(exc))
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ConnectError(f"connecting timed out ({type(exc).__name__})")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectError(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, (aiohttp.SocketTimeoutError, asyncio.TimeoutError)):
        return ReadTimeoutError(f"no data from the runtime within the read timeout ({type(exc).__name__})")
    if isinstance(exc, aiohttp.ClientHttpProxyError):  # before ClientResponseError, its base
        return ProxyError(f"the proxy answered HTTP {exc.status} {exc.message} to CONNECT", exc.status)
    if isinstance(exc, aiohttp.ClientResponseError):
        return MalformedResponseError(f"a malformed answer ({type(exc).__name__}: {exc.message})")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return DisconnectedError(f"the answer's body is incomplete or malformed: {exc}")
    return DisconnectedError(f"{type(exc).__name__}: {exc}")


class AiohttpTransport:
    """The invoke path on one aiohttp ``ClientSession``.

    ``limit`` connections at most (the executor's requests in flight and its backups);
    ``read_timeout``: no byte for this long fails the read (a replica streams heartbeats, so
    silence means it or the connection died). Certificates are always checked (``ssl``: a
    context naming extra CAs, from ``azure.ca_bundle``). Proxies come from the environment
    (``HTTPS_PROXY``, ``NO_PROXY``, as aiohttp's ``trust_env`` reads them), except for a
    runtime on loopback (the local runtime), which no proxy can reach.
    """

    def __init__(
        self,
        url: str,
        *,
        limit: int,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = 30.0,
        read_timeout: float | None = None,
        path: str = "/",
        trace_configs: list[aiohttp.TraceConfig] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url.rstrip("/") + path
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(**self.connector_options(limit, ssl_context)),
            **self.session_options(parts.hostname, connect_timeout, read_timeout),
            trace_configs=trace_configs,
        )

    def connector_options(self, limit: int, ssl_context: ssl.SSLContext | None) -> dict[str, Any]:
        """The ``TCPConnector``'s arguments (methods, so that benchmarks/transport_tuning.py can
        show what each one is worth)."""
        return {
            "limit": limit,
            "limit_per_host": 0,
            "ssl": ssl_context if ssl_context is not None else True,
            "keepalive_timeout": 60.0,  # replicas close idle connections after 75 s
        }

    def session_options(self, host: str, connect_timeout: float, read_timeout: float | None) -> dict[str, Any]:
        """The ``ClientSession``'s arguments: no cookies, no decompression (the frames are
        binary), no ``Accept`` headers, one timeout object for every request."""
        return {
            "cookie_jar": aiohttp.DummyCookieJar(),
            "auto_decompress": False,
            "trust_env": trust_env(host),
            "timeout": aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout),
            "skip_auto_headers": ("Accept", "Accept-Encoding"),
            "headers": {"User-Agent": "async_ca_exec"},
        }

    async def post(self, headers: Mapping[str, str], body: bytes) -> AiohttpReply:
        try:
            resp = await self._session.post(self.url, data=body, headers=headers)
        except _ERRORS as exc:
            raise _translate(exc) from None
        return AiohttpReply(resp)

    async def aclose(self) -> None:
        await self._session.close()
