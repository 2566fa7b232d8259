"""Prometheus collectors that read the services' live status objects at scrape time.

Nothing here counts anything: the pulse, the reverb and the client keep their own counters
(:class:`PulseStatus`, :class:`ReverbStatus`, :class:`ClientMetrics`); a scrape turns them into
metric families. Each admin server registers one :class:`ServiceCollector` on a registry of its
own, never prometheus-client's global one, so several services in one process don't collide.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from .._core.aggregate import OUT_OF_RANGE, TOO_FAR_AHEAD
from .._services.ha_pulse import HAPulseStatus
from .._services.lease import LeaseStatus
from .._services.pulse import PulseStatus
from .._services.reverb import ReverbStatus
from .._transport.base import Transport
from .._version import __version__
from .families import _counter, _gauge, _lease_families
from .guard import AUTH_FAILURE_REASONS, AdminStatus

if TYPE_CHECKING:
    from .._client.client import Client

__all__ = [
    "CLAIM_REJECTION_REASONS",
    "METRIC_NAMES",
    "REVERB_QUIET_BEATS",
    "ClientCollector",
    "PulseLike",
    "ServiceCollector",
    "Sources",
    "make_registry",
    "pulse_parts",
    "reverb_quiet_for",
]

PulseLike = PulseStatus | HAPulseStatus

#: Every reason a reverb rejects a claim for: the signature checks
#: (:func:`~backbeat_trio._core.signing.verify_claim`), a claim that does not decode
#: (``schema``) and the window checks of :class:`~backbeat_trio._core.aggregate.BarAggregator`.
#: Each has a ``backbeat_reverb_claims_rejected_total`` series from the first scrape on.
CLAIM_REJECTION_REASONS: Final = (
    "unsigned",
    "bad_signature",
    "unknown_agent",
    "agent_mismatch",
    "wrong_key",
    "replay",
    "future",
    "malformed",
    "schema",
    TOO_FAR_AHEAD,
    OUT_OF_RANGE,
)
#: A reverb that has had no beat from the pulse for this many beat lengths is not ready.
REVERB_QUIET_BEATS: Final = 4

#: Every metric family the collectors can produce (as exposed: counters end in ``_total``).
METRIC_NAMES: Final = (
    "backbeat_build_info",
    "backbeat_nats_connected",
    "backbeat_admin_auth_failures_total",
    "backbeat_admin_host_refused_total",
    "backbeat_admin_events_streams",
    "backbeat_admin_events_refused_total",
    "backbeat_pulse_beats_published_total",
    "backbeat_pulse_beats_skipped_total",
    "backbeat_pulse_publish_error_seconds",
    "backbeat_pulse_tempo_bpm",
    "backbeat_pulse_pending_tempo_bpm",
    "backbeat_pulse_tempo_changes_total",
    "backbeat_pulse_tempo_refusals_total",
    "backbeat_pulse_bad_tempo_requests_total",
    "backbeat_pulse_last_beat_index",
    "backbeat_pulse_leader",
    "backbeat_lease_leader",
    "backbeat_lease_terms_total",
    "backbeat_lease_revision",
    "backbeat_lease_expiry_timestamp_seconds",
    "backbeat_lease_kv_requests_total",
    "backbeat_lease_watch_lags_total",
    "backbeat_lease_watch_reopens_total",
    "backbeat_reverb_claims_accepted_total",
    "backbeat_reverb_claims_rejected_total",
    "backbeat_reverb_claims_late_total",
    "backbeat_reverb_claims_dropped_total",
    "backbeat_reverb_windows_closed_total",
    "backbeat_reverb_bar_reports_published_total",
    "backbeat_reverb_bar_issues_total",
    "backbeat_reverb_agents_reporting",
    "backbeat_reverb_agents_tracked",
    "backbeat_reverb_publishing",
    "backbeat_reverb_seconds_since_last_beat",
    "backbeat_client_connected",
    "backbeat_client_beats_total",
    "backbeat_client_degraded_beats_total",
    "backbeat_client_degraded",
    "backbeat_client_frames_stale_total",
    "backbeat_client_frames_dropped_total",
    "backbeat_client_claims_total",
    "backbeat_client_claims_suspected_collisions_total",
    "backbeat_client_budgets_total",
    "backbeat_client_reconnects_total",
    "backbeat_client_tempo_bpm",
    "backbeat_client_measured_bpm",
    "backbeat_client_tempo_drift_seconds",
    "backbeat_client_clock_offset_seconds",
    "backbeat_client_last_beat_index",
)

_CLIENT_CLAIM_OUTCOMES: Final = (
    ("ok", "claims_ok"),
    ("confirmed", "claims_confirmed"),
    ("unconfirmed", "claims_unconfirmed"),
    ("failed", "claims_failed"),
    ("acked", "claims_acked"),
    ("republished", "claims_republished"),
    ("queued", "claims_queued"),
)
_CLIENT_BUDGET_OUTCOMES: Final = (
    ("created", "budgets_created"),
    ("completed", "budgets_completed"),
    ("timed_out", "budgets_timed_out"),
)


def pulse_parts(status: PulseLike) -> tuple[PulseStatus, HAPulseStatus | None]:
    """The beat-publishing half of a pulse's status, and its lease half (HA pulses only)."""
    if isinstance(status, HAPulseStatus):
        return status.pulse, status
    return status, None


