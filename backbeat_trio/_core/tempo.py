"""Tempo estimation from beat arrivals, sans-IO.

Measured BPM comes from a least-squares fit of arrival time against beat index over a sliding
window (robust to jitter and to missed beats); drift is the mean excess of the observed beat
interval over the nominal one; the clock offset to the pulse is the smallest
``arrival - scheduled_start`` seen, which filters out network delay.
"""

from __future__ import annotations

from collections import deque

__all__ = ["TempoEstimator"]


class TempoEstimator:
    """Estimates tempo, drift and clock offset from the frames a client receives.

    Args:
        window: how many recent beats the estimate looks at.
    """

    def __init__(self, window: int = 16) -> None:
        if window < 2:
            raise ValueError("window must be >= 2")
        # The samples in parallel columns of numbers: a frame then allocates no object the
        # garbage collector tracks (thousands of clients in one process observe every beat).
        self._indices: deque[int] = deque(maxlen=window)
        self._arrivals: deque[float] = deque(maxlen=window)  # local monotonic seconds
        # local wall clock minus the pulse's scheduled start (None: no wall clock given)
        self._offsets: deque[float | None] = deque(maxlen=window)
        self._nominal = 0.0  # 60 / tempo_bpm of the samples (one tempo per estimate)
        self._offset: float | None = None  # clock_offset of the current samples, once computed

    def __repr__(self) -> str:
        return (
            f"<TempoEstimator samples={len(self._indices)} measured_bpm={self.measured_bpm:.3f} "
            f"drift_s={self.tempo_drift:+.6f}>"
        )

    def reset(self) -> None:
        """Forget every sample (after a resync the old arrivals say nothing about the new tempo)."""
        self._indices.clear()
        self._arrivals.clear()
        self._offsets.clear()
        self._offset = None

    def observe(
        self,
        beat_index: int,
        arrival: float,
        tempo_bpm: int,
        *,
        wall_arrival: float | None = None,
        scheduled_start: float | None = None,
    ) -> None:
        """Record one frame.

        Args:
            beat_index: the frame's index.
            arrival: local monotonic arrival time (seconds).
            tempo_bpm: the tempo the frame announces.
            wall_arrival: local wall-clock arrival (POSIX seconds), for the clock offset.
            scheduled_start: the pulse's start of this beat (``deadline_at`` - one beat, POSIX s).
        """
        offset = None
        if wall_arrival is not None and scheduled_start is not None:
            offset = wall_arrival - scheduled_start
        self.add(beat_index, arrival, 60.0 / tempo_bpm, offset)

    def add(self, beat_index: int, arrival: float, nominal: float, offset: float | None) -> None:
        """:meth:`observe` with the beat's length (seconds) and the clock offset (local wall
        arrival minus scheduled start, None if unknown) already computed, as the intake has
        them."""
        indices = self._indices
        # a tempo change restarts the fit: intervals at two tempos make a meaningless line
        if indices and (beat_index <= indices[-1] or self._nominal != nominal):
            self.reset()
        offsets = self._offsets
        cached = self._offset
        if cached is not None and len(offsets) == offsets.maxlen:
            evicted = offsets[0]
            if evicted is not None and evicted <= cached and (offset is None or offset > cached):
                cached = None  # the minimum leaves the window: recompute when asked
        indices.append(beat_index)
        self._arrivals.append(arrival)
        offsets.append(offset)
        self._nominal = nominal
        if cached is not None and offset is not None:
            cached = min(cached, offset)
        self._offset = cached

    @property
    def samples(self) -> int:
        """How many samples the estimate rests on."""
        return len(self._indices)

    def _slope(self) -> float | None:
        n = len(self._indices)
        if n < 2:
            return None
        xs = self._indices
        ys = self._arrivals
        mx = sum(xs) / n
        my = sum(ys) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        if sxx == 0:
            return None
        sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
        slope = sxy / sxx
        return slope if slope > 0 else None

    @property
    def measured_bpm(self) -> float:
        """The tempo the arrivals show, in BPM (0.0 until two beats were seen)."""
        slope = self._slope()
        return 60.0 / slope if slope else 0.0

    @property
    def tempo_drift(self) -> float:
        """Mean observed beat interval minus nominal, in seconds; positive = behind."""
        slope = self._slope()
        if slope is None:
            return 0.0
        return slope - self._nominal

    @property
    def clock_offset(self) -> float:
        """Local wall clock minus the pulse's clock, in seconds (network delay filtered out)."""
        # read several times per frame by the intake: computed once per new sample
        cached = self._offset
        if cached is None:
            offsets = [o for o in self._offsets if o is not None]
            if not offsets:
                return 0.0
            cached = self._offset = min(offsets)
        return cached
