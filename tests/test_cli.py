"""The `acx` command and `python -m async_ca_exec`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from arm_endpoint import ArmEndpoint
from test_azure import _cli, config, default_image

from async_ca_exec import __version__ as acx_version
from async_ca_exec import cli, configdoc


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


def test_runtime_list_json_on_the_local_backend(tmp_path: Path) -> None:
    r = acx("runtime", "list", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (doc,) = json.loads(r.stdout)
    assert doc["runtime"] == "local" and doc["replicas"] >= 1 and doc["workers_per_replica"] >= 1


@pytest.mark.parametrize("module", [True, False], ids=["python -m async_ca_exec", "acx"])
def test_config_reference_prints_the_generated_reference(tmp_path: Path, module: bool) -> None:
    r = acx("config", "reference", cwd=tmp_path, module=module)
    assert r.returncode == 0, r.stderr
    assert r.stdout == configdoc.render()
    assert "### `azure_containers`" in r.stdout and "| `runtime_memory` |" in r.stdout


def test_a_task_group_error_is_reported_by_its_first_inner_error() -> None:
    group = Exception("unhandled errors in a TaskGroup (2 sub-exceptions)")  # an ExceptionGroup, also on 3.10
    group.exceptions = (ValueError("the real cause\nmore detail"), KeyError("x"))  # type: ignore[attr-defined]
    assert cli._one_line(group) == "the real cause"
    assert cli._one_line(RuntimeError()) == "RuntimeError"


# -- against the ARM test double (tests/arm_endpoint.py) ---------------------------------------


def test_deploy_shows_its_steps_on_stderr_and_list_prints_an_aligned_table(arm: ArmEndpoint, tmp_path: Path) -> None:
    seed = ["-c", str(config(arm, tmp_path))]
    r = _cli("runtime", "deploy", "default", *seed, tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    image = default_image(arm)
    # stdout: the result only; stderr: one line per step, in order, then the time it took
    assert r.stdout.splitlines() == [AnyStr(rf"deployed runtime {re.escape(image)} \(512 MB\) as acx-\S+: https://\S+")]
    steps = r.stderr.splitlines()
    expected = [
        rf"checking that {re.escape(image)} is in its registry \.\.\.",
        rf"creating Container App acx-\S+ for runtime {re.escape(image)} \(512 MB\) \.\.\.",
        r"acx-\S+ is succeeded at https://\S+",
        r"waiting for the first replica of acx-\S+ to answer \(up to 30 s, startup_timeout\) \.\.\.",
        r"recorded runtime metadata in .*\.json",
        r"recorded runtime metadata in blob .*\.json",
        r"ready in \d+ s",
    ]
    assert steps == [AnyStr(p) for p in expected], r.stderr

    r = _cli("runtime", "list", *seed, tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    columns = ["RUNTIME", "MEMORY", "VERSION", "APP", "FQDN", "STATE", "REPLICAS", "MAX"]
    assert header.split() == columns and len(rows) == 1
    starts = [header.index(c) for c in columns]
    assert [rows[0][s - 1 : s] for s in starts[1:]] == [" "] * (len(columns) - 1)  # a gap before each column
    cells = [rows[0][a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    assert cells[:3] == [image, "512", acx_version] and cells[3].startswith("acx-") and cells[5:] == ["Succeeded", "1", "100"]

    r = _cli("runtime", "list", "--json", *seed, tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    (doc,) = json.loads(r.stdout)
    assert doc["runtime"] == image and doc["memory"] == 512 and doc["app"] == cells[3] and doc["replicas"] == 1
    assert doc["fqdn"] == cells[4] and doc["max_replicas"] == 100

    r = _cli("clean", *seed, tmp=tmp_path)
    assert r.returncode == 0 and "deleted 1 runtime(s)" in r.stdout, r.stderr
    assert f"deleting Container App {cells[3]} ..." in r.stderr.splitlines()
    r = _cli("runtime", "list", *seed, tmp=tmp_path)
    assert r.stdout.splitlines()[1] == "(no runtimes in resource group rg-acx)"
    assert json.loads(_cli("runtime", "list", "--json", *seed, tmp=tmp_path).stdout) == []


def test_an_azure_error_is_one_line_and_debug_adds_the_traceback(arm: ArmEndpoint, tmp_path: Path) -> None:
    seed = ["-c", str(config(arm, tmp_path, azure_containers={"environment": "nowhere"}))]
    r = _cli("runtime", "deploy", "default", *seed, tmp=tmp_path)
    assert r.returncode == 1
    *_steps, last = r.stderr.splitlines()
    assert last.startswith("acx: error: Container Apps environment 'nowhere' does not exist in resource group 'rg-acx'")
    assert "--create-environment" in last and "Traceback" not in r.stderr and r.stdout == ""
    r = _cli("runtime", "deploy", "default", *seed, "--debug", tmp=tmp_path)
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr and "ConfigError" in r.stderr
    assert r.stderr.splitlines()[-1] == last


class AnyStr(str):
    """Equal to any string the regular expression matches in full (readable list comparisons)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and re.fullmatch(str(self), other) is not None

    __hash__ = str.__hash__


