"""A fixed-bucket latency histogram, sans-IO: what the pulse records its publish error in.

Prometheus-shaped (upper bounds, a running sum and count) so an exporter can hand it on as it
is.
"""

from __future__ import annotations

import bisect
from typing import Final

__all__ = ["PUBLISH_ERROR_BUCKETS_S", "LatencyHistogram"]

#: Upper bounds (seconds) for a pulse's publish error: from tens of microseconds (a pulse on an
#: idle machine) to half a second (a stalled one; anything over a whole beat is skipped).
PUBLISH_ERROR_BUCKETS_S: Final = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
)


class LatencyHistogram:
    """Counts of observations per bucket and their sum.

    Args:
        bounds: the buckets' upper bounds, increasing (an implicit ``+Inf`` bucket follows).
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = PUBLISH_ERROR_BUCKETS_S):
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"bounds must increase strictly, got {bounds!r}")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.count = 0

    def __repr__(self) -> str:
        return f"<LatencyHistogram count={self.count} sum={self.sum:.6f}>"

    def observe(self, value: float) -> None:
        """Record one observation (seconds; a negative one, i.e. early, counts in the first
        bucket)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` per bucket, ending with ``(inf, count)``."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out
