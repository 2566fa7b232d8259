"""The reverb: verifies claims, aggregates each window and publishes one BarReport per window.

Aggregation is the sans-IO :class:`~backbeat_trio._aggregate.BarAggregator`. The reverb follows the
beat as an ordinary client (so it keeps time locally when the pulse goes quiet) and closes a
window when the next one starts, i.e. when the window's last beat ends. It also creates the
JetStream stream that makes claims durable, and reads claims *from that stream*, so a claim an
agent re-published after a reconnect is counted once, not rejected as a replay.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ._aggregate import BarAggregator
from ._beats import (
    bar_subject,
    status_stream_name,
    status_subject,
    validate_beats_per_bar,
    validate_id,
)
from ._client import open_client
from ._config import Config
from ._errors import BackbeatError, NotConnected, SignatureError, WireError
from ._history import (
    already_reported,
    bar_report_headers,
    ensure_bar_stream,
    last_reported_window,
)
from ._hlc import HLC
from ._signing import Keyring, ReplayCache, verify_claim
from ._transport import Subscription, Transport, open_nats_transport
from ._wire import BarReport, StatusClaim, encode

__all__ = ["ReverbConfig", "ReverbStatus", "run_reverb"]

log = logging.getLogger("backbeat_trio.reverb")

_RESUME_WINDOWS = 4
#: ReverbStatus.latest_claims keeps at most this many agents (the least recently heard go first).
MAX_TRACKED_AGENTS = 10_000


@dataclass(frozen=True, kw_only=True)
class ReverbConfig:
    """Settings of one reverb aggregator.

    Args:
        cluster_id: the cluster.
        nats_url: NATS URL(s).
        keyring: the agents' public keys (None: trust nobody's signature).
        allow_unsigned: accept claims without a signature.
        beats_per_bar: window length (must match the pulse).
        reverb_id: its id (HLC node, connection name).
        jitter_tolerance: as for a client.
        create_stream: create ``BACKBEAT_STATUS_<cluster_id>`` if missing.
        duplicate_window: the stream's de-duplication window, seconds.
        token, user, password, tls_ca_file: NATS authentication.
    """

    cluster_id: str
    nats_url: str | tuple[str, ...] | list[str] = "nats://127.0.0.1:4222"
    keyring: Keyring | None = None
    allow_unsigned: bool = False
    beats_per_bar: int = 4
    reverb_id: str = "reverb-1"
    jitter_tolerance: float = 0.050
    create_stream: bool = True
    duplicate_window: float = 120.0
    token: str | None = None
    user: str | None = None
    password: str | None = None
    tls_ca_file: str | None = None

    def __post_init__(self) -> None:
        validate_id("cluster_id", self.cluster_id)
        validate_id("reverb_id", self.reverb_id)
        validate_beats_per_bar(self.beats_per_bar)
        self.connection_config()

    def connection_config(self) -> Config:
        """The client-level settings the reverb connects and follows the beat with."""
        return Config(
            cluster_id=self.cluster_id,
            agent_id=self.reverb_id,
            nats_url=self.nats_url,
            token=self.token,
            user=self.user,
            password=self.password,
            tls_ca_file=self.tls_ca_file,
            beats_per_bar=self.beats_per_bar,
            jitter_tolerance=self.jitter_tolerance,
            jetstream=False,  # the reverb publishes no claims
            name=f"backbeat-reverb:{self.reverb_id}",
            connect_attempts=3,
            reconnect_delay=0.25,
            beat_buffer=256,
        )


@dataclass
class ReverbStatus:
    """A running reverb's live view (returned by ``nursery.start(run_reverb, cfg)``)."""

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

    def __repr__(self) -> str:
        return (
            f"<ReverbStatus {self.cluster_id} reports={self.reports} "
            f"claims={self.claims_counted} rejected={self.rejected} stream={self.stream}>"
        )

    async def wait_for_report(self) -> BarReport:
        """Wait for the next bar report and return it."""
        await self.report_event.wait()
        assert self.latest is not None
        return self.latest