# -- what a new user meets first (issue 13) ---------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["runtime", "deploy", "default", "--memory", "1000"], "--memory 1000 is not allowed: choose one of 512, 1024"),
        (["runtime", "deploy", "default", "--timeout", "-5"], "--timeout -5 is not allowed"),
        (["runtime", "deploy", "default", "--timeout", "nan"], "--timeout nan is not allowed"),
        (["-b", "nope", "runtime", "list"], "lithops.backend='nope' is not known: use 'local'"),
        (["clean", "-b", "nope"], "lithops.backend='nope' is not known"),
        (["hello", "-s", "nowhere"], "lithops.storage='nowhere' is not known"),
    ],
)
def test_a_value_no_backend_accepts_fails_even_on_the_local_backend(tmp_path: Path, args: list[str], message: str) -> None:
    r = acx(*args, cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert r.stderr.startswith("acx: error: ") and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_valid_deploy_options_on_the_local_backend_say_there_is_nothing_to_deploy(tmp_path: Path) -> None:
    r = acx("runtime", "deploy", "default", "--memory", "1024", "--timeout", "60", cwd=tmp_path)
    assert r.returncode == 0 and "the local backend needs no 'deploy'" in r.stdout and "-b azure" in r.stdout


@pytest.mark.parametrize("args", [["-c", "{missing}", "hello"], ["hello", "-c", "{missing}"],
                                  ["runtime", "list", "-c", "{missing}"], ["-c", "{missing}", "clean"],
                                  ["-c", "{missing}", "runtime", "deploy", "default"]])  # fmt: skip
def test_a_config_file_that_does_not_exist_fails_naming_the_option(tmp_path: Path, args: list[str]) -> None:
    missing = str(tmp_path / "typo.yaml")
    r = acx(*[a.format(missing=missing) for a in args], cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"acx: error: config file {missing} (from -c/--config) does not exist; fix the path or drop -c/--config\n"


def test_a_config_file_is_read_wherever_the_option_stands(tmp_path: Path) -> None:
    cfg = tmp_path / "acx.yaml"
    cfg.write_text("localhost:\n  replicas: 3\n  worker_processes: 2\n")
    for args in (["-c", str(cfg), "runtime", "list", "--json"], ["runtime", "-c", str(cfg), "list", "--json"],
                 ["runtime", "list", "--json", "-c", str(cfg)]):  # fmt: skip
        r = acx(*args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)[0]["replicas"] == 3, args


def test_config_reference_refuses_options_it_would_ignore(tmp_path: Path) -> None:
    r = acx("-c", "x.yaml", "config", "reference", cwd=tmp_path)
    assert r.returncode == 2 and "drop -c" in r.stderr and r.stdout == ""


def test_cli_warnings_are_one_acx_warning_line(tmp_path: Path) -> None:
    cfg = tmp_path / "lithops.yaml"
    cfg.write_text("aws_lambda:\n  region: eu-west-1\nlithops:\n  backend: localhost\n")
    r = acx("runtime", "list", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == (
        f"acx: warning: config section 'aws_lambda' (config file {cfg}) belongs to another Lithops backend and is ignored\n"
    )


def test_missing_azure_settings_name_the_file_looked_at_and_where_each_value_may_come_from(tmp_path: Path) -> None:
    r = acx("runtime", "list", "-b", "azure", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "azure.subscription_id (from the config's azure or azure_containers section, or $AZURE_SUBSCRIPTION_ID)" in r.stderr
    assert "azure.resource_group (from the config's azure or azure_containers section)" in r.stderr
    assert "$ACX_CONFIG_FILE is unset and ~/.config/async-ca-exec/config.yaml does not exist" in r.stderr
    cfg = tmp_path / "acx.yaml"
    cfg.write_text("azure:\n  subscription_id: 00000000-0000-0000-0000-000000000001\n")
    r = acx("runtime", "list", "-b", "azure", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 1 and f"looked at: config file {cfg}" in r.stderr and "subscription_id (" not in r.stderr


def test_no_azure_credential_is_one_line_and_debug_shows_the_chain(tmp_path: Path) -> None:
    cfg = tmp_path / "acx.yaml"
    cfg.write_text(
        "lithops: {backend: azure_containers}\n"
        "azure: {subscription_id: 00000000-0000-0000-0000-000000000001, resource_group: rg,\n"
        "        arm_endpoint: 'https://127.0.0.1:9', arm_retries: 0}\n"
    )
    # Developer credentials only: never the managed-identity endpoint (not loopback); no az on PATH.
    env = {"AZURE_TOKEN_CREDENTIALS": "dev", "PATH": str(Path(sys.executable).parent)}
    r = acx_env("runtime", "list", "-c", str(cfg), cwd=tmp_path, env=env)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("acx: error: no Azure credential could be used") and "az login" in r.stderr
    r = acx_env("runtime", "list", "-c", str(cfg), "-d", cwd=tmp_path, env=env)
    assert r.returncode == 1 and "Attempted credentials:" in r.stderr and "AzureCliCredential" in r.stderr


def acx_env(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("ACX_", "AZURE_"))}
    full.update(env, HOME=str(cwd))
    exe = str(Path(sys.executable).with_name("acx"))
    return subprocess.run([exe, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=120)
