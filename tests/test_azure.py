"""The Azure Container Apps backend, end to end against the HTTPS ARM test endpoint.

The real azure-mgmt-appcontainers aio client and the real executor talk to tests/arm_endpoint.py,
which starts a local replica of the real container server for each app created.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import ssl
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from arm_endpoint import ArmEndpoint, StaticToken

import async_ca_exec as acx
from async_ca_exec import (
    AsyncExecutor,
    AuthenticationError,
    ConfigError,
    DeploymentError,
    RuntimeMismatchError,
    RuntimeNotFoundError,
    Storage,
    protocol,
)
from async_ca_exec.config import load_config
from async_ca_exec.runtimes import azure as az
from async_ca_exec.runtimes import demand as dq

from conftest import Azurite

TESTS = Path(__file__).resolve().parent
SUB = "00000000-0000-0000-0000-000000000001"
REGISTRY_PASSWORD = "registry-pw-9f8e7d6c5b4a"


def add7(x: int) -> int:
    return x + 7


def config(arm: ArmEndpoint, tmp_path: Path, **overrides: Any) -> Path:
    """A Lithops-shaped config file pointing at the test endpoint."""
    doc: dict[str, Any] = {
        "lithops": {"backend": "azure_containers", "storage": "azure_storage"},
        "azure": {
            "subscription_id": SUB,
            "resource_group": "rg-acx",
            "region": "westeurope",
            "arm_endpoint": arm.url,
            "ca_bundle": str(arm.ca_pem),
            "polling_interval": 0,
            "arm_retries": 0,
        },
        "azure_containers": {
            "environment": "acx",
            "docker_server": arm.registry,
            "docker_user": "me",
            "docker_password": REGISTRY_PASSWORD,
            "startup_timeout": 30,
        },
        "azure_storage": {"connection_string": arm.storage[0].connection_string, "container": arm.storage[1]},
    }
    for section, values in overrides.items():
        doc.setdefault(section, {}).update(values)
    path = tmp_path / "acx.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def apps_for(cfg_path: Path, **kw: Any) -> az.AzureApps:
    return az.AzureApps(load_config(cfg_path, env={}), credential=StaticToken(), **kw)


def executor(cfg_path: Path, **kw: Any) -> AsyncExecutor:
    return AsyncExecutor(config=cfg_path, credential=StaticToken(), **kw)


def default_image(arm: ArmEndpoint) -> str:
    """The default runtime image, in the double's registry (which has it: nothing is built)."""
    return az.default_image(arm.registry)


# -- deploy -> map -> update -> list -> delete -> clean -------------------------------------------


async def test_deploy_invoke_update_list_delete_clean_end_to_end(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path)
    arm.add_foreign_app("rg-acx", "someone-elses-app")
    async with apps_for(cfg) as apps:
        info = await apps.deploy("default")
    assert info.runtime == default_image(arm) and info.memory == 512
    assert info.app == az.app_name(default_image(arm), 512)
    cache = list((tmp_path / "cache" / "async-ca-exec" / "runtimes").glob("*.json"))
    assert len(cache) == 1 and json.loads(cache[0].read_text())["meta"]["protocol"] == protocol.PROTOCOL_VERSION

    async with executor(cfg) as ex:
        assert await ex.map(add7, range(100)) == [i + 7 for i in range(100)]
        assert ex.endpoint is not None and ex.endpoint.url == f"https://{info.fqdn}"

    async with apps_for(cfg) as apps:
        key_before = arm.state.secrets[("rg-acx", info.app)]
        [updated] = await apps.update("all")
        assert updated.app == info.app

        def hmac(secrets: list[dict[str, str]]) -> list[dict[str, str]]:
            return [s for s in secrets if s["name"] == az.HMAC_SECRET]

        # The HMAC key survives updates (the demand queue's read-only SAS is renewed).
        assert hmac(arm.state.secrets[("rg-acx", info.app)]) == hmac(key_before)
        listed = await apps.runtimes()
        assert [r.app for r in listed] == [info.app]  # the foreign app is not listed
        assert await apps.delete("default") == [info.app]
        assert await apps.runtimes() == []
        async with executor(cfg) as ex:  # the default runtime is deployed again on first use
            assert await ex.submit(add7, 1) == 8
        assert await apps.clean() == [info.app]
    assert not list((tmp_path / "cache" / "async-ca-exec" / "runtimes").glob("*.json"))
    assert ("rg-acx", "someone-elses-app") in arm.state.apps  # clean spares what is not ours
    assert not arm.replicas


async def test_function_executor_runs_the_seed_on_azure(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path)
    fexec = acx.FunctionExecutor(backend="azure_containers", config=cfg, credential=StaticToken())
    with fexec:
        fexec.call_async(add7, 3)
        assert fexec.get_result() == 10
        fexec.map(add7, [1, 2, 3])
        assert fexec.get_result() == [8, 9, 10]


# -- the resource bodies -------------------------------------------------------------------


@pytest.mark.parametrize(("memory", "cpu", "mem", "workers"), [(512, 0.25, "0.5Gi", 1), (2048, 1.0, "2Gi", 1),
                                                              (8192, 4.0, "8Gi", 4)])  # fmt: skip
