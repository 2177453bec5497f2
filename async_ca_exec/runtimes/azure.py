"""Azure Container Apps backend: deploy, find, update, delete and list runtimes, and run on them.

A runtime is one Container App running the container server image, named from the image,
the memory size and this package's version. Everything goes through Azure Resource Manager
with ``azure.mgmt.appcontainers.aio`` and an azure-core async credential
(``DefaultAzureCredential`` unless the caller passes one), so no ``az`` CLI is needed.
Calls then go straight to the app's HTTPS ingress with the foundation's invoker, signed with
the app's HMAC key, which lives only in the app's secrets and in this process's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import secrets
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__, protocol
from ..config import Config, memory_pair
from ..errors import (
    AsyncCAExecError,
    AuthenticationError,
    ConfigError,
    DeploymentError,
    RuntimeNotFoundError,
    RuntimeStartError,
)
from ..invoker import Endpoint
from ..storage import PREFIX, Storage
from . import demand as dq
from .common import check_compatible, fetch_meta, wait_ready

log = logging.getLogger("async_ca_exec.azure")

SERVER_PORT = 8080
#: Health probes' own port: not behind the ingress, never paused when a flood fills the
#: replica's tarpit of refused requests.
HEALTH_PORT = 8081
#: Every probe type, on the health port. For each type an app leaves out, Container Apps adds a
#: TCP probe on the ingress target port ("If ingress is enabled, the following default probes
#: are automatically added to the main app container if none is defined for each type",
#: https://learn.microsoft.com/azure/container-apps/health-probes#default-configuration): a
#: flood that fills the main port's accept queue would fail that liveness probe and get a
#: healthy replica restarted. Startup and liveness ask /v1/live (the server is up; draining
#: counts as alive), readiness /v1/health (workers ready). Limits from the REST spec
#: (ContainerAppProbe): failureThreshold 1-10, periodSeconds 1-240, initialDelaySeconds 1-60.
PROBES: list[dict[str, Any]] = [
    # Up to 1 + 2 x 10 = 21 s for the server to listen (its imports, on a quarter of a vCPU).
    {"type": "Startup", "httpGet": {"path": protocol.LIVE_PATH, "port": HEALTH_PORT},
     "initialDelaySeconds": 1, "periodSeconds": 2, "timeoutSeconds": 3, "failureThreshold": 10},
    # 30 s without an answer: the server's event loop is stuck, or its workers cannot start.
    {"type": "Liveness", "httpGet": {"path": protocol.LIVE_PATH, "port": HEALTH_PORT},
     "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
    {"type": "Readiness", "httpGet": {"path": protocol.HEALTH_PATH, "port": HEALTH_PORT},
     "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
]  # fmt: skip
CONTAINER_NAME = "acx-runtime"
HMAC_SECRET = "acx-hmac-key"
REGISTRY_SECRET = "acx-registry-password"
#: Tags that mark a Container App as one of our runtimes. They never hold a secret.
TAG_MANAGED = "acx-managed-by"
TAG_MANAGED_VALUE = "async_ca_exec"
TAG_VERSION = "acx-version"
TAG_RUNTIME = "acx-runtime"
TAG_MEMORY = "acx-memory"
#: A pre-warm lease (see ``plan_warm``): "<minReplicas to restore>:<lease end, epoch s>[:<maxReplicas to restore>]".
#: While it is there, minReplicas was raised by ``AsyncExecutor.warm`` (or ``map(prewarm=True)``);
#: the client that raised it puts it back, and should that client die, the next executor start
#: after the lease's end (or ``acx runtime update``) does.
TAG_WARM = "acx-warm"
#: When the read-only SAS of the app's demand-queue rule expires (epoch s; not a secret).
TAG_DEMAND_SAS = "acx-demand-sas-expiry"
#: A lease is only extended by more than this many seconds: each extension is an ARM write.
LEASE_SLACK = 60.0
#: Container Apps' maxReplicas when a template does not say.
DEFAULT_MAX_REPLICAS = 10
#: Azure Container Apps allows at most this termination grace period (seconds).
MAX_GRACE = 600
#: Consumption-only environments stop at 2 vCPU / 4 GiB per replica.
CONSUMPTION_ONLY_MAX_MEMORY = 4096
#: Longest a single ARM operation (create, update, delete) may take before we give up.
#: What ARM answers (409) to a change while another operation changes the same app or
#: environment: wait for it and send the change again. No Microsoft page lists these codes:
#: they are the ones Container Apps is reported returning (ContainerAppLockConflict, "Cannot
#: modify container App ... because another modification is in progress. Please retry the
#: operation.", microsoft/azure-container-apps#175; ManagedEnvironmentOperationInProgress,
#: #701; ContainerAppOperationInProgress, retried on by deployment scripts). Any other 409 is
#: a real conflict and fails at once.
IN_PROGRESS_CODES = frozenset(
    {"ContainerAppOperationInProgress", "ContainerAppLockConflict", "ManagedEnvironmentOperationInProgress"}
)
#: Backoff between those retries: doubling from the first, capped.
CONFLICT_BACKOFF = (1.0, 30.0)
#: How long closing an executor waits to put back a pre-warm through such conflicts.
RESTORE_WAIT = 60.0
#: An environment's core quota when Azure does not say: "100" cores per environment, "Calculated
#: by the sum of cores requested by each active replica of all revisions in an environment"; 10 on
#: free trial subscriptions (https://learn.microsoft.com/azure/container-apps/quotas; its table
#: is quoted from the docs.azure.cn/en-us copy and the ja-jp and zh-tw Learn pages).
DEFAULT_CORE_QUOTA = 100.0
QUOTA_HELP = "https://learn.microsoft.com/azure/container-apps/quotas"
#: The usage ARM reports for the Consumption profile's cores (ManagedEnvironmentUsages_List; the
#: name from the REST spec's example, Usages.json 2024-03-01).
CORE_USAGE = "ManagedEnvironmentConsumptionCores"
#: What Container Apps says when a revision does not fit the quota (quoted on the ja-jp quotas page).
QUOTA_EXCEEDED = "Maximum Allowed Cores exceeded"
_SIGN_IN_HELP = (
    "sign in with `az login`, or set AZURE_CLIENT_ID / AZURE_TENANT_ID / AZURE_CLIENT_SECRET for a service "
    "principal, or run where a managed identity is assigned, or pass credential= to the executor"
)
_IMAGE_RE = re.compile(r"^(?:[a-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9._/-]+(?::[A-Za-z0-9._-]{1,128})?(?:@sha256:[a-f0-9]{64})?$")


# ------------------------------------------------------------------------------------
# naming and resource bodies


def default_image(docker_server: str | None) -> str:
    """The default runtime image for this client's Python and package version."""
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    registry = (docker_server or "docker.io/asyncacexec").rstrip("/")
    if registry in ("index.docker.io", "docker.io"):
        registry = "docker.io/asyncacexec"
    return f"{registry}/acx-default-{py}:{__version__}"


def check_image(image: str) -> str:
    if len(image) > 256:
        raise ConfigError(f"runtime image names are limited to 256 characters (Azure tag values); got {len(image)}")
    if not _IMAGE_RE.match(image) or "//" in image:
        raise ConfigError(
            f"runtime {image!r} is not an image name: use lowercase registry/repository:tag, "
            "e.g. myregistry.azurecr.io/me/runtime:1"
        )
    return image


def app_name(image: str, memory: int, version: str = __version__) -> str:
    """Container App name: lowercase letters, digits and '-', at most 32 characters, from a letter.

    >>> app_name("myregistry.azurecr.io/me/rt:1", 512, "0.1.0")
    'acx-rt-1-512-...'                                          # doctest: +SKIP
    """
    digest = hashlib.sha256(f"{image}|{memory}|{version}".encode()).hexdigest()[:8]
    last = image.rsplit("/", 1)[-1].split("@", 1)[0]
    slug = re.sub(r"[^a-z0-9]+", "-", last.lower()).strip("-")
    room = 32 - len("acx-") - len(f"-{memory}-{digest}")
    slug = slug[:room].strip("-") or "rt"
    return f"acx-{slug}-{memory}-{digest}"


