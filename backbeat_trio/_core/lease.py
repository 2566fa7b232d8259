"""The lease that elects one publisher among HA instances: its record and the sans-IO
election core (:class:`LeaseElection`). No trio, no I/O.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

import msgspec

from .._core.beats import validate_id
from .._core.schedule import PulseSchedule
from .._errors import ConfigError, WireError
from .wire import decode

if TYPE_CHECKING:
    pass


RECORD_VERSION: Final = 1
_INFLIGHT_KEPT: Final = 16

Role = Literal["follower", "leader"]


def lease_bucket_name(cluster_id: str) -> str:
    """The KV bucket holding a cluster's pulse lease: ``BACKBEAT_HA_<cluster_id>``."""
    return f"BACKBEAT_HA_{validate_id('cluster_id', cluster_id)}"


# --- the lease value ------------------------------------------------------------------------------
class ScheduleSnapshot(msgspec.Struct, kw_only=True, frozen=True):
    """A :class:`PulseSchedule` state with its times as wall clock (POSIX seconds).

    Wall clock, because the successor's monotonic clock has an unrelated origin; the fields are
    those of :meth:`PulseSchedule.state`.
    """

    version: int = 1
    cluster_id: str
    beat_index: int
    due: float
    tempo_bpm: int
    beats_per_bar: int
    pending_tempo_bpm: int | None = None
    max_tempo_step: float | None = 0.10
    anchor_index: int
    anchor_time: float

    @classmethod
    def of(cls, schedule: PulseSchedule, to_wall: float) -> ScheduleSnapshot:
        """Snapshot ``schedule``; ``to_wall`` is added to its times (wall - local clock)."""
        state = schedule.state()
        return cls(
            cluster_id=state["cluster_id"],
            beat_index=state["beat_index"],
            due=state["due"] + to_wall,
            tempo_bpm=state["tempo_bpm"],
            beats_per_bar=state["beats_per_bar"],
            pending_tempo_bpm=state["pending_tempo_bpm"],
            max_tempo_step=state["max_tempo_step"],
            anchor_index=state["anchor_index"],
            anchor_time=state["anchor_time"] + to_wall,
        )

    @classmethod
    def fresh(
        cls,
        cluster_id: str,
        *,
        start_index: int,
        due: float,
        tempo_bpm: int,
        beats_per_bar: int,
        max_tempo_step: float | None,
    ) -> ScheduleSnapshot:
        """The snapshot of a schedule that has not started: beat ``start_index`` at ``due``."""
        return cls(
            cluster_id=cluster_id,
            beat_index=start_index,
            due=due,
            tempo_bpm=tempo_bpm,
            beats_per_bar=beats_per_bar,
            max_tempo_step=max_tempo_step,
            anchor_index=start_index,
            anchor_time=due,
        )

    def to_schedule(self, shift: float, *, max_tempo_step: float | None) -> PulseSchedule:
        """Continue the schedule; ``shift`` is added to its times (local - wall clock).

        Raises:
            ConfigError: the snapshot breaks a schedule rule.
        """
        state = msgspec.structs.asdict(self)
        state["max_tempo_step"] = max_tempo_step
        return PulseSchedule.from_state(state, shift=shift)


class LeaseRecord(msgspec.Struct, kw_only=True, frozen=True):
    """The value of the lease key.

    Attributes:
        holder: the writing pulse's ``pulse_id``.
        instance: a random id of the writing process (a restarted pulse is a new instance).
        seq: the instance's write counter, so it can recognise its own write after a lost ack.
        ttl: the writer's lease TTL, seconds; a successor waits at least this long.
        written_at: the writer's wall clock when it sent the write (informational only).
        expires_at: ``written_at + ttl`` (informational only: safety never reads wall clocks).
        released: the holder stepped down on purpose; a successor may take over at once.
        schedule: the beat schedule, ``schedule.beat_index`` being the next beat not yet claimed.
    """

    version: int = RECORD_VERSION
    holder: str
    instance: str
    seq: int
    ttl: float
    written_at: float = 0.0
    expires_at: float = 0.0
    released: bool = False
    schedule: ScheduleSnapshot | None = None


_record_encoder: Final = msgspec.json.Encoder()


def encode_lease(record: LeaseRecord) -> bytes:
    """The lease value's bytes."""
    return _record_encoder.encode(record)


