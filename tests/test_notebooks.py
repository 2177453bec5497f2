"""The notebooks in examples/notebooks run top to bottom in a real Jupyter kernel, on the local runtime.

Each test executes one notebook with nbclient in a kernel of this interpreter, checks what its
cells printed, and checks that the kernel and every process started inside it (the local
runtime's servers and workers) are gone once the kernel has been shut down.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import nbformat
import psutil  # an ipykernel dependency
import pytest
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from conftest import children, wait_gone

NOTEBOOKS = Path(__file__).resolve().parent.parent / "examples" / "notebooks"


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


class ProcessWatch:
    """Records every process started under this one while it runs (orphans included: a process
    that outlives its parent leaves our tree, so the tree is sampled, not only looked at after)."""

    def __init__(self) -> None:
        self.before = children(os.getpid())
        self.seen: dict[int, list[str]] = {}
        self.parents: dict[int, int] = {}
        self.listening: dict[int, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.02)

    def sample(self) -> None:
        for pid in children(os.getpid()) - self.before:
            argv = cmdline(pid)  # read each time: a child's is its parent's until it calls exec
            if argv:
                self.seen[pid] = argv
            try:
                proc = psutil.Process(pid)
                self.parents.setdefault(pid, proc.ppid())
                conns = proc.net_connections(kind="inet")
            except psutil.Error:
                continue
            addrs = {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
            self.listening.setdefault(pid, set()).update(addrs)

    def named(self, word: str) -> set[int]:
        return {pid for pid, argv in self.seen.items() if any(word in a for a in argv)}


def run_notebook(
    name: str, tmp_path: Path, *, shutdown: str = "graceful", extra_env: dict[str, str] | None = None
) -> tuple[Any, ProcessWatch]:
    """Execute examples/notebooks/``name`` in its directory; return it with its outputs, and the processes seen."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACX_", "AZURE_"))}
    env.update(extra_env or {})
    env["HOME"] = str(tmp_path)  # no user config file; IPython's profile goes here, not to the real home
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "jupyter-runtime")
    # ipykernel's own "python3" kernelspec: its argv starts with "python", which jupyter_client
    # replaces with sys.executable, so the kernel runs this interpreter (and this venv's packages).
    km = AsyncKernelManager(kernel_name="python3", connection_file=str(tmp_path / "kernel.json"))
    assert km.ip == "127.0.0.1" and km.transport == "tcp"  # the kernel's ports are on loopback
    client = NotebookClient(
        nb, km=km, timeout=120, kernel_name="python3", shutdown_kernel=shutdown,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )  # fmt: skip
    with ProcessWatch() as watch:
        client.execute(env=env, cleanup_kc=True)  # shut the kernel down, on failure too
    assert not km.has_kernel
    # The kernel is this process's child; a child the kernel forks carries the kernel's argv
    # until it calls exec, and one sampled only then must not count as a second kernel.
    kernels = {pid for pid in watch.named("ipykernel_launcher") if watch.parents.get(pid) == os.getpid()}
    assert len(kernels) == 1, watch.seen
    assert watch.seen[next(iter(kernels))][0] == sys.executable
    servers = watch.named("acx_server")
    assert servers, f"the notebook started no local runtime: {watch.seen}"
    left = wait_gone(set(watch.seen), timeout=20)
    for pid in left:  # stop them (this test started them), then fail
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"left running after the kernel exited: {[(p, watch.seen[p]) for p in sorted(left)]}"
    listening = {pid: addrs for pid, addrs in watch.listening.items() if addrs}
    assert all(addrs <= {"127.0.0.1"} for addrs in listening.values()), listening
    assert any(pid in kernels for pid in listening), "the kernel was never seen listening"
    return nb, watch


def outputs(nb: Any) -> list[dict[str, Any]]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]


