"""Bar-report history: a JetStream stream per cluster, replay, and resume after a restart.

Every :class:`~backbeat_trio.BarReport` the reverb publishes on ``backbeat.bar.<cluster_id>``
is kept by the stream ``BACKBEAT_BARS_<cluster_id>`` (created by :func:`ensure_bar_stream`). Reports
are published with ``Nats-Msg-Id: bar:<cluster_id>:<window_id>`` (:func:`bar_report_headers`), so a
window reported twice within the stream's duplicate window is stored once.

* :func:`replay_bars` returns the stored reports of the windows that end at or after a beat
  (``backbeat-trio tail --bars --since N``).
* :func:`last_reported_window` tells a restarting reverb which window it reported last, so it
  resumes without reporting a window again (:func:`already_reported`).

This module is pure trio and works on any transport: it uses the transport's
:class:`~backbeat_trio._transport.jetstream.JetStream` (over NATS, or the in-memory test bus).
"""

from __future__ import annotations

import logging
from typing import Final

from .._core.beats import bar_subject, validate_id
from .._core.wire import BarReport, decode
from .._errors import ConfigError, WireError
from .._transport.base import Transport
from .._transport.jetstream import JetStream, StoredMessage, StreamSummary
from .storage import BAR_MAX_AGE, BAR_MAX_BYTES, check_stream_bounds

__all__ = [
    "DEFAULT_BAR_HISTORY",
    "already_reported",
    "bar_report_headers",
    "bar_stream_name",
    "ensure_bar_stream",
    "last_reported_window",
    "replay_bars",
    "resumed_duplicate",
]

log = logging.getLogger("backbeat_trio.history")

#: Reports a bar stream keeps by default (at 60 BPM and 4 beats a bar: about 4.6 days).
DEFAULT_BAR_HISTORY: Final = 100_000
#: The stream's de-duplication window, seconds: a re-sent report inside it is stored once.
BAR_DUPLICATE_WINDOW: Final = 600.0
_OP_TIMEOUT: Final = 5.0
_MAX_PROBES: Final = 64


def bar_stream_name(cluster_id: str) -> str:
    """The stream that keeps a cluster's bar reports: ``BACKBEAT_BARS_<cluster_id>``."""
    return f"BACKBEAT_BARS_{validate_id('cluster_id', cluster_id)}"


def bar_report_headers(report: BarReport) -> dict[str, str]:
    """Headers to publish ``report`` with: ``Nats-Msg-Id: bar:<cluster_id>:<window_id>``.

    The bar stream stores a window's report once even if a restarted (or a second) reverb sends
    it again within the duplicate window.
    """
    return {"Nats-Msg-Id": f"bar:{report.cluster_id}:{report.window_id}"}


#: How many windows behind the stored one a restarted reverb treats as repeats.
RESUME_WINDOWS = 4


def already_reported(report: BarReport, last_window: int | None) -> bool:
    """True when ``report``'s window is at or before ``last_window``.

    A restarted reverb reads :func:`last_reported_window` once, then calls this before publishing
    each report and skips those that were reported already.
    """
    return last_window is not None and report.from_beat <= last_window


def resumed_duplicate(report: BarReport, last: int | None, beats_per_bar: int) -> bool:
    """True when a restarted reverb's ``report`` repeats one its predecessor stored.

    A restarted reverb first closes the window in progress, which its predecessor may already
    have reported. Only windows just behind the stored one count as repeats: a window far
    behind it means the pulse started a new timeline, whose reports must go out.
    """
    if not already_reported(report, last):
        return False
    assert last is not None
    return last - report.from_beat <= RESUME_WINDOWS * beats_per_bar


async def ensure_bar_stream(
    transport: Transport,
    cluster_id: str,
    *,
    replicas: int = 1,
    max_reports: int = DEFAULT_BAR_HISTORY,
    max_age: float | None = BAR_MAX_AGE,
    max_bytes: int = BAR_MAX_BYTES,
) -> str:
    """Create ``BACKBEAT_BARS_<cluster_id>`` on ``backbeat.bar.<cluster_id>`` unless it exists.

    An existing stream gets the bounds asked for here (one created without them, or with other
    ones); its replicas are left as they are. On a NATS cluster pass ``replicas=3``; a single
    server falls back to one replica. Past any bound the oldest reports are discarded.

    Args:
        transport: an open transport.
        cluster_id: the cluster.
        replicas: wanted replica count.
        max_reports: reports kept (the oldest are dropped); -1: no limit.
        max_age: seconds a report is kept, at least the stream's duplicate window
            (``BAR_DUPLICATE_WINDOW``); None: no limit.
        max_bytes: bytes the stream keeps, at least 1 MiB; -1: no limit.

    Returns:
        The stream's name.

    Raises:
        ConfigError: a bad argument.
        BackbeatError: JetStream refused (not enabled, subjects taken by another stream).
    """
    name = bar_stream_name(cluster_id)
    if isinstance(max_reports, bool) or not isinstance(max_reports, int) or max_reports == 0:
        raise ConfigError("max_reports", f"must be an int > 0 or -1, got {max_reports!r}")
    check_stream_bounds("", max_age, max_bytes, BAR_DUPLICATE_WINDOW)
    await _jetstream(transport).ensure_stream(
        name,
        [bar_subject(cluster_id)],
        replicas=replicas,
        max_msgs=max_reports,
        max_bytes=max_bytes,
        max_age=max_age,
        duplicate_window=BAR_DUPLICATE_WINDOW,
        description=f"BACKBEAT bar reports of cluster {cluster_id}",
    )
    return name


