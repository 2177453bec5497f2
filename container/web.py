"""The replica's HTTP layer: aiohttp's low-level server (``aiohttp.web.Server``), nothing on top.

aiohttp parses every request (llhttp, its C parser), answers malformed ones itself (400 and a
closed connection), frames responses, keeps connections alive, pipelines in order with a
bounded queue, lingers after a closing answer so a client still uploading reads it, and
cancels a request's handler when its client goes away (``handler_cancellation``).

What aiohttp has no setting for, and is added here as a thin protocol wrapper
(:class:`Connection`, an ``aiohttp.web.RequestHandler``): a deadline for the request head.
A connection must deliver a complete head within ``header_timeout`` of opening, or of its
first byte after an idle spell; the server's sweeper (:meth:`WebServer.sweep`) looks at every
connection a few times a second instead of a timer per request. Idle keep-alive connections
are closed by aiohttp's own ``keepalive_timeout``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.log import access_logger

#: Largest request line and header field accepted (aiohttp answers 400 beyond them).
MAX_LINE = 8190
MAX_FIELD = 8190


class Connection(web.RequestHandler):
    """One client connection: aiohttp's handler, with the head deadline."""

    __slots__ = ("busy", "deadline", "header_timeout")

    def __init__(self, manager: WebServer, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.header_timeout = header_timeout
        #: A request is being handled (its handler runs): the handler keeps its own deadlines.
        self.busy = False
        #: When the connection is cut unless a request is being handled (None: not watched).
        self.deadline: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.deadline = time.monotonic() + self.header_timeout
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy and self.deadline is None:  # a new request begins: its head has header_timeout
            self.deadline = time.monotonic() + self.header_timeout
        super().data_received(data)


class WebServer(web.Server):
    """``aiohttp.web.Server`` making :class:`Connection` protocols; ``slow_clients_cut`` counts
    the connections its sweeper cut."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
        header_timeout: float,
        idle_timeout: float,
        access_log: bool = False,
    ) -> None:
        super().__init__(handler, handler_cancellation=True)
        self.header_timeout = header_timeout
        self._options: dict[str, Any] = {
            "keepalive_timeout": idle_timeout,
            "max_line_size": MAX_LINE,
            "max_field_size": MAX_FIELD,
            "lingering_time": 10.0,
            "access_log": access_logger if access_log else None,
        }
        self.slow_clients_cut = 0

    def __call__(self) -> Connection:
        return Connection(self, loop=asyncio.get_running_loop(), header_timeout=self.header_timeout, **self._options)

    def sweep(self, now: float) -> None:
        """Cut the connections past their head deadline with no request being handled."""
        for conn in self.connections:
            if not isinstance(conn, Connection):
                continue
            deadline = conn.deadline
            if deadline is not None and now >= deadline and not conn.busy:
                conn.deadline = None
                transport = conn.transport
                if transport is not None and not transport.is_closing():
                    self.slow_clients_cut += 1
                    transport.abort()


def busy(request: web.BaseRequest, value: bool) -> None:
    """Mark the request's connection as handling a request (or done with it)."""
    conn = request.protocol
    if isinstance(conn, Connection):
        conn.busy = value
        conn.deadline = None


def json_response(status: int, doc: Any, *, close: bool = False, headers: dict[str, str] | None = None) -> web.Response:
    resp = web.Response(status=status, body=json.dumps(doc).encode(), content_type="application/json", headers=headers)
    if close:
        resp.force_close()
    return resp
