"""Runtime images: the build context, a local engine (docker, podman, buildah) or ACR Tasks.

The context is assembled in a temporary directory: the Dockerfile's own directory (or just
``container/Dockerfile`` from the installed package) plus ``acx-runtime/`` with the server's
``requirements.txt`` and a wheel of this very package rebuilt from the installed files, so an
image always runs exactly the client's version, from a pip install as from a checkout. With a
local engine the image is built for ``linux/amd64``, the registry login takes the password on
stdin, and the image is pushed. With no engine and an Azure Container Registry, the context is
uploaded and built by ACR Tasks, whose log is streamed here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import io
import logging
import re
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
BUILDERS = ("auto", *ENGINES, "acr")
PLATFORM = "linux/amd64"
#: What acx adds to a build context: the server's requirements and the package's wheel.
RUNTIME_DIR = "acx-runtime"
#: Login servers of Azure Container Registries (public, China, US Government clouds).
ACR_SUFFIXES = (".azurecr.io", ".azurecr.cn", ".azurecr.us")
#: ACR Tasks run states after which nothing more happens.
_ACR_DONE = {"Succeeded", "Failed", "Canceled", "Error", "Timeout"}
_DOCKER_HUB = {"docker.io", "index.docker.io", "registry-1.docker.io"}
#: Files of the packages besides Python modules (setup.cfg's package_data).
_DATA_FILES = {"py.typed", "Dockerfile", "requirements.txt"}
#: A context bigger than this gets a hint about .dockerignore.
_BIG_CONTEXT = 200 << 20


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


def is_acr(host: str) -> bool:
    return host.lower().endswith(ACR_SUFFIXES)


def _same_registry(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    return a == b or (a in _DOCKER_HUB and b in _DOCKER_HUB)


def registry_login(cfg: Config, host: str) -> tuple[str, str, str] | None:
    """(server, user, password) from config when ``docker_server`` is the registry ``host``.

    Credentials go only to the registry they are configured for: an image on another registry
    is pulled and pushed with whatever login the engine already has.
    """
    ac = cfg.azure_containers
    if not (ac.docker_user and ac.docker_password is not None):
        return None
    server = (ac.docker_server or "docker.io").split("/", 1)[0]
    if not _same_registry(server, host):
        return None
    return server, ac.docker_user, ac.docker_password.get_secret_value()


def _pip_error(stderr: str) -> str:
    """pip's own explanation: its last ERROR line, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["(no output)"])[-1]


# ------------------------------------------------------------------------------------
# the package, as a wheel of the installed version


