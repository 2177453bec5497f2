"""Server configuration, read from environment variables (the Container App sets them)."""

from __future__ import annotations

import math
import os
import socket
import sys
from dataclasses import dataclass

from async_ca_exec import protocol

#: The shortest HMAC key the server accepts (characters).
MIN_KEY_LENGTH = 32


class SettingsError(ValueError):
    pass


def available_cpus() -> float:
    """vCPUs this process may use: the cgroup CPU quota if there is one, else the CPU set."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return min(cpus, quota) if quota else cpus


def _cgroup_cpu_quota() -> float | None:
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:  # cgroup v2: "max 100000" or "50000 100000"
            q, p = f.read().split()[:2]
            return None if q == "max" else int(q) / int(p)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            q2 = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            p2 = int(f.read())
        return None if q2 <= 0 else q2 / p2
    except (OSError, ValueError):
        return None


def available_memory() -> int:
    """Bytes of memory this process may use: the cgroup limit if there is one, else RAM."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
            if raw != "max" and int(raw) < 1 << 60:
                return int(raw)
        except (OSError, ValueError):
            continue
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 0


@dataclass
class Settings:
    key: bytes
    host: str = "0.0.0.0"
    port: int = 8080
    reuse_port: bool = False
    workers: int = 1
    heartbeat: float = protocol.DEFAULT_HEARTBEAT
    max_body: int = protocol.DEFAULT_MAX_BODY
    max_timeout: float = 3600.0
    signature_window: float = protocol.DEFAULT_SIGNATURE_WINDOW
    replica: str = ""
    shutdown_grace: float = 30.0
    fn_cache_bytes: int = 256 * 1024 * 1024
    max_blob: int = 16 * 1024 * 1024 * 1024
    log_level: str = "INFO"
    #: Seconds a connection may take to send a request's headers (from its first byte, or from
    #: opening), and to stay idle between requests; slower clients are cut (slow-loris).
    header_timeout: float = 15.0
    idle_timeout: float = 75.0
    #: Slowest body upload accepted (bytes/s), on top of header_timeout seconds.
    min_body_rate: float = 256 * 1024
    #: Seconds before a refused request (bad signature, replay) gets its answer and its
    #: connection is closed: a flooder's connections are held, not turned over.
    auth_delay: float = 1.0
    #: Refused requests held at once; at this many the replica stops accepting connections
    #: (they wait in the kernel's queue) until one is answered.
    refusal_slots: int = 1024
    #: A second port answering health probes, never paused by the tarpit (0: none).
    health_port: int = 0
    #: Each worker process's memory limit in bytes (resident set), 0 for none.
    worker_memory: int = 0
    parent_fd: int | None = None
    ready_fd: int | None = None
    #: A listening socket inherited from the process that started this one (the local runtime's
    #: supervisor holds it, so connections wait in its queue while a replica restarts).
    listen_fd: int | None = None
    #: How many replicas accept from ``listen_fd`` (ACX_LISTEN_SHARED): with more than one they
    #: take turns (see server.SHARED_ACCEPT_PAUSE).
    listen_shared: int = 1
    #: Where the workers' working directory is made (default: the system's temporary directory).
    work_dir: str | None = None

    def __repr__(self) -> str:  # never print the key
        return f"Settings(host={self.host!r}, port={self.port}, workers={self.workers}, replica={self.replica!r})"


