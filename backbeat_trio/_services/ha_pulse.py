"""High-availability pulse: several pulse instances per cluster, exactly one of them publishing.

The pulses elect a leader through a *lease* held in a JetStream key/value bucket
(``BACKBEAT_HA_<cluster_id>``, key ``pulse-lease``, replicated on a NATS cluster). Every write to
the key is a compare-and-set on the key's revision, so the writes form one linear chain; the
value carries the writer's identity, its lease TTL and the beat schedule (next beat index, due
time as wall clock, tempo, bar length), so a successor continues the schedule exactly.

* :class:`LeaseElection` is the sans-IO core: it turns reads, write outcomes and the local
  monotonic clock into "may I publish now?", "may I try to take over now?" and role changes.
* :func:`run_ha_pulse` is the I/O loop: follower (poll the key, take over with a CAS once the
  lease lapsed) and leader (claim each beat with a CAS write *before* publishing it, renew,
  publish only inside the lease).

Why two leaders can never publish the same beat index, and why they never publish at the same
time (given bounded clock-rate error and bounded pauses), is argued in ``docs/scale.md``. In
short: a beat is published only after a CAS write recording it succeeded, a successor continues
from the latest write, and a successor's takeover timer starts when it *observed* a revision --
which is after that revision's writer *sent* it, the moment the writer's own validity counts from.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import trio

from .._bridge import open_nats_transport
from .._core.beats import beat_subject, tempo_subject
from .._core.hlc import HLC
from .._core.lease import LeaseElection, LeaseTimings, ScheduleSnapshot
from .._core.rules import MAX_FRAME_BEAT_INDEX
from .._core.schedule import PulseSchedule, ScheduledBeat, WallAnchor
from .._core.wire import BeatFrame, decode
from .._errors import ConfigError, NotConnected, WireError
from .._services.lease import (
    KVLeaseStore,
    LeaseKeeper,
    LeaseStatus,
    LeaseStore,
    _finite_positive,
    ensure_lease_store,
)
from .._services.pulse import PulseConfig, PulseStatus, make_beat_frame, tempo_listener
from .._transport.base import Subscription, Transport
from .._transport.options import ConnectionOptions
from .._util.trio_only import require_trio

if TYPE_CHECKING:
    pass


log = logging.getLogger("backbeat_trio.ha")


@dataclass(frozen=True, kw_only=True, repr=False)
class HAPulseConfig(ConnectionOptions):
    """Settings of one HA pulse instance (several run per cluster; one leads).

    The NATS connection fields are :class:`ConnectionOptions`'s, with the same rules as for a
    client; give ``nats_url`` every cluster member so the pulse fails over. Like a single pulse it
    retries its first connect (3 attempts, 0.25 s apart); its connection is named
    ``backbeat-ha-pulse:<pulse_id>``.

    Args:
        cluster_id: the cluster it beats for.
        tempo_bpm: tempo of a *fresh* cluster (a successor continues the recorded tempo).
        beats_per_bar: bar length of a fresh cluster (a successor keeps the recorded one).
        start_index: first beat index of a fresh cluster.
        pulse_id: this instance's id; unique per cluster (HLC node, connection name).
        max_tempo_step: largest relative tempo step accepted without ``force``.
        allow_forced_tempo: honour ``force`` in a TempoChange's reason.
        lease_ttl: lease TTL in seconds; default two beats plus ``jitter_tolerance``.
        jitter_tolerance: the guard: the old leader stops this long before a successor can start;
            also the latest a beat goes out after its due time (a later one is skipped, since
            clients with the same tolerance keep that beat themselves).
        clock_drift: bound on the relative rate error of two pulses' monotonic clocks.
        poll_interval: follower read period and the leader's claim lead; default
            ``min(beat / 4, ttl / 8)``, at least 20 ms.
        op_timeout: bound on one KV request; default ``min(ttl / 3, 2 s)``, at least 0.1 s.
        lease_replicas: replica count of the lease bucket (1 on a single server).
        release_on_exit: a leader that is stopped releases the lease (fast hand-over); False
            makes stopping look like a crash (tests, demos).
        lead: seconds from start-up to the first beat of a fresh cluster.
        **connection: the :class:`ConnectionOptions` fields.
    """

    cluster_id: str
    tempo_bpm: int = 60
    beats_per_bar: int = 4
    start_index: int = 0
    pulse_id: str = "pulse-1"
    max_tempo_step: float | None = 0.10
    allow_forced_tempo: bool = False
    lease_ttl: float | None = None
    jitter_tolerance: float = 0.050
    clock_drift: float = 1e-3
    poll_interval: float | None = None
    op_timeout: float | None = None
    lease_replicas: int = 3
    release_on_exit: bool = True
    lead: float = 0.0
    reconnect_delay: float = 0.25
    connect_attempts: int = 3

    def __post_init__(self) -> None:
        # the fields it shares with PulseConfig (ids, tempo, bar, start index) are checked by
        # building that PulseConfig, which checks the connection fields too
        self.pulse_config()
        super().__post_init__()  # normalises nats_url on this object
        _finite_positive("jitter_tolerance", self.jitter_tolerance, allow_zero=True)
        _finite_positive("lead", self.lead, allow_zero=True)
        drift = _finite_positive("clock_drift", self.clock_drift, allow_zero=True)
        if drift >= 0.1:
            raise ConfigError("clock_drift", f"must be < 0.1, got {drift!r}")
        for name in ("lease_ttl", "poll_interval", "op_timeout"):
            if getattr(self, name) is not None:
                _finite_positive(name, getattr(self, name))
        if (
            isinstance(self.lease_replicas, bool)
            or not isinstance(self.lease_replicas, int)
            or (not 1 <= self.lease_replicas <= 5)
        ):
            raise ConfigError("lease_replicas", f"must be in 1..5, got {self.lease_replicas!r}")
        t = self.timings()
        if t.lease_span < t.ttl / 2:
            raise ConfigError(
                "lease_ttl",
                f"{t.ttl:g} s is too short for jitter_tolerance {t.guard:g} s: a leader must keep "
                "at least half the TTL to publish in (ttl > 2 x jitter_tolerance + drift margin)",
            )

    @property
    def beat_duration(self) -> float:
        """Seconds per beat at ``tempo_bpm``."""
        return 60.0 / self.tempo_bpm

    def timings(self) -> LeaseTimings:
        """The lease's timing parameters with every default filled in."""
        ttl = (
            self.lease_ttl
            if self.lease_ttl is not None
            else (2 * self.beat_duration + self.jitter_tolerance)
        )
        poll = self.poll_interval
        if poll is None:
            poll = max(0.02, min(self.beat_duration / 4, ttl / 8))
        op = self.op_timeout if self.op_timeout is not None else max(0.1, min(ttl / 3, 2.0))
        return LeaseTimings(
            ttl=float(ttl),
            guard=float(self.jitter_tolerance),
            clock_drift=float(self.clock_drift),
            poll_interval=float(poll),
            renew_interval=float(ttl) / 2,
            op_timeout=float(op),
        )

    def _default_connection_name(self) -> str:
        return f"backbeat-ha-pulse:{self.pulse_id}"

    def pulse_config(self) -> PulseConfig:
        """The equivalent single-pulse settings (the tempo handling is :func:`run_pulse`'s)."""
        return PulseConfig(
            cluster_id=self.cluster_id,
            tempo_bpm=self.tempo_bpm,
            beats_per_bar=self.beats_per_bar,
            start_index=self.start_index,
            pulse_id=self.pulse_id,
            max_tempo_step=self.max_tempo_step,
            allow_forced_tempo=self.allow_forced_tempo,
            **self.connection_kwargs(),
        )