def build_wheel(dest: Path) -> Path:
    """A wheel of exactly this installed version of async_ca_exec, written into ``dest``.

    It is packed from the files Python imports (a pip install's site-packages, or the checkout
    of an editable install) and the installed metadata, RECORD regenerated; no pip, no network,
    and nothing written next to the sources.
    """
    import acx_server
    import async_ca_exec

    try:
        dist = importlib.metadata.distribution("async_ca_exec")
    except importlib.metadata.PackageNotFoundError:
        raise BuildError(
            "async_ca_exec is imported but not installed (no metadata): install it (pip install async_ca_exec, "
            "or pip install -e . in a checkout) before building an image"
        ) from None
    if dist.version != __version__:
        raise BuildError(
            f"the installed metadata says async_ca_exec {dist.version} but the code imported is {__version__}: "
            "reinstall it (pip install -e . in a checkout) so the image gets the right version"
        )
    dest.mkdir(parents=True, exist_ok=True)
    info = f"async_ca_exec-{__version__}.dist-info"
    files: list[tuple[str, bytes]] = []
    for module in (async_ca_exec, acx_server):
        assert module.__file__ is not None
        pkg = Path(module.__file__).resolve().parent
        for path in sorted(pkg.rglob("*")):
            rel = path.relative_to(pkg)
            if not path.is_file() or "__pycache__" in rel.parts or (path.suffix != ".py" and path.name not in _DATA_FILES):
                continue
            files.append((f"{module.__name__}/{rel.as_posix()}", path.read_bytes()))
    # (An .egg-info, which a checkout on sys.path can hold, calls its METADATA PKG-INFO.)
    metadata = dist.read_text("METADATA") or dist.read_text("PKG-INFO")
    if not metadata:
        raise BuildError("async_ca_exec's installed metadata has no METADATA: reinstall it")
    files.append((f"{info}/METADATA", metadata.encode()))
    for name in ("entry_points.txt", "top_level.txt"):
        text = dist.read_text(name)
        if text is not None:
            files.append((f"{info}/{name}", text.encode()))
    wheel_meta = "Wheel-Version: 1.0\nGenerator: async_ca_exec\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files.append((f"{info}/WHEEL", wheel_meta.encode()))
    wheel = dest / f"async_ca_exec-{__version__}-py3-none-any.whl"
    record: list[str] = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for arcname, data in files:
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            z.writestr(arcname, data)
            record.append(f"{arcname},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


def _container_file(name: str) -> bytes:
    return importlib.resources.files("acx_server").joinpath(name).read_bytes()


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def build_context(
    dest: Path, *, dockerfile: Path | None = None, bundle_dependencies: bool = False,
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, Path]:  # fmt: skip
    """Assemble a build context in ``dest``; returns (context, its Dockerfile).

    A user's Dockerfile keeps its directory as the context (its own ``COPY`` sources work);
    either way ``acx-runtime/`` holds ``requirements.txt`` (the server's) and ``wheels/``.
    """
    context = dest / "context"
    if dockerfile is not None:
        dockerfile = dockerfile.resolve()
        if not dockerfile.is_file():
            raise ConfigError(f"Dockerfile {dockerfile} does not exist: fix the path given with -f")
        if (dockerfile.parent / RUNTIME_DIR).exists():
            raise BuildError(
                f"{dockerfile.parent} has its own {RUNTIME_DIR}/, the name acx gives the directory it adds to the "
                "build context: rename yours"
            )
        shutil.copytree(dockerfile.parent, context, symlinks=True, ignore=shutil.ignore_patterns(".git"))
        if progress is not None and (size := _size(context)) > _BIG_CONTEXT:
            progress(
                f"note: the build context ({dockerfile.parent}) holds {size / 2**20:.0f} MiB; a .dockerignore keeps "
                "out what the image does not need"
            )
        dockerfile = context / dockerfile.name
    else:
        context.mkdir(parents=True)
        dockerfile = context / "Dockerfile"
        dockerfile.write_bytes(_container_file("Dockerfile"))
    runtime = context / RUNTIME_DIR
    runtime.mkdir()
    (runtime / "requirements.txt").write_bytes(_container_file("requirements.txt"))
    wheels = runtime / "wheels"
    build_wheel(wheels)
    if bundle_dependencies:
        # Every wheel the image needs, from this machine's index: the build then needs no network.
        if importlib.util.find_spec("pip") is None:
            raise BuildError(
                f"bundle_dependencies downloads wheels with pip, which this Python ({sys.executable}) lacks: "
                "install pip into it (e.g. `uv pip install pip`) or set azure_containers.bundle_dependencies: false"
            )
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version",
               python_tag(), "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
               "-d", str(wheels), "-r", str(runtime / "requirements.txt")]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise BuildError("downloading the runtime's dependency wheels took over 900 s: check pip's index") from None
        if proc.returncode != 0:
            raise BuildError(f"could not download the runtime's dependency wheels: {_pip_error(proc.stderr)}")
    return context, dockerfile


# ------------------------------------------------------------------------------------
# local engines


@dataclass
class Engine:
    name: str
    path: str

    def build(self, image: str, context: Path, dockerfile: Path, build_args: dict[str, str], options: list[str]) -> list[str]:
        cmd = [self.path, "build", "--platform", PLATFORM]
        if self.name in ("podman", "buildah"):
            cmd += ["--format", "docker"]  # keep HEALTHCHECK: the OCI image format drops it
        for k, v in build_args.items():
            cmd += ["--build-arg", f"{k}={v}"]
        return [*cmd, *options, "-t", image, "-f", str(dockerfile), str(context)]

    def login(self, server: str, user: str) -> list[str]:
        return [self.path, "login", "--username", user, "--password-stdin", server]

    def push(self, image: str) -> list[str]:
        return [self.path, "push", image]


def find_engine(preference: str = "auto") -> Engine | None:
    """The engine to build with: the named one, or (``auto``) the first usable of docker,
    podman, buildah; a docker client without a running daemon does not count."""
    if preference not in ("auto", *ENGINES):
        raise ConfigError(f"builder {preference!r} is not a local engine: use one of {', '.join(BUILDERS)}")
    names = ENGINES if preference == "auto" else (preference,)
    for name in names:
        path = shutil.which(name)
        if not path:
            continue
        if name == "docker" and preference == "auto":
            try:
                ok = subprocess.run([path, "info"], capture_output=True, timeout=15).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if not ok:
                continue
        return Engine(name, path)
    return None


