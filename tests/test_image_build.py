"""A real image build: container/Dockerfile built with buildah, run, and called with a signed request.

No Docker engine exists here, so the base image is made from Debian packages (debootstrap) and the
build runs with buildah (chroot isolation, vfs storage, no pulls). Needs root, network to Debian's
mirror and Python 3.11 (Debian bookworm's). It runs in its own nox session, `nox -s image`.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from async_ca_exec import __version__, protocol, serialize

from conftest import free_port, wait_gone

pytestmark = pytest.mark.image_build

BASE = "localhost/acx-test-base:bookworm"
IMAGE = "localhost/acx-it:test"
#: A PATH of its own, to see that the runtime image keeps it and puts its venv first.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/opt/base-tools/bin"


def add7(x: int) -> int:
    return x + 7


def run(cmd: list[str], env: dict[str, str], timeout: float = 900, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{' '.join(cmd[:3])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc  # type: ignore[no-any-return]


@pytest.fixture
def buildah_env(tmp_path: Path) -> dict[str, str]:
    """buildah with its own storage (vfs) in this test's directory."""
    assert os.geteuid() == 0, "the real image build needs root (debootstrap, buildah chroot isolation)"
    assert sys.version_info[:2] == (3, 11), "the Debian bookworm base has Python 3.11: run this session on 3.11"
    conf = tmp_path / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{tmp_path}/graph"\nrunroot = "{tmp_path}/run"\n')
    env = dict(os.environ)
    env.update({"CONTAINERS_STORAGE_CONF": str(conf), "BUILDAH_ISOLATION": "chroot", "STORAGE_DRIVER": "vfs"})
    return env


def test_the_dockerfile_builds_runs_and_answers_a_signed_call(tmp_path: Path, buildah_env: dict[str, str]) -> None:
    env = buildah_env
    timings: dict[str, float] = {}
    t = time.monotonic()
    rootfs = tmp_path / "rootfs"
    run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm", str(rootfs),
         "http://deb.debian.org/debian"], env)  # fmt: skip
    timings["debootstrap"] = time.monotonic() - t

    t = time.monotonic()
    container = run(["buildah", "from", "scratch"], env).stdout.strip()
    try:
        mount = run(["buildah", "mount", container], env).stdout.strip()
        run(["cp", "-a", f"{rootfs}/.", mount], env)
        run(["buildah", "umount", container], env)
        run(["buildah", "config", "--env", f"PATH={BASE_PATH}", container], env)
        run(["buildah", "commit", "--quiet", container, BASE], env)
    finally:
        subprocess.run(["buildah", "rm", container], env=env, capture_output=True)
    timings["base image"] = time.monotonic() - t

    # The SDK's own build path: `acx runtime build` with buildah, the real container/Dockerfile.
    cfg = tmp_path / "acx.yaml"
    cfg.write_text(yaml.safe_dump({"azure_containers": {
        "builder": "buildah", "base_image": BASE, "bundle_dependencies": True,
        "build_options": ["--isolation", "chroot", "--pull-never"],
    }}))  # fmt: skip
    t = time.monotonic()
    acx = str(Path(sys.executable).with_name("acx"))
    built = run([acx, "runtime", "build", IMAGE, "--no-push", "-c", str(cfg)], env, timeout=1800, cwd=tmp_path)
    assert f"built {IMAGE} with buildah" in built.stdout
    timings["build"] = time.monotonic() - t

    inspect = run(["buildah", "inspect", "--type", "image", "--format",
                   "{{.Docker.Config.User}}|{{.Docker.Config.Cmd}}|{{.Docker.Config.Healthcheck}}", IMAGE], env)  # fmt: skip
    user, cmd, health = inspect.stdout.strip().split("|")
    assert user == "acx" and cmd == "[python3 -m acx_server]" and "v1/health" in health

    container = run(["buildah", "from", "--pull-never", IMAGE], env).stdout.strip()
    server: subprocess.Popen[bytes] | None = None
    try:
        compilers = subprocess.run(["buildah", "run", container, "--", "sh", "-c", "command -v gcc cc g++ || true"],
                                   env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert compilers.stdout.strip() == "", f"compilers left in the image: {compilers.stdout}"
        layout = subprocess.run(["buildah", "run", container, "--", "sh", "-c",
                                 "command -v python3; ls -A /tmp; echo $PATH; id -un"],
                                env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        # The venv's Python first on the base's PATH; the wheels stayed in the build stage.
        assert layout.stdout.split("\n")[:3] == ["/opt/acx/bin/python3", f"/opt/acx/bin:{BASE_PATH}", "acx"], layout
        key = secrets.token_urlsafe(32)
        port = free_port()
        t = time.monotonic()
        server = subprocess.Popen(
            ["buildah", "run", "--env", "ACX_HMAC_KEY_STDIN=1", "--env", "ACX_SERVER_HOST=127.0.0.1",
             "--env", f"ACX_SERVER_PORT={port}", "--env", "ACX_WORKER_PROCESSES=2", container,
             "--", "python3", "-m", "acx_server"],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "wb"),
        )  # fmt: skip
        assert server.stdin is not None
        server.stdin.write(key.encode() + b"\n")
        server.stdin.close()
        meta, result = asyncio.run(call(port, key.encode()))
        timings["start and call"] = time.monotonic() - t
        assert meta["packages"]["async_ca_exec"] == __version__ and meta["python"].startswith("3.11")
        assert result == 49
    finally:
        if server is not None:
            kids = _descendants(server.pid)
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            assert not wait_gone(kids), "the containerised server or its workers outlived buildah run"
        subprocess.run(["buildah", "rm", container], env=env, capture_output=True)
        subprocess.run(["buildah", "rmi", "--force", IMAGE, BASE], env=env, capture_output=True)
        shutil.rmtree(tmp_path / "graph", ignore_errors=True)
        shutil.rmtree(rootfs, ignore_errors=True)
    print("real image build timings (s):", {k: round(v, 1) for k, v in timings.items()})


async def call(port: int, key: bytes) -> tuple[dict[str, object], object]:
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as s:
        deadline = time.monotonic() + 120
        while True:
            try:
                async with s.get(url + protocol.HEALTH_PATH) as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "the containerised server did not become healthy"
            await asyncio.sleep(0.25)
        headers = protocol.signed_headers(key, "GET", protocol.META_PATH, "meta", b"")
        async with s.get(url + protocol.META_PATH, headers=headers) as r:
            meta = await r.json()
        fn, digest = serialize.dumps_function(add7)
        items = serialize.dumps_items([((42,), {})], "it-00001")
        body = protocol.encode_invocation(call_id="it-00001", n=1, fn=fn, fn_hash=digest, items=items, timeout=30)
        headers = protocol.signed_headers(key, "POST", protocol.INVOKE_PATH, "it-00001", body)
        async with s.post(url + protocol.INVOKE_PATH, data=body, headers=headers) as r:
            assert r.status == 200
            raw = await r.read()
    frames = list(protocol.iter_frames(raw))
    _meta, blob = protocol.decode_outcome_payload(next(p for t, p in frames if t == protocol.F_OUTCOME))
    values, _exc, _timing = serialize.loads(blob)
    return meta, values[0]


def _descendants(pid: int) -> set[int]:
    from conftest import children

    return children(pid)
