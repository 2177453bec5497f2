"""Sessions: tests (the suite), lint (ruff + mypy), bench (performance scripts)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = True


AZURITE = "azurite@3.35.0"  # the newest release that runs on Node 20


def _azurite(session: nox.Session) -> None:
    """Microsoft's Blob emulator, installed with npm into the session (tests start it on loopback)."""
    prefix = Path(session.create_tmp()).resolve() / "azurite"
    exe = prefix / "node_modules" / ".bin" / "azurite-blob"
    if not exe.exists():
        session.run("npm", "install", "--prefix", str(prefix), AZURITE, "--no-audit", "--no-fund", "--silent",
                    external=True)  # fmt: skip
    session.env["AZURITE_BLOB_EXECUTABLE"] = str(exe)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite against an installed (not editable) package (but the real image build)."""
    session.install(".[test]")
    _azurite(session)
    session.run("pytest", "-m", "not image_build", *session.posargs)


@nox.session
def image(session: nox.Session) -> None:
    """A real build of container/Dockerfile with buildah on a Debian-made base, run and called."""
    session.install(".[test]")
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing:  # Debian packages, installed the project's way (needs root, or sudo)
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        session.run(*sudo, "apt-get", "update", "-qq", external=True)
        session.run(*sudo, "apt-get", "install", "-y", "-qq", "buildah", "debootstrap", external=True,
                    env={"DEBIAN_FRONTEND": "noninteractive"})  # fmt: skip
    session.run("pytest", "-m", "image_build", "-s", "tests/test_image_build.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install(".[dev]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Throughput beside its baselines and its peers, the cloud in a box (latency, cold starts, a slow replica),
    memory per call in flight and a profile of the client's CPU per call; prints the tables and exits non-zero on a
    missed target."""
    session.install(".", "lithops>=3", "ray>=2.9", "dask[distributed]>=2024.1")
    missed = []
    hedging = ["--replicas", "10", "--start-active", "10", "--cold-start", "0", "--calls", "5000", "--concurrency", "200",
               "--slow-replica", "2000"]  # fmt: skip
    prewarming = ["--replicas", "6", "--workers", "4", "--concurrent-requests", "4", "--work", "100", "--calls", "2000",
                  "--concurrency", "48"]  # fmt: skip
    runs = [
        ["benchmarks/fanout.py", *session.posargs],
        ["benchmarks/peers.py", *session.posargs],
        ["benchmarks/cloud_sim.py"],
        ["benchmarks/cloud_sim.py", *hedging],
        ["benchmarks/cloud_sim.py", *prewarming],
        ["benchmarks/inflight.py"],
        ["benchmarks/client_profile.py"],
    ]
    for args in runs:  # every one runs, whatever the others say
        try:
            session.run("python", *args)
        except nox.command.CommandFailed:
            missed.append(" ".join(args))
    if missed:
        session.error(f"missed targets (or failed): {', '.join(missed)}")


@nox.session
def soak(session: nox.Session) -> None:
    """Client memory over 1M imap / 100k map, and throughput under a flood (several minutes)."""
    session.install(".")
    session.run("python", "benchmarks/soak.py", *session.posargs)


@nox.session(python=["3.10", "3.12", "3.13"])
def compat(session: nox.Session) -> None:
    """The suite on the other supported Pythons (run by hand: nox -s compat)."""
    session.install(".[test]")
    _azurite(session)
    session.run("pytest", "-m", "not image_build", *session.posargs)
