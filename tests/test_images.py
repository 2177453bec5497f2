"""Runtime images: the build context, engine command lines, ACR Tasks, the default image."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from arm_endpoint import ArmEndpoint, StaticToken

from async_ca_exec import AsyncExecutor, RuntimeNotFoundError, __version__
from async_ca_exec.config import load_config
from async_ca_exec.errors import ConfigError, DeploymentError
from async_ca_exec.runtimes import azure as az
from async_ca_exec.runtimes import images

FAKES = Path(__file__).resolve().parent / "fakes"
REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
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
            "ACX_BUILDER": engine, "FAKE_REGISTRY_PUSHES": str(tmp / "registry-pushes")}  # fmt: skip


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
    fmt = ["--format", "docker"] if engine in ("podman", "buildah") else []
    assert build["argv"] == [
        "build", "--platform", "linux/amd64", *fmt, "--build-arg", f"PYTHON_VERSION={PY}",
        "-t", "myregistry.azurecr.io/me/rt:1", "-f", f"{context}/Dockerfile", context,
    ]  # fmt: skip
    assert login["argv"] == ["login", "--username", "me", "--password-stdin", "myregistry.azurecr.io"]
    assert login["stdin"] == PASSWORD + "\n"
    assert push["argv"] == ["push", "myregistry.azurecr.io/me/rt:1"]
    assert all(PASSWORD not in " ".join(rec["argv"]) for rec in (build, login, push))
    assert PASSWORD not in r.stdout + r.stderr
    assert build["context"] == ["Dockerfile", "acx-runtime"]
    assert build["runtime"] == ["requirements.txt", "wheels"]
    assert build["wheels"] == [f"async_ca_exec-{__version__}-py3-none-any.whl"]
    assert 'CMD ["python3", "-m", "acx_server"]' in build["dockerfile"]
    assert not Path(context).exists()  # the temporary context is gone


def test_credentials_go_only_to_the_registry_they_are_for(tmp_path: Path) -> None:
    r = acx(tmp_path, "runtime", "build", "ghcr.io/me/rt:1", "-c", str(write_config(tmp_path)), env=engine_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert [rec["argv"][0] for rec in recorded(tmp_path / "engine.log")] == ["build", "push"]  # no login
    assert "not logging in: docker_user is for myregistry.azurecr.io, not ghcr.io" in r.stdout
    # Docker Hub has several names.
    cfg = write_config(tmp_path, docker_server="docker.io/me")
    r = acx(tmp_path, "runtime", "build", "me/rt:2", "-c", str(cfg), env=engine_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert recorded(tmp_path / "engine.log")[-2]["argv"] == ["login", "--username", "me", "--password-stdin", "docker.io"]


def copy_sources(dockerfile: str) -> list[str]:
    """The local sources of a Dockerfile's COPY instructions."""
    out = []
    for line in dockerfile.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            out += [w.rstrip("/") for w in words[1:-1]]
    return out


