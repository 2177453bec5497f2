"""Runtime images: the build context, a local engine (docker, podman, buildah) or ACR Tasks.

The context is assembled in a temporary directory: a Dockerfile (``container/Dockerfile`` from
the installed package, or the user's), the server's ``requirements.txt`` and a wheel of this very
package rebuilt from the installed distribution, so an image always runs exactly the client's
version, from a pip install as from a checkout. With a local engine the image is built for
``linux/amd64``, the registry login takes the password on stdin, and the image is pushed. With
no engine and an Azure Container Registry, the context is uploaded and built by ACR Tasks,
whose log is streamed here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.resources
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import Config
from ..errors import ConfigError, DeploymentError
from .azure import AzureTarget, arm_errors, check_image

log = logging.getLogger("async_ca_exec.images")

ENGINES = ("docker", "podman", "buildah")
PLATFORM = "linux/amd64"
#: ACR Tasks run states after which nothing more happens.
_ACR_DONE = {"Succeeded", "Failed", "Canceled", "Error", "Timeout"}


class BuildError(DeploymentError):
    """An image build or push failed (the message carries the engine's last lines)."""


def python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def split_image(image: str) -> tuple[str, str, str]:
    """(registry host, repository, tag) of a full image name."""
    check_image(image)
    host, _, rest = image.partition("/")
    if not rest or ("." not in host and ":" not in host and host != "localhost"):
        host, rest = "docker.io", image
    repo, _, tag = rest.partition(":")
    return host, repo, tag or "latest"


# ------------------------------------------------------------------------------------
# the package, as a wheel of the installed version


def _source_tree() -> Path | None:
    """The project directory when the package runs from a checkout (or an editable install)."""
    import async_ca_exec

    root = Path(async_ca_exec.__file__).resolve().parent.parent
    return root if (root / "setup.cfg").is_file() and (root / "container" / "Dockerfile").is_file() else None


def build_wheel(dest: Path) -> Path:
    """A wheel of exactly this installed version of async_ca_exec, written into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    src = _source_tree()
    if src is not None:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dest), str(src)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if proc.returncode != 0:
            raise BuildError(f"could not build a wheel of {src}: {proc.stderr.strip()[-800:]}")
        wheels = sorted(dest.glob(f"async_ca_exec-{__version__}-*.whl"))
        if not wheels:
            raise BuildError(f"pip built no async_ca_exec {__version__} wheel from {src}")
        return wheels[0]
    return _repack_installed(dest)


def _repack_installed(dest: Path) -> Path:
    """Rebuild the wheel from the installed files (site-packages), RECORD included."""
    import acx_server
    import async_ca_exec

    site = Path(async_ca_exec.__file__).resolve().parent.parent
    dist_infos = list(site.glob(f"async_ca_exec-{__version__}.dist-info"))
    if not dist_infos:
        raise BuildError(f"async_ca_exec {__version__}'s .dist-info is not next to the package in {site}")
    dist_info = dist_infos[0]
    packages = [Path(async_ca_exec.__file__).resolve().parent, Path(acx_server.__file__).resolve().parent]
    wheel = dest / f"async_ca_exec-{__version__}-py3-none-any.whl"
    record: list[str] = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:

        def add(path: Path, arcname: str) -> None:
            data = path.read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            z.writestr(arcname, data)
            record.append(f"{arcname},sha256={digest},{len(data)}")

        for pkg in packages:
            for path in sorted(pkg.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                    add(path, f"{pkg.name}/{path.relative_to(pkg).as_posix()}")
        for path in sorted(dist_info.iterdir()):
            if path.name not in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json") and path.is_file():
                add(path, f"{dist_info.name}/{path.name}")
        record.append(f"{dist_info.name}/RECORD,,")
        z.writestr(f"{dist_info.name}/RECORD", "\n".join(record) + "\n")
    return wheel


def _container_file(name: str) -> bytes:
    return importlib.resources.files("acx_server").joinpath(name).read_bytes()


def build_context(dest: Path, *, dockerfile: Path | None = None, bundle_dependencies: bool = False) -> Path:
    """Assemble a build context in ``dest``: Dockerfile, requirements.txt, wheels/."""
    dest.mkdir(parents=True, exist_ok=True)
    if dockerfile is not None:
        if not dockerfile.is_file():
            raise ConfigError(f"Dockerfile {dockerfile} does not exist")
        (dest / "Dockerfile").write_bytes(dockerfile.read_bytes())
    else:
        (dest / "Dockerfile").write_bytes(_container_file("Dockerfile"))
    (dest / "requirements.txt").write_bytes(_container_file("requirements.txt"))
    wheels = dest / "wheels"
    build_wheel(wheels)
    if bundle_dependencies:
        # Every wheel the image needs, from this machine's index: the build then needs no network.
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version",
             python_tag(), "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
             "-d", str(wheels), "-r", str(dest / "requirements.txt")],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if proc.returncode != 0:
            raise BuildError(f"could not download the runtime's dependencies: {proc.stderr.strip()[-800:]}")
    return dest


# ------------------------------------------------------------------------------------
# local engines


@dataclass
class Engine:
    name: str
    path: str

    def build(self, image: str, context: Path, build_args: dict[str, str], options: list[str]) -> list[str]:
        cmd = [self.path, "build", "--platform", PLATFORM]
        if self.name == "buildah":
            cmd += ["--format", "docker"]  # keep HEALTHCHECK (OCI images drop it)
        for k, v in build_args.items():
            cmd += ["--build-arg", f"{k}={v}"]
        return [*cmd, *options, "-t", image, "-f", str(context / "Dockerfile"), str(context)]

    def login(self, server: str, user: str) -> list[str]:
        return [self.path, "login", "--username", user, "--password-stdin", server]

    def push(self, image: str) -> list[str]:
        return [self.path, "push", image]


def find_engine(preference: str = "auto") -> Engine | None:
    """The first usable engine: a docker client without a running daemon does not count."""
    names = ENGINES if preference in ("auto", "") else (preference,)
    for name in names:
        path = shutil.which(name)
        if not path:
            continue
        if name == "docker" and preference in ("auto", ""):
            try:
                ok = subprocess.run([path, "info"], capture_output=True, timeout=15).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if not ok:
                continue
        return Engine(name, path)
    return None


async def run_command(cmd: list[str], *, stdin: bytes | None = None, progress: Callable[[str], None]) -> None:
    """Run an engine command, streaming its output; a failure raises BuildError with its tail."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    if stdin is not None:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        await proc.stdin.drain()
        proc.stdin.close()
    tail: list[str] = []
    assert proc.stdout is not None
    async for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        tail = [*tail[-19:], line]
        progress(line)
    code = await proc.wait()
    if code != 0:
        shown = " ".join(cmd[:2])
        raise BuildError(f"`{shown} ...` failed (exit code {code}):\n" + "\n".join(tail))


# ------------------------------------------------------------------------------------
# registry: is the image there already?


async def image_exists(image: str, *, user: str | None, password: str | None, ssl: Any = None) -> bool:
    """Ask the registry (Docker Registry HTTP API v2) whether ``image`` exists."""
    import aiohttp

    host, repo, tag = split_image(image)
    base = "https://registry-1.docker.io" if host == "docker.io" else f"https://{host}"
    url = f"{base}/v2/{repo}/manifests/{tag}"
    accept = ", ".join(
        [
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.index.v1+json",
        ]
    )
    basic = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()} if user and password else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        try:
            async with s.head(url, headers={"Accept": accept}, ssl=ssl) as r:
                if r.status == 200:
                    return True
                if r.status == 404:
                    return False
                challenge = r.headers.get("WWW-Authenticate", "")
            if r.status != 401 or not challenge.lower().startswith("bearer"):
                raise BuildError(f"registry {host} answered HTTP {r.status} for {image}")
            fields = dict(part.split("=", 1) for part in challenge[len("Bearer ") :].replace('"', "").split(",") if "=" in part)
            params = {k: v for k, v in fields.items() if k in ("service", "scope")}
            params.setdefault("scope", f"repository:{repo}:pull")
            async with s.get(fields["realm"], params=params, headers=basic, ssl=ssl) as t:
                if t.status != 200:
                    raise BuildError(
                        f"registry {host} refused a pull token for {repo} (HTTP {t.status}): check docker_user / docker_password"
                    )
                doc = await t.json()
            token = doc.get("token") or doc.get("access_token")
            async with s.head(url, headers={"Accept": accept, "Authorization": f"Bearer {token}"}, ssl=ssl) as r2:
                if r2.status in (200, 404):
                    return r2.status == 200
                raise BuildError(f"registry {host} answered HTTP {r2.status} for {image}")
        except aiohttp.ClientError as exc:
            raise BuildError(f"cannot reach registry {host}: {exc}") from None


