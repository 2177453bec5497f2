"""Configuration: one pydantic model tree, Lithops-compatible sections.

Precedence, highest first: constructor arguments, ``ACX_*`` environment variables, the YAML
config file (``config=`` path, ``$ACX_CONFIG_FILE``, ``~/.config/async-ca-exec/config.yaml``)
or a ``config=`` dict, then defaults. A Lithops config file is accepted unchanged: sections
``lithops``, ``localhost``, ``azure``, ``azure_containers`` and ``azure_storage`` are ours;
sections of other Lithops clouds are ignored with a warning; anything else, and any unknown
key inside one of our sections, is a :class:`ConfigError` that names it.
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, field_validator

from .errors import ConfigError

log = logging.getLogger("async_ca_exec.config")

#: runtime_memory values (MB) and the Azure Container Apps CPU/memory pair each maps to.
ALLOWED_MEMORY: tuple[int, ...] = tuple(range(512, 8192 + 1, 512))

BACKEND_ALIASES = {
    "local": "local",
    "localhost": "local",
    "azure": "azure",
    "azure_containers": "azure",
}
STORAGE_ALIASES = {
    "localhost": None,
    "local": None,
    "none": None,
    "azure_storage": "azure_storage",
    "azure": "azure_storage",
}
DEFAULT_CONFIG_PATH = Path("~/.config/async-ca-exec/config.yaml")

#: Sections other Lithops backends use: ignored with a warning so a shared Lithops config works.
FOREIGN_LITHOPS_SECTIONS = frozenset(
    """aws aws_lambda aws_batch aws_ec2 aws_s3 ibm ibm_cf ibm_vpc ibm_cos code_engine gcp
    gcp_functions gcp_cloudrun gcp_batch gcp_storage azure_functions azure_vms k8s knative
    openwhisk aliyun aliyun_fc aliyun_oss oracle oracle_f oracle_oss ceph minio redis
    infinispan infinispan_hotrod swift openstack_swift vm singularity rabbitmq prometheus
    standalone tencent tencent_scf tencent_cos""".split()
)

#: A user-assigned managed identity's full ARM resource id (ARM ids are case-insensitive).
USER_ASSIGNED_IDENTITY_RE = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.ManagedIdentity/userAssignedIdentities/[^/]+$",
    re.IGNORECASE,
)

MEMORY_HELP = f"choose one of {', '.join(str(m) for m in ALLOWED_MEMORY)} (MB, in steps of 512)"


def memory_pair(mb: int) -> tuple[float, str]:
    """vCPUs and memory string Azure Container Apps pairs with ``runtime_memory`` MB."""
    if mb not in ALLOWED_MEMORY:
        raise ConfigError(f"runtime_memory={mb} is not allowed: {MEMORY_HELP}")
    return mb / 512 * 0.25, f"{mb / 1024:g}Gi"


def _check_memory(v: int | None) -> int | None:
    if v is not None and v not in ALLOWED_MEMORY:
        raise ValueError(f"runtime_memory={v} is not allowed: {MEMORY_HELP}")
    return v


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class LithopsSection(_Section):
    """General settings (Lithops' ``lithops`` section, plus ours)."""

    backend: str = Field("local", description="`local` (alias `localhost`) or `azure` (alias `azure_containers`).")
    storage: str | None = Field(
        None,
        description="`azure_storage` for Azure Blob; `localhost` for none (calls carry their data inline); unset: "
        "Blob when the azure_storage section is complete (a connection string, a name and key, or an account URL).",
    )
    execution_timeout: float | None = Field(
        None, gt=0, description="Per-call timeout in seconds (the `timeout` argument). Default: the backend's runtime_timeout."
    )
    max_concurrency: int | None = Field(
        None, ge=1, le=100_000, description="Most calls in flight at once. Default: 1,000 on Azure, 64 locally."
    )
    retries: int = Field(
        4, ge=0, le=100, description="Delivery retries per request (network errors, 5xx, 429); user errors are never re-run."
    )
    chunksize: int | Literal["auto"] = Field(
        "auto",
        description="Items per request for map/starmap/imap/map_reduce (and the facade's map) when the call gives "
        "none: auto (batches sized from the measured call time; slow calls go one per request), or a number.",
    )

    @field_validator("chunksize", mode="before")
    @classmethod
    def _positive_chunksize(cls, v: Any) -> int | str:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        try:
            n = int(v) if not isinstance(v, (bool, float)) else None
        except (TypeError, ValueError):
            n = None
        if n is None or n < 1:
            raise ValueError(f"chunksize={v!r} must be 'auto' or a whole number of items of at least 1")
        return n

    log_level: str | None = Field(None, description="Level of the `async_ca_exec` logger (DEBUG, INFO, WARNING...).")
    progress: bool | None = Field(
        None,
        description="Progress bars for map/imap/map_reduce/wait/get_result: true, false, or unset for a bar "
        "only on a terminal or in Jupyter.",
    )
    logs: Literal["collect", "stream", "off"] = Field(
        "collect",
        description="Calls' stdout/stderr: collect (in fut.logs), stream (printed as it comes, prefixed with "
        "the call's index), or off (dropped).",
    )
    inline_limit: float = Field(
        4.0, gt=0, description="MiB: arguments, functions and results larger than this go through Blob storage."
    )
    keep_data: bool = Field(False, description="Keep a job's temporary blobs after its results are collected.")
    include_modules: list[str] | None = Field(None, description="Lithops key, accepted; module shipping is automatic.")
    exclude_modules: list[str] | None = Field(None, description="Lithops key, accepted; module shipping is automatic.")
    # Lithops keys accepted for compatibility; they have no effect here.
    mode: str | None = Field(None, description="Lithops key, ignored (derived from backend).")
    monitoring: str | None = Field(None, description="Lithops key, ignored (results stream back directly).")
    monitoring_interval: float | None = Field(None, description="Lithops key, ignored.")
    data_limit: float | bool | None = Field(None, description="Lithops key, ignored.")
    data_cleaner: bool | None = Field(None, description="Lithops key, ignored.")
    log_format: str | None = Field(None, description="Lithops key, ignored.")
    log_stream: str | None = Field(None, description="Lithops key, ignored.")
    log_filename: str | None = Field(None, description="Lithops key, ignored.")
    telemetry: bool | None = Field(None, description="Lithops key, ignored.")
    customized_runtime: bool | None = Field(None, description="Lithops key, ignored.")
    workers: int | None = Field(None, description="Lithops key, ignored (use max_concurrency).")
    backend_type: str | None = Field(None, description="Lithops internal key, ignored.")

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        key = str(v).strip().lower()
        if key not in BACKEND_ALIASES:
            raise ValueError(f"backend={v!r} is not known: use 'local' (alias 'localhost') or 'azure' (alias 'azure_containers')")
        return BACKEND_ALIASES[key]

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v is None:
            return None
        key = str(v).strip().lower()
        if key not in STORAGE_ALIASES:
            raise ValueError(f"storage={v!r} is not known: use 'azure_storage', or 'localhost' for none")
        return STORAGE_ALIASES[key]

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str | None) -> str | None:
        if v is None:
            return None
        name = str(v).upper()
        if name not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"log_level={v!r} is not a level: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return name


