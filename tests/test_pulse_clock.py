"""The pulse's wall clock: ``deadline_at`` keeps to the wall clock without ever jumping.

The pulse times beats on trio's monotonic clock and places them on the wall clock through a
slewed :class:`WallAnchor`. On a host whose wall clock runs at another rate than its monotonic
one (the CI machine's did: ``docs/decisions.md``), a fixed anchor let ``deadline_at`` drift from
the wall clock by that rate, beat after beat; a stepped wall clock must still never make it jump.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools

import pytest
import trio
import trio.testing
from _ha_harness import Fleet
from hypothesis import given
from hypothesis import strategies as st

import backbeat_trio as bb3
from backbeat_trio._core.beats import beat_subject
from backbeat_trio._core.schedule import WALL_SLEW, WallAnchor
from backbeat_trio._core.wire import decode_frame
from backbeat_trio._errors import ConfigError
from backbeat_trio._services.ha_pulse import HAPulseConfig, HAPulseStatus, run_ha_pulse
from backbeat_trio.testing import VIRTUAL_EPOCH
from backbeat_trio.testing.memory import MemoryBroker

# (schedule seconds since the last beat, the wall clock's offset now)
steps = st.lists(
    st.tuples(
        st.floats(0.001, 120.0),
        st.one_of(
            st.floats(-5.0, 5.0),  # steps either way
            st.floats(-0.01, 0.01),  # drift
            st.just(0.0),
        ),
    ),
    min_size=1,
    max_size=200,
)


@given(steps, st.sampled_from([WALL_SLEW, 0.01, 0.3]))
def test_deadlines_increase_within_the_slew_and_the_anchor_closes_in(
    script: list[tuple[float, float]], slew: float
) -> None:
    anchor = WallAnchor(0.0, slew=slew)
    t = 1000.0
    last_deadline = t + anchor.follow(t, 0.0)
    for gap, wall_offset in script:
        before = anchor.offset
        t += gap
        deadline = t + anchor.follow(t, wall_offset)
        # never back, never a jump: each gap stays within the slew of the schedule's
        assert (1 - slew) * gap * (1 - 1e-9) <= deadline - last_deadline
        assert deadline - last_deadline <= (1 + slew) * gap * (1 + 1e-9) + 1e-9
        # it moves towards the wall clock's offset and never past it
        assert abs(wall_offset - anchor.offset) <= abs(wall_offset - before) + 1e-12
        if abs(wall_offset - before) <= slew * gap:
            assert anchor.offset == pytest.approx(wall_offset, abs=1e-9)
        last_deadline = deadline


def test_a_step_is_taken_in_at_the_slew_rate() -> None:
    anchor = WallAnchor(0.0, slew=0.05)
    anchor.follow(0.0, 0.0)
    offsets = [anchor.follow(float(k), 1.0) for k in range(1, 25)]
    assert offsets[:19] == pytest.approx([0.05 * k for k in range(1, 20)])
    assert offsets[19:] == pytest.approx([1.0] * 5)
    assert anchor.follow(3.0, -7.0) == pytest.approx(1.0)  # an earlier time moves nothing


@pytest.mark.parametrize("slew", [-0.1, 1.0, float("nan")])
def test_a_slew_outside_0_to_1_is_refused(slew: float) -> None:
    with pytest.raises(ConfigError, match="slew"):
        WallAnchor(0.0, slew=slew)


async def run_pulse_on(wall_clock: object, seconds: float) -> list[tuple[float, float]]:
    """A pulse at 600 BPM for ``seconds`` on a memory bus: each frame's ``deadline_at`` and
    the wall clock when it arrived."""
    broker = MemoryBroker()
    cfg = bb3.PulseConfig(cluster_id="wall", tempo_bpm=600, pulse_id="p")
    got: list[tuple[float, float]] = []
    async with trio.open_nursery() as nursery:
        listener = broker.connect()
        sub = await listener.subscribe(beat_subject("wall"), buffer=100_000)
        await nursery.start(
            lambda task_status: bb3.run_pulse(
                cfg, transport=broker.connect(), wall_clock=wall_clock, task_status=task_status
            )
        )
        with trio.move_on_after(seconds):
            async for msg in sub.messages:
                frame = decode_frame(msg.data)
                got.append((frame.deadline_at.timestamp(), wall_clock()))  # type: ignore[operator]
        nursery.cancel_scope.cancel()
    return got


async def test_deadlines_keep_to_a_fast_wall_clock_and_a_step_is_slewed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()

    def wall() -> float:
        # runs 0.5 % ahead of trio's clock, and is stepped 1 s ahead 20 s in
        t = trio.current_time() - start
        return VIRTUAL_EPOCH + 1.005 * t + (1.0 if t >= 20.0 else 0.0)

    frames = await run_pulse_on(wall, 60.0)
    assert len(frames) > 550
    beat = 0.1
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(frames)]
    # never a jump, never back: at most the slew's share of a beat apart from a beat
    assert min(gaps) >= (1 - WALL_SLEW) * beat - 2e-6  # (deadline_at: microseconds)
    assert max(gaps) <= (1 + WALL_SLEW) * beat + 2e-6
    # the frame is published when its beat starts: its deadline is one beat of wall time
    # ahead. A fixed anchor would be 0.3 s (drift) + 1 s (step) behind by the end.
    ahead = [deadline - at for deadline, at in frames]
    assert ahead[100] == pytest.approx(beat, abs=0.002)  # drift alone, before the step
    assert ahead[-1] == pytest.approx(beat, abs=0.002)  # the step taken in as well
    assert min(ahead) < beat - 0.9  # the step itself was not jumped over


async def test_a_pulse_on_an_honest_wall_clock_keeps_exact_beat_lengths(
    autojump_clock: trio.testing.MockClock,
) -> None:
    frames = await run_pulse_on(bb3.testing.virtual_wall_clock, 5.0)
    stamps = [dt.datetime.fromtimestamp(d, dt.UTC) for d, _ in frames]
    assert len(stamps) >= 45
    for a, b in itertools.pairwise(stamps):
        assert abs((b - a) - dt.timedelta(seconds=0.1)) <= dt.timedelta(microseconds=2)


async def test_ha_pulses_keep_to_the_wall_clock_across_a_failover(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The leader's anchor follows the wall clock; the lease records it, and a successor goes
    on from there with its own (beats keep their wall-clock deadlines across the hand-over)."""
    start = trio.current_time()

    def wall() -> float:
        t = trio.current_time() - start
        return VIRTUAL_EPOCH + 1.005 * t + (0.5 if t >= 10.0 else 0.0)

    broker = MemoryBroker()
    frames: list[tuple[int, float, float]] = []  # beat index, deadline_at, wall at arrival
    async with trio.open_nursery() as nursery:
        listener = broker.connect()
        sub = await listener.subscribe(beat_subject("wallha"), buffer=100_000)

        async def collect() -> None:
            async for msg in sub.messages:
                frame = decode_frame(msg.data)
                frames.append((frame.beat_index, frame.deadline_at.timestamp(), wall()))

        nursery.start_soon(collect)
        fleet: Fleet[HAPulseStatus] = Fleet(nursery, lambda s: s.leading)
        for name in ("p1", "p2"):
            cfg = HAPulseConfig(cluster_id="wallha", pulse_id=name, tempo_bpm=600, lease_ttl=1.0)
            await fleet.start_scoped(
                name,
                functools.partial(run_ha_pulse, cfg, transport=broker.connect(), wall_clock=wall),
            )
        await trio.sleep(30.0)
        leader = fleet.holder()
        assert leader is not None
        fleet.crash(leader)
        crashed_at = wall()
        await trio.sleep(30.0)
        assert fleet.holder() not in (None, leader)
        nursery.cancel_scope.cancel()
    beat = 0.1
    indices = [i for i, _, _ in frames]
    assert indices == sorted(set(indices))
    deadlines = [d for _, d, _ in frames]
    assert all(b > a for a, b in itertools.pairwise(deadlines))
    ahead = {i: d - at for i, d, at in frames}
    first = indices[0]
    # drift only (before the step): kept up with by the leader; a fixed anchor: 0.04 s behind
    assert ahead[first + 80] == pytest.approx(beat, abs=0.002)
    # the step (taken in over 10 s) and the successor: back to one beat ahead
    after = [(i, d, at) for i, d, at in frames if at > crashed_at + 5.0]
    assert after
    assert after[-1][1] - after[-1][2] == pytest.approx(beat, abs=0.002)
