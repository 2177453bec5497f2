"""What a user sees while a job runs: progress bars (tqdm) and calls' output as it comes.

A bar shows calls done out of the total (when the input's length is known), the rate, and
how many failed and are in flight. It is drawn by a ticker reading the job's counters a few
times a second, so a job of a million calls costs the same as one of ten. ``progress=None``
shows bars on a terminal and in Jupyter (the notebook widget), not when output is piped.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

from . import protocol

#: Seconds between redraws of a bar.
REFRESH = 0.2

#: (done, failed, in flight, total or None)
Counts = Callable[[], tuple[int, int, int, int | None]]


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where tqdm's notebook widget works)."""
    ipython = sys.modules.get("IPython")
    if ipython is None or "ipykernel" not in sys.modules:
        return False
    try:
        shell = ipython.get_ipython()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not an IPython session after all
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def wanted(setting: bool | None) -> bool:
    """Whether to draw a bar: as asked, or (``None``) on a terminal or in Jupyter."""
    if setting is not None:
        return setting
    if in_notebook():
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


class Progress:
    """``async with Progress("map", counts, setting):`` draws a bar for the block's duration."""

    def __init__(self, desc: str, counts: Counts, setting: bool | None) -> None:
        self.desc = desc
        self.counts = counts
        self.enabled = wanted(setting)
        self.bar: Any = None
        self._ticker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Progress:
        if self.enabled:
            self.bar = _new_bar(self.desc)
            self._ticker = asyncio.get_running_loop().create_task(self._tick())
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        if self.bar is not None:
            self.refresh()
            self.bar.close()

    async def _tick(self) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(REFRESH)

    def refresh(self) -> None:
        bar = self.bar
        done, failed, in_flight, total = self.counts()
        if total is not None and bar.total != total:
            bar.total = total
        bar.set_postfix_str(f"failed {failed}, in flight {in_flight}", refresh=False)
        if done > bar.n:
            bar.update(done - bar.n)  # update(), not n=: keeps tqdm's rate
        else:
            bar.refresh()


def has_widgets() -> bool:
    """Whether ipywidgets can be imported (the ``[notebook]`` extra). tqdm's notebook bar needs
    it, and without it fails half-built: its ``__del__`` then prints a traceback for every bar."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def _new_bar(desc: str) -> Any:
    if in_notebook() and has_widgets():
        from tqdm.notebook import tqdm as notebook_tqdm

        return notebook_tqdm(desc=desc, unit="call", total=None)
    from tqdm import tqdm  # the text bar, which notebooks show too

    return tqdm(desc=desc, unit="call", total=None, file=sys.stderr, dynamic_ncols=True, mininterval=REFRESH)


class LogPrinter:
    """``logs="stream"``: print each piece of a call's output as it arrives, every line
    prefixed with the call's index (``[7] ...``), stdout to stdout and stderr to stderr,
    above any progress bar."""

    def write(self, index: int, stream: int, text: str) -> None:
        from tqdm import tqdm

        out = sys.stderr if stream == protocol.STDERR else sys.stdout
        lines = text.splitlines()
        for line in lines:
            tqdm.write(f"[{index}] {line}", file=out)
        try:
            out.flush()
        except (AttributeError, ValueError):  # pragma: no cover - a closed or odd stream
            pass
