"""Claim delivery edge cases found in review: concurrent flushes, and core-mode claims the server
never confirmed when the client closes (they must fail loudly, not vanish)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import msgspec
import pytest
import trio
import trio.testing

import backbeat_trio as bb3
import backbeat_trio.testing as bbt
from backbeat_trio._client.delivery import BURST_BATCH_S, ClaimDelivery
from tests.test_outbox_core import new_outbox

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


class _StepCounter(trio.abc.Instrument):
    """Counts the steps each task takes, by task name."""

    def __init__(self) -> None:
        self.steps: dict[str, int] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] = self.steps.get(task.name, 0) + 1


async def test_a_flush_wakes_once_all_is_acknowledged_not_per_puback(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        bbt.open_fake_cluster(CLUSTER, tempo_bpm=60, jetstream=True) as cluster,
        cluster.open_client() as bb,
    ):
        await bb.wait_for_beat()
        cluster.broker.set_down()
        for i in range(50):
            bb.emit_status_nowait(bb3.StatusClaim(notes=str(i)))
        counter = _StepCounter()

        async def waiter() -> None:
            await bb.flush_claims()

        trio.lowlevel.add_instrument(counter)
        try:
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(waiter, name="waiter")
                    await trio.testing.wait_all_tasks_blocked()
                    cluster.broker.set_up()  # the 50 go out again, acked one by one
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert bb.pending_claims == 0
        assert bb.metrics.claims_acked == 50
        # its first step, the wake-up once nothing is left, the transport's flush
        assert counter.steps["waiter"] <= 4


@contextlib.asynccontextmanager
async def _jetstream_client(
    nats_url: str, cluster: str
) -> AsyncIterator[tuple[bb3.NatsTransport, bb3.Client]]:
    """A JetStream client over a real nats-server, on a connection of its own, its cluster's
    status stream made first."""
    from backbeat_trio._core.beats import status_stream_name, status_subject

    cfg = bb3.Config(cluster_id=cluster, agent_id=cluster, nats_url=nats_url, jetstream=True)
    async with bb3.open_nats_transport(cfg) as transport:
        await transport.jetstream.ensure_stream(
            status_stream_name(cluster), [status_subject(cluster)]
        )
        async with bb3.open_client(cfg, transport=transport) as bb:
            assert bb.delivery_mode == "jetstream"
            yield transport, bb


async def test_pubacks_are_handled_as_they_arrive_without_waking_a_task(nats_url: str) -> None:
    async with _jetstream_client(nats_url, "delivery-inline") as (_, bb):
        counter = _StepCounter()
        trio.lowlevel.add_instrument(counter)
        try:
            for i in range(500):
                bb.emit_status_nowait(bb3.StatusClaim(notes=str(i)))
            with trio.fail_after(20):
                await bb.flush_claims()
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert bb.metrics.claims_acked == 500
    listener = [n for n in counter.steps if n.endswith("run_ack_listener")]
    # the listener wakes for its retry period only (a burst takes far less), never per ack
    assert sum(counter.steps[n] for n in listener) <= 2, counter.steps


async def test_a_jetstream_flush_sends_no_ping_once_every_puback_is_in(nats_url: str) -> None:
    async with _jetstream_client(nats_url, "delivery-noping") as (transport, bb):
        rounds = transport.flush_rounds
        for i in range(200):
            await bb.emit_status(bb3.StatusClaim(notes=str(i)))
        with trio.fail_after(20):
            await bb.flush_claims()
        assert bb.metrics.claims_acked == 200
        assert bb.pending_claims == 0
        # the PubAcks said the stream has every claim: a PING/PONG would prove nothing more
        assert transport.flush_rounds == rounds


def _burst_client(
    cluster: bbt.FakeCluster, published: list[tuple[float, str]]
) -> contextlib.AbstractAsyncContextManager[bb3.Client]:
    """A JetStream client on its own memory transport that notes (time, hlc) of each claim
    it publishes (first publishes and re-publishes alike)."""
    transport = cluster.broker.connect()
    real_publish = transport.publish

    def publish(
        subject: str, payload: bytes, *, headers: dict[str, str] | None = None, reply: str = ""
    ) -> None:
        if subject.startswith("backbeat.status."):
            published.append((trio.current_time(), msgspec.json.decode(payload)["hlc"]))
        real_publish(subject, payload, headers=headers, reply=reply)

    transport.publish = publish  # type: ignore[method-assign]
    return bb3.open_client(
        cluster.config("agent-1"), transport=transport, wall_clock=bbt.virtual_wall_clock
    )


async def test_a_burst_of_jetstream_claims_goes_out_in_batches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    published: list[tuple[float, str]] = []
    async with bbt.open_fake_cluster(CLUSTER, tempo_bpm=60, jetstream=True) as cluster:
        async with _burst_client(cluster, published) as bb:
            assert bb.delivery_mode == "jetstream"
            sent = []
            for i in range(100):  # one claim a millisecond
                sent.append(await bb.emit_status(bb3.StatusClaim(notes=str(i))))
                await trio.sleep(0.001)
            with trio.fail_after(10):
                await bb.flush_claims()
            assert bb.metrics.claims_acked == 100
        stream = cluster.broker.streams[f"BACKBEAT_STATUS_{CLUSTER}"]
        stored = [msgspec.json.decode(m.data)["hlc"] for m in stream.stored_on("backbeat.>")]
    assert [hlc for _, hlc in published] == [c.hlc for c in sent]  # each once, in order
    assert stored == [c.hlc for c in sent]
    # in batches of BURST_BATCH_S, not a publish each
    batches = len({t for t, _ in published})
    assert batches <= 0.1 / BURST_BATCH_S + 2, batches


async def test_a_claim_after_a_quiet_spell_goes_out_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    published: list[tuple[float, str]] = []
    async with (
        bbt.open_fake_cluster(CLUSTER, tempo_bpm=60, jetstream=True) as cluster,
        _burst_client(cluster, published) as bb,
    ):
        for _ in range(3):
            claim = bb.emit_status_nowait(bb3.StatusClaim(notes="alone"))
            assert published[-1] == (trio.current_time(), claim.hlc)
            await trio.sleep(2 * BURST_BATCH_S)


async def test_claims_held_for_their_batch_survive_a_disconnect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    published: list[tuple[float, str]] = []
    async with bbt.open_fake_cluster(CLUSTER, tempo_bpm=60, jetstream=True) as cluster:
        async with _burst_client(cluster, published) as bb:
            sent = [bb.emit_status_nowait(bb3.StatusClaim(notes=str(i))) for i in range(10)]
            assert len(published) == 1  # the rest wait for their batch, kept by the outbox
            held = [c.hlc for c in sent[1:]]
            assert [c.hlc for c in bb.undelivered()][-9:] == held
            cluster.broker.set_down()
            await trio.sleep(1.0)
            assert [c.hlc for c in bb.undelivered()][-9:] == held
            assert len(published) == 1  # nothing went into the dead connection
            cluster.broker.set_up()
            with trio.fail_after(10):
                await bb.flush_claims()
            assert bb.metrics.claims_acked == 10
        stream = cluster.broker.streams[f"BACKBEAT_STATUS_{CLUSTER}"]
        stored = [msgspec.json.decode(m.data)["hlc"] for m in stream.stored_on("backbeat.>")]
    assert stored == [c.hlc for c in sent]  # each once, in the order emitted


async def test_claims_held_for_their_batch_wait_behind_a_refused_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    published: list[tuple[float, str]] = []
    async with bbt.open_fake_cluster(CLUSTER, tempo_bpm=60, jetstream=True) as cluster:
        async with _burst_client(cluster, published) as bb:
            cluster.broker.jetstream_available = False  # the first claim gets a 503
            sent = [bb.emit_status_nowait(bb3.StatusClaim(notes=str(i))) for i in range(10)]
            cluster.broker.jetstream_available = True  # back before the held ones' batch
            await trio.sleep(BURST_BATCH_S / 2)  # the 503 is in; their batch is not due yet
            assert len(published) == 1
            with trio.fail_after(10):
                await bb.flush_claims()
            assert bb.metrics.claims_acked == 10
        stream = cluster.broker.streams[f"BACKBEAT_STATUS_{CLUSTER}"]
        stored = [msgspec.json.decode(m.data)["hlc"] for m in stream.stored_on("backbeat.>")]
    # the refused one went again first, then the held ones: stored in the order emitted
    assert stored == [c.hlc for c in sent]


class _DeadTransport:
    """A transport whose connection died before its event reached the client."""

    def __init__(self) -> None:
        self.connected = False
        self.published: list[bytes] = []

    def publish(self, subject: str, payload: bytes, *, headers: dict[str, str], reply: str) -> None:
        self.published.append(payload)


@pytest.mark.parametrize("jetstream", [True, False])
async def test_a_claim_emitted_before_the_disconnect_event_goes_into_no_dead_socket(
    jetstream: bool,
) -> None:
    outbox = new_outbox(jetstream=jetstream)
    transport = _DeadTransport()
    delivery = ClaimDelivery(outbox, transport, "backbeat.status.c")  # type: ignore[arg-type]
    delivery.connected = True  # the client has not heard of the disconnect yet
    sent = delivery.emit(bb3.StatusClaim(notes="in between"), 1)
    assert transport.published == []
    assert outbox.undelivered() == [sent]
    transport.connected = True
    delivery.on_reconnected()
    assert len(transport.published) == 1
    assert msgspec.json.decode(transport.published[0])["hlc"] == sent.hlc
