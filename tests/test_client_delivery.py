"""Claim delivery edge cases found in review: concurrent flushes, and core-mode claims the server
never confirmed when the client closes (they must fail loudly, not vanish)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import backbeat_trio as bb3
import backbeat_trio.testing as bbt

CLUSTER = "delivery"


async def test_two_concurrent_flushes_both_return(autojump_clock: trio.testing.MockClock) -> None:
    async with (
        bbt.open_fake_cluster(CLUSTER, tempo_bpm=60, jetstream=True) as cluster,
        cluster.open_client() as bb,
    ):
        await bb.wait_for_beat()
        cluster.broker.set_down()
        await bb.emit_status(bb3.StatusClaim(notes="while down"))
        done: list[str] = []

        async def flusher(name: str) -> None:
            await bb.flush_claims()
            done.append(name)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flusher, "A")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(flusher, "B")
                await trio.testing.wait_all_tasks_blocked()
                cluster.broker.set_up()
        assert sorted(done) == ["A", "B"]
        assert bb.pending_claims == 0


async def test_core_claims_never_confirmed_are_reported_at_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bbt.open_fake_cluster(CLUSTER, tempo_bpm=60) as cluster:
        broker = cluster.broker
        transport = broker.connect()

        async def server_never_answers() -> None:
            await trio.sleep_forever()  # a stalled server: the PING never gets its PONG

        transport.flush = server_never_answers  # type: ignore[method-assign]
        cfg = cluster.config("agent-1", close_grace=1.0)
        seen: list[bb3.StatusClaim] = []
        ok_before_close: list[int] = []

        async def agent() -> None:
            async with bb3.open_client(
                cfg, transport=transport, wall_clock=bbt.virtual_wall_clock
            ) as bb:
                assert bb.delivery_mode == "core"
                seen.append(await bb.emit_status(bb3.StatusClaim(notes="unconfirmed")))
                await trio.sleep(0.5)
                ok_before_close.append(bb.metrics.claims_ok)

        with pytest.raises(bb3.UndeliveredClaims) as caught:
            await agent()
        assert ok_before_close == [0]  # published, but nobody confirmed it
        sent = seen[0]
        assert [c.hlc for c in caught.value.claims] == [sent.hlc]


async def test_a_stuck_drainer_makes_publish_refuse_instead_of_growing(nats_url: str) -> None:
    from backbeat_trio._bridge.nats import MAX_QUEUED_PUBLISHES, open_nats_transport

    cfg = bb3.Config(cluster_id=CLUSTER, agent_id="stuck", nats_url=nats_url)
    async with open_nats_transport(cfg) as transport:
        drainer = transport._drainer
        assert drainer is not None
        drainer.cancel()  # as if nats-py's write were blocked by a stalled server
        await trio.sleep(0.05)
        refused = None
        for i in range(MAX_QUEUED_PUBLISHES + 10):
            try:
                transport.publish("backbeat.test.stuck", b"x")
            except bb3.NotConnected as exc:
                refused = (i, str(exc))
                break
        assert refused is not None
        assert "not taking them" in refused[1]
        assert len(transport._outq) == MAX_QUEUED_PUBLISHES  # bounded, not growing
        transport._outq.clear()