def test_a_users_dockerfile_keeps_its_directory_as_the_context(tmp_path: Path) -> None:
    own = tmp_path / "rt"
    shutil.copytree(EXAMPLES / "custom_runtime", own)
    (own / "data.csv").write_text("a,b\n")
    cfg = write_config(tmp_path, base_image="python:3.11-bookworm", build_options=["--pull-never"])
    r = acx(tmp_path, "runtime", "build", "myregistry.azurecr.io/me/np:2", "-f", str(own / "Dockerfile"), "--no-push",
            "-c", str(cfg), env=engine_env(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stderr
    [build] = recorded(tmp_path / "engine.log")  # no login, no push
    assert build["context"] == ["Dockerfile", "acx-runtime", "data.csv", "numpy_job.py", "requirements.txt"]
    assert build["runtime"] == ["requirements.txt", "wheels"]
    assert set(copy_sources(build["dockerfile"])) == {"acx-runtime", "requirements.txt"}  # both there
    assert "BASE_IMAGE=python:3.11-bookworm" in build["argv"] and "--pull-never" in build["argv"]
    assert build["dockerfile"] == (own / "Dockerfile").read_text()
    assert sorted(p.name for p in own.iterdir()) == ["Dockerfile", "data.csv", "numpy_job.py", "requirements.txt"]


def test_the_default_dockerfile_copies_only_what_the_context_has() -> None:
    dockerfile = (REPO / "container" / "Dockerfile").read_text()
    assert copy_sources(dockerfile) == ["acx-runtime"]
    assert "COPY --from=build /opt/acx /opt/acx" in dockerfile and "PATH=/opt/acx/bin:$PATH" in dockerfile


def test_a_dockerfile_directory_with_its_own_acx_runtime_is_refused(tmp_path: Path) -> None:
    (tmp_path / "rt" / "acx-runtime").mkdir(parents=True)
    (tmp_path / "rt" / "Dockerfile").write_text("FROM python:3.11-slim\n")
    r = acx(tmp_path, "runtime", "build", "myregistry.azurecr.io/me/x:1", "-f", str(tmp_path / "rt" / "Dockerfile"),
            "-c", str(write_config(tmp_path)), env=engine_env(tmp_path))  # fmt: skip
    assert r.returncode == 1 and "has its own acx-runtime/" in r.stderr and "rename yours" in r.stderr
    r = acx(tmp_path, "runtime", "build", "myregistry.azurecr.io/me/x:1", "-f", str(tmp_path / "nowhere"),
            "-c", str(write_config(tmp_path)), env=engine_env(tmp_path))  # fmt: skip
    assert r.returncode == 1 and "does not exist" in r.stderr and "-f" in r.stderr


def test_a_failing_push_is_a_one_line_error_after_the_engine_output(tmp_path: Path) -> None:
    env = engine_env(tmp_path)
    env["FAKE_ENGINE_EXIT"] = "3"
    r = acx(tmp_path, "runtime", "build", "myregistry.azurecr.io/me/rt:1", "-c", str(write_config(tmp_path)), env=env)
    assert r.returncode == 1 and r.stderr == "acx: error: `docker push ...` failed (exit code 3):\n"
    assert "denied: requested access to the resource is denied" in r.stdout


def test_progress_bars_without_line_ends_are_streamed(tmp_path: Path) -> None:
    env = engine_env(tmp_path)
    env["FAKE_ENGINE_NOISE"] = "1"  # 400 kB on one line, redrawn with \r
    r = acx(tmp_path, "runtime", "build", "myregistry.azurecr.io/me/rt:1", "--no-push", "-c", str(write_config(tmp_path)),
            env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    bars = [line for line in r.stdout.splitlines() if line.endswith("#" * 40_000)]
    assert [b[:4] for b in bars] == [f"{i:>3}%" for i in range(0, 101, 10)]


async def test_a_cancelled_build_stops_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in engine_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FAKE_ENGINE_SLEEP", "120")
    cfg = load_config(yaml.safe_load(write_config(tmp_path, builder="docker").read_text()), env={})
    task = asyncio.ensure_future(images.build_image(cfg, "myregistry.azurecr.io/me/rt:1", progress=lambda _: None))
    pidfile = tmp_path / "engine.log.pid"
    for _ in range(600):
        if pidfile.exists() and pidfile.read_text():
            break
        await asyncio.sleep(0.05)
    pid = int(pidfile.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # terminated and reaped


@pytest.mark.parametrize(
    ("image", "message"),
    [("MyRegistry.io/Me/RT:1", "lowercase"), ("registry//x:1", "lowercase"), ("a/b:" + "x" * 200, "lowercase")],
)
def test_bad_image_names_show_a_valid_one(tmp_path: Path, image: str, message: str) -> None:
    r = acx(tmp_path, "runtime", "build", image, "-c", str(write_config(tmp_path)), env=engine_env(tmp_path))
    assert r.returncode == 1 and message in r.stderr and "myregistry.azurecr.io/me/runtime:1" in r.stderr


@pytest.mark.parametrize(
    ("builder", "image", "message"),
    [
        ("auto", "ghcr.io/me/rt:1", "needs docker (with a running daemon), podman or buildah on PATH"),
        ("podman", "myregistry.azurecr.io/me/rt:1", "builder 'podman' (azure_containers.builder / ACX_BUILDER) is not on PATH"),
        ("acr", "ghcr.io/me/rt:1", "builder 'acr' builds only into an Azure Container Registry"),
        ("kaniko", "ghcr.io/me/rt:1", "'auto', 'docker', 'podman', 'buildah' or 'acr'"),
    ],
)  # fmt: skip
def test_without_a_way_to_build_the_error_says_what_would_work(tmp_path: Path, builder: str, image: str, message: str) -> None:
    env = {"PATH": str(tmp_path), "ACX_BUILDER": builder}  # no engine on PATH
    r = acx(tmp_path, "runtime", "build", image, "-c", str(write_config(tmp_path, docker_server="ghcr.io")), env=env)
    assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def install(wheel: Path, venv: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], check=True, timeout=300)
    return py


def test_the_wheel_is_packed_from_the_installed_package_and_installs(tmp_path: Path) -> None:
    """From this (editable) install, then again from a regular install of that wheel."""
    wheel = images.build_wheel(tmp_path / "wheels")
    assert wheel.name == f"async_ca_exec-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read(f"async_ca_exec-{__version__}.dist-info/RECORD").decode()
    assert {"async_ca_exec/runtimes/images.py", "async_ca_exec/py.typed", "acx_server/Dockerfile",
            "acx_server/requirements.txt", "acx_server/server.py"} <= names  # fmt: skip
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert len(record.splitlines()) == len(names)
    py = install(wheel, tmp_path / "venv")
    out = subprocess.run(
        [str(py), "-c", "import async_ca_exec, acx_server, importlib.resources as r, importlib.metadata as m; "
         "print(async_ca_exec.__version__, r.files('acx_server').joinpath('Dockerfile').is_file(), "
         "[e.name for e in m.entry_points(group='console_scripts') if e.value.startswith('async_ca_exec')])"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert out.stdout.split() == [__version__, "True", "['acx']"], out.stderr
    # A regular (non-editable) install packs the same files: install the wheel into a target
    # directory that comes first on sys.path, and build the wheel again from there.
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)  # fmt: skip
    again = tmp_path / "again"
    code = ("import sys, async_ca_exec; from pathlib import Path; from async_ca_exec.runtimes.images import build_wheel; "
            f"assert async_ca_exec.__file__.startswith({str(target)!r}), async_ca_exec.__file__; "
            f"print(build_wheel(Path({str(again)!r})).name)")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    with zipfile.ZipFile(again / wheel.name) as z:
        assert set(z.namelist()) == names


# -- with the ARM double: ACR Tasks, the default image, images without the server -------------


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


async def test_without_an_engine_an_acr_image_is_built_in_acr_tasks(arm: ArmEndpoint) -> None:
    arm.registries["myacr.azurecr.io"] = "myacr"
    lines: list[str] = []
    cfg = load_config(azure_config(arm, builder="acr"), env={})
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
    wheel = f"acx-runtime/wheels/async_ca_exec-{__version__}-py3-none-any.whl"
    assert run["files"] == ["Dockerfile", "acx-runtime", "acx-runtime/requirements.txt", "acx-runtime/wheels", wheel]
    # The log arrived in parts (the first read found nothing, one part ended mid-line), each
    # line once and whole, progress bars split at \r, all of it before the end.
    log_start = lines.index(f"Step 1/9 : FROM python:{PY}-slim")
    assert lines[log_start:] == [
        f"Step 1/9 : FROM python:{PY}-slim",
        f"context: Dockerfile, acx-runtime, acx-runtime/requirements.txt, acx-runtime/wheels, {wheel}",
        "Step 2/9 : RUN pip install ...", " 10% ####", " 50% ##########", "100% ####################",
        "Successfully pushed me/rt:1", "ACR run cb1 built and pushed myacr.azurecr.io/me/rt:1",
    ]  # fmt: skip
    assert any("scheduled" in line for line in lines[:log_start])
    bodies = [r for r in arm.requests if "listBuildSourceUploadUrl" in r.path or "scheduleRun" in r.path]
    assert [r.method for r in bodies] == ["POST", "POST"]
    assert not any("sig=" in line for line in lines)


async def test_a_failed_acr_run_says_why(arm: ArmEndpoint) -> None:
    arm.registries["myacr.azurecr.io"] = "myacr"
    arm.acr_fail = "failed to push: unauthorized"
    lines: list[str] = []
    cfg = load_config(azure_config(arm, builder="acr"), env={})
    with pytest.raises(images.BuildError) as info:
        await images.build_image(cfg, "myacr.azurecr.io/me/rt:1", credential=StaticToken(), progress=lines.append)
    assert str(info.value) == (
        "ACR run cb1 ended Failed: failed to push: unauthorized; its log is above (az acr task logs -r myacr --run-id cb1)"
    )
    assert "error: step 2 failed" in lines


async def test_a_failed_context_upload_names_the_error_not_the_url(arm: ArmEndpoint) -> None:
    arm.registries["myacr.azurecr.io"] = "myacr"
    arm.acr_upload_broken = True
    cfg = load_config(azure_config(arm, builder="acr"), env={})
    with pytest.raises(images.BuildError) as info:
        await images.build_image(cfg, "myacr.azurecr.io/me/rt:1", credential=StaticToken(), progress=lambda _: None)
    assert str(info.value) == "uploading the build context to registry myacr failed: HTTP 403 AuthorizationFailure"
    assert not arm.acr_runs


async def test_a_cancelled_acr_build_cancels_its_run(arm: ArmEndpoint) -> None:
    arm.registries["myacr.azurecr.io"] = "myacr"
    arm.acr_polls = 10**6  # never ends by itself
    lines: list[str] = []
    cfg = load_config(azure_config(arm, builder="acr"), env={})
    task = asyncio.ensure_future(
        images.build_image(cfg, "myacr.azurecr.io/me/rt:1", credential=StaticToken(), progress=lines.append)
    )
    for _ in range(600):
        if arm.acr_runs and arm.acr_runs["cb1"]["polls"] >= 2:
            break
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert arm.acr_runs["cb1"]["status"] == "Canceled" and lines[-1] == "ACR run cb1 was cancelled"


@pytest.mark.parametrize("auth", [None, "basic", "bearer"])
async def test_the_registry_is_asked_as_it_wants(arm: ArmEndpoint, auth: str | None) -> None:
    arm.registry_auth = auth
    arm.registry_login = ("me", PASSWORD)
    ctx = ssl.create_default_context(cafile=str(arm.ca_pem))
    login = (arm.registry, "me", PASSWORD)
    there = az.default_image(arm.registry)
    assert await images.image_exists(there, login=login, ssl=ctx) is True
    assert await images.image_exists(f"{arm.registry}/me/missing:1", login=login, ssl=ctx) is False
    if auth is None:
        return
    with pytest.raises(images.BuildError, match=r"check azure_containers\.docker_user / docker_password") as info:
        await images.image_exists(there, login=(arm.registry, "me", "wrong"), ssl=ctx)
    assert "wrong" not in str(info.value) and PASSWORD not in str(info.value)
    with pytest.raises(images.BuildError, match=r"set azure_containers\.docker_server, docker_user and docker_password"):
        await images.image_exists(there, login=None, ssl=ctx)


async def test_a_registry_that_does_not_answer_is_a_clear_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never answers
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(images.BuildError, match=rf"cannot reach registry 127.0.0.1:{port} \(no answer within 1 s\)"):
            await images.image_exists(f"127.0.0.1:{port}/me/rt:1", timeout=1)
    finally:
        server.close()
        await server.wait_closed()


async def test_deploying_the_default_runtime_builds_its_image_when_the_registry_lacks_it(
    arm: ArmEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in engine_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    arm.images.clear()
    arm.registry_auth, arm.registry_login = "bearer", ("me", PASSWORD)
    lines: list[str] = []
    cfg = load_config(azure_config(arm, builder="docker"), env={})
    async with az.AzureApps(cfg, credential=StaticToken(), progress=lines.append) as apps:
        info = await apps.deploy("default")
        assert info.state == "Succeeded"
        build, login, push = recorded(tmp_path / "engine.log")
        default = az.default_image(arm.registry)
        assert build["argv"][0] == "build" and default in build["argv"] and push["argv"] == ["push", default]
        assert login["argv"][-1] == arm.registry and login["stdin"] == PASSWORD + "\n"
        await apps.deploy("default")  # pushed by the build: the registry has it
        assert len(recorded(tmp_path / "engine.log")) == 3  # there now: not built again
    assert not any(PASSWORD in line for line in lines)


async def test_the_first_executor_of_the_default_runtime_builds_its_image(
    arm: ArmEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in engine_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    arm.images.clear()
    path = tmp_path / "acx.yaml"
    path.write_text(yaml.safe_dump(azure_config(arm)))
    async with AsyncExecutor(config=path, credential=StaticToken()) as ex:
        assert await ex.submit(pow, 2, 10) == 1024
    default = az.default_image(arm.registry)
    assert [(r["argv"][0], r["argv"][-1]) for r in recorded(tmp_path / "engine.log")][1:] == [
        ("login", arm.registry), ("push", default)
    ]  # fmt: skip


@pytest.mark.parametrize("case", ["a web server", "nothing listening", "no such image"])
async def test_an_image_without_the_server_says_what_to_add(arm: ArmEndpoint, case: str) -> None:
    image = f"{arm.registry}/me/plain:1"
    if case != "no such image":
        arm.images.add("me/plain:1")
    if case == "a web server":
        arm.serverless_images.add(image)
    else:
        arm.cold_start = 3600  # the ingress never reaches a server
    cfg = load_config(azure_config(arm, startup_timeout=3), env={})
    async with az.AzureApps(cfg, credential=StaticToken()) as apps:
        with pytest.raises((DeploymentError, RuntimeNotFoundError)) as info:
            await apps.deploy(image)
    message = str(info.value)
    assert "\n" not in message
    if case == "no such image":  # Azure refuses the PUT: nothing is created
        assert isinstance(info.value, RuntimeNotFoundError) and not arm.replicas
        assert f"cannot pull runtime image {image}: registry {arm.registry} has no such image (MANIFEST_UNKNOWN)" in message
        assert f"`acx runtime build {image}`, then run `acx runtime deploy {image}` again" in message
        return
    assert f"must install async_ca_exec=={__version__} and start `python3 -m acx_server`" in message
    assert f"acx runtime build {image}" in message
    if case == "nothing listening":
        assert "3 s (startup_timeout)" in message


def test_image_name_helpers() -> None:
    assert images.split_image("myregistry.azurecr.io/me/rt:1") == ("myregistry.azurecr.io", "me/rt", "1")
    assert images.split_image("python:3.11") == ("docker.io", "python", "3.11")
    assert images.split_image("127.0.0.1:5000/a/b") == ("127.0.0.1:5000", "a/b", "latest")
    with pytest.raises(ConfigError, match="lowercase"):
        images.split_image("UPPER/case:1")
