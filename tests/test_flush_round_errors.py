"""Review 2: the callers sharing a flush round (over a real nats-server)."""

from __future__ import annotations

import traceback
from typing import Any

import pytest
import trio
import trio_asyncio

import backbeat_trio as bb3

pytestmark = pytest.mark.nats


class _DropsAtTheRound:
    """nats-py's client, connected when the trio side checks and gone when the round starts
    (the connection dropped in between)."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc
        self.reads = 0

    @property
    def is_connected(self) -> bool:
        self.reads += 1
        return self.reads <= 2  # the two callers' checks pass; the round's fails

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nc, name)


async def test_review2_callers_of_one_failed_round_do_not_share_one_exception(
    nats_url: str,
) -> None:
    # A round that raises NotConnected hands that one instance to every caller of the round,
    # and each caller re-raises it in its own task: every caller's error is the same object
    # (its __traceback__, __context__ and notes are written by whichever caller raised last).
    cfg = bb3.Config(cluster_id="rv2-flush", agent_id="a", nats_url=nats_url, jetstream=False)
    async with trio_asyncio.open_loop(), bb3.open_nats_transport(cfg) as transport:
        real = transport._nc
        proxy = _DropsAtTheRound(real)
        transport._nc = proxy
        caught: list[BaseException] = []
        depth: list[int] = []  # traceback frames each caller saw when it caught its error

        async def caller() -> None:
            try:
                await transport.flush()
            except bb3.NotConnected as exc:
                caught.append(exc)
                depth.append(len(traceback.extract_tb(exc.__traceback__)))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(caller)
                nursery.start_soon(caller)
        finally:
            transport._nc = real
        assert len(caught) == 2, caught
        assert proxy.reads == 3  # two callers' checks, one shared round's (the premise)
        assert caught[0] is not caught[1], (
            f"both callers raised the same exception object (traceback frames seen: {depth})"
        )