class LocalSection(_Section):
    """The embedded local runtime (Lithops' ``localhost`` section; ``local`` is accepted too)."""

    replicas: int | None = Field(
        None, ge=1, le=64, description="Server processes sharing one loopback port. Default: one per 4 CPUs, at least 1."
    )
    worker_processes: int | None = Field(
        None, ge=1, le=1024, description="Worker processes per replica. Default: CPUs / replicas, at least 1."
    )
    runtime: str | None = Field(None, description="Python interpreter for the servers. Default: the client's own.")
    runtime_memory: int | None = Field(
        None, description=f"MB per worker, {ALLOWED_MEMORY[0]}..{ALLOWED_MEMORY[-1]} step 512. Default: no limit."
    )
    runtime_timeout: float = Field(
        3600.0, gt=0, description="Longest call the runtime allows (seconds); default per-call timeout."
    )
    heartbeat: float = Field(5.0, gt=0, description="Seconds between heartbeat frames of a running call.")
    version: int | None = Field(None, description="Lithops key, ignored.")
    max_workers: int | None = Field(None, description="Lithops key, ignored.")

    @field_validator("runtime_memory")
    @classmethod
    def _memory(cls, v: int | None) -> int | None:
        return _check_memory(v)


class AzureSection(_Section):
    """Shared Azure settings (Lithops' ``azure`` section)."""

    subscription_id: str | None = Field(None, description="Subscription id. Default: $AZURE_SUBSCRIPTION_ID.")
    resource_group: str | None = Field(None, description="Resource group holding the Container Apps.")
    region: str | None = Field(None, description="Azure region; `location` is accepted. Default: the environment's.")
    location: str | None = Field(None, description="Alias of region.")
    tenant_id: str | None = Field(None, description="Lithops key; sign-in picks the tenant (az login, AZURE_TENANT_ID).")
    arm_endpoint: str = Field(
        "https://management.azure.com", description="Azure Resource Manager endpoint (other clouds, a test endpoint)."
    )
    ca_bundle: str | None = Field(
        None, description="PEM file of CAs to trust for ARM and the apps' ingress (a corporate proxy, a test endpoint)."
    )
    polling_interval: float = Field(5.0, ge=0, description="Seconds between polls of a long-running ARM operation.")
    arm_retries: int = Field(3, ge=0, le=20, description="Retries of a failed ARM request (network errors, 5xx).")
    operation_timeout: float = Field(
        1800.0,
        gt=0,
        description="Seconds an ARM change may take, waiting out another one under way on the same app (409) included.",
    )


