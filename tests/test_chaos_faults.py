"""Server faults: SIGKILL and restart the nats-server under a client that emits claims and follows
a pulse; and a server that never comes back.

The real-server tests check what SPEC.md's "Delivery guarantees" promise: in JetStream mode every
claim lands in ``BACKBEAT_STATUS_<cluster>`` exactly once whatever the server does, beats never go
backwards, the client degrades while the pulse is unreachable and resynchronises when it is back
(visible in ``health()``), the outbox is bounded, and what could not be delivered is reported at
close. A MockClock variant on the in-memory broker runs the same outage story under hypothesis.

CI runs these bounded (a few seconds each); ``--soak`` runs more claims and more kills.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable

import nats
import pytest
import trio
import trio.testing
import trio_asyncio
from _guards import fail_on_bare_cancel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import backbeat_trio as bb3
from backbeat_trio._bridge.nats import open_nats_transport
from backbeat_trio._core.beats import status_stream_name, status_subject
from backbeat_trio._embedded import NatsServerProcess
from backbeat_trio._errors import UndeliveredClaims
from backbeat_trio.testing import open_fake_cluster

pytestmark = pytest.mark.chaos


# --- helpers -------------------------------------------------------------------------------------
async def create_status_stream(url: str, cluster: str) -> None:
    """Create ``BACKBEAT_STATUS_<cluster>`` the way the reverb does (through our transport)."""
    cfg = bb3.Config(cluster_id=cluster, agent_id="stream-setup", nats_url=url)
    async with open_nats_transport(cfg) as transport:
        await transport.jetstream.ensure_stream(
            status_stream_name(cluster), [status_subject(cluster)]
        )


async def read_stream(url: str, stream: str) -> list[tuple[dict[str, str], bytes]]:
    """Every message a JetStream stream holds, as (headers, body), with a plain nats-py client."""

    async def _read() -> list[tuple[dict[str, str], bytes]]:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5)
        try:
            js = nc.jetstream()
            info = await js.stream_info(stream)
            out = []
            if info.state.messages:
                for seq in range(info.state.first_seq, info.state.last_seq + 1):
                    msg = await js.get_msg(stream, seq)
                    out.append((dict(msg.headers or {}), bytes(msg.data or b"")))
            assert len(out) == info.state.messages
            return out
        finally:
            await nc.close()

    return await trio_asyncio.aio_as_trio(_read)()


async def wait_until(client: bb3.Client, predicate: Callable[[], bool], what: str) -> None:
    """Wait, beat by beat (the client beats locally even while disconnected), for ``predicate``."""
    with trio.move_on_after(30):
        while not predicate():
            with trio.move_on_after(1.0):  # re-check at least once a second
                await client.wait_for_beat()
    assert predicate(), f"timed out waiting for {what}: {client!r}"


def strictly_increasing(xs: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(xs))


# --- SIGKILL + restart under load ----------------------------------------------------------------
@fail_on_bare_cancel
async def test_sigkill_and_restart_keeps_claims_exactly_once_and_beats_monotonic(
    soak: bool,
) -> None:
    cluster = "chaos-kill"
    n_claims = 10_000 if soak else 1000
    kills = 10 if soak else 3
    emit_seconds = 60.0 if soak else 6.0
    key = bb3.generate_signing_key()
    keyring = bb3.Keyring({"agent-1": key.verify_key})
    server = NatsServerProcess(jetstream=True)
    await trio.to_thread.run_sync(server.start)
    try:
        async with trio_asyncio.open_loop():
            await create_status_stream(server.url, cluster)
            cfg = bb3.Config(
                cluster_id=cluster,
                agent_id="agent-1",
                nats_url=server.url,
                signing_key=key,
                jetstream=True,
                reconnect_delay=0.1,
                jitter_tolerance=0.1,
            )
            pulse_cfg = bb3.PulseConfig(cluster_id=cluster, nats_url=server.url, tempo_bpm=600)
            emitted: list[bb3.StatusClaim] = []
            delivered: list[int] = []
            async with trio.open_nursery() as nursery:
                await nursery.start(bb3.run_pulse, pulse_cfg)
                async with bb3.open_client(cfg) as bb:
                    beats = bb.beats(buffer=1_000_000)

                    async def follow() -> None:
                        async for frame in beats:
                            delivered.append(frame.beat_index)

                    nursery.start_soon(follow)
                    await wait_until(bb, lambda: bb.current_beat is not None, "a first beat")
                    t0 = trio.current_time()

                    async def chaos_monkey() -> None:
                        for k in range(kills):
                            await trio.sleep_until(t0 + (k + 1) * emit_seconds / (kills + 1))
                            await trio.to_thread.run_sync(server.kill)
                            await trio.sleep(0.4)  # down for several beats (600 BPM: 0.1 s)
                            await trio.to_thread.run_sync(server.start)
                            await wait_until(
                                bb, lambda k=k: bb.metrics.resyncs >= k + 1, "a resync"
                            )

                    async with trio.open_nursery() as chaos:
                        chaos.start_soon(chaos_monkey)
                        interval = emit_seconds / n_claims
                        for i in range(n_claims):
                            await trio.sleep_until(t0 + i * interval)
                            claim = bb3.StatusClaim(
                                state="executing",
                                beats_left=n_claims - i,
                                progress=i / n_claims,
                                notes=f"claim {i}",
                            )
                            emitted.append(await bb.emit_status(claim))
                    with trio.fail_after(60):
                        await bb.flush_claims()
                    await wait_until(
                        bb,
                        lambda: bb.metrics.resyncs >= kills and not bb.degraded,
                        "the pulse back after the last restart",
                    )
                    health = bb.health()
                    assert bb.pending_claims == 0
                    assert bb.undelivered() == []
                nursery.cancel_scope.cancel()

            stored = await read_stream(server.url, status_stream_name(cluster))
    finally:
        await trio.to_thread.run_sync(server.close)

    # exactly once in the stream: every claim, no duplicate, nothing else
    ids = [headers["Nats-Msg-Id"].rsplit(":", 1)[0] for headers, _ in stored]  # no digest
    want = [f"agent-1:{c.hlc}" for c in emitted]
    assert len(set(want)) == n_claims
    assert len(ids) == len(set(ids)), "a claim is stored twice"
    assert set(ids) == set(want)
    assert len(stored) == n_claims
    # what is stored is what was signed: each body verifies against the agent's key
    notes = set()
    for headers, body in stored:
        claim = bb3.verify_claim(body, headers, keyring)
        digest = hashlib.sha256(body + headers["Backbeat-Sig"].encode()).hexdigest()[:16]
        assert headers["Nats-Msg-Id"] == f"agent-1:{claim.hlc}:{digest}"
        notes.add(claim.notes)
    assert notes == {f"claim {i}" for i in range(n_claims)}

    # beats: strictly increasing across every outage; degraded and resynchronised each time
    assert len(delivered) > 20
    assert strictly_increasing(delivered)
    m = health.metrics
    assert health.reconnect_count >= kills
    assert m["reconnects"] >= kills
    assert m["disconnects"] >= kills
    assert m["degraded_episodes"] >= kills
    assert m["resyncs"] >= kills
    assert m["degraded_beats"] > 0
    assert m["claims_acked"] == n_claims
    assert health.connected
    assert not health.local_degradation
    assert health.delivery == "jetstream"
    assert m["errors"] >= 2 * kills  # each outage noted: the disconnect, the silent pulse


# --- a server that never comes back --------------------------------------------------------------
@pytest.mark.parametrize("delivery", ["jetstream", "core"])
@fail_on_bare_cancel
async def test_server_that_never_comes_back(delivery: str) -> None:
    cluster = f"chaos-dead-{delivery}"
    outbox_size = 40
    close_grace = 0.5
    server = NatsServerProcess(jetstream=True)
    await trio.to_thread.run_sync(server.start)
    try:
        async with trio_asyncio.open_loop():
            if delivery == "jetstream":
                await create_status_stream(server.url, cluster)
            cfg = bb3.Config(
                cluster_id=cluster,
                agent_id="agent-1",
                nats_url=server.url,
                jetstream=delivery == "jetstream",
                reconnect_delay=0.1,
                outbox_size=outbox_size,
                close_grace=close_grace,
            )
            pulse_cfg = bb3.PulseConfig(cluster_id=cluster, nats_url=server.url, tempo_bpm=600)
            queued: list[bb3.StatusClaim] = []
            async with trio.open_nursery() as nursery:
                await nursery.start(bb3.run_pulse, pulse_cfg)
                reported: list[bb3.StatusClaim] | None = None
                message = ""
                try:
                    async with bb3.open_client(cfg) as bb:
                        assert bb.delivery_mode == delivery
                        await wait_until(bb, lambda: (bb.current_beat or 0) >= 3, "pulse beats")
                        delivered_before = await bb.emit_status(bb3.StatusClaim(notes="before"))
                        with trio.fail_after(10):
                            await bb.flush_claims()

                        await trio.to_thread.run_sync(server.kill)
                        # the client keeps the beat alone, one index at a time
                        local: list[int] = []
                        with trio.fail_after(10):
                            while len(local) < 10:
                                local.append((await bb.wait_for_beat()).beat_index)
                        assert local == list(range(local[0], local[0] + 10))
                        health = bb.health()
                        assert health.local_degradation
                        assert not health.connected
                        assert health.metrics["degraded_beats"] >= 9

                        # claims queue up to outbox_size, then emit_status refuses
                        for i in range(outbox_size):
                            queued.append(await bb.emit_status(bb3.StatusClaim(notes=f"q{i}")))
                        assert bb.pending_claims == outbox_size
                        with pytest.raises(bb3.NotConnected, match="outbox full"):
                            await bb.emit_status(bb3.StatusClaim(notes="one too many"))
                        assert bb.pending_claims == outbox_size
                        assert bb.metrics.claims_failed == 1
                        assert [c.hlc for c in bb.undelivered()] == [c.hlc for c in queued]
                        closing_at = time.monotonic()
                    # leaving the block: close_grace to deliver, then UndeliveredClaims
                except UndeliveredClaims as exc:
                    reported, message = exc.claims, str(exc)
                close_took = time.monotonic() - closing_at
                nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(server.close)

    assert reported is not None, "closing with queued claims must raise UndeliveredClaims"
    assert [c.hlc for c in reported] == [c.hlc for c in queued]  # oldest first, all of them
    assert [c.notes for c in reported] == [f"q{i}" for i in range(outbox_size)]
    assert delivered_before.hlc not in {c.hlc for c in reported}
    assert str(outbox_size) in message
    # bounded: the grace, plus the transport's own bounded close, plus scheduling slack
    assert close_took < close_grace + 2.0 + 2.0


# --- the same outage story on the in-memory broker, under hypothesis -----------------------------
outage_plans = st.lists(
    st.tuples(
        st.floats(min_value=0.1, max_value=3.0),  # seconds up before the outage
        st.floats(min_value=0.01, max_value=3.0),  # seconds down
    ),
    min_size=1,
    max_size=4,
)


async def _memory_outages(plan: list[tuple[float, float]], claims_per_second: float) -> None:
    completed = False
    async with open_fake_cluster("mem-chaos", tempo_bpm=240, jetstream=True) as cluster:
        emitted: list[bb3.StatusClaim] = []
        delivered: list[int] = []
        async with cluster.open_client("agent-1", jetstream=True) as bb:
            beats = bb.beats(buffer=100_000)
            async with trio.open_nursery() as nursery:

                async def follow() -> None:
                    async for frame in beats:
                        delivered.append(frame.beat_index)

                async def emit_steadily() -> None:
                    i = 0
                    while True:
                        emitted.append(await bb.emit_status(bb3.StatusClaim(notes=f"c{i}")))
                        i += 1
                        await trio.sleep(1 / claims_per_second)

                nursery.start_soon(follow)
                await bb.wait_for_beat()
                nursery.start_soon(emit_steadily)
                long_outages = 0
                for up, down in plan:
                    await trio.sleep(up)
                    cluster.broker.set_down()
                    await trio.sleep(down)
                    cluster.broker.set_up()
                    # the pulse skips what fell in the outage; a beat and a tolerance of silence
                    # (0.25 s + 50 ms at 240 BPM) is what it takes to degrade, and two beats up
                    # before it make sure the client had resynchronised from the previous one
                    long_outages += down > 0.25 + 0.05 + 0.25 and up >= 0.5
                await trio.sleep(2.0)
                nursery.cancel_scope.cancel()
            with trio.fail_after(10):
                await bb.flush_claims()
            metrics = bb.metrics
            assert bb.undelivered() == []
        stream = cluster.broker.streams[status_stream_name("mem-chaos")]
        ids = [(m.headers or {})["Nats-Msg-Id"].rsplit(":", 1)[0] for m in stream.messages]
        assert len(ids) == len(set(ids))
        assert set(ids) == {f"agent-1:{c.hlc}" for c in emitted}
        assert strictly_increasing(delivered)
        assert metrics.disconnects == metrics.reconnects == len(plan)
        assert metrics.degraded_episodes >= long_outages
        assert metrics.resyncs == metrics.degraded_episodes
        assert not bb.degraded
        completed = True
    # an error swallowed on the way out (a Cancelled absorbed by the cluster's scope) ends early
    assert completed


def test_memory_broker_outages_keep_claims_exactly_once(soak: bool) -> None:
    @settings(
        max_examples=400 if soak else 25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(plan=outage_plans, claims_per_second=st.sampled_from([2.0, 20.0, 100.0]))
    def run(plan: list[tuple[float, float]], claims_per_second: float) -> None:
        clock = trio.testing.MockClock(autojump_threshold=0)
        trio.run(_memory_outages, plan, claims_per_second, clock=clock)

    run()
