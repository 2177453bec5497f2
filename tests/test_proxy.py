"""The invoke path behind a corporate proxy: HTTPS_PROXY/HTTP_PROXY are honoured (CONNECT for
https, absolute URIs for http), NO_PROXY is, a loopback runtime never goes through a proxy, and
certificates stay checked (``azure.ca_bundle``) through the tunnel.

Real components: the replica server (``python -m acx_server``), a TLS front with a test CA's
certificate for ``replica.acx.test`` (Container Apps' ingress), and a forwarding proxy
(tests/proxy.py) that alone knows where ``replica.acx.test`` is. That name resolves nowhere
(lookups of ``*.acx.test`` fail here and are recorded, so no query leaves the machine): a client
that bypassed the proxy could not reach the runtime. Calls go through the SDK (AsyncExecutor,
the Invoker, AiohttpTransport) to a runtime whose endpoint a test names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from proxy import ForwardProxy, TLSFront

from async_ca_exec import AsyncExecutor, InvocationError, executor, protocol, transport
from async_ca_exec.config import Config
from async_ca_exec.errors import RuntimeStartError
from async_ca_exec.invoker import Endpoint
from async_ca_exec.runtimes import common
from async_ca_exec.runtimes.azure import AzureTarget

from conftest import ServerProcess, children

NAME = "replica.acx.test"
PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY")
RETRIES = 2


@pytest.fixture(scope="module")
def replica(quick_server: ServerProcess) -> ServerProcess:
    return quick_server


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_bundle(ca: trustme.CA, tmp_path: Path) -> str:
    """The test CA as a PEM file, as a user names a corporate CA in azure.ca_bundle."""
    path = tmp_path / "corp-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(autouse=True)
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No proxy settings but the test's own; ``*.acx.test`` resolves nowhere (and never reaches
    the machine's resolver). Returns the names the process tried to look up."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.lower(), raising=False)
    tried: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name.lower().rstrip(".").endswith(".acx.test"):
            tried.append(name)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return tried


def server_ctx(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


@contextlib.asynccontextmanager
async def tls_front(ctx: ssl.SSLContext, replica: ServerProcess) -> AsyncIterator[TLSFront]:
    front = await TLSFront(ctx, replica.port).start()
    try:
        yield front
    finally:
        await front.stop()


@pytest.fixture
async def front(ca: trustme.CA, replica: ServerProcess) -> AsyncIterator[TLSFront]:
    """The replica's ingress: TLS with the test CA's certificate for replica.acx.test (and loopback)."""
    async with tls_front(server_ctx(ca, NAME, "127.0.0.1", "localhost"), replica) as f:
        yield f


@contextlib.asynccontextmanager
async def forward_proxy(*, auth: tuple[str, str] | None = None, refuse: int | None = None) -> AsyncIterator[ForwardProxy]:
    p = await ForwardProxy({NAME: "127.0.0.1"}, auth=auth, refuse=refuse).start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    async with forward_proxy() as p:
        yield p


class NamedRuntime:
    """A runtime already running at a URL the test names (the Azure backend's endpoint, without
    ARM): its certificates checked against azure.ca_bundle, as AzureTarget builds the context."""

    name = "named"

    def __init__(self, config: Config, url: str, key: bytes) -> None:
        ssl_ctx = AzureTarget.from_config(config).ssl_context() if url.startswith("https:") else None
        self.endpoint = Endpoint(url=url, key=key, ssl=ssl_ctx)

    async def start(self) -> Endpoint:
        return self.endpoint

    async def aclose(self) -> None:
        pass

    def replicas_for(self, requests: int) -> int:
        return 1

    async def warm(self, replicas: int, *, lease: float) -> int:
        return 0

    async def cool(self) -> None:
        pass


@contextlib.asynccontextmanager
async def sdk(monkeypatch: pytest.MonkeyPatch, url: str, replica: ServerProcess, ca_bundle: str) -> AsyncIterator[AsyncExecutor]:
    """An executor whose runtime is the replica at ``url``."""
    monkeypatch.setattr(executor, "create_runtime", lambda config, **_: NamedRuntime(config, url, replica.key))
    config = {"azure": {"subscription_id": "sub", "resource_group": "rg", "ca_bundle": ca_bundle}}
    async with AsyncExecutor(config=config, retries=RETRIES) as ex:
        yield ex


async def ran_on(ex: AsyncExecutor, replica: ServerProcess) -> None:
    """Calls go out and come back, run by the replica's worker."""
    assert await asyncio.wait_for(ex.map(abs, range(-5, 0), chunksize=1), 60) == [5, 4, 3, 2, 1]
    pid = await asyncio.wait_for(ex.submit(os.getpid), 60)
    assert pid in children(replica.proc.pid)


