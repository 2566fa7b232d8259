"""The client's timing logic on virtual time: trio's MockClock (``autojump_clock``) with the
in-memory bus and the real pulse (``backbeat_trio.testing``). Every behaviour whose proof needs
a real network is proven again over nats-server in ``test_client_nats.py``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import VerifyKey

import backbeat_trio as bb3
from backbeat_trio import testing as bbt
from backbeat_trio._core.intake import RECALIBRATE_AFTER
from backbeat_trio._core.wire import encode
from backbeat_trio._transport.base import Subscription
from backbeat_trio.testing.memory import MemoryTransport

CLUSTER = "test"
STATUS = f"backbeat.status.{CLUSTER}"


# --- helpers --------------------------------------------------------------------------------------
def frame_bytes(
    index: int,
    *,
    tempo: int = 60,
    cluster: str = CLUSTER,
    bpb: int = 4,
    start_offset: float = 0.0,
) -> bytes:
    """A well-formed beat frame for ``index`` that starts ``start_offset`` s from virtual now."""
    start = bbt.virtual_wall_clock() + start_offset
    frame = bb3.BeatFrame(
        cluster_id=cluster,
        beat_index=index,
        downbeat=index % bpb == 0,
        phase=bb3.phase_for(index, bpb),
        hlc="0000018c0000:0000:0001",
        deadline_at=dt.datetime.fromtimestamp(start + 60 / tempo, dt.UTC),
        tempo_bpm=tempo,
        window_id=bb3.window_id(cluster, index, bpb),
    )
    return encode(frame)


async def take(chan: bb3.DropOldestChannel[bb3.BeatFrame], n: int) -> list[bb3.BeatFrame]:
    frames = []
    with trio.fail_after(1000):
        async for frame in chan:
            frames.append(frame)
            if len(frames) == n:
                break
    return frames


async def beat_times(client: bb3.Client, n: int) -> list[tuple[int, float, bb3.BeatFrame]]:
    """The next ``n`` beats as (index, virtual arrival time, frame)."""
    out = []
    with trio.fail_after(1000):
        for _ in range(n):
            frame = await client.wait_for_beat()
            out.append((frame.beat_index, trio.current_time(), frame))
    return out


@pytest.fixture
async def cluster(autojump_clock: trio.testing.MockClock) -> AsyncIterator[bbt.FakeCluster]:
    async with bbt.open_fake_cluster(CLUSTER, tempo_bpm=60) as c:
        yield c


@pytest.fixture
async def js_cluster(autojump_clock: trio.testing.MockClock) -> AsyncIterator[bbt.FakeCluster]:
    """The fake cluster with the JetStream status stream (the client's JetStream delivery).
    A test using it names ``autojump_clock`` too: pytest-trio takes the clock from the test's own
    arguments."""
    async with bbt.open_fake_cluster(CLUSTER, tempo_bpm=60, jetstream=True) as c:
        yield c


def stored_ids(cluster: bbt.FakeCluster) -> list[str]:
    """The message ids of the claims in the status stream, in stored order, without their
    digest (``<agent_id>:<hlc>``; tests/test_claim_ids.py checks the digest)."""
    stream = cluster.broker.streams[f"BACKBEAT_STATUS_{CLUSTER}"]
    return [m.headers["Nats-Msg-Id"].rsplit(":", 1)[0] for m in stream.messages]


async def silence_pulse(
    cluster: bbt.FakeCluster, bb: bb3.Client, *, after: int, for_s: float
) -> bb3.DropOldestChannel[bb3.BeatFrame]:
    """A 64-frame beats channel that has taken ``after`` beats before the pulse stopped, then
    ``for_s`` seconds of silence."""
    chan = bb.beats(buffer=64)
    await take(chan, after)
    cluster.stop_pulse()
    await trio.sleep(for_s)
    return chan


async def spy(cluster: bbt.FakeCluster, subject: str = STATUS) -> Subscription:
    """A raw subscription on the in-memory bus (sees headers too)."""
    return await cluster.broker.connect().subscribe(subject, buffer=10_000)


def drain(sub: Subscription) -> list[Any]:
    out = []
    while True:
        try:
            out.append(sub.messages.receive_nowait())
        except trio.WouldBlock:
            return out


# --- beats out ------------------------------------------------------------------------------------
async def test_beats_arrive_in_order_on_schedule_with_spec_fields(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    async with cluster.open_client() as bb:
        assert bb.current_beat is None
        assert bb.current_window is None
        got = await beat_times(bb, 9)
    indices = [i for i, _, _ in got]
    assert indices == list(range(indices[0], indices[0] + 9))
    start = got[0][1]
    for i, (index, at, frame) in enumerate(got):
        assert at == pytest.approx(start + i * 1.0)  # 60 BPM, absolute schedule
        assert frame.downbeat == (index % 4 == 0)
        assert frame.phase == bb3.phase_for(index, 4)
        assert frame.window_id == bb3.window_id(CLUSTER, index, 4)
        assert frame.tempo_bpm == 60
    assert bb.current_beat == indices[-1]
    assert bb.current_window == got[-1][2].window_id
    assert bb.in_window(got[-1][2].window_id)
    assert not bb.in_window(bb3.window_id(CLUSTER, indices[-1] + 4))
    assert bb.current_tempo == 60
    assert bb.measured_bpm == pytest.approx(60.0)
    assert bb.tempo_drift == pytest.approx(0.0, abs=1e-9)
    assert bb.beats_per_bar == 4


async def test_each_beats_call_is_a_new_channel(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    async with cluster.open_client() as bb:
        a, b = bb.beats(), bb.beats()
        assert a is not b
        first = await take(a, 3)
        second = await take(b, 3)
        assert [f.beat_index for f in first] == [f.beat_index for f in second]
        a.close()
        more = await take(b, 2)  # a closed consumer does not disturb the others
        assert more[0].beat_index == first[-1].beat_index + 1


async def test_slow_consumer_loses_the_oldest_frames_counted(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    async with cluster.open_client() as bb:
        chan = bb.beats(buffer=2)
        await trio.sleep(5.5)  # five beats arrive while nobody reads
        frames = [chan.receive_nowait(), chan.receive_nowait()]
        with pytest.raises(trio.WouldBlock):
            chan.receive_nowait()
        assert [f.beat_index for f in frames] == [bb.current_beat - 1, bb.current_beat]
        assert chan.dropped == 3
        assert bb.metrics.dropped == 3
        assert bb.health().metrics["dropped"] == 3


@pytest.mark.parametrize("buffer", [0, -1, True, 1.5])
async def test_channel_buffer_must_be_a_positive_int(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock, buffer: Any
) -> None:
    async with cluster.open_client() as bb:
        with pytest.raises(ValueError, match="positive int"):
            bb.beats(buffer=buffer)
        with pytest.raises(ValueError, match="positive int"):
            bb.downbeats(buffer=buffer)


async def test_downbeats_are_only_the_first_beats_of_bars(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        bbt.open_fake_cluster(CLUSTER, tempo_bpm=120, beats_per_bar=3) as cluster,
        cluster.open_client(beats_per_bar=3) as bb,
    ):
        frames = await take(bb.downbeats(), 3)
        assert [f.beat_index % 3 for f in frames] == [0, 0, 0]
        assert all(f.downbeat and f.phase == "plan" for f in frames)
        assert frames[1].beat_index - frames[0].beat_index == 3
        assert bb.beats_per_bar == 3


async def test_wait_for_downbeat_returns_the_next_bar_start(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    async with cluster.open_client() as bb:
        with trio.fail_after(100):
            frame = await bb.wait_for_downbeat()
            assert frame.downbeat
            assert frame.beat_index % 4 == 0
            t0 = trio.current_time()
            again = await bb.wait_for_downbeat()
        assert again.beat_index == frame.beat_index + 4
        assert trio.current_time() - t0 == pytest.approx(4.0)


async def test_callbacks_sync_async_and_a_raising_one_never_kill_the_client(
    cluster: bbt.FakeCluster,
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[int] = []
    downs: list[int] = []

    def on_beat(frame: bb3.BeatFrame) -> None:
        seen.append(frame.beat_index)

    async def on_downbeat(frame: bb3.BeatFrame) -> None:
        await trio.lowlevel.checkpoint()
        downs.append(frame.beat_index)

    def broken(frame: bb3.BeatFrame) -> None:
        raise RuntimeError(f"boom at {frame.beat_index}")

    async with cluster.open_client() as bb:
        remove = bb.on_beat(on_beat)
        bb.on_downbeat(on_downbeat)
        bb.on_beat(broken)
        await beat_times(bb, 8)
        await trio.sleep(0.5)  # callbacks of the last beat have run
        assert len(seen) == 8
        assert seen == sorted(set(seen))
        assert len(downs) == 2
        assert all(i % 4 == 0 for i in downs)
        assert bb.metrics.callback_errors == 8
        assert any("boom" in e for e in bb.health().errors)
        remove()
        count = len(seen)
        await beat_times(bb, 2)
        await trio.sleep(0.5)
        assert len(seen) == count  # removed
        assert bb.metrics.callback_errors == 10  # the broken one still runs, still contained


async def test_closing_ends_channels_waits_and_callbacks(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    errors: list[BaseException] = []

    async with trio.open_nursery() as nursery:
        async with cluster.open_client() as bb:
            chan = bb.beats()
            await take(chan, 1)

            async def waiter() -> None:
                try:
                    await bb.wait_for_beat()
                except bb3.NotConnected as exc:
                    errors.append(exc)

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
        # the block is over: the waiter woke with NotConnected, the channel ended
        with trio.fail_after(1):
            rest = [f async for f in chan]
        assert len(rest) <= bb.config.beat_buffer
    assert len(errors) == 1
    assert "closed" in str(errors[0])
    with pytest.raises(bb3.NotConnected):
        await bb.wait_for_beat()
    with pytest.raises(bb3.NotConnected):
        bb.on_beat(lambda frame: None)
    with trio.fail_after(1):
        assert [f async for f in bb.beats()] == []


# --- hostile input --------------------------------------------------------------------------------
def _oversized() -> bytes:
    return b'{"pad":"' + b"x" * 70_000 + b'"}'


HOSTILE: dict[str, tuple[Callable[[int], bytes], str]] = {
    "not json": (lambda i: b"\x00\xffnot json{", "malformed"),
    "wrong type tag": (
        lambda i: frame_bytes(i + 1).replace(b"backbeat.beatframe.v1", b"backbeat.statusclaim.v1"),
        "malformed",
    ),
    "json array": (lambda i: b"[1,2,3]", "malformed"),
    "missing field": (
        lambda i: frame_bytes(i + 1).replace(b'"window_id"', b'"window_idx"'),
        "malformed",
    ),
    "wrong cluster": (lambda i: frame_bytes(i + 1, cluster="other"), "wrong_cluster"),
    "tempo 0": (
        lambda i: frame_bytes(i + 1).replace(b'"tempo_bpm":60', b'"tempo_bpm":0'),
        "malformed",
    ),
    "tempo 1201": (
        lambda i: frame_bytes(i + 1).replace(b'"tempo_bpm":60', b'"tempo_bpm":1201'),
        "malformed",
    ),
    "negative index": (
        lambda i: frame_bytes(i + 1).replace(f'"beat_index":{i + 1}'.encode(), b'"beat_index":-5'),
        "malformed",
    ),
    "index going backwards": (lambda i: frame_bytes(i - 2), "duplicate_or_old"),
    "duplicate index": (lambda i: frame_bytes(i), "duplicate_or_old"),
    "oversized body": (lambda i: _oversized(), "oversized"),
    "invalid utf-8": (
        lambda i: frame_bytes(i + 1).replace(b'"phase":"', b'"phase":"\xff'),
        "malformed",
    ),
    "deadline an hour ahead": (lambda i: frame_bytes(i + 1, start_offset=3600), "implausible"),
    "deadline in year 9999": (
        lambda i: frame_bytes(i + 1000, start_offset=2.5e11 - bbt.VIRTUAL_EPOCH),
        "implausible",
    ),
    "stale at another tempo": (
        lambda i: frame_bytes(i + 1, tempo=30, start_offset=-3600),
        "stale",
    ),
    "bad hlc": (
        lambda i: frame_bytes(i + 1).replace(b"0000018c0000:0000:0001", b"zz"),
        "malformed",
    ),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
async def test_hostile_beat_subject_input_is_counted_and_skipped(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    make, metric = HOSTILE[kind]
    async with cluster.open_client() as bb:
        chan = bb.beats()
        before = await take(chan, 3)
        last = before[-1].beat_index
        errors_before = bb.metrics.errors
        cluster.publish_raw(make(last))
        await trio.testing.wait_all_tasks_blocked()
        assert getattr(bb.metrics, metric) == 1, bb.metrics
        assert bb.health().metrics[metric] == 1
        assert bb.metrics.errors == errors_before + 1
        assert bb.health().errors  # explained
        assert bb.current_beat == last  # nothing delivered
        after = await take(chan, 3)
    # the pulse's own beats go on, contiguous, strictly increasing
    assert [f.beat_index for f in after] == [last + 1, last + 2, last + 3]
    assert not bb.degraded


async def test_stale_frame_is_discarded_and_counted(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    async with cluster.open_client() as bb:
        chan = bb.beats()
        before = await take(chan, 4)
        await trio.sleep(0.5)
        # beat N+1 as if it had started 1.2 beats ago: its deadline passed 0.2 s ago (> 50 ms)
        cluster.publish_raw(frame_bytes(before[-1].beat_index + 1, start_offset=-1.2))
        await trio.testing.wait_all_tasks_blocked()
        assert bb.metrics.stale == 1
        assert bb.current_beat == before[-1].beat_index
        assert any("stale" in e for e in bb.health().errors)
        # within jitter is fine: the pulse's own frame for that beat is delivered on time
        after = await take(chan, 1)
        assert after[0].beat_index == before[-1].beat_index + 1
        assert bb.metrics.stale == 1


async def test_first_frame_far_from_the_local_clock_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bbt.open_fake_cluster(CLUSTER, tempo_bpm=60, start=False) as cluster:
        async with cluster.open_client() as bb:
            cluster.publish_raw(frame_bytes(7, start_offset=4000))  # nothing to compare with yet
            await trio.testing.wait_all_tasks_blocked()
            assert bb.metrics.implausible == 1
            assert bb.current_beat is None
            await cluster.start_pulse()
            frame = await bb.wait_for_beat()
        assert frame.beat_index == 0


async def test_a_stepped_clock_is_recalibrated_after_a_run_of_refusals(
    autojump_clock: trio.testing.MockClock,
) -> None:
    step = [0.0]
    async with bbt.open_fake_cluster(CLUSTER, tempo_bpm=60) as cluster:
        transport = cluster.broker.connect()
        cfg = cluster.config(jitter_tolerance=0.05)
        async with bb3.open_client(
            cfg, transport=transport, wall_clock=lambda: bbt.virtual_wall_clock() + step[0]
        ) as bb:
            chan = bb.beats(buffer=64)
            await take(chan, 3)
            step[0] = 5.0  # the local clock jumps 5 s ahead: every pulse frame looks stale
            frames = await take(chan, 14)
            assert not bb.degraded  # the pulse is followed again
            assert bb.metrics.stale == RECALIBRATE_AFTER
            assert any("re-calibrating" in e for e in bb.health().errors)
    indices = [f.beat_index for f in frames]
    assert indices == list(range(indices[0], indices[0] + 14))  # local beats filled the gap
    assert bb.metrics.degraded_episodes == 1
    assert bb.metrics.resyncs == 1
    assert bb.health().time_drift == pytest.approx(5e9, rel=1e-3)


# --- beat budgets ---------------------------------------------------------------------------------
async def test_beat_budget_moves_on_after_n_beats(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    async with cluster.open_client() as bb:
        await bb.wait_for_beat()
        t0 = trio.current_time()
        with bb.beat_budget(3) as scope:
            await trio.sleep_forever()
        assert scope.cancelled_caught
        assert trio.current_time() - t0 == pytest.approx(3.0)
        # a budget that is not used up leaves the work alone
        with bb.beat_budget(3) as scope:
            await trio.sleep(1.5)
        assert not scope.cancelled_caught
        assert bb.metrics.budgets_created == 2


async def test_budget_counts_from_the_position_inside_the_beat(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    async with cluster.open_client() as bb:
        await bb.wait_for_beat()
        await trio.sleep(0.25)
        t0 = trio.current_time()
        with bb.beat_budget(1.5):
            await trio.sleep_forever()
        assert trio.current_time() - t0 == pytest.approx(1.5)


async def test_budget_follows_a_tempo_change(autojump_clock: trio.testing.MockClock) -> None:
    async with (
        bbt.open_fake_cluster(CLUSTER, tempo_bpm=60, max_tempo_step=None) as cluster,
        cluster.open_client() as bb,
    ):
        start = await bb.wait_for_downbeat()
        cluster.request_tempo(120)  # takes effect on the next downbeat, start + 4
        t0 = trio.current_time()
        with bb.beat_budget(8) as scope:
            await trio.sleep_forever()
        assert scope.cancelled_caught
        # 4 beats at 1 s, then 4 beats at 0.5 s
        assert trio.current_time() - t0 == pytest.approx(6.0)
        assert bb.current_tempo == 120
        assert bb.current_beat in (start.beat_index + 7, start.beat_index + 8)  # same instant


async def test_fail_after_beats_and_with_beat_budget(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    async def work(seconds: float, result: str) -> str:
        await trio.sleep(seconds)
        return result

    async with cluster.open_client() as bb:
        await bb.wait_for_beat()
        with pytest.raises(bb3.BeatBudgetExceeded) as info, bb.fail_after_beats(2):
            await trio.sleep(10)
        assert info.value.beats == 2
        assert isinstance(info.value, TimeoutError)
        assert "2 beat" in str(info.value)
        with bb.fail_after_beats(2):
            await trio.sleep(1)
        assert await bb.with_beat_budget(3, work, 2.0, "done") == "done"
        t0 = trio.current_time()
        with pytest.raises(bb3.BeatBudgetExceeded):
            await bb.with_beat_budget(2, work, 10.0, "late")
        assert trio.current_time() - t0 == pytest.approx(2.0, abs=1e-6)
        assert bb.metrics.budgets_timed_out == 2
        assert bb.metrics.budgets_completed == 2


@pytest.mark.parametrize("beats", [0, -1, math.nan, math.inf, True, "3", None])
async def test_budget_needs_a_positive_number_of_beats(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock, beats: Any
) -> None:
    async with cluster.open_client() as bb:
        with pytest.raises(ValueError, match="positive number of beats"):
            bb.beat_budget(beats)
        with (
            pytest.raises(ValueError, match="positive number of beats"),
            bb.fail_after_beats(beats),
        ):
            pass  # pragma: no cover
        with pytest.raises(ValueError, match="positive number of beats"):
            await bb.with_beat_budget(beats, trio.sleep, 0)


async def test_budget_made_before_the_first_beat_counts_from_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bbt.open_fake_cluster(CLUSTER, tempo_bpm=60, start=False) as cluster:
        async with cluster.open_client() as bb, trio.open_nursery() as nursery:
            ended: list[float] = []

            async def budgeted() -> None:
                with bb.beat_budget(2):
                    await trio.sleep_forever()
                ended.append(trio.current_time())

            nursery.start_soon(budgeted)
            await trio.sleep(30)  # no pulse yet: the budget waits
            assert ended == []
            await cluster.start_pulse()
            first = await bb.wait_for_beat()
            t_first = trio.current_time()
        assert first.beat_index == 0
        assert ended == [pytest.approx(t_first + 2.0)]


async def test_budget_runs_on_the_local_schedule_while_degraded(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    async with cluster.open_client() as bb:
        await bb.wait_for_beat()
        t_last = trio.current_time()
        cluster.stop_pulse()
        with bb.beat_budget(5):
            await trio.sleep_forever()
        assert bb.degraded
        assert trio.current_time() - t_last == pytest.approx(5.0)


async def test_closing_the_client_cancels_every_budget(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    outcomes: dict[str, object] = {}

    async def budgeted(bb: bb3.Client, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        with bb.beat_budget(1000) as scope:
            await trio.sleep_forever()
        outcomes["beat_budget"] = scope.cancelled_caught

    async def failing(bb: bb3.Client, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        try:
            with bb.fail_after_beats(1000):
                await trio.sleep_forever()
        except bb3.NotConnected as exc:
            outcomes["fail_after_beats"] = exc

    async with trio.open_nursery() as nursery, cluster.open_client() as bb:
        await bb.wait_for_beat()
        await nursery.start(budgeted, bb)
        await nursery.start(failing, bb)
        await trio.sleep(3)
        t_close = trio.current_time()
    assert trio.current_time() == pytest.approx(t_close)
    assert outcomes["beat_budget"] is True
    assert isinstance(outcomes["fail_after_beats"], bb3.NotConnected)
    with pytest.raises(bb3.NotConnected), bb.fail_after_beats(1):
        await trio.sleep_forever()


@settings(max_examples=25, deadline=None)
@given(
    tempo=st.integers(30, 1200),
    beats=st.floats(0.05, 12, allow_nan=False),
    offset=st.floats(0, 0.99),
)
def test_budget_deadline_is_the_beat_count_at_a_steady_tempo(
    tempo: int, beats: float, offset: float
) -> None:
    async def main() -> float:
        async with (
            bbt.open_fake_cluster(CLUSTER, tempo_bpm=tempo) as cluster,
            cluster.open_client(jitter_tolerance=0.001) as bb,
        ):
            await bb.wait_for_beat()
            await trio.sleep(offset * 60 / tempo)
            t0 = trio.current_time()
            with bb.beat_budget(beats):
                await trio.sleep_forever()
            return trio.current_time() - t0

    elapsed = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # deadline_at has microsecond resolution: the budget may land a few microseconds off
    assert elapsed == pytest.approx(beats * 60 / tempo, abs=1e-5)


# --- local degradation ----------------------------------------------------------------------------
async def test_silent_pulse_degrades_to_an_absolute_local_schedule(
    cluster: bbt.FakeCluster,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster.open_client(jitter_tolerance=0.05) as bb:
        healthy = await beat_times(bb, 3)
        k, t_k, frame_k = healthy[-1]
        cluster.stop_pulse()
        local = await beat_times(bb, 6)
        health = bb.health()
    assert health.local_degradation
    assert bb.metrics.degraded_episodes == 1
    assert bb.metrics.degraded_beats == 6
    assert any("keeping time locally" in e for e in health.errors)
    assert [i for i, _, _ in local] == list(range(k + 1, k + 7))
    # first local beat: one beat + jitter after the last pulse beat; then exactly on schedule
    assert local[0][1] == pytest.approx(t_k + 1.05)
    for n, (index, at, frame) in enumerate(local[1:], start=2):
        assert at == pytest.approx(t_k + n * 1.0)
        # same window/phase arithmetic, the pulse's timeline for deadline_at, a local HLC
        assert frame.window_id == bb3.window_id(CLUSTER, index)
        assert frame.phase == bb3.phase_for(index)
        assert frame.downbeat == (index % 4 == 0)
        assert frame.deadline_at == frame_k.deadline_at + dt.timedelta(seconds=n)
        # stamped by the connection's judge, which made it up for every client on it
        assert bb3.HLCStamp.parse(frame.hlc).node == bb3.HLC(f"backbeat-local:{CLUSTER}").node


async def test_pulse_return_resyncs_without_duplicates(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    async with cluster.open_client() as bb:
        chan = await silence_pulse(cluster, bb, after=3, for_s=4.5)
        assert bb.degraded
        await cluster.start_pulse()  # resumes the same timeline
        await trio.sleep(4.2)
        assert not bb.degraded
        assert not bb.health().local_degradation
        frames = [chan.receive_nowait() for _ in range(chan.pending)]
    indices = [f.beat_index for f in frames]
    assert indices == list(range(indices[0], indices[0] + len(indices)))  # no repeat, no gap
    assert bb.metrics.resyncs == 1
    assert bb.metrics.forward_jumps == 0
    assert bb.metrics.duplicate_or_old == 0


async def test_pulse_returning_ahead_is_a_counted_forward_jump(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    async with cluster.open_client() as bb:
        chan = await silence_pulse(cluster, bb, after=2, for_s=2.5)
        last_local = bb.current_beat
        assert last_local is not None
        await cluster.start_pulse(start_index=last_local + 10)
        frames = await take(chan, 4)
    indices = [f.beat_index for f in frames]
    assert last_local + 10 in indices
    assert indices == sorted(set(indices))
    assert bb.metrics.forward_jumps == 1
    assert bb.metrics.beats_skipped == 9
    assert bb.metrics.resyncs == 1


async def test_pulse_restarted_from_zero_never_moves_the_client_backwards(
    cluster: bbt.FakeCluster,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster.open_client() as bb:
        chan = await silence_pulse(cluster, bb, after=6, for_s=1.5)
        await cluster.start_pulse(start_index=0)
        frames = await take(chan, 6)
        assert bb.degraded  # the old-index pulse is not trusted
    indices = [f.beat_index for f in frames]
    assert indices == list(range(indices[0], indices[0] + 6))
    assert bb.metrics.resyncs == 0
    assert bb.metrics.duplicate_or_old >= 3


# --- claims out -----------------------------------------------------------------------------------
async def test_emit_status_fills_the_sdk_fields(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    raw = await spy(cluster)
    async with cluster.open_client("agent-7") as bb:
        frame = await bb.wait_for_beat()
        claim = bb3.StatusClaim(
            agent_id="somebody-else",
            beat_index=999,
            hlc="1:1:1",
            state="executing",
            beats_left=3,
            progress=0.25,
            notes="n",
        )
        sent = await bb.emit_status(claim)
        named = await bb.emit_status(bb3.StatusClaim(task_id="task-42", state="planning"))
        await bb.flush_claims()
    assert sent.agent_id == "agent-7"
    assert sent.beat_index == frame.beat_index
    assert sent.hlc != "1:1:1"
    assert bb3.HLCStamp.parse(sent.hlc) < bb3.HLCStamp.parse(named.hlc)
    assert sent.task_id.startswith("task:")
    assert len(sent.task_id) == len("task:") + 8
    assert named.task_id == "task-42"
    msgs = drain(raw)
    assert len(msgs) == 2
    body = msgspec.json.decode(msgs[0].data)
    assert body["type"] == "backbeat.statusclaim.v1"
    assert body["agent_id"] == "agent-7"
    assert "wait_for" not in body  # Go's omitempty
    digest = hashlib.sha256(msgs[0].data).hexdigest()[:16]  # unsigned: sha256(body)
    assert msgs[0].headers["Nats-Msg-Id"] == f"agent-7:{sent.hlc}:{digest}"
    assert "Backbeat-Sig" not in msgs[0].headers  # no key configured
    assert cluster.claims == [sent, named]
    assert bb.delivery_mode == "core"
    assert bb.health().delivery == "core"
    assert bb.metrics.claims_ok == 2
    assert bb.metrics.claims_confirmed == 2


async def test_claims_are_signed_over_the_exact_bytes(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    key = bb3.generate_signing_key()
    raw = await spy(cluster)
    async with cluster.open_client("agent-7", signing_key=key) as bb:
        await bb.wait_for_beat()
        sent = await bb.emit_status(bb3.StatusClaim(state="review", progress=1.0))
    (msg,) = drain(raw)
    headers = msg.headers
    assert headers["Backbeat-Agent"] == "agent-7"
    assert base64.b64decode(headers["Backbeat-Key"]) == bytes(key.verify_key)
    VerifyKey(bytes(key.verify_key)).verify(msg.data, base64.b64decode(headers["Backbeat-Sig"]))
    ring = bb3.Keyring({"agent-7": key.verify_key})
    assert bb3.verify_claim(msg.data, headers, ring) == sent
    with pytest.raises(bb3.SignatureError):
        bb3.verify_claim(msg.data.replace(b"review", b"failed"), headers, ring)


INVALID: dict[str, Any] = {
    "state": bb3.StatusClaim(state="sleeping"),  # type: ignore[arg-type]
    "progress": bb3.StatusClaim(progress=1.5),
    "negative progress": bb3.StatusClaim(progress=-0.1),
    "beats_left": bb3.StatusClaim(beats_left=-1),
    "notes": bb3.StatusClaim(notes="x" * 4097),
    "task_id": bb3.StatusClaim(task_id="t" * 129),
    "wait_for": bb3.StatusClaim(state="waiting", wait_for=[""]),
    "not a claim": {"state": "executing"},
}


@pytest.mark.parametrize("kind", sorted(INVALID))
async def test_invalid_claim_raises_before_anything_is_sent(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    raw = await spy(cluster)
    async with cluster.open_client() as bb:
        await bb.wait_for_beat()
        with pytest.raises(bb3.InvalidStatusClaim):
            await bb.emit_status(INVALID[kind])
        assert bb.pending_claims == 0
    assert drain(raw) == []
    assert bb.metrics.claims_ok == 0


async def test_core_mode_queues_claims_while_disconnected_then_sends_them_in_order(
    cluster: bbt.FakeCluster,
    autojump_clock: trio.testing.MockClock,
) -> None:
    raw = await spy(cluster)
    async with cluster.open_client(outbox_size=3) as bb:
        await bb.wait_for_beat()
        cluster.broker.set_down()
        await trio.testing.wait_all_tasks_blocked()
        assert not bb.health().connected
        sent = [await bb.emit_status(bb3.StatusClaim(notes=str(i))) for i in range(3)]
        assert bb.pending_claims == 3
        with pytest.raises(bb3.NotConnected, match="outbox full"):
            await bb.emit_status(bb3.StatusClaim(notes="one too many"))
        assert bb.metrics.claims_failed == 1
        assert drain(raw) == []
        cluster.broker.set_up()
        with trio.fail_after(10):
            await bb.flush_claims()
        assert bb.health().connected
        assert bb.health().reconnect_count == 1
    got = [
        bb3.verify_claim(m.data, m.headers, bb3.Keyring(), allow_unsigned=True) for m in drain(raw)
    ]
    assert got == sent
    assert bb.metrics.claims_unconfirmed == 0


async def test_jetstream_mode_keeps_claims_until_acked_and_republishes_in_order(
    js_cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    async with js_cluster.open_client() as bb:
        assert bb.delivery_mode == "jetstream"
        assert bb.health().delivery == "jetstream"
        await bb.wait_for_beat()
        first = await bb.emit_status(bb3.StatusClaim(notes="before"))
        await bb.flush_claims()
        assert bb.metrics.claims_acked == 1
        # the server "dies": publishes (and their acks) vanish until it is back
        js_cluster.broker.set_down()
        lost = [await bb.emit_status(bb3.StatusClaim(notes=f"down {i}")) for i in range(5)]
        assert bb.pending_claims == 5
        js_cluster.broker.set_up()
        with trio.fail_after(30):
            await bb.flush_claims()
        assert bb.pending_claims == 0
        assert bb.metrics.claims_acked == 6
    ids = stored_ids(js_cluster)
    assert ids == [f"agent-1:{c.hlc}" for c in [first, *lost]]  # each once, in order


async def test_unacked_claim_is_retried_while_acks_keep_flowing(
    js_cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    async with js_cluster.open_client() as bb:
        await bb.wait_for_beat()
        # one claim vanishes silently (no disconnect event at all)
        js_cluster.broker.lose_next()
        dropped = await bb.emit_status(bb3.StatusClaim(notes="vanished"))
        assert js_cluster.broker.lost_in_flight == 1
        # a steady flow of other claims (and acks) must not starve its retry
        for i in range(40):
            await bb.emit_status(bb3.StatusClaim(notes=f"{i}"))
            await trio.sleep(0.25)
        assert bb.pending_claims == 0
    ids = stored_ids(js_cluster)
    assert ids.count(f"agent-1:{dropped.hlc}") == 1
    assert len(ids) == 41
    assert bb.metrics.claims_republished >= 1


async def test_refused_publishes_are_retried_in_order_holding_new_claims(
    js_cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    async with js_cluster.open_client() as bb:
        await bb.wait_for_beat()
        js_cluster.broker.jetstream_available = False  # answers 503, stores nothing
        refused = [await bb.emit_status(bb3.StatusClaim(notes=f"r{i}")) for i in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        assert any("no JetStream responder" in e for e in bb.health().errors)
        # JetStream is back before the retry: new claims must still not overtake
        js_cluster.broker.jetstream_available = True
        held = [await bb.emit_status(bb3.StatusClaim(notes=f"h{i}")) for i in range(2)]
        assert stored_ids(js_cluster) == []
        assert bb.pending_claims == 5
        with trio.fail_after(10):
            await bb.flush_claims()
        later = await bb.emit_status(bb3.StatusClaim(notes="after"))
        await bb.flush_claims()
    ids = stored_ids(js_cluster)
    assert ids == [f"agent-1:{c.hlc}" for c in [*refused, *held, later]]
    assert bb.metrics.claims_republished >= 1


async def test_undelivered_claims_are_raised_at_close(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    queued: list[bb3.StatusClaim] = []
    t_close: list[float] = []

    async def agent() -> None:
        async with cluster.open_client(close_grace=0.5) as bb:
            await bb.wait_for_beat()
            cluster.broker.set_down()
            queued.append(await bb.emit_status(bb3.StatusClaim(notes="stuck")))
            t_close.append(trio.current_time())

    with pytest.raises(bb3.UndeliveredClaims) as info:
        await agent()
    assert info.value.claims == queued
    assert isinstance(info.value, bb3.NotConnected)
    assert trio.current_time() - t_close[0] == pytest.approx(0.5)  # bounded grace


async def test_queued_claims_drain_within_the_grace_on_exit(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    raw = await spy(cluster)
    async with trio.open_nursery() as nursery, cluster.open_client(close_grace=5) as bb:
        await bb.wait_for_beat()
        cluster.broker.set_down()
        queued = await bb.emit_status(bb3.StatusClaim(notes="wait for me"))

        async def back_soon() -> None:
            await trio.sleep(1)
            cluster.broker.set_up()

        nursery.start_soon(back_soon)
    ids = [m.headers["Nats-Msg-Id"].rsplit(":", 1)[0] for m in drain(raw)]
    assert ids == [f"agent-1:{queued.hlc}"]


# --- the open_client boundary ---------------------------------------------------------------------
async def test_user_exception_wins_and_is_not_wrapped(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    original = KeyError("original")

    async def agent() -> None:
        async with cluster.open_client() as bb:
            await bb.wait_for_beat()
            try:
                raise original
            except KeyError:
                raise ValueError("mine")  # noqa: B904 - the implicit context is the point

    with pytest.raises(ValueError, match="mine") as info:
        await agent()
    assert not isinstance(info.value, BaseExceptionGroup)
    assert info.value.__context__ is original  # the user's own context survives the unwrap


async def test_user_exception_wins_over_undelivered_claims(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    async def agent() -> None:
        async with cluster.open_client(close_grace=0.1) as bb:
            await bb.wait_for_beat()
            cluster.broker.set_down()
            await bb.emit_status(bb3.StatusClaim(state="failed"))
            raise RuntimeError("agent failed")

    with pytest.raises(RuntimeError, match="agent failed") as info:
        await agent()
    assert any("not delivered" in note for note in info.value.__notes__)


async def test_outer_cancellation_passes_through(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.move_on_after(3) as scope:
        async with cluster.open_client() as bb:
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert bb.current_beat is not None


class BrokenTransport(MemoryTransport):
    async def subscribe(
        self, subject: str, *, buffer: int = 1024, handler: object = None
    ) -> Subscription:
        raise bb3.NotConnected(f"cannot subscribe to {subject}")


async def test_failing_start_raises_one_clear_error_from_aenter(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    reached = False
    with pytest.raises(bb3.NotConnected, match="cannot subscribe") as info:
        async with bb3.open_client(cluster.config(), transport=BrokenTransport(cluster.broker)):
            reached = True  # pragma: no cover
    assert not reached
    assert not isinstance(info.value, BaseExceptionGroup)


async def test_open_client_needs_a_config(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    with pytest.raises(TypeError, match="Config"):
        async with bb3.open_client({"cluster_id": CLUSTER}):  # type: ignore[arg-type]
            pass  # pragma: no cover


async def test_jetstream_required_but_missing_is_a_clear_error(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    with pytest.raises(bb3.NotConnected, match="no JetStream stream"):
        async with cluster.open_client(jetstream=True):
            pass  # pragma: no cover


async def test_memory_request_without_responders(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    t = cluster.broker.connect()
    with pytest.raises(bb3.NotConnected, match="no responders"):
        await t.request("nobody.listens", b"?")


# --- health ---------------------------------------------------------------------------------------
GO_FIELDS = {
    "connected": bool,
    "last_beat": int,
    "last_beat_time": str,
    "time_drift": int,
    "reconnect_count": int,
    "local_degradation": bool,
    "current_tempo": int,
    "tempo_drift": int,
    "measured_bpm": float,
    "errors": list,
}


async def test_health_json_has_the_go_shape(
    cluster: bbt.FakeCluster, autojump_clock: trio.testing.MockClock
) -> None:
    async with cluster.open_client() as bb:
        before = msgspec.json.decode(msgspec.json.encode(bb.health()))
        assert before["last_beat_time"] == "0001-01-01T00:00:00Z"  # Go's zero time
        await beat_times(bb, 4)
        health = bb.health()
    data = msgspec.json.decode(msgspec.json.encode(health))
    assert list(data)[: len(GO_FIELDS)] == list(GO_FIELDS)
    for name, kind in GO_FIELDS.items():
        assert isinstance(data[name], kind), (name, data[name])
    assert data["last_beat"] == bb.current_beat
    assert data["current_tempo"] == 60
    assert data["connected"] is True
    assert dt.datetime.fromisoformat(data["last_beat_time"]).timestamp() == pytest.approx(
        bbt.virtual_wall_clock(), abs=1.0
    )
    assert data["delivery"] == "core"
    assert data["metrics"]["beats"] == 4
    assert msgspec.json.decode(msgspec.json.encode(health), type=bb3.HealthStatus) == health
