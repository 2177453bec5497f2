"""Shared fixtures: real runtimes, real server processes, process-tree inspection.

Everything a test starts binds 127.0.0.1 and is stopped by the fixture that started it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from arm_endpoint import ArmEndpoint

from async_ca_exec import AsyncExecutor

REPO = Path(__file__).resolve().parent.parent


def children(pid: int) -> set[int]:
    """All live descendants of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: set[int], timeout: float = 15.0) -> set[int]:
    """Wait until none of ``pids`` is alive; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    left = {p for p in pids if alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = {p for p in left if alive(p)}
    return left


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def ex() -> AsyncIterator[AsyncExecutor]:
    """A started executor on a local runtime of 2 replicas x 2 workers."""
    async with AsyncExecutor(config={"localhost": {"replicas": 2, "worker_processes": 2}}) as executor:
        yield executor


class ServerProcess:
    """One ``python -m acx_server`` process with a known key, for protocol-level tests."""

    def __init__(self, key: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.key = key.encode()
        self.port = port
        self.proc = proc
        self.log = log
        self.url = f"http://127.0.0.1:{port}"


def start_server(tmp: Path, *, workers: int = 1, extra_env: dict[str, str] | None = None) -> ServerProcess:
    key = secrets.token_urlsafe(32)
    port = free_port()
    ready_r, ready_w = os.pipe()
    log = tmp / f"server-{port}.log"
    env = dict(os.environ)
    env.update(
        {
            "ACX_HMAC_KEY": key,
            "ACX_SERVER_HOST": "127.0.0.1",
            "ACX_SERVER_PORT": str(port),
            "ACX_WORKER_PROCESSES": str(workers),
            "ACX_READY_FD": str(ready_w),
            "ACX_REPLICA_ID": "test-replica",
            "ACX_SHUTDOWN_GRACE": "2",
            "ACX_LOG_LEVEL": "INFO",
        }
    )
    env.update(extra_env or {})
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "acx_server"],
            stdout=subprocess.DEVNULL,
            stderr=logf,
            pass_fds=(ready_w,),
            env=env,
            cwd=tmp,
        )
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as r:
        line = r.readline()
    if not line:
        proc.wait(10)
        raise RuntimeError(f"server did not start: {log.read_text()}")
    assert json.loads(line)["port"] == port
    return ServerProcess(key, port, proc, log)


@pytest.fixture(scope="module")
def quick_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One replica server for a test module: one worker, refused requests answered at once."""
    s = start_server(tmp_path_factory.mktemp("server"), workers=1, extra_env={"ACX_AUTH_DELAY": "0"})
    try:
        yield s
    finally:
        stop_server(s)


def stop_server(server: ServerProcess) -> None:
    kids = children(server.proc.pid)
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    assert not wait_gone(kids), "server left worker processes behind"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    s = start_server(tmp_path, workers=2)
    try:
        yield s
    finally:
        stop_server(s)


#: Python source defining tree(pid) -> set of descendant pids, for scripts run by tests.
TREE_SNIPPET = """
import os as _os
def tree(pid):
    parents = {}
    for e in _os.listdir('/proc'):
        if e.isdigit():
            try:
                f = open('/proc/%s/stat' % e).read().rsplit(')', 1)[1].split()
            except OSError:
                continue
            parents.setdefault(int(f[1]), []).append(int(e))
    out, todo = set(), [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            if c not in out:
                out.add(c); todo.append(c)
    return out
"""


AZURITE_VERSION = "3.35.0"
#: Azurite's well-known development account (public, documented by Microsoft; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_executable() -> Path:
    """Azurite's blob server: where nox installed it, or installed here with npm on first use."""
    configured = os.environ.get("AZURITE_BLOB_EXECUTABLE")
    if configured:
        return Path(configured)
    root = REPO / ".azurite"
    exe = root / "node_modules" / ".bin" / "azurite-blob"
    if not exe.exists():
        subprocess.run(
            ["npm", "install", "--prefix", str(root), f"azurite@{AZURITE_VERSION}", "--no-audit", "--no-fund", "--silent"],
            check=True,
            timeout=600,
        )
    return exe


