"""Two pulses on one cluster: the one that sees the other's frames says so, counts them and
stops, unless told to share the subject; what is no beat frame never stops it."""

from __future__ import annotations

import functools

import msgspec
import pytest
import trio
from _ha_harness import wait_until

import backbeat_trio as bb3
from backbeat_trio._bridge.nats import open_nats_transport
from backbeat_trio._core.beats import beat_subject
from backbeat_trio._core.wire import encode
from backbeat_trio._embedded import NatsServerProcess

pytestmark = pytest.mark.nats

TEMPO = 600  # 0.1 s beats


def pulse_cfg(url: str, cluster: str, **changes: object) -> bb3.PulseConfig:
    return bb3.PulseConfig(cluster_id=cluster, nats_url=url, tempo_bpm=TEMPO, **changes)  # type: ignore[arg-type]


async def test_a_second_plain_pulse_on_the_cluster_stops_one_of_them(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = "conflict"
    statuses: list[bb3.PulseStatus] = []

    async def two_pulses() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(2):  # both called pulse-1, as two plain `pulse` commands would be
                statuses.append(await nursery.start(bb3.run_pulse, pulse_cfg(nats_url, cluster)))
            await trio.sleep_forever()

    with pytest.RaisesGroup(bb3.PulseConflict, flatten_subgroups=True) as info:
        with trio.fail_after(10):
            await two_pulses()
    conflict = info.value.exceptions[0]
    assert isinstance(conflict, bb3.PulseConflict)
    message = str(conflict)
    assert f"backbeat.beat.{cluster}" in message
    assert "share_beat_subject=True" in message
    assert isinstance(conflict.frame, bb3.BeatFrame)
    assert sum(s.foreign_frames for s in statuses) >= 1
    assert any(
        r.levelname == "ERROR" and "another publisher" in r.getMessage() for r in caplog.records
    )


async def test_pulses_told_to_share_keep_beating_and_count_each_other(nats_url: str) -> None:
    cluster = "shared-subject"
    async with trio.open_nursery() as nursery:
        a = await nursery.start(
            bb3.run_pulse, pulse_cfg(nats_url, cluster, pulse_id="pa", share_beat_subject=True)
        )
        b = await nursery.start(
            bb3.run_pulse, pulse_cfg(nats_url, cluster, pulse_id="pb", share_beat_subject=True)
        )
        await wait_until(lambda: a.foreign_frames >= 3 and b.foreign_frames >= 3)
        published = (a.published, b.published)
        await wait_until(lambda: a.published > published[0] and b.published > published[1])
        nursery.cancel_scope.cancel()


async def test_what_is_no_beat_frame_is_counted_and_never_stops_the_pulse(nats_url: str) -> None:
    cluster = "not-frames"
    attacker_cfg = bb3.Config(cluster_id=cluster, agent_id="attacker", nats_url=nats_url)
    async with trio.open_nursery() as nursery, open_nats_transport(attacker_cfg) as attacker:
        pulse = await nursery.start(bb3.run_pulse, pulse_cfg(nats_url, cluster))
        junk = [b"", b"{}", b"[" * 5000, b"\xff\xfe", b'{"type":"backbeat.beatframe.v1"}']
        other = bb3.BeatFrame(
            cluster_id="elsewhere",
            beat_index=1,
            downbeat=False,
            phase="execute",
            hlc="1:0:1",
            deadline_at=bb3.HealthStatus().last_beat_time,
            tempo_bpm=60,
            window_id=bb3.window_id("elsewhere", 1),
        )
        junk.append(encode(other))
        beyond = msgspec.structs.replace(
            other, cluster_id=cluster, beat_index=2**63 - 3, window_id=bb3.window_id(cluster, 4)
        )
        junk.append(encode(beyond))  # every client refuses it: no second pulse
        for payload in junk:
            attacker.publish(beat_subject(cluster), payload)
        await attacker.flush()
        await wait_until(lambda: pulse.bad_beat_messages == len(junk))
        before = pulse.published
        await wait_until(lambda: pulse.published > before + 2)
        assert pulse.foreign_frames == 0
        nursery.cancel_scope.cancel()


async def test_a_pulse_on_a_handed_in_connection_takes_its_subscriptions_with_it(
    nats_server: NatsServerProcess, nats_url: str
) -> None:
    cluster = "handed-in"
    cfg = pulse_cfg(nats_url, cluster)

    def subscriptions() -> list[str]:
        connz = nats_server.monitor("connz?subs=1")
        mine = [c for c in connz["connections"] if c.get("name") == cfg.connection_name]
        return [s for c in mine for s in c.get("subscriptions_list") or [] if cluster in s]

    async with open_nats_transport(cfg) as conn:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(bb3.run_pulse, cfg, transport=conn))
            await conn.flush()
            seen = await trio.to_thread.run_sync(subscriptions)
            assert sorted(seen) == [beat_subject(cluster), f"backbeat.tempo.{cluster}"]
            nursery.cancel_scope.cancel()
        await conn.flush()  # the connection the pulse was handed stays open, without them
        assert conn.connected
        assert await trio.to_thread.run_sync(subscriptions) == []
