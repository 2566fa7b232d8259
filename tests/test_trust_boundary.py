"""Every subject at once, over a real nats-server (issue 17's hostile-input run, bounded in time).

A pulse (not sharing its subject), a reverb with a keyring that refuses unsigned claims, the
dashboard it feeds, an admin server, and one honest agent signing its claims with JetStream
delivery. While the agent claims on every beat, an attacker with publish rights on every cluster
subject sends, on each beat: JSON nested past the interpreter's recursion limit, garbage, huge
integers and NaN on the beat, status, tempo and bar subjects; a beat frame near int64's end and
one for another cluster; forged, unknown-key, other-agent-key, unsigned, future-stamped and
int64-edge claims; and, before the agent starts, ``{}`` stored under every claim id the honest
agent could use in the next 1.5 s (item 2's pre-emption, in the old id form and in the new form
with guessed digests).

What must hold: every service keeps running and no task dies; the agent's beats have no gap the
pulse did not make; each honest claim is acknowledged, counted by the reverb exactly once, and the
only row on the dashboard; every hostile claim is refused under its reason; this process's RSS
grows by less than RSS_BOUND_MIB.
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
import resource
import time

import pytest
import trio

import backbeat_trio as bb3
from backbeat_trio._bridge.nats import open_nats_transport
from backbeat_trio._core.beats import bar_subject, beat_subject, status_subject, tempo_subject
from backbeat_trio._core.hlc import HLC, node_id_for
from backbeat_trio._ops.dashboard import Dashboard
from backbeat_trio._transport.options import ConnectionOptions
from tests._ha_harness import wait_until
from tests.test_reverb_verified import HONEST, OTHER, Hostile, craft, frame_at

pytestmark = [pytest.mark.nats, pytest.mark.chaos]

TEMPO = 300  # 0.2 s beats
CLAIMS = 20  # honest claims, one per beat
RSS_BOUND_MIB = 64
DEEP = b"[" * 5000 + b"]" * 5000  # past the recursion limit; refused before a decoder sees it


def _rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover


def junk(cluster: str) -> list[bytes]:
    """What no decoder may choke on, for every subject."""
    return [
        DEEP,
        b'{"type":"backbeat.beatframe.v1","x":' + DEEP + b"}",
        b'{"a":' * 3000 + b"1" + b"}" * 3000,
        os.urandom(300),
        b"\xef\xbb\xbf{}",
        b'{"beat_index": 1e999, "tempo_bpm": NaN}',
        b'{"beat_index": 99999999999999999999999999999999}',
        b'{"cluster_id":"' + cluster.encode() + b'","tempo_bpm":' + b"9" * 4000 + b"}",
    ]


def preempting_ids(now_ms: int) -> list[str]:
    """The ids an attacker guesses for the honest agent's next 1.5 s of claims: v1's
    ``<agent>:<hlc>`` (which the stream would have deduplicated the real claims against) and
    the current form with a guessed digest."""
    node = node_id_for(HONEST)
    ids = []
    for ms in range(now_ms, now_ms + 1500):
        for c in range(2):
            stamp = f"{ms:012x}:{c:04x}:{node:04x}"
            ids.append(f"{HONEST}:{stamp}")
            ids.append(f"{HONEST}:{stamp}:{'0' * 16}")
    return ids


async def test_hostile_input_on_every_subject_while_an_honest_agent_runs(nats_url: str) -> None:
    cluster = "trust"
    keys = {name: bb3.generate_signing_key() for name in (HONEST, OTHER, "stranger")}
    keyring = bb3.Keyring({HONEST: keys[HONEST].verify_key, OTHER: keys[OTHER].verify_key})
    pcfg = bb3.PulseConfig(cluster_id=cluster, nats_url=nats_url, tempo_bpm=TEMPO)
    assert pcfg.share_beat_subject is False
    rcfg = bb3.ReverbConfig(cluster_id=cluster, nats_url=nats_url, keyring=keyring)
    acfg = bb3.Config(
        cluster_id=cluster,
        agent_id=HONEST,
        nats_url=nats_url,
        signing_key=keys[HONEST],
        jitter_tolerance=0.5,  # a loaded CI box must not turn real beats stale
    )
    dashboard = Dashboard(cluster)
    hostile: list[Hostile] = []
    sent: collections.Counter[str] = collections.Counter()
    delivered: list[int] = []
    with trio.fail_after(90):
        async with (
            open_nats_transport(ConnectionOptions(nats_url=nats_url, name="attacker")) as attacker,
            trio.open_nursery() as nursery,
        ):
            pulse = await nursery.start(bb3.run_pulse, pcfg)
            reverb = await nursery.start(bb3.run_reverb, rcfg)
            await nursery.start(functools.partial(dashboard.run, attacker, reverb=reverb))
            await nursery.start(
                functools.partial(bb3.serve_admin, "127.0.0.1:0", reverb=reverb, transport=attacker)
            )
            await reverb.first_beat.wait()
            # item 2: the ids of the honest agent's next claims, taken before it sends any
            for msg_id in preempting_ids(int(time.time() * 1000)):
                attacker.publish(status_subject(cluster), b"{}", headers={"Nats-Msg-Id": msg_id})
                sent["preempt"] += 1
            await attacker.flush()
            rss_before = _rss_mib()

            async with bb3.open_client(acfg) as agent:
                assert agent.health().delivery == "jetstream"
                beats = agent.beats(buffer=1000)

                async def follow() -> None:
                    async for frame in beats:
                        delivered.append(frame.beat_index)

                nursery.start_soon(follow)
                clocks: dict[str, HLC] = {}
                for n in range(CLAIMS):
                    frame = await agent.wait_for_beat()
                    await agent.emit_status(
                        bb3.StatusClaim(state="executing", notes=f"real {n}", progress=n / CLAIMS)
                    )
                    for payload in junk(cluster):
                        for subject in (
                            beat_subject(cluster),
                            status_subject(cluster),
                            tempo_subject(cluster),
                            bar_subject(cluster),
                        ):
                            attacker.publish(subject, payload)
                            sent["junk"] += 1
                    # item 4: frames no client may take (int64's end), another cluster's frame
                    attacker.publish(beat_subject(cluster), frame_at(cluster, 2**63 - 3))
                    attacker.publish(beat_subject(cluster), frame_at("elsewhere", 1))
                    crafted = craft(keys, clocks, frame.beat_index)
                    hostile += crafted
                    for h in crafted:
                        attacker.publish(status_subject(cluster), h.body, headers=h.headers)
                    await attacker.flush()
                await agent.flush_claims()
                metrics = agent.metrics
                assert metrics.claims_acked == CLAIMS, repr(metrics)
                assert metrics.claims_suspected_collisions == 0
                frames_refused = agent.health().metrics

            judged = lambda: reverb.claims_counted + reverb.claims_late  # noqa: E731
            await wait_until(lambda: judged() >= CLAIMS, what=lambda: repr(reverb))
            await wait_until(
                lambda: sum(reverb.rejected_by_reason.values()) >= len(hostile) + sent["preempt"],
                what=lambda: repr(reverb.rejected_by_reason),
            )
            await reverb.wait_for_report()
            published = pulse.published
            await wait_until(lambda: pulse.published > published + 2)  # the pulse still beats
            assert reverb.running
            snapshot = dashboard.state.snapshot()
            rss_after = _rss_mib()
            nursery.cancel_scope.cancel()

    # the agent: every beat the pulse published while it listened, in order, no gap it made
    assert len(delivered) >= CLAIMS
    gaps = [b - a - 1 for a, b in itertools.pairwise(delivered) if b != a + 1]
    assert all(g > 0 for g in gaps)  # strictly increasing
    assert sum(gaps) <= pulse.skipped_late, (gaps, pulse.skipped_late)
    assert frames_refused["malformed"] >= CLAIMS * (len(junk(cluster)) + 1)
    assert frames_refused["wrong_cluster"] >= CLAIMS
    # the pulse: never stopped, took the junk on its subject for junk, nothing for a second pulse
    assert pulse.foreign_frames == 0
    assert pulse.bad_beat_messages >= CLAIMS * (len(junk(cluster)) + 2)
    assert pulse.bad_tempo_messages >= CLAIMS * len(junk(cluster))
    assert pulse.tempo_changes == 0
    # the reverb: each honest claim once; each hostile claim refused under its reason
    assert reverb.claims_counted + reverb.claims_late == CLAIMS
    expected = collections.Counter(h.reason for h in hostile)
    for reason, count in expected.items():
        assert reverb.rejected_by_reason.get(reason, 0) >= count, (
            reason,
            reverb.rejected_by_reason,
        )
    assert reverb.latest_claims.keys() == {HONEST}
    # the dashboard: one row, the honest agent's, verified, its latest claim
    [row] = snapshot["agents"]
    assert row["agent_id"] == HONEST
    assert row["signed"] is True
    assert row["notes"] == f"real {CLAIMS - 1}"
    assert snapshot["counters"]["claims"] == CLAIMS
    growth = rss_after - rss_before
    print(f"\nRSS {rss_before:.1f} -> {rss_after:.1f} MiB; sent {dict(sent)}; {reverb!r}")
    assert growth < RSS_BOUND_MIB, growth
