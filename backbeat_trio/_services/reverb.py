"""The reverb: verifies claims, aggregates each window and publishes one BarReport per window.

Aggregation is the sans-IO :class:`~backbeat_trio._core.aggregate.BarAggregator`. The reverb
follows the beat as an ordinary client (so it keeps time locally when the pulse goes quiet) and
closes a window when the next one starts, i.e. when the window's last beat ends. It also creates
the JetStream stream that makes claims durable, and reads claims *from that stream*, so a claim
an agent re-published after a reconnect is counted once, not rejected as a replay.

With ``ha=True`` several reverbs run per cluster: all of them aggregate, but only the holder of the
``reverb-lease`` key publishes (:mod:`backbeat_trio._services.reverb_ha`).

What the reverb shows is what it verified: its reports, ``latest_claims`` and the claims it hands
to :meth:`ReverbStatus.watch_claims` (the dashboard's only source of agent rows) are the claims
that passed :func:`~backbeat_trio._core.signing.verify_claim` -- including the refusal of a claim
stamped further ahead of this reverb's clock than its HLC accepts (``future``) -- and that the
aggregator counted.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import trio

from .._bridge import open_nats_transport
from .._client.client import Client, open_client
from .._client.config import Config
from .._core.aggregate import BarAggregator
from .._core.beats import (
    bar_subject,
    status_stream_name,
    status_subject,
    validate_beats_per_bar,
    validate_id,
)
from .._core.hlc import HLC
from .._core.lease import LeaseElection, LeaseTimings
from .._core.metrics import ClientMetrics
from .._core.signing import Keyring, ReplayCache
from .._core.wire import BarReport, BeatFrame, StatusClaim, encode
from .._errors import BackbeatError, ConfigError, NotConnected, SignatureError, WireError
from .._services.history import (
    BAR_DUPLICATE_WINDOW,
    DEFAULT_BAR_HISTORY,
    bar_report_headers,
    ensure_bar_stream,
    last_reported_window,
    resumed_duplicate,
)
from .._services.lease import (
    REVERB_LEASE_KEY,
    KVLeaseStore,
    LeaseKeeper,
    LeaseStatus,
    LeaseStore,
    ensure_lease_store,
)
from .._services.reverb_claims import (
    CLOSE_DRAIN,
    AcceptedClaim,
    ClaimJudge,
    ClaimReader,
    follow_connection,
)
from .._services.reverb_ha import HAReports, hold_lease
from .._services.storage import (
    BAR_MAX_AGE,
    BAR_MAX_BYTES,
    STATUS_MAX_AGE,
    STATUS_MAX_BYTES,
    check_stream_bounds,
)
from .._transport.base import Message, Transport
from .._transport.options import ConnectionOptions
from .._util.channel import DropOldestChannel
from .._util.trio_only import require_trio

__all__ = ["AcceptedClaim", "ReverbConfig", "ReverbStatus", "run_reverb"]

log = logging.getLogger("backbeat_trio.reverb")

#: A window the reverb held open for less than this share of its length is one it was behind
#: on: its beats came in a burst (see ``_hurried``).
HURRIED = 0.5
#: Reports an HA standby keeps for the catch-up when it takes over.
_STANDBY_KEPT = 16
#: ReverbStatus.latest_claims keeps at most this many agents (the least recently heard go first).
MAX_TRACKED_AGENTS = 10_000
#: The frame refusals of the reverb's beat-following client, as ``ReverbStatus.beats_refused``.
_FRAME_REFUSALS = (
    "malformed",
    "oversized",
    "wrong_cluster",
    "stale",
    "implausible",
    "duplicate_or_old",
)


@dataclass(frozen=True, kw_only=True, repr=False)
class ReverbConfig(ConnectionOptions):
    """Settings of one reverb aggregator.

    The NATS connection fields are :class:`ConnectionOptions`'s, with the same rules as for a
    client; a reverb retries its first connect (3 attempts, 0.25 s apart) and names its
    connection ``backbeat-reverb:<reverb_id>``.

    Args:
        cluster_id: the cluster.
        keyring: the agents' public keys (None: trust nobody's signature).
        allow_unsigned: accept claims without a signature.
        beats_per_bar: window length (must match the pulse).
        reverb_id: its id (HLC node, connection name).
        jitter_tolerance: as for a client.
        create_stream: create ``BACKBEAT_STATUS_<cluster_id>`` if missing.
        duplicate_window: the stream's de-duplication window, seconds.
        status_max_age: seconds a claim stays in the status stream (at least
            ``duplicate_window``; None: no limit); the oldest are discarded past any bound.
        status_max_bytes: bytes the status stream keeps (at least 1 MiB; -1: no limit).
        bar_max_age: seconds a report stays in the bar stream (at least its duplicate window,
            600 s; None: no limit).
        bar_max_bytes: bytes the bar stream keeps (at least 1 MiB; -1: no limit).
        bar_max_reports: reports the bar stream keeps (-1: no limit).
        replicas: replica count of the streams (and lease bucket) it creates; 3 on a NATS
            cluster, falls back to 1 where it cannot be placed.
        ha: one of several reverbs of the cluster: only the holder of the reverb lease publishes.
        lease_ttl: the reverb lease's TTL in seconds (``ha`` only): the longest a window's report
            is delayed when the publishing reverb dies.
        release_on_exit: a publishing reverb that is stopped hands the lease over at once.
        **connection: the :class:`ConnectionOptions` fields.
    """

    cluster_id: str
    keyring: Keyring | None = None
    allow_unsigned: bool = False
    beats_per_bar: int = 4
    reverb_id: str = "reverb-1"
    jitter_tolerance: float = 0.050
    create_stream: bool = True
    duplicate_window: float = 120.0
    status_max_age: float | None = STATUS_MAX_AGE
    status_max_bytes: int = STATUS_MAX_BYTES
    bar_max_age: float | None = BAR_MAX_AGE
    bar_max_bytes: int = BAR_MAX_BYTES
    bar_max_reports: int = DEFAULT_BAR_HISTORY
    replicas: int = 1
    ha: bool = False
    lease_ttl: float = 2.0
    release_on_exit: bool = True
    reconnect_delay: float = 0.25
    connect_attempts: int = 3

    def __post_init__(self) -> None:
        validate_id("cluster_id", self.cluster_id)
        validate_id("reverb_id", self.reverb_id)
        validate_beats_per_bar(self.beats_per_bar)
        if isinstance(self.replicas, bool) or self.replicas not in range(1, 6):
            raise ConfigError("replicas", f"must be in 1..5, got {self.replicas!r}")
        ttl = self.lease_ttl
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < 3600:
            raise ConfigError("lease_ttl", f"must be in (0, 3600) seconds, got {ttl!r}")
        if self.lease_timings().lease_span < ttl / 2:
            raise ConfigError(
                "lease_ttl",
                f"{ttl:g} s is too short for jitter_tolerance {self.jitter_tolerance:g} s "
                "(ttl > 2 x jitter_tolerance + drift margin)",
            )
        check_stream_bounds(
            "status_", self.status_max_age, self.status_max_bytes, self.duplicate_window
        )
        check_stream_bounds("bar_", self.bar_max_age, self.bar_max_bytes, BAR_DUPLICATE_WINDOW)
        reports = self.bar_max_reports
        if (
            isinstance(reports, bool)
            or not isinstance(reports, int)
            or not (reports == -1 or reports > 0)
        ):
            raise ConfigError("bar_max_reports", f"must be an int > 0 or -1, got {reports!r}")
        super().__post_init__()
        self.connection_config()  # the client-level fields (jitter_tolerance) are checked now

    def lease_timings(self) -> LeaseTimings:
        """The reverb lease's timing parameters (``ha``)."""
        ttl = float(self.lease_ttl)
        return LeaseTimings(
            ttl=ttl,
            guard=float(self.jitter_tolerance),
            clock_drift=1e-3,
            poll_interval=max(0.02, ttl / 8),
            renew_interval=ttl / 2,
            op_timeout=max(0.1, min(ttl / 3, 2.0)),
        )

    def _default_connection_name(self) -> str:
        return f"backbeat-reverb:{self.reverb_id}"

    def connection_config(self) -> Config:
        """The client-level settings the reverb follows the beat with (on its own connection)."""
        return Config(
            cluster_id=self.cluster_id,
            agent_id=self.reverb_id,
            beats_per_bar=self.beats_per_bar,
            jitter_tolerance=self.jitter_tolerance,
            jetstream=False,  # the reverb publishes no claims
            beat_buffer=256,
            **(self.connection_kwargs() | {"name": self.connection_name}),
        )