def decode_lease(data: bytes | None) -> LeaseRecord | None:
    """Decode a lease value.

    Returns:
        The record; None for a delete marker, bytes that are not a lease record, or a record whose
        schedule breaks a rule: nobody's claim (see :meth:`LeaseElection.observe`).
    """
    if data is None:
        return None
    try:
        record = decode(data, LeaseRecord)
    except WireError:
        return None
    if not (math.isfinite(record.ttl) and record.ttl > 0):
        return None
    if record.schedule is not None:
        try:
            record.schedule.to_schedule(0.0, max_tempo_step=None)
        except (ConfigError, TypeError, ValueError, OverflowError):
            return None  # a schedule no pulse could continue: treat the value as unreadable
    return record


# --- the sans-IO election core --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LeaseTimings:
    """The lease's timing parameters, seconds (see :meth:`HAPulseConfig.timings`).

    Attributes:
        ttl: lease TTL. A follower takes over after seeing the same revision for this long.
        guard: how long before a successor could take over the leader stops publishing; covers
            differences in delivery latency between the old and the new leader's beats.
        clock_drift: bound on the relative rate error between any two pulses' monotonic clocks.
        poll_interval: how often a follower reads the key; also how far ahead of a beat the
            leader claims it, which keeps the failover gap within the TTL.
        renew_interval: the leader writes at least this often even with no beat to claim.
        op_timeout: bound on one KV read or write.
    """

    ttl: float
    guard: float
    clock_drift: float
    poll_interval: float
    renew_interval: float
    op_timeout: float

    @property
    def lease_span(self) -> float:
        """How long after *sending* a successful write its writer may publish."""
        return self.ttl * (1 - 2 * self.clock_drift) - self.guard


