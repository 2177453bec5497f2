"""How replicas follow a job on Azure: the twin's scaling model (tests/scaling.py) on its own,
then the SDK's demand queue against the twin, which scales real replica processes from the real
(Azurite) queue and from arrivals at its ingress. Times are scaled down: a 15 s HTTP window
becomes 1.5 s, the 5 s polling interval 1 s, the 300 s cooldown 3 s."""

from __future__ import annotations

import asyncio
import contextlib
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
from arm_endpoint import ArmEndpoint
from scaling import ScaleModel, ScaleSettings
from test_azure import apps_for, config, executor

from async_ca_exec import ConfigError
from async_ca_exec.runtimes import azure as az
from async_ca_exec.runtimes import demand as dq

TESTS = Path(__file__).resolve().parent

#: Scaled-down platform timings for these tests (see the module docstring).
FAST = {"scale_polling_interval": 1, "scale_cooldown": 3, "demand_ttl": 4, "worker_processes": 4, "max_workers": 8}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the model ---------------------------------------------------------------------------------


def test_http_rule_counts_arrivals_per_window_not_requests_in_flight() -> None:
    clock = Clock()
    model = ScaleModel(ScaleSettings(max_replicas=100, cooldown=300, http_target=1), clock)
    for _ in range(150):  # a burst of 150 long calls, all arriving in the first second
        model.arrival()
    clock.now += 15
    assert model.decide(1) == 5  # 150 / 15 s = 10 per second wanted 10 replicas: 4 more per 15 s period
    clock.now += 14
    assert model.decide(5) == 5  # however often the rules are read within the period
    clock.now += 1  # nothing new arrived: the rule reads 0 although 150 calls still run
    assert model.decide(5) == 5  # kept only by the stabilization window...
    clock.now += 301
    assert model.decide(5) == 0  # ...and scaled to zero a cooldown later, calls or not
    assert model.http_evaluations == 2 + 20


def test_scale_up_grows_by_four_or_doubles_per_fifteen_second_period() -> None:
    clock = Clock()
    model = ScaleModel(ScaleSettings(max_replicas=100, polling=1, queue_target=1), clock)
    model.queue_reading(100)
    assert model.decide(0) == 4  # from zero: 4
    clock.now += 10
    model.queue_reading(100)
    assert model.decide(4) == 4  # the rest of the period adds nothing, however often it is read
    grown = [4]
    for _ in range(3):
        clock.now += 5
        model.queue_reading(100)
        grown.append(model.decide(grown[-1]))
        clock.now += 10
    assert grown == [4, 8, 16, 32]  # then max(4 more, 100 % of current) per period


def test_queue_rule_asks_one_replica_per_queue_length_messages_and_honours_min_and_max() -> None:
    clock = Clock()
    model = ScaleModel(ScaleSettings(min_replicas=1, max_replicas=5, polling=30, cooldown=300, queue_target=2), clock)
    assert model.queue_due()
    model.queue_reading(9)
    assert not model.queue_due()
    assert model.decide(1) == 5  # ceil(9 / 2) = 5 wanted: 1 + 4 in the first 15 s period
    model.queue_reading(40)
    assert model.decide(5) == 5  # maxReplicas caps it
    clock.now += 30
    model.queue_reading(0)  # the last event was the poll 30 s ago
    clock.now += 269
    assert model.decide(5) == 5  # within the cooldown of the last event
    clock.now += 2
    assert model.decide(5) == 1  # minReplicas
    model.queue_reading(None)  # a read that failed asks for nothing
    assert model.decide(1) == 1


# -- the twin ----------------------------------------------------------------------------------


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


async def deploy(arm: ArmEndpoint, cfg: Path) -> str:
    async with apps_for(cfg) as apps:
        info = await apps.deploy("default")
    return info.app


def rules(arm: ArmEndpoint, app: str) -> list[dict[str, Any]]:
    return arm.state.apps[("rg-acx", app)]["properties"]["template"]["scale"]["rules"]


async def settle(arm: ArmEndpoint, app: str, count: int, limit: float) -> float:
    """Seconds until the twin runs ``count`` replicas of ``app``."""
    t0 = time.monotonic()
    while arm.replica_count(app) != count:
        assert time.monotonic() - t0 < limit, f"{app}: {arm.replica_count(app)} replicas, not {count}, after {limit:g} s"
        await asyncio.sleep(0.1)
    return time.monotonic() - t0