@dataclass
class ReverbStatus:
    """A running reverb's live view (returned by ``nursery.start(run_reverb, cfg)``).

    ``rejection_reasons`` is refreshed with each report; ``rejected_by_reason`` is the live tally
    (the aggregator's own). ``reports`` counts windows closed; ``reports_published`` the reports
    this reverb actually sent; ``issues_by_kind`` tallies the issues of every closed window.
    ``running`` is True from ``nursery.start`` until the reverb stops; ``first_beat`` is set
    once it has taken in a beat: claims are placed relative to the current beat, so it reads
    none before (they wait in its subscription). ``started_at`` and ``last_beat_at`` are
    ``trio.current_time()`` when it started and at its latest beat from the pulse (not one its
    client synthesised while the pulse was silent); ``beat_seconds`` is that beat's length.
    """

    cluster_id: str
    stream: str | None = None
    reports: int = 0
    claims_counted: int = 0
    claims_late: int = 0
    claims_dropped: int = 0  # lost to a full subscription buffer before they could be verified
    rejected: int = 0
    rejection_reasons: dict[str, int] = field(default_factory=dict)
    latest: BarReport | None = None
    history: deque[BarReport] = field(default_factory=lambda: deque(maxlen=64))
    latest_claims: dict[str, StatusClaim] = field(default_factory=dict)
    report_event: trio.Event = field(default_factory=trio.Event)
    lease: LeaseStatus | None = None  # ``ha`` only: the reverb lease's election
    reports_standby: int = 0  # windows aggregated while another reverb published (``ha``)
    reports_caught_up: int = 0  # standby windows published after taking over (``ha``)
    standby: deque[BarReport] = field(default_factory=lambda: deque(maxlen=_STANDBY_KEPT))
    reverb_id: str = ""
    reports_published: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    issues_by_kind: dict[str, int] = field(default_factory=dict)
    running: bool = False
    first_beat: trio.Event = field(default_factory=trio.Event)
    started_at: float | None = None
    last_beat_at: float | None = None
    beat_seconds: float | None = None
    _window_refusals: dict[str, int] = field(default_factory=dict, repr=False)
    _frame_counts: Callable[[], ClientMetrics] | None = field(default=None, repr=False)
    _watches: list[DropOldestChannel[AcceptedClaim]] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        role = "" if self.lease is None else f" {self.lease.role}"
        return (
            f"<ReverbStatus {self.cluster_id}{role} reports={self.reports} "
            f"claims={self.claims_counted} rejected={self.rejected} stream={self.stream}>"
        )

    @property
    def publishing(self) -> bool:
        """True unless this is an HA reverb on standby."""
        return self.lease is None or self.lease.leading

    async def wait_for_report(self) -> BarReport:
        """Wait for the next bar report and return it."""
        await self.report_event.wait()
        assert self.latest is not None
        return self.latest

    @property
    def beats_refused(self) -> dict[str, int]:
        """Beat frames this reverb did not take, by reason (only reasons that occurred).

        The checks every client makes on a frame (``malformed`` -- which includes an index too
        close to int64's end to leave room for the bars after it --, ``oversized``,
        ``wrong_cluster``, ``stale``, ``implausible``, ``duplicate_or_old``), and the reverb's
        own ``int64``: a beat in a window that could not be reported within int64.
        """
        counts = self._frame_counts() if self._frame_counts is not None else None
        refused = {
            reason: n
            for reason in _FRAME_REFUSALS
            if counts is not None and (n := getattr(counts, reason))
        }
        refused.update((reason, n) for reason, n in self._window_refusals.items() if n)
        return refused

    def watch_claims(self, buffer: int = 1024) -> DropOldestChannel[AcceptedClaim]:
        """A channel of every claim this reverb accepts from now on: verified, and counted in a
        window or as ``late`` (never one it rejected, for whatever reason).

        The reverb never waits for a watcher: when ``buffer`` claims wait unread, the oldest is
        dropped (counted in the channel's ``dropped``). The channel ends when the reverb stops
        (at once if it has stopped); close it to stop watching.
        """
        watch: DropOldestChannel[AcceptedClaim] = DropOldestChannel(buffer, name="claims")
        if self.running:
            self._watches.append(watch)
        else:
            watch.close_send()
        return watch

    def _hand_out(self, accepted: AcceptedClaim) -> None:
        if self._watches:
            self._watches = [watch for watch in self._watches if watch.put(accepted)]

    def _end_watches(self) -> None:
        watches, self._watches = self._watches, []
        for watch in watches:
            watch.close_send()


