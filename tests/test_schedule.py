"""The pulse's schedule (sans-IO): downbeat-aligned tempo changes, no drift, skips, hand-over."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from backbeat_trio._core.beats import phase_for, window_id
from backbeat_trio._core.schedule import PulseSchedule, ScheduledBeat
from backbeat_trio._errors import ConfigError

tempos = st.integers(1, 1200)
bars = st.integers(1, 8)
starts = st.integers(0, 10_000)
times = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


def within_step(current: int, wanted: int, step: Fraction = Fraction(1, 10)) -> bool:
    return abs(wanted - current) <= step * current


@st.composite
def tempo_steps(draw: st.DrawFn) -> tuple[int, int]:
    """A tempo and a different tempo at most 10 % away (so the change is accepted)."""
    current = draw(st.integers(10, 1200))
    lo, hi = max(1, math.ceil(current * 0.9)), min(1200, math.floor(current * 1.1))
    wanted = draw(st.integers(lo, hi).filter(lambda t: t != current))
    return current, wanted


def test_beats_carry_the_time_model() -> None:
    sched = PulseSchedule("prod", tempo_bpm=60, t0=100.0)
    beats = [sched.next_beat() for _ in range(5)]
    assert [b.beat_index for b in beats] == [0, 1, 2, 3, 4]
    assert [b.phase for b in beats] == ["plan", "execute", "execute", "review", "plan"]
    assert [b.downbeat for b in beats] == [True, False, False, False, True]
    assert [b.due for b in beats] == [100.0, 101.0, 102.0, 103.0, 104.0]
    assert beats[0].deadline == 101.0
    assert beats[0].window_id == beats[3].window_id == window_id("prod", 0)
    assert beats[4].window_id != beats[3].window_id
    assert beats[0].duration == 1.0
    assert "prod" in repr(sched)
    assert "next=5" in repr(sched)


@given(bpb=bars, start=starts, steps=tempo_steps(), wait=st.integers(0, 20), t0=times)
def test_tempo_change_lands_exactly_on_the_next_downbeat(
    bpb: int, start: int, steps: tuple[int, int], wait: int, t0: float
) -> None:
    old, new = steps
    sched = PulseSchedule("c", tempo_bpm=old, beats_per_bar=bpb, start_index=start, t0=t0)
    for _ in range(wait):
        sched.next_beat()
    decision = sched.request_tempo(new)
    assert decision.accepted, decision.reason
    downbeat = sched.next_index + (-sched.next_index) % bpb
    assert decision.effective_beat == downbeat
    assert sched.pending_tempo == new
    assert sched.tempo_bpm == old
    previous: ScheduledBeat | None = None
    while True:
        beat = sched.next_beat()
        if previous is not None:
            assert beat.due == previous.deadline
        if beat.beat_index < downbeat:
            assert beat.tempo_bpm == old
        else:
            assert beat.beat_index == downbeat
            assert beat.downbeat
            assert beat.tempo_bpm == new
            assert sched.pending_tempo is None
            assert sched.tempo_bpm == new
            break
        previous = beat
    after = [sched.next_beat() for _ in range(2 * bpb)]
    assert all(b.tempo_bpm == new for b in after)
    assert math.isclose(after[-1].due - beat.due, 2 * bpb * 60 / new, rel_tol=1e-9, abs_tol=1e-9)


@given(
    bpb=bars,
    start=starts,
    tempo=tempos,
    t0=times,
    ops=st.lists(st.one_of(st.none(), tempos), max_size=60),
)
def test_due_times_strictly_increase_and_chain(
    bpb: int, start: int, tempo: int, t0: float, ops: list[int | None]
) -> None:
    sched = PulseSchedule("c", tempo_bpm=tempo, beats_per_bar=bpb, start_index=start, t0=t0)
    previous = sched.next_beat()
    for op in ops:
        if op is not None:
            sched.request_tempo(op, force=True)
        beat = sched.next_beat()
        assert beat.beat_index == previous.beat_index + 1
        assert beat.due > previous.due
        assert beat.due == previous.deadline
        assert beat.deadline > beat.due
        assert beat.phase == phase_for(beat.beat_index, bpb)
        if not beat.downbeat:
            assert beat.tempo_bpm == previous.tempo_bpm
        previous = beat


@settings(max_examples=15, deadline=None)
@given(tempo=tempos, t0=times, start=starts)
def test_no_drift_over_ten_thousand_beats(tempo: int, t0: float, start: int) -> None:
    sched = PulseSchedule("c", tempo_bpm=tempo, start_index=start, t0=t0)
    for _ in range(10_000):
        beat = sched.next_beat()
    last = sched.next_beat()
    assert last.beat_index == start + 10_000
    expected = t0 + 10_000 * 60 / tempo
    assert math.isclose(last.due, expected, rel_tol=1e-9, abs_tol=1e-9)
    # exact up to the single rounding of one addition
    assert abs(last.due - expected) <= 2 * math.ulp(expected)
    assert beat.deadline == last.due


@given(current=tempos, wanted=st.integers(-5, 1300))
def test_ten_percent_rule(current: int, wanted: int) -> None:
    sched = PulseSchedule("c", tempo_bpm=current, t0=0.0)
    decision = sched.request_tempo(wanted)
    in_range = 1 <= wanted <= 1200
    assert decision.accepted == (in_range and within_step(current, wanted))
    assert decision.previous_bpm == current
    if not decision.accepted:
        assert decision.reason
        assert decision.effective_beat is None
        assert sched.pending_tempo is None
    forced = sched.request_tempo(wanted, force=True)
    assert forced.accepted == in_range
    unlimited = PulseSchedule("c", tempo_bpm=current, t0=0.0, max_tempo_step=None)
    assert unlimited.request_tempo(wanted).accepted == in_range


def test_tempo_refusals_explain_themselves() -> None:
    sched = PulseSchedule("c", tempo_bpm=60, t0=0.0)
    too_far = sched.request_tempo(67)
    assert not too_far.accepted
    assert "+11.7%" in too_far.reason
    assert "force=True" in too_far.reason
    assert sched.request_tempo(66).accepted  # exactly +10 %
    assert sched.request_tempo(54).accepted  # exactly -10 %
    assert "outside" in sched.request_tempo(0).reason
    assert "outside" in sched.request_tempo(1201, force=True).reason
    assert "int" in sched.request_tempo(61.0).reason
    assert not sched.request_tempo(True).accepted
    assert sched.pending_tempo == 54
    same = sched.request_tempo(60)
    assert same.accepted
    assert sched.pending_tempo is None
    assert "cancels pending 54" in same.reason


def test_later_request_replaces_pending_and_step_is_from_tempo_in_force() -> None:
    sched = PulseSchedule("c", tempo_bpm=100, t0=0.0)
    sched.next_beat()  # mid-bar now
    assert sched.request_tempo(110).accepted
    # 120 is within 10 % of the pending 110 but not of the 100 in force
    assert not sched.request_tempo(120).accepted
    assert sched.request_tempo(95).accepted
    assert sched.pending_tempo == 95
    beats = [sched.next_beat() for _ in range(4)]
    assert [b.tempo_bpm for b in beats] == [100, 100, 100, 95]
    assert beats[-1].beat_index == 4


@given(
    bpb=bars,
    start=starts,
    tempo=st.integers(10, 1200),
    t0=times,
    before=st.lists(st.one_of(st.none(), tempos), max_size=30),
    after=st.lists(st.one_of(st.none(), tempos), max_size=30),
)
def test_state_round_trip_continues_identically(
    bpb: int,
    start: int,
    tempo: int,
    t0: float,
    before: list[int | None],
    after: list[int | None],
) -> None:
    original = PulseSchedule("c", tempo_bpm=tempo, beats_per_bar=bpb, start_index=start, t0=t0)
    for op in before:
        if op is None:
            original.next_beat()
        else:
            original.request_tempo(op, force=True)
    snapshot = json.loads(json.dumps(original.state()))
    assert snapshot["beat_index"] == original.next_index
    assert snapshot["due"] == original.next_due
    assert snapshot["pending_tempo_bpm"] == original.pending_tempo
    successor = PulseSchedule.from_state(snapshot)
    assert successor.state() == original.state()
    for op in [*after, None, None]:
        if op is None:
            assert successor.next_beat() == original.next_beat()
        else:
            assert successor.request_tempo(op) == original.request_tempo(op)


def test_from_state_without_anchor_and_with_shift() -> None:
    sched = PulseSchedule("c", tempo_bpm=60, t0=10.0, start_index=8)
    for _ in range(3):
        sched.next_beat()
    snap = sched.state()
    del snap["anchor_index"], snap["anchor_time"]
    moved = PulseSchedule.from_state(snap, shift=-10.0)
    beat = moved.next_beat()
    assert (beat.beat_index, beat.due) == (11, 3.0)
    with pytest.raises(ConfigError, match="tempo_bpm"):
        PulseSchedule.from_state({"cluster_id": "c", "beat_index": 0, "due": 0.0})
    with pytest.raises(ConfigError, match="pending_tempo_bpm"):
        PulseSchedule.from_state({**sched.state(), "pending_tempo_bpm": 5000})


def test_skip_to_skips_wholly_past_beats_only() -> None:
    sched = PulseSchedule("c", tempo_bpm=60, t0=0.0)
    assert sched.skip_to(0.5) == 0  # beat 0 is in progress: keep it
    assert sched.skip_to(-100.0) == 0
    assert sched.next_index == 0
    assert sched.skip_to(7.25) == 7  # stalled: beats 0..6 are over, 7 is in progress
    beat = sched.next_beat()
    assert (beat.beat_index, beat.due, beat.deadline) == (7, 7.0, 8.0)
    assert sched.skip_to(8.0) == 0  # beat 8 starts exactly now
    assert sched.next_beat().beat_index == 8


def test_skip_to_applies_pending_tempo_at_the_downbeat_it_passes() -> None:
    sched = PulseSchedule("c", tempo_bpm=60, t0=0.0)
    sched.next_beat()
    assert sched.request_tempo(66).accepted
    # downbeat 4 is due at 4.0; from there beats last 60/66 s
    skipped = sched.skip_to(4.0 + 5 * 60 / 66 + 0.01)
    assert skipped == 8
    assert sched.pending_tempo is None
    beat = sched.next_beat()
    assert beat.beat_index == 9
    assert beat.tempo_bpm == 66
    assert math.isclose(beat.due, 4.0 + 5 * 60 / 66)


@given(
    bpb=bars,
    tempo=st.integers(30, 1200),
    pending=st.one_of(st.none(), tempos),
    handed=st.integers(0, 10),
    lag=st.floats(0, 100),
)
def test_skip_to_matches_stepping_one_beat_at_a_time(
    bpb: int, tempo: int, pending: int | None, handed: int, lag: float
) -> None:
    sched = PulseSchedule("c", tempo_bpm=tempo, beats_per_bar=bpb, t0=3.0)
    for _ in range(handed):
        sched.next_beat()
    if pending is not None:
        sched.request_tempo(pending, force=True)
    now = 3.0 + lag
    start = sched.next_index
    reference = PulseSchedule.from_state(sched.state())
    skipped = sched.skip_to(now)
    # reference: hand beats out one by one until one is not wholly in the past
    for _ in range(100_000):
        want = reference.next_beat()
        if want.deadline > now:
            break
    assert skipped == want.beat_index - start
    got = sched.next_beat()
    assert got == want
    if skipped:
        assert got.due <= now < got.deadline


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ConfigError, match="cluster_id"):
        PulseSchedule("bad.id", tempo_bpm=60, t0=0.0)
    with pytest.raises(ConfigError, match="tempo_bpm"):
        PulseSchedule("c", tempo_bpm=0, t0=0.0)
    with pytest.raises(ConfigError, match="beats_per_bar"):
        PulseSchedule("c", tempo_bpm=60, beats_per_bar=0, t0=0.0)
    with pytest.raises(ConfigError, match="start_index"):
        PulseSchedule("c", tempo_bpm=60, start_index=-1, t0=0.0)
    with pytest.raises(ConfigError, match="t0"):
        PulseSchedule("c", tempo_bpm=60, t0=math.nan)
    with pytest.raises(ConfigError, match="max_tempo_step"):
        PulseSchedule("c", tempo_bpm=60, t0=0.0, max_tempo_step=0)


async def test_ten_thousand_virtual_beats_on_time(autojump_clock: trio.testing.MockClock) -> None:
    t0 = trio.current_time() + 1.0
    sched = PulseSchedule("virt", tempo_bpm=1200, t0=t0)
    change_requested_at: int | None = None
    tempo_at: dict[int, int] = {}
    for _ in range(10_000):
        beat = sched.next_beat()
        await trio.sleep_until(beat.due)
        assert trio.current_time() - beat.due == 0
        tempo_at[beat.beat_index] = beat.tempo_bpm
        if beat.beat_index == 4001:  # mid-bar
            assert sched.request_tempo(1100).accepted
            change_requested_at = beat.beat_index
    assert change_requested_at == 4001
    assert all(tempo_at[i] == 1200 for i in range(4004))
    assert all(tempo_at[i] == 1100 for i in range(4004, 10_000))
    expected_last = t0 + 4004 * 60 / 1200 + (9999 - 4004) * 60 / 1100
    assert math.isclose(trio.current_time(), expected_last, rel_tol=1e-12)