async def test_deploy_gives_the_app_a_demand_queue_rule_with_a_read_only_secret(arm: ArmEndpoint, tmp_path: Path) -> None:
    app = await deploy(arm, config(arm, tmp_path, azure_containers=FAST))
    put = arm.bodies("PUT")[-1]
    scale = put["properties"]["template"]["scale"]
    assert scale["pollingInterval"] == 1 and scale["cooldownPeriod"] == 3
    queue = next(r["azureQueue"] for r in scale["rules"] if r["name"] == dq.DEMAND_RULE)
    assert queue["queueName"] == dq.queue_name(app) and queue["queueLength"] == 1
    secret = next(s["value"] for s in put["properties"]["configuration"]["secrets"] if s["name"] == dq.DEMAND_SECRET)
    assert "AccountKey" not in secret and "sp=r&" in secret  # a read-only SAS, not the account key
    # The twin reads the queue with that secret alone (a poll every second).
    await asyncio.sleep(2.5)
    assert arm.fleets[app].model.queue_polls >= 2 and not arm.queue_errors


async def test_long_calls_keep_their_replicas_until_they_end_then_the_app_scales_to_zero(
    arm: ArmEndpoint, tmp_path: Path
) -> None:
    """24 calls of 6 s at max_concurrency 24, 4 workers a replica: 6 replicas, up within a
    polling interval and the cold start, none scaled in under a call; zero after the cooldown."""
    arm.http_window = 1.5
    cfg = config(arm, tmp_path, azure_containers=FAST, lithops={"max_concurrency": 24})
    app = await deploy(arm, cfg)
    await settle(arm, app, 0, 20)  # the deploy's replica scales in after the cooldown
    async with executor(cfg) as ex:
        t0 = time.monotonic()
        job = asyncio.ensure_future(ex.map(sleep_for, [6.0] * 24))
        up = await settle(arm, app, 6, 15)
        assert arm.replica_count(app) == 6
        results = await job
        took = time.monotonic() - t0
    assert results == [6.0] * 24
    # All 6 up within settle()'s 15 s (a polling interval, 1 s, and the replicas' cold start);
    # how long exactly is printed, not asserted (tests never assert on wall-clock time).
    print(f"6 replicas up after {up:.1f} s; the job took {took:.1f} s")
    # No replica was told to stop while every call still ran (they all run 6 s from t0 at the
    # earliest). Later, as calls end, the demand falls and replicas go; one still running calls
    # queued on it drains them before it exits (its grace is runtime_timeout + 10 s).
    early = [s for s in arm.scale_ins if s[0] < t0 + 6 and s[2]]
    assert not early, f"replicas sent SIGTERM mid-call: {early}"
    await settle(arm, app, 0, 3 + 1 + 5)  # cooldown + polling + a margin
    assert max(n for _t, a, n in arm.scale_log if a == app) <= 8


async def test_without_the_demand_queue_the_http_rule_scales_in_replicas_running_long_calls(
    arm: ArmEndpoint, tmp_path: Path
) -> None:
    """What the demand queue is for: on arrivals alone, a replica is told to stop mid-call."""
    arm.http_window = 1.5
    fast = {**FAST, "demand_queue": False}
    cfg = config(arm, tmp_path, azure_containers=fast, lithops={"max_concurrency": 8})
    app = await deploy(arm, cfg)
    assert not [r for r in rules(arm, app) if r["name"] == dq.DEMAND_RULE]
    async with executor(cfg) as ex:
        t0 = time.monotonic()
        results = await ex.map(sleep_for, [8.0] * 8)
    assert results == [8.0] * 8  # the server drains (and the SDK retries a refused call)
    early = [s for s in arm.scale_ins if s[0] < t0 + 8 and s[2]]
    assert early, f"the HTTP rule alone should have scaled in a busy replica mid-call: {arm.scale_ins}"


async def test_many_short_calls_scale_out_on_the_http_rule_without_passing_max_workers(arm: ArmEndpoint, tmp_path: Path) -> None:
    arm.http_window = 1.0
    cfg = config(arm, tmp_path, azure_containers={**FAST, "max_workers": 3, "worker_processes": 1})
    app = await deploy(arm, cfg)
    async with executor(cfg) as ex:
        results = await ex.map(abs, range(-3000, 0), chunksize=1)
    assert results == list(range(3000, 0, -1))
    counts = [n for _t, a, n in arm.scale_log if a == app]
    assert counts and max(counts) == 3, counts