@dataclass(kw_only=True, repr=False)
class HAPulseStatus(LeaseStatus):
    """A running HA pulse's live view (returned by ``nursery.start(run_ha_pulse, cfg)``)."""

    cluster_id: str
    pulse_id: str
    pulse: PulseStatus
    skipped_no_lease: int = 0
    reconnects: int = 0

    def __repr__(self) -> str:
        return (
            f"<HAPulseStatus {self.cluster_id}/{self.pulse_id} {self.role} holder={self.holder} "
            f"terms={self.terms} published={self.pulse.published} last={self.pulse.last_beat}>"
        )


class _HAPulse:
    def __init__(
        self,
        cfg: HAPulseConfig,
        transport: Transport,
        store: LeaseStore,
        wall_clock: Callable[[], float],
    ) -> None:
        self.cfg = cfg
        self.pulse_cfg = cfg.pulse_config()
        self.transport = transport
        self.store = store
        self.wall_clock = wall_clock
        self.t = cfg.timings()
        self.election = LeaseElection(cfg.pulse_id, self.t)
        self.hlc = HLC(cfg.pulse_id)
        self.encoder = msgspec.json.Encoder()
        self.subject = beat_subject(cfg.cluster_id)
        self.schedule: PulseSchedule | None = None
        self.anchor = WallAnchor(0.0)  # where this term's schedule sits on the wall clock
        # the frame with the highest index seen on the beat subject: where a successor that
        # knows no schedule from the lease goes on from
        self.last_frame: BeatFrame | None = None
        self.status = HAPulseStatus(
            owner_id=cfg.pulse_id,
            instance=self.election.instance,
            timings=self.t,
            cluster_id=cfg.cluster_id,
            pulse_id=cfg.pulse_id,
            pulse=PulseStatus(
                cfg.cluster_id, cfg.tempo_bpm, cfg.beats_per_bar, pulse_id=cfg.pulse_id
            ),
        )
        self.lease = LeaseKeeper(
            cfg.pulse_id, self.t, store, self.status, self.election, wall_clock
        )

    @property
    def to_wall(self) -> float:
        """The wall clock minus trio's, as this term's anchor follows it."""
        return self.anchor.offset

    # -- schedule ---------------------------------------------------------------------------------
    def _acquisition_snapshot(self) -> ScheduleSnapshot:
        # The last lease record seen, even under a later revision that is no record; a beat
        # frame past it means a record was missed, and the index must never go back.
        e, cfg, frame = self.election, self.cfg, self.last_frame
        recorded = e.record.schedule if e.record is not None else None
        if frame is not None and (recorded is None or frame.beat_index >= recorded.beat_index):
            log.warning(
                "%s: taking over after beat %d seen on the beat subject (%s)",
                cfg.pulse_id,
                frame.beat_index,
                "no schedule in the lease" if recorded is None else "past the lease's schedule",
            )
            return ScheduleSnapshot.fresh(
                cfg.cluster_id,
                start_index=frame.beat_index + 1,
                due=frame.deadline_at.timestamp(),
                tempo_bpm=frame.tempo_bpm,
                beats_per_bar=recorded.beats_per_bar if recorded is not None else cfg.beats_per_bar,
                max_tempo_step=cfg.max_tempo_step,
            )
        if recorded is not None:
            return recorded
        if e.revision is not None:
            log.warning(
                "%s: neither the lease (revision %d) nor the beat subject shows a schedule; "
                "starting at beat %d (beat indices may repeat)",
                cfg.pulse_id,
                e.revision,
                cfg.start_index,
            )
        return ScheduleSnapshot.fresh(
            cfg.cluster_id,
            start_index=cfg.start_index,
            due=self.wall_clock() + cfg.lead,
            tempo_bpm=cfg.tempo_bpm,
            beats_per_bar=cfg.beats_per_bar,
            max_tempo_step=cfg.max_tempo_step,
        )

    def _take_schedule(self, snapshot: ScheduleSnapshot) -> PulseSchedule:
        now, wall = trio.current_time(), self.wall_clock()
        self.anchor = WallAnchor(wall - now)
        if snapshot.beats_per_bar != self.cfg.beats_per_bar:
            log.warning(
                "%s: continuing the recorded %d-beat bar (configured: %d)",
                self.cfg.pulse_id,
                snapshot.beats_per_bar,
                self.cfg.beats_per_bar,
            )
        schedule = snapshot.to_schedule(-self.to_wall, max_tempo_step=self.cfg.max_tempo_step)
        self.schedule = schedule
        self.status.pulse.schedule = schedule
        self.status.pulse.beats_per_bar = schedule.beats_per_bar
        self.status.pulse.tempo_bpm = schedule.tempo_bpm
        return schedule

    # -- roles -----------------------------------------------------------------------------------
    async def run(self) -> None:
        # the watch is closed by run_ha_pulse, after the release (which must not wait for it)
        await self.lease.open_watch()
        for _ in itertools.count():  # one iteration per term; ends only by cancellation
            await self.lease.follow(self._acquisition_snapshot)
            await self._lead()

    async def _lead(self) -> None:
        e = self.election
        record = e.record
        assert record is not None
        assert record.schedule is not None
        schedule = self._take_schedule(record.schedule)
        self.lease.sync_status()
        async with trio.open_nursery() as nursery:
            tempo_sub: Subscription | None = None
            try:
                tempo_sub = await self.transport.subscribe(
                    tempo_subject(self.cfg.cluster_id), buffer=256
                )
            except NotConnected as exc:
                log.warning("%s leads without tempo requests: %s", self.cfg.pulse_id, exc)
            if tempo_sub is not None:
                nursery.start_soon(
                    tempo_listener,
                    self.pulse_cfg,
                    self.transport,
                    tempo_sub,
                    schedule,
                    self.hlc,
                    self.status.pulse,
                )
            try:
                await self._lead_loop(schedule)
            finally:
                nursery.cancel_scope.cancel()
                if tempo_sub is not None:
                    with trio.move_on_after(1.0, shield=True):
                        await tempo_sub.unsubscribe()
        self.lease.sync_status()

    async def _lead_loop(self, schedule: PulseSchedule) -> None:
        e, t, st = self.election, self.t, self.status
        while True:
            now = trio.current_time()
            if not e.check(now):
                return
            if e.needs_read:
                if await self.lease.read():
                    if e.role != "leader":
                        return
                    continue
                await trio.sleep(min(t.poll_interval, max(0.0, e.valid_until - now)))
                continue
            skipped = schedule.skip_to(now)
            if schedule.next_due + self.cfg.jitter_tolerance < now:
                # the beat in progress (a successor's first, a leader's after a stall) would
                # reach clients after they kept it themselves: go on with the next due beat
                schedule.next_beat()
                skipped += 1
            if skipped:
                st.pulse.skipped_late += skipped
            claim_at = schedule.next_due - t.poll_interval
            renew_at = e.last_confirmed_send + t.renew_interval
            if now < min(claim_at, renew_at, e.valid_until):
                await trio.sleep_until(min(claim_at, renew_at, e.valid_until))
                continue
            if now < claim_at:  # renew only
                if (
                    await self.lease.write(ScheduleSnapshot.of(schedule, self.to_wall))
                    == "conflict"
                ):
                    return
                continue
            beat = schedule.next_beat()
            # the lease records, and the frame carries, the anchor as it stands for this beat
            self.anchor.follow(beat.deadline, self.wall_clock() - trio.current_time())
            outcome = await self.lease.write(ScheduleSnapshot.of(schedule, self.to_wall))
            if outcome == "conflict":
                return
            if outcome == "unknown":
                st.skipped_no_lease += 1  # claimed or not, this beat is never published
                continue
            await trio.sleep_until(beat.due)
            self._publish(beat)

    def _publish(self, beat: ScheduledBeat) -> None:
        st = self.status.pulse
        now = trio.current_time()
        if now >= beat.deadline:
            st.skipped_late += 1
            return
        if not self.election.may_publish(now):
            self.status.skipped_no_lease += 1
            return
        if now > beat.due + self.cfg.jitter_tolerance:
            st.skipped_late += 1  # clients have kept this beat themselves by now
            return
        if not self.transport.connected:
            st.skipped_disconnected += 1
            return
        frame = make_beat_frame(
            self.cfg.cluster_id,
            beat,
            str(self.hlc.now()),
            _dt.datetime.fromtimestamp(beat.deadline + self.to_wall, _dt.UTC),
        )
        try:
            self.transport.publish(self.subject, self.encoder.encode(frame))
        except NotConnected:
            st.skipped_disconnected += 1
            return
        st.record_publish(beat)

    async def release(self) -> None:
        """Stop leading, then mark the lease released so a follower takes over at once."""
        if self.schedule is not None:
            await self.lease.release(ScheduleSnapshot.of(self.schedule, self.to_wall))

    async def watch_beats(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Remember the highest-indexed frame of this cluster on the beat subject (the leader's
        own included); without a subscription the lease alone tells a successor where to go on."""
        try:
            sub = await self.transport.subscribe(self.subject, buffer=64)
        except NotConnected as exc:
            log.warning("%s does not watch the beat subject: %s", self.cfg.pulse_id, exc)
            task_status.started()
            return
        task_status.started()
        async for msg in sub.messages:
            try:
                frame = decode(msg.data, BeatFrame)
            except WireError:
                continue
            if frame.cluster_id != self.cfg.cluster_id or frame.beat_index > MAX_FRAME_BEAT_INDEX:
                continue  # what every client refuses moves nobody's schedule
            if self.last_frame is None or frame.beat_index > self.last_frame.beat_index:
                self.last_frame = frame

    async def watch_events(self) -> None:
        async for event in self.transport.events:
            if event.kind == "reconnected":
                self.status.reconnects += 1
            log.debug("%s connection event: %s %s", self.cfg.pulse_id, event.kind, event.detail)


async def run_ha_pulse(
    cfg: HAPulseConfig,
    *,
    transport: Transport | None = None,
    store: LeaseStore | None = None,
    wall_clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[HAPulseStatus] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one HA pulse instance until cancelled: follow, take over when the lease lapses, lead.

    Run several (on different hosts, each given every NATS cluster URL); exactly one publishes.

    Args:
        cfg: its settings.
        transport: an already-open transport (tests); by default it connects to ``cfg.nats_url``.
        store: the lease store; by default the KV bucket ``BACKBEAT_HA_<cluster_id>`` on
            ``transport``'s JetStream.
        wall_clock: POSIX seconds (tests on MockClock pass a virtual one).
        task_status: ``nursery.start`` gets a live :class:`HAPulseStatus` once the lease bucket
            exists (it may be a follower then).

    Raises:
        NotConnected: the first connect failed.
        BackbeatError: the lease bucket could not be created.
    """
    require_trio("run_ha_pulse")
    async with contextlib.AsyncExitStack() as stack:
        owned = transport is None
        if transport is None:
            transport = await stack.enter_async_context(open_nats_transport(cfg))
        if store is None:
            store = KVLeaseStore(
                transport,
                cfg.cluster_id,
                replicas=cfg.lease_replicas,
                op_timeout=cfg.timings().op_timeout,
            )
        pulse = _HAPulse(cfg, transport, store, wall_clock)
        await ensure_lease_store(store, cfg.timings().op_timeout)
        try:
            async with trio.open_nursery() as nursery:
                if owned:
                    nursery.start_soon(pulse.watch_events)
                await nursery.start(pulse.watch_beats)
                task_status.started(pulse.status)
                await pulse.run()
        finally:
            if cfg.release_on_exit and pulse.election.role == "leader":
                with trio.move_on_after(pulse.t.op_timeout + 0.5, shield=True):
                    await pulse.release()
            await pulse.lease.close_watch()