async def run_reverb(
    cfg: ReverbConfig,
    *,
    transport: Transport | None = None,
    wall_clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[ReverbStatus] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a reverb until cancelled.

    Args:
        cfg: its settings.
        transport: an already-open transport (tests); by default it connects.
        wall_clock: POSIX seconds (tests on MockClock pass a virtual one).
        task_status: ``nursery.start`` gets a live :class:`ReverbStatus` once it is subscribed.

    Raises:
        NotConnected: the first connect failed.
    """
    async with contextlib.AsyncExitStack() as stack:
        if transport is None:
            transport = await stack.enter_async_context(
                open_nats_transport(cfg.connection_config())
            )
        await _reverb_loop(cfg, transport, wall_clock, task_status)


async def _reverb_loop(
    cfg: ReverbConfig,
    transport: Transport,
    wall_clock: Callable[[], float],
    task_status: trio.TaskStatus[ReverbStatus],
) -> None:
    status = ReverbStatus(cfg.cluster_id)
    subject = status_subject(cfg.cluster_id)
    stream = status_stream_name(cfg.cluster_id)
    if cfg.create_stream:
        with contextlib.suppress(Exception):
            await transport.ensure_stream(stream, [subject], duplicate_window=cfg.duplicate_window)
        with contextlib.suppress(Exception):
            await ensure_bar_stream(transport, cfg.cluster_id)
    try:
        resume_after = await last_reported_window(transport, cfg.cluster_id)
    except BackbeatError:
        resume_after = None
    found = await transport.find_stream(subject)
    status.stream = found
    if found is not None:
        claims_sub = await transport.stream_subscribe(subject, found)
    else:
        log.warning("no JetStream stream captures %s; reading claims at most once", subject)
        claims_sub = await transport.subscribe(subject, buffer=65536)
    aggregator = BarAggregator(cfg.cluster_id, beats_per_bar=cfg.beats_per_bar)
    hlc = HLC(cfg.reverb_id)
    keyring = cfg.keyring if cfg.keyring is not None else Keyring({})
    replay = ReplayCache()
    out_subject = bar_subject(cfg.cluster_id)

    async with (
        open_client(cfg.connection_config(), transport=transport, wall_clock=wall_clock) as bb,
        trio.open_nursery() as nursery,
    ):
        beats = bb.beats(buffer=256)
        nursery.start_soon(
            _claims_loop, claims_sub, aggregator, keyring, cfg.allow_unsigned, replay, hlc, status
        )
        task_status.started(status)
        async for frame in beats:
            left = aggregator.observe_beat(frame, trio.current_time())
            if left is None:
                continue
            report = aggregator.close_window(left, str(hlc.now()))
            if _resumed_duplicate(report, resume_after, cfg.beats_per_bar):
                log.info("window %d was reported before this reverb restarted", left)
                continue
            resume_after = None  # past the restart point: nothing else can be a repeat
            try:
                transport.publish(out_subject, encode(report), headers=bar_report_headers(report))
            except NotConnected:
                log.warning("bar report for window %s not published: disconnected", left)
            status.reports += 1
            status.latest = report
            status.history.append(report)
            status.rejection_reasons = dict(aggregator.rejection_reasons)
            event, status.report_event = status.report_event, trio.Event()
            event.set()
        nursery.cancel_scope.cancel()


def _resumed_duplicate(report: BarReport, last: int | None, beats_per_bar: int) -> bool:
    # A restarted reverb first closes the window in progress, which its predecessor may already
    # have reported. Only windows just behind the stored one count as repeats: a window far
    # behind it means the pulse started a new timeline, whose reports must go out.
    if not already_reported(report, last):
        return False
    assert last is not None
    return last - report.from_beat <= _RESUME_WINDOWS * beats_per_bar


async def _claims_loop(
    sub: Subscription,
    aggregator: BarAggregator,
    keyring: Keyring,
    allow_unsigned: bool,
    replay: ReplayCache,
    hlc: HLC,
    status: ReverbStatus,
) -> None:
    async for msg in sub.messages:
        if sub.dropped:
            status.claims_dropped += sub.dropped
            log.warning("%d claim(s) dropped: the reverb fell behind its claim stream", sub.dropped)
            sub.dropped = 0
        try:
            claim = verify_claim(
                msg.data, msg.headers, keyring, allow_unsigned=allow_unsigned, replay_cache=replay
            )
        except SignatureError as exc:
            aggregator.reject(exc.reason or "signature")
            status.rejected += 1
            log.info("rejected claim: %s", exc)
            continue
        except (WireError, UnicodeDecodeError) as exc:
            # UnicodeDecodeError: invalid UTF-8 inside a JSON string gets past _wire.decode
            aggregator.reject("schema")
            status.rejected += 1
            log.info("rejected claim: %s", exc)
            continue
        with contextlib.suppress(WireError):
            hlc.update(claim.hlc)
        outcome = aggregator.add_claim(claim)
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