def _num(env: dict[str, str], name: str, default: float, *, integer: bool = False, minimum: float = 0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise SettingsError(f"{name}={raw!r} is not {kind}") from None
    if not math.isfinite(value) or value < minimum:
        raise SettingsError(f"{name}={raw!r} must be at least {minimum:g}")
    return value


def _default_max_blob() -> int:
    """Largest blob a replica reads into memory: half its memory, at most 16 GiB."""
    return min(16 * 1024**3, available_memory() // 2) or 16 * 1024**3


def from_env(env: dict[str, str] | None = None) -> Settings:
    """Build settings from ``ACX_*`` variables; raises :class:`SettingsError` naming the variable."""
    env = dict(os.environ if env is None else env)
    key_text = env.get("ACX_HMAC_KEY", "")
    if not key_text and env.get("ACX_HMAC_KEY_STDIN") == "1":
        key_text = sys.stdin.readline().strip()
    if not key_text:
        raise SettingsError(
            "no request signing key: set ACX_HMAC_KEY (a Container App secret) or ACX_HMAC_KEY_STDIN=1; "
            "the server refuses to run calls from unauthenticated clients"
        )
    if len(key_text) < MIN_KEY_LENGTH:
        raise SettingsError(f"ACX_HMAC_KEY is too short: use at least {MIN_KEY_LENGTH} random characters")
    cpus = available_cpus()
    workers = int(_num(env, "ACX_WORKER_PROCESSES", 0, integer=True))
    fd = env.get("ACX_PARENT_FD")
    ready = env.get("ACX_READY_FD")
    listen = env.get("ACX_LISTEN_FD")
    reuse_port = env.get("ACX_SERVER_REUSE_PORT", "0") == "1"
    if reuse_port and not hasattr(socket, "SO_REUSEPORT"):
        raise SettingsError(
            "ACX_SERVER_REUSE_PORT=1, but this platform has no SO_REUSEPORT: give the replicas one listening "
            "socket instead (ACX_LISTEN_FD)"
        )
    return Settings(
        key=key_text.encode(),
        host=env.get("ACX_SERVER_HOST", "0.0.0.0"),
        port=int(_num(env, "ACX_SERVER_PORT", 8080, integer=True, minimum=0)),
        reuse_port=reuse_port,
        workers=workers if workers > 0 else max(1, math.ceil(cpus)),
        heartbeat=_num(env, "ACX_HEARTBEAT_INTERVAL", protocol.DEFAULT_HEARTBEAT, minimum=0.05),
        max_body=int(_num(env, "ACX_MAX_BODY_BYTES", protocol.DEFAULT_MAX_BODY, integer=True, minimum=1024)),
        max_timeout=_num(env, "ACX_RUNTIME_TIMEOUT", 3600.0, minimum=0.001),
        signature_window=_num(env, "ACX_SIGNATURE_WINDOW", protocol.DEFAULT_SIGNATURE_WINDOW, minimum=1),
        replica=env.get("ACX_REPLICA_ID") or env.get("CONTAINER_APP_REPLICA_NAME") or socket.gethostname(),
        shutdown_grace=_num(env, "ACX_SHUTDOWN_GRACE", 30.0),
        fn_cache_bytes=int(_num(env, "ACX_FUNCTION_CACHE_BYTES", 256 * 1024 * 1024, integer=True)),
        max_blob=int(_num(env, "ACX_MAX_BLOB_BYTES", _default_max_blob(), integer=True, minimum=1024)),
        log_level=env.get("ACX_LOG_LEVEL", "INFO").upper(),
        header_timeout=_num(env, "ACX_HEADER_TIMEOUT", 15.0, minimum=0.1),
        idle_timeout=_num(env, "ACX_IDLE_TIMEOUT", 75.0, minimum=0.1),
        min_body_rate=_num(env, "ACX_MIN_BODY_RATE", 256 * 1024, minimum=1),
        auth_delay=_num(env, "ACX_AUTH_DELAY", 1.0),
        health_port=int(_num(env, "ACX_HEALTH_PORT", 0, integer=True)),
        refusal_slots=int(_num(env, "ACX_REFUSAL_SLOTS", 1024, integer=True, minimum=1)),
        worker_memory=int(_num(env, "ACX_WORKER_MEMORY_MB", 0, integer=True)) * 1024 * 1024,
        parent_fd=int(fd) if fd else None,
        ready_fd=int(ready) if ready else None,
        listen_fd=int(_num(env, "ACX_LISTEN_FD", 0, integer=True)) if listen else None,
        listen_shared=int(_num(env, "ACX_LISTEN_SHARED", 1, integer=True, minimum=1)),
        work_dir=env.get("ACX_WORK_DIR") or None,
    )
