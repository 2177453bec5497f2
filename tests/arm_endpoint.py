"""A small Azure Resource Manager for tests (a test double; it lives only in tests/).

HTTPS on 127.0.0.1 with a throwaway CA (trustme), the handful of Container Apps operations the
SDK uses, and ARM's long-running-operation protocol: PUT answers 201 with an
``Azure-AsyncOperation`` URL polled until ``{"status": "Succeeded"}``, DELETE answers 202 with a
``Location`` polled until 200, PATCH answers 202 with both (the SDK polls the first, then GETs
the app). Creating an app starts a local replica of the real container
server, configured from the app's template exactly as Container Apps would (environment
variables, secrets by reference), behind an HTTPS "ingress" proxy whose address is returned as
the app's FQDN; the proxy can answer 503 for the first seconds, like a cold start from zero.

Everything runs in one background thread with its own event loop, so a test can drive it from
synchronous code and from subprocesses (the ``acx`` command) alike. ``stop()`` stops every
process it started.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import trustme
from aiohttp import web
from scaling import HTTP_WINDOW, ScaleModel, ScaleSettings, queue_rule

TOKEN = "test-token"
_QUIET = logging.getLogger("arm_endpoint.platform")
_QUIET.setLevel(logging.WARNING)
APPS = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.App/containerApps"
ENVS = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.App/managedEnvironments"


@dataclass
class Replica:
    name: str  # the app's
    proc: subprocess.Popen[bytes]
    port: int  # the app's ingress (HTTPS) port: its FQDN
    upstream: int  # the replica server's own (HTTP) port
    created: float
    log: Path
    health: int = 0  # the replica server's probe port (0: none)
    id: str = ""  # ACX_REPLICA_ID
    revision: str = ""
    inflight: int = 0  # requests the ingress has open to it
    draining: bool = False  # sent SIGTERM (scale-in, a revision swap): no new requests
    prober: asyncio.Task[None] | None = None


@dataclass
class Fleet:
    """An app's replicas behind its one ingress, and the scaler that decides how many run."""

    rg: str
    name: str
    port: int  # the ingress port
    revision: str  # the active revision: the ingress sends requests to its replicas only
    model: ScaleModel
    replicas: list[Replica] = field(default_factory=list)
    starting: int = 0  # replicas being started (counted as running by the scaler)
    swapping: bool = False  # a new revision's replicas are starting: the old revision's stay as they are
    serial: int = 0
    turn: int = 0  # round robin (Envoy's default policy; the ingress's own is not documented)
    scaler: asyncio.Task[None] | None = None
    growing: set[asyncio.Task[Replica]] = field(default_factory=set)  # replicas the scaler is starting
    queue: Any = None  # (connection string, queue name, client) the azure-queue rule reads

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if not r.draining]