async def test_a_client_killed_mid_job_stops_asking_and_the_app_returns_to_zero(arm: ArmEndpoint, tmp_path: Path) -> None:
    arm.queue_gc = 1.0
    arm.http_window = 1.5  # the calls' own arrivals keep a replica for a window (15 s unscaled) too
    cfg = config(arm, tmp_path, azure_containers=FAST, lithops={"max_concurrency": 12})
    app = await deploy(arm, cfg)
    script = textwrap.dedent(f"""
        import asyncio, sys, time
        sys.path.insert(0, {str(TESTS)!r})
        from arm_endpoint import StaticToken
        from async_ca_exec import AsyncExecutor

        async def main():
            async with AsyncExecutor(config={str(cfg)!r}, credential=StaticToken()) as ex:
                await ex.map(time.sleep, [30] * 12)

        asyncio.run(main())
    """)
    env = {**os.environ, "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", "")}
    log = open(tmp_path / "client.log", "wb")  # noqa: ASYNC230 - a test's short-lived client
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=log)  # noqa: ASYNC220
    try:
        await settle(arm, app, 3, 30)  # 12 calls / 4 workers
        queue = dq.queue_client(*_account(cfg, app))
        async with queue:
            assert (await queue.get_queue_properties()).approximate_message_count == 3
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # The messages expire (demand_ttl 4 s), then the cooldown (3 s): zero replicas.
        await settle(arm, app, 0, 4 + 1 + 3 + 1 + 8)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _account(cfg: Path, app: str) -> tuple[dq.QueueAccount, str]:
    from async_ca_exec.config import load_config

    acct, why = dq.queue_account(load_config(cfg, env={}))
    assert acct is not None, why
    return acct, dq.queue_name(app)


async def test_warm_a_job_and_cool_create_no_revision(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path, azure_containers=FAST, lithops={"max_concurrency": 8})
    app = await deploy(arm, cfg)
    revisions = list(arm.revisions[app])
    async with executor(cfg) as ex:
        assert await ex.warm(5) == 5
        await settle(arm, app, 5, 15)
        assert await ex.map(sleep_for, [1.0] * 8) == [1.0] * 8
        assert arm.replica_count(app) >= 5  # the floor holds through the job
    await settle(arm, app, 0, 3 + 1 + 8)  # closing cools: the queue empties, the cooldown ends
    assert arm.revisions[app] == revisions
    assert not [r for r in arm.requests if r.method == "PATCH"]
    assert az.TAG_WARM not in (arm.state.apps[("rg-acx", app)].get("tags") or {})


def test_the_demand_sas_warning_says_when_it_expires_and_how_to_renew_it() -> None:
    now = 1_800_000_000.0
    assert dq.sas_warning("app", int(now + 31 * 86400), now=now) is None
    soon = dq.sas_warning("app", int(now + 10 * 86400 - 60), now=now)
    assert soon is not None and "in 10 days" in soon and "acx runtime update" in soon
    gone = dq.sas_warning("app", int(now - 60), now=now)
    assert gone is not None and "expired on" in gone and "acx runtime update" in gone


