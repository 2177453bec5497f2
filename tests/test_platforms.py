"""Platforms: the client and the local runtime use nothing Linux-only without a fallback.

Our users run notebooks on macOS. The runtime's own test (tests/test_local_runtime.py) runs it
with SO_REUSEPORT and prctl taken away; this module checks the source: the client package uses
no Linux-only call at all, and the server package only where a listed fallback covers it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Names (attributes, or text in string constants) that exist only on Linux, or behave
#: differently elsewhere (SO_REUSEPORT on macOS does not spread connections).
LINUX_ONLY = {
    "sched_getaffinity", "sched_setaffinity", "memfd_create", "eventfd", "pidfd_open", "splice", "copy_file_range",
    "posix_fadvise", "posix_fallocate", "pipe2", "epoll", "prctl", "SO_REUSEPORT", "TCP_QUICKACK", "TCP_USER_TIMEOUT",
    "SO_BINDTODEVICE", "MSG_NOSIGNAL", "SOCK_NONBLOCK", "SOCK_CLOEXEC", "SIGRTMIN", "/proc/", "/sys/fs/cgroup",
}  # fmt: skip

#: Where the server package uses one, and what covers the other platforms.
SERVER_FALLBACKS = {
    ("settings.py", "sched_getaffinity"): "AttributeError -> os.cpu_count()",
    ("settings.py", "/sys/fs/cgroup"): "OSError -> no quota / the machine's memory",
    ("settings.py", "SO_REUSEPORT"): "only asked for by ACX_SERVER_REUSE_PORT, refused with a message where missing",
    ("server.py", "SO_REUSEPORT"): "only with ACX_SERVER_REUSE_PORT (the local runtime shares one socket instead)",
    ("worker.py", "prctl"): "returns False off Linux: a thread watching getppid() ends the worker instead",
    ("worker.py", "/proc/"): "oom_score_adj: OSError ignored (only matters under a container's memory limit)",
    ("ipc.py", "memfd_create"): "getattr(os, 'memfd_create', None) -> an unlinked temporary file",
    ("pool.py", "/proc/"): "the per-worker memory limit reads /proc only on Linux (memory_limit is 0 elsewhere)",
}


def uses(path: Path) -> set[str]:
    """The Linux-only names a module's code refers to (attributes, names, strings; not comments)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        words: list[str] = []
        if isinstance(node, ast.Attribute):
            words = [node.attr]
        elif isinstance(node, ast.Name):
            words = [node.id]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            words = [node.value]
        for w in words:
            found |= {name for name in LINUX_ONLY if name == w or (name.startswith("/") and name in w)}
    return found


def docstrings_only(path: Path, name: str) -> bool:
    """``name`` appears in the module only inside docstrings (prose about the platform)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None and node.body:
                node.body[0] = ast.Pass()  # drop the docstring, keep the code
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == name:
            return False
        if isinstance(node, ast.Name) and node.id == name:
            return False
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and name in node.value:
            return False
    return True


def test_the_client_package_uses_nothing_linux_only() -> None:
    offenders = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / "async_ca_exec").rglob("*.py"))
        for name in uses(path)
        if not docstrings_only(path, name)
    }
    assert not offenders, f"Linux-only calls in the client (macOS users run it): {sorted(offenders)}"


def test_the_server_uses_linux_only_calls_only_where_a_fallback_is_listed() -> None:
    seen = {
        (path.name, name)
        for path in sorted((ROOT / "container").glob("*.py"))
        for name in uses(path)
        if not docstrings_only(path, name)
    }
    unlisted = seen - set(SERVER_FALLBACKS)
    assert not unlisted, f"Linux-only calls without a fallback listed in SERVER_FALLBACKS: {sorted(unlisted)}"
    stale = set(SERVER_FALLBACKS) - seen
    assert not stale, f"SERVER_FALLBACKS lists uses that are gone: {sorted(stale)}"