# ------------------------------------------------------------------------------------
# ACR Tasks


async def acr_build(
    cfg: Config, image: str, context: Path, build_args: dict[str, str], *, credential: Any,
    progress: Callable[[str], None],
) -> str:  # fmt: skip
    """Build (and push) ``image`` in Azure Container Registry Tasks; returns the run id."""
    import aiohttp

    # Scheduling runs is only in the 2019-06-01-preview API, which azure-mgmt-containerregistry
    # ships as a versioned sub-package up to 14.x (15.0 dropped them): hence the <15 pin in setup.cfg.
    from azure.mgmt.containerregistry.aio import ContainerRegistryManagementClient as Latest
    from azure.mgmt.containerregistry.v2019_06_01_preview import models as m
    from azure.mgmt.containerregistry.v2019_06_01_preview.aio import ContainerRegistryManagementClient as Tasks

    target = AzureTarget.from_config(cfg)
    host, repo, tag = split_image(image)
    own = credential is None
    if own:
        from azure.identity.aio import DefaultAzureCredential

        credential = DefaultAzureCredential()
    options: dict[str, Any] = {
        "base_url": target.arm_endpoint,
        "credential_scopes": [f"{target.arm_endpoint}/.default"],
        "connection_verify": target.ca_bundle or True,
        "polling_interval": target.polling_interval,
        "retry_total": target.arm_retries,
    }
    latest = Latest(credential, target.subscription_id, **options)
    tasks = Tasks(credential, target.subscription_id, **options)
    try:
        async with arm_errors(target, f"finding the container registry {host}"):
            registry = None
            async for r in latest.registries.list():
                if (r.login_server or "").lower() == host.lower():
                    registry = r
                    break
        if registry is None:
            raise ConfigError(
                f"no Azure Container Registry with login server {host} in subscription {target.subscription_id}: "
                "check the image name, or build with a local docker/podman/buildah"
            )
        group = str(registry.id).split("/resourceGroups/")[1].split("/")[0]
        name = str(registry.name)
        progress(f"building {image} remotely in ACR Tasks of {name} (no local container engine)")
        async with arm_errors(target, f"getting an upload URL from registry {name}"):
            source = await tasks.registries.get_build_source_upload_url(group, name)
        archive = _tar_gz(context)
        progress(f"uploading the build context ({len(archive) / 2**20:.1f} MiB)")
        async with aiohttp.ClientSession() as s, s.put(
            str(source.upload_url), data=archive, headers={"x-ms-blob-type": "BlockBlob"},
            ssl=target.ssl_context() if target.ca_bundle else None,
        ) as up:  # fmt: skip
            if up.status not in (200, 201):
                raise BuildError(f"uploading the build context to ACR failed (HTTP {up.status})")
        request = m.DockerBuildRequest(
            source_location=source.relative_path,
            docker_file_path="Dockerfile",
            image_names=[f"{repo}:{tag}"],
            is_push_enabled=True,
            platform=m.PlatformProperties(os="Linux", architecture="amd64"),
            arguments=[m.Argument(name=k, value=v, is_secret=False) for k, v in build_args.items()],
            timeout=3600,
        )
        async with arm_errors(target, f"scheduling a build run in registry {name}"):
            poller = await tasks.registries.begin_schedule_run(group, name, request)
            run = await poller.result()
        run_id = str(run.run_id)
        progress(f"ACR run {run_id} scheduled; its log follows")
        async with arm_errors(target, f"reading the log of ACR run {run_id}"):
            link = str((await tasks.runs.get_log_sas_url(group, name, run_id)).log_link)
        status = await _follow_run(tasks, group, name, run_id, link, target, progress)
        if status != "Succeeded":
            raise BuildError(f"ACR run {run_id} ended {status}: see its log above (az acr task logs --run-id {run_id})")
        progress(f"ACR run {run_id} built and pushed {image}")
        return run_id
    finally:
        await latest.close()  # type: ignore[no-untyped-call]
        await tasks.close()  # type: ignore[no-untyped-call]
        if own:
            await credential.close()