def _decode_report(msg: StoredMessage, cluster_id: str) -> BarReport | None:
    try:
        report = decode(msg.data, BarReport)
    except WireError as exc:
        log.warning("bar stream message %d is not a bar report: %s", msg.seq, exc)
        return None
    if report.cluster_id != cluster_id:
        log.warning("bar stream message %d is for cluster %r", msg.seq, report.cluster_id)
        return None
    return report


def _jetstream(transport: Transport) -> JetStream:
    return transport.jetstream.with_op_timeout(_OP_TIMEOUT)


async def _first_seq_ending_at_or_after(
    js: JetStream, cluster_id: str, summary: StreamSummary, since_beat: int
) -> int:
    # Reports are appended window after window, so ``to_beat`` grows with the sequence: a binary
    # search over sequences finds the first report that ends at or after ``since_beat`` in
    # O(log n) single-message reads. Unreadable messages and gaps (deleted messages) are stepped
    # over with next-by-subject reads; the caller filters again, so a stray order costs nothing
    # but a few extra reports read.
    name, subject = summary.name, bar_subject(cluster_id)
    lo, hi = summary.first_seq, summary.last_seq + 1  # answer in [lo, hi]
    for _ in range(_MAX_PROBES):
        if lo >= hi:
            break
        mid = (lo + hi) // 2
        msg = await js.stream_find(name, subject, mid)
        if msg is None or msg.seq >= hi:
            hi = mid
            continue
        report = _decode_report(msg, cluster_id)
        if report is None or report.to_beat < since_beat:
            lo = msg.seq + 1
        else:
            hi = mid
    return lo


async def replay_bars(
    transport: Transport,
    cluster_id: str,
    *,
    since_beat: int = 0,
    limit: int = 10_000,
) -> list[BarReport]:
    """The stored bar reports of the windows that end at or after ``since_beat``, oldest first.

    For ``backbeat-trio tail --bars --since N``. Messages on the subject that are not valid
    reports of this cluster are skipped (and logged).

    Args:
        transport: an open transport.
        cluster_id: the cluster.
        since_beat: the first beat of interest (a window ending before it is left out).
        limit: at most this many reports (the oldest matching ones).

    Returns:
        The reports, in the order they were stored; ``[]`` when no bar stream exists.

    Raises:
        ConfigError: a bad argument.
        BackbeatError: JetStream did not answer (the message says why).
    """
    validate_id("cluster_id", cluster_id)
    if isinstance(since_beat, bool) or not isinstance(since_beat, int) or since_beat < 0:
        raise ConfigError("since_beat", f"must be an int >= 0, got {since_beat!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError("limit", f"must be an int >= 1, got {limit!r}")
    js = _jetstream(transport)
    summary = await js.stream_summary(bar_stream_name(cluster_id))
    if summary is None or summary.messages == 0:
        return []
    start = summary.first_seq
    if since_beat > 0:
        start = await _first_seq_ending_at_or_after(js, cluster_id, summary, since_beat)
    reports: list[BarReport] = []
    # Bounded: each round reads at least one message or stops; at most limit + skipped rounds.
    for _ in range(limit + 64):
        if start > summary.last_seq or len(reports) >= limit:
            break
        msgs = await js.stream_read(
            summary.name,
            bar_subject(cluster_id),
            start,
            max_msgs=min(limit - len(reports), 4096),
            stop_seq=summary.last_seq,
        )
        if not msgs:
            break
        for msg in msgs:
            report = _decode_report(msg, cluster_id)
            if report is not None and report.to_beat >= since_beat:
                reports.append(report)
                if len(reports) >= limit:
                    break
        start = msgs[-1].seq + 1
    return reports


async def last_reported_window(transport: Transport, cluster_id: str) -> int | None:
    """The first beat of the last window whose report the bar stream holds.

    A restarting reverb reads it once and skips every report with
    :func:`already_reported`, so it never reports a window twice.

    Args:
        transport: an open transport.
        cluster_id: the cluster.

    Returns:
        The last stored report's ``from_beat``; None when no report (or no stream) exists.

    Raises:
        BackbeatError: JetStream did not answer.
    """
    validate_id("cluster_id", cluster_id)
    msg = await _jetstream(transport).stream_last(
        bar_stream_name(cluster_id), bar_subject(cluster_id)
    )
    if msg is None:
        return None
    report = _decode_report(msg, cluster_id)
    if report is not None:
        return report.from_beat
    # The very last message is unreadable: fall back to the newest readable report.
    reports = await replay_bars(transport, cluster_id, since_beat=0, limit=10_000)
    return max((r.from_beat for r in reports), default=None)
