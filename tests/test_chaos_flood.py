"""Flood and slow consumers over a real nats-server.

100,000 beat frames (2 KB each) hit a client whose ``beats()`` consumer sleeps: memory stays
bounded (RSS measured with psutil and printed; run with ``-s`` to see it), the newest beats are
the ones delivered, and every frame is accounted for (delivered, or counted as dropped). nats-py's
own slow-consumer errors on the client's connection surface in ``health()``, never as exceptions.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import gc
import itertools
import time
from typing import Any

import msgspec
import psutil
import pytest
import trio
import trio.lowlevel
import trio_asyncio
from _guards import fail_on_bare_cancel

import backbeat_trio as bb3
from backbeat_trio._bridge.nats import NatsTransport, open_nats_transport
from backbeat_trio._core.beats import beat_subject, phase_for, window_id
from backbeat_trio._embedded import NatsServerProcess

pytestmark = [pytest.mark.chaos, pytest.mark.nats]

MB = 1024 * 1024
PAD = "f" * 2048  # an unknown field: decoders skip it, the wire and the buffers carry it
_encoder = msgspec.json.Encoder()


def flood_frame(cluster: str, index: int, tempo: int = 1) -> bytes:
    # 1 BPM: the client cannot decide the "pulse" went silent (and keep time alone) mid-test
    deadline = _dt.datetime.fromtimestamp(time.time() + 60 / tempo, _dt.UTC)
    return _encoder.encode(
        {
            "type": "backbeat.beatframe.v1",
            "cluster_id": cluster,
            "beat_index": index,
            "downbeat": index % 4 == 0,
            "phase": phase_for(index, 4),
            "hlc": f"{int(time.time() * 1000):012x}:0000:f100",
            "deadline_at": deadline.isoformat().replace("+00:00", "Z"),
            "tempo_bpm": tempo,
            "window_id": window_id(cluster, index, 4),
            "pad": PAD,
        }
    )


async def flood(publisher: NatsTransport, cluster: str, first: int, count: int) -> None:
    """Publish ``count`` frames, flushing every 1000 so the publisher itself stays small."""
    subject = beat_subject(cluster)
    for start in range(first, first + count, 1000):
        for index in range(start, min(start + 1000, first + count)):
            publisher.publish(subject, flood_frame(cluster, index))
        await publisher.flush()


async def until_accounted(client: bb3.Client, total: int, seconds: float) -> None:
    """Wait until the intake has dealt with ``total`` frames. Dropped frames fire no event, so
    this polls, bounded in count and time."""
    with trio.fail_after(seconds):
        for _ in range(int(seconds / 0.01) + 1):
            if accounted(client.metrics) >= total:
                return
            await trio.sleep(0.01)
    raise AssertionError(f"only {accounted(client.metrics)} of {total} frames accounted for")


def accounted(m: bb3.ClientMetrics) -> int:
    """Frames the client's intake has dealt with, one way or another."""
    return (
        m.beats
        + m.transport_dropped
        + m.stale
        + m.duplicate_or_old
        + m.malformed
        + m.oversized
        + m.wrong_cluster
    )