async def test_an_executor_warns_when_the_apps_demand_sas_is_about_to_expire(
    arm: ArmEndpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(arm, tmp_path)
    app = await deploy(arm, cfg)
    tags = arm.state.apps[("rg-acx", app)]["tags"]
    assert int(tags[az.TAG_DEMAND_SAS]) > time.time() + (dq.SAS_DAYS - 1) * 86400  # a fresh deploy: a year ahead
    async with executor(cfg) as ex:
        assert await ex.map(abs, [-1]) == [1]
    assert not [r for r in caplog.records if "read-only SAS" in r.getMessage()]
    tags[az.TAG_DEMAND_SAS] = str(int(time.time() + 5 * 86400))  # as it will be 360 days after the deploy
    with caplog.at_level(logging.WARNING, logger="async_ca_exec"):
        async with executor(cfg) as ex:
            assert await ex.map(abs, [-1]) == [1]
    [warning] = [r.getMessage() for r in caplog.records if "read-only SAS" in r.getMessage()]
    assert app in warning and "in 5 days" in warning and "acx runtime update" in warning
    assert "sig=" not in warning  # names the expiry, never the SAS
    async with apps_for(cfg) as apps:
        await apps.update("default")  # renews it
    assert int(arm.state.apps[("rg-acx", app)]["tags"][az.TAG_DEMAND_SAS]) > time.time() + (dq.SAS_DAYS - 1) * 86400


async def test_past_the_core_quota_the_app_scales_out_to_what_fits_and_the_job_still_completes(
    arm: ArmEndpoint, tmp_path: Path
) -> None:
    """The quotas page: past the environment's cores "the app may be restricted from scaling
    out". The demand asks for 8 replicas of 0.25 vCPU; 0.75 cores fit 3, and the job runs on them."""
    arm.core_quota = 0.75
    arm.http_window = 1.5
    fast = {**FAST, "worker_processes": 1, "max_workers": 8}
    cfg = config(arm, tmp_path, azure_containers=fast, lithops={"max_concurrency": 12})
    app = await deploy(arm, cfg)  # (deploy warns: 8 x 0.25 = 2 cores, above the 0.75 allowed)
    async with executor(cfg) as ex:
        job = asyncio.ensure_future(ex.map(sleep_for, [2.0] * 12))
        await settle(arm, app, 3, 15)
        queue = dq.queue_client(*_account(cfg, app))
        async with queue:
            assert (await queue.get_queue_properties()).approximate_message_count == 8  # what the calls need
        assert await job == [2.0] * 12
    assert max(n for _t, a, n in arm.scale_log if a == app) == 3  # what fits, never more


# -- the demand queue's bookkeeping, against Azurite's queue service ----------------------------


class FailingEvery:
    """The real queue client, but every ``n``-th send_message fails after Storage stored the
    message's predecessors (a throttled put among successful ones)."""

    def __init__(self, client: Any, n: int) -> None:
        self.client, self.n, self.sends = client, n, 0

    async def send_message(self, *args: Any, **kw: Any) -> Any:
        self.sends += 1
        if self.sends % self.n == 0:
            raise OSError("503 Server Busy (injected)")
        return await self.client.send_message(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


async def _queue(azurite: Any, name: str) -> tuple[dq.QueueAccount, Any]:
    from conftest import AZURITE_ACCOUNT, AZURITE_KEY

    acct = dq.QueueAccount(AZURITE_ACCOUNT, azurite.queue_endpoint, AZURITE_KEY)
    await dq.ensure_queue(acct, name)
    return acct, dq.queue_client(acct, name)


async def _count(client: Any) -> int:
    return int((await client.get_queue_properties()).approximate_message_count)


async def test_syncs_at_once_put_each_missing_message_once(azurite: Any) -> None:
    """warm(), cool() and the loop may sync together: the queue gets what is wanted, once."""
    acct, probe = await _queue(azurite, "acx-demand-race")
    async with probe:
        queue = dq.DemandQueue(dq.queue_client(acct, "acx-demand-race"), lambda: 5, ttl=60)
        await asyncio.gather(queue.sync(), queue.sync(), queue.sync())
        assert queue.held == 5 and await _count(probe) == 5
        await queue.aclose()
        assert await _count(probe) == 0  # closing deletes every message it put


async def test_a_failed_put_loses_track_of_no_message_that_was_stored(azurite: Any) -> None:
    acct, probe = await _queue(azurite, "acx-demand-partial")
    async with probe:
        client = FailingEvery(dq.queue_client(acct, "acx-demand-partial"), 3)
        queue = dq.DemandQueue(client, lambda: 7, ttl=60)
        with pytest.raises(OSError, match="injected"):
            await queue.sync()  # 2 of 3 puts stored, and so on
        stored = await _count(probe)
        assert 0 < stored < 7 and queue.held == stored  # each stored message is tracked
        for _ in range(5):  # the loop's retries (every third put keeps failing)
            with contextlib.suppress(OSError):
                await queue.sync()
        assert queue.held == await _count(probe) == 7
        await queue.aclose()
        assert await _count(probe) == 0


async def test_a_smaller_warm_does_not_lower_the_floor_in_effect(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path, azure_containers=FAST)
    app = await deploy(arm, cfg)
    async with dq.queue_client(*_account(cfg, app)) as queue:
        async with executor(cfg) as ex:
            assert await ex.warm(4) == 4
            assert await _count(queue) == 4
            # A prewarm map of one item asks for one replica under its own short lease.
            assert await ex.map(abs, [-1], prewarm=True) == [1]
            assert await _count(queue) == 4  # the explicit warm's floor holds
        assert await _count(queue) == 0


async def test_warm_on_an_app_without_the_demand_rule_raises_min_replicas_instead(arm: ArmEndpoint, tmp_path: Path) -> None:
    """An app deployed with demand_queue off (or by an older version) has no queue rule:
    messages would ask no one, so warm() takes the ARM way (a new revision)."""
    app = await deploy(arm, config(arm, tmp_path, azure_containers={**FAST, "demand_queue": False}))
    assert not [r for r in rules(arm, app) if r["name"] == dq.DEMAND_RULE]
    async with executor(config(arm, tmp_path, azure_containers=FAST)) as ex:
        assert await ex.warm(2) == 2
        assert arm.state.apps[("rg-acx", app)]["properties"]["template"]["scale"]["minReplicas"] == 2
    assert arm.state.apps[("rg-acx", app)]["properties"]["template"]["scale"]["minReplicas"] == 0  # restored


async def test_warming_through_the_queue_counts_the_replicas_already_running(arm: ArmEndpoint, tmp_path: Path) -> None:
    """No new revision: only the replicas to add need free cores (1 core: 2 run, 2 more fit)."""
    arm.core_quota = 1.0
    cfg = config(arm, tmp_path, azure_containers=FAST)
    app = await deploy(arm, cfg)
    async with executor(cfg) as ex:
        assert await ex.warm(2) == 2
        await settle(arm, app, 2, 15)
        assert await ex.warm(4) == 4  # 2 more x 0.25 = 0.5 of the 0.5 free
        await settle(arm, app, 4, 15)
        with pytest.raises(ConfigError, match=r"cannot pre-warm 5 replicas .*\(4 of them run already\).*warm at most 4"):
            await ex.warm(5)


def test_the_queue_service_follows_blob_endpoint_for_other_clouds() -> None:
    from async_ca_exec.config import Config

    def account(endpoint: str) -> tuple[dq.QueueAccount | None, str]:
        storage = {"storage_account_name": "acct", "storage_account_key": "a2V5", "blob_endpoint": endpoint}
        return dq.queue_account(Config.model_validate({"azure_storage": storage}))

    acct, _ = account("https://acct.blob.core.chinacloudapi.cn")
    assert acct is not None and acct.endpoint == "https://acct.queue.core.chinacloudapi.cn"
    none, why = account("http://127.0.0.1:10000/acct")
    assert none is None and "connection_string with its QueueEndpoint" in why


async def test_a_deploy_whose_queue_cannot_be_created_warns_and_goes_on_without_it(arm: ArmEndpoint, tmp_path: Path) -> None:
    from conftest import AZURITE_ACCOUNT, AZURITE_KEY, free_port

    storage = {
        "connection_string": (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={arm.storage[0].endpoint};QueueEndpoint=http://127.0.0.1:{free_port()}/{AZURITE_ACCOUNT};"
        ),
        "container": arm.storage[1],
    }
    said: list[str] = []
    async with apps_for(config(arm, tmp_path, azure_storage=storage), progress=said.append) as apps:
        info = await apps.deploy("default")
    assert info.state == "Succeeded"
    [warning] = [line for line in said if "no demand queue" in line]
    assert "could not create the demand queue" in warning and "AccountKey" not in warning and AZURITE_KEY not in warning
    assert not [r for r in rules(arm, info.app) if r["name"] == dq.DEMAND_RULE]


@pytest.mark.parametrize(
    ("storage", "why"),
    [
        (None, "azure_storage is not configured"),
        ("sas", "holds no account key (a SAS cannot sign the app's read-only SAS)"),
    ],
)
async def test_without_a_storage_key_deploy_warns_that_long_calls_may_lose_their_replicas(
    arm: ArmEndpoint, tmp_path: Path, storage: str | None, why: str
) -> None:
    import yaml

    cfg = config(arm, tmp_path)
    doc = yaml.safe_load(cfg.read_text())
    if storage is None:
        del doc["azure_storage"]
        doc["lithops"]["storage"] = "localhost"
    else:
        import datetime as dt

        from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

        from conftest import AZURITE_ACCOUNT, AZURITE_KEY

        sas = generate_account_sas(
            AZURITE_ACCOUNT, AZURITE_KEY, ResourceTypes(service=True, container=True, object=True),
            AccountSasPermissions(read=True, write=True, create=True, list=True, delete=True),
            expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1),
        )  # fmt: skip
        endpoints = f"BlobEndpoint={arm.storage[0].endpoint};QueueEndpoint={arm.storage[0].queue_endpoint}"
        doc["azure_storage"]["connection_string"] = f"{endpoints};SharedAccessSignature={sas}"
    cfg.write_text(yaml.safe_dump(doc))
    said: list[str] = []
    async with apps_for(cfg, progress=said.append) as apps:
        info = await apps.deploy("default")
    [warning] = [line for line in said if "no demand queue" in line]
    assert why in warning and "may scale in replicas still running calls longer than about 315 s" in warning
    assert "configure azure_storage with a connection string or account key" in warning
    assert "sig=" not in warning
    assert not [r for r in rules(arm, info.app) if r["name"] == dq.DEMAND_RULE]
