"""The beat-intake core (sans-IO): ordering, staleness, clock offset, bar length, degradation."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backbeat_trio._core.beats import phase_for, window_id
from backbeat_trio._core.hlc import HLC
from backbeat_trio._core.intake import (
    ADOPTED,
    DELIVERED,
    MAX_CLOCK_SKEW,
    RECALIBRATE_AFTER,
    REFUSED,
    BeatTracker,
)
from backbeat_trio._core.metrics import ClientMetrics, ErrorLog
from backbeat_trio._core.rules import MAX_FRAME_BEAT_INDEX
from backbeat_trio._core.wire import BeatFrame, encode

CLUSTER = "c1"
EPOCH = 1_767_225_600.0  # the pulse's clock at local monotonic time 0 (plus any skew)
JITTER = 0.05


def new_tracker(bpb: int = 4) -> BeatTracker:
    return BeatTracker(
        cluster_id=CLUSTER,
        beats_per_bar=bpb,
        jitter_tolerance=JITTER,
        max_frame_bytes=4096,
        hlc=HLC("agent-1"),
        errors=ErrorLog(ClientMetrics()),
    )


def frame_bytes(index: int, tempo: int, *, bpb: int = 4, cluster: str = CLUSTER) -> bytes:
    """The pulse's frame for ``index``: beat ``i`` starts at pulse time EPOCH + i beats."""
    beat = 60.0 / tempo
    return encode(
        BeatFrame(
            cluster_id=cluster,
            beat_index=index,
            downbeat=index % bpb == 0,
            phase=phase_for(index, bpb),
            hlc="000000000001:0000:0001",
            deadline_at=dt.datetime.fromtimestamp(EPOCH + (index + 1) * beat, dt.UTC),
            tempo_bpm=tempo,
            window_id=window_id(cluster, index, bpb),
        )
    )


def feed(tracker: BeatTracker, index: int, tempo: int, now: float, skew: float = 0.0) -> int:
    """Deliver beat ``index`` at local time ``now``; the local wall clock is ``skew`` ahead."""
    return tracker.intake(frame_bytes(index, tempo), now, EPOCH + now + skew)


@settings(max_examples=200, deadline=None)
@given(
    tempo=st.integers(30, 600),
    order=st.lists(st.integers(0, 40), min_size=1, max_size=60),
    delays=st.lists(st.floats(0.0, 3.0), min_size=60, max_size=60),
)
def test_frames_in_any_order_never_move_the_beat_backwards(
    tempo: int, order: list[int], delays: list[float]
) -> None:
    tracker = new_tracker()
    beat = 60.0 / tempo
    now = 0.0
    delivered: list[int] = []
    for index, delay in zip(order, delays[: len(order)], strict=True):
        # arrivals in any order, at any lateness, but on a monotonic local clock
        now = max(now, index * beat + delay * beat)
        before = tracker.last_index
        outcome = feed(tracker, index, tempo, now)
        assert outcome in (REFUSED, DELIVERED)  # never degraded here: nothing to adopt
        if before is not None:
            assert tracker.last_index is not None
            assert tracker.last_index >= before
        if outcome == DELIVERED:
            assert before is None or index > before
            assert tracker.last_index == index
            assert tracker.last_frame is not None
            delivered.append(index)
        else:
            assert tracker.last_index == before
    m = tracker.metrics
    assert delivered == sorted(set(delivered))
    assert m.beats == len(delivered)
    refused = m.duplicate_or_old + m.stale + m.implausible
    assert refused == len(order) - len(delivered)
    assert m.errors >= refused


@settings(max_examples=200, deadline=None)
@given(
    tempo=st.integers(30, 600),
    delay=st.floats(0.0, 0.2),
    late_by=st.floats(0.001, 5.0),
    skew=st.floats(-MAX_CLOCK_SKEW / 2, MAX_CLOCK_SKEW / 2),
)
def test_a_stale_frame_is_refused_and_counted(
    tempo: int, delay: float, late_by: float, skew: float
) -> None:
    tracker = new_tracker()
    beat = 60.0 / tempo
    for i in range(4):  # on time, a constant network delay after each beat's start
        assert feed(tracker, i, tempo, i * beat + delay, skew) == DELIVERED
    # beat 4 arrives after its deadline plus the jitter tolerance (and a margin for rounding)
    now = 4 * beat + delay + beat + JITTER + late_by
    errors = tracker.metrics.errors
    assert feed(tracker, 4, tempo, now, skew) == REFUSED
    assert tracker.metrics.stale == 1
    assert tracker.metrics.errors == errors + 1
    assert tracker.errors.recent[-1].startswith("stale beat 4")
    assert tracker.last_index == 3
    # the next beat, on time, is delivered
    assert feed(tracker, 5, tempo, 5 * beat + delay, skew) == DELIVERED