@fail_on_bare_cancel
async def test_a_flood_at_a_sleeping_consumer_keeps_memory_bounded_and_the_newest_beats(
    nats_server: NatsServerProcess, nats_url: str, soak: bool
) -> None:
    cluster = "flood"
    warmup, count = 5000, (1_000_000 if soak else 100_000)
    process = psutil.Process()
    async with trio_asyncio.open_loop():
        cfg = bb3.Config(cluster_id=cluster, agent_id="agent-1", nats_url=nats_url, jetstream=False)
        pub_cfg = bb3.Config(cluster_id=cluster, agent_id="flooder", nats_url=nats_url)
        received: list[int] = []
        peak = [0]
        newest = -1
        newest_seen = trio.Event()
        async with (
            open_nats_transport(pub_cfg) as publisher,
            bb3.open_client(cfg) as bb,
            trio.open_nursery() as nursery,
        ):
            beats = bb.beats()
            everything = bb.beats(buffer=10 * count)  # BeatFrames are small: the pad is skipped
            delivered: list[int] = []

            async def recorder() -> None:
                async for frame in everything:
                    delivered.append(frame.beat_index)

            async def sleepy_consumer() -> None:
                async for frame in beats:
                    received.append(frame.beat_index)
                    if frame.beat_index == newest:
                        newest_seen.set()
                    await trio.sleep(0.02)

            async def sample_rss() -> None:
                while True:
                    peak[0] = max(peak[0], process.memory_info().rss)
                    await trio.sleep(0.02)

            nursery.start_soon(sleepy_consumer)
            nursery.start_soon(recorder)
            # warm up allocators and caches, so the baseline is not the cost of a first touch
            await flood(publisher, cluster, 0, warmup)
            await until_accounted(bb, warmup, 60)
            gc.collect()
            baseline = process.memory_info().rss
            peak[0] = baseline
            nursery.start_soon(sample_rss)

            started = time.monotonic()
            await flood(publisher, cluster, warmup, count)
            await until_accounted(bb, warmup + count, 120)
            flood_took = time.monotonic() - started
            growth = peak[0] - baseline
            after_flood = len(received)
            last_flooded = bb.current_beat
            assert last_flooded is not None
            # the recorder never sleeps: it catches up within a few scheduling rounds
            with trio.fail_after(10):
                while not delivered or delivered[-1] != last_flooded:
                    await trio.lowlevel.checkpoint()
            delivered_in_flood = list(delivered)

            # one more frame after the flood: the newest is delivered, at once
            newest = last_flooded + 1
            publisher.publish(beat_subject(cluster), flood_frame(cluster, newest))
            await publisher.flush()
            with trio.fail_after(10):
                await newest_seen.wait()
            m = bb.metrics
            health = bb.health()
            nursery.cancel_scope.cancel()

    print(
        f"\nflood: {count} frames of {len(flood_frame(cluster, 1))} bytes in {flood_took:.1f} s; "
        f"RSS baseline {baseline / MB:.1f} MB, peak growth {growth / MB:.1f} MB; "
        f"consumer got {len(received)}, channel dropped {m.dropped}, "
        f"transport dropped {m.transport_dropped}, stale {m.stale}"
    )
    # memory: bounded by the buffers, not by the flood (the flood itself is ~220 MB of frames)
    assert growth < 64 * MB
    # every frame accounted for, and the drops counted
    assert accounted(m) == warmup + count + 1
    assert m.degraded_beats == 0
    assert m.dropped + m.transport_dropped + m.stale > count // 2
    assert health.metrics["dropped"] == m.dropped
    assert health.metrics["transport_dropped"] == m.transport_dropped
    assert beats.dropped == m.dropped
    assert beats.delivered <= m.beats <= beats.delivered + beats.dropped + cfg.beat_buffer
    # the consumer saw few frames, in order; after the flood only the newest ones were left
    assert len(received) < count // 10
    assert all(a < b for a, b in itertools.pairwise(received))
    # what was waiting in the consumer's channel when the flood ended: the newest beats delivered
    tail = received[after_flood : received.index(newest)]
    assert 0 < len(tail) <= cfg.beat_buffer
    assert tail == delivered_in_flood[-len(tail) :]
    assert received[-1] == newest == delivered[-1]


@fail_on_bare_cancel
async def test_nats_slow_consumer_errors_surface_in_health_not_as_exceptions(
    nats_server: NatsServerProcess, nats_url: str
) -> None:
    cluster = "slowpoke"
    async with trio_asyncio.open_loop():
        cfg = bb3.Config(cluster_id=cluster, agent_id="agent-1", nats_url=nats_url, jetstream=False)
        pub_cfg = bb3.Config(cluster_id=cluster, agent_id="flooder", nats_url=nats_url)
        pulse_cfg = bb3.PulseConfig(cluster_id=cluster, nats_url=nats_url, tempo_bpm=600)
        async with (
            open_nats_transport(cfg) as transport,
            open_nats_transport(pub_cfg) as publisher,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(bb3.run_pulse, pulse_cfg)
            async with bb3.open_client(cfg, transport=transport) as bb:
                with trio.fail_after(10):
                    await bb.wait_for_beat()

                # a subscription on the client's own connection that cannot keep up: nats-py
                # drops what exceeds its pending limit and reports SlowConsumerError
                async def crawl(msg: Any) -> None:
                    await asyncio.sleep(0.005)

                raw_sub = await trio_asyncio.aio_as_trio(transport._nc.subscribe)(
                    "slowpoke.crawl", cb=crawl, pending_msgs_limit=8
                )
                for i in range(2000):
                    publisher.publish("slowpoke.crawl", b"%d" % i)
                await publisher.flush()
                with trio.fail_after(10):
                    while bb.metrics.slow_consumer == 0:
                        await bb.wait_for_beat()
                before = bb.current_beat
                assert before is not None
                with trio.fail_after(10):  # and the beat goes on, from the pulse
                    for _ in range(5):
                        await bb.wait_for_beat()
                health = bb.health()

                await trio_asyncio.aio_as_trio(raw_sub.unsubscribe)()
            nursery.cancel_scope.cancel()

    assert health.metrics["slow_consumer"] >= 1
    assert any("slow consumer" in e.lower() for e in health.errors)
    assert health.connected
    assert health.last_beat >= before + 5
    assert health.metrics["degraded_beats"] == 0
