"""Shared pytest fixtures and options.

Sections: command-line options, real nats-server fixtures. Add new fixtures under a section
comment of their own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backbeat_trio._embedded import NatsServerProcess


# --- command-line options ----------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run chaos/soak tests for longer (CI runs them bounded)",
    )


@pytest.fixture(scope="session")
def soak(request: pytest.FixtureRequest) -> bool:
    """True when pytest ran with ``--soak``: long-running tests may loop longer."""
    return bool(request.config.getoption("--soak"))


# --- real nats-server on 127.0.0.1 -------------------------------------------------------------
@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServerProcess]:
    """A JetStream-enabled nats-server shared by one test module, closed at module teardown.

    Tests that kill or restart it must leave it running (``restart()``) for the next test.
    """
    with NatsServerProcess(jetstream=True) as server:
        yield server


@pytest.fixture
def nats_url(nats_server: NatsServerProcess) -> str:
    """The module's server URL (``nats://127.0.0.1:<port>``); restarted if a test left it down."""
    if not nats_server.running:
        nats_server.start()
    return nats_server.url
