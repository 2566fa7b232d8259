"""Bar-report history: the per-cluster stream, replay since a beat, resume after a restart."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from backbeat_trio._bridge.nats import open_nats_transport
from backbeat_trio._client.config import Config
from backbeat_trio._core.beats import bar_subject, window_id
from backbeat_trio._core.hlc import HLC
from backbeat_trio._core.wire import BarReport, encode
from backbeat_trio._errors import ConfigError
from backbeat_trio._services.history import (
    already_reported,
    bar_report_headers,
    bar_stream_name,
    ensure_bar_stream,
    last_reported_window,
    replay_bars,
)
from backbeat_trio._services.pulse import PulseConfig, run_pulse
from backbeat_trio._services.reverb import ReverbConfig, run_reverb
from backbeat_trio._transport.base import Transport
from backbeat_trio._transport.jetstream import StreamSummary
from backbeat_trio.testing import virtual_wall_clock
from backbeat_trio.testing.memory import MemoryBroker

BPB = 4
_hlc = HLC("reverb-1")


def report(cluster: str, start: int, **fields: int) -> BarReport:
    return BarReport(
        cluster_id=cluster,
        window_id=window_id(cluster, start, BPB),
        from_beat=start,
        to_beat=start + BPB - 1,
        hlc=str(_hlc.now()),
        claims=fields.get("claims", start // BPB),
        agents_reporting=fields.get("agents", 1),
    )


def conn(url: str, cluster: str) -> Config:
    return Config(cluster_id=cluster, agent_id="history", nats_url=url, connect_attempts=3)


async def publish_reports(transport: Transport, reports: list[BarReport]) -> None:
    for r in reports:
        transport.publish(bar_subject(r.cluster_id), encode(r), headers=bar_report_headers(r))
    await transport.flush()


async def wait_stored(
    transport: Transport, cluster: str, count: int, *, last_seq: int = 0
) -> StreamSummary:
    for _ in range(200):
        summary = await transport.jetstream.stream_summary(bar_stream_name(cluster))
        if summary is not None and summary.messages >= count and summary.last_seq >= last_seq:
            return summary
        await trio.sleep(0.025)
    raise AssertionError(f"the bar stream never held {count} reports: {summary}")


# --- pure helpers --------------------------------------------------------------------------------
def test_names_headers_and_the_resume_rule() -> None:
    assert bar_stream_name("prod") == "BACKBEAT_BARS_prod"
    with pytest.raises(ConfigError, match="cluster_id"):
        bar_stream_name("a.b")
    r = report("prod", 8)
    assert bar_report_headers(r) == {"Nats-Msg-Id": f"bar:prod:{r.window_id}"}
    assert bar_report_headers(report("prod", 12)) != bar_report_headers(r)
    assert not already_reported(r, None)
    assert already_reported(r, 8)
    assert already_reported(r, 12)
    assert not already_reported(r, 4)


async def test_a_memory_transport_keeps_history() -> None:
    broker = MemoryBroker()
    transport = broker.connect()
    cluster = "mem"
    assert await replay_bars(transport, cluster) == []  # no stream yet
    assert await last_reported_window(transport, cluster) is None
    assert await ensure_bar_stream(transport, cluster, max_reports=20) == "BACKBEAT_BARS_mem"
    assert "BACKBEAT_BARS_mem" in broker.streams
    assert await replay_bars(transport, cluster) == []
    stored = [report(cluster, BPB * i) for i in range(25)]
    await publish_reports(transport, [*stored[:10], report(cluster, 0, claims=99), *stored[10:]])
    transport.publish(bar_subject(cluster), b"not a report")  # junk is skipped
    transport.publish(bar_subject(cluster), encode(report("elsewhere", 400)))  # another's too
    summary = await wait_stored(transport, cluster, 20, last_seq=27)
    assert summary.first_seq == 8  # 25 reports + 2 strays, the duplicate dropped, 20 kept
    kept = [r.from_beat for r in stored[7:]]
    assert [r.from_beat for r in await replay_bars(transport, cluster)] == kept
    assert [r.from_beat for r in await replay_bars(transport, cluster, since_beat=41)] == (
        list(range(40, 100, BPB))
    )
    limited = await replay_bars(transport, cluster, since_beat=41, limit=3)
    assert [r.from_beat for r in limited] == [40, 44, 48]
    assert await last_reported_window(transport, cluster) == 96  # past the junk at the end


async def test_replay_on_a_memory_transport_returns_the_reverbs_reports(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # a pulse and a reverb on the memory bus, on virtual time: the reports the reverb published
    # are the ones a replay returns (the memory bus keeps bar history like JetStream does)
    cluster = "mem-live"
    broker = MemoryBroker()
    async with trio.open_nursery() as nursery:
        reverb = await nursery.start(
            lambda task_status: run_reverb(
                ReverbConfig(cluster_id=cluster, beats_per_bar=BPB, allow_unsigned=True),
                transport=broker.connect(),
                wall_clock=virtual_wall_clock,
                task_status=task_status,
            )
        )
        await nursery.start(
            lambda task_status: run_pulse(
                PulseConfig(cluster_id=cluster, tempo_bpm=120, beats_per_bar=BPB),
                transport=broker.connect(),
                wall_clock=virtual_wall_clock,
                task_status=task_status,
            )
        )
        with trio.fail_after(60):
            for _ in range(5):
                await reverb.wait_for_report()
        nursery.cancel_scope.cancel()
    live = list(reverb.history)
    assert len(live) >= 5
    reader = broker.connect()
    replayed = await replay_bars(reader, cluster)
    assert [encode(r) for r in replayed] == [encode(r) for r in live]
    assert await last_reported_window(reader, cluster) == live[-1].from_beat
    since = await replay_bars(reader, cluster, since_beat=live[2].to_beat)
    assert [r.window_id for r in since] == [r.window_id for r in live[2:]]


async def test_bad_arguments_are_config_errors() -> None:
    transport = MemoryBroker().connect()
    with pytest.raises(ConfigError, match="since_beat"):
        await replay_bars(transport, "c", since_beat=-1)
    with pytest.raises(ConfigError, match="limit"):
        await replay_bars(transport, "c", limit=0)
    with pytest.raises(ConfigError, match="max_reports"):
        await ensure_bar_stream(transport, "c", max_reports=0)
    with pytest.raises(ConfigError, match="cluster_id"):
        await replay_bars(transport, "bad id")


# --- a real nats-server ---------------------------------------------------------------------------
@pytest.mark.nats
async def test_no_stream_means_no_history(nats_url: str) -> None:
    async with open_nats_transport(conn(nats_url, "h-none")) as transport:
        assert await replay_bars(transport, "h-none", since_beat=5) == []
        assert await last_reported_window(transport, "h-none") is None
        await ensure_bar_stream(transport, "h-none")
        assert await replay_bars(transport, "h-none") == []
        assert await last_reported_window(transport, "h-none") is None


@pytest.mark.nats
async def test_replay_since_a_beat_and_with_a_limit(nats_url: str) -> None:
    cluster = "h-replay"
    stored = [report(cluster, BPB * i) for i in range(30)]
    async with open_nats_transport(conn(nats_url, cluster)) as transport:
        name = await ensure_bar_stream(transport, cluster, replicas=3)
        assert name == "BACKBEAT_BARS_h-replay"
        assert await ensure_bar_stream(transport, cluster) == name  # idempotent
        await publish_reports(transport, stored)
        summary = await wait_stored(transport, cluster, 30)
        assert summary.replicas == 1  # a single server: the stream fell back to one replica
        assert summary.subjects == (bar_subject(cluster),)

        everything = await replay_bars(transport, cluster)
        assert [encode(r) for r in everything] == [encode(r) for r in stored]
        # since beat 41: the window 40..43 still ends after it, so it is the first one
        since = await replay_bars(transport, cluster, since_beat=41)
        assert [r.from_beat for r in since] == list(range(40, 120, BPB))
        assert [r.from_beat for r in await replay_bars(transport, cluster, since_beat=40)] == (
            list(range(40, 120, BPB))
        )
        since44 = await replay_bars(transport, cluster, since_beat=44)
        assert since44[0].from_beat == 44
        assert len(since44) == 19
        assert [r.from_beat for r in await replay_bars(transport, cluster, since_beat=119)] == [116]
        assert await replay_bars(transport, cluster, since_beat=120) == []
        limited = await replay_bars(transport, cluster, since_beat=41, limit=3)
        assert [r.from_beat for r in limited] == [40, 44, 48]
        assert await last_reported_window(transport, cluster) == 116


@pytest.mark.nats
async def test_a_window_reported_twice_is_stored_once(nats_url: str) -> None:
    cluster = "h-dup"
    async with open_nats_transport(conn(nats_url, cluster)) as transport:
        await ensure_bar_stream(transport, cluster)
        first = report(cluster, 0)
        again = report(cluster, 0, claims=99)  # a restarted reverb's second opinion
        await publish_reports(
            transport, [first, again, report(cluster, 4), first, report(cluster, 8)]
        )
        for _ in range(200):  # the last report is stored once everything before it is
            if await last_reported_window(transport, cluster) == 8:
                break
            await trio.sleep(0.025)
        summary = await wait_stored(transport, cluster, 3)
        assert summary.messages == 3
        replayed = await replay_bars(transport, cluster)
        assert [(r.from_beat, r.claims) for r in replayed] == [(0, 0), (4, 1), (8, 2)]


@pytest.mark.nats
async def test_junk_on_the_subject_is_skipped(nats_url: str) -> None:
    cluster = "h-junk"
    async with open_nats_transport(conn(nats_url, cluster)) as transport:
        await ensure_bar_stream(transport, cluster)
        subject = bar_subject(cluster)
        good = [report(cluster, BPB * i) for i in range(10)]
        for i, r in enumerate(good):
            transport.publish(subject, encode(r))
            if i % 3 == 0:
                transport.publish(subject, b"not a report")
        transport.publish(subject, encode(report("elsewhere", 400)))  # another cluster's report
        transport.publish(subject, b"{}")
        await transport.flush()
        await wait_stored(transport, cluster, len(good) + 6)
        assert [r.from_beat for r in await replay_bars(transport, cluster)] == [
            r.from_beat for r in good
        ]
        assert [r.from_beat for r in await replay_bars(transport, cluster, since_beat=21)] == [
            20,
            24,
            28,
            32,
            36,
        ]
        # the newest message is junk: the newest readable report still counts
        assert await last_reported_window(transport, cluster) == 36


@pytest.mark.nats
async def test_a_long_history_replays_in_pages(nats_url: str) -> None:
    cluster = "h-long"
    count, kept = 1500, 1200  # several 256-message pages, and the oldest 300 dropped
    async with open_nats_transport(conn(nats_url, cluster)) as transport:
        await ensure_bar_stream(transport, cluster, max_reports=kept)
        await publish_reports(transport, [report(cluster, BPB * i) for i in range(count)])
        summary = await wait_stored(transport, cluster, kept, last_seq=count)
        assert summary.messages == kept
        assert summary.first_seq == count - kept + 1
        with trio.fail_after(20):
            everything = await replay_bars(transport, cluster, limit=100_000)
            tail = await replay_bars(transport, cluster, since_beat=BPB * (count - 10) + 1)
            early = await replay_bars(transport, cluster, since_beat=1, limit=5)
        dropped = count - kept
        assert [r.from_beat for r in everything] == [BPB * i for i in range(dropped, count)]
        assert [r.from_beat for r in tail] == [BPB * i for i in range(count - 10, count)]
        assert [r.from_beat for r in early] == [BPB * i for i in range(dropped, dropped + 5)]


@pytest.mark.nats
async def test_reverb_reports_are_replayable_and_resume_skips_them(nats_url: str) -> None:
    cluster = "h-live"
    async with open_nats_transport(conn(nats_url, cluster)) as transport:
        await ensure_bar_stream(transport, cluster)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                run_pulse, PulseConfig(cluster_id=cluster, nats_url=nats_url, tempo_bpm=600)
            )
            reverb = await nursery.start(
                run_reverb,
                ReverbConfig(cluster_id=cluster, nats_url=nats_url, allow_unsigned=True),
            )
            with trio.fail_after(15):
                for _ in range(3):
                    await reverb.wait_for_report()
            nursery.cancel_scope.cancel()
        live = list(reverb.history)
        assert len(live) >= 3
        await wait_stored(transport, cluster, len(live))
        replayed = await replay_bars(transport, cluster)
        assert [encode(r) for r in replayed[: len(live)]] == [encode(r) for r in live]
        last = await last_reported_window(transport, cluster)
        assert last == replayed[-1].from_beat
        # a reverb restarted now sees windows again; it publishes only the new ones
        redo = [report(cluster, s) for s in range(live[0].from_beat, last + 3 * BPB, BPB)]
        fresh = [r for r in redo if not already_reported(r, last)]
        assert [r.from_beat for r in fresh] == [last + BPB, last + 2 * BPB]