@pytest.mark.parametrize("var", ["HTTPS_PROXY", "https_proxy"])
async def test_https_goes_through_the_proxys_connect_with_the_certificate_checked(
    var: str, monkeypatch: pytest.MonkeyPatch, replica: ServerProcess, front: TLSFront, proxy: ForwardProxy,
    ca_bundle: str, lookups: list[str],
) -> None:  # fmt: skip
    monkeypatch.setenv(var, proxy.url)
    async with sdk(monkeypatch, f"https://{NAME}:{front.port}", replica, ca_bundle) as ex:
        await ran_on(ex, replica)
    assert proxy.seen and set(proxy.seen) == {("CONNECT", f"{NAME}:{front.port}")}
    assert front.connections == len(proxy.seen)  # every TLS connection came through a tunnel
    assert lookups == []  # the client never looked the name up itself


async def test_http_goes_through_the_proxy_by_absolute_uri(
    monkeypatch: pytest.MonkeyPatch, replica: ServerProcess, proxy: ForwardProxy, ca_bundle: str, lookups: list[str]
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    async with sdk(monkeypatch, f"http://{NAME}:{replica.port}", replica, ca_bundle) as ex:
        await ran_on(ex, replica)
    # The proxy closes after each answer: every request (5 map items, 1 submit) was forwarded.
    assert proxy.seen == [("POST", f"http://{NAME}:{replica.port}{protocol.INVOKE_PATH}")] * 6
    assert lookups == []


@pytest.mark.parametrize(
    ("names", "ca_kind"),
    [((NAME,), "an unknown CA"), (("other.acx.test",), "the trusted CA, for another name")],
)
async def test_a_certificate_not_vouched_for_fails_through_the_proxy_with_a_tls_error(
    names: tuple[str, ...], ca_kind: str, monkeypatch: pytest.MonkeyPatch, replica: ServerProcess, ca: trustme.CA,
    proxy: ForwardProxy, ca_bundle: str,
) -> None:  # fmt: skip
    issuer = trustme.CA() if ca_kind == "an unknown CA" else ca
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    async with tls_front(server_ctx(issuer, *names), replica) as bad:
        url = f"https://{NAME}:{bad.port}"
        async with sdk(monkeypatch, url, replica, ca_bundle) as ex:
            with pytest.raises(InvocationError, match=r"TLS verification of .* failed: .*CERTIFICATE_VERIFY_FAILED") as err:
                await asyncio.wait_for(ex.submit(abs, -1), 60)
        assert url in str(err.value) and "azure.ca_bundle" in str(err.value)
        assert bad.connections == 0  # no request reached the replica
    assert proxy.seen == [("CONNECT", f"{NAME}:{bad.port}")]  # a TLS failure is not retried


@pytest.mark.parametrize("no_proxy", [NAME, ".acx.test", f"localhost,{NAME.upper()}"])
async def test_no_proxy_bypasses_the_proxy(
    no_proxy: str, monkeypatch: pytest.MonkeyPatch, replica: ServerProcess, front: TLSFront, proxy: ForwardProxy,
    ca_bundle: str, lookups: list[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", no_proxy)
    url = f"https://{NAME}:{front.port}"
    tp = transport.AiohttpTransport(url, limit=1, ssl_context=ssl.create_default_context(cafile=ca_bundle))
    try:
        with pytest.raises(transport.ConnectError, match=rf"Cannot connect to host {NAME}:{front.port}"):
            await tp.post({}, b"")
    finally:
        await tp.aclose()
    async with sdk(monkeypatch, url, replica, ca_bundle) as ex:
        with pytest.raises(InvocationError, match=rf"after {RETRIES + 1} attempt\(s\); last error: .*{NAME}"):
            await asyncio.wait_for(ex.submit(abs, -1), 60)
    assert proxy.seen == [] and front.connections == 0
    assert lookups and set(lookups) == {NAME}  # it went straight for the name, which DNS does not know


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_loopback_runtime_never_goes_through_the_proxy(
    host: str, monkeypatch: pytest.MonkeyPatch, replica: ServerProcess, front: TLSFront, proxy: ForwardProxy,
    ca_bundle: str,
) -> None:  # fmt: skip
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(var, proxy.url)
    async with sdk(monkeypatch, f"https://{host}:{front.port}", replica, ca_bundle) as ex:
        await ran_on(ex, replica)
    assert proxy.seen == [] and front.connections >= 1


async def test_the_local_runtime_never_goes_through_the_proxy(monkeypatch: pytest.MonkeyPatch, proxy: ForwardProxy) -> None:
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(var, proxy.url)
    async with AsyncExecutor(config={"localhost": {"replicas": 1, "worker_processes": 1}}) as ex:
        assert await asyncio.wait_for(ex.map(abs, range(-3, 0)), 60) == [3, 2, 1]
    assert proxy.seen == []


async def test_proxy_credentials_in_the_proxy_url_are_sent(
    monkeypatch: pytest.MonkeyPatch, replica: ServerProcess, front: TLSFront, ca_bundle: str
) -> None:
    async with forward_proxy(auth=("alice", "s3cret")) as guarded:
        monkeypatch.setenv("HTTPS_PROXY", f"http://alice:s3cret@127.0.0.1:{guarded.port}")
        async with sdk(monkeypatch, f"https://{NAME}:{front.port}", replica, ca_bundle) as ex:
            await ran_on(ex, replica)
        assert guarded.seen and set(guarded.seen) == {("CONNECT", f"{NAME}:{front.port}")}


#: A proxy that wants credentials none were given for, and one that forbids the host.
REFUSALS = [pytest.param(407, "Proxy Authentication Required", id="407"), pytest.param(403, "Forbidden", id="403")]


@contextlib.asynccontextmanager
async def refusing_proxy(status: int) -> AsyncIterator[ForwardProxy]:
    async with forward_proxy(auth=("alice", "s3cret")) if status == 407 else forward_proxy(refuse=status) as p:
        yield p


@pytest.mark.parametrize(("status", "phrase"), REFUSALS)
async def test_a_proxy_that_refuses_connect_is_named_and_fails_at_once(
    status: int, phrase: str, monkeypatch: pytest.MonkeyPatch, replica: ServerProcess, front: TLSFront, ca_bundle: str
) -> None:
    async with refusing_proxy(status) as refusing:
        monkeypatch.setenv("HTTPS_PROXY", refusing.url)
        async with sdk(monkeypatch, f"https://{NAME}:{front.port}", replica, ca_bundle) as ex:
            with pytest.raises(InvocationError, match=rf"(?i)proxy.*{phrase}"):
                await asyncio.wait_for(ex.submit(abs, -1), 30)
            with pytest.raises(InvocationError, match=rf"proxy .*HTTP {status} {phrase}") as err:
                await asyncio.wait_for(ex.submit(abs, -2), 30)
        assert "malformed" not in str(err.value) and "HTTPS_PROXY" in str(err.value)
        # One CONNECT per call: a refusal is not retried.
        assert refusing.seen == [("CONNECT", f"{NAME}:{front.port}")] * 2
    assert front.connections == 0


@pytest.mark.parametrize(("status", "phrase"), REFUSALS)
async def test_a_proxy_that_refuses_an_http_request_fails_at_once(
    status: int, phrase: str, monkeypatch: pytest.MonkeyPatch, replica: ServerProcess, ca_bundle: str
) -> None:
    async with refusing_proxy(status) as refusing:
        monkeypatch.setenv("HTTP_PROXY", refusing.url)
        async with sdk(monkeypatch, f"http://{NAME}:{replica.port}", replica, ca_bundle) as ex:
            with pytest.raises(InvocationError, match=rf"HTTP {status} to call .*: {phrase}"):
                await asyncio.wait_for(ex.submit(abs, -1), 30)
        assert refusing.seen == [("POST", f"http://{NAME}:{replica.port}{protocol.INVOKE_PATH}")]


async def test_the_start_up_health_check_goes_through_the_proxy(
    monkeypatch: pytest.MonkeyPatch, front: TLSFront, proxy: ForwardProxy, ca_bundle: str
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    try:
        await common.wait_ready(f"https://{NAME}:{front.port}", ssl=ssl.create_default_context(cafile=ca_bundle))
    except RuntimeStartError as exc:
        pytest.fail(f"not through the proxy: {exc}")
    assert proxy.seen == [("CONNECT", f"{NAME}:{front.port}")]
