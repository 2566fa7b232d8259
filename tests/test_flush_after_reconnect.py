"""Review: flush rounds across a reconnect (over a real nats-server)."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest
import trio
import trio_asyncio

import backbeat_trio as bb3
from backbeat_trio._embedded import NatsServerProcess
from tests._ha_harness import wait_until

pytestmark = pytest.mark.nats


async def test_review_a_flush_after_a_reconnect_does_not_wait_for_a_round_the_drop_orphaned(
    nats_server: NatsServerProcess, nats_url: str
) -> None:
    # A flush round whose PING went to a server that then died waits out nats-py's flush
    # timeout: nats-py forgets the PONG futures on reconnect without failing them. Before flush
    # rounds, a flush made after the reconnect sent its own PING at once; now its round waits
    # for the orphaned one first, so the first claim confirmation after a server restart takes
    # seconds instead of a round trip.
    cfg = bb3.Config(
        cluster_id="rv-flush",
        agent_id="agent-1",
        nats_url=nats_url,
        jetstream=False,
        reconnect_delay=0.05,
    )
    async with trio_asyncio.open_loop(), bb3.open_nats_transport(cfg) as transport:
        await transport.flush()
        pid = nats_server.pid
        assert pid is not None

        doomed_done = trio.Event()

        async def doomed_flush() -> None:
            with contextlib.suppress(bb3.NotConnected):  # its PING is never answered
                await transport.flush()
            doomed_done.set()

        kinds: list[str] = []

        async def watch() -> None:
            async for event in transport.events:
                kinds.append(event.kind)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            os.kill(pid, signal.SIGSTOP)  # the server takes the PING but never answers
            await trio.sleep(0.2)  # stopped for sure before the PING goes out
            nursery.start_soon(doomed_flush)
            await wait_until(lambda: transport.flush_rounds == 2, bound=2)
            await trio.sleep(0.1)
            nats_server.kill()
            nats_server.start()
            await wait_until(lambda: "reconnected" in kinds, bound=10)
            assert transport.connected
            assert not doomed_done.is_set(), "the frozen server answered: no orphaned round"
            start = trio.current_time()
            with trio.fail_after(10):
                await transport.flush()
            elapsed = trio.current_time() - start
            nursery.cancel_scope.cancel()
    assert elapsed < 1.0, f"the first flush after the reconnect took {elapsed:.2f} s"