def worker_processes(memory: int, configured: int | None) -> int:
    cpu, _mem = memory_pair(memory)
    return configured or max(1, -(-int(cpu * 4) // 4))  # the replica's vCPUs, rounded up


def app_body(
    *,
    image: str,
    memory: int,
    runtime_timeout: float,
    location: str,
    environment_id: str,
    hmac_key: str,
    min_replicas: int,
    max_replicas: int,
    workers: int,
    registry: tuple[str, str, str] | None,
    registry_identity: tuple[str, str] | None = None,
    workload_profile: str | None = None,
    deployed_at: str | None = None,
    polling_interval: int = 5,
    cooldown: int = 300,
    demand: tuple[dict[str, Any], str, int] | None = None,
) -> dict[str, Any]:
    """The Container App resource for a runtime (the JSON sent to ARM).

    ``registry`` is (server, user, password); ``registry_identity`` is (server, identity), the
    identity a user-assigned one's resource id or ``system``, and wins over ``registry``;
    ``workload_profile`` names the environment's profile to run on (None in a Consumption-only
    environment); ``deployed_at`` makes every deploy a new revision, so an image rebuilt under
    the same tag is pulled again; ``demand`` is the demand queue's scale rule, the read-only
    connection string it uses and when that expires (see :mod:`.demand`).
    """
    cpu, mem = memory_pair(memory)
    secrets_: list[dict[str, str]] = [{"name": HMAC_SECRET, "value": hmac_key}]
    registries: list[dict[str, str]] = []
    identity: dict[str, Any] | None = None
    if registry_identity is not None:
        # RegistryCredentials.identity: "For user-assigned identities, use the full
        # user-assigned identity Resource ID. For system-assigned identities, use 'system'"
        # (REST spec); the identity must also be the app's own (ManagedServiceIdentity), as in
        # https://learn.microsoft.com/azure/container-apps/containers#managed-identity-with-azure-container-registry.
        server, who = registry_identity
        registries.append({"server": server, "identity": who})
        if who == "system":
            identity = {"type": "SystemAssigned"}
        else:
            identity = {"type": "UserAssigned", "userAssignedIdentities": {who: {}}}
    elif registry is not None:
        server, user, password = registry
        secrets_.append({"name": REGISTRY_SECRET, "value": password})
        registries.append({"server": server, "username": user, "passwordSecretRef": REGISTRY_SECRET})
    rules: list[dict[str, Any]] = [
        # Replicas for bursts: Container Apps adds one per concurrentRequests requests *arriving*
        # per second over 15 s windows (scale-app#http), so it cannot see long calls in flight;
        # the demand queue's rule says how many replicas the calls in flight need.
        {"name": "http-concurrency", "http": {"metadata": {"concurrentRequests": str(workers)}}}
    ]
    if demand is not None:
        rule, connection, _expiry = demand
        secrets_.append({"name": dq.DEMAND_SECRET, "value": connection})
        rules.append(rule)
    grace = int(min(MAX_GRACE, max(30, runtime_timeout + 10)))
    env = [
        {"name": "ACX_HMAC_KEY", "secretRef": HMAC_SECRET},
        {"name": "ACX_SERVER_PORT", "value": str(SERVER_PORT)},
        {"name": "ACX_HEALTH_PORT", "value": str(HEALTH_PORT)},
        {"name": "ACX_WORKER_PROCESSES", "value": str(workers)},
        {"name": "ACX_RUNTIME_TIMEOUT", "value": f"{runtime_timeout:g}"},
        # Drain before Container Apps' SIGKILL at the end of the grace period.
        {"name": "ACX_SHUTDOWN_GRACE", "value": str(grace - 5)},
    ]
    if deployed_at:
        env.append({"name": "ACX_DEPLOYED_AT", "value": deployed_at})
    body: dict[str, Any] = {
        "location": location,
        "tags": {
            TAG_MANAGED: TAG_MANAGED_VALUE,
            TAG_VERSION: __version__,
            TAG_RUNTIME: image,
            TAG_MEMORY: str(memory),
            **({TAG_DEMAND_SAS: str(demand[2])} if demand is not None else {}),
        },
        "properties": {
            "environmentId": environment_id,
            "configuration": {
                "activeRevisionsMode": "Single",
                "ingress": {
                    "external": True,
                    "targetPort": SERVER_PORT,
                    "transport": "auto",
                    "allowInsecure": False,
                    "traffic": [{"latestRevision": True, "weight": 100}],
                },
                "secrets": secrets_,
                "registries": registries,
            },
            "template": {
                "containers": [
                    {
                        "name": CONTAINER_NAME,
                        "image": image,
                        "resources": {"cpu": cpu, "memory": mem},
                        "env": env,
                        "probes": copy.deepcopy(PROBES),
                    }
                ],
                "scale": {
                    "minReplicas": min_replicas,
                    "maxReplicas": max_replicas,
                    # KEDA's settings (api-version 2025-01-01 and later): how often the queue
                    # rule is read, and how long without demand before scaling in.
                    "pollingInterval": polling_interval,
                    "cooldownPeriod": cooldown,
                    "rules": rules,
                },
                "terminationGracePeriodSeconds": grace,
            },
        },
    }
    if workload_profile:
        body["properties"]["workloadProfileName"] = workload_profile
    if identity is not None:
        body["identity"] = identity
    return body


# ------------------------------------------------------------------------------------
# settings


#: Where the shared Azure settings may be given (the backend section's copy wins, as in Lithops).
_SECTIONS = "the config's azure or azure_containers section"


@dataclass
class AzureTarget:
    """Where runtimes live, resolved from the config (Lithops' merge: the backend section wins)."""

    subscription_id: str
    resource_group: str
    region: str | None
    arm_endpoint: str
    ca_bundle: str | None
    environment: str
    environment_id: str | None
    polling_interval: float
    arm_retries: int
    startup_timeout: float
    operation_timeout: float
    registry: tuple[str, str, str] | None = field(repr=False)
    min_replicas: int = 0
    max_replicas: int = 100
    #: (registry server, identity): the app pulls as this managed identity (and ``registry``
    #: is None: docker_user / docker_password then serve only this machine's pushes).
    registry_identity: tuple[str, str] | None = None

    @classmethod
    def from_config(cls, cfg: Config, env: dict[str, str] | None = None) -> AzureTarget:
        env = dict(os.environ if env is None else env)
        az, ac = cfg.azure, cfg.azure_containers
        subscription = ac.subscription_id or az.subscription_id or env.get("AZURE_SUBSCRIPTION_ID")
        group = ac.resource_group or az.resource_group
        missing = []
        if not subscription:
            missing.append(f"azure.subscription_id (from {_SECTIONS}, or $AZURE_SUBSCRIPTION_ID)")
        if not group:
            missing.append(f"azure.resource_group (from {_SECTIONS})")
        if missing:
            raise ConfigError(
                f"the Azure backend needs {' and '.join(missing)}; looked at: {cfg.looked_at}. Add them under "
                "azure: in the config file (Lithops' azure section works as is)"
            )
        registry = None
        identity = None
        if ac.registry_identity:
            if not ac.docker_server:
                raise ConfigError(
                    "azure_containers.registry_identity is set but docker_server is not: name the registry the identity "
                    "pulls from (e.g. myregistry.azurecr.io)"
                )
            # The identity wins: the app gets no registry password even when docker_user /
            # docker_password are set (they are this machine's, to push and look up images).
            identity = (ac.docker_server.split("/", 1)[0], ac.registry_identity)
        elif ac.docker_user and ac.docker_password is not None:
            if not ac.docker_server:
                raise ConfigError("azure_containers.docker_user is set but docker_server is not: name the registry")
            registry = (ac.docker_server, ac.docker_user, ac.docker_password.get_secret_value())
        if ac.min_workers > ac.max_workers:
            raise ConfigError(f"azure_containers.min_workers={ac.min_workers} exceeds max_workers={ac.max_workers}")
        return cls(
            subscription_id=str(subscription),
            resource_group=str(group),
            region=ac.region or ac.location or az.region or az.location,
            arm_endpoint=az.arm_endpoint.rstrip("/"),
            ca_bundle=az.ca_bundle,
            environment=ac.environment,
            environment_id=ac.environment_id,
            polling_interval=az.polling_interval,
            arm_retries=az.arm_retries,
            startup_timeout=ac.startup_timeout,
            operation_timeout=az.operation_timeout,
            registry=registry,
            min_replicas=ac.min_workers,
            max_replicas=ac.max_workers,
            registry_identity=identity,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=self.ca_bundle) if self.ca_bundle else None


@dataclass
class RuntimeInfo:
    """One deployed runtime, as `acx runtime list` shows it."""

    runtime: str
    memory: int | None
    version: str | None
    app: str
    fqdn: str | None
    state: str | None
    max_replicas: int | None
    replicas: int | None = None  # running now (filled in by AzureApps.runtimes)
    revision: str | None = None
    ready_revision: str | None = None
    ours: bool = True


# ------------------------------------------------------------------------------------
# metadata cache (no secrets)


def runtime_blob(app: str) -> str:
    return f"{PREFIX}/runtimes/{app}.json"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "async-ca-exec" / "runtimes"


def _cache_path(target: AzureTarget, app: str) -> Path:
    return cache_dir() / f"{target.subscription_id}_{target.resource_group}_{app}.json".lower()


def record_meta(target: AzureTarget, app: str, image: str, memory: int, fqdn: str, meta: dict[str, Any]) -> Path:
    path = _cache_path(target, app)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"app": app, "runtime": image, "memory": memory, "fqdn": fqdn, "version": __version__, "meta": meta,
           "recorded": time.time()}  # fmt: skip
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)
    return path


