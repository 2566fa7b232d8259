"""What the reverb shows is what it verified, over a real nats-server (issue 17, items 3 and 4).

A pulse, a reverb with a keyring that refuses unsigned claims, the dashboard fed by that reverb,
an admin server over it, and one honest signed agent (``open_client``). An attacker with publish
rights on the status subject sends forged, unknown-key, other-agent-key, unsigned, far-future and
int64-edge claims. The dashboard, ``/bars``, ``/metrics`` and the published BarReports must show
the honest agent's accepted claims and nothing else, the honest row must keep moving, and each
refusal must be counted under its own reason. A beat frame near int64's end must neither stop the
reverb nor make it publish a report past int64.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import functools
import os
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey
from prometheus_client.parser import text_string_to_metric_families

import backbeat_trio as bb3
from backbeat_trio._bridge.nats import NatsTransport, open_nats_transport
from backbeat_trio._core.aggregate import OUT_OF_RANGE, TOO_FAR_AHEAD, BarAggregator
from backbeat_trio._core.beats import bar_subject, beat_subject, status_subject, window_id
from backbeat_trio._core.dashboard import DashboardState
from backbeat_trio._core.hlc import HLC, HLCStamp, node_id_for
from backbeat_trio._core.rules import INT64_MAX
from backbeat_trio._core.signing import (
    HEADER_AGENT,
    HEADER_KEY,
    HEADER_SIG,
    ReplayCache,
    sign_headers,
    verify_claim,
)
from backbeat_trio._core.wire import BarReport, decode, encode, encode_claim
from backbeat_trio._ops.dashboard import Dashboard
from backbeat_trio._transport.options import ConnectionOptions
from tests._ha_harness import wait_until
from tests._http import get

HONEST = "honest"
OTHER = "other"  # on the keyring, never sends a claim of its own


@dataclass
class Hostile:
    what: str
    body: bytes
    headers: dict[str, str]
    reason: str  # the reason the reverb must reject it for


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def craft(keys: dict[str, SigningKey], clocks: dict[str, HLC], beat: int) -> list[Hostile]:
    """One fresh claim of each hostile kind (no two share an HLC stamp, so none is a replay), as
    an attacker with publish rights (and, for the last three, an agent's own key) sends it."""
    now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    node = node_id_for(HONEST)

    def body(agent: str = HONEST, *, hlc: str | None = None, **fields: Any) -> bytes:
        values: dict[str, Any] = {
            "state": "failed",
            "notes": "FORGED",
            "task_id": "task:forged",
            "beat_index": beat,
        }
        values.update(fields)
        # a clock of its own node: a stamp equal to one of the real agent's would be a replay
        clock = clocks.setdefault(agent, HLC(f"{agent}-crafted"))
        stamp = hlc if hlc is not None else str(clock.now())
        return encode_claim(bb3.StatusClaim(agent_id=agent, hlc=stamp, **values))

    def signed(data: bytes, key: SigningKey, agent: str = HONEST) -> dict[str, str]:
        return sign_headers(key, agent, data)

    honest_key_b64 = b64(bytes(keys[HONEST].verify_key))
    pinning = body(beat_index=INT64_MAX, hlc=str(HLCStamp(0xFFFFFFFFFFFF, 0xFFFF, node)))
    plain = body()
    future = body(
        state="executing", notes="from the future", hlc=str(HLCStamp(now_ms + 3_600_000, 0, node))
    )
    edge = body(state="executing", notes="at int64's end", beat_index=INT64_MAX)
    far = body(state="executing", notes="far ahead", beat_index=beat + 10_000)
    stranger = body("stranger")
    wrong_key = body()
    unsigned_ghost = body("ghost")
    return [
        # the issue's claim: failed, FORGED, beat_index 2**63-1, the largest HLC, a random
        # signature under the honest agent's own key header
        Hostile(
            "forged, pinning",
            pinning,
            {HEADER_AGENT: HONEST, HEADER_KEY: honest_key_b64, HEADER_SIG: b64(os.urandom(64))},
            "bad_signature",
        ),
        Hostile(
            "forged",
            plain,
            {HEADER_AGENT: HONEST, HEADER_KEY: honest_key_b64, HEADER_SIG: b64(os.urandom(64))},
            "bad_signature",
        ),
        Hostile(
            "unknown agent",
            stranger,
            signed(stranger, keys["stranger"], "stranger"),
            "unknown_agent",
        ),
        Hostile(
            "another agent's key",
            wrong_key,
            {**signed(wrong_key, keys[OTHER]), HEADER_KEY: b64(bytes(keys[OTHER].verify_key))},
            "wrong_key",
        ),
        Hostile("unsigned, honest's name", body(), {}, "unsigned"),
        Hostile("unsigned, an agent not on the keyring", unsigned_ghost, {}, "unsigned"),
        # signed with the honest key (stolen, or a clock gone wrong): refused for what they say
        Hostile("stamped an hour ahead", future, signed(future, keys[HONEST]), "future"),
        Hostile("beat_index 2**63-1", edge, signed(edge, keys[HONEST]), OUT_OF_RANGE),
        Hostile("a window far ahead", far, signed(far, keys[HONEST]), TOO_FAR_AHEAD),
    ]


class Reports:
    """Every BarReport published on the cluster's bar subject."""

    def __init__(self) -> None:
        self.seen: list[BarReport] = []

    async def collect(
        self, transport: NatsTransport, cluster: str, *, task_status: trio.TaskStatus[None]
    ) -> None:
        sub = await transport.subscribe(bar_subject(cluster), buffer=10_000)
        task_status.started()
        async for msg in sub.messages:
            self.seen.append(decode(msg.data, BarReport))


def rejected_samples(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # every documented reason has a series (at 0 until it happens): count the ones seen
            if sample.name == "backbeat_reverb_claims_rejected_total" and sample.value:
                out[sample.labels["reason"]] = sample.value
    return out


def assert_only_honest(report: dict[str, Any] | BarReport) -> None:
    r = (
        report
        if isinstance(report, dict)
        else {
            "from_beat": report.from_beat,
            "to_beat": report.to_beat,
            "by_state": dict(report.by_state),
            "blocked": list(report.blocked),
            "issues": [{"agent_id": i.agent_id, "detail": i.detail} for i in report.issues],
            "agents_reporting": report.agents_reporting,
        }
    )
    assert 0 <= r["from_beat"] <= r["to_beat"] <= INT64_MAX, r
    assert "failed" not in r["by_state"], r
    assert set(r["blocked"]) <= {HONEST}, r
    assert {i["agent_id"] for i in r["issues"]} <= {HONEST}, r
    assert not any("FORGED" in i["detail"] for i in r["issues"]), r
    assert r["agents_reporting"] <= 1, r


@pytest.mark.nats
async def test_dashboard_bars_reports_and_metrics_show_only_accepted_claims(
    nats_url: str,
) -> None:
    cluster = "verified"
    keys = {name: bb3.generate_signing_key() for name in (HONEST, OTHER, "stranger")}
    keyring = bb3.Keyring({HONEST: keys[HONEST].verify_key, OTHER: keys[OTHER].verify_key})
    pcfg = bb3.PulseConfig(cluster_id=cluster, nats_url=nats_url, tempo_bpm=300)
    rcfg = bb3.ReverbConfig(
        cluster_id=cluster, nats_url=nats_url, keyring=keyring, reverb_id="rv-verified"
    )
    assert rcfg.allow_unsigned is False
    acfg = bb3.Config(
        cluster_id=cluster, agent_id=HONEST, nats_url=nats_url, signing_key=keys[HONEST]
    )
    reports = Reports()
    dashboard = Dashboard(cluster)
    deltas: list[dict[str, Any]] = []
    fan_out = dashboard._fan_out

    def spy(batch: list[dict[str, Any]]) -> None:
        deltas.extend(batch)
        fan_out(batch)

    dashboard._fan_out = spy  # type: ignore[method-assign]
    emitted = 0
    with trio.fail_after(60):
        async with (
            open_nats_transport(ConnectionOptions(nats_url=nats_url, name="attacker")) as attacker,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(reports.collect, attacker, cluster)
            await nursery.start(bb3.run_pulse, pcfg)
            reverb = await nursery.start(bb3.run_reverb, rcfg)
            await nursery.start(functools.partial(dashboard.run, attacker, reverb=reverb))
            address = await nursery.start(
                functools.partial(bb3.serve_admin, "127.0.0.1:0", reverb=reverb, transport=attacker)
            )
            clocks: dict[str, HLC] = {}
            hostile: list[Hostile] = []
            async with bb3.open_client(acfg) as agent:
                beat = (await agent.wait_for_beat()).beat_index
                for round_ in range(3):
                    crafted = craft(keys, clocks, beat)
                    hostile += crafted
                    await agent.emit_status(
                        bb3.StatusClaim(
                            state="executing", notes=f"real {emitted}", progress=0.1 * round_
                        )
                    )
                    emitted += 1
                    await agent.flush_claims()
                    for h in crafted:
                        attacker.publish(status_subject(cluster), h.body, headers=h.headers)
                    await attacker.flush()
                    await agent.wait_for_beat()
                # after every attack, the honest row still moves
                for _ in range(3):
                    await agent.emit_status(
                        bb3.StatusClaim(state="review", notes=f"real {emitted}", progress=0.9)
                    )
                    emitted += 1
                    await agent.wait_for_beat()
                await agent.flush_claims()

            total = emitted + len(hostile)
            judged = lambda: reverb.claims_counted + reverb.claims_late + reverb.rejected  # noqa: E731
            await wait_until(lambda: judged() >= total, what=lambda: repr(reverb))
            for _ in range(2):  # every claim and rejection is in a closed window's report
                await reverb.wait_for_report()
            await wait_until(lambda: len(reports.seen) >= reverb.reports_published)
            await wait_until(
                lambda: any(
                    d["type"] == "agent" and d["agent"]["notes"] == f"real {emitted - 1}"
                    for d in deltas
                )
            )
            bars = (await get(address, "/bars?since=0&limit=1000")).json()
            metrics = rejected_samples((await get(address, "/metrics")).text)
            snapshot = dashboard.state.snapshot()
            nursery.cancel_scope.cancel()

    # every refusal under its own reason, counted once per copy; nothing honest refused
    expected = collections.Counter(h.reason for h in hostile)
    assert dict(reverb.rejected_by_reason) == dict(expected), reverb.rejected_by_reason
    assert reverb.claims_counted + reverb.claims_late == emitted
    assert metrics == {reason: float(n) for reason, n in expected.items()}
    # the dashboard: one row, the honest agent's latest accepted claim, verified
    [row] = snapshot["agents"]
    assert row["agent_id"] == HONEST
    assert row["notes"] == f"real {emitted - 1}"
    assert row["signed"] is True
    assert row["key"] == b64(bytes(keys[HONEST].verify_key))[:12]
    assert row["beat_index"] < INT64_MAX // 2
    agent_rows = [d["agent"] for d in deltas if d["type"] == "agent"]
    assert [r["notes"] for r in agent_rows] == [f"real {i}" for i in range(emitted)]
    assert all(r["agent_id"] == HONEST and r["signed"] for r in agent_rows)
    assert snapshot["counters"]["claims"] == emitted
    # the reports, published and from the history stream: only the honest agent's claims
    assert reports.seen
    assert bars["count"] >= 2
    for report in reports.seen:
        assert_only_honest(report)
    for report in bars["reports"]:
        assert_only_honest(report)
    assert sum(r.rejected for r in reports.seen) == sum(expected.values())
    assert sum(r.claims + r.late for r in reports.seen) == emitted
    assert reverb.latest_claims.keys() == {HONEST}


def frame_at(cluster: str, index: int, pulse: str = "pulse-1") -> bytes:
    start = dt.datetime.now(dt.UTC)
    return encode(
        bb3.BeatFrame(
            cluster_id=cluster,
            beat_index=index,
            downbeat=index % 4 == 0,
            phase="execute",
            hlc=str(HLC(pulse).now()),
            deadline_at=start + dt.timedelta(seconds=0.2),
            tempo_bpm=300,
            window_id=window_id(cluster, index),
        )
    )


@pytest.mark.nats
async def test_a_beat_frame_at_int64s_end_is_refused_counted_and_never_reported(
    nats_url: str,
) -> None:
    cluster = "int64-edge"
    # (a pulse that sees another publisher's frames stops unless told to share the subject)
    pcfg = bb3.PulseConfig(
        cluster_id=cluster, nats_url=nats_url, tempo_bpm=300, share_beat_subject=True
    )
    rcfg = bb3.ReverbConfig(cluster_id=cluster, nats_url=nats_url, allow_unsigned=True)
    reports = Reports()
    with trio.fail_after(60):
        async with (
            open_nats_transport(ConnectionOptions(nats_url=nats_url, name="attacker")) as attacker,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(reports.collect, attacker, cluster)
            await nursery.start(bb3.run_pulse, pcfg)
            reverb = await nursery.start(bb3.run_reverb, rcfg)
            await reverb.wait_for_report()
            before = reverb.reports
            for index in (INT64_MAX - 2, INT64_MAX - 1, INT64_MAX):
                attacker.publish(beat_subject(cluster), frame_at(cluster, index))
            await attacker.flush()
            await wait_until(
                lambda: sum(reverb.beats_refused.values()) >= 3, what=lambda: repr(reverb)
            )
            # it survived and keeps following the real pulse: more windows close and publish
            await wait_until(lambda: reverb.reports >= before + 3, what=lambda: repr(reverb))
            await wait_until(lambda: len(reports.seen) >= reverb.reports_published)
            nursery.cancel_scope.cancel()
    assert reverb.beats_refused, reverb.beats_refused
    assert all(0 <= r.from_beat <= r.to_beat < 2**32 for r in reports.seen), [
        (r.from_beat, r.to_beat) for r in reports.seen
    ]
    assert all(r.to_beat <= INT64_MAX for r in reverb.history)


# --- the sans-IO cores ---------------------------------------------------------------------------
def test_verify_claim_refuses_a_claim_stamped_past_the_skew_under_its_own_reason() -> None:
    key = bb3.generate_signing_key()
    keyring = bb3.Keyring({HONEST: key.verify_key})
    replay = ReplayCache()
    node = node_id_for(HONEST)
    now_ms = 1_800_000_000_000
    ahead = encode_claim(
        bb3.StatusClaim(agent_id=HONEST, task_id="t:1", hlc=str(HLCStamp(now_ms + 60_001, 0, node)))
    )
    within = encode_claim(
        bb3.StatusClaim(agent_id=HONEST, task_id="t:1", hlc=str(HLCStamp(now_ms + 60_000, 0, node)))
    )
    limit = now_ms + 60_000
    with pytest.raises(bb3.SignatureError) as info:
        verify_claim(
            ahead, sign_headers(key, HONEST, ahead), keyring, replay_cache=replay, max_wall_ms=limit
        )
    assert info.value.reason == "future"
    assert len(replay) == 0  # refused before it is remembered: a later copy is judged afresh
    claim = verify_claim(
        within, sign_headers(key, HONEST, within), keyring, replay_cache=replay, max_wall_ms=limit
    )
    assert claim.agent_id == HONEST
    # a forged signature is reported as forged, whatever its stamp says
    with pytest.raises(bb3.SignatureError) as info:
        verify_claim(
            ahead,
            {HEADER_AGENT: HONEST, HEADER_SIG: b64(os.urandom(64))},
            keyring,
            max_wall_ms=limit,
        )
    assert info.value.reason == "bad_signature"


def test_beats_whose_window_cannot_be_reported_within_int64_are_refused_and_counted() -> None:
    agg = BarAggregator("edge", beats_per_bar=4)
    last_window = INT64_MAX - 7  # the last window that, with the next one, ends within int64
    assert last_window % 4 == 0
    assert agg.observe_beat(last_window - 4, 0.0, 300) is None
    assert agg.observe_beat(last_window + 3, 0.2, 300) == last_window - 4
    for index in (INT64_MAX - 3, INT64_MAX - 2, INT64_MAX):
        assert agg.observe_beat(index, 0.4, 300) is None
    assert agg.beats_refused == {OUT_OF_RANGE: 3}
    assert agg.last_beat_index == last_window + 3  # the refused beats moved nothing
    report = agg.close_window(last_window - 4, "0:0:0")
    assert report.to_beat == last_window - 1
    with pytest.raises(ValueError, match="int64"):
        agg.close_window(INT64_MAX - 3, "0:0:0")


def test_a_claim_at_int64s_end_is_rejected_and_pins_nothing() -> None:
    agg = BarAggregator("edge", beats_per_bar=4, max_windows_ahead=2**62)
    agg.observe_beat(8, 0.0, 300)
    edge = bb3.StatusClaim(
        agent_id="a", task_id="t:1", hlc="1:0:0", beat_index=INT64_MAX, state="failed", notes="edge"
    )
    assert agg.add_claim(edge) == "rejected"
    assert agg.rejection_reasons == {OUT_OF_RANGE: 1}
    agg.observe_beat(12, 0.8, 300)
    report = agg.close_window(8, "0:0:0")
    assert (report.claims, report.rejected, report.issues) == (0, 1, [])
    assert agg.tracked_agents == []


@given(
    bpb=st.integers(1, 16),
    indexes=st.lists(
        st.integers(0, 64) | st.integers(INT64_MAX - 64, INT64_MAX), min_size=1, max_size=40
    ),
)
def test_every_report_stays_within_int64_whatever_beats_arrive(
    bpb: int, indexes: list[int]
) -> None:
    agg = BarAggregator("edge", beats_per_bar=bpb)
    for n, index in enumerate(sorted(indexes)):
        left = agg.observe_beat(index, float(n), 300)
        if left is not None:
            report = agg.close_window(left, "0:0:0")
            assert 0 <= report.from_beat <= report.to_beat <= INT64_MAX
            assert report.to_beat - report.from_beat == bpb - 1
    refused = sum(agg.beats_refused.values())
    reportable = [i for i in set(indexes) if (i - i % bpb) + 2 * bpb - 1 <= INT64_MAX]
    assert refused == len([i for i in sorted(indexes) if i not in reportable])


def test_dashboard_rows_come_only_from_what_it_is_handed() -> None:
    state = DashboardState("dash")
    # a frame, a report: read from the bus; nothing there makes an agent row
    assert state.snapshot()["agents"] == []
    clock = HLC(HONEST)
    first = bb3.StatusClaim(agent_id=HONEST, task_id="t:1", hlc=str(clock.now()), notes="one")
    second = bb3.StatusClaim(agent_id=HONEST, task_id="t:1", hlc=str(clock.now()), notes="two")
    [delta] = state.on_claim(first, signed=True, key="K" * 44, wall=0.0)
    assert delta["agent"]["signed"] is True
    [delta] = state.on_claim(second, signed=False, key="K" * 44, wall=0.0)
    # "signed" is what the verifier said of this claim, never inherited from an earlier one
    assert (delta["agent"]["notes"], delta["agent"]["signed"], delta["agent"]["key"]) == (
        "two",
        False,
        "",
    )


async def test_the_dashboard_follows_a_running_reverb_of_a_mapping_and_the_next_when_it_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from backbeat_trio._services.reverb import AcceptedClaim, ReverbStatus
    from backbeat_trio.testing import MemoryBroker

    standby, gone = ReverbStatus("dash", reverb_id="r-1"), ReverbStatus("dash", reverb_id="r-2")
    reverbs = {"r-1": standby, "r-2": gone}
    dashboard = Dashboard("dash")
    clock = HLC(HONEST)

    def hand(status: ReverbStatus, notes: str) -> None:
        claim = bb3.StatusClaim(agent_id=HONEST, task_id="t:1", hlc=str(clock.now()), notes=notes)
        status._hand_out(AcceptedClaim(claim=claim, signed=True, key="K" * 44, wall=0.0))

    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(dashboard.run, MemoryBroker().connect(), reverb=reverbs)
        )
        gone.running = True  # only r-2 runs: followed
        await trio.sleep(1)
        hand(gone, "from r-2")
        hand(standby, "never handed: r-1 is not running")
        await trio.testing.wait_all_tasks_blocked()
        assert dashboard.state.snapshot()["agents"][0]["notes"] == "from r-2"
        standby.running = True
        gone.running = False
        gone._end_watches()  # r-2 stopped: its channel ends, the dashboard takes r-1
        await trio.sleep(1)
        hand(standby, "from r-1")
        await trio.testing.wait_all_tasks_blocked()
        assert dashboard.state.snapshot()["agents"][0]["notes"] == "from r-1"
        # a new watch of a stopped reverb ends at once
        with pytest.raises(trio.EndOfChannel):
            gone.watch_claims().receive_nowait()
        nursery.cancel_scope.cancel()