#: What Container Apps adds for each probe type an app with ingress leaves out: TCP on the
#: ingress target port ("If ingress is enabled, the following default probes are automatically
#: added to the main app container if none is defined for each type",
#: https://learn.microsoft.com/azure/container-apps/health-probes#default-configuration; the
#: page gives startup 1 s period / 240 failures, readiness 5 s / 48; for liveness it gives no
#: timings, so Kubernetes' defaults: 10 s period, 1 s timeout, 3 failures,
#: https://kubernetes.io/docs/concepts/configuration/liveness-readiness-startup-probes/). The page
#: once said the defaults are not applied on Consumption in workload-profile environments; not
#: knowing which holds today, the twin adds them everywhere (the harder case for the SDK).
DEFAULT_PROBES = {
    "Startup": {"tcpSocket": {}, "initialDelaySeconds": 1, "periodSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 240},
    "Liveness": {"tcpSocket": {}, "periodSeconds": 10, "timeoutSeconds": 1, "failureThreshold": 3},
    "Readiness": {"tcpSocket": {}, "initialDelaySeconds": 3, "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 48},
}
#: The REST spec's limits of a probe (ContainerAppProbe, api-version 2025-01-01).
PROBE_LIMITS = {"failureThreshold": (1, 10), "periodSeconds": (1, 240), "initialDelaySeconds": (0, 60),
                "timeoutSeconds": (1, 240), "successThreshold": (1, 10)}  # fmt: skip


def effective_probes(container: dict[str, Any], target_port: int) -> dict[str, dict[str, Any]]:
    """The probes a container runs with: its own, and the defaults for the types it lacks."""
    probes = {p["type"]: copy.deepcopy(p) for p in container.get("probes") or []}
    for kind, default in DEFAULT_PROBES.items():
        if kind not in probes:
            probe = copy.deepcopy(default)
            probe["tcpSocket"]["port"] = target_port
            probes[kind] = probe
    return probes


@dataclass
class Recorded:
    method: str
    path: str
    body: Any
    status: int = 0
    at: float = field(default_factory=time.monotonic)  # arrival, comparable with IngressHit.at


@dataclass
class IngressHit:
    app: str
    path: str
    call_id: str | None
    status: int
    at: float


@dataclass
class Operation:
    """A long-running ARM operation: its status reads answer InProgress ``polls`` times at
    least and until ``until``; while it runs, other writes to the same resource get a 409."""

    resource: tuple[str, str, str]  # (kind, resource group, name)
    polls: int
    until: float
    patch: bool = False  # a PATCH: held InProgress while hold_patches is set
    app: tuple[str, str] | None = None  # what its Location answers once done (a PATCH's: the app)
    error: tuple[str, str] | None = None  # (code, message): it ends Failed with this error


@dataclass
class ArmState:
    subscription: str
    resource_groups: set[str]
    environments: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    apps: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    secrets: dict[tuple[str, str], list[dict[str, str]]] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ArmEndpoint:
    def __init__(
        self,
        workdir: Path,
        *,
        subscription: str = "00000000-0000-0000-0000-000000000001",
        resource_groups: tuple[str, ...] = ("rg-acx", "rg-forbidden"),
        environments: dict[str, str] | None = None,
        consumption_only: tuple[str, ...] = (),
        cold_start: float = 0.0,
        retry_after: int = 1,
        ingress_timeout: float | None = None,
    ) -> None:
        self.workdir = workdir
        self.state = ArmState(subscription, set(resource_groups))
        for name, location in (environments if environments is not None else {"acx": "westeurope"}).items():
            self._add_environment(resource_groups[0], name, location, profiles=name not in consumption_only)
        self.cold_start = cold_start
        self.retry_after = retry_after
        #: Like Container Apps' ingress (240 s there): cut any request still open after this long.
        self.ingress_timeout = ingress_timeout
        self.cuts = 0
        #: The Blob storage (an Azurite server and a container) the tests' clients pair with it.
        self.storage: tuple[Any, str] | None = None
        #: A container registry on the same address (Docker Registry API v2: HEAD manifests).
        self.images: set[str] = {f"acx-default-py{sys.version_info.major}{sys.version_info.minor}:{_version()}"}
        #: Images that do not run the async_ca_exec server: their replica answers 404 to everything.
        self.serverless_images: set[str] = set()
        #: Images pushed by the tests' recording engine (tests/fakes/docker, FAKE_REGISTRY_PUSHES).
        self.pushes = workdir / "registry-pushes"
        #: How the registry wants to be asked: None (anonymous), "basic" or "bearer" (a token
        #: service at /oauth2/token that takes Basic credentials, as ACR and Docker Hub do).
        self.registry_auth: str | None = None
        self.registry_login: tuple[str, str] = ("", "")
        self.registry_tokens: list[str] = []
        #: Who holds the AcrPull role on this registry: user-assigned identities' resource ids
        #: and system-assigned identities' principal ids (the app's ``identity.principalId``).
        self.acr_pull_identities: set[str] = set()
        #: Each environment's core quota: "Calculated by the sum of cores requested by each
        #: active replica of all revisions in an environment", 100 by default (10 on trial
        #: subscriptions), https://learn.microsoft.com/azure/container-apps/quotas (the table is
        #: quoted from the docs.azure.cn/en-us copy and the ja-jp and zh-tw Learn pages). It is
        #: served as ARM's environment usages (ManagedEnvironmentUsages_List); ``serve_usages``
        #: False answers 404 there, as an ARM endpoint without that API would.
        self.core_quota = 100.0
        self.serve_usages = True
        #: Azure Container Registries (login server -> name) and the ACR Tasks runs scheduled:
        #: each run writes its log in parts over ``acr_polls`` status reads, then ends
        #: Succeeded (or Failed with ``acr_fail`` as its error message) and marks the log complete.
        self.registries: dict[str, str] = {}
        self.acr_runs: dict[str, dict[str, Any]] = {}
        self.acr_polls = 3
        self.acr_fail: str | None = None
        self.acr_upload_broken = False
        self.requests: list[Recorded] = []
        self.ingress_hits: list[IngressHit] = []
        #: Each app's replicas and scaler (tests/scaling.py decides how many run). The HTTP
        #: rule's window is 15 s on Azure; a test may shorten it (``http_window``), and sets
        #: pollingInterval / cooldownPeriod through the app's own template, as a user would.
        self.fleets: dict[str, Fleet] = {}
        self.http_window = HTTP_WINDOW
        self.scale_tick = 0.05
        #: Every app's revisions, oldest first (each template change creates one).
        self.revisions: dict[str, list[str]] = {}
        #: (app, replica count) whenever the scaler changed it; (time, replica id, requests in flight)
        #: for each replica sent SIGTERM by a scale-in or a revision swap; failed queue reads.
        self.scale_log: list[tuple[float, str, int]] = []
        self.scale_ins: list[tuple[float, str, int]] = []
        self.queue_errors: list[str] = []
        #: Expired messages still count: Get Queue Metadata's count "is not lower than the actual
        #: number of messages in the queue, but could be higher"
        #: (https://learn.microsoft.com/rest/api/storageservices/get-queue-metadata), and Azurite
        #: counts them until a read touches the queue. How soon Azure collects them is not
        #: documented: the twin lets storage collect them every ``queue_gc`` seconds.
        self.queue_gc = 60.0
        self._queue_gc_at: dict[str, float] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        #: Liveness probes run as the app defines them (or the defaults); a replica failing
        #: one failureThreshold times in a row is restarted, as the kubelet restarts a container
        #: (an ACA page says only that failures "cause different results for each probe type").
        #: ``probe_time_scale`` shortens every probe's period and timeout for tests.
        self.probe_time_scale = 1.0
        self.restarts: dict[str, int] = {}
        self.probe_failures: list[tuple[str, str]] = []  # (app, what failed)
        self._replica_locks: dict[str, asyncio.Lock] = {}
        #: Extra environment for the replicas (a test's tarpit settings, say).
        self.replica_env: dict[str, str] = {}
        self.fail_next: dict[str, tuple[int, str]] = {}  # "PUT app" -> (status, code)
        #: Long-running operations. Container Apps' creates and updates take several polls
        #: (minutes, for a new revision), so each one here answers InProgress to at least
        #: ``op_polls`` status reads and for ``op_seconds``; a write to an app (or environment)
        #: while one of its operations runs is refused, 409 ContainerAppOperationInProgress
        #: (ManagedEnvironmentOperationInProgress), as ARM refuses a second modification of a
        #: resource under way ("Cannot modify container App ... because another modification is
        #: in progress. Please retry the operation.", microsoft/azure-container-apps#175; the
        #: codes are not documented on any Microsoft page).
        self._ops: dict[str, Operation] = {}
        self.op_polls = 2
        self.op_seconds = 0.1
        self.conflicts = 0
        #: While set, PATCH operations stay InProgress (polled every 50 ms), as a slow revision
        #: would keep them: a test shows what does not wait for them.
        self.hold_patches = False
        self._lock = threading.Lock()
        self.ca = trustme.CA()
        self.ca_pem = workdir / "arm-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self._ssl)
        #: The apps' ingress certificate (issued by the same CA unless a test swaps it).
        self.ingress_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.ingress_ssl)
        self.port = _free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        #: The registry's host, as an image name starts with it.
        self.registry = f"127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="arm-endpoint", daemon=True)
        self._runners: dict[str, web.AppRunner] = {}
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> ArmEndpoint:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        try:
            self._call(self._stop(), timeout=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def _call(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=self._ssl).start()
        self._runners["arm"] = runner
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    async def _stop(self) -> None:
        draining = [r for fleet in self.fleets.values() for r in fleet.replicas if r.draining]
        for name in list(self.fleets):
            await self._stop_fleet(name, hurry=draining)
        for runner in self._runners.values():
            await runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # -- test helpers ----------------------------------------------------------------------

    def add_foreign_app(self, rg: str, name: str) -> None:
        """An app that is not ours (no tags): list must leave it out, delete all must spare it."""
        self.state.apps[(rg, name)] = {
            "id": self._app_id(rg, name),
            "name": name,
            "type": "Microsoft.App/containerApps",
            "location": "westeurope",
            "tags": {"team": "web"},
            "properties": {"provisioningState": "Succeeded", "configuration": {"ingress": {"fqdn": "web.example"}}},
        }

    def bodies(self, method: str, kind: str = "containerApps") -> list[Any]:
        return [r.body for r in self.requests if r.method == method and f"/{kind}/" in r.path and r.body is not None]

    @property
    def replicas(self) -> dict[str, Replica]:
        """Each app's first running replica (apps scaled to zero have none)."""
        return {name: live[0] for name, fleet in self.fleets.items() if (live := fleet.live())}

    def replica_count(self, name: str) -> int:
        fleet = self.fleets.get(name)
        return len(fleet.live()) if fleet else 0

    def scale_in(self, name: str, replica_id: str) -> None:
        """Scale in one replica of app ``name`` now, as the scaler does: SIGTERM, then SIGKILL
        when the app's terminationGracePeriodSeconds ends."""

        async def retire() -> None:
            fleet = self.fleets[name]
            replica = next(r for r in fleet.replicas if r.id == replica_id)
            self._retire(fleet, replica, self._grace(self.state.apps[(fleet.rg, name)]))

        self._call(retire())

    def crash_and_restart(self, name: str) -> None:
        """SIGKILL an app's (first) replica and start a fresh one behind the same ingress, as
        Container Apps restarts a crashed container."""
        self._call(self._respawn(self.replicas[name], kill=True))

    async def _respawn(self, replica: Replica, *, kill: bool) -> None:
        """End a replica's process (SIGKILL, or SIGTERM with up to 15 s to drain) and start a
        fresh one in its place, from the app's template, behind the same ingress."""
        async with self._replica_lock(replica.id):
            if replica.draining:
                return
            await _end(replica.proc, kill=kill)
            fleet = self.fleets[replica.name]
            body = self._secret_body(fleet.rg, replica.name)
            replica.proc, replica.upstream, replica.log, replica.health = await self._spawn(replica.id, body)
            replica.created = time.monotonic()

    def _replica_lock(self, key: str) -> asyncio.Lock:
        """One replacement of a replica's process at a time (a liveness restart, a crash a
        test makes), so none leaves a process behind."""
        return self._replica_locks.setdefault(key, asyncio.Lock())

    def _secret_body(self, rg: str, name: str, app: dict[str, Any] | None = None) -> dict[str, Any]:
        """The app as its replicas see it: secrets with their values."""
        body = copy.deepcopy(app if app is not None else self.state.apps[(rg, name)])
        values = {s["name"]: s.get("value", "") for s in self.state.secrets.get((rg, name), [])}
        for s in body["properties"]["configuration"].get("secrets") or []:
            s["value"] = values.get(s["name"], "")
        return body

    def replica_pids(self) -> set[int]:
        return {r.proc.pid for fleet in self.fleets.values() for r in fleet.replicas}

    def _add_environment(self, rg: str, name: str, location: str, *, profiles: bool = True) -> None:
        props: dict[str, Any] = {"provisioningState": "Succeeded", "defaultDomain": "acx.test"}
        if profiles:
            props["workloadProfiles"] = [{"name": "Consumption", "workloadProfileType": "Consumption"}]
        self.state.environments[(rg, name)] = {
            "id": ENVS.format(sub=self.state.subscription, rg=rg) + f"/{name}",
            "name": name,
            "type": "Microsoft.App/managedEnvironments",
            "location": location,
            "properties": props,
        }

    def _app_id(self, rg: str, name: str) -> str:
        return APPS.format(sub=self.state.subscription, rg=rg) + f"/{name}"

    # -- ARM -------------------------------------------------------------------------------

    @staticmethod
    def _error(status: int, code: str, message: str) -> web.Response:
        return web.json_response({"error": {"code": code, "message": message}}, status=status)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            body = json.loads(raw) if raw else None
        rec = Recorded(request.method, request.path, body)
        self.requests.append(rec)
        resp = await self._route(request, body)
        rec.status = resp.status
        return resp

    async def _route(self, request: web.Request, body: Any) -> web.StreamResponse:
        if request.path.startswith(("/v2/", "/oauth2/")):
            return self._registry(request)
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(401, "InvalidAuthenticationToken", "The access token is invalid.")
        parts = request.path.strip("/").split("/")
        if parts[0] == "operations":
            return self._operation(parts[1])
        if parts[0] == "operationResults":
            return self._operation_result(parts[1])
        if "api-version" not in request.query:
            return self._error(400, "MissingApiVersionParameter", "The api-version query parameter is required.")
        if parts[:2] == ["subscriptions", self.state.subscription] and parts[2:5] == [
            "providers", "Microsoft.ContainerRegistry", "registries"
        ]:  # fmt: skip
            return web.json_response({"value": [
                {"id": f"/subscriptions/{self.state.subscription}/resourceGroups/rg-acr/providers/"
                       f"Microsoft.ContainerRegistry/registries/{name}",
                 "name": name, "type": "Microsoft.ContainerRegistry/registries", "location": "westeurope",
                 "sku": {"name": "Basic"}, "properties": {"loginServer": server}}
                for server, name in self.registries.items()
            ]})  # fmt: skip
        if len(parts) > 7 and parts[5] == "Microsoft.ContainerRegistry":
            return await self._acr(request.method, parts[7], parts[8:], body)
        # /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.App/{kind}/{name}[/{action}]
        if len(parts) < 6 or parts[0] != "subscriptions" or parts[2] != "resourceGroups":
            return self._error(404, "NotFound", f"no route {request.path}")
        if parts[1] != self.state.subscription:
            return self._error(404, "SubscriptionNotFound", f"The subscription '{parts[1]}' could not be found.")
        rg = parts[3]
        if rg == "rg-forbidden":
            return self._error(403, "AuthorizationFailed", "The client does not have authorization to perform action over scope.")
        if rg not in self.state.resource_groups:
            return self._error(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
        kind = parts[6] if len(parts) > 6 else ""
        name = parts[7] if len(parts) > 7 else None
        action = parts[8] if len(parts) > 8 else None
        injected = self.fail_next.pop(f"{request.method} {kind}", None)
        if injected:
            return self._error(injected[0], injected[1], "Injected failure for a test.")
        if kind == "managedEnvironments" and name and action == "usages" and request.method == "GET":
            return self._usages(rg, name)
        if kind == "managedEnvironments" and name:
            return await self._environment(request.method, rg, name, body)
        if kind == "containerApps" and name is None and request.method == "GET":
            apps = [self._public(a) for (g, _n), a in self.state.apps.items() if g == rg]
            return web.json_response({"value": apps})
        if kind == "containerApps" and name and action == "listSecrets" and request.method == "POST":
            if (rg, name) not in self.state.apps:
                return self._error(404, "ContainerAppNotFound", f"Container app '{name}' was not found.")
            return web.json_response({"value": copy.deepcopy(self.state.secrets.get((rg, name), []))})
        if kind == "containerApps" and name and action is None:
            return await self._app(request.method, rg, name, body)
        if kind == "containerApps" and name and action == "revisions" and parts[-1] == "replicas":
            fleet = self.fleets.get(name)
            running = [r for r in fleet.live() if r.proc.poll() is None] if fleet else []
            return web.json_response({"value": [{"name": r.id} for r in running]})
        return self._error(404, "NotFound", f"no route {request.method} {request.path}")

    def busy(self, kind: str, name: str, seconds: float, rg: str = "rg-acx") -> None:
        """Another client's change to app (or environment) ``name`` under way for ``seconds``:
        what the SDK meets when the portal, a pipeline or a second machine changes it."""
        self._ops[uuid.uuid4().hex] = Operation((kind, rg, name), 0, time.monotonic() + seconds)

    def _new_op(self, kind: str, rg: str, name: str, *, patch: bool = False, error: tuple[str, str] | None = None) -> str:
        op = uuid.uuid4().hex
        app = (rg, name) if patch else None
        self._ops[op] = Operation((kind, rg, name), self.op_polls, time.monotonic() + self.op_seconds, patch, app, error)
        return op

    def _running(self, op: Operation) -> bool:
        return time.monotonic() < op.until or (op.patch and self.hold_patches)

    def _in_progress(self, kind: str, rg: str, name: str) -> web.Response | None:
        """The 409 for a write to a resource one of whose operations is still running."""
        if not any(op.resource == (kind, rg, name) and self._running(op) for op in self._ops.values()):
            return None
        self.conflicts += 1
        if kind == "managedEnvironments":
            code, what = "ManagedEnvironmentOperationInProgress", f"Container Apps environment {name}"
        else:
            code, what = "ContainerAppOperationInProgress", f"container App '{name}'"
        return self._error(
            409, code, f"Cannot modify {what} because another operation is in progress. Please retry the operation."
        )

    def _poll(self, op_id: str) -> bool | None:
        """Whether this status read still finds the operation in progress (None: no such one)."""
        op = self._ops.get(op_id)
        if op is None:
            return None
        if self._running(op) or op.polls > 0:
            op.polls = max(0, op.polls - 1)
            return True
        return False

    def _operation(self, op: str) -> web.Response:
        running = self._poll(op)
        if running is None:
            return self._error(404, "NotFound", "no such operation")
        if running:
            return web.json_response({"status": "InProgress"}, headers={"retry-after-ms": "50"})
        error = self._ops[op].error
        if error is not None:  # ARM's Azure-AsyncOperation body for an operation that failed
            return web.json_response({"status": "Failed", "error": {"code": error[0], "message": error[1]}})
        return web.json_response({"status": "Succeeded"})

    def _operation_result(self, op: str) -> web.Response:
        running = self._poll(op)
        if running is None:
            return self._error(404, "NotFound", "no such operation")
        if running:
            return web.Response(status=202, headers={"Location": f"{self.url}/operationResults/{op}", "retry-after-ms": "50"})
        error = self._ops[op].error
        if error is not None:
            return self._error(400, *error)
        key = self._ops[op].app
        if key is not None and key in self.state.apps:
            return web.json_response(self._public(self.state.apps[key]))
        return web.Response(status=200)

    async def _environment(self, method: str, rg: str, name: str, body: Any) -> web.Response:
        env = self.state.environments.get((rg, name))
        if method == "GET":
            if env is None:
                return self._error(
                    404, "ResourceNotFound", f"The Resource 'Microsoft.App/managedEnvironments/{name}' was not found."
                )
            return web.json_response(env)
        if method == "PUT":
            conflict = self._in_progress("managedEnvironments", rg, name)
            if conflict is not None:
                return conflict
            profiles = bool((body.get("properties") or {}).get("workloadProfiles"))
            self._add_environment(rg, name, body["location"], profiles=profiles)
            op = self._new_op("managedEnvironments", rg, name)
            return web.json_response(
                self.state.environments[(rg, name)], status=201,
                headers={"Azure-AsyncOperation": f"{self.url}/operations/{op}"},
            )  # fmt: skip
        return self._error(405, "MethodNotAllowed", method)

    # -- the environment's core quota --------------------------------------------------------

    def active_replicas(self, name: str) -> int:
        """The replicas an app runs, as Container Apps counts them against the quota: every
        replica of every revision, starting and draining ones included."""
        fleet = self.fleets.get(name)
        return len(fleet.replicas) + fleet.starting if fleet else 0

    @staticmethod
    def _cpu(app: dict[str, Any]) -> float:
        return float(sum(c["resources"]["cpu"] for c in app["properties"]["template"]["containers"]))

    def cores_in_use(self, environment_id: str) -> float:
        """Cores of every active replica of every app in the environment."""
        return sum(
            self._cpu(app) * self.active_replicas(n)
            for (_g, n), app in self.state.apps.items()
            if app.get("properties", {}).get("environmentId") == environment_id and "template" in app["properties"]
        )

    def _usages(self, rg: str, name: str) -> web.Response:
        env = self.state.environments.get((rg, name))
        if env is None or not self.serve_usages:
            return self._error(
                404, "ResourceNotFound", f"The Resource 'Microsoft.App/managedEnvironments/{name}/usages' was not found."
            )
        # The shape of the REST spec's example (Usages.json, 2024-03-01).
        usage = {"unit": "Count", "currentValue": self.cores_in_use(env["id"]), "limit": self.core_quota,
                 "name": {"value": "ManagedEnvironmentConsumptionCores",
                          "localizedValue": "Managed Environment Consumption Cores"}}  # fmt: skip
        return web.json_response({"value": [usage]})

    def _quota_problem(self, app: dict[str, Any]) -> tuple[str, str] | None:
        """The error of a new revision whose minReplicas do not fit the environment's free cores.
        The old revision's replicas stay active until the new one is ready (single revision
        mode), so they still count. The docs say that past the quota "provisioning times out with
        a failure" (the quotas page); the message is the one the ja-jp quotas page quotes,
        "Maximum Allowed Cores exceeded for the Managed Environment." The error code is NOT
        SOURCED (so one the SDK cannot match on), and the twin fails the operation after its
        usual polls rather than after a real timeout."""
        min_replicas = int((app["properties"]["template"].get("scale") or {}).get("minReplicas", 0))
        need = min_replicas * self._cpu(app)
        free = self.core_quota - self.cores_in_use(app["properties"]["environmentId"])
        if need <= free:
            return None
        return ("ContainerAppProvisioningFailed", f"Failed to provision revision: {min_replicas} replicas need {need:g} "
                f"cores, {free:g} are free. Maximum Allowed Cores exceeded for the Managed Environment.")  # fmt: skip

    def _failed_update(self, rg: str, name: str, error: tuple[str, str], *, patch: bool = False) -> web.Response:
        """An update ARM accepts whose new revision then fails: the old revision keeps running
        ("If the update fails, traffic stays on the old revision", revisions page), the app is
        Failed, the operation ends Failed with ``error``."""
        self.state.apps[(rg, name)]["properties"]["provisioningState"] = "Failed"
        op = self._new_op("containerApps", rg, name, patch=patch, error=error)
        headers = {"Azure-AsyncOperation": f"{self.url}/operations/{op}"}
        if patch:
            headers["Location"] = f"{self.url}/operationResults/{op}"
            return web.Response(status=202, headers=headers)
        return web.json_response(self._public(self.state.apps[(rg, name)]), status=201, headers=headers)

    def _public(self, app: dict[str, Any]) -> dict[str, Any]:
        """What GET returns: secrets without values, as ARM does."""
        out = copy.deepcopy(app)
        for s in out.get("properties", {}).get("configuration", {}).get("secrets", []) or []:
            s.pop("value", None)
        return out

    async def _app(self, method: str, rg: str, name: str, body: Any) -> web.Response:
        key = (rg, name)
        if method == "GET":
            if key not in self.state.apps:
                return self._error(404, "ContainerAppNotFound", f"Container app '{name}' was not found.")
            return web.json_response(self._public(self.state.apps[key]))
        conflict = self._in_progress("containerApps", rg, name)
        if conflict is not None:
            return conflict
        if method == "PUT":
            problem = self._validate(body) or self._check_placement(body)
            if problem:
                return self._error(400, "ContainerAppInvalidSchema", problem)
            existing = self.state.apps.get(key)
            identity = self._assign_identity(body, existing)
            problem = self._identity_problem(body, identity)
            if problem:
                return self._error(400, "ContainerAppInvalidRegistryIdentity", problem)
            pull = self._pull_problem(body["properties"], identity)
            if pull and not (existing is None and self._pulls_with(body["properties"]) == "system"):
                return self._error(400, "InvalidParameterValueInContainerTemplate", "The following field(s) are "
                                   f"either invalid or missing. {pull}")  # fmt: skip
            if pull:
                # A system-assigned identity is created with the app, so at the first PUT it
                # cannot hold AcrPull yet: "System-assigned identities are created at the time
                # your container app is created, and therefore, won't have AcrPull access ...
                # the image can't be pulled from your private registry when your app is first
                # deployed" (https://learn.microsoft.com/azure/container-apps/containers
                # #managed-identity-with-azure-container-registry). The app and its identity
                # exist afterwards, its revision does not ("No revision created.
                # provisioningState is Failed. Error message mentions ... UNAUTHORIZED",
                # https://learn.microsoft.com/azure/container-apps/deployment-errors
                # #image-pull-failures): the PUT is accepted and its operation ends Failed.
                return self._failed_create(rg, name, body, identity, (
                    "InvalidParameterValueInContainerTemplate",
                    f"The following field(s) are either invalid or missing. {pull}",
                ))  # fmt: skip
            quota = self._quota_problem(body)
            if quota is not None:
                if existing is None:
                    return self._failed_create(rg, name, body, identity, quota)
                return self._failed_update(rg, name, quota)
            secrets = body["properties"]["configuration"].get("secrets") or []
            self.state.secrets[key] = copy.deepcopy(secrets)
            old = existing
            app = copy.deepcopy(body)
            app.update({"id": self._app_id(rg, name), "name": name, "type": "Microsoft.App/containerApps"})
            if identity is not None:
                app["identity"] = identity
            props = app["properties"]
            props["provisioningState"] = "Succeeded"
            if old is not None and name in self.fleets and old["properties"]["template"] == props["template"]:
                props["latestRevisionName"] = props["latestReadyRevisionName"] = old["properties"]["latestRevisionName"]
            else:
                props["latestRevisionName"] = props["latestReadyRevisionName"] = self._revision_name(name)
            fleet = self.fleets.get(name)
            if fleet is None:
                fleet = await self._start_fleet(rg, name, app)
            elif props["latestRevisionName"] != fleet.revision:
                await self._new_revision(fleet, app)
            props["configuration"]["ingress"]["fqdn"] = f"127.0.0.1:{fleet.port}"
            self.state.apps[key] = app
            op = self._new_op("containerApps", rg, name)
            return web.json_response(
                self._public(app), status=201, headers={"Azure-AsyncOperation": f"{self.url}/operations/{op}"}
            )
        if method == "PATCH":
            return await self._patch_app(rg, name, body)
        if method == "DELETE":
            if key not in self.state.apps:
                return web.Response(status=204)
            del self.state.apps[key]
            self.state.secrets.pop(key, None)
            await self._stop_fleet(name)
            op = self._new_op("containerApps", rg, name)
            return web.Response(status=202, headers={"Location": f"{self.url}/operationResults/{op}"})
        return self._error(405, "MethodNotAllowed", method)

    async def _patch_app(self, rg: str, name: str, body: Any) -> web.Response:
        """PATCH (``begin_update``), as Container Apps does it: ``tags`` replace the app's tags
        as a whole (ARM's resource provider contract: that is how a tag is removed), a
        ``template`` replaces the template as a whole (a partial one would lose the containers,
        which validation then refuses), anything else is merged (JSON Merge Patch). A template
        change is a revision-scope change: a new revision, whose replicas replace the old ones."""
        key = (rg, name)
        if key not in self.state.apps:
            return self._error(404, "ContainerAppNotFound", f"Container app '{name}' was not found.")
        if not isinstance(body, dict):
            return self._error(400, "InvalidRequestContent", "the request body must be a JSON object")
        old = self.state.apps[key]
        app = copy.deepcopy(old)
        if "tags" in body:
            app["tags"] = dict(body["tags"] or {})
        props = dict(body.get("properties") or {})
        template = props.pop("template", None)
        _merge_patch(app["properties"], props)
        if template is not None:
            app["properties"]["template"] = copy.deepcopy(template)
        problem = self._validate(app)
        scale = app["properties"]["template"].get("scale") or {}
        low, high = scale.get("minReplicas", 0), scale.get("maxReplicas", 10)
        if problem is None and not (0 <= low <= high <= 1000):
            problem = f"ContainerAppInvalidScaleSettings: need 0 <= minReplicas ({low}) <= maxReplicas ({high}) <= 1000"
        if problem:
            return self._error(400, "ContainerAppInvalidSchema", problem)
        if app["properties"]["template"]["containers"] != old["properties"]["template"]["containers"]:
            pull = self._pull_problem(app["properties"], app.get("identity"))
            if pull:
                return self._error(400, "InvalidParameterValueInContainerTemplate", "The following field(s) are "
                                   f"either invalid or missing. {pull}")  # fmt: skip
        if app["properties"]["template"] != old["properties"]["template"]:
            quota = self._quota_problem(app)
            if quota is not None:
                return self._failed_update(rg, name, quota, patch=True)
            # Any template change is a revision-scope change, a scale change included ("Adding
            # or editing scaling rules creates a new revision", scale-app; revisions#change-types):
            # the new revision's replicas start, then the old ones drain.
            app["properties"]["latestRevisionName"] = app["properties"]["latestReadyRevisionName"] = self._revision_name(name)
            fleet = self.fleets.get(name)
            if fleet is not None:
                await self._new_revision(fleet, self._secret_body(rg, name, app))
        self.state.apps[key] = app
        op = self._new_op("containerApps", rg, name, patch=True)
        return web.Response(
            status=202,
            headers={
                "Azure-AsyncOperation": f"{self.url}/operations/{op}",
                "Location": f"{self.url}/operationResults/{op}",
            },
        )

    def _registry(self, request: web.Request) -> web.Response:
        """The Docker Registry API v2 (HEAD /v2/<repository>/manifests/<tag>) and its token service."""
        import base64

        basic = "Basic " + base64.b64encode(":".join(self.registry_login).encode()).decode()
        auth = request.headers.get("Authorization", "")
        if request.path == "/oauth2/token":
            if self.registry_auth != "bearer" or auth != basic:
                return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
            token = f"registry-token-{len(self.registry_tokens)}"
            self.registry_tokens.append(token)
            return web.json_response({"access_token": token, "scope": request.query.get("scope", "")})
        allowed = {None: True, "basic": auth == basic, "bearer": auth.removeprefix("Bearer ") in self.registry_tokens}
        if not allowed[self.registry_auth]:
            challenge = (
                'Basic realm="registry"'
                if self.registry_auth == "basic"
                else f'Bearer realm="{self.url}/oauth2/token",service="{self.registry}",scope="repository:x:pull"'
            )
            return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        repo, _, tag = request.path.removeprefix("/v2/").rpartition("/manifests/")
        return web.Response(status=200 if self._has_image(repo, tag) else 404)

    def _has_image(self, repo: str, tag: str) -> bool:
        """Whether this registry holds repo:tag (put there by a test, ACR Tasks or a push)."""
        pushed = self.pushes.read_text().split() if self.pushes.exists() else []
        return bool({f"{repo}:{tag}", f"{self.registry}/{repo}:{tag}"} & (self.images | set(pushed)))

    async def _acr(self, method: str, registry: str, rest: list[str], body: Any) -> web.Response:
        """ACR Tasks: an upload URL (a blob in Azurite), a run that 'builds' the uploaded context
        and writes a log blob, the run's state and its log link."""
        from async_ca_exec.storage import Storage

        assert self.storage is not None, "ACR needs the tests' Azurite"
        azurite, container = self.storage
        cfg = {"azure_storage": {"connection_string": azurite.connection_string, "container": container}}
        from async_ca_exec.config import load_config

        async with Storage(load_config(cfg, env={})) as st:
            if rest == ["listBuildSourceUploadUrl"] and method == "POST":
                name = f"acr-sources/{uuid.uuid4().hex}.tar.gz"
                await st.ensure_container()
                url = await st.write_url()
                base, _, sas = url.partition("?")
                if self.acr_upload_broken:
                    sas = sas.replace("sig=", "sig=AAAA")
                return web.json_response({"uploadUrl": f"{base}/{name}?{sas}", "relativePath": name})
            if rest == ["scheduleRun"] and method == "POST":
                run_id = f"cb{len(self.acr_runs) + 1}"
                source = await st.get(body["sourceLocation"])
                import io
                import tarfile

                with tarfile.open(fileobj=io.BytesIO(source), mode="r:gz") as tar:
                    files = sorted(tar.getnames())
                lines = [
                    f"Step 1/9 : FROM python:{body['arguments'][0]['value']}-slim",
                    f"context: {', '.join(files)}",
                    "Step 2/9 : RUN pip install ...",
                    "\r 10% ####\r 50% ##########\r100% ####################",
                    f"Successfully pushed {body['imageNames'][0]}" if self.acr_fail is None else "error: step 2 failed",
                ]
                await st.put(f"acr-logs/{run_id}.log", b"")  # nothing yet: reads from 0 get 416
                self.acr_runs[run_id] = {"request": body, "files": files, "polls": 0, "registry": registry,
                                         "lines": lines, "fail": self.acr_fail, "status": "Queued"}  # fmt: skip
                if self.acr_fail is None:
                    self.images.add(body["imageNames"][0])
                return web.json_response({"properties": {"runId": run_id, "status": "Queued"}})
            if len(rest) == 2 and rest[0] == "runs" and method == "GET":
                run = self.acr_runs[rest[1]]
                if run["status"] not in ("Canceled", "Succeeded", "Failed"):
                    run["polls"] += 1
                    done = run["polls"] >= self.acr_polls
                    full = "\n".join(run["lines"]) + "\n"
                    text = full if done else full[: len(full) * (run["polls"] - 1) // max(1, self.acr_polls - 1)]  # mid-line
                    await st._c.upload_blob(
                        f"acr-logs/{rest[1]}.log", text.encode(), overwrite=True,
                        metadata={"Complete": "successful"} if done else None,
                    )  # fmt: skip
                    if run["status"] != "Canceled":  # a cancel that landed while the log was written is final
                        run["status"] = ("Failed" if run["fail"] else "Succeeded") if done else "Running"
                props = {"runId": rest[1], "status": run["status"]}
                if run["status"] == "Failed":
                    props["runErrorMessage"] = run["fail"]
                return web.json_response({"properties": props})
            if len(rest) == 3 and rest[0] == "runs" and rest[2] == "cancel" and method == "POST":
                self.acr_runs[rest[1]]["status"] = "Canceled"
                return web.Response(status=200)
            if len(rest) == 3 and rest[0] == "runs" and rest[2] == "listLogSasUrl":
                return web.json_response({"logLink": await st.read_url(f"acr-logs/{rest[1]}.log")})
        return self._error(404, "NotFound", f"no ACR route {method} {'/'.join(rest)}")

    def _assign_identity(self, body: dict[str, Any], existing: dict[str, Any] | None) -> dict[str, Any] | None:
        """The app's managed identities as ARM returns them (ManagedServiceIdentity): a
        system-assigned one gets a principal id when it is first assigned and keeps it while the
        app keeps it; each user-assigned one is listed with its own."""
        given = body.get("identity")
        if not isinstance(given, dict) or given.get("type", "None") == "None":
            return None
        kinds = {k.strip() for k in str(given.get("type")).split(",")}
        out: dict[str, Any] = {"type": given["type"]}
        if "SystemAssigned" in kinds:
            before = (existing or {}).get("identity") or {}
            out["principalId"] = before.get("principalId") or str(uuid.uuid4())
            out["tenantId"] = "00000000-0000-0000-0000-0000000000aa"
        if "UserAssigned" in kinds:
            out["userAssignedIdentities"] = {
                uid: {"principalId": str(uuid.uuid5(uuid.NAMESPACE_URL, uid.lower())), "clientId": str(uuid.uuid4())}
                for uid in given.get("userAssignedIdentities") or {}
            }
        return out

    @staticmethod
    def _registries(props: dict[str, Any]) -> list[dict[str, Any]]:
        return list(props["configuration"].get("registries") or [])

    def _pulls_with(self, props: dict[str, Any]) -> str | None:
        """The managed identity the app pulls from this registry with (None: a password, or nothing)."""
        for r in self._registries(props):
            if r.get("server") == self.registry and r.get("identity"):
                return str(r["identity"])
        return None

    def _identity_problem(self, body: dict[str, Any], identity: dict[str, Any] | None) -> str | None:
        """A registry entry naming an identity the app does not have. The spec says only that the
        field takes "the full user-assigned identity Resource ID" or 'system' (RegistryCredentials);
        that the identity must also be assigned to the app (``identity``) is what the containers
        page's examples do. The error code and text here are NOT SOURCED: real ARM's answer to this
        was not found, so it is a 400 whose code the SDK does not know (the harder case: the SDK
        must assign the identity itself rather than count on a message it could parse)."""
        kinds = {k.strip() for k in str((identity or {}).get("type", "None")).split(",")}
        assigned = {k.lower() for k in (identity or {}).get("userAssignedIdentities") or {}}
        for r in self._registries(body["properties"]):
            who = r.get("identity")
            if not who:
                continue
            if who == "system" and "SystemAssigned" not in kinds:
                return (f"Registry '{r.get('server')}' uses the system-assigned identity, but the container app has none: "
                        "set identity.type to SystemAssigned")  # fmt: skip
            if who != "system" and str(who).lower() not in assigned:
                return (f"The managed identity '{who}' of registry '{r.get('server')}' is not assigned to the container "
                        "app: add it to identity.userAssignedIdentities")  # fmt: skip
        return None

    def _failed_create(
        self, rg: str, name: str, body: dict[str, Any], identity: dict[str, Any] | None, error: tuple[str, str]
    ) -> web.Response:
        """A create ARM accepts whose revision then fails: the app exists (Failed, no revision, no
        replica) and the operation ends Failed with ``error``."""
        app = copy.deepcopy(body)
        app.update({"id": self._app_id(rg, name), "name": name, "type": "Microsoft.App/containerApps"})
        if identity is not None:
            app["identity"] = identity
        app["properties"]["provisioningState"] = "Failed"
        self.state.secrets[(rg, name)] = copy.deepcopy(body["properties"]["configuration"].get("secrets") or [])
        self.state.apps[(rg, name)] = app
        op = self._new_op("containerApps", rg, name, error=error)
        return web.json_response(self._public(app), status=201, headers={"Azure-AsyncOperation": f"{self.url}/operations/{op}"})

    def _pull_problem(self, props: dict[str, Any], identity: dict[str, Any] | None = None) -> str | None:
        """What Container Apps says at PUT when it cannot pull the image: it resolves the image
        with the app's registry credentials before it accepts the template, and answers 400
        InvalidParameterValueInContainerTemplate with the registry's error (MANIFEST_UNKNOWN,
        UNAUTHORIZED) instead of creating a revision that never starts (seen in
        microsoft/azure-container-apps#352 and azd output; the symptoms are on
        https://learn.microsoft.com/azure/container-apps/deployment-errors#image-pull-failures).
        Images elsewhere than this registry exist only if a test put their full name in
        ``images``. A registry entry with ``identity`` pulls as that managed identity, which
        needs AcrPull on the registry ("The managed identity must have AcrPull access for the
        Azure Container Registry", https://learn.microsoft.com/azure/container-apps/containers
        #managed-identity-with-azure-container-registry): here, be in ``acr_pull_identities``."""
        container = props["template"]["containers"][0]
        image = container["image"]
        field = f"Field 'template.containers.{container['name']}.image' is invalid with details: 'Invalid value"
        if not image.startswith(self.registry + "/"):
            if image in self.images:
                return None
            return f'{field}: "{image}": GET https:: MANIFEST_UNKNOWN: manifest unknown; map[Tag:...]\';.'
        repo, _, tag = image.removeprefix(self.registry + "/").rpartition(":")
        who = self._pulls_with(props)
        if self.registry_auth is not None and who is not None:
            principal = (identity or {}).get("principalId") if who == "system" else who
            if principal not in self.acr_pull_identities:
                return f'{field}: "{image}": GET https:: UNAUTHORIZED: authentication required; [map[Action:pull]]\';.'
        elif self.registry_auth is not None:
            values = {s["name"]: s.get("value", "") for s in props["configuration"].get("secrets") or []}
            logins = [
                (r.get("username"), values.get(r.get("passwordSecretRef", "")))
                for r in props["configuration"].get("registries") or []
                if r.get("server") == self.registry
            ]
            if tuple(self.registry_login) not in logins:
                return f'{field}: "{image}": GET https:: UNAUTHORIZED: authentication required; [map[Action:pull]]\';.'
        if not self._has_image(repo, tag):
            return (
                f'{field}: "{image}": GET https:: MANIFEST_UNKNOWN: manifest tagged by "{tag}" is not found; map[Tag:{tag}]\';.'
            )
        return None

    def _check_placement(self, body: dict[str, Any]) -> str | None:
        """What real ARM refuses: a region other than the environment's, a workload profile the
        environment lacks (or any, in a Consumption-only one), more than 2 vCPU there."""
        env = next((e for e in self.state.environments.values() if e["id"] == body["properties"]["environmentId"]), None)
        if env is None:
            return "ManagedEnvironmentNotFound"
        if body["location"] != env["location"]:
            return f"the app's location {body['location']} differs from its environment's {env['location']}"
        profiles = [p["name"] for p in env["properties"].get("workloadProfiles") or []]
        wanted = body["properties"].get("workloadProfileName")
        if profiles and wanted not in profiles:
            return f"workloadProfileName must be one of {profiles}"
        if not profiles and wanted:
            return "a Consumption-only environment has no workload profiles"
        if not profiles and body["properties"]["template"]["containers"][0]["resources"]["cpu"] > 2:
            return "ContainerAppInvalidResourceTotal: at most 2 vCPU in a Consumption-only environment"
        return None

    @staticmethod
    def _validate(body: Any) -> str | None:
        try:
            props = body["properties"]
            container = props["template"]["containers"][0]
            container["image"]
            props["environmentId"]
            body["location"]
            for probe in container.get("probes") or []:
                if probe.get("type") not in DEFAULT_PROBES:
                    return f"ContainerAppInvalidProbe: type {probe.get('type')!r} is not Startup, Liveness or Readiness"
                for key, (low, high) in PROBE_LIMITS.items():
                    if key in probe and not low <= probe[key] <= high:
                        return f"ContainerAppInvalidProbe: {probe['type']} {key} {probe[key]} is not in {low}..{high}"
                if sum(k in probe for k in ("httpGet", "tcpSocket")) != 1:
                    return f"ContainerAppInvalidProbe: {probe['type']} needs exactly one of httpGet, tcpSocket"
            secret_names = {s["name"] for s in props["configuration"].get("secrets") or []}
            for env in container.get("env") or []:
                if "secretRef" in env and env["secretRef"] not in secret_names:
                    return f"env {env['name']} refers to a missing secret {env['secretRef']}"
        except (KeyError, IndexError, TypeError) as exc:
            return f"missing field {exc}"
        return None

    # -- replicas and their ingress ----------------------------------------------------------

    def _revision_name(self, name: str) -> str:
        revision = f"{name}--{uuid.uuid4().hex[:7]}"
        self.revisions.setdefault(name, []).append(revision)
        return revision

    async def _start_fleet(self, rg: str, name: str, app: dict[str, Any]) -> Fleet:
        """A new app: its ingress, its first revision's first replica, its scaler."""
        port = _free_port()
        # Envoy sets no small body limit: neither does this ingress (aiohttp's default is 1 MiB).
        web_app = web.Application(client_max_size=1024**3)
        web_app.router.add_route("*", "/{tail:.*}", functools.partial(self._ingress, name=name))
        runner = web.AppRunner(web_app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=self.ingress_ssl).start()
        self._runners[f"ingress-{name}"] = runner
        revision = app["properties"]["latestRevisionName"]
        fleet = Fleet(rg, name, port, revision, self._model(app))
        self.fleets[name] = fleet
        try:
            await self._add_replica(fleet, app, revision)
        except BaseException:
            await self._stop_fleet(name)
            raise
        fleet.scaler = asyncio.get_running_loop().create_task(self._scale_loop(fleet))
        return fleet

    def _model(self, app: dict[str, Any]) -> ScaleModel:
        settings = ScaleSettings.from_template(app["properties"]["template"])
        return ScaleModel(settings, time.monotonic, http_window=self.http_window)

    async def _add_replica(self, fleet: Fleet, app: dict[str, Any], revision: str) -> Replica:
        fleet.serial += 1
        rid = f"{revision}-{fleet.serial}"
        fleet.starting += 1
        try:
            proc, upstream, log, health = await self._spawn(rid, app)
        finally:
            fleet.starting -= 1
        replica = Replica(fleet.name, proc, fleet.port, upstream, time.monotonic(), log, health, rid, revision)
        fleet.replicas.append(replica)
        replica.prober = asyncio.get_running_loop().create_task(self._probe_liveness(replica))
        return replica

    async def _new_revision(self, fleet: Fleet, app: dict[str, Any]) -> None:
        """Single revision mode: the new revision starts as many replicas as the old one runs
        (at least one) and takes the traffic once they are up; then the old ones get SIGTERM
        ("The existing active revision isn't deactivated until the new revision is ready",
        application-lifecycle-management). Both run meanwhile, and count against the quota."""
        revision = app["properties"]["latestRevisionName"]
        old = fleet.live()
        want = max(1, len(old) + fleet.starting)
        fleet.swapping = True  # (the old revision's scaler must not take the new replicas for its own)
        try:
            await asyncio.gather(*(self._add_replica(fleet, app, revision) for _ in range(want)))
        finally:
            fleet.swapping = False
        fleet.revision, fleet.model = revision, self._model(app)
        grace = self._grace(app)
        for replica in old:
            self._retire(fleet, replica, grace)

    @staticmethod
    def _grace(app: dict[str, Any]) -> float:
        # terminationGracePeriodSeconds, default 30 (REST spec, Template)
        value = app["properties"]["template"].get("terminationGracePeriodSeconds")
        return 30.0 if value is None else float(value)

    def _retire(self, fleet: Fleet, replica: Replica, grace: float) -> None:
        """SIGTERM now, SIGKILL after the grace period ("If your application doesn't respond
        within 30 seconds to the SIGTERM message, then SIGKILL terminates your container",
        application-lifecycle-management#shutdown; 30 s is the default grace period)."""
        replica.draining = True
        self.scale_ins.append((time.monotonic(), replica.id, replica.inflight))

        async def end() -> None:
            if replica.prober is not None:
                replica.prober.cancel()
                await asyncio.gather(replica.prober, return_exceptions=True)
            async with self._replica_lock(replica.id):
                await _end(replica.proc, grace=grace)
            if replica in fleet.replicas:
                fleet.replicas.remove(replica)

        task = asyncio.get_running_loop().create_task(end())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _scale_loop(self, fleet: Fleet) -> None:
        """The platform's scaler for one app: polls the queue rule every pollingInterval,
        evaluates the HTTP rule every window, and starts or stops replicas to match."""
        growing = fleet.growing
        while True:
            await asyncio.sleep(self.scale_tick)
            app = self.state.apps.get((fleet.rg, fleet.name))
            if app is None or fleet.swapping:
                continue
            model = fleet.model
            if model.queue_due():
                model.queue_reading(await self._queue_count(fleet, app))
            live = fleet.live()
            current = len(live) + fleet.starting
            target = model.decide(current)
            if target == current:
                continue
            if target > current:
                # Past the environment's core quota "the app may be restricted from scaling out"
                # (the quotas page): it gets what fits, silently.
                free = self.core_quota - self.cores_in_use(app["properties"]["environmentId"])
                target = min(target, current + int(free // max(self._cpu(app), 0.25)))
                if target <= current:
                    continue
                self.scale_log.append((time.monotonic(), fleet.name, target))
                body = self._secret_body(fleet.rg, fleet.name)
                for _ in range(target - current):
                    task = asyncio.get_running_loop().create_task(self._add_replica(fleet, body, fleet.revision))
                    growing.add(task)
                    task.add_done_callback(growing.discard)
            else:
                self.scale_log.append((time.monotonic(), fleet.name, target))
                # The busiest go first: which replica a scale-in picks is not documented, and
                # KEDA/HPA may pick any (kedacore/keda#2901), so the harder case.
                ready = sorted(live, key=lambda r: r.inflight, reverse=True)
                for replica in ready[: current - target]:
                    self._retire(fleet, replica, self._grace(app))

    async def _queue_count(self, fleet: Fleet, app: dict[str, Any]) -> int | None:
        """The azure-queue rule's metric: the queue's approximate message count (KEDA's
        default strategy counts visible and invisible messages), read with the connection
        string the rule's ``connection`` secret holds. None if it cannot be read."""
        from azure.core.exceptions import AzureError
        from azure.storage.queue.aio import QueueClient

        rule = next((q for r in app["properties"]["template"]["scale"].get("rules") or [] if (q := queue_rule(r))), None)
        if rule is None:
            return None
        secrets = {s["name"]: s.get("value", "") for s in self.state.secrets.get((fleet.rg, fleet.name), [])}
        ref = next((a.get("secretRef") for a in rule.get("auth") or [] if a.get("triggerParameter") == "connection"), None)
        if ref is None or ref not in secrets:
            self.queue_errors.append(f"{fleet.name}: no connection secret for queue {rule.get('queueName')}")
            return None
        key = (secrets[ref], rule.get("queueName"))
        if fleet.queue is None or fleet.queue[:2] != key:
            if fleet.queue is not None:
                await fleet.queue[2].close()
            # The platform's own reads are not the SDK's: they stay out of the tests' logs
            # (which are searched for secrets the SDK might log).
            fleet.queue = (*key, QueueClient.from_connection_string(key[0], str(key[1])))
        try:
            if time.monotonic() - self._queue_gc_at.get(fleet.name, 0.0) >= self.queue_gc:
                self._queue_gc_at[fleet.name] = time.monotonic()
                await fleet.queue[2].peek_messages(max_messages=1, logger=_QUIET)  # Azurite drops expired messages on a read
            props = await fleet.queue[2].get_queue_properties(logger=_QUIET)
        except (AzureError, OSError) as exc:
            self.queue_errors.append(f"{fleet.name}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            return None
        return int(props.approximate_message_count or 0)

    async def _spawn(self, name: str, body: dict[str, Any]) -> tuple[subprocess.Popen[bytes], int, Path, int]:
        """A replica process configured from the app's template, as Container Apps would (or,
        for an image that lacks the server, a web server that answers 404 to everything)."""
        if body["properties"]["template"]["containers"][0]["image"] in self.serverless_images:
            port = _free_port()
            log = self.workdir / f"replica-{name}-{port}.log"
            empty = self.workdir / "empty"
            empty.mkdir(exist_ok=True)
            code = (
                "import http.server as h; "
                f"h.ThreadingHTTPServer(('127.0.0.1', {port}), h.SimpleHTTPRequestHandler).serve_forever()"
            )
            with open(log, "wb") as logf:  # noqa: ASYNC230
                proc = subprocess.Popen([sys.executable, "-c", code], stdout=logf, stderr=logf, cwd=empty)  # noqa: ASYNC220
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            return proc, port, log, 0
        secrets = {s["name"]: s.get("value", "") for s in body["properties"]["configuration"].get("secrets") or []}
        env = {k: v for k, v in os.environ.items() if not k.startswith("ACX_")}
        for var in body["properties"]["template"]["containers"][0].get("env") or []:
            env[var["name"]] = secrets[var["secretRef"]] if "secretRef" in var else var.get("value", "")
        port, health = _free_port(), _free_port()
        ready_r, ready_w = os.pipe()
        env.update({
            "ACX_SERVER_HOST": "127.0.0.1",
            "ACX_SERVER_PORT": str(port),
            "ACX_HEALTH_PORT": str(health),  # the probes' port (8081 in Azure)
            "ACX_READY_FD": str(ready_w),
            "ACX_REPLICA_ID": name,
            "ACX_LOG_LEVEL": "DEBUG",
        })  # fmt: skip
        env.update(self.replica_env)
        log = self.workdir / f"replica-{name}-{port}.log"
        with open(log, "wb") as logf:  # noqa: ASYNC230 - a test double; a fork/exec is quick
            proc = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-m", "acx_server"], stdout=subprocess.DEVNULL, stderr=logf,
                pass_fds=(ready_w,), env=env, cwd=self.workdir,
            )  # fmt: skip
        os.close(ready_w)
        line = await asyncio.get_running_loop().run_in_executor(None, _read_line, ready_r)
        if not line:
            proc.wait(10)
            raise RuntimeError(f"replica {name} did not start: {log.read_text()}")
        return proc, port, log, health

    def _app_named(self, name: str) -> dict[str, Any]:
        app = next((a for (_g, n), a in self.state.apps.items() if n == name), None)
        if app is None:  # deleted: its replica's prober is being stopped
            raise asyncio.CancelledError
        return app

    def _probes(self, name: str) -> dict[str, dict[str, Any]]:
        app = self._app_named(name)
        container = app["properties"]["template"]["containers"][0]
        return effective_probes(container, app["properties"]["configuration"]["ingress"]["targetPort"])

    def _local_port(self, replica: Replica, name: str, port: int) -> int:
        """Where a probe of the template's port goes: the replica's own ports stand in for
        the container's (ACX_SERVER_PORT, ACX_HEALTH_PORT)."""
        app = self._app_named(name)
        env = {v["name"]: v.get("value") for v in app["properties"]["template"]["containers"][0].get("env") or []}
        if str(port) == env.get("ACX_HEALTH_PORT"):
            return replica.health
        if str(port) == env.get("ACX_SERVER_PORT") or port == app["properties"]["configuration"]["ingress"]["targetPort"]:
            return replica.upstream
        return port

    async def _probe_once(self, replica: Replica, name: str, probe: dict[str, Any]) -> str | None:
        """None if the probe passes, else what failed."""
        timeout = probe.get("timeoutSeconds", 1) * self.probe_time_scale
        try:
            if "tcpSocket" in probe:
                port = self._local_port(replica, name, probe["tcpSocket"]["port"])
                _r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
                w.close()
                return None
            get = probe["httpGet"]
            port = self._local_port(replica, name, get["port"])
            assert self._session is not None
            async with self._session.get(
                f"http://127.0.0.1:{port}{get['path']}", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                return None if 200 <= resp.status < 400 else f"HTTP {resp.status} from {get['path']}"
        except (OSError, asyncio.TimeoutError, aiohttp.ClientError) as exc:
            return f"{type(exc).__name__} {exc}".strip()

    async def _probe_liveness(self, replica: Replica) -> None:
        """The kubelet's liveness loop for one replica: restart it after failureThreshold
        failures in a row (SIGTERM, then a new process in its place)."""
        failures = 0
        name = replica.name
        await asyncio.sleep(0)  # the PUT that started the replica records the app first
        await asyncio.sleep(self._probes(name)["Liveness"].get("initialDelaySeconds", 0) * self.probe_time_scale)
        while True:
            probe = self._probes(name)["Liveness"]
            await asyncio.sleep(probe.get("periodSeconds", 10) * self.probe_time_scale)
            if replica.proc.poll() is not None:
                continue  # a crashed replica is crash_and_restart's (a test's) business
            failed = await self._probe_once(replica, name, probe)
            failures = failures + 1 if failed else 0
            if failed:
                self.probe_failures.append((name, failed))
            if failures >= probe.get("failureThreshold", 3):
                failures = 0
                await self._respawn(replica, kill=False)
                self.restarts[name] = self.restarts.get(name, 0) + 1

    async def _stop_fleet(self, name: str, hurry: list[Replica] | None = None) -> None:
        """The app is gone (or the endpoint stops): its scaler, ingress and replicas. ``hurry``:
        replicas draining since a scale-in, SIGKILLed too after 15 s (a test is ending)."""
        fleet = self.fleets.pop(name, None)
        if fleet is None:
            return
        if fleet.scaler is not None:
            fleet.scaler.cancel()
            await asyncio.gather(fleet.scaler, return_exceptions=True)
        if fleet.growing:  # let replicas being started finish starting, then stop them with the rest
            await asyncio.gather(*list(fleet.growing), return_exceptions=True)
        runner = self._runners.pop(f"ingress-{name}", None)
        if runner is not None:
            await runner.cleanup()
        for replica in fleet.live():
            self._retire(fleet, replica, 15.0)
        if self._retiring:
            _done, waiting = await asyncio.wait(list(self._retiring), timeout=15)
            for replica in hurry or []:
                if replica.proc.poll() is None:
                    replica.proc.kill()
            if waiting:
                await asyncio.gather(*waiting, return_exceptions=True)
        if fleet.queue is not None:
            await fleet.queue[2].close()

    def _pick(self, fleet: Fleet, now: float) -> Replica | None:
        """A replica of the active revision that is up and not draining, in turn; during a
        swap, before the new revision's replicas are up, the old revision's."""
        up = [r for r in fleet.live() if now - r.created >= self.cold_start and r.proc.poll() is None]
        active = [r for r in up if r.revision == fleet.revision] or up
        if not active:
            return None
        fleet.turn += 1
        return active[fleet.turn % len(active)]

    async def _ingress(self, request: web.Request, name: str) -> web.StreamResponse:
        """Container Apps' ingress: TLS in front of the app's replicas; 503 while none is up
        (a request to an app scaled to zero wakes it)."""
        fleet = self.fleets.get(name)
        call_id = request.headers.get("X-Acx-Call-Id")
        now = time.monotonic()
        if fleet is None:
            return web.Response(status=404, text="no such app")
        fleet.model.arrival()
        replica = self._pick(fleet, now)
        if replica is None:
            if not fleet.live() and not fleet.starting:
                fleet.model.wake()
            self.ingress_hits.append(IngressHit(name, request.path, call_id, 503, now))
            return web.Response(status=503, text="upstream starting", headers={"Retry-After": str(self.retry_after)})
        self.ingress_hits.append(IngressHit(name, request.path, call_id, 200, now))
        replica.inflight += 1
        try:
            return await self._forward(request, replica, now)
        finally:
            replica.inflight -= 1

    async def _forward(self, request: web.Request, replica: Replica, now: float) -> web.StreamResponse:
        assert self._session is not None
        upstream = f"http://127.0.0.1:{replica.upstream}{request.path_qs}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "transfer-encoding")}
        deadline = None if self.ingress_timeout is None else now + self.ingress_timeout
        # Like Envoy's route timeout: an upstream that has not answered in time gets the client a
        # 504 (and loses its connection); an answer still streaming at the deadline is cut; an
        # answer complete in time is delivered.
        ctx = self._session.request(request.method, upstream, data=await request.read(), headers=headers)
        try:
            up = await asyncio.wait_for(ctx.__aenter__(), None if deadline is None else deadline - time.monotonic())
        except asyncio.TimeoutError:
            self.cuts += 1
            return web.Response(status=504, text="upstream request timeout")
        try:
            resp = web.StreamResponse(status=up.status)
            for k in ("Content-Type", "X-Acx-Replica", "Retry-After"):
                if k in up.headers:
                    resp.headers[k] = up.headers[k]
            if up.content_length is not None:
                body = await up.read()  # complete: delivered whatever the time
                resp.content_length = len(body)
                await resp.prepare(request)
                await resp.write(body)
                await resp.write_eof()
                return resp
            await resp.prepare(request)
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                try:
                    chunk = await asyncio.wait_for(up.content.readany(), left)
                except asyncio.TimeoutError:
                    self.cuts += 1
                    if request.transport is not None:
                        request.transport.abort()  # the client sees a cut stream
                    return resp
                if not chunk:
                    break
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        finally:
            await ctx.__aexit__(None, None, None)


async def _end(proc: subprocess.Popen[bytes], *, kill: bool = False, grace: float = 15.0) -> None:
    """SIGKILL, or SIGTERM and ``grace`` seconds to drain (then SIGKILL); wait for the process."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    try:
        await asyncio.get_running_loop().run_in_executor(None, proc.wait, grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386 JSON Merge Patch, in place: null removes a key, objects merge, the rest replaces."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge_patch(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


def _version() -> str:
    from async_ca_exec import __version__

    return __version__


def _read_line(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as f:
        return f.readline()


class StaticToken:
    """An azure-core async TokenCredential that hands out the test endpoint's token."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.requests = 0
        self.closed = False

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        self.requests += 1
        return AccessToken(self.token, int(time.time()) + 3600)

    async def close(self) -> None:
        self.closed = True

    async def __aenter__(self) -> StaticToken:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
