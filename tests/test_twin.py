"""The Container Apps twin (tests/arm_endpoint.py) behaves as Microsoft documents, and the SDK
holds up against it: probes (defaults for the types an app leaves out, liveness acted on).

Each behaviour of the twin has a test showing it does it (with the SDK's old request where
that is what meets it), next to the test of the SDK against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from arm_endpoint import ArmEndpoint
from test_azure import REGISTRY_PASSWORD, apps_for, config, executor

from async_ca_exec import DeploymentError, RuntimeNotFoundError
from async_ca_exec.runtimes import azure as az

from conftest import nap_noting_replica


def add7(x: int) -> int:
    return x + 7


#: The SDK's probes before it defined startup and liveness: readiness on the health port only.
READINESS_ONLY = [p for p in az.PROBES if p["type"] == "Readiness"]


@contextlib.contextmanager
def main_port_flooded(arm: ArmEndpoint, app: str) -> Iterator[None]:
    """Fill the replica's main port the way a flood does: one refused request held in the
    tarpit (its one slot, in these tests) pauses accepting, then connections fill the kernel's
    accept queue (1,024), after which a new connection is not even answered."""
    replica = arm.replicas[app]
    port = replica.upstream
    held: list[socket.socket] = []
    try:
        refused = socket.create_connection(("127.0.0.1", port))
        held.append(refused)
        refused.sendall(b"POST /v1/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")  # unsigned
        deadline = time.monotonic() + 30
        while "refused requests held: not accepting" not in replica.log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the tarpit did not fill"
            time.sleep(0.05)
        for _ in range(1100):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            held.append(s)
        with pytest.raises(OSError):  # the main port answers nothing now (a timeout is an OSError)
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        yield
    finally:
        for s in held:
            s.close()


async def until(predicate: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def tarpit_of_one(arm: ArmEndpoint) -> None:
    """Replicas whose tarpit fills with one refused request; probes ten times as often."""
    arm.replica_env = {"ACX_REFUSAL_SLOTS": "1", "ACX_AUTH_DELAY": "60"}
    arm.probe_time_scale = 0.1


async def test_the_twin_adds_default_probes_and_restarts_a_replica_failing_liveness(
    arm: ArmEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no liveness probe of its own, the app gets Container Apps' default, TCP on the
    ingress target port: a flood on that port fails it and the replica is restarted."""
    monkeypatch.setattr(az, "PROBES", READINESS_ONLY)
    tarpit_of_one(arm)
    async with apps_for(config(arm, tmp_path)) as apps:
        info = await apps.deploy("default")
    first = arm.replicas[info.app].proc.pid
    with main_port_flooded(arm, info.app):
        await until(lambda: arm.restarts.get(info.app, 0) >= 1, "a liveness restart")
    assert arm.replicas[info.app].proc.pid != first
    assert any(app == info.app and "TimeoutError" in what for app, what in arm.probe_failures)


async def test_a_flood_on_the_main_port_does_not_get_a_replica_restarted(arm: ArmEndpoint, tmp_path: Path) -> None:
    """The SDK defines every probe on the health port, which no flood of the main port pauses:
    under the same flood the replica passes liveness and keeps running (and its calls)."""
    tarpit_of_one(arm)
    async with apps_for(config(arm, tmp_path)) as apps:
        info = await apps.deploy("default")
    kinds = [p["type"] for p in arm.state.apps[("rg-acx", info.app)]["properties"]["template"]["containers"][0]["probes"]]
    assert sorted(kinds) == ["Liveness", "Readiness", "Startup"]
    first = arm.replicas[info.app].proc.pid
    async with executor(config(arm, tmp_path)) as ex:
        noted = tmp_path / "running"
        running = ex.submit(nap_noting_replica, 8.0, str(noted))
        await until(noted.exists, "the call to start")
        with main_port_flooded(arm, info.app):
            # The default liveness probe would have restarted it within 3 periods (3 s here).
            await asyncio.sleep(6)
            # (A probe may time out once on a loaded machine; fewer than failureThreshold in a
            # row restart nothing, as on Azure.)
            assert arm.restarts.get(info.app, 0) == 0
        assert await running == 8.0  # the call in flight was not cut
    assert arm.replicas[info.app].proc.pid == first


