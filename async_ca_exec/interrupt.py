"""Ctrl-C in a script: one line saying which job was interrupted and how far it had got.

A job that Ctrl-C stops notes on the exception that stops it (``KeyboardInterrupt``, or the
``CancelledError`` that ``asyncio.run`` turns it into before raising ``KeyboardInterrupt``) what
it had done. If that interrupt then ends the script, the hook installed here prints the note
as one line instead of Python's traceback through asyncio's internals (about 30 lines that say
nothing the user needs). Any other uncaught exception, or a Ctrl-C that no job of ours noted,
goes to the previous ``sys.excepthook`` unchanged. The exit status stays the one Python gives
an interrupted script (killed by SIGINT: 130 in a shell).
"""

from __future__ import annotations

import asyncio
import sys
import threading
from types import TracebackType
from typing import Any

_NOTE = "_acx_interrupted"
_lock = threading.Lock()
_previous: Any = None


def note(exc: BaseException, what: str) -> None:
    """``exc`` is stopping a job: if it is an interrupt, keep ``what`` the job had done on it
    (the innermost job's note wins)."""
    if not isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)) or hasattr(exc, _NOTE):
        return
    try:
        setattr(exc, _NOTE, what)
    except (AttributeError, TypeError):  # pragma: no cover - an exception type without a __dict__
        return
    _install()


def noted(exc: BaseException | None) -> str | None:
    """The note on ``exc`` or on the exceptions it was raised while handling."""
    seen = 0
    while exc is not None and seen < 16:
        what = getattr(exc, _NOTE, None)
        if isinstance(what, str):
            return what
        exc = exc.__context__ or exc.__cause__
        seen += 1
    return None


def _install() -> None:
    global _previous
    with _lock:
        if _previous is None:
            _previous = sys.excepthook
            sys.excepthook = _excepthook


def _excepthook(tp: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    what = noted(value) if isinstance(value, KeyboardInterrupt) else None
    if what is None:
        (_previous or sys.__excepthook__)(tp, value, tb)
        return
    print(f"async_ca_exec: interrupted (Ctrl-C): {what}", file=sys.stderr, flush=True)
