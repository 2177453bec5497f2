"""What every backend does once a runtime answers: read its metadata, check compatibility."""

from __future__ import annotations

import asyncio
import json
import platform
import time
from typing import Any

import aiohttp
import cloudpickle

from .. import __version__, protocol
from ..errors import AuthenticationError, RuntimeMismatchError, RuntimeStartError


async def fetch_meta(
    url: str, key: bytes, *, ssl: Any = None, timeout: float = 30.0, startup_timeout: float = 0.0
) -> dict[str, Any]:
    """``GET /v1/meta`` signed with ``key``.

    While the runtime is starting (refused connections, 502/503/504/429) it is asked again, with
    backoff honouring ``Retry-After``, for up to ``startup_timeout`` seconds.
    """
    from ..invoker import backoff

    deadline = time.monotonic() + startup_timeout
    attempt = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        while True:
            headers = protocol.signed_headers(key, "GET", protocol.META_PATH, "meta", b"")
            retry_after: float | None = None
            try:
                async with session.get(url.rstrip("/") + protocol.META_PATH, headers=headers, ssl=ssl) as resp:
                    body = await resp.read()
                    status = resp.status
                    retry_after = _seconds(resp.headers.get("Retry-After"))
                why = f"HTTP {status}"
            except (aiohttp.ClientConnectorError, asyncio.TimeoutError) as exc:
                status, body, why = 0, b"", f"{type(exc).__name__}: {exc}"
            except aiohttp.ClientError as exc:
                raise RuntimeStartError(f"the runtime at {url} did not answer {protocol.META_PATH}: {exc}") from exc
            if status in (0, 429, 502, 503, 504) and time.monotonic() < deadline:
                await asyncio.sleep(min(backoff(min(attempt, 6), retry_after), max(0.0, deadline - time.monotonic())))
                attempt += 1
                continue
            break
    if status == 0:
        raise RuntimeStartError(
            f"the runtime at {url} did not answer {protocol.META_PATH}"
            + (f" within {startup_timeout:g} s (startup_timeout)" if startup_timeout else "")
            + f": {why}"
        )
    if status == 401:
        raise AuthenticationError(f"the runtime at {url} refused the client's signature; its key differs")
    if status != 200:
        raise RuntimeStartError(
            f"the runtime at {url} answered HTTP {status} to {protocol.META_PATH}"
            + (f" for {startup_timeout:g} s (startup_timeout)" if startup_timeout and status in (429, 502, 503, 504) else "")
            + f": {body[:300]!r}"
        )
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
