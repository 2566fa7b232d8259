"""A client's counters and its recent errors, shared by the client's sans-IO cores."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MAX_RECENT_ERRORS", "ClientMetrics", "ErrorLog"]

MAX_RECENT_ERRORS = 16
"""How many error texts ``health().errors`` keeps (the oldest goes first)."""


@dataclass(slots=True)
class ClientMetrics:
    """Counters a client keeps (also in ``health().metrics``)."""

    beats: int = 0
    downbeats: int = 0
    degraded_beats: int = 0
    degraded_episodes: int = 0
    resyncs: int = 0
    forward_jumps: int = 0
    beats_skipped: int = 0
    dropped: int = 0
    stale: int = 0
    implausible: int = 0
    duplicate_or_old: int = 0
    malformed: int = 0
    oversized: int = 0
    wrong_cluster: int = 0
    transport_dropped: int = 0  # by a transport that queues frames (not NATS: taken in as parsed)
    callback_errors: int = 0
    claims_ok: int = 0
    claims_confirmed: int = 0
    claims_unconfirmed: int = 0
    claims_failed: int = 0
    claims_acked: int = 0
    claims_republished: int = 0
    claims_queued: int = 0
    #: JetStream said duplicate on a claim's first publish: another message holds its id
    claims_suspected_collisions: int = 0
    budgets_created: int = 0
    budgets_completed: int = 0
    budgets_timed_out: int = 0
    reconnects: int = 0
    disconnects: int = 0
    slow_consumer: int = 0
    errors: int = 0


class ErrorLog:
    """Counts errors in ``metrics.errors`` and keeps the texts of the most recent ones.

    Args:
        metrics: the counters ``errors`` is kept in.
        keep: how many texts to keep.
    """

    __slots__ = ("_keep", "_recent", "metrics")

    def __init__(self, metrics: ClientMetrics, keep: int = MAX_RECENT_ERRORS) -> None:
        self.metrics = metrics
        self._keep = keep
        # made by the first error: most clients of a big process never have one
        self._recent: deque[str] | None = None

    def __repr__(self) -> str:
        return f"<ErrorLog errors={self.metrics.errors} recent={len(self.recent)}>"

    @property
    def recent(self) -> Sequence[str]:
        """The texts of the most recent errors, oldest first."""
        return () if self._recent is None else self._recent

    def note(self, text: str) -> None:
        """Count one error and keep its text."""
        self.metrics.errors += 1
        recent = self._recent
        if recent is None:
            recent = self._recent = deque(maxlen=self._keep)
        recent.append(text)
