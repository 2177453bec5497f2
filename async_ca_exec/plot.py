"""Timeline and latency-histogram PNGs of an executor's calls (:meth:`AsyncExecutor.plot`).

matplotlib is an optional extra (``pip install async_ca_exec[plot]``). Figures are drawn on
:class:`matplotlib.figure.Figure` with the Agg canvas directly, never through pyplot, so the
user's matplotlib backend and pyplot state are left alone.

The timeline draws the rows :class:`~async_ca_exec.jobs.Stats` keeps (the first
:data:`~async_ca_exec.jobs.ROW_LIMIT` calls to get an answer); the histogram every call's
latency. ``started``/``finished`` are the worker's clock, the others the client's: on Azure a
skewed replica clock shifts its running segments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .jobs import Stats, percentile

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

INSTALL_HINT = "pip install async_ca_exec[plot]"

#: Segment colours of the phases that are not "running" (which is coloured by replica).
QUEUED = "#d0d0d0"  # submitted -> sent: waiting in the client for a free connection
TRANSIT = "#8c8c8c"  # sent -> started: on the way in, or waiting for a worker on the runtime
RETURN = "#3a3a3a"  # finished -> received: the result on its way back
UNTIMED = "#d62728"  # sent -> received of a call no worker reported times for (it failed first)
#: Replicas named in the legend; more are drawn in their colours but summed up in one entry.
LEGEND_REPLICAS = 16


def _require_matplotlib() -> None:
    try:
        import matplotlib
        import matplotlib.backends.backend_agg
        import matplotlib.figure  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"plot() needs matplotlib, an optional extra: {INSTALL_HINT}", name="matplotlib") from exc


@dataclass(frozen=True)
class Timeline:
    """The timeline's rows, one per call in submission order; times in seconds since ``origin``."""

    origin: float  # epoch seconds of the executor's first submission (x = 0)
    submitted: np.ndarray[Any, Any]
    sent: np.ndarray[Any, Any]  # NaN: not known
    started: np.ndarray[Any, Any]  # NaN: no worker timing (the call failed before running)
    finished: np.ndarray[Any, Any]
    received: np.ndarray[Any, Any]
    replica: np.ndarray[Any, Any]  # index into ``replicas``
    replicas: list[str]
    dropped: int  # calls beyond the kept rows, not drawn

    def __len__(self) -> int:
        return len(self.submitted)


def timeline_data(stats: Stats) -> Timeline:
    """A snapshot of ``stats``' timing rows, sorted by submission; ValueError if there are none."""
    import numpy as np

    rows = stats.rows
    cols = (rows.submitted, rows.sent, rows.started, rows.finished, rows.received, rows.replica)
    n = min(len(c) for c in cols)  # another thread (the sync facade's loop) may be appending
    if n == 0:
        raise ValueError("plot(): no call has finished yet; run some calls (and await them) before plotting")
    sub, sent, t0, t1, recv = (np.array(c[:n], dtype=float) for c in cols[:5])  # copies: the arrays may grow
    rep = np.array(rows.replica[:n], dtype=np.intp)
    first = float(np.min(sub))
    origin = first if stats.first_submitted is None else min(first, stats.first_submitted)
    order = np.argsort(sub, kind="stable")
    return Timeline(
        origin=origin,
        submitted=sub[order] - origin,
        sent=sent[order] - origin,
        started=t0[order] - origin,
        finished=t1[order] - origin,
        received=recv[order] - origin,
        replica=rep[order],
        replicas=list(rows.replicas),
        dropped=rows.dropped,
    )


