"""The `acx` command and `python -m async_ca_exec`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def acx(*args: str, cwd: Path, module: bool = False) -> subprocess.CompletedProcess[str]:
    exe = [sys.executable, "-m", "async_ca_exec"] if module else [str(Path(sys.executable).with_name("acx"))]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACX_", "AZURE_"))}
    env["HOME"] = str(cwd)
    return subprocess.run([*exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", [True, False], ids=["python -m async_ca_exec", "acx"])
def test_hello_runs_one_call_end_to_end(tmp_path: Path, module: bool) -> None:
    r = acx("hello", cwd=tmp_path, module=module)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello world! This is async_ca_exec") and "pid" in r.stdout


def test_hello_with_lithops_backend_name(tmp_path: Path) -> None:
    r = acx("hello", "-b", "localhost", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_errors_are_one_line_that_say_what_to_do(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("azure_containers:\n  runtime_memory: 1000\n")
    r = acx("hello", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "512, 1024" in r.stderr and "Traceback" not in r.stderr
    r = acx("hello", "-c", str(cfg), "--debug", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_runtime_list_shows_the_local_runtime(tmp_path: Path) -> None:
    r = acx("runtime", "list", cwd=tmp_path)
    assert r.returncode == 0 and "local" in r.stdout and "PYTHON" in r.stdout


def test_azure_commands_without_azure_settings_say_which_key_is_missing(tmp_path: Path) -> None:
    r = acx("runtime", "deploy", "default", "-b", "azure_containers", cwd=tmp_path)
    assert r.returncode == 1 and "azure.subscription_id" in r.stderr and r.stderr.count("\n") == 1


def test_version_and_help(tmp_path: Path) -> None:
    assert acx("--version", cwd=tmp_path).stdout.startswith("async_ca_exec ")
    assert "runtime" in acx("--help", cwd=tmp_path).stdout