class AzureContainersSection(_Section):
    """Azure Container Apps backend (Lithops' ``azure_containers`` section)."""

    environment: str = Field("acx", description="Container Apps environment name.")
    environment_id: str | None = Field(None, description="Full ARM id of the environment (wins over `environment`).")
    runtime: str | None = Field(
        None, description="Runtime image, e.g. myregistry.azurecr.io/me/rt:1; `default` or unset: the default image."
    )
    runtime_memory: int = Field(512, description="MB per replica: 512..8192 step 512 (0.25 vCPU per 512 MB).")
    runtime_timeout: float = Field(600.0, gt=0, description="Longest call allowed (seconds).")
    max_workers: int = Field(100, ge=1, le=1000, description="maxReplicas of the Container App (at most 1,000).")
    min_workers: int = Field(0, ge=0, le=1000, description="minReplicas (0 lets the app scale to zero).")
    worker_processes: int | None = Field(
        None, ge=1, le=256, description="Worker processes per replica. Default: the replica's vCPUs rounded up."
    )
    startup_timeout: float = Field(
        300.0, gt=0, description="Seconds to keep retrying while the app starts from zero replicas (cold start)."
    )
    ingress_timeout: float = Field(
        240.0, gt=0, description="Seconds after which the ingress cuts a request (longer calls return through Blob)."
    )
    scale_polling_interval: int = Field(
        5,
        ge=1,
        description="Seconds between Container Apps' reads of the demand queue (its pollingInterval; Azure's default is 30).",
    )
    scale_cooldown: int = Field(
        300,
        ge=1,
        description="Seconds without demand before the app scales in to min_workers (its cooldownPeriod; a scale-in "
        "that leaves replicas running follows Azure's fixed 300 s window).",
    )
    demand_queue: bool = Field(
        True,
        description="Tell Container Apps the replicas a job needs through a Storage queue (needs azure_storage with a key).",
    )
    demand_ttl: int = Field(
        120, ge=1, description="Seconds a demand message lives: a client that dies stops asking for replicas this long after."
    )
    builder: Literal["auto", "docker", "podman", "buildah", "acr"] = Field(
        "auto", description="How `acx runtime build` builds: a local engine, or ACR Tasks (auto: the first that works)."
    )
    build_options: list[str] = Field(
        default_factory=list, description="Extra arguments for the engine's build command (e.g. --isolation chroot)."
    )
    base_image: str | None = Field(None, description="Base image for the runtime image (default python:<client's X.Y>-slim).")
    bundle_dependencies: bool = Field(
        False, description="Put the server's dependency wheels in the build context: the build then needs no network."
    )
    docker_server: str | None = Field(None, description="Registry of the runtime image, e.g. myregistry.azurecr.io.")
    docker_user: str | None = Field(None, description="Registry user name.")
    docker_password: SecretStr | None = Field(None, description="Registry password (kept as a Container App secret).")
    registry_identity: str | None = Field(
        None,
        description="Managed identity the app pulls from docker_server with, instead of docker_user / docker_password "
        "(which then serve only this machine's pushes): a user-assigned identity's resource id "
        "(/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>) "
        "with AcrPull on the registry, or `system` (the app's own, which has no AcrPull at its first deploy).",
    )
    core_quota: float | None = Field(
        None,
        gt=0,
        description="Cores the environment may run at once, for the quota checks of deploy and warm(). Default: the "
        "environment's quota as Azure reports it, else 100 (Container Apps' default; 10 on trial subscriptions).",
    )
    resource_group: str | None = Field(None, description="Overrides azure.resource_group.")
    region: str | None = Field(None, description="Overrides azure.region.")
    location: str | None = Field(None, description="Alias of region.")
    subscription_id: str | None = Field(None, description="Overrides azure.subscription_id.")
    price_vcpu_second: float = Field(
        0.000024, ge=0, description="USD per vCPU-second (Consumption plan, active), for job_summary()'s estimated_cost."
    )
    price_gib_second: float = Field(
        0.000003, ge=0, description="USD per GiB-second (Consumption plan, active), for job_summary()'s estimated_cost."
    )
    invoke_pool_threads: int | None = Field(None, description="Lithops key, ignored (invocations are async).")
    trigger: str | None = Field(None, description="Lithops key, ignored (calls go over HTTPS).")
    runtime_include_function: bool | None = Field(None, description="Lithops key, ignored.")

    @field_validator("runtime_memory")
    @classmethod
    def _memory(cls, v: int) -> int:
        _check_memory(v)
        return v

    @field_validator("registry_identity")
    @classmethod
    def _identity(cls, v: str | None) -> str | None:
        if v is None:
            return None
        value = str(v).strip()
        if value.lower() == "system":
            return "system"
        if not USER_ASSIGNED_IDENTITY_RE.match(value):
            raise ValueError(
                f"registry_identity={v!r} is neither `system` nor a user-assigned identity's resource id: use "
                "/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name> "
                "(`az identity show -n <name> -g <rg> --query id -o tsv` prints it), or system"
            )
        return value