def cached_meta(target: AzureTarget, app: str, fqdn: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(_cache_path(target, app).read_text())
    except (OSError, ValueError):
        return None
    if doc.get("fqdn") != fqdn or doc.get("version") != __version__ or not isinstance(doc.get("meta"), dict):
        return None
    return dict(doc["meta"])


def forget_meta(target: AzureTarget, app: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _cache_path(target, app).unlink()


# ------------------------------------------------------------------------------------
# ARM errors


def _arm_message(exc: Any) -> tuple[int | None, str, str]:
    status = getattr(exc, "status_code", None)
    err = getattr(exc, "error", None)
    code = str(getattr(err, "code", "") or "")
    message = str(getattr(err, "message", "") or getattr(exc, "message", "") or exc).strip()
    return status, code, message.splitlines()[0] if message else ""


@contextlib.asynccontextmanager
async def arm_errors(
    target: AzureTarget,
    what: str,
    *,
    not_found: Callable[[], BaseException] | None = None,
    bad_image: Callable[[str], BaseException] | None = None,
) -> AsyncIterator[None]:
    """Turn azure-core errors into one-line errors that say what to do. ``bad_image`` makes
    the error for a template whose image Azure cannot pull (given Azure's message)."""
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ServiceRequestError,
        ServiceResponseError,
    )

    try:
        yield
    except ClientAuthenticationError as exc:
        status, code, message = _arm_message(exc)
        if status in (401, 403):
            raise AuthenticationError(
                f"Azure refused the credentials while {what} ({code or status}): {message}; {_SIGN_IN_HELP}"
            ) from None
        raise AuthenticationError(
            f"no Azure credential could be used while {what}: {message.rstrip('.')}; {_SIGN_IN_HELP}"
        ) from None
    except HttpResponseError as exc:
        status, code, message = _arm_message(exc)
        rg, sub = target.resource_group, target.subscription_id
        if status == 403:
            raise AuthenticationError(
                f"Azure denied {what} ({code or 403}): the signed-in identity needs the Contributor role (or "
                f"'Azure ContainerApps Contributor') on resource group {rg}"
            ) from None
        if status == 404 and code == "ResourceGroupNotFound":
            raise ConfigError(
                f"resource group {rg!r} does not exist in subscription {sub}: create it "
                f"(az group create -n {rg} -l <region>) or fix azure.resource_group"
            ) from None
        if status == 404 and code in ("SubscriptionNotFound", "InvalidSubscriptionId"):
            raise ConfigError(f"subscription {sub!r} was not found: fix azure.subscription_id") from None
        if status == 404 and not_found is not None:
            raise not_found() from None
        # A 400 at PUT, or (a system-assigned identity at the app's first deploy) an operation
        # that ends Failed with the same error.
        failed_op = status is None or 200 <= status < 300
        if (status == 400 or failed_op) and code == "InvalidParameterValueInContainerTemplate" and ".image'" in message:
            if bad_image:
                raise bad_image(message) from None
        if code == "MissingSubscriptionRegistration":
            raise ConfigError(
                f"subscription {sub} is not registered for Container Apps: run `az provider register -n Microsoft.App` "
                "(once per subscription) and try again"
            ) from None
        if QUOTA_EXCEEDED in message:
            raise DeploymentError(
                f"Azure could not finish {what}: the environment's core quota is used up ({message}); lower "
                "azure_containers.min_workers, max_workers or runtime_memory, stop other apps of the environment, or "
                f"request a quota increase: {QUOTA_HELP}"
            ) from None
        if status == 409:  # not one that waiting out another operation solves (see AzureApps._change)
            raise DeploymentError(f"Azure refused {what} with a conflict ({code or 409}): {message}") from None
        if status is None or 200 <= status < 300:  # a long-running operation that ended in failure
            raise DeploymentError(f"Azure could not finish {what} ({code or 'Failed'}): {message}") from None
        raise DeploymentError(f"Azure answered HTTP {status} while {what} ({code}): {message}") from None
    except ServiceRequestError as exc:
        raise DeploymentError(f"cannot reach Azure Resource Manager at {target.arm_endpoint} while {what}: {exc}") from None
    except ServiceResponseError as exc:
        raise DeploymentError(f"Azure Resource Manager stopped answering while {what}: {exc}; try again") from None


# ------------------------------------------------------------------------------------
# management


def _plain(model: Any) -> dict[str, Any]:
    if model is None:
        return {}
    if isinstance(model, dict):
        return model
    as_dict = getattr(model, "as_dict", None)
    return as_dict() if as_dict is not None else dict(model)


def _get(doc: dict[str, Any], *path: str) -> Any:
    cur: Any = doc
    for p in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(p)
    return cur


def runtime_info(app: dict[str, Any]) -> RuntimeInfo:
    tags = app.get("tags") or {}
    mem = tags.get(TAG_MEMORY)
    return RuntimeInfo(
        runtime=tags.get(TAG_RUNTIME) or str(_get(app, "properties", "template", "containers") or "?"),
        memory=int(mem) if mem and str(mem).isdigit() else None,
        version=tags.get(TAG_VERSION),
        app=str(app.get("name")),
        fqdn=_get(app, "properties", "configuration", "ingress", "fqdn"),
        state=_get(app, "properties", "provisioningState"),
        max_replicas=_get(app, "properties", "template", "scale", "maxReplicas"),
        revision=_get(app, "properties", "latestRevisionName"),
        ready_revision=_get(app, "properties", "latestReadyRevisionName"),
        ours=tags.get(TAG_MANAGED) == TAG_MANAGED_VALUE,
    )


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def concurrent_requests(app: dict[str, Any]) -> int | None:
    """The app's HTTP scale rule's ``concurrentRequests``: the requests one replica takes."""
    for rule in _get(app, "properties", "template", "scale", "rules") or []:
        value = _get(rule, "http", "metadata", "concurrentRequests")
        if value is not None and str(value).isdigit() and int(value) > 0:
            return int(value)
    return None


# ------------------------------------------------------------------------------------
# pre-warming: minReplicas raised for a while, under a lease kept in a tag


@dataclass(frozen=True)
class WarmLease:
    """The scale to put back after a pre-warm, and until when the warming client holds it."""

    restore_min: int
    until: int  # epoch seconds
    restore_max: int | None = None  # set when maxReplicas had to be raised too

    @property
    def tag(self) -> str:
        extra = "" if self.restore_max is None else f":{self.restore_max}"
        return f"{self.restore_min}:{self.until}{extra}"

    @classmethod
    def parse(cls, value: str) -> WarmLease | None:
        parts = str(value).split(":")
        if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
            return None
        return cls(int(parts[0]), int(parts[1]), int(parts[2]) if len(parts) == 3 else None)


def restore_command(name: str, resource_group: str, lease: WarmLease) -> str:
    """The ``az`` command that does what restoring ``lease`` does, for when this client cannot."""
    extra = "" if lease.restore_max is None else f" --max-replicas {lease.restore_max}"
    return f"az containerapp update -n {name} -g {resource_group} --min-replicas {lease.restore_min}{extra}"


def warm_lease(app: dict[str, Any], *, fallback_min: int = 0) -> WarmLease | None:
    """The app's pre-warm lease, None without one. A tag someone edited into nonsense counts as
    a lease that has ended, restoring ``fallback_min`` (the configured min_workers)."""
    value = (app.get("tags") or {}).get(TAG_WARM)
    if value is None:
        return None
    return WarmLease.parse(value) or WarmLease(fallback_min, 0)


@dataclass(frozen=True)
class ScaleChange:
    """One PATCH of an app's scale and tags, and what it leaves in effect."""

    body: dict[str, Any]
    min_replicas: int
    lease: WarmLease | None  # the lease the PATCH writes; None: it removes the tag
    what: str  # for error messages: "raising minReplicas of Container App x to 3"


def _scale(app: dict[str, Any]) -> tuple[int, int]:
    scale = _get(app, "properties", "template", "scale") or {}
    max_replicas = scale.get("maxReplicas")
    return int(scale.get("minReplicas") or 0), int(DEFAULT_MAX_REPLICAS if max_replicas is None else max_replicas)


def scale_patch(app: dict[str, Any], tags: dict[str, str], scale: dict[str, int]) -> dict[str, Any]:
    """The PATCH body that sets ``tags`` and, if ``scale`` is not empty, those keys of
    ``template.scale``.

    Tags go as a whole: ARM's resource provider contract replaces a resource's tags on PATCH
    rather than merging them (so this is also how one is removed). A scale change sends the
    *whole* template as GET returned it, with only the scale keys changed: Container Apps may
    replace the template's containers with a partial template's. It never sends the
    configuration, so no secret travels (GET does not return their values anyway). A template
    change is a revision-scope change: Container Apps creates a new revision, whose replicas
    start while the old revision's drain (tags alone create none).
    """
    body: dict[str, Any] = {"tags": dict(tags)}
    if scale:
        template = copy.deepcopy(_get(app, "properties", "template") or {})
        if template.get("revisionSuffix"):
            del template["revisionSuffix"]  # a suffix an existing revision has would be refused
        template.setdefault("scale", {}).update(scale)
        body["properties"] = {"template": template}
    return body


def check_warm(replicas: int, max_workers: int) -> None:
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise ValueError(f"replicas={replicas!r} must be a whole number >= 0")
    if replicas > max_workers:
        raise ConfigError(
            f"cannot pre-warm {replicas} replicas: azure_containers.max_workers is {max_workers} (the app's maxReplicas "
            "limit, at most 1,000); raise azure_containers.max_workers or warm fewer replicas"
        )


def plan_warm(
    app: dict[str, Any], replicas: int, *, lease: float, min_workers: int, max_workers: int, now: float | None = None
) -> tuple[int, ScaleChange | None]:
    """(minReplicas in effect, the PATCH to send or None) to keep at least ``replicas``
    replicas of ``app`` running until ``lease`` seconds from now.

    minReplicas is never lowered, nor set below ``min_workers``; maxReplicas is raised with
    it when needed (never above ``max_workers``). The lease records the scale to put back: the
    one from before the first warm, when another lease (this client's or another's, ended or
    not) is already there, so a warmed value is never taken for the original; its end is the
    later of the two.
    """
    check_warm(replicas, max_workers)
    now = time.time() if now is None else now
    name = str(app.get("name"))
    cur_min, cur_max = _scale(app)
    held = warm_lease(app, fallback_min=min_workers)
    want = max(replicas, min_workers, cur_min)
    until = int(now + lease)
    scale: dict[str, int] = {}
    if want != cur_min:
        scale["minReplicas"] = want
    if want > cur_max:
        scale["maxReplicas"] = want
    if held is None:
        if not scale:
            return cur_min, None  # already that warm, and not by a lease: nothing to restore either
        new = WarmLease(cur_min, until, cur_max if "maxReplicas" in scale else None)
    else:
        if not scale and until <= held.until + LEASE_SLACK:
            return cur_min, None
        restore_max = held.restore_max if held.restore_max is not None else (cur_max if "maxReplicas" in scale else None)
        new = WarmLease(held.restore_min, max(until, held.until), restore_max)
    tags = {**(app.get("tags") or {}), TAG_WARM: new.tag}
    what = f"raising minReplicas of Container App {name} to {want}" if scale else f"extending the pre-warm lease of {name}"
    return want, ScaleChange(scale_patch(app, tags, scale), want, new, what)


def plan_restore(
    app: dict[str, Any], *, leases: Collection[WarmLease] | None = None, expired_only: bool = False, min_workers: int = 0,
    now: float | None = None,
) -> ScaleChange | None:  # fmt: skip
    """The PATCH that puts back the scale an app's lease recorded and removes the tag; None
    when there is nothing to do: no lease, a lease none of ``leases`` (another client extended
    it, and restores it in turn), or with ``expired_only`` a lease that has not ended."""
    held = warm_lease(app, fallback_min=min_workers)
    if held is None or (leases is not None and held.until not in {lease.until for lease in leases}):
        return None
    if expired_only and held.until > (time.time() if now is None else now):
        return None
    cur_min, cur_max = _scale(app)
    scale: dict[str, int] = {}
    if held.restore_min != cur_min:
        scale["minReplicas"] = held.restore_min
    if held.restore_max is not None and held.restore_max != cur_max:
        scale["maxReplicas"] = held.restore_max
    tags = {k: v for k, v in (app.get("tags") or {}).items() if k != TAG_WARM}
    name = str(app.get("name"))
    what = f"restoring minReplicas of Container App {name} to {held.restore_min}"
    return ScaleChange(scale_patch(app, tags, scale), held.restore_min, None, what)


@dataclass
class Environment:
    id: str
    location: str
    #: Names of the environment's workload profiles; empty for a Consumption-only environment.
    profiles: list[str]
    group: str = ""
    name: str = ""


_ENV_ID_RE = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/([^/]+)/providers/Microsoft\.App/managedEnvironments/([^/]+)$", re.IGNORECASE
)


