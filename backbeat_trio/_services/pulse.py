"""The pulse: publishes a cluster's beat frames on an absolute-time schedule.

The schedule itself is the sans-IO :class:`~backbeat_trio._core.schedule.PulseSchedule`; this module
only sleeps until each beat is due, stamps it (HLC, wall-clock ``deadline_at``) and publishes it.
It never buffers beats while disconnected: a beat that cannot go out on time is skipped.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as _dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import trio

from .._bridge import open_nats_transport
from .._core.beats import (
    beat_subject,
    tempo_subject,
    validate_beats_per_bar,
    validate_id,
    validate_tempo,
)
from .._core.hlc import HLC
from .._core.latency import LatencyHistogram
from .._core.rules import MAX_FRAME_BEAT_INDEX, MAX_TEMPO_BPM, MIN_TEMPO_BPM
from .._core.schedule import PulseSchedule, ScheduledBeat, TempoDecision, WallAnchor
from .._core.wire import BeatFrame, TempoChange, decode
from .._errors import ConfigError, NotConnected, PulseConflict, WireError
from .._transport.base import Subscription, Transport
from .._transport.options import ConnectionOptions
from .._util.sleep import sleep_until_precise
from .._util.trio_only import require_trio

__all__ = [
    "PulseConfig",
    "PulseStatus",
    "TempoControl",
    "make_beat_frame",
    "run_pulse",
    "tempo_listener",
]

log = logging.getLogger("backbeat_trio.pulse")


@dataclass(frozen=True, kw_only=True, repr=False)
class PulseConfig(ConnectionOptions):
    """Settings of one pulse.

    The NATS connection fields are :class:`ConnectionOptions`'s (``nats_url``, ``user``,
    ``password``, ``token``, ``creds_file``, ``nkeys_seed``, ``tls``, ``tls_ca_file``,
    ``tls_cert_file``, ``tls_key_file``, ``name``, ``reconnect_delay``, ``max_reconnects``,
    ``connect_attempts``), with the same rules as for a client; a pulse retries its first connect
    (3 attempts, 0.25 s apart) and names its connection ``backbeat-pulse:<pulse_id>``.

    Args:
        cluster_id: the cluster it beats for.
        tempo_bpm: starting tempo (1..1200).
        beats_per_bar: bar length.
        start_index: the first beat index published.
        pulse_id: its id (HLC node, connection name).
        max_tempo_step: largest relative tempo step accepted without ``force`` (None: any).
        allow_forced_tempo: honour ``force`` in a TempoChange's reason (``"force: …"``).
        share_beat_subject: keep publishing when another publisher's frames appear on the beat
            subject (counted in ``PulseStatus.foreign_frames`` and logged once). By default a
            pulse that sees one stops with :class:`~backbeat_trio.PulseConflict`: two pulses on
            one cluster interleave their indices and clients discard the beats of the one behind.
        **connection: the :class:`ConnectionOptions` fields.
    """

    cluster_id: str
    tempo_bpm: int = 60
    beats_per_bar: int = 4
    start_index: int = 0
    pulse_id: str = "pulse-1"
    max_tempo_step: float | None = 0.10
    allow_forced_tempo: bool = False
    share_beat_subject: bool = False
    reconnect_delay: float = 0.25
    connect_attempts: int = 3

    def __post_init__(self) -> None:
        validate_id("cluster_id", self.cluster_id)
        validate_id("pulse_id", self.pulse_id)
        validate_tempo(self.tempo_bpm)
        validate_beats_per_bar(self.beats_per_bar)
        if (
            isinstance(self.start_index, bool)
            or not isinstance(self.start_index, int)
            or not (0 <= self.start_index < 2**63)
        ):
            raise ConfigError("start_index", f"must be an int >= 0, got {self.start_index!r}")
        super().__post_init__()  # URL and credentials are checked now, not at connect time

    def _default_connection_name(self) -> str:
        return f"backbeat-pulse:{self.pulse_id}"


@dataclass
class PulseStatus:
    """What a running pulse reports (returned by ``nursery.start(run_pulse, cfg)``).

    Attributes:
        publish_error: how late each published beat went out against the ideal schedule
            (seconds from the beat's due time to the return of ``publish``).
        last_published_at: ``trio.current_time()`` of the latest publish (None before one).
        tempo_refused: tempo requests refused (``tempo_refusals`` keeps the latest reasons).
        tempo_control: where tempo requests go while this pulse publishes (None otherwise).
        foreign_frames: beat frames seen on the beat subject that this pulse did not publish
            (another pulse's, or anybody's who may publish there); ``bad_beat_messages`` counts
            what arrived there and did not decode as a beat frame.
    """

    cluster_id: str
    tempo_bpm: int
    beats_per_bar: int
    published: int = 0
    skipped_disconnected: int = 0
    skipped_late: int = 0
    last_beat: int | None = None
    tempo_changes: int = 0
    tempo_refusals: list[str] = field(default_factory=list)
    bad_tempo_messages: int = 0
    schedule: PulseSchedule | None = None
    pulse_id: str = ""
    publish_error: LatencyHistogram = field(default_factory=LatencyHistogram)
    last_published_at: float | None = None
    tempo_refused: int = 0
    tempo_control: TempoControl | None = None
    foreign_frames: int = 0
    bad_beat_messages: int = 0

    def record_publish(self, beat: ScheduledBeat) -> None:
        """Count a beat just published (its publish error measured now)."""
        now = trio.current_time()
        self.publish_error.observe(now - beat.due)
        self.last_published_at = now
        self.published += 1
        self.last_beat = beat.beat_index
        self.tempo_bpm = beat.tempo_bpm

    def __repr__(self) -> str:
        return (
            f"<PulseStatus {self.cluster_id} beat={self.last_beat} tempo={self.tempo_bpm} "
            f"published={self.published} skipped={self.skipped_disconnected + self.skipped_late}>"
        )


async def run_pulse(
    cfg: PulseConfig,
    *,
    transport: Transport | None = None,
    wall_clock: Callable[[], float] = time.time,
    lead: float = 0.0,
    task_status: trio.TaskStatus[PulseStatus] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a pulse until cancelled.

    Args:
        cfg: the pulse's settings.
        transport: an already-open transport (tests); by default it connects to ``cfg.nats_url``.
        wall_clock: POSIX seconds for ``deadline_at`` (tests on MockClock pass a virtual one).
        lead: seconds from start-up to the first beat.
        task_status: ``nursery.start`` gets a live :class:`PulseStatus` once subscribed.

    Raises:
        NotConnected: the first connect failed.
        PulseConflict: another publisher's frames appeared on the beat subject (unless
            ``cfg.share_beat_subject``).
    """
    require_trio("run_pulse")
    async with contextlib.AsyncExitStack() as stack:
        if transport is None:
            transport = await stack.enter_async_context(open_nats_transport(cfg))
        await _pulse_loop(cfg, transport, wall_clock, lead, task_status)


async def _pulse_loop(
    cfg: PulseConfig,
    transport: Transport,
    wall_clock: Callable[[], float],
    lead: float,
    task_status: trio.TaskStatus[PulseStatus],
) -> None:
    hlc = HLC(cfg.pulse_id)
    subject = beat_subject(cfg.cluster_id)
    t0 = trio.current_time() + lead
    # the pulse's clock: trio's monotonic clock, placed on the wall clock by a slewed anchor
    anchor = WallAnchor(wall_clock() - trio.current_time())
    schedule = PulseSchedule(
        cfg.cluster_id,
        tempo_bpm=cfg.tempo_bpm,
        beats_per_bar=cfg.beats_per_bar,
        start_index=cfg.start_index,
        t0=t0,
        max_tempo_step=cfg.max_tempo_step,
    )
    status = PulseStatus(
        cfg.cluster_id, cfg.tempo_bpm, cfg.beats_per_bar, schedule=schedule, pulse_id=cfg.pulse_id
    )

    def to_wall(t: float) -> _dt.datetime:
        offset = anchor.follow(t, wall_clock() - trio.current_time())
        return _dt.datetime.fromtimestamp(t + offset, _dt.UTC)

    own: collections.deque[bytes] = collections.deque(maxlen=_OWN_FRAMES_KEPT)
    subs: list[Subscription] = []
    try:
        async with trio.open_nursery() as nursery:
            subs.append(await transport.subscribe(tempo_subject(cfg.cluster_id), buffer=256))
            nursery.start_soon(tempo_listener, cfg, transport, subs[0], schedule, hlc, status)
            subs.append(await transport.subscribe(subject, buffer=256))
            nursery.start_soon(_watch_beat_subject, cfg, subs[1], own, status)
            task_status.started(status)
            await _beat(cfg, transport, schedule, status, hlc, own, to_wall)
    finally:
        # the pulse's subscriptions are its own, also on a transport it was handed
        with trio.move_on_after(1.0, shield=True):
            for sub in subs:
                await sub.unsubscribe()


async def _beat(
    cfg: PulseConfig,
    transport: Transport,
    schedule: PulseSchedule,
    status: PulseStatus,
    hlc: HLC,
    own: collections.deque[bytes],
    to_wall: Callable[[float], _dt.datetime],
) -> None:
    """Publish each beat as it falls due, until cancelled (never a burst after a stall)."""
    subject = beat_subject(cfg.cluster_id)
    encoder = msgspec.json.Encoder()
    while True:
        beat: ScheduledBeat = schedule.next_beat()
        await sleep_until_precise(beat.due)
        if trio.current_time() - beat.deadline >= 0:
            # stalled for a whole beat (suspended process, overloaded box): skip, no burst
            skipped = schedule.skip_to(trio.current_time()) + 1
            status.skipped_late += skipped
            log.warning("pulse fell behind; skipped %d beat(s)", skipped)
            continue
        if not transport.connected:
            status.skipped_disconnected += 1
            continue
        frame = make_beat_frame(cfg.cluster_id, beat, str(hlc.now()), to_wall(beat.deadline))
        payload = encoder.encode(frame)
        own.append(payload)
        try:
            transport.publish(subject, payload)
        except NotConnected:
            status.skipped_disconnected += 1
            continue
        status.record_publish(beat)


# How many of its latest frames a pulse remembers to recognise its own on the beat subject: a
# frame comes back within a round trip, far less than this many beats.
_OWN_FRAMES_KEPT = 64


async def _watch_beat_subject(
    cfg: PulseConfig, sub: Subscription, own: collections.deque[bytes], status: PulseStatus
) -> None:
    """Watch the beat subject for frames this pulse did not publish (compared byte for byte:
    another pulse with the same id and clock would still write other deadlines)."""
    warned = False
    async for msg in sub.messages:
        if msg.data in own:
            continue
        try:
            frame = decode(msg.data, BeatFrame)
        except WireError as exc:
            status.bad_beat_messages += 1
            log.debug("ignored a message on the beat subject that is no beat frame: %s", exc)
            continue
        if frame.cluster_id != cfg.cluster_id or frame.beat_index > MAX_FRAME_BEAT_INDEX:
            # what every client refuses is no second pulse's beat: counted, never a reason to stop
            status.bad_beat_messages += 1
            log.debug("ignored beat frame %d for cluster %r", frame.beat_index, frame.cluster_id)
            continue
        status.foreign_frames += 1
        what = (
            f"another publisher's beat frames on {sub.subject} (beat {frame.beat_index}, "
            f"HLC {frame.hlc}); this pulse published beat {status.last_beat}"
        )
        if not cfg.share_beat_subject:
            log.error("%s: stopping, since clients discard the beats of the pulse behind", what)
            raise PulseConflict(
                f"{what}: another pulse beats for cluster {cfg.cluster_id!r}. Stop one of them, "
                f"run them as HA pulses (pulse --ha), or set share_beat_subject=True "
                f"(pulse --share) to keep publishing anyway",
                frame,
            )
        if not warned:
            warned = True
            log.warning("%s: publishing anyway (share_beat_subject)", what)


def make_beat_frame(
    cluster_id: str, beat: ScheduledBeat, hlc: str, deadline_at: _dt.datetime
) -> BeatFrame:
    """The frame a pulse publishes for a scheduled beat (``deadline_at`` on the pulse's clock)."""
    return BeatFrame(
        cluster_id=cluster_id,
        beat_index=beat.beat_index,
        downbeat=beat.downbeat,
        phase=beat.phase,
        hlc=hlc,
        deadline_at=deadline_at,
        tempo_bpm=beat.tempo_bpm,
        window_id=beat.window_id,
    )


class TempoControl:
    """A publishing pulse's tempo desk: every tempo request, from NATS or the admin API, goes
    through :meth:`request`, so both get the same checks and the same answer.

    Args:
        cfg: the pulse's settings (cluster, ``allow_forced_tempo``).
        schedule: the schedule the change goes to.
        hlc: the pulse's clock (a request's HLC moves it forward).
        status: the pulse's live view (counts changes and refusals).
    """

    def __init__(
        self, cfg: PulseConfig, schedule: PulseSchedule, hlc: HLC, status: PulseStatus
    ) -> None:
        self.cfg = cfg
        self.schedule = schedule
        self.hlc = hlc
        self.status = status

    def __repr__(self) -> str:
        return f"<TempoControl {self.cfg.cluster_id} {self.schedule.tempo_bpm} BPM>"

    def request(self, change: TempoChange) -> TempoDecision:
        """Check a decoded request and hand it to the schedule.

        Args:
            change: the request (already decoded and validated as a ``TempoChange``).

        Returns:
            The schedule's decision (refusals say why).

        Raises:
            WireError: the request names another cluster or carries a bad HLC.
        """
        cfg, status = self.cfg, self.status
        if change.cluster_id != cfg.cluster_id:
            raise WireError(f"tempo change for cluster {change.cluster_id!r}")
        if change.hlc:
            self.hlc.update(change.hlc)
        force = cfg.allow_forced_tempo and change.reason.startswith("force")
        decision = self.schedule.request_tempo(change.tempo_bpm, force=force)
        step = self.schedule.max_tempo_step
        if not decision.accepted and step is not None:
            decision = dataclasses.replace(decision, reason=step_advice(decision, step, cfg))
        if decision.accepted:
            status.tempo_changes += 1
            log.info(
                "tempo %s -> %s BPM requested by %s: %s",
                decision.previous_bpm,
                change.tempo_bpm,
                change.requested_by or "?",
                decision.reason,
            )
        else:
            status.tempo_refused += 1
            status.tempo_refusals.append(decision.reason)
            del status.tempo_refusals[:-32]
            log.warning(
                "refused tempo change from %s: %s", change.requested_by or "?", decision.reason
            )
        return decision


def step_advice(decision: TempoDecision, step: float, cfg: PulseConfig) -> str:
    """A step refusal's reason, with what a caller over NATS or HTTP can do about it.

    The schedule's own reason speaks to Python callers (``force=True``); for a TempoChange
    (on NATS, or through the admin API) the only force is a reason starting with ``force``,
    and only on a pulse run with ``allow_forced_tempo`` (``--allow-forced-tempo``); otherwise
    the way there is in steps.
    """
    wanted, current = decision.tempo_bpm, decision.previous_bpm
    delta = int(step * current * (1 + 1e-12))
    if (
        not isinstance(wanted, int)
        or not MIN_TEMPO_BPM <= wanted <= MAX_TEMPO_BPM
        or abs(wanted - current) <= delta
    ):
        return decision.reason  # refused for another reason than the step
    head = decision.reason.partition("; ")[0]
    if cfg.allow_forced_tempo:
        return (
            f"{head}; to allow it, start the request's reason with 'force' "
            f'(e.g. {{"tempo_bpm": {wanted}, "reason": "force: <why>"}})'
        )
    if delta == 0:
        way = f"no whole-BPM step from {current} fits within ±{step:.0%}"
    else:
        first = current + delta if wanted > current else current - delta
        way = (
            f"step there in changes of at most ±{step:.0%} of the tempo in force, one per bar "
            f"(each takes effect at the next downbeat): {first} BPM first"
        )
    return (
        f"{head}; {way}, or restart the pulse with --allow-forced-tempo and send a reason "
        "starting with 'force' (or with --any-tempo-step)"
    )


async def tempo_listener(
    cfg: PulseConfig,
    transport: Transport,
    sub: Subscription,
    schedule: PulseSchedule,
    hlc: HLC,
    status: PulseStatus,
) -> None:
    control = TempoControl(cfg, schedule, hlc, status)
    status.tempo_control = control
    try:
        async for msg in sub.messages:
            try:
                decision = control.request(decode(msg.data, TempoChange))
            except WireError as exc:
                status.bad_tempo_messages += 1
                log.warning("ignored a bad tempo change: %s", exc)
                _reply(transport, msg.reply, False, str(exc), None)
                continue
            _reply(
                transport, msg.reply, decision.accepted, decision.reason, decision.effective_beat
            )
    finally:
        if status.tempo_control is control:
            status.tempo_control = None


def _reply(
    transport: Transport, reply: str, accepted: bool, reason: str, effective_beat: int | None
) -> None:
    if not reply:
        return
    with contextlib.suppress(NotConnected):
        transport.publish(
            reply,
            msgspec.json.encode(
                {"accepted": accepted, "reason": reason, "effective_beat": effective_beat}
            ),
        )
