"""Sessions: tests (the suite), lint (ruff + mypy), bench (performance scripts)."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = True


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite against an installed (not editable) package."""
    session.install(".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install(".[dev]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Throughput beside its baselines; prints the table and exits non-zero on a missed target."""
    session.install(".")
    session.run("python", "benchmarks/fanout.py", *session.posargs)


@nox.session(python=["3.10", "3.12", "3.13"])
def compat(session: nox.Session) -> None:
    """The suite on the other supported Pythons (run by hand: nox -s compat)."""
    session.install(".[test]")
    session.run("pytest", *session.posargs)