@dataclass(frozen=True)
class CoreQuota:
    """An environment's core quota and the cores its active replicas use now (None: unknown)."""

    limit: float
    used: float | None
    source: str  # for messages: where the limit comes from

    @property
    def free(self) -> float:
        return self.limit - (self.used or 0.0)

    def describe(self) -> str:
        used = "usage unknown" if self.used is None else f"{self.used:g} in use now"
        return f"{self.limit:g} cores ({self.source}; {used})"


def fitting(cores: float, per_replica: float) -> int:
    """How many replicas of ``per_replica`` cores fit in ``cores``."""
    return max(0, int(cores / per_replica + 1e-9)) if per_replica > 0 else 0


def replica_cpu(app: dict[str, Any], fallback: float) -> float:
    """The vCPUs one replica of ``app`` asks for (its containers' together)."""
    cpus = [_get(c, "resources", "cpu") for c in _get(app, "properties", "template", "containers") or []]
    return float(sum(float(c) for c in cpus if c is not None)) or fallback


class AzureApps:
    """Runtimes in one resource group: the control-plane operations behind `acx runtime`."""

    def __init__(self, cfg: Config, *, credential: Any = None, progress: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.target = AzureTarget.from_config(cfg)
        self._credential = credential
        self._own_credential = credential is None
        self._client: Any = None
        self._progress = progress or (lambda msg: log.info("%s", msg))
        self._has_progress = progress is not None
        #: Where runtime metadata is kept besides the local cache, when Blob storage is configured.
        self._storage: Storage | None = Storage(cfg, credential=credential) if cfg.storage_configured else None

    async def __aenter__(self) -> AzureApps:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        from azure.mgmt.appcontainers.aio import ContainerAppsAPIClient

        if self._credential is None:
            from ..credentials import default_credential

            self._credential = default_credential()
        t = self.target
        try:
            self._client = ContainerAppsAPIClient(
                self._credential,
                t.subscription_id,
                base_url=t.arm_endpoint,
                credential_scopes=[f"{t.arm_endpoint}/.default"],
                connection_verify=t.ca_bundle or True,
                polling_interval=t.polling_interval,
                retry_total=t.arm_retries,
            )
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._storage is not None:
            await self._storage.aclose()
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._own_credential and self._credential is not None:
            await self._credential.close()
            self._credential = None

    @property
    def client(self) -> Any:
        if self._client is None:
            raise RuntimeError("AzureApps is not open")
        return self._client

    async def _change(
        self,
        what: str,
        begin: Callable[[], Awaitable[Any]],
        *,
        budget: float | None = None,
        not_found: Callable[[], BaseException] | None = None,
        bad_image: Callable[[str], BaseException] | None = None,
    ) -> Any:
        """Start a long-running ARM change with ``begin()`` and return its result, its errors
        turned into ours by :func:`arm_errors` (``not_found``, ``bad_image`` as there). A 409
        saying another operation is changing the resource (another client, the portal, a
        revision still provisioning) is waited out: the change is sent again with backoff for up
        to ``budget`` seconds (default ``azure.operation_timeout``), which the error names; the
        accepted change then has that long again to finish."""
        async with arm_errors(self.target, what, not_found=not_found, bad_image=bad_image):
            return await self._change_once_accepted(what, begin, budget)

    async def _change_once_accepted(self, what: str, begin: Callable[[], Awaitable[Any]], budget: float | None) -> Any:
        from azure.core.exceptions import HttpResponseError

        loop = asyncio.get_running_loop()
        setting = " (azure.operation_timeout)" if budget is None else ""
        budget = self.target.operation_timeout if budget is None else budget
        deadline = loop.time() + budget
        delay, cap = CONFLICT_BACKOFF
        while True:
            try:
                poller = await begin()  # one request: azure-core's own timeouts bound it
                break
            except HttpResponseError as exc:
                status, code, _ = _arm_message(exc)
                if status != 409 or code not in IN_PROGRESS_CODES:
                    raise
                left = deadline - loop.time()
                if left <= 0:
                    raise DeploymentError(
                        f"Azure kept refusing {what} for {budget:g} s{setting} because another operation was changing "
                        f"the same resource ({code}): see it in the portal or with `az containerapp revision list -g "
                        f"{self.target.resource_group}`, then run the command again"
                        + (" (or raise azure.operation_timeout)" if setting else "")
                    ) from None
                self._progress(f"{what}: another operation is changing it ({code}); trying again in {min(delay, left):g} s")
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, cap)
        # Accepted: the operation itself gets the whole budget again (an accepted change must not
        # be reported as timed out because waiting out another one used the time up).
        try:
            return await asyncio.wait_for(poller.result(), budget)
        except asyncio.TimeoutError:
            raise DeploymentError(
                f"Azure did not finish {what} within {budget:g} s{setting}; look at the app's revisions in the portal "
                "(a revision that never becomes ready keeps the operation running)"
            ) from None

    # -- resolving ---------------------------------------------------------------------

    def image_for(self, runtime: str | None) -> tuple[str, bool]:
        """(image, is_default) for a runtime name, ``default`` or unset meaning the default image."""
        name = runtime or self.cfg.azure_containers.runtime
        default = default_image(self.cfg.azure_containers.docker_server)
        if not name or name in ("default", default):
            return default, True
        return check_image(name), False

    async def environment(self, *, create: bool = False) -> Environment:
        """The Container Apps environment runtimes go into; created if asked and missing."""
        t = self.target
        group, name = t.resource_group, t.environment
        if t.environment_id:
            m = _ENV_ID_RE.match(t.environment_id)
            if not m:
                raise ConfigError(
                    f"azure_containers.environment_id={t.environment_id!r} is not a managed environment id "
                    "(/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.App/managedEnvironments/<name>)"
                )
            group, name = m.group(1), m.group(2)
        env: dict[str, Any] | None
        try:
            async with arm_errors(t, f"reading Container Apps environment {name}", not_found=_NotFound):
                env = _plain(await self.client.managed_environments.get(group, name))
        except _NotFound:
            env = None
        if not env:
            if not create:
                raise ConfigError(
                    f"Container Apps environment {name!r} does not exist in resource group {group!r}: add "
                    f"--create-environment to `acx runtime deploy`, or create it with `az containerapp env create "
                    f"--name {name} --resource-group {group} --location {t.region or '<region>'}`"
                )
            env = await self._create_environment(group, name)
        profiles = [str(p.get("name")) for p in (_get(env, "properties", "workloadProfiles") or []) if p.get("name")]
        return Environment(str(env.get("id")), str(env.get("location") or t.region), profiles, group, name)

    async def core_quota(self, group: str, name: str) -> CoreQuota:
        """Environment ``name``'s core quota and usage, as ARM reports them (the environment's
        usages); azure_containers.core_quota overrides the limit; without either, Container
        Apps' documented default. Never fails: a quota Azure will not tell is assumed."""
        from azure.core.exceptions import AzureError

        limit = used = None
        try:
            async for usage in self.client.managed_environment_usages.list(group, name):
                doc = _plain(usage)
                if _get(doc, "name", "value") == CORE_USAGE:
                    limit, used = float(doc["limit"]), float(doc["currentValue"])
        except (AzureError, KeyError, TypeError, ValueError) as exc:
            log.debug("cannot read the core usage of environment %s (%s): assuming its quota", name, exc)
        configured = self.cfg.azure_containers.core_quota
        if configured is not None:
            return CoreQuota(configured, used, "azure_containers.core_quota")
        if limit is not None:
            return CoreQuota(limit, used, f"environment {name}'s quota, as Azure reports it")
        return CoreQuota(
            DEFAULT_CORE_QUOTA,
            None,
            "Container Apps' default, which Azure did not confirm; 10 on trial subscriptions; set "
            "azure_containers.core_quota if yours differs",
        )

    def _warn(self, message: str) -> None:
        """A warning: to the progress callback (the CLI's stderr) if there is one, else the log."""
        if self._has_progress:
            self._progress(f"warning: {message}")
        else:
            log.warning("%s", message)

    async def _check_cores(self, env: Environment, memory: int, *, update: bool) -> None:
        """Warn when max_workers replicas of this size can ask for more cores than the
        environment's quota: past it, replicas do not start ("provisioning times out with a
        failure"; the app "may be restricted from scaling out", the quotas page)."""
        cpu = memory_pair(memory)[0]
        workers = self.target.max_replicas
        # An update is a new revision, and in single revision mode the old revision's replicas
        # stay active until the new one is ready (application-lifecycle-management, "zero
        # downtime deployment"): for a while both count against the quota.
        per = cpu * (2 if update else 1)
        want = workers * per
        quota = await self.core_quota(env.group, env.name)
        if want <= quota.limit:
            return
        swap = (
            f", {want:g} while an update swaps revisions (the old revision's replicas run until the new one's are ready)"
            if update
            else ""
        )
        self._warn(
            f"max_workers={workers} replicas of {cpu:g} vCPU (runtime_memory {memory}) can ask for {workers * cpu:g} cores"
            f"{swap}, and environment {env.name} allows {quota.describe()}; past it, replicas do not start. Lower "
            f"azure_containers.max_workers to {fitting(quota.limit, per)} (what fits), or runtime_memory, or request a quota "
            f"increase: {QUOTA_HELP}"
        )

    async def _create_environment(self, group: str, name: str) -> dict[str, Any]:
        t = self.target
        if not t.region:
            raise ConfigError("creating a Container Apps environment needs azure.region (e.g. westeurope)")
        self._progress(f"creating Container Apps environment {name} in {group} ({t.region}) ...")
        # A workload-profiles environment: its Consumption profile runs replicas of up to
        # 4 vCPU / 8 GiB, where a Consumption-only environment stops at 2 vCPU / 4 GiB.
        body = {
            "location": t.region,
            "properties": {"workloadProfiles": [{"name": "Consumption", "workloadProfileType": "Consumption"}]},
        }
        env = _plain(
            await self._change(
                f"creating environment {name}", lambda: self.client.managed_environments.begin_create_or_update(group, name, body)
            )
        )
        self._progress(f"environment {name} is ready")
        return env

    async def get_app(self, name: str) -> dict[str, Any] | None:
        try:
            async with arm_errors(self.target, f"reading Container App {name}", not_found=_NotFound):
                return _plain(await self.client.container_apps.get(self.target.resource_group, name))
        except _NotFound:
            return None

    async def secrets(self, name: str) -> dict[str, str]:
        """The app's secrets, by name (values included: kept in memory only)."""
        async with arm_errors(self.target, f"reading the secrets of Container App {name}"):
            listed = _plain(await self.client.container_apps.list_secrets(self.target.resource_group, name))
        return {str(s["name"]): str(s.get("value") or "") for s in listed.get("value") or [] if s.get("name")}

    async def hmac_key(self, name: str) -> str | None:
        return (await self.secrets(name)).get(HMAC_SECRET) or None

    async def apps(self) -> list[dict[str, Any]]:
        out = []
        async with arm_errors(self.target, f"listing the Container Apps of {self.target.resource_group}"):
            async for app in self.client.container_apps.list_by_resource_group(self.target.resource_group):
                out.append(_plain(app))
        return out

    async def runtimes(self) -> list[RuntimeInfo]:
        """Our runtimes in the resource group, with their running replica counts (apps not
        tagged as ours are left out)."""
        infos = [info for info in map(runtime_info, await self.apps()) if info.ours]
        for info in infos:
            if info.revision:
                async with arm_errors(self.target, f"counting the replicas of {info.app}"):
                    replicas = _plain(
                        await self.client.container_apps_revision_replicas.list_replicas(
                            self.target.resource_group, info.app, info.revision
                        )
                    )
                info.replicas = len(replicas.get("value") or [])
        return infos

    # -- pre-warming -------------------------------------------------------------------

    async def _app_or_raise(self, name: str) -> dict[str, Any]:
        app = await self.get_app(name)
        if app is None:
            raise RuntimeNotFoundError(
                f"Container App {name} does not exist in resource group {self.target.resource_group}: deploy it with "
                "`acx runtime deploy`"
            )
        return app

    async def apply(self, name: str, change: ScaleChange, *, budget: float | None = None) -> int:
        """Send a scale PATCH (a long-running operation); returns the minReplicas in effect after
        it. ``budget``: seconds it may take (default ``azure.operation_timeout``)."""
        t = self.target

        def gone() -> BaseException:
            return RuntimeNotFoundError(f"Container App {name} disappeared from resource group {t.resource_group}")

        log.debug("%s (tag %s=%s)", change.what, TAG_WARM, change.lease.tag if change.lease else "removed")
        app = _plain(
            await self._change(
                change.what,
                lambda: self.client.container_apps.begin_update(t.resource_group, name, change.body),
                budget=budget,
                not_found=gone,
            )
        )
        return _scale(app)[0] if app else change.min_replicas

    async def warm(
        self, name: str, replicas: int, *, lease: float = 3600.0, before_patch: Callable[[WarmLease], None] | None = None
    ) -> tuple[int, WarmLease | None]:
        """Keep at least ``replicas`` replicas of app ``name`` running until :meth:`cool` (or
        for ``lease`` seconds, after which the next executor start restores it); see
        :func:`plan_warm`. Returns (minReplicas now in effect, the lease written or None when
        nothing had to change); ``before_patch`` gets the lease before the PATCH is sent."""
        t = self.target
        check_warm(replicas, t.max_replicas)  # before any API call
        app = await self._app_or_raise(name)
        in_effect, change = plan_warm(app, replicas, lease=lease, min_workers=t.min_replicas, max_workers=t.max_replicas)
        if change is None:
            return in_effect, None
        if change.min_replicas > _scale(app)[0]:
            await self._check_warm_cores(app, change.min_replicas)
        if before_patch is not None and change.lease is not None:
            before_patch(change.lease)
        return await self.apply(name, change), change.lease

    async def _check_warm_cores(self, app: dict[str, Any], replicas: int, *, in_place: bool = False) -> None:
        """Refuse a warm whose replicas cannot fit the environment's free cores. Raising
        minReplicas starts a new revision, whose replicas run beside the old revision's until
        they are ready: the cores in use now (this app's included) stay in use meanwhile.
        ``in_place`` (the demand queue): the app's running replicas are among the ``replicas``,
        so only the ones to add need free cores."""
        m = _ENV_ID_RE.match(str(_get(app, "properties", "environmentId") or ""))
        if m is None:
            return
        cpu = replica_cpu(app, memory_pair(self.cfg.azure_containers.runtime_memory)[0])
        running = await self._running_replicas(app) if in_place else 0
        need = max(0, replicas - running) * cpu
        quota = await self.core_quota(m.group(1), m.group(2))
        if need <= quota.free:
            return
        held = f"{running} of them run already" if in_place else "those running now stay until the new revision's are ready"
        more = "more " if in_place else ""
        raise ConfigError(
            f"cannot pre-warm {replicas} replicas of Container App {app.get('name')}: at {cpu:g} vCPU each they need "
            f"{need:g} {more}cores, and environment {m.group(2)} has {max(0.0, quota.free):g} free of {quota.describe()} "
            f"({held}); warm at most {running + fitting(quota.free, cpu)} replicas, lower runtime_memory, or request a "
            f"quota increase: {QUOTA_HELP}"
        )

    async def _running_replicas(self, app: dict[str, Any]) -> int:
        """The replicas of the app's latest revision (0 if ARM cannot say: the stricter check)."""
        revision = _get(app, "properties", "latestRevisionName")
        if not revision:
            return 0
        try:
            async with arm_errors(self.target, f"counting the replicas of {app.get('name')}"):
                listed = _plain(
                    await self.client.container_apps_revision_replicas.list_replicas(
                        self.target.resource_group, str(app.get("name")), str(revision)
                    )
                )
        except AsyncCAExecError:
            return 0
        return len(listed.get("value") or [])

    async def cool(
        self,
        name: str,
        *,
        leases: Collection[WarmLease] | None = None,
        expired_only: bool = False,
        budget: float | None = None,
    ) -> int | None:
        """Put back the scale recorded by the app's pre-warm lease and remove it (see
        :func:`plan_restore`); returns the minReplicas restored, None if nothing was done.
        ``budget`` as in :meth:`apply`."""
        app = await self.get_app(name)
        if app is None:
            return None
        change = plan_restore(app, leases=leases, expired_only=expired_only, min_workers=self.target.min_replicas)
        if change is None:
            return None
        await self.apply(name, change, budget=budget)
        return change.min_replicas

    # -- deploying ---------------------------------------------------------------------

    async def deploy(
        self,
        runtime: str | None = None,
        *,
        memory: int | None = None,
        timeout: float | None = None,
        create_environment: bool = False,
        check: bool = True,
    ) -> RuntimeInfo:
        """Create the Container App of a runtime (or a new revision of it), then check and
        record its metadata. The default runtime's image is built and pushed first if the
        registry does not have it yet (as Lithops does)."""
        ac = self.cfg.azure_containers
        image, default = self.image_for(runtime)
        mem = ac.runtime_memory if memory is None else memory
        memory_pair(mem)  # ConfigError before any API call
        if default:
            await self.ensure_default_image(image)
        return await self._put(
            app_name(image, mem), image, mem, timeout=timeout, create_environment=create_environment, check=check
        )

    async def ensure_default_image(self, image: str) -> None:
        """Build and push the default runtime image unless the registry has it already."""
        from .images import BuildError, build_image, image_exists, registry_login, split_image

        self._progress(f"checking that {image} is in its registry ...")
        server = split_image(image)[0]
        login = registry_login(self.cfg, server)
        try:
            if await image_exists(image, login=login, ssl=self.target.ssl_context()):
                return
        except BuildError as exc:
            if login is not None or self.target.registry_identity is None:
                raise
            # The app's managed identity pulls on Azure's side; this machine has no login for
            # the registry, so it cannot look. Azure checks the image at PUT and a missing one
            # comes back as a RuntimeNotFoundError with the build command.
            self._progress(
                f"note: cannot look for {image} from this machine ({exc}); the app pulls with its managed identity, so "
                f"Azure checks it at deploy (build it with `acx runtime build {image}` if it is missing)"
            )
            return
        self._progress(f"the default runtime image {image} is not in its registry yet: building it")
        await build_image(self.cfg, image, credential=self._credential, progress=self._progress)

    def _pull_error(self, image: str, message: str, app: str = "<app>") -> BaseException:
        """Container Apps checks at PUT that it can pull the image (400
        InvalidParameterValueInContainerTemplate, with the registry's answer): say which image,
        which registry, and the command that fixes it."""
        from .images import is_acr, split_image

        server = split_image(image)[0]
        pulling = self.target.registry_identity
        refused = "UNAUTHORIZED" in message or "DENIED" in message
        if refused and pulling is not None and pulling[0].lower() == server.lower():
            who = pulling[1]
            acr = server.split(".")[0]
            scope = f"$(az acr show -n {acr} --query id -o tsv)" if is_acr(server) else "<the registry's resource id>"
            if who == "system":
                rg = self.target.resource_group
                principal = f"$(az containerapp show -n {app} -g {rg} --query identity.principalId -o tsv)"
                return RuntimeNotFoundError(
                    f"Azure cannot pull runtime image {image}: registry {server} refused the app's system-assigned identity "
                    "(UNAUTHORIZED). Container Apps creates that identity with the app, so it has no AcrPull role when the "
                    "app is first deployed (https://learn.microsoft.com/azure/container-apps/containers"
                    "#managed-identity-with-azure-container-registry). Either set azure_containers.registry_identity to a "
                    "user-assigned identity that has AcrPull on the registry, or grant the app's identity AcrPull: "
                    f"`az role assignment create --assignee {principal} --role AcrPull --scope {scope}`, then run "
                    f"`acx runtime update {image}`"
                )
            principal = f"$(az identity show --ids {who} --query principalId -o tsv)"
            return RuntimeNotFoundError(
                f"Azure cannot pull runtime image {image}: registry {server} refused the app's managed identity {who} "
                f"(UNAUTHORIZED); it needs the AcrPull role on the registry: `az role assignment create --assignee "
                f"{principal} --role AcrPull --scope {scope}` (role assignments can take minutes to apply), then run "
                f"`acx runtime deploy {image}` again"
            )
        if refused:
            return RuntimeNotFoundError(
                f"Azure cannot pull runtime image {image}: registry {server} refused the app's credentials (UNAUTHORIZED); "
                f"set azure_containers.docker_user and docker_password for {server} (for Azure Container Registry, an "
                f"admin user or a token: `az acr credential show -n {server.split('.')[0]}`), check them with "
                f"`docker login {server}`, then run `acx runtime deploy {image}` again"
            )
        if "MANIFEST_UNKNOWN" in message or "NAME_UNKNOWN" in message or "not found" in message:
            return RuntimeNotFoundError(
                f"Azure cannot pull runtime image {image}: registry {server} has no such image (MANIFEST_UNKNOWN); build "
                f"and push it with `acx runtime build {image}`, then run `acx runtime deploy {image}` again"
            )
        return DeploymentError(f"Azure refused runtime image {image}: {message}")

    async def _image_missing(self, image: str) -> bool:
        """Whether the registry says it lacks ``image`` (False when it cannot tell: a registry the
        app reaches with a managed identity, which this machine does not have, may not let it look)."""
        from .images import BuildError, image_exists, registry_login, split_image

        try:
            login = registry_login(self.cfg, split_image(image)[0])
            return not await image_exists(image, login=login, ssl=self.target.ssl_context(), timeout=20)
        except (BuildError, ConfigError):
            return False

    async def _put(
        self,
        name: str,
        image: str,
        memory: int,
        *,
        timeout: float | None = None,
        create_environment: bool = False,
        check: bool = True,
    ) -> RuntimeInfo:
        ac = self.cfg.azure_containers
        runtime_timeout = ac.runtime_timeout if timeout is None else timeout
        if runtime_timeout <= 0:
            raise ConfigError(f"timeout={runtime_timeout!r} must be a positive number of seconds")
        limit = self.cfg.call_limit
        if limit is not None and not self.cfg.storage_configured and runtime_timeout > limit:
            self._progress(
                f"note: without Blob storage a call on Azure can run at most {limit:g} s (the ingress cuts requests "
                f"at {limit + 10:g} s); runtime_timeout {runtime_timeout:g} s is lowered to {limit:g} s; configure "
                "azure_storage for longer calls"
            )
            runtime_timeout = limit
        env = await self.environment(create=create_environment)
        profile = "Consumption" if "Consumption" in env.profiles else (env.profiles[0] if env.profiles else None)
        if profile is None and memory > CONSUMPTION_ONLY_MAX_MEMORY:
            raise ConfigError(
                f"runtime_memory={memory} needs more than the 2 vCPU / 4 GiB a Consumption-only environment allows: "
                "use a workload-profiles environment (acx runtime deploy --create-environment with a new "
                f"azure_containers.environment creates one) or runtime_memory <= {CONSUMPTION_ONLY_MAX_MEMORY}"
            )
        existing = await self.get_app(name)
        await self._check_cores(env, memory, update=existing is not None)
        old = await self.secrets(name) if existing else {}
        key = old.get(HMAC_SECRET) or secrets.token_urlsafe(32)  # generated once, kept across updates
        registry, identity = self.target.registry, self.target.registry_identity
        if registry is None and identity is None and existing:
            # No registry login in this machine's config: keep the one the app already has.
            for reg in _get(existing, "properties", "configuration", "registries") or []:
                ref = reg.get("passwordSecretRef")
                if reg.get("identity"):
                    identity = (str(reg.get("server")), str(reg["identity"]))
                    break
                if ref and old.get(ref):
                    registry = (str(reg.get("server")), str(reg.get("username")), old[ref])
                    break
        acct, why_not = dq.queue_account(self.cfg)
        demand = None
        if acct is not None:
            queue = dq.queue_name(name)
            try:
                await dq.ensure_queue(acct, queue)
            except ConfigError as exc:  # (a deploy on first use must not fail for it: the HTTP rule still scales)
                acct, why_not = None, str(exc)
            else:
                demand = (dq.scale_rule(acct, queue), *dq.read_only_connection(acct, queue))
        if acct is None:
            self._progress(
                f"warning: no demand queue ({why_not}): Container Apps then scales {name} on arriving requests only "
                f"(15 s windows), and may scale in replicas still running calls longer than about "
                f"{15 + ac.scale_cooldown} s (they get SIGTERM and {min(MAX_GRACE, max(30, runtime_timeout + 10)):.0f} s "
                "to finish); configure azure_storage with a connection string or account key for long calls"
            )
        body = app_body(
            image=image,
            memory=memory,
            runtime_timeout=runtime_timeout,
            location=env.location,  # an app lives in its environment's region
            environment_id=env.id,
            hmac_key=key,
            min_replicas=self.target.min_replicas,
            max_replicas=self.target.max_replicas,
            workers=worker_processes(memory, ac.worker_processes),
            registry=registry,
            registry_identity=identity,
            workload_profile=profile,
            deployed_at=f"{time.time():.0f}",
            polling_interval=ac.scale_polling_interval,
            cooldown=ac.scale_cooldown,
            demand=demand,
        )
        verb = "updating" if existing else "creating"
        held = warm_lease(existing) if existing else None
        if held is not None:
            # The new body has the configured scale and no lease tag: the pre-warm ends here.
            self._progress(
                f"note: {name} was pre-warmed (minReplicas raised until {_when(held.until)}); the update sets it back to "
                f"min_workers={self.target.min_replicas}"
            )
        self._progress(f"{verb} Container App {name} for runtime {image} ({memory} MB) ...")
        app = _plain(
            await self._change(
                f"{verb} Container App {name}",
                lambda: self.client.container_apps.begin_create_or_update(self.target.resource_group, name, body),
                bad_image=lambda m: self._pull_error(image, m, name),
            )
        )
        info = runtime_info(app)
        if not info.fqdn:
            raise DeploymentError(f"Container App {name} has no ingress address; check it in the portal")
        self._progress(f"{name} is {str(info.state or 'deployed').lower()} at https://{info.fqdn}")
        if check:
            self._progress(
                f"waiting for the first replica of {name} to answer (up to {self.target.startup_timeout:g} s, "
                "startup_timeout) ..."
            )
            info = await self._wait_revision(info)
            await self.record(info, key.encode(), image, memory)
        return info

    async def _wait_revision(self, info: RuntimeInfo) -> RuntimeInfo:
        """Until the latest revision is the ready one: before that, the old one still answers."""
        deadline = time.monotonic() + self.target.startup_timeout
        while info.revision and info.ready_revision != info.revision:
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"revision {info.revision} of {info.app} did not become ready within "
                    f"{self.target.startup_timeout:g} s (startup_timeout); see its logs (az containerapp logs show "
                    f"-n {info.app} -g {self.target.resource_group})"
                )
            await asyncio.sleep(max(1.0, self.target.polling_interval))
            app = await self.get_app(info.app)
            if app is None:
                raise DeploymentError(f"Container App {info.app} disappeared while it was being deployed")
            info = runtime_info(app)
        return info

    async def record(self, info: RuntimeInfo, key: bytes, image: str, memory: int) -> dict[str, Any]:
        """Ask the running app for its metadata, check it, and keep it in the local cache."""
        assert info.fqdn is not None
        t = self.target
        where = f"runtime {image} (Container App {info.app})"
        what_to_add = (
            f"an image for async_ca_exec must install async_ca_exec=={__version__} and start `python3 -m acx_server` "
            f"on port {SERVER_PORT}: build it with `acx runtime build {image}` (or FROM "
            f"{default_image(self.cfg.azure_containers.docker_server)} in your Dockerfile); the app's own log says more "
            f"(az containerapp logs show -n {info.app} -g {t.resource_group})"
        )
        try:
            meta = await fetch_meta(f"https://{info.fqdn}", key, ssl=t.ssl_context(), startup_timeout=t.startup_timeout)
        except RuntimeStartError as exc:
            if await self._image_missing(image):
                raise DeploymentError(
                    f"{where} cannot start: its image is not in the registry; build and push it with "
                    f"`acx runtime build {image}`, then deploy it again (`acx runtime deploy {image}`)"
                ) from None
            raise DeploymentError(f"{where} is not answering as an async_ca_exec runtime ({exc}); {what_to_add}") from None
        if meta.get("protocol") is None:
            raise DeploymentError(f"{where} answers, but not as an async_ca_exec runtime; {what_to_add}")
        check_compatible(meta, where=where)
        path = record_meta(t, info.app, image, memory, info.fqdn, meta)
        self._progress(f"recorded runtime metadata in {path}")
        if self._storage is not None:
            blob_name = runtime_blob(info.app)
            await self._storage.put(blob_name, path.read_bytes())
            self._progress(f"recorded runtime metadata in blob {self._storage.container}/{blob_name}")
        return meta

    async def _select(self, which: str) -> list[dict[str, Any]]:
        apps = [a for a in await self.apps() if runtime_info(a).ours]
        if which == "all":
            return apps
        image, _default = self.image_for(which)
        chosen = [a for a in apps if runtime_info(a).runtime == image]
        if not chosen:
            raise RuntimeNotFoundError(
                f"no runtime {image} is deployed in resource group {self.target.resource_group}: "
                f"deploy it with `acx runtime deploy {which}`"
            )
        return chosen

    async def update(self, which: str) -> list[RuntimeInfo]:
        """A new revision of each runtime with this version's settings; ``all`` updates every one.

        An app deployed by another version of this package is named for that version: it is
        replaced by one named for this version (which executors of this version look for).
        """
        out = []
        for app in await self._select(which):
            info = runtime_info(app)
            memory = info.memory or self.cfg.azure_containers.runtime_memory
            name = app_name(info.runtime, memory)
            out.append(await self._put(name, info.runtime, memory))
            if name != info.app:
                await self._delete(info.app)
                self._progress(f"replaced {info.app} (version {info.version}) by {name}")
        return out

    async def _delete(self, name: str) -> None:
        self._progress(f"deleting Container App {name} ...")
        await self._change(
            f"deleting Container App {name}", lambda: self.client.container_apps.begin_delete(self.target.resource_group, name)
        )
        forget_meta(self.target, name)
        if self._storage is not None:
            await self._storage.delete(runtime_blob(name))

    async def delete(self, which: str) -> list[str]:
        """Delete runtimes and forget their metadata; ``all`` deletes every one of ours."""
        names = []
        for app in await self._select(which):
            await self._delete(str(app["name"]))
            names.append(str(app["name"]))
        return names

    async def clean(self) -> list[str]:
        """Every runtime of ours, every cached metadata file for this resource group and, with
        Blob storage, everything the package keeps there (temporary job data, functions, metadata)."""
        deleted = await self.delete("all")
        prefix = f"{self.target.subscription_id}_{self.target.resource_group}_".lower()
        for path in cache_dir().glob(f"{prefix}*.json"):
            path.unlink(missing_ok=True)
        if self._storage is not None:
            blobs = await self._storage.delete_prefix(f"{PREFIX}/")
            self._progress(f"deleted {blobs} blob(s) under {self._storage.container}/{PREFIX}/")
        return deleted