class AzureStorageSection(_Section):
    """Azure Blob storage (Lithops' ``azure_storage`` section)."""

    storage_account_name: str | None = Field(None, description="Storage account (with storage_account_key).")
    storage_account_key: SecretStr | None = Field(None, description="Account key; never logged.")
    connection_string: SecretStr | None = Field(None, description="Instead of name and key (Azurite's works too).")
    account_url: str | None = Field(
        None, description="https://<account>.blob.core.windows.net, with sas_token or an Entra credential."
    )
    sas_token: SecretStr | None = Field(None, description="An account or container SAS to use with account_url.")
    blob_endpoint: str | None = Field(
        None, description="Blob endpoint for name+key (another cloud, or Azurite's http://127.0.0.1:10000/devstoreaccount1)."
    )
    container: str | None = Field(None, description="Blob container for job data (default acx-data); created on first use.")
    storage_bucket: str | None = Field(None, description="Lithops name of `container`.")
    max_concurrency: int = Field(16, ge=1, le=256, description="Blob transfers in flight at once.")
    retries: int = Field(2, ge=0, le=10, description="Retries of a failed Blob request.")
    resource_group: str | None = Field(None, description="Lithops key, ignored.")
    region: str | None = Field(None, description="Lithops key, ignored.")


def storage_problem(s: AzureStorageSection) -> str | None:
    """Why an ``azure_storage`` section cannot reach an account (None: it can). A complete
    section is a connection string, an account name and key, or an account URL (with a SAS,
    or the Entra credential)."""
    if s.connection_string is not None or s.account_url:
        return None
    if s.storage_account_name and s.storage_account_key is not None:
        return None
    if s.storage_account_name:
        return (
            f"azure_storage.storage_account_name is set but storage_account_key is not: add `storage_account_key: "
            f"<a key of account {s.storage_account_name}>` under azure_storage:, or `account_url: "
            f"https://{s.storage_account_name}.blob.core.windows.net` to sign in with an Entra credential instead"
        )
    if s.storage_account_key is not None:
        return "azure_storage.storage_account_key is set but storage_account_name is not: add `storage_account_name: <account>`"
    if s.sas_token is not None:
        return "azure_storage.sas_token is set but account_url is not: add `account_url: https://<account>.blob.core.windows.net`"
    return (
        "Blob storage is not configured: set azure_storage.connection_string, or storage_account_name and "
        "storage_account_key, or account_url (with sas_token or an Entra credential)"
    )


