"""Backends: where the runtime's replicas live. Each one is a module behind :class:`Runtime`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..config import Config
    from ..invoker import Endpoint


class Runtime(Protocol):
    """Starts or finds a runtime and says how to reach it; releases what it started."""

    name: str

    async def start(self) -> Endpoint: ...

    async def aclose(self) -> None: ...

    def replicas_for(self, requests: int) -> int:
        """Replicas that take ``requests`` concurrent requests."""
        ...

    async def warm(self, replicas: int, *, lease: float) -> int:
        """Keep at least ``replicas`` replicas running (until cool(), or ``lease`` seconds if this
        client dies); returns the minimum now in effect. Callable before start() has finished."""
        ...

    async def cool(self) -> None:
        """Undo warm(): put back the minimum from before it; never raises but for cancellation."""
        ...

    def track_demand(self, demand: Callable[[], int]) -> None:
        """``demand()`` is the requests the client would have in flight now: a runtime that
        scales on it samples it (before start(), so a cold start sees the job waiting)."""
        ...


def create_runtime(config: Config, **options: Any) -> Runtime:
    if config.backend == "local":
        from .local import LocalRuntime

        return LocalRuntime(config, **options)
    from .azure import AzureRuntime

    return AzureRuntime(config, **options)
