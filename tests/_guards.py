"""Helpers shared by the test modules (imported as ``from _guards import ...``)."""

from __future__ import annotations

import functools
import socket
from collections.abc import Awaitable, Callable
from typing import ParamSpec

import trio

P = ParamSpec("P")


def fail_on_bare_cancel(test: Callable[P, Awaitable[None]]) -> Callable[P, Awaitable[None]]:
    """pytest-trio absorbs a Cancelled that escapes a test, which then *passes*; a client error
    that surfaces as a bare cancellation would go unseen. Make that a failure."""

    @functools.wraps(test)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            await test(*args, **kwargs)
        except BaseException as exc:
            cancelled_only = isinstance(exc, trio.Cancelled) or (
                isinstance(exc, BaseExceptionGroup) and exc.split(trio.Cancelled)[1] is None
            )
            if cancelled_only:
                raise AssertionError(
                    "the test ended in a bare Cancelled: an error was lost"
                ) from exc
            raise

    return guarded


def closed_port() -> int:
    """A 127.0.0.1 port that nothing listens on, for tests of a refused connection.

    Binds a socket, reads its port and closes it. Only for that purpose: a server under test is
    never started on a port found this way (another process could take it in between); servers
    let nats-server choose their ports.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