class Config(BaseModel):
    """The whole configuration tree."""

    model_config = ConfigDict(extra="forbid")

    lithops: LithopsSection = Field(default_factory=LithopsSection)  # type: ignore[arg-type]
    localhost: LocalSection = Field(default_factory=LocalSection)  # type: ignore[arg-type]
    azure: AzureSection = Field(default_factory=AzureSection)  # type: ignore[arg-type]
    azure_containers: AzureContainersSection = Field(default_factory=AzureContainersSection)  # type: ignore[arg-type]
    azure_storage: AzureStorageSection = Field(default_factory=AzureStorageSection)  # type: ignore[arg-type]

    _source: str = PrivateAttr("defaults")

    @property
    def source(self) -> str:
        """Where the file part came from: a path, "the config dict" or "defaults"."""
        return self._source

    @property
    def looked_at(self) -> str:
        """Where the settings were looked for, for a message about a missing one."""
        if self._source != "defaults":
            return self._source
        return (
            f"no config file: none was given (-c/--config or config=), $ACX_CONFIG_FILE is unset and "
            f"{DEFAULT_CONFIG_PATH} does not exist"
        )

    # -- resolved views ---------------------------------------------------------------

    @property
    def backend(self) -> Literal["local", "azure"]:
        return self.lithops.backend  # type: ignore[return-value]

    @property
    def backend_section(self) -> LocalSection | AzureContainersSection:
        return self.localhost if self.backend == "local" else self.azure_containers

    @property
    def runtime_memory(self) -> int | None:
        return self.backend_section.runtime_memory

    @property
    def storage_off(self) -> bool:
        """``lithops.storage`` says ``localhost`` (Lithops' word for no external storage)."""
        return self.lithops.storage is None and "storage" in self.lithops.model_fields_set

    @property
    def storage_configured(self) -> bool:
        """Blob storage is used: a complete ``azure_storage`` section is enough, unless
        ``lithops.storage`` turns external storage off."""
        return not self.storage_off and storage_problem(self.azure_storage) is None

    def why_no_storage(self) -> str:
        """Why Blob storage is not in use, and the line that would turn it on."""
        if self.storage_off:
            return (
                "lithops.storage is 'localhost' (no external storage) in "
                f"{self._source}; set `storage: azure_storage` under lithops: to use the azure_storage section"
            )
        return storage_problem(self.azure_storage) or "Blob storage is configured"

    @property
    def call_limit(self) -> float | None:
        """Longest call whose result can come back on the HTTP response (None: no limit)."""
        if self.backend != "azure":
            return None
        cut = self.azure_containers.ingress_timeout
        return cut - min(10.0, cut / 4)  # a margin for the request's own way in and out

    @property
    def runtime_timeout(self) -> float:
        """Longest call the runtime allows. On Azure without Blob storage, at most what the
        ingress lets through: a longer call's result could not come back."""
        t = self.backend_section.runtime_timeout
        limit = self.call_limit
        return min(t, limit) if limit is not None and not self.storage_configured else t

    @property
    def call_timeout(self) -> float:
        """Per-call timeout: execution_timeout, capped by the runtime's runtime_timeout."""
        t = self.lithops.execution_timeout
        return self.runtime_timeout if t is None else min(t, self.runtime_timeout)

    @property
    def max_concurrency(self) -> int:
        if self.lithops.max_concurrency is not None:
            return self.lithops.max_concurrency
        return 64 if self.backend == "local" else 1000

    @property
    def retries(self) -> int:
        return self.lithops.retries


