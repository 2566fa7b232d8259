"""Tempo estimation from beat arrivals, sans-IO.

Measured BPM comes from a least-squares fit of arrival time against beat index over a sliding
window (robust to jitter and to missed beats); drift is the mean excess of the observed beat
interval over the nominal one; the clock offset to the pulse is the smallest
``arrival - scheduled_start`` seen, which filters out network delay.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["TempoEstimator"]


@dataclass(slots=True)
class _Sample:
    beat_index: int
    arrival: float  # local monotonic seconds
    nominal_interval: float  # 60 / tempo_bpm announced by that frame
    offset: float | None  # local wall clock minus the pulse's scheduled start, seconds


class TempoEstimator:
    """Estimates tempo, drift and clock offset from the frames a client receives.

    Args:
        window: how many recent beats the estimate looks at.
    """

    def __init__(self, window: int = 16) -> None:
        if window < 2:
            raise ValueError("window must be >= 2")
        self._samples: deque[_Sample] = deque(maxlen=window)
        self._offset: float | None = None  # clock_offset of the current samples, once computed

    def __repr__(self) -> str:
        return (
            f"<TempoEstimator samples={len(self._samples)} measured_bpm={self.measured_bpm:.3f} "
            f"drift_s={self.tempo_drift:+.6f}>"
        )

    def reset(self) -> None:
        """Forget every sample (after a resync the old arrivals say nothing about the new tempo)."""
        self._samples.clear()
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
        if self._samples and beat_index <= self._samples[-1].beat_index:
            self.reset()
        # a tempo change restarts the fit: intervals at two tempos make a meaningless line
        if self._samples and self._samples[-1].nominal_interval != 60.0 / tempo_bpm:
            self.reset()
        offset = None
        if wall_arrival is not None and scheduled_start is not None:
            offset = wall_arrival - scheduled_start
        samples = self._samples
        cached = self._offset
        if cached is not None and len(samples) == samples.maxlen:
            evicted = samples[0].offset
            if evicted is not None and evicted <= cached:
                cached = None  # the minimum leaves the window: recompute when asked
        samples.append(_Sample(beat_index, arrival, 60.0 / tempo_bpm, offset))
        if cached is not None and offset is not None:
            cached = min(cached, offset)
        self._offset = cached

    @property
    def samples(self) -> int:
        """How many samples the estimate rests on."""
        return len(self._samples)

    def _slope(self) -> float | None:
        n = len(self._samples)
        if n < 2:
            return None
        xs = [s.beat_index for s in self._samples]
        ys = [s.arrival for s in self._samples]
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
        return slope - self._samples[-1].nominal_interval

    @property
    def clock_offset(self) -> float:
        """Local wall clock minus the pulse's clock, in seconds (network delay filtered out)."""
        # read several times per frame by the intake: computed once per new sample
        cached = self._offset
        if cached is None:
            offsets = [s.offset for s in self._samples if s.offset is not None]
            if not offsets:
                return 0.0
            cached = self._offset = min(offsets)
        return cached