@dataclass
class Sources:
    """What one admin server reports on: live views, read at every request.

    Attributes:
        cluster_id: the cluster (a label on every metric).
        pulses: pulse statuses by instance id (a live mapping may change between scrapes).
        reverbs: reverb statuses by instance id.
        clients: clients to export (called at each scrape, so the set may change).
        transport: the connection the services use, for readiness and ``/bars``.
    """

    cluster_id: str
    pulses: Mapping[str, PulseLike] = field(default_factory=dict)
    reverbs: Mapping[str, ReverbStatus] = field(default_factory=dict)
    clients: Callable[[], Sequence[Client]] = tuple
    transport: Transport | None = None


class ClientCollector:
    """Exports the counters and estimates of one or several clients, labelled by ``agent_id``.

    Register it on a ``prometheus_client.CollectorRegistry`` of your own application::

        registry.register(bb3.ClientCollector(lambda: [client]))

    Args:
        clients: the clients, or a callable returning the current ones (read at every scrape).
    """

    def __init__(self, clients: Sequence[Client] | Callable[[], Sequence[Client]]) -> None:
        self._clients: Callable[[], Sequence[Client]] = (
            clients if callable(clients) else (lambda: tuple(clients))
        )

    def __repr__(self) -> str:
        return f"<ClientCollector clients={len(self._clients())}>"

    def collect(self) -> Iterator[Metric]:
        """The client families (prometheus-client calls this at each scrape)."""
        yield from _client_families(self._clients())


class ServiceCollector:
    """Every family an admin server exposes: its pulses, reverbs, clients and connection.

    Args:
        sources: what to read.
        admin: the admin server's own refusals, if it counts them.
    """

    def __init__(self, sources: Sources, *, admin: AdminStatus | None = None) -> None:
        self.sources = sources
        self.admin = admin

    def __repr__(self) -> str:
        src = self.sources
        return (
            f"<ServiceCollector {src.cluster_id} pulses={len(src.pulses)} "
            f"reverbs={len(src.reverbs)}>"
        )

    def collect(self) -> Iterator[Metric]:
        """All families (prometheus-client calls this at each scrape)."""
        src = self.sources
        if src.transport is not None:
            g = GaugeMetricFamily(
                "backbeat_nats_connected",
                "1 while the service's NATS connection is up",
                labels=["cluster_id"],
            )
            g.add_metric([src.cluster_id], 1.0 if src.transport.connected else 0.0)
            yield g
        if self.admin is not None:
            yield from _admin_families(src.cluster_id, self.admin)
        pulses = dict(src.pulses)
        reverbs = dict(src.reverbs)
        if pulses:
            yield from _pulse_families(src.cluster_id, pulses)
        leases: list[tuple[str, str, LeaseStatus]] = []
        for pid, st in pulses.items():
            _, ha = pulse_parts(st)
            if ha is not None:
                leases.append(("pulse", pid, ha))
        for rid, rst in reverbs.items():
            if rst.lease is not None:
                leases.append(("reverb", rid, rst.lease))
        if leases:
            yield from _lease_families(src.cluster_id, leases)
        if reverbs:
            yield from _reverb_families(src.cluster_id, reverbs)
        clients = src.clients()
        if clients:
            yield from _client_families(clients)