# ------------------------------------------------------------------------------------
# loading

#: Environment variables, the setting each one sets, and how to parse it.
ENV_VARS: dict[str, tuple[str, str | None]] = {
    # name: (key, section or None for "the active backend's section")
    "ACX_BACKEND": ("backend", "lithops"),
    "ACX_STORAGE": ("storage", "lithops"),
    "ACX_RUNTIME": ("runtime", None),
    "ACX_RUNTIME_MEMORY": ("runtime_memory", None),
    "ACX_RUNTIME_TIMEOUT": ("runtime_timeout", None),
    "ACX_WORKER_PROCESSES": ("worker_processes", None),
    "ACX_TIMEOUT": ("execution_timeout", "lithops"),
    "ACX_MAX_CONCURRENCY": ("max_concurrency", "lithops"),
    "ACX_RETRIES": ("retries", "lithops"),
    "ACX_LOG_LEVEL": ("log_level", "lithops"),
    "ACX_PROGRESS": ("progress", "lithops"),
    "ACX_LOGS": ("logs", "lithops"),
    "ACX_CHUNKSIZE": ("chunksize", "lithops"),
    "ACX_LOCAL_REPLICAS": ("replicas", "localhost"),
    "ACX_BUILDER": ("builder", "azure_containers"),
}
#: Variables read elsewhere (the config file path) or by the runtime's server; not settings.
OTHER_ENV_VARS = frozenset(
    """ACX_CONFIG_FILE ACX_SERVER_HOST ACX_SERVER_PORT ACX_SERVER_REUSE_PORT ACX_HMAC_KEY
    ACX_HMAC_KEY_STDIN ACX_HEARTBEAT_INTERVAL ACX_MAX_BODY_BYTES ACX_SIGNATURE_WINDOW
    ACX_REPLICA_ID ACX_SHUTDOWN_GRACE ACX_PARENT_FD ACX_READY_FD ACX_FUNCTION_CACHE_BYTES
    ACX_MAX_BLOB_BYTES ACX_HEADER_TIMEOUT ACX_IDLE_TIMEOUT ACX_MIN_BODY_RATE ACX_AUTH_DELAY ACX_REFUSAL_SLOTS ACX_HEALTH_PORT
    ACX_WORKER_MEMORY_MB ACX_LISTEN_FD ACX_LISTEN_SHARED ACX_WORK_DIR""".split()
)
#: Constructor argument -> (key, section or None for the active backend's section).
ARGUMENTS: dict[str, tuple[str, str | None]] = {
    "backend": ("backend", "lithops"),
    "storage": ("storage", "lithops"),
    "runtime": ("runtime", None),
    "runtime_memory": ("runtime_memory", None),
    "runtime_timeout": ("runtime_timeout", None),
    "timeout": ("execution_timeout", "lithops"),
    "max_concurrency": ("max_concurrency", "lithops"),
    "retries": ("retries", "lithops"),
    "progress": ("progress", "lithops"),
    "logs": ("logs", "lithops"),
    "log_level": ("log_level", "lithops"),
    "keep_data": ("keep_data", "lithops"),
}
_SECTION_ALIASES = {"local": "localhost"}
_OUR_SECTIONS = ("lithops", "localhost", "azure", "azure_containers", "azure_storage")
_SECTION_MODELS: dict[str, type[_Section]] = {
    "lithops": LithopsSection,
    "localhost": LocalSection,
    "azure": AzureSection,
    "azure_containers": AzureContainersSection,
    "azure_storage": AzureStorageSection,
}


