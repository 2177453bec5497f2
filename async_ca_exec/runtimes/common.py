"""What every backend does once a runtime answers: read its metadata, check compatibility."""

from __future__ import annotations

import asyncio
import json
import platform
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import cloudpickle

from .. import __version__, protocol, transport
from ..errors import AuthenticationError, RuntimeMismatchError, RuntimeStartError


async def _get_when_up(
    url: str, path: str, *, key: bytes | None, ssl: Any, timeout: float, startup_timeout: float
) -> tuple[int, bytes]:
    """GET ``path``; while the runtime is starting (refused connections, timeouts, 429/502/503/504)
    ask again, with backoff honouring ``Retry-After``, for up to ``startup_timeout`` seconds."""
    from ..invoker import backoff

    deadline = time.monotonic() + startup_timeout
    attempt = 0
    # Through HTTPS_PROXY / NO_PROXY as the invoke path goes, except to loopback (the local runtime).
    proxies = transport.trust_env(urlsplit(url).hostname or "")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), trust_env=proxies) as session:
        while True:
            headers = protocol.signed_headers(key, "GET", path, "meta", b"") if key is not None else {}
            retry_after: float | None = None
            try:
                async with session.get(url.rstrip("/") + path, headers=headers, ssl=ssl) as resp:
                    body = await resp.read()
                    status = resp.status
                    retry_after = _seconds(resp.headers.get("Retry-After"))
                why = f"HTTP {status}"
            except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
                raise RuntimeStartError(
                    f"TLS verification of {url} failed: {exc}; behind a proxy or with a private CA, name its "
                    "certificates with azure.ca_bundle"
                ) from None
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, asyncio.TimeoutError) as exc:
                status, body, why = 0, b"", f"{type(exc).__name__}: {exc}"
            except aiohttp.ClientError as exc:
                raise RuntimeStartError(f"the runtime at {url} did not answer {path}: {exc}") from exc
            if status in (0, 429, 502, 503, 504) and time.monotonic() < deadline:
                await asyncio.sleep(min(backoff(min(attempt, 6), retry_after), max(0.0, deadline - time.monotonic())))
                attempt += 1
                continue
            break
    if status == 0:
        within = f" within {startup_timeout:g} s (startup_timeout)" if startup_timeout else ""
        raise RuntimeStartError(f"the runtime at {url} did not answer {path}{within}: {why}")
    if status in (429, 502, 503, 504) and startup_timeout:
        raise RuntimeStartError(
            f"the runtime at {url} still answered HTTP {status} to {path} after {startup_timeout:g} s "
            f"(startup_timeout): {body[:300]!r}; it may be failing to start, see its logs (az containerapp logs show)"
        )
    return status, body


async def wait_ready(url: str, *, ssl: Any = None, startup_timeout: float = 0.0) -> None:
    """Until ``GET /v1/health`` answers 200: wakes a runtime scaled to zero before calls go out."""
    status, body = await _get_when_up(url, protocol.HEALTH_PATH, key=None, ssl=ssl, timeout=30.0, startup_timeout=startup_timeout)
    if status != 200:
        raise RuntimeStartError(f"the runtime at {url} is not healthy (HTTP {status}): {body[:300]!r}")


async def fetch_meta(
    url: str, key: bytes, *, ssl: Any = None, timeout: float = 30.0, startup_timeout: float = 0.0
) -> dict[str, Any]:
    """``GET /v1/meta`` signed with ``key``, waiting up to ``startup_timeout`` for a cold start."""
    status, body = await _get_when_up(url, protocol.META_PATH, key=key, ssl=ssl, timeout=timeout, startup_timeout=startup_timeout)
    if status == 401:
        raise AuthenticationError(f"the runtime at {url} refused the client's signature; its key differs")
    if status != 200:
        raise RuntimeStartError(f"the runtime at {url} answered HTTP {status} to {protocol.META_PATH}: {body[:300]!r}")
    try:
        meta = json.loads(body)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise RuntimeStartError(f"the runtime at {url} sent metadata that is not a JSON object")
    return meta


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def client_meta() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "packages": {"async_ca_exec": __version__, "cloudpickle": cloudpickle.__version__},
        "protocol": protocol.PROTOCOL_VERSION,
    }


def check_compatible(meta: dict[str, Any], *, where: str) -> None:
    """Raise :class:`RuntimeMismatchError` when the runtime cannot run this client's pickles."""
    mine = client_meta()
    theirs_py = str(meta.get("python", "?"))
    if theirs_py.split(".")[:2] != mine["python"].split(".")[:2]:
        raise RuntimeMismatchError(
            f"{where} runs Python {theirs_py}, this client runs {mine['python']}: pickled functions "
            "need the same major.minor version. Use a runtime built for this Python "
            "(acx runtime build/deploy) or run the client on Python " + ".".join(theirs_py.split(".")[:2])
        )
    if meta.get("protocol") != mine["protocol"]:
        raise RuntimeMismatchError(
            f"{where} speaks protocol {meta.get('protocol')}, this client {mine['protocol']}; "
            f"update the runtime to async_ca_exec {__version__} (acx runtime update)"
        )
    theirs_cp = str((meta.get("packages") or {}).get("cloudpickle", "?"))
    if theirs_cp.split(".")[:1] != mine["packages"]["cloudpickle"].split(".")[:1]:
        raise RuntimeMismatchError(
            f"{where} has cloudpickle {theirs_cp}, this client {mine['packages']['cloudpickle']}; "
            "install the same major version on both sides (acx runtime update)"
        )