@settings(max_examples=200, deadline=None)
@given(
    tempo=st.integers(30, 600),
    skew=st.floats(-MAX_CLOCK_SKEW / 2, MAX_CLOCK_SKEW / 2),
    base_delay=st.floats(0.0, 0.5),
    jitters=st.lists(st.floats(0.0, 0.9 * JITTER), min_size=2, max_size=40),
)
def test_the_clock_offset_is_within_the_network_delay_of_the_skew(
    tempo: int, skew: float, base_delay: float, jitters: list[float]
) -> None:
    tracker = new_tracker()
    beat = 60.0 / tempo
    for i, jitter in enumerate(jitters):
        now = i * beat + base_delay + jitter
        assert feed(tracker, i, tempo, now, skew) == DELIVERED
        # the next beat is due one beat after this one started, never in the past
        assert now < tracker.next_due <= now + beat + 1e-9
    recent = jitters[-16:]  # the estimator's window
    offset = tracker.estimator.clock_offset
    # (deadline_at carries microseconds: allow for their rounding)
    low, high = skew + base_delay + min(recent), skew + base_delay + max(recent)
    assert low - 1e-5 <= offset <= high + 1e-5
    assert tracker.metrics.beats == len(jitters)
    assert tracker.metrics.stale == tracker.metrics.implausible == 0


@settings(max_examples=150, deadline=None)
@given(
    tempo=st.integers(30, 500),  # a jitter tolerance under half a beat
    real_beats=st.integers(1, 8),
    silent_beats=st.integers(1, 30),
    steps=st.lists(st.floats(0.01, 0.4), min_size=1, max_size=8),
    back_at=st.integers(0, 3),
)
def test_degradation_keeps_one_beat_per_beat_and_stops_when_the_pulse_is_back(
    tempo: int, real_beats: int, silent_beats: int, steps: list[float], back_at: int
) -> None:
    tracker = new_tracker()
    beat = 60.0 / tempo
    delay = 0.002
    for i in range(real_beats):
        feed(tracker, i, tempo, i * beat + delay)
    # the clocks agree within the tolerance: the schedule is anchored on the pulse's beat start
    last_start = (real_beats - 1) * beat
    assert tracker.last_start == pytest.approx(last_start, abs=1e-5)
    assert tracker.alarm() == pytest.approx(last_start + beat + JITTER, abs=1e-5)
    # the sampler looks at arbitrary moments (any step sizes): before the alarm, nothing is due
    assert not tracker.synthesis_due(last_start + beat + JITTER * 0.9)
    now = last_start
    synthetic: list[tuple[float, BeatFrame]] = []
    end = last_start + beat + JITTER + (silent_beats - 1) * beat + beat / 2
    k = 0
    while now < end:
        now = min(now + steps[k % len(steps)] * beat, end)
        k += 1
        while tracker.synthesis_due(now):
            due = tracker.next_due
            synthetic.append((due, tracker.synthesise(due, EPOCH + now)))
    # exactly one local beat per beat duration from the first missing one
    assert len(synthetic) == silent_beats
    assert tracker.degraded
    assert tracker.metrics.degraded_episodes == 1
    first_due = synthetic[0][0]
    assert first_due == pytest.approx(last_start + beat, abs=1e-5)
    for n, (due, frame) in enumerate(synthetic):
        index = real_beats + n
        assert frame.beat_index == index
        # on the schedule the pulse last set: no drift accumulates from beat to beat
        assert due == pytest.approx(first_due + n * beat, abs=1e-9)
        # the synthetic frame continues the pulse's own timeline
        expected = EPOCH + (index + 1) * beat
        assert frame.deadline_at.timestamp() == pytest.approx(expected, abs=1e-5)
        assert frame.downbeat == (index % 4 == 0)
        assert frame.window_id == window_id(CLUSTER, index, 4)
    assert tracker.metrics.degraded_beats == silent_beats
    # once degraded the exact schedule is kept: no jitter allowance on local beats
    assert tracker.alarm() == tracker.next_due
    # the pulse is back: its frame for the last synthesised beat is adopted, or a later one
    # delivered; either way local beats stop until a beat is missed again
    last = tracker.last_index
    assert last is not None
    index = last + min(back_at, 1)
    outcome = feed(tracker, index, tempo, end)
    assert outcome == (ADOPTED if index == last else DELIVERED)
    assert tracker.last_index == index
    assert not tracker.degraded
    assert tracker.metrics.resyncs == 1
    start = tracker.last_start
    assert start <= end
    assert not tracker.synthesis_due(start + beat + JITTER * 0.9)
    assert tracker.synthesis_due(start + beat + JITTER * 1.1)
    assert tracker.metrics.degraded_beats == silent_beats