def _lines(buffer: bytearray) -> list[str]:
    """Complete lines (ended by \\n or \\r: progress bars redraw with \\r) taken off ``buffer``."""
    out: list[str] = []
    while True:
        match = re.search(rb"[\r\n]", buffer)
        if match is None:
            return out
        line = bytes(buffer[: match.start()])
        del buffer[: match.end()]
        if line.strip():
            out.append(line.decode(errors="replace").rstrip())


async def run_command(cmd: list[str], *, stdin: bytes | None = None, progress: Callable[[str], None]) -> None:
    """Run an engine command, streaming its output; a failure raises BuildError with its tail.

    The command never outlives the call: cancelled (or failing here), it is terminated, then killed.
    """
    shown = " ".join([Path(cmd[0]).name, *cmd[1:2]])
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        raise BuildError(f"cannot run `{shown}`: {exc}") from None
    tail: list[str] = []
    try:
        if stdin is not None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it exited early: its code says why
                proc.stdin.write(stdin)
                await proc.stdin.drain()
            proc.stdin.close()
        assert proc.stdout is not None
        buffer = bytearray()
        while chunk := await proc.stdout.read(65536):
            buffer += chunk
            if len(buffer) > 1 << 20:  # a megabyte without a line break: show it anyway
                buffer += b"\n"
            for line in _lines(buffer):
                tail = [*tail[-19:], line]
                progress(line)
        if buffer.strip():
            line = buffer.decode(errors="replace").rstrip()
            tail = [*tail[-19:], line]
            progress(line)
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.shield(asyncio.wait_for(proc.wait(), 10))
            except (asyncio.TimeoutError, asyncio.CancelledError):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.shield(proc.wait())
    if code != 0:
        said = "\n".join(tail).strip()
        raise BuildError(f"`{shown} ...` failed (exit code {code})" + (f":\n{said}" if said else ", printing nothing"))


# ------------------------------------------------------------------------------------
# registry: is the image there already?

_CHALLENGE_FIELD = re.compile(r'(\w+)="([^"]*)"')
_MANIFESTS = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)


async def image_exists(image: str, *, login: tuple[str, str, str] | None = None, ssl: Any = None, timeout: float = 60.0) -> bool:
    """Ask the registry (Docker Registry HTTP API v2) whether ``image`` exists.

    ``login`` is (server, user, password) for the registry, as :func:`registry_login` gives it.
    Anonymous, Basic and Bearer-token (Docker Hub, ACR) registries are understood.
    """
    import aiohttp

    host, repo, tag = split_image(image)
    base = "https://registry-1.docker.io" if host in _DOCKER_HUB else f"https://{host}"
    url = f"{base}/v2/{repo}/manifests/{tag}"
    basic = {"Authorization": "Basic " + base64.b64encode(f"{login[1]}:{login[2]}".encode()).decode()} if login else {}
    who = f"user {login[1]}" if login else "an anonymous client"
    fix = (
        "set azure_containers.docker_server, docker_user and docker_password for a registry you can push to"
        if login is None
        else "check azure_containers.docker_user / docker_password"
    )

    async def head(headers: dict[str, str]) -> tuple[int, str]:
        async with s.head(url, headers={"Accept": _MANIFESTS, **headers}, ssl=ssl) as r:
            return r.status, r.headers.get("WWW-Authenticate", "")

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            status, challenge = await head({})
            scheme = challenge.split(" ", 1)[0].lower()
            if status == 401 and scheme == "basic":
                if not login:
                    raise BuildError(f"registry {host} wants a login to look for {image}: {fix}")
                status, _ = await head(basic)
            elif status == 401 and scheme == "bearer":
                fields = dict(_CHALLENGE_FIELD.findall(challenge))
                realm = fields.get("realm", "")
                if not realm.startswith("https://"):
                    raise BuildError(
                        f"registry {host} asked for a token from {realm or 'nowhere'!r}: only https token services are used"
                    )
                params = {k: v for k, v in fields.items() if k in ("service", "scope")}
                params.setdefault("scope", f"repository:{repo}:pull")
                async with s.get(realm, params=params, headers=basic, ssl=ssl) as t:
                    if t.status != 200:
                        raise BuildError(f"registry {host} refused {who} a pull token for {repo} (HTTP {t.status}): {fix}")
                    doc = await t.json(content_type=None)
                token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
                if not token:
                    raise BuildError(f"registry {host}'s token service answered without a token")
                status, _ = await head({"Authorization": f"Bearer {token}"})
            if status in (200, 404):
                return status == 200
            if status in (401, 403):
                # Docker Hub answers 401 for a repository that does not exist as for one not readable.
                raise BuildError(f"registry {host} does not let {who} see {repo} (HTTP {status}): {fix}")
            raise BuildError(f"registry {host} answered HTTP {status} for {image}")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        reason = f"no answer within {timeout:g} s" if isinstance(exc, asyncio.TimeoutError) else str(exc)
        raise BuildError(f"cannot reach registry {host} ({reason}): check the image name and the network") from None


