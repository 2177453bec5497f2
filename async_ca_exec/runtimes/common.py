"""What every backend does once a runtime answers: read its metadata, check compatibility."""

from __future__ import annotations

import asyncio
import json
import platform
from typing import Any

import aiohttp
import cloudpickle

from .. import __version__, protocol
from ..errors import AuthenticationError, RuntimeMismatchError, RuntimeStartError


async def fetch_meta(url: str, key: bytes, *, ssl: Any = None, timeout: float = 30.0) -> dict[str, Any]:
    """``GET /v1/meta`` signed with ``key``."""
    headers = protocol.signed_headers(key, "GET", protocol.META_PATH, "meta", b"")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        try:
            async with session.get(url.rstrip("/") + protocol.META_PATH, headers=headers, ssl=ssl) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise RuntimeStartError(f"the runtime at {url} did not answer {protocol.META_PATH}: {exc}") from exc
    if status == 401:
        raise AuthenticationError(f"the runtime at {url} refused the client's signature; its key differs")
    if status != 200:
        raise RuntimeStartError(f"the runtime at {url} answered HTTP {status} to {protocol.META_PATH}: {body[:300]!r}")
    meta = json.loads(body)
    if not isinstance(meta, dict):
        raise RuntimeStartError(f"the runtime at {url} sent metadata that is not an object")
    return meta


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