def make_registry(sources: Sources, *, admin: AdminStatus | None = None) -> CollectorRegistry:
    """A fresh registry (not the global default) holding one :class:`ServiceCollector`, the
    process's own families (``process_*``, ``python_gc_*``, ``python_info``) and
    ``backbeat_build_info``.

    Each admin server has a registry of its own, so several in one process never register a
    family twice.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(sources, admin=admin))
    registry.register(BuildInfoCollector())
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class BuildInfoCollector:
    """``backbeat_build_info{version, python}``: always 1; the labels say what runs."""

    def __repr__(self) -> str:
        return f"<BuildInfoCollector {__version__}>"

    def collect(self) -> Iterator[Metric]:
        """The one family (prometheus-client calls this at each scrape)."""
        info = _gauge(
            "backbeat_build_info",
            "1; the labels say which backbeat_trio and which Python run this process",
            ("version", "python"),
        )
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info


# --- families -------------------------------------------------------------------------------------
def _admin_families(cluster: str, admin: AdminStatus) -> Iterable[Metric]:
    labels = ("cluster_id",)
    auth = _counter(
        "backbeat_admin_auth_failures_total",
        "POST /tempo requests refused for their Authorization header, by reason "
        "(missing, malformed, wrong)",
        (*labels, "reason"),
    )
    for reason in AUTH_FAILURE_REASONS:
        auth.add_metric([cluster, reason], admin.auth_failures.get(reason, 0))
    hosts = _counter(
        "backbeat_admin_host_refused_total",
        "requests refused because their Host is not one the server answers to",
        labels,
    )
    hosts.add_metric([cluster], admin.hosts_refused)
    families: list[Metric] = [auth, hosts]
    events = admin.events
    if events is not None:
        streams = _gauge("backbeat_admin_events_streams", "/events streams open", labels)
        streams.add_metric([cluster], events.streams)
        refused = _counter(
            "backbeat_admin_events_refused_total",
            "/events streams refused because the most allowed were open",
            labels,
        )
        refused.add_metric([cluster], events.streams_refused)
        families += [streams, refused]
    return families


def _pulse_families(cluster: str, pulses: Mapping[str, PulseLike]) -> Iterable[Metric]:
    labels = ("cluster_id", "pulse_id")
    published = _counter("backbeat_pulse_beats_published_total", "beat frames published", labels)
    skipped = _counter(
        "backbeat_pulse_beats_skipped_total",
        "beats not published, by reason (late, disconnected, no_lease)",
        (*labels, "reason"),
    )
    error = HistogramMetricFamily(
        "backbeat_pulse_publish_error_seconds",
        "time from each published beat's ideal start to the return of its publish",
        labels=list(labels),
    )
    tempo = _gauge("backbeat_pulse_tempo_bpm", "tempo in force", labels)
    pending = _gauge(
        "backbeat_pulse_pending_tempo_bpm",
        "accepted tempo waiting for the next downbeat (0: none)",
        labels,
    )
    changes = _counter("backbeat_pulse_tempo_changes_total", "tempo requests accepted", labels)
    refusals = _counter(
        "backbeat_pulse_tempo_refusals_total",
        "tempo requests refused (range, step guard)",
        labels,
    )
    bad = _counter(
        "backbeat_pulse_bad_tempo_requests_total",
        "tempo requests on NATS that could not be read",
        labels,
    )
    last = _gauge("backbeat_pulse_last_beat_index", "index of the latest beat published", labels)
    leader = _gauge(
        "backbeat_pulse_leader",
        "1 while this pulse publishes (a single pulse always; an HA pulse while it leads)",
        labels,
    )
    for pid, status in pulses.items():
        st, ha = pulse_parts(status)
        lv = [cluster, pid]
        published.add_metric(lv, st.published)
        skipped.add_metric([*lv, "late"], st.skipped_late)
        skipped.add_metric([*lv, "disconnected"], st.skipped_disconnected)
        skipped.add_metric([*lv, "no_lease"], ha.skipped_no_lease if ha is not None else 0)
        hist = st.publish_error
        error.add_metric(
            lv,
            [(_bound(b), float(n)) for b, n in hist.cumulative()],
            sum_value=hist.sum,
        )
        schedule = st.schedule
        tempo.add_metric(lv, schedule.tempo_bpm if schedule is not None else st.tempo_bpm)
        pending_bpm = schedule.pending_tempo if schedule is not None else None
        pending.add_metric(lv, pending_bpm or 0)
        changes.add_metric(lv, st.tempo_changes)
        refusals.add_metric(lv, st.tempo_refused)
        bad.add_metric(lv, st.bad_tempo_messages)
        if st.last_beat is not None:
            last.add_metric(lv, st.last_beat)
        leader.add_metric(lv, 1.0 if ha is None or ha.leading else 0.0)
    return (published, skipped, error, tempo, pending, changes, refusals, bad, last, leader)


def _bound(b: float) -> str:
    return "+Inf" if math.isinf(b) else repr(b)


def _reverb_families(cluster: str, reverbs: Mapping[str, ReverbStatus]) -> Iterable[Metric]:
    labels = ("cluster_id", "reverb_id")
    accepted = _counter(
        "backbeat_reverb_claims_accepted_total", "verified claims counted in a window", labels
    )
    rejected = _counter(
        "backbeat_reverb_claims_rejected_total",
        "claims rejected, by reason (signature, schema, replay, window...)",
        (*labels, "reason"),
    )
    late = _counter(
        "backbeat_reverb_claims_late_total", "claims for a window already reported", labels
    )
    dropped = _counter(
        "backbeat_reverb_claims_dropped_total",
        "claims lost to a full subscription buffer before verification",
        labels,
    )
    closed = _counter("backbeat_reverb_windows_closed_total", "windows aggregated", labels)
    published = _counter(
        "backbeat_reverb_bar_reports_published_total", "bar reports this reverb sent", labels
    )
    issues = _counter(
        "backbeat_reverb_bar_issues_total",
        "issues in the windows closed, by kind (stalled, failed, overrun, deadlock...)",
        (*labels, "kind"),
    )
    agents = _gauge(
        "backbeat_reverb_agents_reporting", "agents that reported in the latest window", labels
    )
    tracked = _gauge(
        "backbeat_reverb_agents_tracked", "agents whose latest claim the reverb keeps", labels
    )
    publishing = _gauge(
        "backbeat_reverb_publishing",
        "1 while this reverb publishes reports (0: HA standby)",
        labels,
    )
    quiet = _gauge(
        "backbeat_reverb_seconds_since_last_beat",
        "seconds since the latest beat from the pulse (before the first: since the reverb started)",
        labels,
    )
    now = _now()
    for rid, st in reverbs.items():
        lv = [cluster, rid]
        accepted.add_metric(lv, st.claims_counted)
        counts = dict(st.rejected_by_reason)
        for reason in CLAIM_REJECTION_REASONS:
            rejected.add_metric([*lv, reason], counts.pop(reason, 0))
        for reason, n in sorted(counts.items()):
            rejected.add_metric([*lv, reason], n)
        late.add_metric(lv, st.claims_late)
        dropped.add_metric(lv, st.claims_dropped)
        closed.add_metric(lv, st.reports)
        published.add_metric(lv, st.reports_published)
        for kind, n in sorted(st.issues_by_kind.items()):
            issues.add_metric([*lv, kind], n)
        agents.add_metric(lv, st.latest.agents_reporting if st.latest is not None else 0)
        tracked.add_metric(lv, len(st.latest_claims))
        publishing.add_metric(lv, 1.0 if st.publishing else 0.0)
        since = None if now is None else reverb_quiet_for(st, now)
        if since is not None:
            quiet.add_metric(lv, since)
    return (
        accepted,
        rejected,
        late,
        dropped,
        closed,
        published,
        issues,
        agents,
        tracked,
        publishing,
        quiet,
    )


def _now() -> float | None:
    # a scrape outside trio (a collector registered elsewhere) has no clock to measure against
    try:
        return trio.current_time()
    except RuntimeError:
        return None


def reverb_quiet_for(status: ReverbStatus, now: float) -> float | None:
    """Seconds since the reverb's latest beat from the pulse (since it started, before the
    first), or None for a status that records neither."""
    since = status.last_beat_at if status.last_beat_at is not None else status.started_at
    return None if since is None else max(0.0, now - since)


def _client_families(clients: Sequence[Client]) -> Iterable[Metric]:
    labels = ("cluster_id", "agent_id")
    connected = _gauge("backbeat_client_connected", "1 while the client is connected", labels)
    beats = _counter("backbeat_client_beats_total", "beat frames taken in", labels)
    degraded_beats = _counter(
        "backbeat_client_degraded_beats_total", "beats synthesised while degraded", labels
    )
    degraded = _gauge("backbeat_client_degraded", "1 while keeping time locally", labels)
    stale = _counter("backbeat_client_frames_stale_total", "frames too old to use", labels)
    dropped = _counter(
        "backbeat_client_frames_dropped_total",
        "frames dropped by a full consumer channel or the transport",
        labels,
    )
    claims = _counter(
        "backbeat_client_claims_total",
        "status claims by outcome (ok, confirmed, unconfirmed, failed, acked, republished, queued)",
        (*labels, "outcome"),
    )
    collisions = _counter(
        "backbeat_client_claims_suspected_collisions_total",
        "claims JetStream called duplicates on their first publish (another message holds the "
        "id; the claim is reported undelivered)",
        labels,
    )
    budgets = _counter(
        "backbeat_client_budgets_total",
        "beat budgets by outcome (created, completed, timed_out)",
        (*labels, "outcome"),
    )
    reconnects = _counter("backbeat_client_reconnects_total", "reconnections", labels)
    tempo = _gauge("backbeat_client_tempo_bpm", "tempo the pulse last announced", labels)
    measured = _gauge("backbeat_client_measured_bpm", "tempo the beat arrivals show", labels)
    drift = _gauge(
        "backbeat_client_tempo_drift_seconds", "mean observed beat interval minus nominal", labels
    )
    offset = _gauge(
        "backbeat_client_clock_offset_seconds", "local wall clock minus the pulse's", labels
    )
    last = _gauge("backbeat_client_last_beat_index", "latest beat index seen", labels)
    for client in clients:
        health = client.health()
        m = client.metrics
        lv = [client.config.cluster_id, client.config.agent_id]
        connected.add_metric(lv, 1.0 if health.connected else 0.0)
        beats.add_metric(lv, m.beats)
        degraded_beats.add_metric(lv, m.degraded_beats)
        degraded.add_metric(lv, 1.0 if health.local_degradation else 0.0)
        stale.add_metric(lv, m.stale)
        dropped.add_metric(lv, m.dropped + m.transport_dropped)
        for outcome, attr in _CLIENT_CLAIM_OUTCOMES:
            claims.add_metric([*lv, outcome], getattr(m, attr))
        collisions.add_metric(lv, m.claims_suspected_collisions)
        for outcome, attr in _CLIENT_BUDGET_OUTCOMES:
            budgets.add_metric([*lv, outcome], getattr(m, attr))
        reconnects.add_metric(lv, health.reconnect_count)
        tempo.add_metric(lv, health.current_tempo)
        measured.add_metric(lv, health.measured_bpm)
        drift.add_metric(lv, health.tempo_drift_s)
        offset.add_metric(lv, health.time_drift_s)
        last.add_metric(lv, health.last_beat)
    return (
        connected,
        beats,
        degraded_beats,
        degraded,
        stale,
        dropped,
        claims,
        collisions,
        budgets,
        reconnects,
        tempo,
        measured,
        drift,
        offset,
        last,
    )
