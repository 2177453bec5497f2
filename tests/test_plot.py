"""plot() and job_summary()'s resource figures, on the real local runtime."""

from __future__ import annotations

import asyncio
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from async_ca_exec import AsyncExecutor
from async_ca_exec.jobs import CallRows, Stats
from async_ca_exec.plot import timeline_data

LAYOUT = {"localhost": {"replicas": 2, "worker_processes": 2}}


def nap(x: int) -> int:
    time.sleep(0.02 + 0.01 * (x % 4))
    return x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


def assert_real_picture(path: Path) -> None:
    img = imread(path)
    h, w = img.shape[:2]
    assert w >= 600 and h >= 400, (w, h)
    rgb = img[..., :3]
    assert float(rgb.std()) > 0.05, "blank picture"
    assert float((rgb < 0.95).any(axis=-1).mean()) > 0.03, "almost all white"
    colours = np.unique((rgb.reshape(-1, 3) * 255).round().astype(np.uint8), axis=0)
    assert len(colours) > 20, len(colours)


async def test_plot_writes_a_timeline_and_a_histogram_of_a_map(tmp_path: Path) -> None:
    async with AsyncExecutor(config=LAYOUT) as ex:
        assert await ex.map(nap, range(40)) == list(range(40))
        dest = tmp_path / "new" / "dir"  # created if missing
        paths = ex.plot(dest)
        data = timeline_data(ex._stats)
    assert paths == [dest / f"{ex.executor_id}_timeline.png", dest / f"{ex.executor_id}_histogram.png"]
    for p in paths:
        assert_real_picture(p)
    assert len(data) == 40  # a row per call
    assert not np.isnan(data.started).any() and not np.isnan(data.sent).any()
    assert (data.submitted >= 0).all() and (np.diff(data.submitted) >= 0).all()  # submission order, from x = 0
    assert (data.sent >= data.submitted).all() and (data.received >= data.sent).all()
    assert (data.finished >= data.started).all() and (data.finished - data.started >= 0.015).all()
    assert {data.replicas[r] for r in data.replica} <= {"local-0", "local-1"}


async def test_timeline_rows_cover_futures_imap_map_and_failures(tmp_path: Path) -> None:
    async with AsyncExecutor(config=LAYOUT) as ex:
        futs = [ex.submit(nap, i) for i in range(5)]
        await asyncio.gather(*futs)
        got = [x async for x in ex.imap(nap, range(7))]
        assert sorted(got) == list(range(7))
        results = await ex.map(fail_on_three, range(6), chunksize=3, return_exceptions=True)
        assert isinstance(results[3], ValueError)
        data = timeline_data(ex._stats)
        assert len(data) == 5 + 7 + 6
        assert ex.job_summary()["calls"]["failed"] == 1
        st = futs[0].stats
        row = int(np.argmin(np.abs(data.submitted + data.origin - st["submitted"])))
        assert math.isclose(data.started[row] + data.origin, st["started"], abs_tol=1e-6)
        assert data.replicas[data.replica[row]] == st["replica"]
        paths = ex.plot(tmp_path)
    assert all(p.stat().st_size > 1000 for p in paths)


async def test_plot_before_any_answer_is_a_clear_value_error(tmp_path: Path) -> None:
    async with AsyncExecutor(config=LAYOUT) as ex:
        with pytest.raises(ValueError, match="no call has finished yet"):
            ex.plot(tmp_path)
    assert not list(tmp_path.iterdir())


async def test_plot_without_matplotlib_names_the_extra_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with AsyncExecutor(config=LAYOUT) as ex:
        await ex.map(nap, range(3))
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        with pytest.raises(ImportError, match=r"pip install async_ca_exec\[plot\]"):
            ex.plot(tmp_path)


async def test_job_summary_gib_seconds_with_local_runtime_memory() -> None:
    async with AsyncExecutor(config=LAYOUT, runtime_memory=1024) as ex:
        await ex.map(nap, range(8))
        s = ex.job_summary()
    assert s["worker_seconds"] >= 8 * 0.02
    assert s["gib_seconds"] == pytest.approx(s["worker_seconds"] * 1.0)
    assert s["vcpu_seconds"] is None and s["estimated_cost"] is None and s["currency"] is None
    async with AsyncExecutor(config=LAYOUT) as ex:  # no memory limit: no GiB-seconds either
        await ex.map(nap, range(2))
        s = ex.job_summary()
    assert s["worker_seconds"] > 0 and s["gib_seconds"] is None and s["estimated_cost"] is None


def test_job_summary_cost_on_azure_from_worker_seconds_and_configured_prices() -> None:
    ex = AsyncExecutor(backend="azure", runtime_memory=2048)  # not started: only the arithmetic
    ex._stats.worker_seconds = 100.0
    s = ex.job_summary()
    assert s["gib_seconds"] == pytest.approx(200.0)  # 2 GiB
    assert s["vcpu_seconds"] == pytest.approx(100.0)  # 2048 MB <-> 1 vCPU
    assert s["estimated_cost"] == pytest.approx(100 * 0.000024 + 200 * 0.000003)
    assert s["currency"] == "USD" and "estimate" in s["cost_basis"] and "free grant" in s["cost_basis"]

    prices = {"azure_containers": {"runtime_memory": 512, "price_vcpu_second": 0.001, "price_gib_second": 0.01}}
    ex = AsyncExecutor(backend="azure", config=prices)
    ex._stats.worker_seconds = 10.0
    s = ex.job_summary()
    assert s["vcpu_seconds"] == pytest.approx(2.5) and s["gib_seconds"] == pytest.approx(5.0)
    assert s["estimated_cost"] == pytest.approx(2.5 * 0.001 + 5.0 * 0.01)


def test_timing_rows_are_bounded_and_compact() -> None:
    rows = CallRows(limit=3)
    for i in range(5):
        rows.add(float(i), None, None, None, float(i) + 1, f"r{i % 2}")
    assert len(rows) == 3 and rows.dropped == 2 and rows.replicas == ["r0", "r1"]
    assert math.isnan(rows.sent[0])
    per_call = sum(a.itemsize for a in (rows.submitted, rows.sent, rows.started, rows.finished, rows.received, rows.replica))
    assert per_call <= 50
    stats = Stats()
    stats.rows = rows
    stats.record_rows(0.0, 0.5, 2.0, range(4), None, "r0")
    assert len(rows) == 3 and rows.dropped == 6