async def test_the_twin_refuses_probes_outside_the_spec_limits(
    arm: ArmEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = [{**p, "failureThreshold": 11} if p["type"] == "Liveness" else p for p in az.PROBES]
    monkeypatch.setattr(az, "PROBES", bad)
    async with apps_for(config(arm, tmp_path)) as apps:
        with pytest.raises(DeploymentError, match=r"ContainerAppInvalidProbe: Liveness failureThreshold 11 is not in 1\.\.10"):
            await apps.deploy("default")
    assert not arm.replicas  # refused at PUT: nothing started


async def test_a_pull_azure_refuses_at_put_names_the_image_the_registry_and_the_fix(arm: ArmEndpoint, tmp_path: Path) -> None:
    """Container Apps tries the image with the app's registry credentials before it accepts
    the template: wrong credentials are a 400 at PUT (UNAUTHORIZED), not a revision that never
    starts; the error names the image, the registry and what to run, never the password."""
    image = f"{arm.registry}/me/rt:1"
    arm.images.add("me/rt:1")
    arm.registry_auth = "basic"
    arm.registry_login = ("me", "the-right-password-0b1c")
    async with apps_for(config(arm, tmp_path)) as apps:  # docker_password: REGISTRY_PASSWORD, not that one
        with pytest.raises(RuntimeNotFoundError) as refused:
            await apps.deploy(image)
    text = str(refused.value)
    assert f"cannot pull runtime image {image}: registry {arm.registry} refused the app's credentials" in text
    assert f"docker login {arm.registry}" in text and f"acx runtime deploy {image}" in text
    assert REGISTRY_PASSWORD not in text and "the-right-password" not in text
    assert [r.status for r in arm.requests if r.method == "PUT"] == [400] and not arm.replicas
    arm.registry_login = ("me", REGISTRY_PASSWORD)  # fixed: the same deploy goes through
    async with apps_for(config(arm, tmp_path)) as apps:
        info = await apps.deploy(image)
    assert info.runtime == image and arm.replicas


async def test_the_twin_pulls_as_an_identity_only_when_the_app_has_it_and_it_holds_acr_pull(
    arm: ArmEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry entry naming an identity the app was not given is a 400 (its code is not
    sourced: one the SDK does not know); one the app has pulls only with AcrPull."""
    from test_azure import UAI, private_registry

    private_registry(arm)
    arm.acr_pull_identities.add(UAI)
    real = az.app_body

    def without_identity(**kw: object) -> dict[str, object]:
        body = real(**kw)  # type: ignore[arg-type]
        body.pop("identity")
        return body

    monkeypatch.setattr(az, "app_body", without_identity)
    cfg = config(arm, tmp_path, azure_containers={"registry_identity": UAI, "docker_user": None, "docker_password": None})
    async with apps_for(cfg) as apps:
        with pytest.raises(DeploymentError, match=r"HTTP 400 .*ContainerAppInvalidRegistryIdentity.*is not assigned"):
            await apps.deploy("default")
        monkeypatch.setattr(az, "app_body", real)
        arm.acr_pull_identities.clear()
        with pytest.raises(RuntimeNotFoundError, match="UNAUTHORIZED"):
            await apps.deploy("default")
        assert not arm.replicas and not arm.state.apps
        arm.acr_pull_identities.add(UAI)
        assert (await apps.deploy("default")).state == "Succeeded"


async def test_the_twin_reports_the_environments_cores_and_fails_a_revision_past_its_quota(
    arm: ArmEndpoint, tmp_path: Path
) -> None:
    """Usages count every active replica's cores; a new revision whose minReplicas do not fit
    what is free ends Failed with the message the quotas page quotes, the old one running on."""
    arm.core_quota = 1
    async with apps_for(config(arm, tmp_path)) as apps:
        info = await apps.deploy("default")
        quota = await apps.core_quota("rg-acx", "acx")
        assert (quota.limit, quota.used) == (1, 0.25)
        app = await apps.get_app(info.app)
        assert app is not None
        _min, change = az.plan_warm(app, 5, lease=60, min_workers=0, max_workers=100)  # 1.25 cores
        assert change is not None
        pid = arm.replicas[info.app].proc.pid
        with pytest.raises(DeploymentError, match=r"Maximum Allowed Cores exceeded for the Managed Environment\."):
            await apps.apply(info.app, change)  # past the SDK's own check
        state = arm.state.apps[("rg-acx", info.app)]["properties"]
        assert state["template"]["scale"]["minReplicas"] == 0 and state["provisioningState"] == "Failed"
        assert arm.replicas[info.app].proc.pid == pid and arm.replicas[info.app].proc.poll() is None
        _min, fits = az.plan_warm(app, 3, lease=60, min_workers=0, max_workers=100)  # 0.75 of 0.75 free
        assert fits is not None and await apps.apply(info.app, fits) == 3
        # The old revision's replica counts until it has drained and exited (the new one's three
        # fit beside it: 1.0 of 1); then the three alone.
        for _ in range(300):
            used = (await apps.core_quota("rg-acx", "acx")).used
            assert used <= 1.0
            if used == 0.75 and arm.replica_count(info.app) == 3 and len(arm.fleets[info.app].replicas) == 3:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"{used} cores used, {arm.replica_count(info.app)} replicas, not 0.75 and 3")


async def test_a_template_change_starts_a_new_revision_whose_replicas_serve_before_the_old_ones_stop(
    arm: ArmEndpoint, tmp_path: Path
) -> None:
    """Single revision mode: a template change (here a scale change, raising minReplicas as
    warm() did before the demand queue) creates a revision; its replica is up before the old
    one gets SIGTERM, and the call running on the old one finishes there."""
    cfg = config(arm, tmp_path, azure_containers={"demand_queue": False})
    async with apps_for(cfg) as apps:
        info = await apps.deploy("default")
        before = list(arm.revisions[info.app])
        old = arm.replicas[info.app]
        async with executor(cfg) as ex:
            noted = tmp_path / "running"
            running = ex.submit(nap_noting_replica, 4.0, str(noted))
            await until(noted.exists, "the call to start")
            assert int(noted.read_text().split()[0]) == old.proc.pid
            await apps.warm(info.app, 1, lease=60)  # minReplicas 0 -> 1: a template change
            assert arm.revisions[info.app] == [*before, arm.revisions[info.app][-1]]  # one new revision
            new = arm.replicas[info.app]
            assert new.revision == arm.revisions[info.app][-1] != old.revision
            assert new.proc.pid != old.proc.pid
            stopped = next(t for t, rid, _n in arm.scale_ins if rid == old.id)
            assert new.created <= stopped  # the new replica was ready before the old one was told to stop
            assert await running == 4.0  # the call in flight on the old replica finished there
            await until(lambda: old.proc.poll() is not None, "the old replica to exit")
            assert old.proc.returncode in (0, -15)  # it drained and exited on SIGTERM, within its grace
            assert await ex.map(add7, range(3)) == [7, 8, 9]  # served by the new revision


async def test_a_replica_told_to_stop_is_killed_when_its_grace_period_ends(arm: ArmEndpoint, tmp_path: Path) -> None:
    """Scale-in and revision swaps send SIGTERM and honour terminationGracePeriodSeconds:
    SIGKILL when it ends (application-lifecycle-management#shutdown)."""
    async with apps_for(config(arm, tmp_path)) as apps:
        info = await apps.deploy("default")
    app = arm.state.apps[("rg-acx", info.app)]
    assert app["properties"]["template"]["terminationGracePeriodSeconds"] >= 10  # the SDK's: runtime_timeout + 10
    async with executor(config(arm, tmp_path)) as ex:
        noted = tmp_path / "running"
        running = ex.submit(nap_noting_replica, 30.0, str(noted))
        await until(noted.exists, "the call to start")
        replica = arm.replicas[info.app]
        app["properties"]["template"]["terminationGracePeriodSeconds"] = 1  # as if deployed with 1 s
        t0 = time.monotonic()
        arm.scale_in(info.app, replica.id)
        await until(lambda: replica.proc.poll() is not None, "the replica to be killed", timeout=10)
        assert replica.proc.returncode == -9  # SIGTERM did not end a replica still running a call: SIGKILL did
        print(f"killed {time.monotonic() - t0:.1f} s after SIGTERM (grace 1 s)")
        running.cancel()