def printed(nb: Any) -> list[str]:
    """Every line the cells wrote to stdout, in order."""
    text = "".join(o["text"] for o in outputs(nb) if o["output_type"] == "stream" and o["name"] == "stdout")
    return text.splitlines()


def stderr_of(nb: Any) -> str:
    return "".join(o["text"] for o in outputs(nb) if o["output_type"] == "stream" and o["name"] == "stderr")


def assert_clean(nb: Any) -> None:
    assert [o for o in outputs(nb) if o["output_type"] == "error"] == []
    stderr = stderr_of(nb)
    for noise in ("Traceback", "Warning", "Exception ignored", "Error"):
        assert noise not in stderr, stderr


def test_async_quickstart_notebook_awaits_at_top_level(tmp_path: Path) -> None:
    t = time.monotonic()
    nb, _ = run_notebook("async_quickstart.ipynb", tmp_path)
    assert_clean(nb)
    lines = printed(nb)
    assert len(lines) == 3, lines
    assert ast.literal_eval(lines[0]) == [x * x for x in range(20)]
    assert re.fullmatch(r"20 calls succeeded in \d+\.\d\d s", lines[1]), lines[1]
    assert lines[2] == str(sum(x * x for x in range(100)))
    [summary] = [o for o in outputs(nb) if o["output_type"] == "execute_result"]
    calls = ast.literal_eval(summary["data"]["text/plain"])["calls"]
    assert calls["succeeded"] == 20 and calls["failed"] == 0
    assert time.monotonic() - t < 120


@pytest.mark.parametrize("shutdown", ["graceful", "immediate"])
def test_lithops_facade_notebook_inside_a_running_loop(tmp_path: Path, shutdown: str) -> None:
    """The facade's blocking calls in cells run on the kernel's running loop; the notebook leaves
    its FunctionExecutor open, so the kernel's exit (a shutdown request, or SIGKILL when
    ``immediate``) is what must stop the local runtime."""
    nb, _ = run_notebook("lithops_facade.ipynb", tmp_path, shutdown=shutdown)
    assert_clean(nb)
    lines = printed(nb)
    assert lines[:6] == [
        "an event loop is running in this kernel: True",
        "10",
        "[8, 9, 10]",
        str(sum(x + 7 for x in range(10))),
        "[7, 8, 9, 10, 11]",
        "[17, 27]",
    ], lines
    calls = ast.literal_eval(lines[6])
    assert calls["succeeded"] == 1 + 3 + (10 + 1) + 5 and calls["failed"] == 0, calls
    assert len(lines) == 7, lines


WITHOUT_IPYWIDGETS = """
import sys
sys.modules["ipywidgets"] = None  # `import ipywidgets` now fails, as in the default install
"""


@pytest.mark.parametrize("name", ["async_quickstart.ipynb", "lithops_facade.ipynb"])
def test_without_ipywidgets_progress_is_the_text_bar_and_nothing_else(tmp_path: Path, name: str) -> None:
    """The default install has no ipywidgets: tqdm's notebook bar cannot be drawn, and trying
    left 'Exception ignored in: <function tqdm.__del__>' in the cell's stderr for every bar."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(WITHOUT_IPYWIDGETS)
    path = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    nb, _ = run_notebook(name, tmp_path, extra_env={"PYTHONPATH": path})
    assert_clean(nb)
    bars = [o for o in outputs(nb) if o["output_type"] == "display_data"]
    assert not bars, bars  # no widget
    assert re.search(r"(map|get_result): 100%\|.*\| \d+/\d+ ", stderr_of(nb)), stderr_of(nb)  # the text bar instead


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_every_notebook_is_tested_and_stored_without_outputs(name: str) -> None:
    assert name in {"async_quickstart.ipynb", "lithops_facade.ipynb"}, f"examples/notebooks/{name} has no test"
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4 and nb.metadata.kernelspec.name == "python3"
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    assert nb.cells[0].cell_type == "markdown" and "jupyter execute examples/notebooks/" + name in nb.cells[0].source
