"""async_ca_exec: run Python functions at scale on Azure Container Apps, from asyncio.

>>> import asyncio
>>> from async_ca_exec import AsyncExecutor
>>> async def main():                                   # doctest: +SKIP
...     async with AsyncExecutor() as ex:
...         print(await ex.map(abs, [-1, -2]))
>>> asyncio.run(main())                                 # doctest: +SKIP
[1, 2]

Public names are loaded on first use, so the runtime's server (which imports only
``async_ca_exec.protocol``) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AsyncExecutor": "executor",
    "ALL_COMPLETED": "executor",
    "FIRST_COMPLETED": "executor",
    "FIRST_EXCEPTION": "executor",
    "CallFuture": "futures",
    "FunctionExecutor": "sync",
    "LocalhostExecutor": "sync",
    "ServerlessExecutor": "sync",
    "wait": "sync",
    "RetryingFunctionExecutor": "retries",
    "RetryingFuture": "retries",
    "get_result": "sync",
    "ResponseFuture": "sync",
    "ALWAYS": "sync",
    "ANY_COMPLETED": "sync",
    "Config": "config",
    "load_config": "config",
    "AsyncCAExecError": "errors",
    "RemoteError": "errors",
    "RemoteTraceback": "errors",
    "CallTimeoutError": "errors",
    "WorkerCrashedError": "errors",
    "InvocationError": "errors",
    "AuthenticationError": "errors",
    "ConfigError": "errors",
    "RuntimeNotFoundError": "errors",
    "RuntimeMismatchError": "errors",
    "RuntimeStartError": "errors",
    "DeploymentError": "errors",
    "StorageError": "errors",
    "Storage": "storage",
    "SerializationError": "errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from .config import Config, load_config
    from .errors import (
        AsyncCAExecError,
        AuthenticationError,
        CallTimeoutError,
        ConfigError,
        DeploymentError,
        InvocationError,
        RemoteError,
        RemoteTraceback,
        RuntimeMismatchError,
        RuntimeNotFoundError,
        RuntimeStartError,
        SerializationError,
        StorageError,
        WorkerCrashedError,
    )
    from .executor import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, AsyncExecutor
    from .futures import CallFuture
    from .retries import RetryingFunctionExecutor, RetryingFuture
    from .storage import Storage
    from .sync import (
        ALWAYS,
        ANY_COMPLETED,
        FunctionExecutor,
        LocalhostExecutor,
        ResponseFuture,
        ServerlessExecutor,
        get_result,
        wait,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'async_ca_exec' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
