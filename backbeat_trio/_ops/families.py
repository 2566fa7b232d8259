"""Metric families shared by the exporter (:mod:`.metrics`): the family constructors and the
lease's families (the HA pulse's and the HA reverb's alike)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .._services.lease import LeaseStatus

__all__ = ["_counter", "_gauge", "_lease_families"]


def _counter(name: str, doc: str, labels: Sequence[str]) -> CounterMetricFamily:
    # prometheus-client adds "_total" to a counter's samples; the family is named without it
    return CounterMetricFamily(name.removesuffix("_total"), doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Sequence[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _lease_families(
    cluster: str, leases: Sequence[tuple[str, str, LeaseStatus]]
) -> Iterable[Metric]:
    labels = ("cluster_id", "lease", "instance_id")
    leader = _gauge("backbeat_lease_leader", "1 while this instance holds the lease", labels)
    terms = _counter("backbeat_lease_terms_total", "times this instance took the lease", labels)
    revision = _gauge("backbeat_lease_revision", "latest revision of the lease key seen", labels)
    expiry = _gauge(
        "backbeat_lease_expiry_timestamp_seconds",
        "expiry written in the latest lease record (its writer's wall clock)",
        labels,
    )
    kv = _counter(
        "backbeat_lease_kv_requests_total",
        "lease key requests by outcome (read, write, conflict, error, watched)",
        (*labels, "outcome"),
    )
    lags = _counter(
        "backbeat_lease_watch_lags_total",
        "times the lease watch lagged (a read found a revision it had not delivered)",
        labels,
    )
    reopens = _counter(
        "backbeat_lease_watch_reopens_total",
        "lease watches opened again in place of a lagging one",
        labels,
    )
    for kind, iid, st in leases:
        lv = [cluster, kind, iid]
        leader.add_metric(lv, 1.0 if st.leading else 0.0)
        terms.add_metric(lv, st.terms)
        if st.lease_revision is not None:
            revision.add_metric(lv, st.lease_revision)
        if st.expires_at is not None:
            expiry.add_metric(lv, st.expires_at)
        for outcome, value in (
            ("read", st.kv_reads),
            ("write", st.kv_writes),
            ("conflict", st.kv_conflicts),
            ("error", st.kv_errors),
            ("watched", st.kv_watched),
        ):
            kv.add_metric([*lv, outcome], value)
        lags.add_metric(lv, st.watch_fallbacks)
        reopens.add_metric(lv, st.watch_reopens)
    return (leader, terms, revision, expiry, kv, lags, reopens)
