"""Review 2: a client handed a connection mirrors the shared screen's refusals into its metrics
(over a real nats-server): through the ``metrics`` property at once, and into a kept
``metrics`` object with the next beat the client takes in."""

from __future__ import annotations

import pytest
import trio
import trio_asyncio

import backbeat_trio as bb3
from backbeat_trio._core.beats import beat_subject
from tests._ha_harness import wait_until

pytestmark = pytest.mark.nats


def agent(url: str, cluster: str) -> bb3.Config:
    return bb3.Config(cluster_id=cluster, agent_id="agent-1", nats_url=url, jetstream=False)


async def test_review2_a_kept_metrics_object_sees_the_refused_frames(nats_url: str) -> None:
    # A caller (a dashboard, a benchmark, user code) may keep ``m = client.metrics`` and read
    # ``m.malformed`` later, as with every other counter of it. Handed a connection, the
    # refusals are counted once by the connection's screen; the client brings them into its
    # own counters when they are read and with every frame it takes in.
    cluster = "rv2-kept"
    pulse = bb3.PulseConfig(cluster_id=cluster, tempo_bpm=600, nats_url=nats_url)
    async with (
        trio_asyncio.open_loop(),
        trio.open_nursery() as nursery,
        bb3.open_nats_transport(agent(nats_url, cluster)) as publisher,
        bb3.open_nats_transport(agent(nats_url, cluster)) as conn,
        bb3.open_client(agent(nats_url, cluster), transport=conn) as client,
    ):
        await nursery.start(bb3.run_pulse, pulse)
        beats = client.beats()
        with trio.fail_after(10):
            await beats.receive()
        kept = client.metrics
        publisher.publish(beat_subject(cluster), b"not a beat frame")
        await publisher.flush()
        screens = [p for _, p, _ in conn.shared_subscriptions.subscriptions]
        assert screens, "no shared subscription was made"
        await wait_until(lambda: screens[0].refused == 1, bound=2)
        with trio.fail_after(10):  # a beat taken in after the junk brings the count along
            while kept.malformed == 0:
                await beats.receive()
        assert kept.malformed == 1
        assert client.metrics.malformed == 1
        nursery.cancel_scope.cancel()
