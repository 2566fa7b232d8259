"""Review: a single client handed a NatsTransport (over a real nats-server)."""

from __future__ import annotations

import contextlib

import pytest
import trio_asyncio

import backbeat_trio as bb3
from backbeat_trio._core.beats import beat_subject
from tests._ha_harness import wait_until

pytestmark = pytest.mark.nats


def agent(url: str, cluster: str) -> bb3.Config:
    return bb3.Config(cluster_id=cluster, agent_id="agent-1", nats_url=url, jetstream=False)


async def _malformed_seen(client: bb3.Client, publisher: bb3.NatsTransport, cluster: str) -> int:
    publisher.publish(beat_subject(cluster), b"not a beat frame")
    await publisher.flush()
    with contextlib.suppress(AssertionError):  # not seen within the bound: the count says
        await wait_until(lambda: client.metrics.malformed > 0, bound=2)
    return client.metrics.malformed


async def test_review_a_client_handed_a_transport_still_counts_malformed_frames(
    nats_url: str,
) -> None:
    # Before this change, a client counted a malformed beat frame in its own metrics and
    # health() whether it opened its connection or was handed one. Handed a NatsTransport it now
    # counts nothing: the frame is counted only on the connection's shared FrameScreen, which
    # the client's health() and ClientCollector never show.
    cluster = "rv-malformed"
    async with (
        trio_asyncio.open_loop(),
        bb3.open_nats_transport(agent(nats_url, cluster)) as publisher,
    ):
        async with bb3.open_client(agent(nats_url, cluster)) as own:
            assert await _malformed_seen(own, publisher, cluster) == 1  # the baseline
        async with (
            bb3.open_nats_transport(agent(nats_url, cluster)) as conn,
            bb3.open_client(agent(nats_url, cluster), transport=conn) as handed,
        ):
            seen = await _malformed_seen(handed, publisher, cluster)
            health = handed.health()
            screens = [p for _, p, _ in conn.shared_subscriptions.subscriptions]
        assert screens, "no shared subscription was made"
        assert seen == 1, (
            f"handed a transport, the client counted {seen} malformed frames "
            f"(the connection's screen counted {screens[0].refused}); health: {health.metrics}"
        )