async def test_app_resource_body_is_exact(
    arm: ArmEndpoint, tmp_path: Path, memory: int, cpu: float, mem: str, workers: int
) -> None:
    cfg = config(arm, tmp_path, azure_containers={"max_workers": 250, "runtime_timeout": 900})
    image = "myregistry.azurecr.io/me/rt:1"
    arm.images.add(image)  # a registry the twin does not serve: the image exists there
    async with apps_for(cfg) as apps:
        info = await apps.deploy(image, memory=memory)
    [body] = arm.bodies("PUT")
    key = arm.state.secrets[("rg-acx", info.app)][0]["value"]
    assert len(key) >= 32
    env = body["properties"]["template"]["containers"][0]["env"]
    stamp = env.pop()  # a new revision on every deploy, so a rebuilt image is pulled again
    assert stamp["name"] == "ACX_DEPLOYED_AT" and float(stamp["value"]) > 0
    # The demand queue's rule and its read-only SAS (tests/test_scaling.py checks them).
    demand_secret = body["properties"]["configuration"]["secrets"].pop()
    assert demand_secret["name"] == dq.DEMAND_SECRET and "sp=r&" in demand_secret["value"]
    demand_rule = body["properties"]["template"]["scale"]["rules"].pop()
    assert demand_rule["name"] == dq.DEMAND_RULE and demand_rule["azureQueue"]["queueName"] == dq.queue_name(info.app)
    expiry = int(body["tags"].pop(az.TAG_DEMAND_SAS))  # when that SAS expires (deploy and update renew it)
    assert abs(expiry - (time.time() + dq.SAS_DAYS * 86400)) < 600
    assert body == {
        "location": "westeurope",
        "tags": {"acx-managed-by": "async_ca_exec", "acx-version": acx.__version__, "acx-runtime": image,
                 "acx-memory": str(memory)},
        "properties": {
            "environmentId": f"/subscriptions/{SUB}/resourceGroups/rg-acx/providers/Microsoft.App/managedEnvironments/acx",
            "configuration": {
                "activeRevisionsMode": "Single",
                "ingress": {"external": True, "targetPort": 8080, "transport": "auto", "allowInsecure": False,
                            "traffic": [{"latestRevision": True, "weight": 100}]},
                "secrets": [{"name": "acx-hmac-key", "value": key},
                            {"name": "acx-registry-password", "value": REGISTRY_PASSWORD}],
                "registries": [{"server": arm.registry, "username": "me",
                                "passwordSecretRef": "acx-registry-password"}],
            },
            "template": {
                "containers": [{
                    "name": "acx-runtime",
                    "image": image,
                    "resources": {"cpu": cpu, "memory": mem},
                    "env": [
                        {"name": "ACX_HMAC_KEY", "secretRef": "acx-hmac-key"},
                        {"name": "ACX_SERVER_PORT", "value": "8080"},
                        {"name": "ACX_HEALTH_PORT", "value": "8081"},
                        {"name": "ACX_WORKER_PROCESSES", "value": str(workers)},
                        {"name": "ACX_RUNTIME_TIMEOUT", "value": "900"},
                        {"name": "ACX_SHUTDOWN_GRACE", "value": "595"},
                    ],
                    "probes": [
                        {"type": "Startup", "httpGet": {"path": "/v1/live", "port": 8081},
                         "initialDelaySeconds": 1, "periodSeconds": 2, "timeoutSeconds": 3, "failureThreshold": 10},
                        {"type": "Liveness", "httpGet": {"path": "/v1/live", "port": 8081},
                         "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
                        {"type": "Readiness", "httpGet": {"path": "/v1/health", "port": 8081},
                         "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
                    ],
                }],
                "scale": {"minReplicas": 0, "maxReplicas": 250, "pollingInterval": 5, "cooldownPeriod": 300, "rules": [
                    {"name": "http-concurrency", "http": {"metadata": {"concurrentRequests": str(workers)}}}]},
                "terminationGracePeriodSeconds": 600,
            },
            "workloadProfileName": "Consumption",
        },
    }  # fmt: skip
    assert info.app == az.app_name(image, memory) and len(info.app) <= 32


async def test_without_blob_storage_calls_are_capped_below_the_ingress_cut(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path, lithops={"storage": None}, azure_containers={"runtime_timeout": 900})
    notes: list[str] = []
    async with apps_for(cfg, progress=notes.append) as apps:
        await apps.deploy("default")
    env = {e["name"]: e.get("value") for e in arm.bodies("PUT")[0]["properties"]["template"]["containers"][0]["env"]}
    assert env["ACX_RUNTIME_TIMEOUT"] == "230" and any("lowered to 230 s" in n for n in notes)
    assert load_config(cfg, env={}).runtime_timeout == 230


def test_app_names_follow_the_container_apps_rule() -> None:
    import re

    for image in ["myregistry.azurecr.io/me/rt:1", "docker.io/library/python:3.11-slim-bookworm-with-a-very-long-tag",
                  "REG.io/A_B/c--d:X", "a/b"]:  # fmt: skip
        for memory in (512, 8192):
            name = az.app_name(image, memory)
            assert re.fullmatch(r"[a-z][a-z0-9-]{0,30}[a-z0-9]", name) and "--" not in name, name
    assert az.app_name("r/a:1", 512) != az.app_name("r/a:1", 1024) != az.app_name("r/a:2", 512)
    assert az.app_name("r/a:1", 512, "0.1.0") != az.app_name("r/a:1", 512, "0.2.0")


# -- cold start --------------------------------------------------------------------------------


async def test_deploy_waits_through_a_cold_start_for_the_metadata(arm: ArmEndpoint, tmp_path: Path) -> None:
    arm.cold_start, arm.retry_after = 2.5, 1
    async with apps_for(config(arm, tmp_path)) as apps:
        info = await apps.deploy("default")
    refused = [h for h in arm.ingress_hits if h.path == "/v1/meta" and h.status == 503]
    assert refused and info.state == "Succeeded"
    assert [h.status for h in arm.ingress_hits if h.path == "/v1/meta"][-1] == 200


async def test_an_executor_wakes_a_runtime_scaled_to_zero_before_sending_calls(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path)
    async with apps_for(cfg) as apps:
        info = await apps.deploy("default")
    arm.cold_start, arm.retry_after = 2.5, 1
    arm.replicas[info.app].created = time.monotonic()  # scaled to zero
    async with executor(cfg) as ex:
        assert await ex.map(add7, range(20)) == [i + 7 for i in range(20)]
    health = [h.status for h in arm.ingress_hits if h.path == "/v1/health"]
    assert 503 in health and health[-1] == 200
    assert all(h.status == 200 for h in arm.ingress_hits if h.path == "/v1/invoke")


async def test_calls_meeting_a_cold_start_are_retried_honouring_retry_after(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path, lithops={"retries": 1})
    async with apps_for(cfg) as apps:
        info = await apps.deploy("default")
    async with executor(cfg) as ex:
        # Scaled to zero after the executor started: the calls themselves meet the cold start,
        # longer than retries x Retry-After, so only the start-up window gets them through.
        arm.cold_start, arm.retry_after = 4.5, 1
        arm.replicas[info.app].created = time.monotonic()
        assert await ex.map(add7, range(20)) == [i + 7 for i in range(20)]
        retries = ex.job_summary()["retries"]
        concurrency = ex.job_summary()["concurrency"]
    # Adaptive concurrency: the 503s halved the window (it grows back as calls get through).
    assert concurrency["halvings"] >= 1 and concurrency["lowest"] < 1000, concurrency
    refused = [h for h in arm.ingress_hits if h.status == 503 and h.path == "/v1/invoke"]
    assert refused and retries >= len(refused)
    by_call: dict[str | None, list[float]] = {}
    for h in arm.ingress_hits:
        if h.path == "/v1/invoke":
            by_call.setdefault(h.call_id, []).append(h.at)
    assert max(len(t) for t in by_call.values()) > 2  # more attempts than retries=1 allows
    gaps = [b - a for times in by_call.values() for a, b in itertools.pairwise(times)]
    assert gaps and min(gaps) >= 0.95  # every retry waited for Retry-After: 1


async def test_a_runtime_that_never_starts_names_the_startup_deadline(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path, azure_containers={"startup_timeout": 2})
    async with apps_for(cfg) as apps:
        await apps.deploy("default")
    arm.cold_start = 3600
    for r in arm.replicas.values():
        r.created = time.monotonic()
    ex = executor(cfg)
    with pytest.raises(acx.RuntimeStartError, match=r"after 2 s \(startup_timeout\)"):
        await ex.start()
    await ex.aclose()


async def test_a_runtime_that_goes_away_fails_every_call_at_once_not_in_waves(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path, azure_containers={"startup_timeout": 2}, lithops={"max_concurrency": 2})
    async with apps_for(cfg) as apps:
        await apps.deploy("default")
    async with executor(cfg) as ex:
        arm.cold_start = 3600
        for r in arm.replicas.values():
            r.created = time.monotonic()
        results = await ex.map(add7, range(8), return_exceptions=True)
    assert all(isinstance(r, acx.InvocationError) for r in results)
    assert "startup_timeout=2 s" in str(results[0])
    hits: dict[str | None, int] = {}
    for h in arm.ingress_hits:
        if h.path == "/v1/invoke":
            hits[h.call_id] = hits.get(h.call_id, 0) + 1
    # Only the calls in flight during the window were retried; the rest failed at their first refusal.
    assert sum(1 for n in hits.values() if n == 1) >= 5, hits


# -- bad input ---------------------------------------------------------------------------------


async def test_unknown_memory_is_refused_before_any_api_call(arm: ArmEndpoint, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="512, 1024"):
        load_config(config(arm, tmp_path, azure_containers={"runtime_memory": 1000}), env={})
    async with apps_for(config(arm, tmp_path)) as apps:
        with pytest.raises(ConfigError, match="runtime_memory=1000"):
            await apps.deploy("default", memory=1000)
    assert arm.requests == []


@pytest.mark.parametrize(("section", "key"), [("azure", "subscription_id"), ("azure", "resource_group")])
def test_missing_subscription_or_resource_group_names_the_key(
    arm: ArmEndpoint, tmp_path: Path, section: str, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AZURE_SUBSCRIPTION_ID", raising=False)
    cfg = load_config(config(arm, tmp_path, **{section: {key: None}}), env={})
    with pytest.raises(ConfigError, match=rf"azure\.{key}"):
        az.AzureApps(cfg, credential=StaticToken())


async def test_arm_errors_become_one_line_instructions(arm: ArmEndpoint, tmp_path: Path) -> None:
    async with apps_for(config(arm, tmp_path, azure={"resource_group": "rg-forbidden"})) as apps:
        with pytest.raises(AuthenticationError, match="Contributor role") as e403:
            await apps.deploy("default")
    async with apps_for(config(arm, tmp_path, azure={"resource_group": "rg-missing"})) as apps:
        with pytest.raises(ConfigError, match=r"az group create -n rg-missing") as e404:
            await apps.deploy("default")
    async with apps_for(config(arm, tmp_path)) as apps:
        arm.fail_next["PUT containerApps"] = (409, "Conflict")  # not an operation in progress: no retry
        with pytest.raises(DeploymentError, match=r"refused creating Container App .* with a conflict \(Conflict\)") as e409:
            await apps.deploy("default")
        assert len(arm.bodies("PUT")) == 1
        with pytest.raises(RuntimeNotFoundError, match=r"acx runtime deploy myregistry\.azurecr\.io/x/y:2"):
            await apps.delete("myregistry.azurecr.io/x/y:2")
    for e in (e403, e404, e409):
        assert "\n" not in str(e.value)


async def test_the_twin_refuses_a_write_while_an_operation_runs_and_its_operations_take_several_polls(
    arm: ArmEndpoint, tmp_path: Path
) -> None:
    from azure.core.exceptions import HttpResponseError

    async with apps_for(config(arm, tmp_path)) as apps:
        info = await apps.deploy("default")
        # The PUT's operation: InProgress to op_polls reads at least, then Succeeded.
        assert len([r for r in arm.requests if r.path.startswith("/operations/")]) >= arm.op_polls + 1
        arm.busy("containerApps", info.app, 3600)
        for send in (
            lambda: apps.client.container_apps.begin_update("rg-acx", info.app, {"tags": {"a": "b"}}),
            lambda: apps.client.container_apps.begin_delete("rg-acx", info.app),
        ):
            with pytest.raises(HttpResponseError) as refused:
                await send()
            assert refused.value.status_code == 409
            assert refused.value.error is not None and refused.value.error.code == "ContainerAppOperationInProgress"
        arm.busy("managedEnvironments", "acx", 3600)
        with pytest.raises(HttpResponseError, match="ManagedEnvironmentOperationInProgress"):
            await apps.client.managed_environments.begin_create_or_update("rg-acx", "acx", {"location": "westeurope"})
    assert arm.conflicts == 3


async def test_a_change_while_another_operation_runs_is_sent_again_once_it_ends(arm: ArmEndpoint, tmp_path: Path) -> None:
    said: list[str] = []
    async with apps_for(config(arm, tmp_path), progress=said.append) as apps:
        info = await apps.deploy("default")
        arm.busy("containerApps", info.app, 2.5)  # the portal, a pipeline, another machine
        again = await apps.deploy("default")  # a new revision of the same app
        assert again.app == info.app and arm.conflicts >= 1
        assert any("another operation is changing it (ContainerAppOperationInProgress); trying again" in m for m in said)
        arm.busy("containerApps", info.app, 1.5)
        assert await apps.delete("default") == [info.app]
    assert arm.conflicts >= 2 and info.app not in {n for (_g, n) in arm.state.apps}


async def test_a_change_accepted_just_before_the_deadline_is_not_reported_as_timed_out(arm: ArmEndpoint, tmp_path: Path) -> None:
    """Waiting out another operation used nearly all of operation_timeout; the change that is
    then accepted still gets its own time to finish (it once got what was left: ~0 s)."""
    async with apps_for(config(arm, tmp_path, azure={"operation_timeout": 3})) as apps:
        info = await apps.deploy("default")
        arm.busy("containerApps", info.app, 2.9)
        again = await apps.deploy("default")
    assert again.app == info.app and arm.conflicts >= 1


async def test_a_conflict_that_outlasts_operation_timeout_names_it(arm: ArmEndpoint, tmp_path: Path) -> None:
    async with apps_for(config(arm, tmp_path, azure={"operation_timeout": 2})) as apps:
        info = await apps.deploy("default")
        arm.busy("containerApps", info.app, 3600)
        with pytest.raises(DeploymentError) as refused:
            await apps.deploy("default")
    text = str(refused.value)
    assert "kept refusing updating Container App" in text and "for 2 s (azure.operation_timeout)" in text
    assert "ContainerAppOperationInProgress" in text and "raise azure.operation_timeout" in text and "\n" not in text
    assert arm.conflicts >= 2  # retried with backoff before giving up


async def test_subscription_without_the_container_apps_provider_says_how_to_register_it(arm: ArmEndpoint, tmp_path: Path) -> None:
    arm.fail_next["PUT containerApps"] = (409, "MissingSubscriptionRegistration")
    async with apps_for(config(arm, tmp_path)) as apps:
        with pytest.raises(ConfigError, match=r"az provider register -n Microsoft\.App"):
            await apps.deploy("default")


async def test_apps_go_to_their_environments_region(arm: ArmEndpoint, tmp_path: Path) -> None:
    async with apps_for(config(arm, tmp_path, azure={"region": "northeurope"})) as apps:
        info = await apps.deploy("default")
    assert info.state == "Succeeded" and arm.bodies("PUT")[0]["location"] == "westeurope"


async def test_consumption_only_environments_stop_at_4096_mb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, azurite: Azurite, container: str
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    arm = ArmEndpoint(tmp_path, consumption_only=("acx",)).start()
    arm.storage = (azurite, container)
    try:
        async with apps_for(config(arm, tmp_path)) as apps:
            with pytest.raises(ConfigError, match="runtime_memory=8192 needs more than the 2 vCPU / 4 GiB"):
                await apps.deploy("default", memory=8192)
            info = await apps.deploy("default", memory=4096)
        assert info.state == "Succeeded" and "workloadProfileName" not in arm.bodies("PUT")[0]["properties"]
    finally:
        arm.stop()


async def test_update_keeps_the_registry_when_this_machine_lacks_its_password(arm: ArmEndpoint, tmp_path: Path) -> None:
    async with apps_for(config(arm, tmp_path)) as apps:
        await apps.deploy("default")
    bare = config(arm, tmp_path, azure_containers={"docker_user": None, "docker_password": None})
    async with apps_for(bare) as apps:
        await apps.update("all")
    first, second = arm.bodies("PUT")
    assert second["properties"]["configuration"]["registries"] == first["properties"]["configuration"]["registries"]

    def kept(body: dict[str, Any]) -> list[dict[str, str]]:  # the demand queue's SAS is renewed on update
        return [s for s in body["properties"]["configuration"]["secrets"] if s["name"] != dq.DEMAND_SECRET]

    assert kept(second) == kept(first)


#: A user-assigned managed identity (the twin grants AcrPull to those in arm.acr_pull_identities).
UAI = f"/subscriptions/{SUB}/resourceGroups/rg-acx/providers/Microsoft.ManagedIdentity/userAssignedIdentities/acr-puller"


def private_registry(arm: ArmEndpoint) -> None:
    """The twin's registry wants a login (token service), as ACR does without anonymous pull."""
    arm.registry_auth = "bearer"
    arm.registry_login = ("me", REGISTRY_PASSWORD)


@pytest.mark.parametrize("with_password", [False, True], ids=["identity only", "identity and docker_password"])
async def test_a_user_assigned_identity_with_acr_pull_pulls_and_the_app_holds_no_registry_password(
    arm: ArmEndpoint, tmp_path: Path, with_password: bool
) -> None:
    """The identity wins over docker_user / docker_password: the app gets the identity and no
    password secret; without a login this machine cannot look into the registry, and says so."""
    private_registry(arm)
    arm.acr_pull_identities.add(UAI)
    login = {} if with_password else {"docker_user": None, "docker_password": None}
    cfg = config(arm, tmp_path, azure_containers={"registry_identity": UAI, **login})
    said: list[str] = []
    async with apps_for(cfg, progress=said.append) as apps:
        info = await apps.deploy("default")
        await apps.update("default")  # an update keeps pulling with the identity
    for body in arm.bodies("PUT"):
        assert body["identity"] == {"type": "UserAssigned", "userAssignedIdentities": {UAI: {}}}
        assert body["properties"]["configuration"]["registries"] == [{"server": arm.registry, "identity": UAI}]
        assert [s["name"] for s in body["properties"]["configuration"]["secrets"]] == [
            az.HMAC_SECRET,
            dq.DEMAND_SECRET,
        ]  # no registry password
        assert REGISTRY_PASSWORD not in json.dumps(body)
    assert any("cannot look for" in line and "managed identity" in line for line in said) != with_password
    async with executor(cfg) as ex:
        assert await ex.submit(add7, 1) == 8
    assert arm.state.apps[("rg-acx", info.app)]["identity"]["userAssignedIdentities"][UAI]["principalId"]


async def test_an_identity_without_acr_pull_names_the_image_the_registry_and_the_role_assignment(
    arm: ArmEndpoint, tmp_path: Path
) -> None:
    private_registry(arm)
    cfg = config(arm, tmp_path, azure_containers={"registry_identity": UAI, "docker_user": None, "docker_password": None})
    image = default_image(arm)
    async with apps_for(cfg) as apps:
        with pytest.raises(RuntimeNotFoundError) as refused:
            await apps.deploy("default")
    text = str(refused.value)
    assert f"cannot pull runtime image {image}: registry {arm.registry} refused the app's managed identity {UAI}" in text
    assert f"az role assignment create --assignee $(az identity show --ids {UAI} --query principalId -o tsv)" in text
    assert "--role AcrPull --scope" in text and f"acx runtime deploy {image}" in text
    assert "docker_password" not in text  # the fix for a password is not this one
    assert [r.status for r in arm.requests if r.method == "PUT"] == [400] and not arm.replicas
    arm.acr_pull_identities.add(UAI)  # the role assignment the message gives
    async with apps_for(cfg) as apps:
        assert (await apps.deploy("default")).state == "Succeeded"


async def test_a_system_assigned_identity_fails_the_first_deploy_with_microsofts_caveat_and_the_fix_works(
    arm: ArmEndpoint, tmp_path: Path
) -> None:
    """A system-assigned identity is created with the app, so it cannot hold AcrPull at the first
    deploy: the error says so and gives both ways out; granting the app's identity AcrPull and
    updating the app then works."""
    private_registry(arm)
    cfg = config(arm, tmp_path, azure_containers={"registry_identity": "System", "docker_user": None, "docker_password": None})
    image = default_image(arm)
    name = az.app_name(image, 512)
    async with apps_for(cfg) as apps:
        with pytest.raises(RuntimeNotFoundError) as refused:
            await apps.deploy("default")
        text = str(refused.value)
        assert f"cannot pull runtime image {image}: registry {arm.registry} refused the app's system-assigned identity" in text
        assert "no AcrPull role when the app is first deployed" in text
        assert "learn.microsoft.com/azure/container-apps/containers#managed-identity-with-azure-container-registry" in text
        assert "registry_identity to a user-assigned identity that has AcrPull" in text
        assert f"--assignee $(az containerapp show -n {name} -g rg-acx --query identity.principalId -o tsv)" in text
        assert "--role AcrPull" in text and f"acx runtime update {image}" in text
        [body] = arm.bodies("PUT")
        assert body["identity"] == {"type": "SystemAssigned"} and not arm.replicas
        assert body["properties"]["configuration"]["registries"] == [{"server": arm.registry, "identity": "system"}]
        arm.acr_pull_identities.add(arm.state.apps[("rg-acx", name)]["identity"]["principalId"])
        [updated] = await apps.update(image)
    assert updated.state == "Succeeded" and arm.replicas


def test_registry_identity_needs_the_registry_it_pulls_from(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path, azure_containers={"registry_identity": UAI, "docker_server": None})
    with pytest.raises(ConfigError, match=r"registry_identity is set but docker_server is not"):
        az.AzureTarget.from_config(load_config(cfg, env={}))


# -- the environment's core quota --------------------------------------------------------------

QUOTA_PAGE = "https://learn.microsoft.com/azure/container-apps/quotas"


def warnings_in(said: list[str]) -> list[str]:
    return [line for line in said if line.startswith("warning: ")]


async def test_deploy_warns_when_max_workers_can_ask_for_more_cores_than_the_quota(arm: ArmEndpoint, tmp_path: Path) -> None:
    """max_workers x vCPU above the environment's quota (as Azure reports it) is a warning with
    the numbers and the fixes; an update counts twice, for the revision swap."""
    arm.core_quota = 10
    said: list[str] = []
    async with apps_for(config(arm, tmp_path, azure_containers={"max_workers": 40}), progress=said.append) as apps:
        await apps.deploy("default")  # 40 x 0.25 = 10 cores: fits
        assert warnings_in(said) == []
        await apps.update("default")  # 20 while both revisions run
        [swap] = warnings_in(said)
        assert "max_workers=40 replicas of 0.25 vCPU (runtime_memory 512) can ask for 10 cores, 20 while an update swaps" in swap
        assert "environment acx allows 10 cores (environment acx's quota, as Azure reports it; 0.25 in use now)" in swap
        assert "max_workers to 20 (what fits)" in swap and "runtime_memory" in swap and QUOTA_PAGE in swap
        said.clear()
        info = await apps.deploy("default", memory=1024)  # a new app: 40 x 0.5 = 20 cores
    [big] = warnings_in(said)
    assert "can ask for 20 cores, and environment acx allows 10 cores" in big and "max_workers to 20 (what fits)" in big
    assert info.state == "Succeeded"  # a warning: minReplicas 0 fits, the deploy goes on


@pytest.mark.parametrize(
    ("served", "configured", "expected"),
    [
        (False, None, "allows 100 cores (Container Apps' default, which Azure did not confirm; 10 on trial subscriptions"),
        (True, 20, "allows 20 cores (azure_containers.core_quota; 0 in use now)"),
        (False, 20, "allows 20 cores (azure_containers.core_quota; usage unknown)"),
    ],
    ids=["documented default", "configured", "configured, usage unknown"],
)
async def test_without_a_quota_from_azure_the_check_uses_core_quota_or_the_documented_default(
    arm: ArmEndpoint, tmp_path: Path, served: bool, configured: int | None, expected: str
) -> None:
    arm.serve_usages = served
    arm.core_quota = 1000  # what Azure would say; a configured core_quota wins over it
    section: dict[str, Any] = {"max_workers": 500, "core_quota": configured}  # 125 cores
    said: list[str] = []
    async with apps_for(config(arm, tmp_path, azure_containers=section), progress=said.append) as apps:
        await apps.deploy("default")
    [warning] = warnings_in(said)
    assert expected in warning, warning
    assert f"max_workers to {80 if configured else 400} (what fits)" in warning


async def test_an_executor_deploying_the_default_runtime_logs_the_quota_warning(
    arm: ArmEndpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    arm.core_quota = 10
    async with executor(config(arm, tmp_path, azure_containers={"max_workers": 100})) as ex:
        assert await ex.submit(add7, 1) == 8
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING and "can ask for 25 cores" in r.getMessage()]
    assert "max_workers to 40" in record.getMessage()


async def test_warm_refuses_replicas_past_the_environments_free_cores_naming_the_numbers(
    arm: ArmEndpoint, tmp_path: Path
) -> None:
    """warm(n) is a new revision of n replicas beside the replicas running now: n x vCPU must fit
    the quota less what is in use, or it is refused before anything is sent."""
    arm.core_quota = 2
    cfg = config(arm, tmp_path)
    async with apps_for(cfg) as apps:
        info = await apps.deploy("default")  # one replica: 0.25 of 2 cores in use
        with pytest.raises(ConfigError) as refused:
            await apps.warm(info.app, 8)  # 2 cores, 1.75 free
        text = str(refused.value)
        assert f"cannot pre-warm 8 replicas of Container App {info.app}: at 0.25 vCPU each they need 2 cores" in text
        assert "environment acx has 1.75 free of 2 cores (environment acx's quota, as Azure reports it; 0.25 in use" in text
        assert "warm at most 7 replicas" in text and "runtime_memory" in text and QUOTA_PAGE in text
        assert arm.bodies("PATCH") == []
        assert (await apps.warm(info.app, 7))[0] == 7
    async with executor(cfg) as ex:  # the executor's warm() is refused the same way
        with pytest.raises(ConfigError, match=r"cannot pre-warm 9 replicas"):
            await ex.warm(9)  # 7 x 0.25 in use: 0.25 free
    assert len(arm.bodies("PATCH")) == 1  # the warm to 7; nothing for the refused ones


async def test_a_revision_that_does_not_fit_the_quota_names_it_and_the_fixes(arm: ArmEndpoint, tmp_path: Path) -> None:
    arm.core_quota = 1
    async with apps_for(config(arm, tmp_path, azure_containers={"min_workers": 5})) as apps:  # 1.25 cores
        with pytest.raises(DeploymentError) as refused:
            await apps.deploy("default")
    text = str(refused.value)
    assert "the environment's core quota is used up" in text and "Maximum Allowed Cores exceeded" in text
    assert "min_workers, max_workers or runtime_memory" in text and QUOTA_PAGE in text


async def test_update_replaces_a_runtime_deployed_by_another_version(arm: ArmEndpoint, tmp_path: Path) -> None:
    async with apps_for(config(arm, tmp_path)) as apps:
        old_name = az.app_name(default_image(arm), 512, "0.0.9")
        await apps._put(old_name, default_image(arm), 512)
        arm.state.apps[("rg-acx", old_name)]["tags"]["acx-version"] = "0.0.9"
        [new] = await apps.update("all")
        assert new.app == az.app_name(default_image(arm), 512) != old_name
        assert [r.app for r in await apps.runtimes()] == [new.app]


async def test_missing_environment_says_how_to_create_it_or_creates_it(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path, azure_containers={"environment": "acx-new"})
    async with apps_for(cfg) as apps:
        with pytest.raises(ConfigError, match=r"--create-environment.*az containerapp env create --name acx-new"):
            await apps.deploy("default")
        info = await apps.deploy("default", create_environment=True)
    assert arm.bodies("PUT", "managedEnvironments") == [
        {"location": "westeurope",
         "properties": {"workloadProfiles": [{"name": "Consumption", "workloadProfileType": "Consumption"}]}}
    ]  # fmt: skip
    assert info.state == "Succeeded"


async def test_a_non_default_runtime_that_is_not_deployed_is_not_found(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path, azure_containers={"runtime": "myregistry.azurecr.io/me/custom:7"})
    ex = executor(cfg)
    with pytest.raises(RuntimeNotFoundError, match=r"acx runtime deploy myregistry\.azurecr\.io/me/custom:7 --memory 512"):
        await ex.start()
    await ex.aclose()
    assert arm.bodies("PUT") == []  # only the default runtime is deployed on first use


async def test_a_wrong_hmac_key_is_an_authentication_error_and_nothing_runs(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path)
    async with apps_for(cfg) as apps:
        info = await apps.deploy("default")
    # The key Azure hands out no longer matches the one the replica runs with.
    arm.state.secrets[("rg-acx", info.app)][0]["value"] = "x" * 43
    marker = tmp_path / "ran"
    async with executor(cfg) as ex:
        with pytest.raises(AuthenticationError, match="refused the signature"):
            await ex.submit(Path.write_text, marker, "ran")
    assert not os.path.exists(marker)


async def test_runtime_metadata_mismatch_says_both_versions(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path)
    async with apps_for(cfg) as apps:
        info = await apps.deploy("default")
    [cache] = (tmp_path / "cache" / "async-ca-exec" / "runtimes").glob("*.json")
    doc = json.loads(cache.read_text())
    doc["meta"]["python"] = "3.8.18"
    cache.write_text(json.dumps(doc))
    ex = executor(cfg)
    with pytest.raises(RuntimeMismatchError, match=r"Python 3\.8\.18.*this client runs 3\.") as info_:
        await ex.start()
    await ex.aclose()
    assert info.app in str(info_.value)


# -- credentials and secrets -------------------------------------------------------------------


async def test_no_credential_found_lists_the_ways_to_sign_in(
    arm: ArmEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Developer credentials only (never the managed-identity endpoint), and no az on PATH.
    monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "dev")
    monkeypatch.setenv("PATH", "/nonexistent")
    cfg = load_config(config(arm, tmp_path), env={})
    async with az.AzureApps(cfg) as apps:
        with pytest.raises(AuthenticationError, match=r"az login.*AZURE_CLIENT_ID.*managed identity.*credential="):
            await apps.runtimes()


def _cli(*args: str, tmp: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("ACX_", "AZURE_"))}
    full.update({
        "PATH": f"{TESTS / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "AZURE_TOKEN_CREDENTIALS": "azureclicredential",  # the fake az, and nothing else
        "XDG_CACHE_HOME": str(tmp / "cache"),
        "HOME": str(tmp),
    })  # fmt: skip
    full.update(env or {})
    exe = str(Path(sys.executable).with_name("acx"))
    return subprocess.run([exe, *args], env=full, capture_output=True, text=True, timeout=180, cwd=tmp)


#: Where the seed's options go: all before the command, all after it, or some on each side.
POSITIONS = {
    "before": lambda opts, cmd: [*opts, *cmd],
    "after": lambda opts, cmd: [*cmd, *opts],
    "split": lambda opts, cmd: [*opts[:4], *cmd, *opts[4:]],  # -b -s before, -c after
}


@pytest.mark.parametrize("position", list(POSITIONS))
def test_seed_commands_run_against_the_test_endpoint(arm: ArmEndpoint, tmp_path: Path, position: str) -> None:
    """Each seed command line, with `-b azure_containers -s azure_storage -c FILE` placed before or
    after the command (or both sides): every one reaches Azure (the ARM endpoint sees it)."""
    cfg = str(config(arm, tmp_path, azure_containers={"build_options": ["--label=from-the-config-file"]}))
    place = POSITIONS[position]
    opts = ["-b", "azure_containers", "-s", "azure_storage", "-c", cfg]

    def run(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        before = len(arm.requests)
        r = _cli(*place(opts, list(cmd)), tmp=tmp_path, env=env)
        assert r.returncode != 0 or cmd[-1] == "--no-push" or len(arm.requests) > before, f"{cmd} did not reach ARM"
        return r

    r = run("runtime", "deploy", "default")
    assert r.returncode == 0, r.stderr
    assert f"deployed runtime {default_image(arm)} (512 MB)" in r.stdout and "recorded runtime metadata" in r.stderr
    arm.images.add("myregistry.azurecr.io/me/rt:1")  # in a registry of its own (the twin checks at PUT)
    r = run("runtime", "deploy", "myregistry.azurecr.io/me/rt:1", "--memory", "2048", "--timeout", "120")
    assert r.returncode == 0, r.stderr
    (body,) = [b for b in arm.bodies("PUT", "containerApps") if b["properties"]["template"]["containers"][0]["image"]
               == "myregistry.azurecr.io/me/rt:1"]  # fmt: skip
    assert body["properties"]["template"]["containers"][0]["resources"] == {"cpu": 1.0, "memory": "2Gi"}
    r = run("runtime", "list")
    assert r.returncode == 0 and default_image(arm) in r.stdout and "2048" in r.stdout
    header, *rows = r.stdout.splitlines()
    assert header.split() == ["RUNTIME", "MEMORY", "VERSION", "APP", "FQDN", "STATE", "REPLICAS", "MAX"]
    assert all(row.split()[-2:] == ["1", "100"] for row in rows)  # one replica running, at most 100
    r = run("hello")
    assert r.returncode == 0 and r.stdout.startswith("Hello world!"), r.stderr
    r = run("runtime", "update", "all")
    assert r.returncode == 0 and "updated 2 runtime(s)" in r.stdout, r.stderr
    r = run("runtime", "delete", "default")
    assert r.returncode == 0 and "deleted 1 runtime(s)" in r.stdout
    r = run("clean")
    assert r.returncode == 0 and "deleted 1 runtime(s)" in r.stdout, r.stderr
    r = run("runtime", "delete", "all")
    assert r.returncode == 0 and "deleted 0 runtime(s)" in r.stdout
    calls = len(arm.requests)
    r = _cli(*place(opts, ["runtime", "deploy", "default", "--memory", "1000"]), tmp=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().endswith("(MB, in steps of 512)") and "Traceback" not in r.stderr
    assert len(arm.requests) == calls, "a refused size must not reach ARM"
    engine = {"PATH": f"{TESTS / 'fakes'}{os.pathsep}{os.environ['PATH']}", "FAKE_ENGINE_LOG": str(tmp_path / "engine.log"),
              "ACX_BUILDER": "docker"}  # fmt: skip
    r = run("runtime", "build", "myregistry.azurecr.io/me/rt:2", "--no-push", env=engine)
    assert r.returncode == 0 and "built myregistry.azurecr.io/me/rt:2 with docker" in r.stdout, r.stderr
    built = json.loads((tmp_path / "engine.log").read_text().splitlines()[0])
    assert built["argv"][0] == "build" and "myregistry.azurecr.io/me/rt:2" in built["argv"]
    assert "--label=from-the-config-file" in built["argv"]  # -c was read wherever it stood


def test_an_option_given_twice_with_different_values_is_refused(tmp_path: Path) -> None:
    r = _cli("-b", "local", "clean", "-b", "azure_containers", tmp=tmp_path)
    assert r.returncode == 2 and "-b/--backend is given twice with different values ('local', 'azure_containers')" in r.stderr
    r = _cli("-b", "localhost", "runtime", "list", "-b", "local", tmp=tmp_path)  # one backend, two names: the same
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("position", list(POSITIONS))
def test_the_azure_backend_given_in_any_position_is_never_the_local_no_op(tmp_path: Path, position: str) -> None:
    """Without Azure settings, `-b azure_containers` must fail naming what is missing: never
    "nothing to clean" (a user who believes Azure was cleaned keeps paying)."""
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("lithops: {}\n")
    opts = ["-b", "azure_containers", "-s", "azure_storage", "-c", str(cfg)]
    for cmd in (["clean"], ["runtime", "deploy", "default"], ["runtime", "list"], ["runtime", "update", "all"],
                ["runtime", "delete", "all"], ["hello"]):  # fmt: skip
        r = _cli(*POSITIONS[position](opts, cmd), tmp=tmp_path)
        assert r.returncode == 1, (cmd, r.stdout, r.stderr)
        assert "local backend" not in r.stdout + r.stderr and r.stderr.count("\n") == 1, (cmd, r.stderr)
        assert "azure_storage" in r.stderr or "azure.subscription_id" in r.stderr, (cmd, r.stderr)


def _exception_text(exc: BaseException) -> str:
    """Everything an exception would show a user: message, repr, chained causes, traceback."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + repr(exc)


def _without_secret_values(body: Any) -> Any:
    """An ARM request body minus the one place secrets belong: configuration.secrets[].value."""
    body = json.loads(json.dumps(body))
    for secret in body.get("properties", {}).get("configuration", {}).get("secrets") or []:
        secret.pop("value", None)
    return body


def _replace_account_key(connection_string: str, key: str) -> str:
    return ";".join(f"AccountKey={key}" if p.startswith("AccountKey=") else p for p in connection_string.split(";"))


async def test_secrets_never_reach_logs_arm_bodies_errors_or_files(
    arm: ArmEndpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """deploy -> map (through Blob storage) -> failures -> delete, all at DEBUG; then the HMAC
    key, the storage keys and the registry password are looked for everywhere a user or an
    operator could see them."""
    caplog.set_level(logging.DEBUG)
    cfg = config(arm, tmp_path)
    azurite, _ = arm.storage  # type: ignore[misc]
    storage_key = azurite.connection_string.split("AccountKey=")[1].split(";")[0]
    errors: list[BaseException] = []
    async with apps_for(cfg) as apps:
        info = await apps.deploy("default")
    async with executor(cfg, log_level="DEBUG") as ex:
        assert await ex.map(add7, range(10)) == [i + 7 for i in range(10)]
        big = [b"x" * 5_000_000, b"y" * 5]  # the first one travels through Blob storage
        assert await ex.map(len, big) == [5_000_000, 5]
        with pytest.raises(ZeroDivisionError) as remote:
            await ex.submit(divmod, 1, 0)
        errors.append(remote.value)
        endpoint_repr = repr(ex.endpoint)
    arm.images.add("myregistry.azurecr.io/me/rt:1")
    r = _cli("runtime", "deploy", "myregistry.azurecr.io/me/rt:1", "-c", str(cfg), "--debug", tmp=tmp_path)
    assert r.returncode == 0 and "DEBUG" in r.stderr, r.stderr

    # Failures whose messages could be tempted to show a secret.
    hmac_key = arm.state.secrets[("rg-acx", info.app)][0]["value"]
    arm.state.secrets[("rg-acx", info.app)][0]["value"] = "w" * 43  # Azure's copy no longer matches
    async with executor(cfg) as ex:
        with pytest.raises(AuthenticationError) as wrong_hmac:
            await ex.submit(add7, 1)
        errors.append(wrong_hmac.value)
    arm.state.secrets[("rg-acx", info.app)][0]["value"] = hmac_key
    wrong_storage_key = "V3JvbmdLZXkwMTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODk="
    (tmp_path / "bad").mkdir()
    bad_storage = config(arm, tmp_path / "bad", azure_storage={
        "connection_string": _replace_account_key(azurite.connection_string, wrong_storage_key)})  # fmt: skip
    with pytest.raises(AuthenticationError, match="denied") as storage_error:
        async with executor(bad_storage) as ex:
            await ex.map(len, big)
    errors.append(storage_error.value)
    async with apps_for(config(arm, tmp_path / "bad", azure={"resource_group": "rg-forbidden"})) as apps:
        with pytest.raises(AuthenticationError) as arm_error:
            await apps.deploy("default")
        errors.append(arm_error.value)
    arm.fail_next["PUT containerApps"] = (409, "Conflict")
    async with apps_for(cfg) as apps:
        with pytest.raises(DeploymentError) as deploy_error:
            await apps.deploy("default")
        errors.append(deploy_error.value)
        await apps.delete("all")

    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "cache").rglob("*") if p.is_file())
    replica_logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("replica-*.log"))
    put_bodies = arm.bodies("PUT")
    assert put_bodies and any(b["properties"]["configuration"]["secrets"] for b in put_bodies)
    arm_bodies = json.dumps([_without_secret_values(b) for b in put_bodies + arm.bodies("PATCH")])
    env = json.dumps([c.get("env") for b in put_bodies for c in b["properties"]["template"]["containers"]])
    assert "ACX_HMAC_KEY" in env and "secretRef" in env  # env names the secret, never holds it
    everything = {
        "client log (DEBUG)": caplog.text,
        "CLI output (--debug)": r.stdout + r.stderr,
        "replica logs (DEBUG, access log included)": replica_logs,
        "files written": written,
        "ARM request bodies (tags, env, registries, all but secrets[].value)": arm_bodies,
        "exception messages and tracebacks": "".join(_exception_text(e) for e in errors),
        "reprs": endpoint_repr + repr(load_config(cfg, env={})) + repr(load_config(bad_storage, env={})),
    }
    assert "POST /v1/invoke" in replica_logs and info.app in caplog.text  # there was something to search
    for name, secret in [("HMAC key", hmac_key), ("registry password", REGISTRY_PASSWORD),
                         ("storage key", storage_key), ("wrong storage key", wrong_storage_key)]:  # fmt: skip
        for where, text in everything.items():
            assert secret not in text, f"the {name} appears in the {where}"
    assert "sig=" not in caplog.text + replica_logs  # nor a SAS token


async def test_the_local_runtime_keeps_its_key_out_of_logs_and_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("ACX_HMAC_KEY", raising=False)
    async with AsyncExecutor(log_level="DEBUG") as ex:
        assert ex.endpoint is not None
        key = ex.endpoint.key.decode()
        assert await ex.map(add7, range(10)) == [i + 7 for i in range(10)]
        with pytest.raises(ZeroDivisionError) as remote:
            await ex.submit(divmod, 1, 0)
        rundir = Path(ex._runtime._rundir)  # type: ignore[union-attr]
        replica_logs = "".join(p.read_text(errors="replace") for p in rundir.glob("replica-*.log"))
        text = caplog.text + replica_logs + _exception_text(remote.value) + repr(ex.endpoint) + repr(ex.config)
    assert "POST /v1/invoke" in replica_logs
    assert key not in text


def untrusted_cert(ctx: ssl.SSLContext) -> None:
    """Make ``ctx`` present a certificate from a CA nobody trusts (for new handshakes)."""
    trustme.CA().issue_cert("127.0.0.1", "localhost").configure_cert(ctx)


async def test_the_ingress_certificate_is_verified_and_a_failure_names_the_fix(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path)
    async with apps_for(cfg) as apps:
        await apps.deploy("default")
    async with executor(cfg) as ex:
        assert await ex.submit(add7, 1) == 8
    untrusted_cert(arm.ingress_ssl)  # a man in the middle, from here on
    marker = tmp_path / "ran"
    with pytest.raises(
        (acx.InvocationError, acx.RuntimeStartError),
        match=r"TLS verification of https://.* failed: .*CERTIFICATE_VERIFY_FAILED.*azure\.ca_bundle",
    ):
        async with executor(cfg) as ex:
            await ex.submit(Path.write_text, marker, "ran")
    assert not marker.exists()


@pytest.mark.parametrize("switch", [{"azure": {"verify_ssl": False}}, {"azure": {"connection_verify": False}},
                                    {"azure_containers": {"insecure": True}}, {"azure_storage": {"verify": False}}])  # fmt: skip
def test_there_is_no_switch_that_turns_tls_verification_off(arm: ArmEndpoint, tmp_path: Path, switch: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        load_config(config(arm, tmp_path, **switch), env={})


def test_no_code_path_disables_certificate_checks() -> None:
    package = TESTS.parent / "async_ca_exec"
    for path in package.rglob("*.py"):
        text = path.read_text()
        for pattern in ("ssl=False", "verify=False", "CERT_NONE", "check_hostname = False", "connection_verify=False",
                        "_create_unverified_context"):  # fmt: skip
            assert pattern not in text, f"{path.name} contains {pattern}"


async def test_the_suite_cannot_reach_the_managed_identity_endpoint() -> None:
    # conftest refuses every non-loopback connection, so a credential chain that probes
    # 169.254.169.254 fails loudly here instead of leaving the machine.
    with pytest.raises(OSError, match=r"only use 127\.0\.0\.1"):
        await asyncio.open_connection("169.254.169.254", 80)


def slow_once(path: str, seconds: float) -> str:
    with open(path, "a") as f:
        f.write("ran\n")
    time.sleep(seconds)
    return "done"


@pytest.mark.ingress_timeout(3)
async def test_a_call_longer_than_the_ingress_cut_returns_its_result_exactly_once(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path, azure_containers={"ingress_timeout": 3})
    async with apps_for(cfg) as apps:
        await apps.deploy("default")
    marker = tmp_path / "runs"
    async with executor(cfg, timeout=60) as ex:
        assert await ex.submit(slow_once, str(marker), 20) == "done"
        summary = ex.job_summary()
    assert arm.cuts >= 1  # the ingress did cut the call's stream
    assert summary["recovered_from_storage"] == 1 and summary["retries"] == 0
    assert marker.read_text() == "ran\n"  # it ran exactly once
    async with Storage(load_config(cfg, env={})) as st:
        left = [b.name for b in await st.list("acx/jobs/")]
    assert left == []  # its outcome blob was removed once read


async def test_runtime_metadata_is_recorded_in_blob_and_clean_removes_everything(arm: ArmEndpoint, tmp_path: Path) -> None:
    cfg = config(arm, tmp_path)
    async with apps_for(cfg) as apps:
        info = await apps.deploy("default")
        async with Storage(load_config(cfg, env={})) as st:
            doc = json.loads(await st.get(f"acx/runtimes/{info.app}.json"))
            assert doc["meta"]["protocol"] == protocol.PROTOCOL_VERSION and doc["app"] == info.app
            await st.put("acx/jobs/leftover/x.in", b"stale")
            await apps.clean()
            assert await st.list("acx/") == []


def big_or_slow(x: int) -> bytes:
    if x == 0:
        return b"r" * 6_000_000  # above the inline limit: written to Blob, sent as a reference
    time.sleep(6)
    return b"done"


@pytest.mark.ingress_timeout(3)
async def test_durable_calls_leave_nothing_behind_and_keep_sas_out_of_every_log(
    arm: ArmEndpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = config(arm, tmp_path, azure_containers={"ingress_timeout": 3})
    async with apps_for(cfg) as apps:
        await apps.deploy("default")
    async with executor(cfg, log_level="DEBUG") as ex:
        # Durable (the default timeout outlives the cut) but quick: nothing goes to Blob.
        assert await ex.map(add7, range(5)) == [i + 7 for i in range(5)]
        # A batch: item 0's big result is sent by reference before the cut, item 1 comes from
        # the outcome blob the runtime writes after it.
        results = await ex.map(big_or_slow, [0, 1], chunksize=2)
        assert results == [b"r" * 6_000_000, b"done"] and ex.job_summary()["recovered_from_storage"] == 1
    assert arm.cuts >= 1
    async with Storage(load_config(cfg, env={})) as st:
        assert [b.name for b in await st.list("acx/jobs/")] == []
    replica_logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("replica-*.log"))
    assert "POST /v1/invoke" in replica_logs  # the replicas logged at DEBUG, access log included
    assert "sig=" not in caplog.text + replica_logs  # no SAS URL anywhere


@pytest.mark.ingress_timeout(2)
async def test_a_replica_that_dies_during_a_durable_call_is_detected_and_the_call_sent_again(
    arm: ArmEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from async_ca_exec import transfer

    monkeypatch.setattr(transfer, "ALIVE_INTERVAL", 0.5)
    monkeypatch.setattr(transfer, "ALIVE_GRACE", 2.0)
    cfg = config(arm, tmp_path, azure_containers={"ingress_timeout": 2})
    async with apps_for(cfg) as apps:
        info = await apps.deploy("default")
    marker = tmp_path / "runs"
    async with executor(cfg, timeout=60) as ex:
        call = ex.submit(slow_once, str(marker), 5)
        await asyncio.sleep(3)  # cut at 2 s: the runtime carries on and says it is alive
        arm.crash_and_restart(info.app)
        assert await asyncio.wait_for(call, 60) == "done"
        assert ex.job_summary()["retries"] >= 1
    assert marker.read_text() == "ran\nran\n"  # the first run died with its replica


def test_a_script_without_credentials_gets_our_error_not_azure_identitys_log(tmp_path: Path) -> None:
    """With no logging configured, azure-identity's WARNING (the whole credential chain) went to
    stderr through Python's last-resort handler before our one-line error."""
    code = (
        "import asyncio\nfrom async_ca_exec import AsyncExecutor, AuthenticationError\n"
        "cfg = {'lithops': {'backend': 'azure'}, 'azure': {'subscription_id': 's', 'resource_group': 'rg',\n"
        "       'arm_endpoint': 'https://127.0.0.1:9', 'arm_retries': 0}}\n"
        "async def main():\n    try:\n        async with AsyncExecutor(config=cfg) as ex:\n            await ex.map(abs, [1])\n"
        "    except AuthenticationError as exc:\n        print('ERROR', exc)\nasyncio.run(main())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACX_", "AZURE_"))}
    env.update(AZURE_TOKEN_CREDENTIALS="dev", PATH=str(Path(sys.executable).parent), HOME=str(tmp_path))  # no az, no IMDS
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ERROR no Azure credential could be used"), (r.stdout, r.stderr)
    assert "Attempted credentials" not in r.stderr, r.stderr