async def _follow_run(
    tasks: Any, group: str, name: str, run_id: str, link: str, target: AzureTarget, progress: Callable[[str], None]
) -> str:
    import aiohttp

    offset = 0
    pending = b""
    ssl = target.ssl_context() if target.ca_bundle else None
    deadline = time.monotonic() + 2 * 3600
    async with aiohttp.ClientSession() as s:
        while True:
            async with arm_errors(target, f"reading ACR run {run_id}"):
                status = str((await tasks.runs.get(group, name, run_id)).status)
            async with s.get(link, headers={"Range": f"bytes={offset}-"}, ssl=ssl) as r:
                if r.status in (200, 206):
                    chunk = await r.read()
                    offset += len(chunk)
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        progress(line.decode(errors="replace"))
            if status in _ACR_DONE:
                if pending:
                    progress(pending.decode(errors="replace"))
                return status
            if time.monotonic() > deadline:
                return "Timeout"
            await asyncio.sleep(max(0.2, min(2.0, target.polling_interval)))


def _tar_gz(context: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(context.rglob("*")):
            tar.add(path, arcname=path.relative_to(context).as_posix(), recursive=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------------
# the whole build


async def build_image(
    cfg: Config,
    image: str,
    *,
    dockerfile: Path | None = None,
    push: bool = True,
    credential: Any = None,
    progress: Callable[[str], None] | None = None,
) -> str:
    """Build ``image`` (the default Dockerfile unless ``dockerfile``), then push it.

    Returns how it was built ("docker", "podman", "buildah" or "acr").
    """
    say = progress or (lambda msg: log.info("%s", msg))
    check_image(image)
    ac = cfg.azure_containers
    preference = os.environ.get("ACX_BUILDER") or ac.builder
    engine = None if preference == "acr" else find_engine(preference)
    host, _repo, _tag = split_image(image)
    build_args = {"PYTHON_VERSION": python_tag()}
    if ac.base_image:
        build_args["BASE_IMAGE"] = ac.base_image
    if ac.bundle_dependencies:
        build_args["WHEELS_ONLY"] = "1"
    if engine is None and not host.endswith(".azurecr.io"):
        wanted = f"{preference!r} was not found on PATH" if preference not in ("auto", "") else "none was found"
        raise BuildError(
            f"cannot build {image}: it needs docker, podman or buildah on PATH ({wanted}), or an Azure Container "
            "Registry (*.azurecr.io) to build in remotely with ACR Tasks"
        )
    with tempfile.TemporaryDirectory(prefix="acx-build-") as tmp:
        context = build_context(Path(tmp), dockerfile=dockerfile, bundle_dependencies=ac.bundle_dependencies)
        say(f"build context for {image}: async_ca_exec {__version__}, Python {python_tag()}")
        if engine is None:
            if not push:
                raise BuildError("ACR Tasks builds always push: drop --no-push, or build with a local engine")
            await acr_build(cfg, image, context, build_args, credential=credential, progress=say)
            return "acr"
        await run_command(engine.build(image, context, build_args, list(ac.build_options)), progress=say)
        if push:
            if ac.docker_user and ac.docker_password is not None:
                server = ac.docker_server or host
                await run_command(
                    engine.login(server, ac.docker_user),
                    stdin=ac.docker_password.get_secret_value().encode() + b"\n",
                    progress=say,
                )
            await run_command(engine.push(image), progress=say)
            say(f"pushed {image}")
        return engine.name
