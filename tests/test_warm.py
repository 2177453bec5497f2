"""Pre-warming without a demand queue: ``warm()`` and ``map(prewarm=True)`` raise the app's
minReplicas through ARM and put it back, against the HTTPS ARM test endpoint with the real
azure-mgmt-appcontainers client."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from arm_endpoint import ArmEndpoint, StaticToken
from test_azure import REGISTRY_PASSWORD, apps_for, executor
from test_azure import config as azure_config

import async_ca_exec as acx
from async_ca_exec import AsyncExecutor, AuthenticationError, ConfigError
from async_ca_exec.runtimes import azure as az

TESTS = Path(__file__).resolve().parent
RG = "rg-acx"


def config(arm: ArmEndpoint, tmp_path: Path, **overrides: Any) -> Path:
    """The Azure tests' config without the demand queue: warm() then raises minReplicas (a
    template change, so a new revision) as these tests check; tests/test_scaling.py checks
    the demand queue's way."""
    overrides["azure_containers"] = {"demand_queue": False, **overrides.get("azure_containers", {})}
    return azure_config(arm, tmp_path, **overrides)


def add7(x: int) -> int:
    return x + 7


async def deployed(arm: ArmEndpoint, cfg: Path) -> tuple[str, dict[str, Any]]:
    """Deploy the default runtime; its app name and the exact PUT body."""
    async with apps_for(cfg) as apps:
        info = await apps.deploy("default")
    return info.app, arm.bodies("PUT")[-1]


def expected_patch(put: dict[str, Any], *, tags: dict[str, str], **scale: int) -> dict[str, Any]:
    """What a scale PATCH must carry: every tag, the whole template as deployed with only
    ``scale`` changed, and nothing else (no configuration, so no secret)."""
    template = copy.deepcopy(put["properties"]["template"])
    template["scale"].update(scale)
    return {"tags": tags, "properties": {"template": template}}


def app_state(arm: ArmEndpoint, app: str) -> dict[str, Any]:
    return arm.state.apps[(RG, app)]


def min_replicas(arm: ArmEndpoint, app: str) -> int:
    return int(app_state(arm, app)["properties"]["template"]["scale"]["minReplicas"])