def test_refusals_are_counted_by_kind() -> None:
    tracker = new_tracker()
    m = tracker.metrics
    assert tracker.intake(b"x" * 5000, 0.0, EPOCH) == REFUSED
    assert tracker.intake(b"{not json", 0.0, EPOCH) == REFUSED
    assert tracker.intake(frame_bytes(0, 60, cluster="other"), 0.0, EPOCH) == REFUSED
    assert tracker.intake(frame_bytes(0, 60), 0.0, EPOCH + MAX_CLOCK_SKEW + 5) == REFUSED
    assert (m.oversized, m.malformed, m.wrong_cluster, m.implausible) == (1, 1, 1, 1)
    assert feed(tracker, 0, 60, 0.01) == DELIVERED
    assert feed(tracker, 0, 60, 0.02) == REFUSED  # a duplicate
    assert m.duplicate_or_old == 1
    assert m.errors == 5
    assert m.beats == 1
    assert feed(tracker, 3, 60, 3.01) == DELIVERED  # beats 1 and 2 never came
    assert (m.forward_jumps, m.beats_skipped) == (1, 2)


def test_a_run_of_refusals_recalibrates_the_clock_offset() -> None:
    tracker = new_tracker()
    for i in range(3):
        feed(tracker, i, 60, i + 0.01)
    # the local wall clock steps 10 s ahead: every frame now looks 10 s late
    for i in range(3, 3 + RECALIBRATE_AFTER):
        assert feed(tracker, i, 60, i + 0.01, skew=10.0) == REFUSED
    assert tracker.metrics.stale == RECALIBRATE_AFTER
    assert tracker.estimator.samples == 0
    i = 3 + RECALIBRATE_AFTER
    assert feed(tracker, i, 60, i + 0.01, skew=10.0) == DELIVERED


@given(bpb=st.integers(2, 12), start=st.integers(0, 100))
def test_the_bar_length_is_learned_from_a_whole_bar(bpb: int, start: int) -> None:
    tracker = new_tracker(bpb=4)
    tempo = 120
    beat = 60.0 / tempo
    for i in range(start, start + 3 * bpb):
        now = i * beat + 0.001
        tracker.intake(frame_bytes(i, tempo, bpb=bpb), now, EPOCH + now)
    assert tracker.beats_per_bar == bpb


def test_positions_and_deadlines_are_inverse() -> None:
    tracker = new_tracker()
    assert tracker.position(1.0) is None
    assert tracker.deadline_for(5.0) == float("inf")
    feed(tracker, 10, 120, 5.0 + 0.001)
    pos = tracker.position(6.0)
    assert pos is not None
    assert tracker.deadline_for(pos) == pytest.approx(6.0)
    assert tracker.deadline_for(pos + 2) == pytest.approx(6.0 + 2 * 0.5)


@pytest.mark.parametrize(
    ("index", "refused"),
    [
        (2**63 - 1, True),
        (2**63 - 3, True),
        (MAX_FRAME_BEAT_INDEX + 1, True),
        (MAX_FRAME_BEAT_INDEX, False),
    ],
)
def test_a_frame_near_int64s_end_is_refused_and_counted(index: int, refused: bool) -> None:
    tracker = new_tracker()
    tempo = 600
    data = encode(
        BeatFrame(
            cluster_id=CLUSTER,
            beat_index=index,
            downbeat=index % 4 == 0,
            phase=phase_for(index, 4),
            hlc="000000000001:0000:0001",
            deadline_at=dt.datetime.fromtimestamp(EPOCH + 0.1, dt.UTC),
            tempo_bpm=tempo,
            window_id=window_id(CLUSTER, index, 4),
        )
    )
    outcome = tracker.intake(data, 0.0, EPOCH)
    assert (outcome == REFUSED) is refused
    assert tracker.metrics.malformed == (1 if refused else 0)
    assert (tracker.last_index is None) is refused