async def run_reverb(
    cfg: ReverbConfig,
    *,
    transport: Transport | None = None,
    lease_store: LeaseStore | None = None,
    wall_clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[ReverbStatus] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a reverb until cancelled.

    Args:
        cfg: its settings.
        transport: an already-open transport (tests); by default it connects.
        lease_store: where the reverb lease lives (``cfg.ha``); by default the KV bucket
            ``BACKBEAT_HA_<cluster_id>`` on ``transport``'s JetStream.
        wall_clock: POSIX seconds (tests on MockClock pass a virtual one).
        task_status: ``nursery.start`` gets a live :class:`ReverbStatus` once it is subscribed.

    Raises:
        NotConnected: the first connect failed.
        BackbeatError: the lease bucket could not be created (``cfg.ha``).
    """
    require_trio("run_reverb")
    async with contextlib.AsyncExitStack() as stack:
        if transport is None:
            transport = await stack.enter_async_context(open_nats_transport(cfg))
        keeper: LeaseKeeper | None = None
        if cfg.ha:
            timings = cfg.lease_timings()
            if lease_store is None:
                lease_store = KVLeaseStore(
                    transport,
                    cfg.cluster_id,
                    # the bucket is shared with the HA pulses: never the one to make it smaller
                    replicas=max(3, cfg.replicas),
                    op_timeout=timings.op_timeout,
                    key=REVERB_LEASE_KEY,
                )
            await ensure_lease_store(lease_store, timings.op_timeout)
            election = LeaseElection(cfg.reverb_id, timings)
            keeper = LeaseKeeper(
                cfg.reverb_id,
                timings,
                lease_store,
                LeaseStatus(owner_id=cfg.reverb_id, instance=election.instance, timings=timings),
                election,
                wall_clock,
            )
        await _reverb_loop(cfg, transport, keeper, wall_clock, task_status)


async def _reverb_loop(
    cfg: ReverbConfig,
    transport: Transport,
    keeper: LeaseKeeper | None,
    wall_clock: Callable[[], float],
    task_status: trio.TaskStatus[ReverbStatus],
) -> None:
    status = ReverbStatus(cfg.cluster_id, reverb_id=cfg.reverb_id)
    if keeper is not None:
        status.lease = keeper.status
    subject = status_subject(cfg.cluster_id)
    stream = status_stream_name(cfg.cluster_id)
    if cfg.create_stream:
        # without JetStream the reverb still works: claims at most once, no bar history
        try:
            await transport.jetstream.ensure_stream(
                stream,
                [subject],
                duplicate_window=cfg.duplicate_window,
                replicas=cfg.replicas,
                max_age=cfg.status_max_age,
                max_bytes=cfg.status_max_bytes,
                discard="old",
            )
        except BackbeatError as exc:
            log.warning("no status stream %s: %s", stream, exc)
        try:
            await ensure_bar_stream(
                transport,
                cfg.cluster_id,
                replicas=cfg.replicas,
                max_reports=cfg.bar_max_reports,
                max_age=cfg.bar_max_age,
                max_bytes=cfg.bar_max_bytes,
            )
        except BackbeatError as exc:
            log.warning("no bar stream for %s: %s", cfg.cluster_id, exc)
    try:
        resume_after = await last_reported_window(transport, cfg.cluster_id)
    except BackbeatError:
        resume_after = None
    found = await transport.jetstream.find_stream(subject)
    status.stream = found
    if found is None:
        log.warning("no JetStream stream captures %s; reading claims at most once", subject)
    reader = ClaimReader(transport, subject, found)
    await reader.subscribe()
    aggregator = BarAggregator(cfg.cluster_id, beats_per_bar=cfg.beats_per_bar)
    status.rejected_by_reason = aggregator.rejection_reasons
    status._window_refusals = aggregator.beats_refused
    hlc = HLC(cfg.reverb_id)
    keyring = cfg.keyring if cfg.keyring is not None else Keyring({})
    replay = ReplayCache()
    out_subject = bar_subject(cfg.cluster_id)

    judge = ClaimJudge(keyring, cfg.allow_unsigned, replay, hlc, wall_clock)

    async with (
        open_client(cfg.connection_config(), transport=transport, wall_clock=wall_clock) as bb,
        trio.open_nursery() as nursery,
        _handing_out(status, bb),
    ):
        beats = bb.beats(buffer=256)
        nursery.start_soon(_claims_loop, reader, aggregator, judge, status)
        nursery.start_soon(follow_connection, bb, reader)
        if keeper is not None:
            nursery.start_soon(hold_lease, keeper, cfg.release_on_exit)
        status.started_at = window_opened = trio.current_time()
        task_status.started(status)

        def publish(report: BarReport) -> None:
            try:
                transport.publish(out_subject, encode(report), headers=bar_report_headers(report))
            except NotConnected:
                log.warning(
                    "bar report for window %s not published: disconnected", report.window_id
                )
            else:
                status.reports_published += 1

        ha: HAReports | None = None
        if keeper is not None:
            ha = HAReports(cfg, transport, keeper, status, publish)
            await nursery.start(ha.watch_published)
        async for frame in beats:
            left = aggregator.observe_beat(frame, trio.current_time())
            if not bb.degraded:
                status.last_beat_at = trio.current_time()
                status.beat_seconds = 60.0 / max(frame.tempo_bpm, 1)
            if not status.first_beat.is_set() and aggregator.last_beat_index is not None:
                status.first_beat.set()
            if left is None:
                continue
            # claims that arrived before this beat belong to the window it closes
            for msg in reader.ready(CLOSE_DRAIN):
                _take_claim(msg, aggregator, judge, status)
            # a window the reverb could not read all of reports no agent stalled, nor one
            # soon after it of an agent not heard from again since; nor one whose beats came in
            # a burst (see _hurried)
            now = trio.current_time()
            hurried = _hurried(window_opened, now, frame, aggregator.beats_per_bar)
            if hurried:
                log.debug("window %d closed %.3f s after it opened", left, now - window_opened)
            blind = hurried or reader.blind_during(window_opened, now)
            catching_up, window_opened = reader.catching_up(window_opened, now), now
            report = aggregator.close_window(
                left, str(hlc.now()), blind=blind, catching_up=catching_up
            )
            if resumed_duplicate(report, resume_after, cfg.beats_per_bar):
                log.info("window %d was reported before this reverb restarted", left)
                continue
            resume_after = None  # past the restart point: nothing else can be a repeat
            if ha is None:
                publish(report)
            else:
                await ha.report(report)
            status.reports += 1
            for issue in report.issues:
                status.issues_by_kind[issue.kind] = status.issues_by_kind.get(issue.kind, 0) + 1
            status.latest = report
            status.history.append(report)
            status.rejection_reasons = dict(aggregator.rejection_reasons)
            event, status.report_event = status.report_event, trio.Event()
            event.set()
        nursery.cancel_scope.cancel()


def _hurried(opened: float, closed: float, frame: BeatFrame, beats_per_bar: int) -> bool:
    """Whether the window closing now (``frame`` the beat closing it) was open for less than
    :data:`HURRIED` of its length: its beats reached the reverb in a burst, so the reverb was
    behind on its connection, and the claims read before the closing beat may still be on
    their way (the transport hands a subscription's messages to trio in the order it read them,
    but not across subscriptions: a JetStream claim can wait behind a core frame read after
    it)."""
    return closed - opened < HURRIED * beats_per_bar * frame.beat_duration


@contextlib.asynccontextmanager
async def _handing_out(status: ReverbStatus, bb: Client) -> AsyncIterator[None]:
    # watchers get accepted claims while the reverb runs; their channels end when it stops
    status._frame_counts = lambda: bb.metrics
    status.running = True
    try:
        yield
    finally:
        status.running = False
        status._end_watches()


async def _claims_loop(
    reader: ClaimReader,
    aggregator: BarAggregator,
    judge: ClaimJudge,
    status: ReverbStatus,
) -> None:
    await status.first_beat.wait()
    while True:
        for msg in await reader.next_batch():
            _take_claim(msg, aggregator, judge, status)
        if reader.dropped:
            status.claims_dropped += reader.dropped
            log.warning("%d claim(s) dropped: the reverb fell behind its claims", reader.dropped)
            reader.dropped = 0


def _take_claim(
    msg: Message, aggregator: BarAggregator, judge: ClaimJudge, status: ReverbStatus
) -> None:
    try:
        claim = judge.verify(msg.data, msg.headers)
    except SignatureError as exc:
        aggregator.reject(exc.reason or "signature")
        status.rejected += 1
        log.info("rejected claim: %s", exc)
        return
    except (WireError, UnicodeDecodeError) as exc:
        # UnicodeDecodeError: invalid UTF-8 inside a JSON string gets past _wire.decode
        aggregator.reject("schema")
        status.rejected += 1
        log.info("rejected claim: %s", exc)
        return
    with contextlib.suppress(WireError):
        judge.hlc.update(claim.hlc)
    outcome = aggregator.add_claim(claim)
    if outcome != "rejected":
        status._hand_out(judge.accepted(claim, msg.headers))
    if outcome == "counted":
        status.claims_counted += 1
        latest = status.latest_claims
        latest.pop(claim.agent_id, None)  # re-insert: the dict stays oldest-first
        latest[claim.agent_id] = claim
        if len(latest) > MAX_TRACKED_AGENTS:
            del latest[next(iter(latest))]
    elif outcome == "late":
        status.claims_late += 1
    else:
        status.rejected += 1
