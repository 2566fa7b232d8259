"""The harness the HA tests share (pulses in ``test_ha``, reverbs in ``test_reverb_ha``).

Lease holders run each in its own cancel scope so a test can crash one (cancel it, no release);
a collector task records what arrives on a subject with the time it arrived; conditions are
awaited within a bound, on MockClock as on the real clock.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import trio

from backbeat_trio._transport.base import Transport


async def wait_until(
    predicate: Callable[[], bool],
    *,
    bound: float = 20.0,
    step: float = 0.02,
    what: Callable[[], str] | None = None,
) -> None:
    """Return once ``predicate()`` holds, checked every ``step`` seconds for ``bound`` seconds.

    Raises:
        AssertionError: it did not hold within ``bound`` (``what()`` says what was seen).
    """
    for _ in range(int(bound / step)):
        if predicate():
            return
        await trio.sleep(step)
    detail = f": {what()}" if what is not None else ""
    raise AssertionError(f"not true within {bound} s{detail}")


async def collect(
    transport: Transport,
    subject: str,
    record: Callable[[bytes], None],
    *,
    buffer: int,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hand every message's payload on ``subject`` to ``record``; started once subscribed."""
    sub = await transport.subscribe(subject, buffer=buffer)
    task_status.started()
    async for msg in sub.messages:
        record(msg.data)


S = TypeVar("S")


class Fleet(Generic[S]):
    """Services started in a nursery, each in its own cancel scope under a name.

    Args:
        nursery: where the services run.
        holds_lease: whether a service's status says it holds the lease (leads, publishes).
    """

    def __init__(self, nursery: trio.Nursery, holds_lease: Callable[[S], bool]) -> None:
        self.nursery = nursery
        self.holds_lease = holds_lease
        self.scopes: dict[str, trio.CancelScope] = {}
        self.status: dict[str, S] = {}
        self.every_status: list[S] = []

    async def start_scoped(self, name: str, run: Callable[..., Awaitable[None]]) -> S:
        """Start ``run(task_status=...)`` in a new cancel scope; its status once it started."""
        scope = self.scopes[name] = trio.CancelScope()

        async def scoped(task_status: trio.TaskStatus[S]) -> None:
            with scope:
                await run(task_status=task_status)

        status: S = await self.nursery.start(scoped)
        self.status[name] = status
        self.every_status.append(status)
        return status

    def crash(self, name: str) -> None:
        """Stop ``name`` as a crash would: cancelled, no release."""
        self.scopes[name].cancel()

    def holders(self) -> list[str]:
        """The running services that hold the lease (a crashed one no longer counts)."""
        return [
            n
            for n, s in self.status.items()
            if self.holds_lease(s) and not self.scopes[n].cancel_called
        ]

    def holder(self) -> str | None:
        """The one running lease holder, or None; two at once fail the test."""
        live = self.holders()
        assert len(live) <= 1, live
        return live[0] if live else None


F = TypeVar("F", bound=Fleet[Any])


@contextlib.asynccontextmanager
async def open_fleet(make: Callable[[trio.Nursery], Awaitable[F]]) -> AsyncIterator[F]:
    """The fleet ``make(nursery)`` builds in a nursery of its own; it all stops with the block."""
    async with trio.open_nursery() as nursery:
        yield await make(nursery)
        nursery.cancel_scope.cancel()