async def until(predicate: Any, what: str, limit: float = 30.0) -> None:
    """Poll ``predicate`` (the double's state changes in its own thread) until it holds."""
    for _ in range(int(limit / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not within {limit:g} s")


def answered_patches(arm: ArmEndpoint) -> list[Any]:
    """PATCH bodies the double has answered (and so applied): it records a request on arrival."""
    return [r.body for r in arm.requests if r.method == "PATCH" and r.status]


def lease_tag(arm: ArmEndpoint, app: str) -> az.WarmLease | None:
    value = (app_state(arm, app).get("tags") or {}).get(az.TAG_WARM)
    return None if value is None else az.WarmLease.parse(value)


# -- warm() and aclose() ---------------------------------------------------------------------


async def test_warm_patches_only_min_replicas_and_a_lease_tag_and_aclose_restores_it(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path)
    app, put = await deployed(arm, cfg)
    revision = app_state(arm, app)["properties"]["latestRevisionName"]
    async with executor(cfg) as ex:
        before = int(time.time())
        assert await ex.warm(3) == 3
        after = int(time.time())
        [patch] = arm.bodies("PATCH")
        tag = patch["tags"].pop(az.TAG_WARM)
        restore, _, end = tag.partition(":")
        assert restore == "0" and before + 3600 <= int(end) <= after + 3600  # restore 0, lease of an hour
        assert patch == expected_patch(put, tags=put["tags"], minReplicas=3)
        assert min_replicas(arm, app) == 3 and lease_tag(arm, app) == az.WarmLease(0, int(end))
        # A scale change is revision-scope: a new revision, with the same containers and secrets.
        assert app_state(arm, app)["properties"]["latestRevisionName"] != revision
        assert app_state(arm, app)["properties"]["configuration"]["secrets"] == put["properties"]["configuration"]["secrets"]
        assert await ex.map(add7, range(10)) == [i + 7 for i in range(10)]
    _warm, restore_patch = arm.bodies("PATCH")
    assert restore_patch == expected_patch(put, tags=put["tags"], minReplicas=0)  # the tag is gone: tags replace
    assert min_replicas(arm, app) == 0 and az.TAG_WARM not in app_state(arm, app)["tags"]
    patches = [r for r in arm.requests if r.method == "PATCH"]
    assert [r.status for r in patches] == [202, 202]


async def test_warm_twice_restores_the_original_once_and_never_lowers(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path)
    app, put = await deployed(arm, cfg)
    async with executor(cfg) as ex:
        assert await ex.warm(2) == 2
        assert await ex.warm(4) == 4
        assert await ex.warm(1) == 4  # never lowered, and no PATCH for it
        assert len(arm.bodies("PATCH")) == 2
        held = lease_tag(arm, app)
        assert held is not None and held.restore_min == 0
    warm2, warm4, restore = arm.bodies("PATCH")
    assert [p["properties"]["template"]["scale"]["minReplicas"] for p in (warm2, warm4, restore)] == [2, 4, 0]
    assert warm4["tags"][az.TAG_WARM].startswith("0:")  # the original, not the value the first warm() set
    assert restore == expected_patch(put, tags=put["tags"], minReplicas=0)
    assert min_replicas(arm, app) == 0


async def test_warm_never_goes_below_min_workers_and_raises_max_replicas_only_when_needed(
    arm: ArmEndpoint, tmp_path: Path
) -> None:
    small = config(arm, tmp_path, azure_containers={"min_workers": 2, "max_workers": 3})
    app, put = await deployed(arm, small)
    async with executor(small) as ex:
        assert await ex.warm(0) == 2  # min_workers already holds: nothing to change, nothing to restore
        assert arm.bodies("PATCH") == []
    # The app still has maxReplicas 3; this client may use up to 6.
    bigger = config(arm, tmp_path, azure_containers={"min_workers": 2, "max_workers": 6})
    async with executor(bigger) as ex:
        assert await ex.warm(5) == 5
        scale = app_state(arm, app)["properties"]["template"]["scale"]
        assert (scale["minReplicas"], scale["maxReplicas"]) == (5, 5)
        assert arm.bodies("PATCH")[0]["tags"][az.TAG_WARM].endswith(":3")  # maxReplicas to restore
    restore = arm.bodies("PATCH")[-1]
    assert restore == expected_patch(put, tags=put["tags"], minReplicas=2, maxReplicas=3)


async def test_warming_beyond_max_workers_is_a_config_error_before_any_arm_call(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path, azure_containers={"max_workers": 5})
    await deployed(arm, cfg)
    async with executor(cfg) as ex:
        sent = len(arm.requests)
        with pytest.raises(ConfigError, match=r"cannot pre-warm 6 replicas: azure_containers\.max_workers is 5"):
            await ex.warm(6)
        with pytest.raises(ValueError, match="replicas=-1"):
            await ex.warm(-1)
        with pytest.raises(ValueError, match="lease=0"):
            await ex.warm(1, lease=0)
        assert len(arm.requests) == sent
        assert await ex.warm(5) == 5  # the limit itself is fine
    assert [p["properties"]["template"]["scale"]["minReplicas"] for p in arm.bodies("PATCH")] == [5, 0]


# -- map(prewarm=True) ---------------------------------------------------------------------------


async def test_map_prewarm_raises_for_its_concurrency_without_waiting_then_restores(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path, lithops={"max_concurrency": 6})
    app, put = await deployed(arm, cfg)
    async with executor(cfg) as ex:
        await ex.start()
        # The PATCH's operation stays InProgress: the map must not wait for it.
        arm.hold_patches = True
        assert await ex.map(add7, range(20), prewarm=True) == [i + 7 for i in range(20)]
        await until(lambda: len(answered_patches(arm)) == 1, "the warm PATCH")
        [warm] = arm.bodies("PATCH")
        # min(20 items, max_concurrency 6) requests / 1 per replica (512 MB: 1 worker process).
        assert warm == expected_patch(put, tags={**put["tags"], az.TAG_WARM: warm["tags"][az.TAG_WARM]}, minReplicas=6)
        assert len(arm.bodies("PATCH")) == 1  # the restore waits for the warm PATCH's operation
        arm.hold_patches = False
        await until(lambda: len(answered_patches(arm)) == 2, "the restore after the map")
        await until(lambda: min_replicas(arm, app) == 0 and lease_tag(arm, app) is None, "minReplicas back to 0")
        assert arm.bodies("PATCH")[1] == expected_patch(put, tags=put["tags"], minReplicas=0)
        # Fewer items than max_concurrency and chunks: ceil(5 / 2) = 3 requests, 3 replicas.
        assert await ex.starmap(pow, [(2, i) for i in range(5)], chunksize=2, prewarm=True) == [2**i for i in range(5)]
        await until(lambda: len(answered_patches(arm)) == 4, "the restore after the starmap")
        assert [p["properties"]["template"]["scale"]["minReplicas"] for p in arm.bodies("PATCH")[2:]] == [3, 0]
    assert len(arm.bodies("PATCH")) == 4  # aclose had nothing left to restore


async def test_prewarm_goes_out_while_the_first_replica_is_still_cold_starting(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path)
    app, _put = await deployed(arm, cfg)
    arm.cold_start, arm.retry_after = 2.5, 1
    arm.replicas[app].created = cold = time.monotonic()  # scaled to zero: the ingress answers 503 for a while
    ex = executor(cfg)  # not started: map starts it, and the pre-warm does not wait for that either
    try:
        assert await ex.map(add7, range(12), prewarm=True) == [i + 7 for i in range(12)]
    finally:
        await ex.aclose()
    warm, restore = (r for r in arm.requests if r.method == "PATCH")
    first_answer = min(h.at for h in arm.ingress_hits if h.status == 200 and h.at > cold)
    assert any(h.status == 503 for h in arm.ingress_hits)
    assert warm.at < first_answer  # the other replicas' cold starts overlap with the first one's
    assert warm.body["properties"]["template"]["scale"]["minReplicas"] == 12
    assert restore.body["properties"]["template"]["scale"]["minReplicas"] == 0


async def test_map_prewarm_restores_after_an_error_and_keeps_an_explicit_warm(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path, lithops={"max_concurrency": 4})
    app, _put = await deployed(arm, cfg)

    async with executor(cfg) as ex:
        with pytest.raises(ZeroDivisionError):
            await ex.map(divide_ten_by, [1, 0, 2], prewarm=True)
        await until(lambda: len(answered_patches(arm)) == 2, "restored after the error")
        assert [p["properties"]["template"]["scale"]["minReplicas"] for p in arm.bodies("PATCH")] == [3, 0]
        assert min_replicas(arm, app) == 0 and lease_tag(arm, app) is None

        # Cancelled part-way: restored all the same.
        task = asyncio.ensure_future(ex.map(nap, [5.0] * 4, prewarm=True))
        await until(lambda: len(answered_patches(arm)) == 3, "the cancelled map's warm PATCH")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: len(answered_patches(arm)) == 4, "restored after the cancellation")
        assert min_replicas(arm, app) == 0

        # An explicit warm() is in effect: the map raises it further but leaves the restore to aclose.
        assert await ex.warm(2) == 2
        assert sorted([r async for r in ex.imap(add7, range(8), prewarm=True)]) == [i + 7 for i in range(8)]
        await until(lambda: min_replicas(arm, app) == 4, "the imap's warm PATCH")
        assert [p["properties"]["template"]["scale"]["minReplicas"] for p in arm.bodies("PATCH")[4:]] == [2, 4]
    assert [p["properties"]["template"]["scale"]["minReplicas"] for p in arm.bodies("PATCH")[4:]] == [2, 4, 0]
    assert lease_tag(arm, app) is None


def divide_ten_by(x: int) -> float:
    return 10 / x


def nap(x: float) -> float:
    time.sleep(x)
    return x


async def test_prewarm_failure_is_a_warning_and_the_job_still_runs(
    arm: ArmEndpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(arm, tmp_path)
    app, _put = await deployed(arm, cfg)
    async with executor(cfg) as ex:
        arm.fail_next["PATCH containerApps"] = (403, "AuthorizationFailed")
        with caplog.at_level(logging.WARNING, logger="async_ca_exec"):
            assert await ex.map(add7, range(5), prewarm=True) == [i + 7 for i in range(5)]
            await until(lambda: "pre-warming failed" in caplog.text, "the warning")
    assert "Contributor role" in caplog.text and min_replicas(arm, app) == 0
    assert [r.status for r in arm.requests if r.method == "PATCH"] == [403]  # nothing landed: nothing to restore


# -- errors -----------------------------------------------------------------------------------------


async def test_arm_403_on_warm_is_a_one_line_authentication_error(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path)
    app, _put = await deployed(arm, cfg)
    async with executor(cfg) as ex:
        arm.fail_next["PATCH containerApps"] = (403, "AuthorizationFailed")
        with pytest.raises(AuthenticationError) as err:
            await ex.warm(3)
        message = str(err.value)
        assert f"raising minReplicas of Container App {app} to 3" in message and "Contributor role" in message
        assert "\n" not in message and "rg-acx" in message
    assert [r.status for r in arm.requests if r.method == "PATCH"] == [403]
    assert min_replicas(arm, app) == 0


async def test_a_failed_restore_is_logged_with_the_fix_and_never_raised_from_aclose(
    arm: ArmEndpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(arm, tmp_path)
    app, _put = await deployed(arm, cfg)
    ex = executor(cfg)
    await ex.start()
    assert await ex.warm(3) == 3
    futures = [ex.submit(add7, i) for i in range(3)]
    assert await asyncio.gather(*futures) == [7, 8, 9]
    # Another client's change to the app outlasts what closing waits for it (a minute; 1 s here).
    monkeypatch.setattr(az, "RESTORE_WAIT", 1.0)
    arm.busy("containerApps", app, 3600)
    with caplog.at_level(logging.WARNING, logger="async_ca_exec"):
        await ex.aclose()  # does not raise
    assert [f.result() for f in futures] == [7, 8, 9]  # results are kept
    assert f"could not restore minReplicas=0 of Container App {app}" in caplog.text
    assert "another operation was changing the same resource (ContainerAppOperationInProgress)" in caplog.text
    assert arm.conflicts >= 2  # sent again before giving up
    assert f"az containerapp update -n {app} -g rg-acx --min-replicas 0" in caplog.text
    assert min_replicas(arm, app) == 3 and lease_tag(arm, app) is not None  # the lease stays for the next start


async def test_no_secret_in_any_patch_body_or_log(arm: ArmEndpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(arm, tmp_path, lithops={"log_level": "DEBUG"})
    app, _put = await deployed(arm, cfg)
    with caplog.at_level(logging.DEBUG):
        async with executor(cfg) as ex:
            await ex.warm(2)
            assert await ex.map(add7, range(4), prewarm=True) == [7, 8, 9, 10]
        async with executor(cfg) as ex:  # and a start that restores an ended lease
            await ex.warm(1, lease=1)
            app_state(arm, app)["tags"][az.TAG_WARM] = "0:1"  # as if it ended long ago
        async with executor(cfg):
            pass
    key = next(s["value"] for s in arm.state.secrets[(RG, app)] if s["name"] == az.HMAC_SECRET)
    patches = arm.bodies("PATCH")
    assert len(patches) >= 4
    for body in patches:
        text = json.dumps(body)
        assert key not in text and REGISTRY_PASSWORD not in text
        assert "configuration" not in body.get("properties", {})
    assert caplog.text and key not in caplog.text and REGISTRY_PASSWORD not in caplog.text


# -- crash safety -------------------------------------------------------------------------------------

CRASHING_CLIENT = """
import asyncio, os, sys
sys.path.insert(0, {tests!r})
from arm_endpoint import StaticToken
from async_ca_exec import AsyncExecutor

async def main():
    ex = AsyncExecutor(config={cfg!r}, credential=StaticToken())
    await ex.start()
    print(await ex.warm(3, lease=1), flush=True)
    await asyncio.sleep(3600)  # killed here, warm, without a chance to restore

asyncio.run(main())
"""


async def test_an_ended_lease_left_by_a_killed_client_is_restored_at_the_next_start(
    arm: ArmEndpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(arm, tmp_path)
    app, put = await deployed(arm, cfg)
    code = textwrap.dedent(CRASHING_CLIENT).format(tests=str(TESTS), cfg=str(cfg))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)  # warm, without a chance to restore
        await proc.wait()
    assert line.strip() == b"3", (await proc.stderr.read()).decode(errors="replace")
    held = lease_tag(arm, app)
    assert held is not None and min_replicas(arm, app) == 3
    # Another client starting within the lease leaves it alone...
    app_state(arm, app)["tags"][az.TAG_WARM] = az.WarmLease(0, int(time.time()) + 3600).tag
    async with executor(cfg):
        pass
    assert len(arm.bodies("PATCH")) == 1 and min_replicas(arm, app) == 3
    # ...and the first one after its end restores the app.
    app_state(arm, app)["tags"][az.TAG_WARM] = held.tag
    await until(lambda: time.time() > held.until, "the one-second lease's end", limit=5)
    with caplog.at_level(logging.WARNING, logger="async_ca_exec"):
        async with executor(cfg) as ex:
            assert await ex.map(add7, range(3)) == [7, 8, 9]
    assert arm.bodies("PATCH")[-1] == expected_patch(put, tags=put["tags"], minReplicas=0)
    assert len(arm.bodies("PATCH")) == 2 and min_replicas(arm, app) == 0 and lease_tag(arm, app) is None
    assert f"Container App {app} was left pre-warmed by a client that did not restore it" in caplog.text


async def test_runtime_update_ends_a_pre_warm_and_the_warming_client_then_leaves_it_be(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path)
    app, _put = await deployed(arm, cfg)
    notes: list[str] = []
    async with executor(cfg) as ex:
        assert await ex.warm(3) == 3
        async with apps_for(cfg, progress=notes.append) as apps:
            await apps.update("all")
        update = arm.bodies("PUT")[-1]
        assert update["properties"]["template"]["scale"]["minReplicas"] == 0 and az.TAG_WARM not in update["tags"]
        assert any(f"{app} was pre-warmed" in n and "min_workers=0" in n for n in notes)
    assert len(arm.bodies("PATCH")) == 1  # aclose found no lease of its own: no restore over the update
    assert min_replicas(arm, app) == 0


# -- the plan itself -------------------------------------------------------------------------------------


def _app(min_r: int = 0, max_r: int = 10, tag: str | None = None) -> dict[str, Any]:
    tags = {"acx-managed-by": "async_ca_exec"} | ({az.TAG_WARM: tag} if tag else {})
    return {"name": "a", "tags": tags, "properties": {"template": {
        "containers": [{"name": "c", "image": "i"}], "revisionSuffix": "old",
        "scale": {"minReplicas": min_r, "maxReplicas": max_r}}}}  # fmt: skip


def test_plan_warm_adopts_an_existing_lease_and_extends_it_only_past_the_slack() -> None:
    now = 1_000_000.0
    # Another client's lease (original minReplicas 1): that stays the value to restore.
    in_effect, change = az.plan_warm(_app(5, 10, "1:1003600"), 8, lease=600, min_workers=0, max_workers=100, now=now)
    assert in_effect == 8 and change is not None and change.lease == az.WarmLease(1, 1003600)
    template = change.body["properties"]["template"]
    assert "revisionSuffix" not in template  # a new revision cannot reuse the old one's suffix
    assert template["scale"] == {"minReplicas": 8, "maxReplicas": 10} and template["containers"] == [{"name": "c", "image": "i"}]
    # Already warm enough, lease long enough: nothing to send.
    assert az.plan_warm(_app(5, 10, "1:1003600"), 3, lease=3600, min_workers=0, max_workers=100, now=now) == (5, None)
    # Already warm enough, lease to extend: tags only (no template, so no new revision).
    in_effect, change = az.plan_warm(_app(5, 10, "1:1000100"), 3, lease=3600, min_workers=0, max_workers=100, now=now)
    assert (
        in_effect == 5
        and change is not None
        and change.body == {"tags": {"acx-managed-by": "async_ca_exec", az.TAG_WARM: "1:1003600"}}
    )
    # An ended lease of a client that died: its original value is restored later, not 5.
    _, change = az.plan_warm(_app(5, 10, "0:999000"), 6, lease=60, min_workers=0, max_workers=100, now=now)
    assert change is not None and change.lease == az.WarmLease(0, 1000060)


def test_plan_restore_only_restores_a_lease_of_its_own_and_a_mangled_tag_goes_to_min_workers() -> None:
    mine = az.WarmLease(0, 1003600)
    assert az.plan_restore(_app(5, 10, "0:1009999"), leases=[mine]) is None  # extended by another client since
    change = az.plan_restore(_app(5, 10, mine.tag), leases=[mine])
    assert change is not None and change.min_replicas == 0
    assert change.body["tags"] == {"acx-managed-by": "async_ca_exec"}
    assert change.body["properties"]["template"]["scale"] == {"minReplicas": 0, "maxReplicas": 10}
    assert az.plan_restore(_app(5, 10, "1:1003600"), expired_only=True, now=1_000_000) is None
    mangled = az.plan_restore(_app(5, 10, "five until friday"), expired_only=True, min_workers=2, now=1_000_000)
    assert mangled is not None and mangled.min_replicas == 2
    tag_only = az.plan_restore(_app(0, 10, "0:1"))  # the scale is already back: no template, no revision
    assert tag_only is not None and "properties" not in tag_only.body


# -- local backend and the synchronous facade ---------------------------------------------------------------


async def test_local_warm_is_a_no_op_that_says_how_many_replicas_are_warm(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="async_ca_exec"):
        async with AsyncExecutor(config={"localhost": {"replicas": 2, "worker_processes": 1}}) as ex:
            assert await ex.warm(50) == 2
            assert await ex.map(add7, range(6), prewarm=True) == [i + 7 for i in range(6)]
            assert await ex.map_reduce(add7, range(4), sum, prewarm=True) == 34
    assert "local runtime's 2 replicas are always warm" in caplog.text


async def test_function_executor_warm_and_map_prewarm(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path)
    app, _put = await deployed(arm, cfg)

    def run() -> list[int]:
        with acx.FunctionExecutor(backend="azure_containers", config=cfg, credential=StaticToken()) as fexec:
            fexec.map(add7, [1, 2, 3], prewarm=True)
            assert fexec.get_result() == [8, 9, 10]
            # Restored once every call of that map is done, without closing the executor.
            for _ in range(1500):
                if len(answered_patches(arm)) == 2:
                    break
                time.sleep(0.02)
            assert fexec.warm(2) == 2
            fexec.map(add7, [4, 5, 6, 7], prewarm=True)  # 4 replicas; warm() is in effect: no restore now
            assert fexec.get_result() == [11, 12, 13, 14]
            for _ in range(1500):
                if min_replicas(arm, app) == 4:
                    break
                time.sleep(0.02)
            assert len(arm.bodies("PATCH")) == 4
        return [p["properties"]["template"]["scale"]["minReplicas"] for p in arm.bodies("PATCH")]

    assert await asyncio.get_running_loop().run_in_executor(None, run) == [3, 0, 2, 4, 0]
    assert lease_tag(arm, app) is None