class LeaseElection:
    """One pulse's view of the lease: a pure state machine on the caller's monotonic clock.

    The I/O layer reports what it read (:meth:`observe`) and how each write went
    (:meth:`prepare_write`, then :meth:`write_succeeded` / :meth:`write_conflicted` /
    :meth:`write_unknown`), and asks :meth:`may_publish` before every beat and
    :meth:`may_acquire` before trying to take over.

    Rules:

    * A follower may take over when the key does not exist, when the latest revision is a record
      that was released or written by this very instance, or when it has seen the *same*
      revision for at least ``max(own ttl, record.ttl)`` (timed from the first read that
      returned it, measured when the answer arrived).
    * A writer's lease runs from the moment it *sent* a write that then succeeded, for
      ``ttl * (1 - 2 * clock_drift) - guard``; it may publish only inside it.
    * A read showing someone else's record ends leadership at once. A lost compare-and-set
      stops publishing at once and asks for a read, which decides: someone else's record ends
      leadership; a revision that is no lease record (anything a publisher made JetStream store
      on the key, a delete marker) is nobody's claim, so the leader keeps its lease and its
      next write overwrites that revision. An unknown outcome (timeout) keeps the lease from the
      last confirmed write and asks for a read; a read showing this instance's unconfirmed write
      confirms it (with its send time).
    * A revision that is no lease record leaves :attr:`record` (and with it the schedule a
      successor continues) as the last record seen: it is waited out like any other revision,
      but it never stands for a vacancy.

    Args:
        pulse_id: this pulse's id.
        timings: the lease's timing parameters.
        instance: this process's random id (generated when None).
    """

    def __init__(
        self, pulse_id: str, timings: LeaseTimings, *, instance: str | None = None
    ) -> None:
        self.pulse_id = validate_id("pulse_id", pulse_id)
        self.timings = timings
        self.instance = instance or secrets.token_hex(8)
        self.role: Role = "follower"
        self.known = False
        self.revision: int | None = None
        #: the latest lease record seen; a later revision that is no record leaves it in place
        self.record: LeaseRecord | None = None
        #: the latest revision holds no lease record (see :meth:`observe`)
        self.unclaimed = False
        #: a compare-and-set lost and no read has shown yet who wrote: no publishing until then
        self.contested = False
        self.seen_at = -math.inf
        self.needs_read = True
        self.valid_until = -math.inf
        self.last_confirmed_send = -math.inf
        self.terms = 0
        self.lost_reason = ""
        self._seq = 0
        self._inflight: dict[int, float] = {}

    def __repr__(self) -> str:
        holder = self.record.holder if self.record is not None else None
        return (
            f"<LeaseElection {self.pulse_id}/{self.instance} {self.role} rev={self.revision} "
            f"holder={holder} valid_until={self.valid_until:.3f}>"
        )

    # -- reading ----------------------------------------------------------------------------------
    @property
    def holder(self) -> str | None:
        """The pulse id in the latest record seen (None: no record)."""
        return self.record.holder if self.record is not None else None

    def _wait_for(self, record: LeaseRecord | None) -> float:
        ttl = self.timings.ttl
        return max(ttl, record.ttl) if record is not None else ttl

    def expires_at(self) -> float:
        """When a follower may take over the lease it last saw (-inf: now; +inf: never known)."""
        if not self.known:
            return math.inf
        record = self.record
        if self.revision is None or (
            not self.unclaimed
            and record is not None
            and (record.released or record.instance == self.instance)
        ):
            return -math.inf
        # Junk on top of a record may hide a newer record the reads missed: the shortcuts above
        # no longer apply, and the wait runs from the first sight of the junk revision.
        return self.seen_at + self._wait_for(record)

    def may_acquire(self, now: float) -> bool:
        """True when a follower may try to take over (the CAS still decides)."""
        return self.role == "follower" and self.known and now >= self.expires_at()

    def may_publish(self, now: float) -> bool:
        """True while this pulse leads and its lease, renewed in time, still runs."""
        return self.role == "leader" and not self.contested and now < self.valid_until

    def expected_last(self) -> int:
        """The revision the next write must find (0: the key must not exist)."""
        return self.revision or 0

    # -- inputs ---------------------------------------------------------------------------------
    def observe(self, revision: int | None, record: LeaseRecord | None, now: float) -> None:
        """A read answered at ``now``: ``revision`` (None: no key) holding ``record``.

        ``record`` is None for a delete marker or a value that is no lease record. Such a
        revision is nobody's claim: a follower waits it out like any other revision but keeps
        the last record it saw (the schedule a successor continues); a leader keeps its lease,
        and its next write (a compare-and-set on that revision) overwrites it.
        """
        self.needs_read = False
        if not self.known or revision != self.revision:
            if (
                self.known
                and self.revision is not None
                and revision is not None
                and revision < self.revision
            ):
                return  # an older answer overtaken by what we already know
            self.known = True
            self.revision, self.seen_at = revision, now
            self.unclaimed = record is None
            if record is not None:
                self.record = record
        if self.role != "leader":
            return
        if revision is None:
            self._lose(now, "the lease key is gone")
        elif record is None:
            self.contested = False  # nobody's claim: the next write overwrites it
        elif record.instance == self.instance:
            self.contested = False
            sent = self._inflight.get(record.seq)
            if sent is not None:
                self._confirm(record.seq, revision, record, sent)
        else:
            self._lose(now, f"the lease is held by {record.holder}")

    def prepare_write(self, now: float) -> tuple[int, int]:
        """Register a write sent at ``now``.

        Returns:
            ``(seq, last)``: the record's ``seq`` and the revision the CAS must find.
        """
        self._seq += 1
        self._inflight[self._seq] = now
        if len(self._inflight) > _INFLIGHT_KEPT:
            del self._inflight[min(self._inflight)]
        return self._seq, self.expected_last()

    def write_succeeded(self, seq: int, revision: int, record: LeaseRecord, now: float) -> None:
        """The CAS write ``seq`` was stored at ``revision``; this pulse leads.

        A write this election no longer tracks (it stepped down meanwhile) is not trusted: its
        send time is unknown, so it asks for a read instead (its own record then lets it take
        over again at once).
        """
        sent = self._inflight.get(seq)
        if sent is None:
            self.needs_read = True
            return
        self._confirm(seq, revision, record, sent)
        if self.revision == revision:
            self.seen_at = now

    def write_conflicted(self, now: float) -> None:
        """The CAS lost: a newer revision exists. A leader stops publishing until a read shows
        whose it is (:meth:`observe`: someone else's record ends leadership); re-read."""
        self.needs_read = True
        if self.role == "leader":
            self.contested = True

    def write_unknown(self, now: float) -> None:
        """The write's outcome is unknown (timeout, connection lost): re-read before writing."""
        self.needs_read = True

    def check(self, now: float) -> bool:
        """Step down when the lease ran out without a confirmed renewal; True while leading."""
        if self.role == "leader" and now >= self.valid_until:
            self._lose(now, "the lease ran out before a renewal was confirmed")
        return self.role == "leader"

    def step_down(self, now: float, reason: str = "stepped down") -> None:
        """Stop leading now (before releasing the lease)."""
        if self.role == "leader":
            self._lose(now, reason)

    # -- internals --------------------------------------------------------------------------------
    def _confirm(self, seq: int, revision: int, record: LeaseRecord, sent: float) -> None:
        if self.revision is not None and revision < self.revision:
            return  # an old write of ours; a newer revision is already known
        if self.role != "leader":
            self.role = "leader"
            self.terms += 1
            self.lost_reason = ""
        self.known = True
        self.revision, self.record = revision, record
        self.unclaimed = self.contested = False
        self.needs_read = False
        self.valid_until = max(self.valid_until, sent + self.timings.lease_span)
        self.last_confirmed_send = max(self.last_confirmed_send, sent)
        for old in [s for s in self._inflight if s <= seq]:
            del self._inflight[old]

    def _lose(self, now: float, reason: str) -> None:
        self.role = "follower"
        self.contested = False
        self.valid_until = -math.inf
        self.last_confirmed_send = -math.inf
        self.lost_reason = reason
        self.needs_read = True
        self._inflight.clear()
        # Conservative: a revision we wrote ourselves is timed from now if we ever wait it out.
        self.seen_at = max(self.seen_at, now)


