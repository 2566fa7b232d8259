"""Tempo estimation: recovers a steady tempo under jitter, drift sign, clock offset, gaps."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backbeat_trio._core.tempo import TempoEstimator

WINDOW = 16
T0 = 12_345.678  # a monotonic clock is far from zero; the fit must not care


def worst_case_slope_error(indexes: list[int], amplitude: float) -> float:
    """The largest error a least-squares slope can have when each arrival is off by at most
    ``amplitude``: slope error = sum((x - mean) * e) / sxx, maximised by e = ±amplitude with the
    sign of (x - mean). For 16 consecutive beats that is 64/340 of the amplitude, so a jitter
    of 2 % of a beat moves the measured interval by at most 0.38 % -- a bound, not a statistic,
    so the test cannot flake however hypothesis picks the jitter."""
    n = len(indexes)
    mean = sum(indexes) / n
    sxx = sum((x - mean) ** 2 for x in indexes)
    return amplitude * sum(abs(x - mean) for x in indexes) / sxx


@given(
    tempo=st.integers(1, 1200),
    jitter_fraction=st.floats(0.0, 0.02),
    first_index=st.integers(0, 2**40),
    unit_errors=st.lists(st.floats(-1.0, 1.0), min_size=WINDOW, max_size=3 * WINDOW),
)
def test_recovers_a_constant_tempo_under_jitter(
    tempo: int, jitter_fraction: float, first_index: int, unit_errors: list[float]
) -> None:
    beat = 60.0 / tempo
    amplitude = jitter_fraction * beat
    est = TempoEstimator(window=WINDOW)
    indexes = [first_index + i for i in range(len(unit_errors))]
    for index, unit in zip(indexes, unit_errors, strict=True):
        est.observe(index, T0 + (index - first_index) * beat + unit * amplitude, tempo)
    assert est.samples == WINDOW
    bound = worst_case_slope_error(indexes[-WINDOW:], amplitude) + 1e-9 * beat
    assert abs(est.tempo_drift) <= bound
    assert 60.0 / (beat + bound) <= est.measured_bpm <= 60.0 / (beat - bound)


def test_the_jitter_bound_is_what_the_docstring_says() -> None:
    assert worst_case_slope_error(list(range(16)), 1.0) == pytest.approx(64 / 340)
    assert 0.02 * 64 / 340 < 0.0038


@given(
    tempo=st.integers(1, 1200),
    kept=st.lists(st.integers(0, 200), min_size=2, max_size=WINDOW, unique=True),
)
def test_missing_beats_do_not_bias_the_estimate(tempo: int, kept: list[int]) -> None:
    beat = 60.0 / tempo
    est = TempoEstimator(window=WINDOW)
    for index in sorted(kept):
        est.observe(index, T0 + index * beat, tempo)
    assert est.samples == len(kept)
    assert est.measured_bpm == pytest.approx(tempo, rel=1e-9)
    assert est.tempo_drift == pytest.approx(0.0, abs=1e-9 * beat)


@pytest.mark.parametrize(("stretch", "sign"), [(1.05, 1), (0.95, -1), (1.0, 0)])
def test_drift_sign(stretch: float, sign: int) -> None:
    tempo = 60
    est = TempoEstimator()
    for i in range(20):
        est.observe(i, T0 + i * stretch, tempo)
    expected = stretch - 1.0  # seconds per beat behind (positive) or ahead (negative)
    assert est.tempo_drift == pytest.approx(expected, abs=1e-9)
    if sign:
        assert (est.tempo_drift > 0) == (sign > 0)
    assert est.measured_bpm == pytest.approx(60 / stretch)


@given(
    true_offset=st.floats(-3600.0, 3600.0),
    delays=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=WINDOW),
)
def test_clock_offset_is_the_smallest_seen(true_offset: float, delays: list[float]) -> None:
    est = TempoEstimator(window=WINDOW)
    pulse_start = 1_700_000_000.0
    offsets = []
    for i, delay in enumerate(delays):
        scheduled = pulse_start + i
        wall = scheduled + true_offset + delay
        offsets.append(wall - scheduled)
        est.observe(i, T0 + i + delay, 60, wall_arrival=wall, scheduled_start=scheduled)
    assert est.clock_offset == min(offsets)
    assert est.clock_offset == pytest.approx(true_offset + min(delays), abs=1e-6)


def test_clock_offset_ignores_frames_without_times() -> None:
    est = TempoEstimator()
    assert est.clock_offset == 0.0
    est.observe(0, T0, 60)
    assert est.clock_offset == 0.0
    est.observe(1, T0 + 1, 60, wall_arrival=100.25, scheduled_start=100.0)
    est.observe(2, T0 + 2, 60)
    est.observe(3, T0 + 3, 60, wall_arrival=102.5, scheduled_start=102.0)
    assert est.clock_offset == 0.25


def test_needs_two_beats() -> None:
    est = TempoEstimator()
    assert est.measured_bpm == 0.0
    assert est.tempo_drift == 0.0
    est.observe(10, T0, 60)
    assert est.measured_bpm == 0.0
    est.observe(11, T0 + 1, 60)
    assert est.measured_bpm == pytest.approx(60)


def test_tempo_change_restarts_the_fit() -> None:
    est = TempoEstimator()
    for i in range(8):
        est.observe(i, T0 + i * 1.0, 60)
    for j, i in enumerate(range(8, 12)):
        est.observe(i, T0 + 8 + j * 0.5, 120)
    assert est.samples == 4
    assert est.measured_bpm == pytest.approx(120)
    assert est.tempo_drift == pytest.approx(0.0, abs=1e-9)


def test_going_backwards_restarts_the_fit() -> None:
    est = TempoEstimator()
    for i in range(100, 110):
        est.observe(i, T0 + i, 60)
    est.observe(5, T0 + 200, 60)  # a pulse restarted from an earlier index
    assert est.samples == 1
    est.reset()
    assert est.samples == 0


def test_window_must_hold_two_beats() -> None:
    with pytest.raises(ValueError, match="window"):
        TempoEstimator(window=1)


@given(
    st.lists(
        st.tuples(
            # beat index step (0, rarely: a repeat, which restarts the estimate)
            st.sampled_from([1, 1, 1, 1, 1, 1, 2, 3, 0]),
            st.sampled_from([60] * 12 + [600]),  # a tempo change (rarely) restarts it too
            st.one_of(st.none(), st.floats(-5.0, 5.0)),  # offset (None: no wall clock)
        ),
        max_size=60,
    )
)
def test_the_kept_clock_offset_is_the_minimum_over_the_window(
    steps: list[tuple[int, int, float | None]],
) -> None:
    est = TempoEstimator(window=8)
    index = 0
    shadow: list[tuple[int, int, float | None]] = []  # what the window should hold
    for step, tempo, offset in steps:
        index += step
        if shadow and (index <= shadow[-1][0] or shadow[-1][1] != tempo):
            shadow.clear()
        shadow = [*shadow, (index, tempo, offset)][-8:]
        if offset is None:
            est.observe(index, float(index), tempo)
        else:
            est.observe(index, float(index), tempo, wall_arrival=offset, scheduled_start=0.0)
        offsets = [o for _, _, o in shadow if o is not None]
        assert est.clock_offset == (min(offsets) if offsets else 0.0)