def _read_file(path: Path, given_by: str) -> dict[str, Any]:
    import yaml

    try:
        text = path.expanduser().read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} (from {given_by}) does not exist; fix the path or drop {given_by}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} (from {given_by}) is a directory; name the YAML file in it") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} (from {given_by}) cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (lithops:, azure_containers:, ...)")
    return data


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's error in one line: what it found, and where (its message spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    if mark is None or problem is None:
        return " ".join(str(exc).split())
    what = f"{context}, {problem}" if context else str(problem)
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}"


def _warn(message: str) -> None:
    """A UserWarning pointing at the user's line: the first frame outside this package, however
    deep in it the warning is raised (AsyncExecutor, FunctionExecutor, Storage, the CLI)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame = sys._getframe(1)
    level = 2  # the stacklevel of the frame that called this function
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, stacklevel=level)


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _normalise(raw: Mapping[str, Any], source: str) -> dict[str, dict[str, Any]]:
    data: dict[str, dict[str, Any]] = {}
    for name, body in raw.items():
        section = _SECTION_ALIASES.get(str(name), str(name))
        if section not in _OUR_SECTIONS:
            if section in FOREIGN_LITHOPS_SECTIONS:
                _warn(f"config section '{name}' ({source}) belongs to another Lithops backend and is ignored")
                continue
            raise ConfigError(
                f"unknown config section '{name}' in {source}; sections are {', '.join(_OUR_SECTIONS)}"
                + _suggest(str(name), list(_OUR_SECTIONS) + list(_SECTION_ALIASES))
            )
        if body is None:
            body = {}
        if not isinstance(body, Mapping):
            raise ConfigError(f"config section '{name}' in {source} must be a mapping of keys")
        if section in data:
            raise ConfigError(f"config sections 'local' and 'localhost' in {source} are the same section; keep one")
        data[section] = dict(body)
    return data


def _parse_env_value(name: str, raw: str) -> Any:
    if raw.strip().lower() in ("true", "yes", "on"):
        return True
    if raw.strip().lower() in ("false", "no", "off"):
        return False
    return raw  # pydantic coerces numbers and reports bad ones


def load_config(
    config: str | os.PathLike[str] | Mapping[str, Any] | Config | None = None,
    *,
    arguments: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    given_by: str = "config=",
    labels: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration from arguments, environment, file/dict and defaults.

    ``given_by`` names how a ``config`` path was given, and ``labels`` how each argument was,
    for messages (the CLI's ``-c/--config``, ``-b/--backend``).

    >>> load_config({"lithops": {"backend": "localhost", "storage": "localhost"}}).backend
    'local'
    """
    if isinstance(config, Config):  # loaded already (the CLI's): only arguments go on top
        given = {k: v for k, v in (arguments or {}).items() if v is not None}
        if not given:
            return config
        merged = load_config(config.model_dump(exclude_unset=True), arguments=given, env={})
        merged._source = config._source
        return merged
    env = os.environ if env is None else env
    sources: dict[tuple[str, str], str] = {}
    if isinstance(config, Mapping):
        file_source = "the config dict"
        data = _normalise(copy.deepcopy(dict(config)), file_source)
    else:
        path: Path | None = None
        if config is not None:
            path = Path(config)
        elif env.get("ACX_CONFIG_FILE"):
            path, given_by = Path(env["ACX_CONFIG_FILE"]), "$ACX_CONFIG_FILE"
        elif DEFAULT_CONFIG_PATH.expanduser().is_file():
            path, given_by = DEFAULT_CONFIG_PATH.expanduser(), "the default path"
        file_source = f"config file {path}" if path else "defaults"
        data = _normalise(_read_file(path, given_by), file_source) if path else {}
    for section, body in data.items():
        for key in body:
            sources[(section, key)] = file_source

    # Lithops' `azure` section is shared: it fills what the backend section leaves unset.
    az = data.get("azure", {})
    if "location" in az and "region" not in az:
        az["region"] = az.pop("location")
    for sec in ("azure_containers", "azure_storage"):
        s = data.get(sec)
        if s is not None and "location" in s and "region" not in s:
            s["region"] = s.pop("location")

    def put(section: str | None, key: str, value: Any, source: str) -> None:
        if section is None:
            section = "localhost" if _backend_of(data) == "local" else "azure_containers"
        data.setdefault(section, {})[key] = value
        sources[(section, key)] = source

    # The backend first (arguments > environment > file): other settings land in its section.
    args = {k: v for k, v in (arguments or {}).items() if v is not None}
    if "backend" in args:
        put("lithops", "backend", args.pop("backend"), _label(labels, "backend"))
    elif env.get("ACX_BACKEND"):
        put("lithops", "backend", env["ACX_BACKEND"], "environment variable ACX_BACKEND")

    # environment beats the file
    for name in sorted(env):
        if not name.startswith("ACX_") or name in OTHER_ENV_VARS or name == "ACX_BACKEND":
            continue
        if name not in ENV_VARS:
            _warn(f"environment variable {name} is not an async_ca_exec setting and is ignored" + _suggest(name, list(ENV_VARS)))
            continue
        key, target = ENV_VARS[name]
        put(target, key, _parse_env_value(name, env[name]), f"environment variable {name}")

    # arguments beat everything
    for name, value in args.items():
        if name not in ARGUMENTS:
            raise ConfigError(f"unknown argument {name!r}" + _suggest(name, list(ARGUMENTS)))
        key, target = ARGUMENTS[name]
        put(target, key, value, _label(labels, name))

    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, sources)) from None
    cfg._source = file_source
    _log_ignored(cfg)
    return cfg


