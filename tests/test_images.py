"""Runtime images: the build context, engine command lines, ACR Tasks, the default image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from arm_endpoint import ArmEndpoint, StaticToken

from async_ca_exec import __version__
from async_ca_exec.config import load_config
from async_ca_exec.errors import ConfigError, DeploymentError
from async_ca_exec.runtimes import azure as az
from async_ca_exec.runtimes import images

from conftest import Azurite

FAKES = Path(__file__).resolve().parent / "fakes"
PASSWORD = "registry-pw-1f2e3d4c"
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


def recorded(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def engine_env(tmp: Path, engine: str = "docker") -> dict[str, str]:
    """PATH with a recording engine first (named ``engine``) and its log file."""
    bindir = tmp / "engine-bin"
    bindir.mkdir(exist_ok=True)
    link = bindir / engine
    if not link.exists():
        link.symlink_to(FAKES / "docker")
    return {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "FAKE_ENGINE_LOG": str(tmp / "engine.log"),
            "ACX_BUILDER": engine}  # fmt: skip


def acx(tmp: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("ACX_", "AZURE_"))}
    full.update(env)
    full["HOME"] = str(tmp)
    exe = str(Path(sys.executable).with_name("acx"))
    return subprocess.run([exe, *args], env=full, capture_output=True, text=True, timeout=600, cwd=tmp)


def write_config(tmp: Path, **azure_containers: Any) -> Path:
    path = tmp / "acx.yaml"
    section = {"docker_server": "myregistry.azurecr.io", "docker_user": "me", "docker_password": PASSWORD}
    section.update(azure_containers)
    path.write_text(yaml.safe_dump({"azure_containers": section}))
    return path


@pytest.mark.parametrize("engine", ["docker", "podman", "buildah"])
def test_build_login_and_push_command_lines_with_the_password_on_stdin(tmp_path: Path, engine: str) -> None:
    cfg = write_config(tmp_path)
    r = acx(tmp_path, "runtime", "build", "myregistry.azurecr.io/me/rt:1", "-c", str(cfg), env=engine_env(tmp_path, engine))
    assert r.returncode == 0, r.stderr
    assert f"built myregistry.azurecr.io/me/rt:1 with {engine} and pushed it" in r.stdout
    build, login, push = recorded(tmp_path / "engine.log")
    context = build["argv"][-1]
    fmt = ["--format", "docker"] if engine == "buildah" else []
    assert build["argv"] == [
        "build", "--platform", "linux/amd64", *fmt, "--build-arg", f"PYTHON_VERSION={PY}",
        "-t", "myregistry.azurecr.io/me/rt:1", "-f", f"{context}/Dockerfile", context,
    ]  # fmt: skip
    assert login["argv"] == ["login", "--username", "me", "--password-stdin", "myregistry.azurecr.io"]
    assert login["stdin"] == PASSWORD + "\n"
    assert push["argv"] == ["push", "myregistry.azurecr.io/me/rt:1"]
    assert all(PASSWORD not in " ".join(rec["argv"]) for rec in (build, login, push))
    assert PASSWORD not in r.stdout + r.stderr
    assert build["context"] == ["Dockerfile", "requirements.txt", "wheels"]
    assert build["wheels"] == [f"async_ca_exec-{__version__}-py3-none-any.whl"]
    assert 'CMD ["python3", "-m", "acx_server"]' in build["dockerfile"]


def test_a_users_dockerfile_base_image_and_options_reach_the_engine(tmp_path: Path) -> None:
    own = tmp_path / "Dockerfile.custom"
    own.write_text("FROM myregistry.azurecr.io/acx-default-py311:0.1.0\nRUN pip install numpy\n")
    cfg = write_config(tmp_path, base_image="python:3.11-bookworm", build_options=["--pull-never"])
    r = acx(tmp_path, "runtime", "build", "myregistry.azurecr.io/me/np:2", "-f", str(own), "--no-push", "-c", str(cfg),
            env=engine_env(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stderr
    [build] = recorded(tmp_path / "engine.log")  # no login, no push
    assert "--build-arg" in build["argv"] and "BASE_IMAGE=python:3.11-bookworm" in build["argv"]
    assert "--pull-never" in build["argv"] and build["dockerfile"].endswith("RUN pip install numpy\n")


def test_a_failing_push_is_a_one_line_error_with_the_engine_output(tmp_path: Path) -> None:
    env = engine_env(tmp_path)
    env["FAKE_ENGINE_EXIT"] = "3"
    r = acx(tmp_path, "runtime", "build", "myregistry.azurecr.io/me/rt:1", "-c", str(write_config(tmp_path)), env=env)
    assert r.returncode == 1 and "`" in r.stderr and "push ...` failed (exit code 3)" in r.stderr


@pytest.mark.parametrize(
    ("image", "message"),
    [("MyRegistry.io/Me/RT:1", "lowercase"), ("registry//x:1", "lowercase"), ("a/b:" + "x" * 200, "lowercase")],
)
def test_bad_image_names_show_a_valid_one(tmp_path: Path, image: str, message: str) -> None:
    r = acx(tmp_path, "runtime", "build", image, "-c", str(write_config(tmp_path)), env=engine_env(tmp_path))
    assert r.returncode == 1 and message in r.stderr and "myregistry.azurecr.io/me/runtime:1" in r.stderr


def test_no_engine_and_no_acr_lists_the_ways_to_build(tmp_path: Path) -> None:
    env = engine_env(tmp_path)
    env["ACX_BUILDER"] = "podman-that-is-not-there"
    cfg = write_config(tmp_path, docker_server="ghcr.io")
    r = acx(tmp_path, "runtime", "build", "ghcr.io/me/rt:1", "-c", str(cfg), env=env)
    assert r.returncode == 1 and "needs docker, podman or buildah on PATH" in r.stderr and "ACR Tasks" in r.stderr


def test_the_wheel_is_rebuilt_from_the_installed_package_and_installs(tmp_path: Path) -> None:
    wheel = images.build_wheel(tmp_path / "wheels")
    assert wheel.name == f"async_ca_exec-{__version__}-py3-none-any.whl"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], check=True, timeout=300)
    out = subprocess.run(
        [str(py), "-c", "import async_ca_exec, acx_server, importlib.resources as r; "
         "print(async_ca_exec.__version__, r.files('acx_server').joinpath('Dockerfile').is_file())"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert out.stdout.split() == [__version__, "True"], out.stderr


# -- with the ARM double: ACR Tasks, the default image, images without the server -------------


@pytest.fixture
def arm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, azurite: Azurite, container: str) -> Any:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    endpoint = ArmEndpoint(tmp_path).start()
    endpoint.storage = (azurite, container)
    try:
        yield endpoint
    finally:
        endpoint.stop()


def azure_config(arm: ArmEndpoint, **azure_containers: Any) -> dict[str, Any]:
    section: dict[str, Any] = {"environment": "acx", "docker_server": arm.registry, "docker_user": "me",
                               "docker_password": PASSWORD, "startup_timeout": 30}  # fmt: skip
    section.update(azure_containers)
    return {
        "lithops": {"backend": "azure"},
        "azure": {"subscription_id": arm.state.subscription, "resource_group": "rg-acx", "region": "westeurope",
                  "arm_endpoint": arm.url, "ca_bundle": str(arm.ca_pem), "polling_interval": 0, "arm_retries": 0},
        "azure_containers": section,
    }  # fmt: skip


async def test_without_an_engine_an_acr_image_is_built_in_acr_tasks(arm: ArmEndpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACX_BUILDER", "acr")
    arm.registries["myacr.azurecr.io"] = "myacr"
    lines: list[str] = []
    cfg = load_config(azure_config(arm), env={})
    how = await images.build_image(cfg, "myacr.azurecr.io/me/rt:1", credential=StaticToken(), progress=lines.append)
    assert how == "acr"
    [run] = arm.acr_runs.values()
    request = run["request"]
    assert request == {
        "type": "DockerBuildRequest",
        "imageNames": ["me/rt:1"],
        "isPushEnabled": True,
        "noCache": False,
        "dockerFilePath": "Dockerfile",
        "arguments": [{"name": "PYTHON_VERSION", "value": PY, "isSecret": False}],
        "platform": {"os": "Linux", "architecture": "amd64"},
        "sourceLocation": request["sourceLocation"],
        "isArchiveEnabled": False,
        "timeout": 3600,
    }  # fmt: skip
    assert request["sourceLocation"].startswith("acr-sources/")
    assert run["files"] == ["Dockerfile", "requirements.txt", "wheels", f"wheels/async_ca_exec-{__version__}-py3-none-any.whl"]
    assert "Successfully pushed me/rt:1" in lines and any("scheduled" in line for line in lines)
    bodies = [r for r in arm.requests if "listBuildSourceUploadUrl" in r.path or "scheduleRun" in r.path]
    assert [r.method for r in bodies] == ["POST", "POST"]


async def test_deploying_the_default_runtime_builds_its_image_when_the_registry_lacks_it(
    arm: ArmEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in engine_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    arm.images.clear()
    cfg = load_config(azure_config(arm), env={})
    async with az.AzureApps(cfg, credential=StaticToken()) as apps:
        info = await apps.deploy("default")
        assert info.state == "Succeeded"
        build, login, push = recorded(tmp_path / "engine.log")
        default = az.default_image(arm.registry)
        assert build["argv"][0] == "build" and default in build["argv"] and push["argv"] == ["push", default]
        assert login["argv"][-1] == arm.registry and login["stdin"] == PASSWORD + "\n"
        arm.images.add(default.split("/", 1)[1])  # "pushed"
        await apps.deploy("default")
        assert len(recorded(tmp_path / "engine.log")) == 3  # there now: not built again


@pytest.mark.parametrize("listening", [True, False], ids=["a web server", "nothing listening"])
async def test_an_image_without_the_server_says_what_to_add(arm: ArmEndpoint, listening: bool) -> None:
    image = "myregistry.azurecr.io/me/plain:1"
    if listening:
        arm.serverless_images.add(image)
    else:
        arm.cold_start = 3600  # the ingress never reaches a server
    cfg = load_config(azure_config(arm, startup_timeout=3), env={})
    async with az.AzureApps(cfg, credential=StaticToken()) as apps:
        with pytest.raises(DeploymentError) as info:
            await apps.deploy(image)
    message = str(info.value)
    assert f"must install async_ca_exec=={__version__} and start `python3 -m acx_server`" in message
    assert "acx runtime build myregistry.azurecr.io/me/plain:1" in message and "\n" not in message
    if not listening:
        assert "3 s (startup_timeout)" in message


def test_image_name_helpers() -> None:
    assert images.split_image("myregistry.azurecr.io/me/rt:1") == ("myregistry.azurecr.io", "me/rt", "1")
    assert images.split_image("python:3.11") == ("docker.io", "python", "3.11")
    assert images.split_image("127.0.0.1:5000/a/b") == ("127.0.0.1:5000", "a/b", "latest")
    with pytest.raises(ConfigError, match="lowercase"):
        images.split_image("UPPER/case:1")