# ------------------------------------------------------------------------------------
# ACR Tasks


async def acr_build(
    cfg: Config, image: str, context: Path, dockerfile: Path, build_args: dict[str, str], *, credential: Any,
    progress: Callable[[str], None],
) -> str:  # fmt: skip
    """Build (and push) ``image`` in Azure Container Registry Tasks; returns the run id."""
    import aiohttp

    # Scheduling runs is only in the 2019-06-01-preview API, which azure-mgmt-containerregistry
    # ships as a versioned sub-package up to 14.x (15.0 dropped them): hence the <15 pin in setup.cfg.
    from azure.core.exceptions import AzureError
    from azure.mgmt.containerregistry.aio import ContainerRegistryManagementClient as Latest
    from azure.mgmt.containerregistry.v2019_06_01_preview import models as m
    from azure.mgmt.containerregistry.v2019_06_01_preview.aio import ContainerRegistryManagementClient as Tasks

    target = AzureTarget.from_config(cfg)
    host, repo, tag = split_image(image)
    own = credential is None
    if own:
        from ..credentials import default_credential

        credential = default_credential()
    options: dict[str, Any] = {
        "base_url": target.arm_endpoint,
        "credential_scopes": [f"{target.arm_endpoint}/.default"],
        "connection_verify": target.ca_bundle or True,
        "polling_interval": target.polling_interval,
        "retry_total": target.arm_retries,
    }
    latest = Latest(credential, target.subscription_id, **options)
    tasks = Tasks(credential, target.subscription_id, **options)
    ssl = target.ssl_context()
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
                "check the image name and azure.subscription_id, or build with a local docker/podman/buildah"
            )
        group = str(registry.id).split("/resourceGroups/")[1].split("/")[0]
        name = str(registry.name)
        progress(f"building {image} remotely in ACR Tasks of {name}")
        async with arm_errors(target, f"getting an upload URL from registry {name}"):
            source = await tasks.registries.get_build_source_upload_url(group, name)
        archive = await asyncio.to_thread(_tar_gz, context)
        progress(f"uploading the build context ({len(archive) / 2**20:.1f} MiB)")
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as s, s.put(
                str(source.upload_url), data=archive, headers={"x-ms-blob-type": "BlockBlob"}, ssl=ssl,
            ) as up:  # fmt: skip
                if up.status not in (200, 201):
                    code = up.headers.get("x-ms-error-code") or up.reason
                    raise BuildError(f"uploading the build context to registry {name} failed: HTTP {up.status} {code}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise BuildError(f"uploading the build context to registry {name} failed: {type(exc).__name__}") from None
        request = m.DockerBuildRequest(
            source_location=source.relative_path,
            docker_file_path=dockerfile.relative_to(context).as_posix(),
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
        try:
            async with arm_errors(target, f"reading the log of ACR run {run_id}"):
                link = str((await tasks.runs.get_log_sas_url(group, name, run_id)).log_link)
            run = await _follow_run(tasks, group, name, run_id, link, target, progress)
        except BaseException:
            # Cancelled, or lost track of it: a build nobody waits for is stopped, not left running.
            try:
                await asyncio.shield(asyncio.wait_for(_cancel_run(tasks, group, name, run_id), 30))
                progress(f"ACR run {run_id} was cancelled")
            except (AzureError, DeploymentError, asyncio.TimeoutError, asyncio.CancelledError):
                progress(f"ACR run {run_id} may still be running: az acr task cancel-run -r {name} --run-id {run_id}")
            raise
        status = str(run.status)
        if status != "Succeeded":
            why = f": {run.run_error_message}" if getattr(run, "run_error_message", None) else ""
            raise BuildError(
                f"ACR run {run_id} ended {status}{why}; its log is above (az acr task logs -r {name} --run-id {run_id})"
            )
        progress(f"ACR run {run_id} built and pushed {image}")
        return run_id
    finally:
        await latest.close()  # type: ignore[no-untyped-call]
        await tasks.close()  # type: ignore[no-untyped-call]
        if own:
            await credential.close()


async def _cancel_run(tasks: Any, group: str, name: str, run_id: str) -> None:
    poller = await tasks.runs.begin_cancel(group, name, run_id)
    await poller.result()


#: How long the log is still read after the run ended, waiting for ACR to mark it complete.
_LOG_GRACE = 30.0


async def _follow_run(
    tasks: Any, group: str, name: str, run_id: str, link: str, target: AzureTarget, progress: Callable[[str], None]
) -> Any:
    """Stream the run's log blob (Range reads from where the last one ended) until the run is
    over and the log is marked complete; returns the final run."""
    import aiohttp

    offset = 0
    pending = bytearray()
    complete = False
    log_trouble = False
    ssl = target.ssl_context()
    deadline = time.monotonic() + 2 * 3600
    ended_at: float | None = None
    run: Any = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        while True:
            if ended_at is None:
                async with arm_errors(target, f"reading ACR run {run_id}"):
                    run = await tasks.runs.get(group, name, run_id)
                if str(run.status) in _ACR_DONE:
                    ended_at = time.monotonic()
            try:
                async with s.get(link, headers={"Range": f"bytes={offset}-"}, ssl=ssl) as r:
                    if r.status in (200, 206):
                        chunk = await r.read()
                        offset += len(chunk)
                        pending += chunk
                        for line in _lines(pending):
                            progress(line)
                    complete = complete or bool(r.headers.get("x-ms-meta-complete"))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if not log_trouble:  # the status decides; the log is a courtesy
                    progress(f"(the run's log cannot be read right now: {type(exc).__name__}; still following run {run_id})")
                log_trouble = True
            if ended_at is not None and (complete or time.monotonic() - ended_at > _LOG_GRACE):
                if pending.strip():
                    progress(pending.decode(errors="replace").rstrip())
                return run
            if time.monotonic() > deadline:
                raise BuildError(f"ACR run {run_id} was still {run.status} after 2 hours")
            await asyncio.sleep(max(0.2, min(2.0, target.polling_interval)))


def _tar_gz(context: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(context.rglob("*")):
            tar.add(path, arcname=path.relative_to(context).as_posix(), recursive=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------------
# the whole build


def _no_engine(image: str, host: str, preference: str) -> BuildError:
    if preference == "acr":
        return BuildError(
            f"builder 'acr' builds only into an Azure Container Registry (*{', *'.join(ACR_SUFFIXES)}), and {image} "
            f"is on {host}: build with docker, podman or buildah (azure_containers.builder: auto)"
        )
    if preference != "auto":
        return BuildError(
            f"builder {preference!r} (azure_containers.builder / ACX_BUILDER) is not on PATH: install it, or set "
            "builder: auto to use whichever of docker, podman, buildah is there (or ACR Tasks for an ACR image)"
        )
    return BuildError(
        f"cannot build {image}: it needs docker (with a running daemon), podman or buildah on PATH, or an Azure "
        "Container Registry image (myregistry.azurecr.io/...) to build remotely in ACR Tasks"
    )


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
    ac = cfg.azure_containers
    host, _repo, _tag = split_image(image)
    preference = ac.builder
    engine = None if preference == "acr" else await asyncio.to_thread(find_engine, preference)
    if engine is None and (preference not in ("auto", "acr") or not is_acr(host)):
        raise _no_engine(image, host, preference)
    if engine is None and not push:
        raise BuildError("an ACR Tasks build always pushes: drop --no-push, or build with a local docker/podman/buildah")
    build_args = {"PYTHON_VERSION": python_tag()}
    if ac.base_image:
        build_args["BASE_IMAGE"] = ac.base_image
    if ac.bundle_dependencies:
        build_args["WHEELS_ONLY"] = "1"
    with tempfile.TemporaryDirectory(prefix="acx-build-") as tmp:
        context, file = await asyncio.to_thread(
            build_context, Path(tmp), dockerfile=dockerfile, bundle_dependencies=ac.bundle_dependencies, progress=say
        )
        say(f"build context for {image}: async_ca_exec {__version__}, Python {python_tag()}")
        if engine is None:
            await acr_build(cfg, image, context, file, build_args, credential=credential, progress=say)
            return "acr"
        await run_command(engine.build(image, context, file, build_args, list(ac.build_options)), progress=say)
        if push:
            login = registry_login(cfg, host)
            if login is not None:
                server, user, password = login
                await run_command(engine.login(server, user), stdin=password.encode() + b"\n", progress=say)
            elif ac.docker_user:
                say(f"(not logging in: docker_user is for {ac.docker_server or 'docker.io'}, not {host}; the push uses "
                    f"the engine's own login for {host})")  # fmt: skip
            await run_command(engine.push(image), progress=say)
            say(f"pushed {image}")
        return engine.name