def _label(labels: Mapping[str, str] | None, name: str) -> str:
    return (labels or {}).get(name) or f"the {name} argument"


def _backend_of(data: Mapping[str, Any]) -> str:
    raw = str(data.get("lithops", {}).get("backend", "local")).strip().lower()
    return BACKEND_ALIASES.get(raw, raw)


def _explain(exc: ValidationError, sources: Mapping[tuple[str, str], str]) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        section, key = [*loc, "", ""][:2]
        where = sources.get((section, key), "the configuration")
        if err["type"] == "extra_forbidden":
            model = _SECTION_MODELS.get(section)
            allowed = sorted(model.model_fields) if model else []
            home = [name for name, m in _SECTION_MODELS.items() if name != section and key in m.model_fields]
            if home:
                lines.append(f"key '{key}' in section '{section}' ({where}) belongs in section '{home[0]}': move it there")
                continue
            lines.append(
                f"unknown key '{key}' in section '{section}' ({where}); allowed keys: {', '.join(allowed)}"
                + _suggest(key, allowed)
            )
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = "***" if "password" in key or "key" in key or "connection" in key or "sas" in key else repr(got)
            if msg.startswith(f"{key}="):
                lines.append(f"{section}.{msg} ({where})")
            else:
                lines.append(f"{section}.{key}={shown} ({where}): {msg}")
    return "; ".join(lines)


def _log_ignored(cfg: Config) -> None:
    ignored = [
        name
        for name in (
            "mode",
            "monitoring",
            "monitoring_interval",
            "data_limit",
            "data_cleaner",
            "log_format",
            "log_stream",
            "log_filename",
            "telemetry",
            "customized_runtime",
            "workers",
        )
        if getattr(cfg.lithops, name) is not None
    ]
    if ignored:
        log.debug("Lithops keys without effect here: %s", ", ".join(ignored))


def default_local_layout(cfg: Config, cpus: int | None = None) -> tuple[int, int]:
    """(replicas, worker processes per replica) for the local runtime."""
    cpus = cpus or os.cpu_count() or 1
    # Measured on 2 cores (benchmarks/fanout.py): one replica with 2 workers gives 10.2k calls/s,
    # two replicas with one worker each 8.8k, two with two each 5.7k -- every extra process
    # competes with the client for the CPUs. One server event loop keeps up with ~4 CPUs' worth
    # of workers, so add a replica per 4 CPUs.
    replicas = cfg.localhost.replicas or max(1, cpus // 4)
    workers = cfg.localhost.worker_processes or max(1, math.ceil(cpus / replicas))
    return replicas, workers