# --- keeping a follower's watch of the key fresh ----------------------------------------------
class WatchFreshness:
    """Whether a follower's watch of the lease key keeps up with the key: a pure state machine
    on the caller's monotonic clock.

    A watch can die silently (its JetStream consumer lived on a server that went away; nats-py
    notices only after missed idle heartbeats, many seconds later). The follower learns of it
    two ways:

    * **quiet**: a leader writes at least every ``renew_interval``, so a watch that delivered
      nothing for ``renew_interval + poll_interval`` is asked about with a read
      (:meth:`quiet_at`);
    * **behind**: a read shows a revision the watch has not delivered. Still not delivered a
      ``poll_interval`` later (so not merely in flight), the watch *lags*: the follower polls
      every ``poll_interval`` and reopens the watch (:meth:`may_reopen`), at most once per
      ``max(ttl, poll_interval)`` while it keeps lagging -- but a poll after an attempt that
      timed out (:meth:`reopen_timed_out`: a cluster places the new consumer on any server of
      the stream, the dead one too until it noticed, and such a request never answers; the
      next attempt is likely placed elsewhere). A delivery of that revision or a newer one (a
      reopened watch delivers the key's latest revision first) ends the lag.

    Args:
        timings: the lease's timing parameters.
    """

    def __init__(self, timings: LeaseTimings) -> None:
        self.timings = timings
        #: the highest revision the current watch delivered (0: none yet)
        self.delivered = 0
        #: a revision a read showed that the watch had not delivered, and when
        self.behind: int | None = None
        self.behind_since = -math.inf
        self.lagging = False
        self.last_news = -math.inf
        self.reopen_at = -math.inf

    def __repr__(self) -> str:
        return (
            f"<WatchFreshness delivered={self.delivered} behind={self.behind} "
            f"lagging={self.lagging}>"
        )

    def opened(self, now: float) -> None:
        """A new watch replaces the old one (which may have delivered more)."""
        self.delivered = 0
        self.last_news = now

    def delivered_entry(self, revision: int, now: float) -> None:
        """The watch delivered ``revision``."""
        self.delivered = max(self.delivered, revision)
        self.last_news = now
        if self.behind is not None and revision >= self.behind:
            self.behind = None
            self.lagging = False

    def read(self, revision: int | None, now: float) -> None:
        """A read answered: the key's revision as the follower now knows it (None: no key)."""
        self.last_news = now
        if self.behind is None and revision is not None and revision > self.delivered:
            self.behind, self.behind_since = revision, now

    def check(self, now: float) -> bool:
        """True once, when the watch has been behind for longer than a poll: it lags."""
        if self.behind is None or self.lagging:
            return False
        if now < self.behind_since + self.timings.poll_interval:
            return False
        self.lagging = True
        return True

    def quiet_at(self) -> float:
        """When the watch's silence asks for a read (+inf while lagging: the follower polls)."""
        if self.lagging:
            return math.inf
        return self.last_news + self.timings.renew_interval + self.timings.poll_interval

    def may_reopen(self, now: float) -> bool:
        """True when a lagging watch is due to be reopened; counts as an attempt."""
        if not self.lagging or now < self.reopen_at:
            return False
        self.reopen_at = now + max(self.timings.ttl, self.timings.poll_interval)
        return True

    def reopen_timed_out(self, now: float) -> None:
        """The reopen attempt got no answer: try again a poll from now."""
        self.reopen_at = min(self.reopen_at, now + self.timings.poll_interval)

    def wake_at(self) -> float:
        """The next time :meth:`check`, :meth:`quiet_at` or :meth:`may_reopen` changes."""
        if self.lagging:
            return self.reopen_at
        if self.behind is not None:
            return min(self.behind_since + self.timings.poll_interval, self.quiet_at())
        return self.quiet_at()