class Azurite:
    """Azurite's blob and queue servers on free loopback ports, their data in memory."""

    def __init__(self, workdir: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = self._serve(workdir, azurite_executable(), "blob")
        self.queue_port = self._serve(workdir, azurite_executable().with_name("azurite-queue"), "queue")
        self.endpoint = f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"
        self.queue_endpoint = f"http://127.0.0.1:{self.queue_port}/{AZURITE_ACCOUNT}"
        self.connection_string = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={self.endpoint};QueueEndpoint={self.queue_endpoint};"
        )

    def _serve(self, workdir: Path, exe: Path, service: str) -> int:
        port = free_port()
        self.log = log = workdir / f"azurite-{service}-{port}.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                [str(exe), f"--{service}Host", "127.0.0.1", f"--{service}Port", str(port),
                 "--inMemoryPersistence", "--skipApiVersionCheck", "--loose", "--disableTelemetry", "--silent"],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Azurite did not start: {log.read_text(errors='replace')}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """Azurite for the whole session (each test uses its own container)."""
    server = Azurite(tmp_path_factory.mktemp("azurite"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def container(request: pytest.FixtureRequest) -> str:
    """A container name of this test's own (3-63 lowercase letters, digits, hyphens)."""
    import hashlib

    return "t-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]


def storage_config(azurite: Azurite, container: str, **lithops: object) -> dict[str, object]:
    """A config dict using Azurite for storage and the local runtime for calls."""
    return {
        "lithops": {"storage": "azure_storage", **lithops},
        "azure_storage": {"connection_string": azurite.connection_string, "container": container},
    }


def run_python(
    code: str, *, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet in a fresh interpreter (a user's script)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


_LOOPBACK = ("127.0.0.1", "::1", "localhost")
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _guard(address: object) -> None:
    if isinstance(address, tuple) and address and address[0] not in _LOOPBACK:
        raise OSError(f"a test tried to reach {address!r}: tests may only use 127.0.0.1")


def _guarded_connect(self: socket.socket, address: object) -> None:
    _guard(address)
    return _real_connect(self, address)  # type: ignore[arg-type]


def _guarded_connect_ex(self: socket.socket, address: object) -> int:
    _guard(address)
    return _real_connect_ex(self, address)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reaches any address but loopback (the managed-identity endpoint included)."""
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect_ex)


@pytest.fixture(autouse=True)
def _no_leaked_processes() -> Iterator[None]:
    """Every process a test starts is stopped by that test."""
    before = children(os.getpid())
    yield
    leaked = wait_gone(children(os.getpid()) - before, timeout=15)
    assert not leaked, f"processes left running by this test: {sorted(leaked)}"


@pytest.fixture
def arm(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, azurite: Azurite, container: str
) -> Iterator[ArmEndpoint]:
    """The ARM test double (tests/arm_endpoint.py), paired with this test's Azurite container;
    runtime metadata is cached in this test's directory. ``@pytest.mark.ingress_timeout(s)``:
    its ingress cuts requests after ``s`` seconds, as Container Apps' does after 240."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cut = request.node.get_closest_marker("ingress_timeout")
    endpoint = ArmEndpoint(tmp_path, ingress_timeout=cut.args[0] if cut else None).start()
    endpoint.storage = (azurite, container)
    try:
        yield endpoint
    finally:
        endpoint.stop()


def nap_noting_replica(x: float, path: str) -> float:
    """Note the replica serving this call (the worker's parent) as the call starts, then sleep."""
    with open(path, "a") as f:
        f.write(f"{os.getppid()}\n")
    time.sleep(x)
    return x


async def replica_with_a_running_call(path: Path, pids: list[int]) -> int:
    """A replica pid that is running a call now: the kernel spreads connections, so pids[0] may be idle."""
    for _ in range(600):
        noted = [int(line) for line in path.read_text().split()] if path.exists() else []
        running = [pid for pid in noted if pid in pids]
        if running:
            return running[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no call started on any of the replicas {pids} within 30 s")


def first_run(path: str, name: str) -> bool:
    """True for the first process to ask for ``name`` under ``path`` (an O_CREAT | O_EXCL marker):
    lets a call behave differently on its first attempt (a straggler, say)."""
    try:
        os.close(os.open(Path(path, name), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True