def _natural(name: str) -> list[Any]:
    """Sort key putting ``replica-2`` before ``replica-10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _replica_colours(k: int) -> list[Any]:
    from matplotlib import colormaps

    if k <= 10:
        return [colormaps["tab10"](i) for i in range(k)]
    if k <= 20:
        return [colormaps["tab20"](i) for i in range(k)]
    cmap = colormaps["turbo"]
    return [cmap(0.05 + 0.9 * i / (k - 1)) for i in range(k)]


def timeline_figure(data: Timeline) -> Figure:
    """One horizontal line per call: queued, in transit, running (by replica), returning."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    n = len(data)
    fig = Figure(figsize=(11, 6.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = np.arange(n)
    lw = float(np.clip(330.0 / n, 0.15, 8.0))  # about the height of a row, in points
    sent = np.where(np.isnan(data.sent), data.submitted, data.sent)
    timed = ~np.isnan(data.started) & ~np.isnan(data.finished)
    handles: list[Any] = []

    def segments(mask: Any, x0: Any, x1: Any, colour: Any, label: str | None) -> None:
        if mask.any():
            ax.hlines(y[mask], x0[mask], x1[mask], colors=[colour], linewidth=lw)
            if label:
                handles.append(Line2D([], [], color=colour, linewidth=6, label=label))

    segments(sent > data.submitted, data.submitted, sent, QUEUED, "queued in the client")
    segments(timed, sent, data.started, TRANSIT, "in transit / waiting for a worker")
    segments(timed, data.finished, data.received, RETURN, "result returning")
    segments(~timed, sent, data.received, UNTIMED, "no worker timing (failed before running)")

    names = data.replicas
    used = sorted((r for r in range(len(names)) if (timed & (data.replica == r)).any()), key=lambda r: _natural(names[r]))
    colours = _replica_colours(len(used))
    for k, r in enumerate(used):
        label = f"replica {names[r] or '(unknown)'}" if k < LEGEND_REPLICAS else None
        segments(timed & (data.replica == r), data.started, data.finished, colours[k], label)
    if len(used) > LEGEND_REPLICAS:
        handles.append(Line2D([], [], color="none", label=f"... {len(used) - LEGEND_REPLICAS} more replicas"))

    ax.set_ylim(-0.5 - n * 0.01, n - 0.5 + n * 0.01)
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds since the first submission")
    ax.set_ylabel("call (in submission order)")
    shown = f"{n} calls" + (f" (the first {n} to get an answer; {data.dropped} more not drawn)" if data.dropped else "")
    ax.set_title(f"Call timeline: {shown}")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return fig


def histogram_figure(latencies: Any) -> Figure:
    """Histogram of call latencies (received - submitted, seconds) with p50/p90/p99 marked."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lat = np.sort(np.array(latencies, dtype=float))
    if not len(lat):
        raise ValueError("plot(): no call has finished yet; run some calls (and await them) before plotting")
    fig = Figure(figsize=(10, 6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bins = int(np.clip(np.sqrt(len(lat)) * 2, 10, 80))
    ax.hist(lat, bins=bins, color="#4c72b0", edgecolor="white", linewidth=0.5)
    for p, colour, style in ((50, "#2ca02c", "-"), (90, "#ff7f0e", "--"), (99, "#d62728", ":")):
        v = percentile(lat, p)
        assert v is not None
        ax.axvline(v, color=colour, linestyle=style, linewidth=2, label=f"p{p} = {v:.3f} s")
    ax.set_xlabel("latency: received - submitted (seconds)")
    ax.set_ylabel("calls")
    ax.set_title(f"Call latency: {len(lat)} calls")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best")
    return fig


def write_plots(stats: Stats, dest_dir: str | Path, name: str) -> list[Path]:
    """Write ``<name>_timeline.png`` and ``<name>_histogram.png`` into ``dest_dir`` (created if missing)."""
    _require_matplotlib()
    timeline = timeline_data(stats)
    latencies = stats.latencies[: len(stats.latencies)]
    dest = Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    paths = [dest / f"{name}_timeline.png", dest / f"{name}_histogram.png"]
    for fig, path in ((timeline_figure(timeline), paths[0]), (histogram_figure(latencies), paths[1])):
        fig.savefig(path, format="png")
    return paths