class _NotFound(AsyncCAExecError):
    pass


# ------------------------------------------------------------------------------------
# the executor's backend


class AzureRuntime:
    """Finds (or, for the default runtime, deploys) the app, then reaches it over HTTPS."""

    name = "azure"

    def __init__(self, config: Config, *, credential: Any = None, log_level: str | None = None) -> None:
        self.config = config
        self.credential = credential
        self.target = AzureTarget.from_config(config)
        self.info: RuntimeInfo | None = None
        ac = config.azure_containers
        #: Requests one replica takes before Container Apps adds one (the HTTP scale rule).
        self.per_replica = worker_processes(ac.runtime_memory, ac.worker_processes)
        #: The leases this runtime's warm() wrote (or was writing when it failed or was
        #: cancelled): cool() restores the app if its tag holds one of them.
        self.leases: list[WarmLease] = []
        #: One scale change at a time from this client (ARM refuses a second one under way, 409).
        self._scale_lock = asyncio.Lock()
        #: The demand queue (see .demand): the replicas this client's calls need, and warm()'s
        #: floor (replicas, until), said to Container Apps without changing the template.
        self._queue_account = dq.queue_account(config)[0]
        self._demand_of: Callable[[], int] = lambda: 0
        self._floor: tuple[int, float] = (0, 0.0)
        self.demand: dq.DemandQueue | None = None
        #: Whether the app has the demand-queue rule (None: start() has not looked yet).
        self._has_rule: bool | None = None

    def track_demand(self, demand: Callable[[], int]) -> None:
        self._demand_of = demand

    def _wanted(self) -> int:
        """Replicas to ask for now: the calls' and warm()'s, whichever is more."""
        need = dq.replicas_needed(self._demand_of(), self.per_replica, self.target.max_replicas)
        floor, until = self._floor
        return max(need, floor) if floor and time.monotonic() < until else need

    def _start_demand(self, app: dict[str, Any] | None) -> None:
        """Keep the app's demand queue from now on, if the app has the rule (apps deployed with
        demand_queue off, or by an older version, have not: they scale on arrivals only)."""
        acct = self._queue_account
        if self.demand is not None:
            return
        name = self.app_name()
        if app is None:  # deployed just now, by this config: the rule is there if the config has an account
            self._has_rule = acct is not None
        else:
            rules = _get(app, "properties", "template", "scale", "rules") or []
            self._has_rule = any(r.get("name") == dq.DEMAND_RULE for r in rules)
        if acct is None:
            if self._has_rule and self.config.azure_containers.demand_queue:
                log.warning(
                    "Container App %s scales on a demand queue this client cannot write (%s): its replicas follow "
                    "arriving requests only, and long calls may lose theirs; configure azure_storage with the "
                    "account key it was deployed with", name, dq.queue_account(self.config)[1],
                )  # fmt: skip
            return
        if not self._has_rule:
            log.warning(
                "Container App %s has no demand-queue scale rule: Container Apps scales it on arriving requests only, "
                "and may scale in replicas still running long calls; run `acx runtime update` to add it", name,
            )  # fmt: skip
            return
        expiry = ((app or {}).get("tags") or {}).get(TAG_DEMAND_SAS, "")
        warning = dq.sas_warning(name, int(expiry)) if expiry.isdigit() else None
        if warning:
            log.warning("%s", warning)
        client = dq.queue_client(acct, dq.queue_name(name))
        self.demand = dq.DemandQueue(client, self._wanted, ttl=self.config.azure_containers.demand_ttl, name=name)
        self.demand.start()

    def app_name(self) -> str:
        """The app this runtime uses: known from the config before start() has found it."""
        if self.info is not None:
            return self.info.app
        ac = self.config.azure_containers
        name, default = ac.runtime, default_image(ac.docker_server)
        image = default if not name or name in ("default", default) else check_image(name)
        return app_name(image, ac.runtime_memory)

    async def start(self) -> Endpoint:
        cfg = self.config
        mem = cfg.azure_containers.runtime_memory
        async with AzureApps(cfg, credential=self.credential) as apps:
            image, is_default = apps.image_for(None)
            name = app_name(image, mem)
            app = await apps.get_app(name)
            if app is None:
                if not is_default:
                    raise RuntimeNotFoundError(
                        f"runtime {image} with {mem} MB is not deployed in resource group "
                        f"{self.target.resource_group}: run `acx runtime deploy {image} --memory {mem}`"
                    )
                log.warning("the default runtime is not deployed yet: deploying %s (%d MB)", image, mem)
                info = await apps.deploy(image, memory=mem, check=False)
                self._start_demand(None)
            else:
                info = runtime_info(app)
                self._start_demand(app)
                self.per_replica = concurrent_requests(app) or self.per_replica
                await self._restore_ended_lease(apps, app)
            if not info.fqdn:
                raise DeploymentError(f"Container App {name} has no ingress address; redeploy it (acx runtime update)")
            key = await apps.hmac_key(name)
            if key is None:
                raise DeploymentError(
                    f"Container App {name} has no {HMAC_SECRET} secret: it was not deployed by async_ca_exec; "
                    "redeploy it with `acx runtime update`"
                )
            meta = cached_meta(self.target, name, info.fqdn)
            if meta is None:
                meta = await apps.record(info, key.encode(), image, mem)
            else:
                check_compatible(meta, where=f"runtime {image} (Container App {name})")
                # Wake an app scaled to zero now, so the calls do not each meet the cold start.
                await wait_ready(
                    f"https://{info.fqdn}", ssl=self.target.ssl_context(), startup_timeout=self.target.startup_timeout
                )
        self.info = info
        return Endpoint(
            url=f"https://{info.fqdn}",
            key=key.encode(),
            heartbeat=float(meta.get("heartbeat") or 5.0),
            max_body=int(meta.get("max_body_bytes") or 0) or Endpoint.max_body,
            ssl=self.target.ssl_context(),
            meta=meta,
            startup_timeout=self.target.startup_timeout,
        )

    async def _restore_ended_lease(self, apps: AzureApps, app: dict[str, Any]) -> None:
        """A pre-warm whose client never restored it (it died, or lost the network) costs money
        until someone does: the first executor to start after the lease's end does."""
        held = warm_lease(app, fallback_min=self.target.min_replicas)
        name = str(app.get("name"))
        if held is None or held.until > time.time():
            return
        try:
            async with self._scale_lock:
                restored = await apps.cool(name, expired_only=True)
        except AsyncCAExecError as exc:
            log.warning(
                "Container App %s is still pre-warmed from a lease that ended %s, and restoring it failed (%s); "
                "restore it with: %s",
                name, _when(held.until), exc, restore_command(name, self.target.resource_group, held),
            )  # fmt: skip
            return
        if restored is not None:
            log.warning(
                "Container App %s was left pre-warmed by a client that did not restore it (lease ended %s): "
                "minReplicas is back to %d",
                name, _when(held.until), restored,
            )  # fmt: skip

    def replicas_for(self, requests: int) -> int:
        """Replicas that take ``requests`` concurrent requests (at most max_workers)."""
        return min(self.target.max_replicas, -(-max(0, requests) // max(1, self.per_replica)))

    async def warm(self, replicas: int, *, lease: float) -> int:
        """Raise the app's minReplicas to ``replicas`` (see :meth:`AzureApps.warm`) under a
        lease this runtime restores at :meth:`cool`; returns the minReplicas in effect. Works
        while start() still waits for the first replica: then the others start meanwhile."""
        check_warm(replicas, self.target.max_replicas)
        if self._queue_account is not None and self.config.azure_containers.demand_queue and self._has_rule is not False:
            # Through the demand queue: no template change, so no new revision (a scale change
            # would start one and restart every replica mid-job). A floor in effect is never
            # lowered by a smaller warm (a prewarm map's, say), nor its lease shortened.
            now = time.monotonic()
            floor, until = self._floor if self._floor[1] > now else (0, 0.0)
            if replicas > floor:
                async with AzureApps(self.config, credential=self.credential) as apps:
                    app = await apps.get_app(self.app_name())
                    if app is not None:  # (the default runtime still being deployed: checked at deploy)
                        await apps._check_warm_cores(app, replicas, in_place=True)
            self._floor = (max(replicas, floor), max(until, now + lease))
            if self.demand is not None:
                await self._sync_demand()
            return max(replicas, floor, self.target.min_replicas)

        def note(lease: WarmLease) -> None:
            # Before the PATCH is sent: one that lands although this task was cancelled is restored too.
            self.leases.append(lease)

        async with self._scale_lock, AzureApps(self.config, credential=self.credential) as apps:
            in_effect, _lease = await apps.warm(self.app_name(), replicas, lease=lease, before_patch=note)
        return in_effect

    async def cool(self) -> None:
        """Put back the scale from before the first :meth:`warm`, once; never raises (but for
        cancellation): a failure is logged with the command that fixes it, and the lease in the
        app's tag lets the next executor start after its end restore it."""
        if self._floor[0]:
            self._floor = (0, 0.0)
            if self.demand is not None:
                await self._sync_demand()
        async with self._scale_lock:
            leases, self.leases = self.leases, []
            if leases:
                await self._cool(leases)

    async def _cool(self, leases: list[WarmLease]) -> None:
        name = self.app_name()
        lease = leases[-1]
        try:
            async with AzureApps(self.config, credential=self.credential) as apps:
                # Closing waits out another client's change for a minute, not for operation_timeout:
                # the lease in the tag lets a later start restore it.
                restored = await apps.cool(name, leases=leases, budget=RESTORE_WAIT)
        except Exception as exc:  # noqa: BLE001 - logged with the fix; closing must not lose results
            log.warning(
                "could not restore minReplicas=%d of Container App %s after pre-warming (%s); it keeps its warm replicas "
                "(and their cost) until an executor starting after %s restores it, or run: %s",
                lease.restore_min, name, exc, _when(lease.until), restore_command(name, self.target.resource_group, lease),
            )  # fmt: skip
            return
        if restored is None:
            log.debug("Container App %s: its pre-warm lease was restored or taken over by another client", name)
        else:
            log.info("Container App %s: minReplicas restored to %d", name, restored)

    async def _sync_demand(self) -> None:
        """Say the new count now; a storage error is the demand loop's to report (once) and retry."""
        assert self.demand is not None
        try:
            await self.demand.sync()
        except Exception:  # noqa: BLE001 - the loop warns and retries
            self.demand.poke()

    async def aclose(self) -> None:
        """Stop asking for replicas and restore what warm() raised; nothing else runs locally
        for this backend (the app scales itself down once the demand queue is empty)."""
        demand, self.demand = self.demand, None
        self._floor = (0, 0.0)
        try:
            if demand is not None:
                await demand.aclose()
        finally:
            await self.cool()
