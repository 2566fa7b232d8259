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
* :func:`run_local_cluster` starts a local 3-node NATS cluster with HA pulses and reports every
  leadership change, so a user can watch a failover (``backbeat-trio cluster``).

Why two leaders can never publish the same beat index, and why they never publish at the same
time (given bounded clock-rate error and bounded pauses), is argued in ``docs/scale.md``. In
short: a beat is published only after a CAS write recording it succeeded, a successor continues
from the latest write, and a successor's takeover timer starts when it *observed* a revision --
which is after that revision's writer *sent* it, the moment the writer's own validity counts from.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import itertools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import msgspec
import trio

from ._beats import (
    bar_subject,
    beat_subject,
    tempo_subject,
    validate_id,
)
from ._config import Config
from ._embedded import NatsCluster, open_embedded_nats_cluster
from ._errors import BackbeatError, ConfigError, NotConnected, WireError
from ._hlc import HLC, HLCStamp, node_id_for
from ._kv import KV_OPERATION_HEADER, kv_ensure_bucket, kv_read, kv_stream, kv_subject, kv_write
from ._pulse import PulseConfig, PulseStatus, make_beat_frame, tempo_listener
from ._schedule import PulseSchedule, ScheduledBeat
from ._transport import (
    MemoryMessage,
    Message,
    NatsTransport,
    Subscription,
    Transport,
    nats_transport_of,
    open_nats_transport,
)
from ._wire import BarReport, BeatFrame, decode

if TYPE_CHECKING:
    from ._reverb import ReverbConfig, ReverbStatus

__all__ = [
    "LEASE_KEY",
    "REVERB_LEASE_KEY",
    "HAPulseConfig",
    "HAPulseStatus",
    "LeadershipChange",
    "LeaseElection",
    "LeaseRecord",
    "LeaseStatus",
    "LeaseStore",
    "LeaseTimings",
    "LocalCluster",
    "MemoryLeaseStore",
    "NatsLeaseStore",
    "ScheduleSnapshot",
    "decode_lease",
    "encode_lease",
    "ensure_lease_store",
    "lease_bucket_name",
    "run_ha_pulse",
    "run_local_cluster",
]

log = logging.getLogger("backbeat_trio.ha")

LEASE_KEY: Final = "pulse-lease"
#: The HA reverbs' lease, in the same bucket as the pulses'.
REVERB_LEASE_KEY: Final = "reverb-lease"
RECORD_VERSION: Final = 1
_INFLIGHT_KEPT: Final = 16
_CHANGES_KEPT: Final = 256
#: Lease revisions a watch may hold before the oldest unread ones are dropped (a follower reads
#: them as they come; the sparse reads catch anything dropped).
_WATCH_BUFFER: Final = 256

Role = Literal["follower", "leader"]
WriteOutcome = Literal["ok", "conflict", "unknown"]


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
_record_decoder: Final = msgspec.json.Decoder(LeaseRecord)


def encode_lease(record: LeaseRecord) -> bytes:
    """The lease value's bytes."""
    return _record_encoder.encode(record)


def decode_lease(data: bytes | None) -> LeaseRecord | None:
    """Decode a lease value.

    Returns:
        The record; None for a delete marker, bytes that are not a lease record, or a record whose
        schedule breaks a rule (such a revision is waited out like any other).
    """
    if data is None:
        return None
    try:
        record = _record_decoder.decode(data)
    except msgspec.DecodeError:
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

    * A follower may take over when the key does not exist, when the latest record was released
      or written by this very instance, or when it has seen the *same* revision for at least
      ``max(own ttl, record.ttl)`` (timed from the first read that returned it, measured when the
      answer arrived).
    * A writer's lease runs from the moment it *sent* a write that then succeeded, for
      ``ttl * (1 - 2 * clock_drift) - guard``; it may publish only inside it.
    * A lost compare-and-set, or a read showing someone else's record, ends leadership at once.
      An unknown outcome (timeout) keeps the lease from the last confirmed write and asks for a
      read; a read showing this instance's unconfirmed write confirms it (with its send time).

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
        self.record: LeaseRecord | None = None
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
            record is not None and (record.released or record.instance == self.instance)
        ):
            return -math.inf
        return self.seen_at + self._wait_for(record)

    def may_acquire(self, now: float) -> bool:
        """True when a follower may try to take over (the CAS still decides)."""
        return self.role == "follower" and self.known and now >= self.expires_at()

    def may_publish(self, now: float) -> bool:
        """True while this pulse leads and its lease, renewed in time, still runs."""
        return self.role == "leader" and now < self.valid_until

    def expected_last(self) -> int:
        """The revision the next write must find (0: the key must not exist)."""
        return self.revision or 0

    # -- inputs ---------------------------------------------------------------------------------
    def observe(self, revision: int | None, record: LeaseRecord | None, now: float) -> None:
        """A read answered at ``now``: ``revision`` (None: no key) holding ``record``.

        ``record`` is None for a delete marker or an unreadable value; such a revision is waited
        out like any other.
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
            self.revision, self.record, self.seen_at = revision, record, now
        if self.role != "leader":
            return
        if record is not None and revision is not None and record.instance == self.instance:
            sent = self._inflight.get(record.seq)
            if sent is not None:
                self._confirm(record.seq, revision, record, sent)
        else:
            self._lose(now, f"the lease is held by {record.holder if record else 'nobody'}")

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
        """The CAS lost: someone else wrote first. Leadership (if any) ends; re-read."""
        self.needs_read = True
        if self.role == "leader":
            self._lose(now, "a compare-and-set lost: another pulse wrote the lease")

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
        self.needs_read = False
        self.valid_until = max(self.valid_until, sent + self.timings.lease_span)
        self.last_confirmed_send = max(self.last_confirmed_send, sent)
        for old in [s for s in self._inflight if s <= seq]:
            del self._inflight[old]

    def _lose(self, now: float, reason: str) -> None:
        self.role = "follower"
        self.valid_until = -math.inf
        self.last_confirmed_send = -math.inf
        self.lost_reason = reason
        self.needs_read = True
        self._inflight.clear()
        # Conservative: a revision we wrote ourselves is timed from now if we ever wait it out.
        self.seen_at = max(self.seen_at, now)


# --- lease stores ---------------------------------------------------------------------------------
class LeaseStore(Protocol):
    """Where the lease lives: one key with compare-and-set writes.

    ``read``/``write`` raise :class:`BackbeatError` when the outcome is unknown; a lost CAS is the
    definite answer None from ``write``.
    """

    async def ensure(self) -> None:
        """Create the bucket if it is missing."""
        ...

    async def read(self) -> tuple[int, bytes | None] | None:
        """``None`` (no key), or ``(revision, value)``; value None for a delete marker."""
        ...

    async def write(self, value: bytes, *, last: int) -> int | None:
        """Store ``value`` if the latest revision is ``last`` (0: no key); the new revision."""
        ...

    async def watch(self) -> Subscription:
        """A subscription to the key's stored revisions, the latest first (see :meth:`entry`).

        Optional: a store without ``watch``/``entry`` is polled every ``poll_interval``.
        """
        ...

    def entry(self, msg: Message) -> tuple[int, bytes | None]:
        """``(revision, value)`` of a message from :meth:`watch`; value None for a delete."""
        ...


class NatsLeaseStore:
    """The lease in a JetStream KV bucket, through :meth:`NatsTransport.call`.

    Args:
        transport: an open NATS transport.
        cluster_id: the cluster (the bucket is :func:`lease_bucket_name`).
        replicas: wanted replica count of the bucket (falls back to 1 on a single server).
        op_timeout: seconds for each JetStream request.
        key: the key name.
    """

    def __init__(
        self,
        transport: NatsTransport,
        cluster_id: str,
        *,
        replicas: int = 3,
        op_timeout: float = 2.0,
        key: str = LEASE_KEY,
    ) -> None:
        self.transport = transport
        self.bucket = lease_bucket_name(cluster_id)
        self.key = key
        self.replicas = replicas
        self.op_timeout = op_timeout

    def __repr__(self) -> str:
        return f"<NatsLeaseStore {self.bucket}/{self.key} replicas={self.replicas}>"

    async def ensure(self) -> None:
        """Create the bucket (history 1) unless it exists; records the replica count in use."""
        self.replicas = int(
            await self.transport.call(
                kv_ensure_bucket,
                self.bucket,
                replicas=self.replicas,
                history=1,
                description="BACKBEAT pulse lease",
                op_timeout=max(self.op_timeout, 2.0),
            )
        )

    async def read(self) -> tuple[int, bytes | None] | None:
        """The key's latest revision and value, read from the stream leader."""
        got = await self.transport.call(kv_read, self.bucket, self.key, op_timeout=self.op_timeout)
        if got is None:
            return None
        revision, value = got
        return int(revision), value

    async def write(self, value: bytes, *, last: int) -> int | None:
        """Compare-and-set write."""
        got = await self.transport.call(
            kv_write, self.bucket, self.key, value, last=last, op_timeout=self.op_timeout
        )
        return None if got is None else int(got)

    async def watch(self) -> Subscription:
        """An ordered JetStream consumer on the key: its latest revision, then every new one.

        Only *stored* writes arrive (a lost compare-and-set never does), each with its revision.
        """
        return await self.transport.stream_subscribe(
            kv_subject(self.bucket, self.key),
            kv_stream(self.bucket),
            buffer=_WATCH_BUFFER,
            deliver="last_per_subject",
        )

    def entry(self, msg: Message) -> tuple[int, bytes | None]:
        """The revision (stream sequence) and value of a watched message."""
        revision = int(msg.metadata.sequence.stream)  # type: ignore[attr-defined]
        if (msg.headers or {}).get(KV_OPERATION_HEADER) in ("DEL", "PURGE"):
            return revision, None
        return revision, bytes(msg.data)


class MemoryLeaseStore:
    """A pure-trio lease store for deterministic tests (shared by every pulse of a test).

    ``latency`` delays every call (each way); :meth:`handle` gives one pulse its own view that a
    test can cut off (``partitioned = True``: calls hang until the caller's bound).
    """

    def __init__(self, *, latency: float = 0.0) -> None:
        self.latency = latency
        self.revision = 0
        self.value: bytes | None = None
        self.key_revision: int | None = None
        self.writes = 0
        self.conflicts = 0
        self.partitioned = False
        self._watchers: list[tuple[MemoryLeaseStore, Subscription]] = []

    def __repr__(self) -> str:
        return f"<MemoryLeaseStore rev={self.key_revision} writes={self.writes}>"

    def handle(self) -> MemoryLeaseStore:
        """A view of this store with its own ``partitioned`` and ``latency`` switches."""
        return _MemoryLeaseHandle(self)

    async def _delay(self) -> None:
        if self.partitioned:
            await trio.sleep_forever()
        if self.latency:
            await trio.sleep(self.latency)
        else:
            await trio.lowlevel.checkpoint()

    async def ensure(self) -> None:
        """Nothing to create."""
        await self._delay()

    async def read(self) -> tuple[int, bytes | None] | None:
        """The current revision and value."""
        await self._delay()
        result = self._read_now()
        await self._delay()
        return result

    async def write(self, value: bytes, *, last: int) -> int | None:
        """Compare-and-set."""
        await self._delay()
        result = self._write_now(value, last)
        await self._delay()
        return result

    async def watch(self) -> Subscription:
        """The current revision (if any), then every stored write, while not partitioned."""
        await self._delay()
        return self._watch_now(self)

    def entry(self, msg: Message) -> tuple[int, bytes | None]:
        """``(revision, value)`` of a watched message."""
        return int((msg.headers or {})["Revision"]), msg.data

    def _watch_now(self, view: MemoryLeaseStore) -> Subscription:
        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._watchers.remove((view, sub))

        sub = Subscription(LEASE_KEY, _WATCH_BUFFER, unsubscribe)
        self._watchers.append((view, sub))
        if self.key_revision is not None:
            sub._deliver(self._entry_message(self.key_revision, self.value))
        return sub

    @staticmethod
    def _entry_message(revision: int, value: bytes | None) -> MemoryMessage:
        return MemoryMessage(LEASE_KEY, value or b"", headers={"Revision": str(revision)})

    def _read_now(self) -> tuple[int, bytes | None] | None:
        return None if self.key_revision is None else (self.key_revision, self.value)

    def _write_now(self, value: bytes, last: int) -> int | None:
        if (self.key_revision or 0) != last:
            self.conflicts += 1
            return None
        self.revision += 1
        self.writes += 1
        self.key_revision, self.value = self.revision, bytes(value)
        for view, sub in self._watchers:
            if not view.partitioned:
                sub._deliver(self._entry_message(self.revision, self.value))
        return self.revision


class _MemoryLeaseHandle(MemoryLeaseStore):
    def __init__(self, backend: MemoryLeaseStore) -> None:
        super().__init__(latency=backend.latency)
        self._backend = backend

    def __repr__(self) -> str:
        return f"<MemoryLeaseStore view partitioned={self.partitioned} of {self._backend!r}>"

    # the view's own delays (and partition), the shared backend's state
    def _read_now(self) -> tuple[int, bytes | None] | None:
        return self._backend._read_now()

    def _write_now(self, value: bytes, last: int) -> int | None:
        return self._backend._write_now(value, last)

    def _watch_now(self, view: MemoryLeaseStore) -> Subscription:
        return self._backend._watch_now(view)


# --- configuration and status ---------------------------------------------------------------------
def _finite_positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(name, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class HAPulseConfig:
    """Settings of one HA pulse instance (several run per cluster; one leads).

    Args:
        cluster_id: the cluster it beats for.
        nats_url: NATS URL(s); give every cluster member so the pulse fails over.
        tempo_bpm: tempo of a *fresh* cluster (a successor continues the recorded tempo).
        beats_per_bar: bar length of a fresh cluster (a successor keeps the recorded one).
        start_index: first beat index of a fresh cluster.
        pulse_id: this instance's id; unique per cluster (HLC node, connection name).
        max_tempo_step: largest relative tempo step accepted without ``force``.
        allow_forced_tempo: honour ``force`` in a TempoChange's reason.
        token, user, password, tls_ca_file: NATS authentication.
        lease_ttl: lease TTL in seconds; default two beats plus ``jitter_tolerance``.
        jitter_tolerance: the guard: the old leader stops this long before a successor can start.
        clock_drift: bound on the relative rate error of two pulses' monotonic clocks.
        poll_interval: follower read period and the leader's claim lead; default
            ``min(beat / 4, ttl / 8)``, at least 20 ms.
        op_timeout: bound on one KV request; default ``min(ttl / 3, 2 s)``, at least 0.1 s.
        lease_replicas: replica count of the lease bucket (1 on a single server).
        release_on_exit: a leader that is stopped releases the lease (fast hand-over); False
            makes stopping look like a crash (tests, demos).
        lead: seconds from start-up to the first beat of a fresh cluster.
    """

    cluster_id: str
    nats_url: str | tuple[str, ...] | list[str] = "nats://127.0.0.1:4222"
    tempo_bpm: int = 60
    beats_per_bar: int = 4
    start_index: int = 0
    pulse_id: str = "pulse-1"
    max_tempo_step: float | None = 0.10
    allow_forced_tempo: bool = False
    token: str | None = None
    user: str | None = None
    password: str | None = None
    tls_ca_file: str | None = None
    lease_ttl: float | None = None
    jitter_tolerance: float = 0.050
    clock_drift: float = 1e-3
    poll_interval: float | None = None
    op_timeout: float | None = None
    lease_replicas: int = 3
    release_on_exit: bool = True
    lead: float = 0.0

    def __post_init__(self) -> None:
        # the fields it shares with PulseConfig (ids, tempo, bar, start index, URL, credentials)
        # are checked by building that PulseConfig
        self.pulse_config()
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

    def connection_config(self) -> Config:
        """The client-level connection settings (a single pulse's, under another name)."""
        return (
            self.pulse_config()
            .connection_config()
            .replace(name=f"backbeat-ha-pulse:{self.pulse_id}")
        )

    def pulse_config(self) -> PulseConfig:
        """The equivalent single-pulse settings (the tempo handling is :func:`run_pulse`'s)."""
        return PulseConfig(
            cluster_id=self.cluster_id,
            nats_url=self.nats_url,
            tempo_bpm=self.tempo_bpm,
            beats_per_bar=self.beats_per_bar,
            start_index=self.start_index,
            pulse_id=self.pulse_id,
            max_tempo_step=self.max_tempo_step,
            allow_forced_tempo=self.allow_forced_tempo,
            token=self.token,
            user=self.user,
            password=self.password,
            tls_ca_file=self.tls_ca_file,
        )


@dataclass(frozen=True, slots=True)
class LeadershipChange:
    """One role change of one pulse.

    Attributes:
        at: local monotonic time (``trio.current_time()``).
        wall: wall clock, POSIX seconds.
        pulse_id: the pulse whose role changed.
        role: its new role.
        holder: the lease holder it knew of afterwards.
        next_beat: the next beat index the schedule hands out (leaders), else None.
        reason: why (takeover, released, lost CAS, lease ran out...).
    """

    at: float
    wall: float
    pulse_id: str
    role: Role
    holder: str | None
    next_beat: int | None
    reason: str


@dataclass(kw_only=True)
class LeaseStatus:
    """One lease holder's live view of the election (an HA pulse's or an HA reverb's).

    Attributes:
        owner_id: the instance's id (a pulse id, a reverb id).
        instance: its process's random id (a restarted instance is a new one).
        timings: the lease's timing parameters.
        role: ``"leader"`` or ``"follower"``.
        holder: the holder named in the latest record seen.
        lease_revision: the latest revision of the key seen.
        terms: how many times this instance became leader.
        kv_reads, kv_writes, kv_conflicts, kv_errors: KV requests made, CAS writes stored, CAS
            writes lost, requests failed or timed out.
        kv_watched: revisions that arrived through the watch (no read needed).
        watching: the key is watched (else it is polled every ``poll_interval``).
        changes: the latest role changes, oldest first.
    """

    owner_id: str
    instance: str
    timings: LeaseTimings
    role: Role = "follower"
    holder: str | None = None
    lease_revision: int | None = None
    terms: int = 0
    kv_reads: int = 0
    kv_writes: int = 0
    kv_conflicts: int = 0
    kv_errors: int = 0
    kv_watched: int = 0
    watching: bool = False
    last_error: str | None = None
    changes: deque[LeadershipChange] = field(default_factory=lambda: deque(maxlen=_CHANGES_KEPT))
    role_event: trio.Event = field(default_factory=trio.Event)

    def __repr__(self) -> str:
        return (
            f"<LeaseStatus {self.owner_id} {self.role} holder={self.holder} "
            f"rev={self.lease_revision} terms={self.terms}>"
        )

    @property
    def leading(self) -> bool:
        """True while this instance leads."""
        return self.role == "leader"

    async def wait_for_role(self, role: Role) -> None:
        """Return once this instance has ``role`` (bounded by the caller's cancel scope)."""
        while self.role != role:
            await self.role_event.wait()


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


# --- the I/O loop ---------------------------------------------------------------------------------
class LeaseKeeper:
    """The I/O half of one lease holder: bounded reads and CAS writes, following, release.

    Shared by the HA pulse (which also claims each beat with a write) and the HA reverb (which
    only renews). A follower *watches* the key (an ordered JetStream consumer delivers each
    stored revision as it is written) and reads it only rarely as a safety net; a store that
    cannot watch is polled every ``poll_interval``.

    Args:
        owner_id: the instance's id (the record's ``holder``).
        timings: the lease's timing parameters.
        store: where the lease lives.
        status: the live view this keeper updates.
        election: the sans-IO election core.
        wall_clock: POSIX seconds (for the record's informational times).
    """

    def __init__(
        self,
        owner_id: str,
        timings: LeaseTimings,
        store: LeaseStore,
        status: LeaseStatus,
        election: LeaseElection,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.owner_id = owner_id
        self.t = timings
        self.store = store
        self.status = status
        self.election = election
        self.wall_clock = wall_clock
        self.watch: Subscription | None = None
        self._next_read = -math.inf
        self._last_read = -math.inf  # when the latest successful read was answered
        # a read found a revision the watch had not delivered: poll until the watch shows life
        self._watch_lagging = False

    def __repr__(self) -> str:
        return (
            f"<LeaseKeeper {self.owner_id} {self.election.role} watching={self.watch is not None}>"
        )

    @property
    def read_interval(self) -> float:
        """How often a follower reads the key: the TTL while the watch keeps up, else
        ``poll_interval``."""
        if self.watch is None or self._watch_lagging:
            return self.t.poll_interval
        return max(self.t.ttl, self.t.poll_interval)

    # -- bookkeeping -----------------------------------------------------------------------------
    def sync_status(self, reason: str = "") -> None:
        """Copy the election's state into the status; record a role change."""
        e, st = self.election, self.status
        st.holder = e.holder
        st.lease_revision = e.revision
        st.terms = e.terms
        if e.role != st.role:
            st.role = e.role
            why = reason or e.lost_reason
            record = e.record
            nxt = None
            if e.role == "leader" and record is not None and record.schedule is not None:
                nxt = record.schedule.beat_index
            st.changes.append(
                LeadershipChange(
                    trio.current_time(),
                    self.wall_clock(),
                    self.owner_id,
                    e.role,
                    e.holder,
                    nxt,
                    why,
                )
            )
            log.info("%s is now %s (%s)", self.owner_id, e.role, why)
            event, st.role_event = st.role_event, trio.Event()
            event.set()

    def _kv_error(self, what: str) -> None:
        self.status.kv_errors += 1
        self.status.last_error = what
        log.debug("%s: %s", self.owner_id, what)

    # -- watch -------------------------------------------------------------------------------------
    async def open_watch(self) -> None:
        """Start watching the key; on failure (or a store without ``watch``) keep polling."""
        watch = getattr(self.store, "watch", None)
        if watch is None:
            return
        with trio.move_on_after(self.t.op_timeout + 0.5) as scope:
            try:
                self.watch = await watch()
            except BackbeatError as exc:
                log.warning("%s polls the lease (cannot watch it: %s)", self.owner_id, exc)
        if scope.cancelled_caught:
            log.warning("%s polls the lease (watching it timed out)", self.owner_id)
        self.status.watching = self.watch is not None

    async def close_watch(self) -> None:
        """Stop watching (bounded)."""
        watch, self.watch = self.watch, None
        self.status.watching = False
        if watch is not None:
            with trio.move_on_after(1.0, shield=True):
                await watch.unsubscribe()

    def _observe_entry(self, msg: Message) -> None:
        try:
            revision, value = self.store.entry(msg)
        except Exception as exc:  # not a JetStream message, a malformed reply subject...
            self._kv_error(f"unreadable lease watch message: {exc!r}")
            self.election.needs_read = True
            return
        self.status.kv_watched += 1
        e = self.election
        if not e.known or e.revision is None or revision > e.revision:
            self._watch_lagging = False  # it delivers news again
        e.observe(revision, decode_lease(value), trio.current_time())
        self.sync_status()

    # -- store calls, bounded in time ------------------------------------------------------------
    async def read(self) -> bool:
        """Read the key (bounded); False when the read failed or timed out."""
        got: tuple[int, bytes | None] | None = None
        with trio.move_on_after(self.t.op_timeout + 0.5) as scope:
            try:
                got = await self.store.read()
            except BackbeatError as exc:
                self._kv_error(f"lease read failed: {exc}")
                return False
        if scope.cancelled_caught:
            self._kv_error("lease read timed out")
            return False
        self.status.kv_reads += 1
        now = trio.current_time()
        if got is None:
            self.election.observe(None, None, now)
        else:
            revision, value = got
            record = decode_lease(value)
            if record is None:
                log.warning("%s: lease revision %d is not a lease record", self.owner_id, revision)
            self.election.observe(revision, record, now)
        self.sync_status()
        return True

    def _record(
        self, seq: int, snapshot: ScheduleSnapshot | None, *, released: bool = False
    ) -> LeaseRecord:
        wall = self.wall_clock()
        return LeaseRecord(
            holder=self.owner_id,
            instance=self.election.instance,
            seq=seq,
            ttl=self.t.ttl,
            written_at=wall,
            expires_at=wall if released else wall + self.t.ttl,
            released=released,
            schedule=snapshot,
        )

    async def write(self, snapshot: ScheduleSnapshot | None) -> WriteOutcome:
        """One CAS write of this instance's record (bounded)."""
        e = self.election
        seq, last = e.prepare_write(trio.current_time())
        record = self._record(seq, snapshot)
        revision: int | None = None
        with trio.move_on_after(self.t.op_timeout + 0.5) as scope:
            try:
                revision = await self.store.write(encode_lease(record), last=last)
            except BackbeatError as exc:
                self._kv_error(f"lease write failed: {exc}")
                e.write_unknown(trio.current_time())
                return "unknown"
        if scope.cancelled_caught:
            self._kv_error("lease write timed out")
            e.write_unknown(trio.current_time())
            return "unknown"
        if revision is None:
            self.status.kv_conflicts += 1
            e.write_conflicted(trio.current_time())
            self.sync_status()
            return "conflict"
        self.status.kv_writes += 1
        e.write_succeeded(seq, revision, record, trio.current_time())
        self.sync_status("took over the lease" if e.terms > self.status.terms else "")
        return "ok"

    # -- roles -----------------------------------------------------------------------------------
    async def follow(self, acquisition_snapshot: Callable[[], ScheduleSnapshot | None]) -> None:
        """Follow until this instance acquired the lease (a CAS write succeeded)."""
        e = self.election
        if self.watch is not None:
            # what arrived while leading is our own writes: stale now (the read below is newer)
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                while True:
                    self.watch.messages.receive_nowait()
            e.needs_read = True
        while True:
            now = trio.current_time()
            # Watching, a takeover is decided on what the watch delivered; one read confirms
            # it first (a watch that died silently would otherwise make the CAS fail, costing a
            # TTL). Not for an immediate takeover (released, our own record, no key).
            confirm = self.watch is not None and self._last_read < e.expires_at() <= now
            if e.needs_read or now >= self._next_read or confirm:
                known = e.revision if e.known else None
                ok = await self.read()
                if not ok:
                    self._next_read = trio.current_time() + self.read_interval
                    await trio.sleep(self.t.poll_interval)
                    continue
                if self.watch is not None and known is not None and e.revision != known:
                    # the watch had not delivered this revision (it lags, or died silently):
                    # poll, so a crash of the leader is still seen within a poll
                    self._watch_lagging = True
                now = self._last_read = trio.current_time()
                self._next_read = now + self.read_interval
            if e.may_acquire(now):
                if await self.write(acquisition_snapshot()) == "ok":
                    return
                continue  # lost the race or unknown: needs_read is set
            wake = max(min(self._next_read, e.expires_at()), now)
            if self.watch is None:
                await trio.sleep_until(wake)
                continue
            with trio.move_on_at(wake):
                try:
                    msg = await self.watch.messages.receive()
                except trio.EndOfChannel:  # the store closed its watch: poll from now on
                    log.warning("%s: the lease watch ended; polling instead", self.owner_id)
                    self.watch = None
                    self.status.watching = False
                    self._next_read = trio.current_time()
                    continue
                self._observe_entry(msg)

    async def renew_while_leading(self) -> None:
        """Lead without a schedule: renew every ``renew_interval``; return when leadership ends."""
        e, t = self.election, self.t
        while True:
            now = trio.current_time()
            if not e.check(now):
                self.sync_status()
                return
            if e.needs_read:
                if await self.read():
                    if e.role != "leader":
                        return
                    continue
                await trio.sleep(min(t.poll_interval, max(0.0, e.valid_until - now)))
                continue
            renew_at = e.last_confirmed_send + t.renew_interval
            if now < min(renew_at, e.valid_until):
                await trio.sleep_until(min(renew_at, e.valid_until))
                continue
            if await self.write(None) == "conflict":
                return

    async def release(self, snapshot: ScheduleSnapshot | None) -> None:
        """Stop leading, then mark the lease released so a follower takes over at once."""
        e = self.election
        if e.role != "leader":
            return
        e.step_down(trio.current_time(), "released the lease")
        self.sync_status()
        seq, last = e.prepare_write(trio.current_time())
        record = self._record(seq, snapshot, released=True)
        try:
            revision = await self.store.write(encode_lease(record), last=last)
        except BackbeatError as exc:
            self._kv_error(f"lease release failed: {exc}")
            return
        log.info(
            "%s released the lease%s",
            self.owner_id,
            "" if revision is not None else " (too late: another instance wrote it first)",
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
        self.to_wall = 0.0
        self.status = HAPulseStatus(
            owner_id=cfg.pulse_id,
            instance=self.election.instance,
            timings=self.t,
            cluster_id=cfg.cluster_id,
            pulse_id=cfg.pulse_id,
            pulse=PulseStatus(cfg.cluster_id, cfg.tempo_bpm, cfg.beats_per_bar),
        )
        self.lease = LeaseKeeper(
            cfg.pulse_id, self.t, store, self.status, self.election, wall_clock
        )

    # -- schedule ---------------------------------------------------------------------------------
    def _acquisition_snapshot(self) -> ScheduleSnapshot:
        e, cfg = self.election, self.cfg
        if e.record is not None and e.record.schedule is not None:
            return e.record.schedule
        if e.revision is not None:
            log.warning(
                "%s: the lease at revision %d holds no schedule; starting again at beat %d "
                "(beat indices may repeat)",
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
        self.to_wall = wall - now
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
        st.published += 1
        st.last_beat = beat.beat_index
        st.tempo_bpm = beat.tempo_bpm

    async def release(self) -> None:
        """Stop leading, then mark the lease released so a follower takes over at once."""
        if self.schedule is not None:
            await self.lease.release(ScheduleSnapshot.of(self.schedule, self.to_wall))

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
        store: the lease store; by default the JetStream KV bucket on ``transport`` (which must
            then be a :class:`NatsTransport`).
        wall_clock: POSIX seconds (tests on MockClock pass a virtual one).
        task_status: ``nursery.start`` gets a live :class:`HAPulseStatus` once the lease bucket
            exists (it may be a follower then).

    Raises:
        NotConnected: the first connect failed.
        ConfigError: no store given and the transport is not a NATS transport.
        BackbeatError: the lease bucket could not be created.
    """
    async with contextlib.AsyncExitStack() as stack:
        owned = transport is None
        if transport is None:
            transport = await stack.enter_async_context(
                open_nats_transport(cfg.connection_config())
            )
        if store is None:
            nats = nats_transport_of(transport)
            if nats is None:
                raise ConfigError("store", "a lease store is required with a non-NATS transport")
            store = NatsLeaseStore(
                nats,
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
                task_status.started(pulse.status)
                await pulse.run()
        finally:
            if cfg.release_on_exit and pulse.election.role == "leader":
                with trio.move_on_after(pulse.t.op_timeout + 0.5, shield=True):
                    await pulse.release()
            await pulse.lease.close_watch()


async def ensure_lease_store(store: LeaseStore, op_timeout: float, attempts: int = 10) -> None:
    """Create the lease bucket, retrying while JetStream is still electing (bounded)."""
    # JetStream may still be electing a meta leader right after a cluster starts.
    last: BackbeatError | None = None
    for attempt in range(attempts):
        if attempt:
            await trio.sleep(min(2.0, 0.1 * 2**attempt))
        try:
            with trio.fail_after(max(op_timeout, 2.0) + 1.0):
                await store.ensure()
            return
        except BackbeatError as exc:
            last = exc
        except trio.TooSlowError:
            last = BackbeatError("creating the lease bucket timed out")
    assert last is not None
    raise BackbeatError(f"cannot create the lease bucket: {last}") from last


# --- a local cluster to watch a failover ----------------------------------------------------------
@dataclass
class LocalCluster:
    """What :func:`run_local_cluster` hands to ``nursery.start``: servers, pulses and reverbs."""

    cluster_id: str
    nats: NatsCluster
    pulses: dict[str, HAPulseStatus] = field(default_factory=dict)
    reverbs: dict[str, ReverbStatus] = field(default_factory=dict)
    scopes: dict[str, trio.CancelScope] = field(default_factory=dict)
    failovers: int = 0
    lines: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"<LocalCluster {self.cluster_id} servers={len(self.nats.urls)} "
            f"pulse leader={self.leader()} reverb publishing={self.reverb_leader()} "
            f"failovers={self.failovers}>"
        )

    @property
    def urls(self) -> list[str]:
        """Every server's client URL."""
        return self.nats.urls

    def leader(self) -> str | None:
        """The pulse currently leading, if any."""
        for pulse_id, status in self.pulses.items():
            if status.leading:
                return pulse_id
        return None

    def reverb_leader(self) -> str | None:
        """The reverb currently publishing, if any."""
        for reverb_id, status in self.reverbs.items():
            if status.lease is not None and status.lease.leading:
                return reverb_id
        return None

    def crash(self, instance_id: str) -> None:
        """Stop a pulse or reverb without releasing its lease, as a crash would (it restarts)."""
        scope = self.scopes.get(instance_id)
        if scope is not None:
            scope.cancel()


async def run_local_cluster(
    *,
    pulses: int = 3,
    servers: int = 3,
    reverbs: int = 2,
    cluster_id: str = "local",
    tempo_bpm: int = 60,
    beats_per_bar: int = 4,
    lease_ttl: float | None = None,
    failover_every: float | None = None,
    restart_after: float | None = None,
    duration: float | None = None,
    out: Callable[[str], None] = print,
    task_status: trio.TaskStatus[LocalCluster] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start a local NATS cluster with HA pulses and reverbs; report leadership changes.

    For ``backbeat-trio cluster``: prints the URLs, then one line per leadership change seen on
    the beat subject (which pulse, from which beat, after how long a gap) and on the bar subject
    (which reverb publishes). With ``failover_every`` it crashes the leading pulse and the
    publishing reverb that often (no lease release) and restarts them ``restart_after`` seconds
    later, so a user can watch failovers.

    Args:
        pulses: HA pulse instances (1..9).
        servers: nats-servers in the cluster (1..5; replicas are ``min(3, servers)``).
        reverbs: HA reverb instances (0..5; they accept unsigned claims: there is no keyring).
        cluster_id: the BACKBEAT cluster id.
        tempo_bpm: tempo (1..1200).
        beats_per_bar: bar length.
        lease_ttl: lease TTL in seconds (default two beats plus 50 ms).
        failover_every: seconds between crashes of the leader; None: never.
        restart_after: seconds before a crashed pulse restarts (default: the lease TTL).
        duration: stop after this many seconds; None: run until cancelled.
        out: where lines go (default ``print``).
        task_status: ``nursery.start`` gets the :class:`LocalCluster` once a pulse leads.

    Raises:
        ConfigError: an argument is out of range.
    """
    if not 1 <= pulses <= 9:
        raise ConfigError("pulses", f"must be in 1..9, got {pulses}")
    if not 1 <= servers <= 5:
        raise ConfigError("servers", f"must be in 1..5, got {servers}")
    if not 0 <= reverbs <= 5:
        raise ConfigError("reverbs", f"must be in 0..5, got {reverbs}")
    validate_id("cluster_id", cluster_id)
    for name, value in (
        ("failover_every", failover_every),
        ("restart_after", restart_after),
        ("duration", duration),
    ):
        if value is not None:
            _finite_positive(name, value)
    replicas = min(3, servers)
    base = HAPulseConfig(
        cluster_id=cluster_id,
        tempo_bpm=tempo_bpm,
        beats_per_bar=beats_per_bar,
        lease_ttl=lease_ttl,
        lease_replicas=replicas,
        release_on_exit=False,
    )
    ttl = base.timings().ttl
    restart_delay = restart_after if restart_after is not None else ttl
    with trio.move_on_after(math.inf if duration is None else duration):
        async with open_embedded_nats_cluster(servers, name=f"bb-{cluster_id}"[:32]) as nats:
            local = LocalCluster(cluster_id, nats)

            def say(line: str) -> None:
                local.lines.append(line)
                del local.lines[:-1000]
                out(line)

            say(f"NATS cluster of {servers} up: {nats.url}")
            say(f"agents: BACKBEAT_NATS_URL={nats.url} BACKBEAT_CLUSTER_ID={cluster_id}")
            say(f"{pulses} HA pulse(s), {tempo_bpm} BPM, lease TTL {ttl:.3f} s")
            if reverbs:
                say(f"{reverbs} HA reverb(s), lease TTL {ttl:.3f} s")
            async with trio.open_nursery() as nursery:
                first_beat = trio.Event()
                await nursery.start(_watch_beats, local, base, first_beat, say)
                for i in range(pulses):
                    pulse_id = f"pulse-{i + 1}"
                    urls = _rotated(nats.urls, i)
                    cfg = _replace_cfg(base, pulse_id=pulse_id, nats_url=urls)
                    await nursery.start(
                        _instance_slot,
                        local,
                        pulse_id,
                        functools.partial(run_ha_pulse, cfg),
                        local.pulses,
                        restart_delay,
                        say,
                    )
                if reverbs:
                    await nursery.start(_watch_bars, local, base, say)
                for i in range(reverbs):
                    rcfg = _reverb_config(base, i, replicas, ttl, _rotated(nats.urls, i + 1))
                    await nursery.start(
                        _instance_slot,
                        local,
                        rcfg.reverb_id,
                        _reverb_runner(rcfg),
                        local.reverbs,
                        restart_delay,
                        say,
                    )
                await first_beat.wait()
                task_status.started(local)
                if failover_every is None:
                    await trio.sleep_forever()
                for _ in itertools.count():
                    await trio.sleep(failover_every)
                    crashed = [i for i in (local.leader(), local.reverb_leader()) if i is not None]
                    if crashed:
                        local.failovers += 1
                        say(
                            f"crashing the leader {' and '.join(crashed)} "
                            f"(failover #{local.failovers})"
                        )
                        for instance_id in crashed:
                            local.crash(instance_id)


def _rotated(urls: Sequence[str], by: int) -> list[str]:
    n = len(urls)
    return [urls[(i + by) % n] for i in range(n)]


def _replace_cfg(cfg: HAPulseConfig, **changes: Any) -> HAPulseConfig:
    fields = {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}
    fields.update(changes)
    return HAPulseConfig(**fields)


def _reverb_config(
    base: HAPulseConfig, index: int, replicas: int, ttl: float, urls: list[str]
) -> ReverbConfig:
    from ._reverb import ReverbConfig

    return ReverbConfig(
        cluster_id=base.cluster_id,
        nats_url=urls,
        reverb_id=f"reverb-{index + 1}",
        beats_per_bar=base.beats_per_bar,
        allow_unsigned=True,
        replicas=replicas,
        ha=True,
        lease_ttl=max(ttl, 3 * base.jitter_tolerance),
        release_on_exit=False,
    )


def _reverb_runner(cfg: ReverbConfig) -> Callable[..., Awaitable[None]]:
    from ._reverb import run_reverb

    return functools.partial(run_reverb, cfg)


async def _instance_slot(
    local: LocalCluster,
    instance_id: str,
    start: Callable[..., Awaitable[None]],
    statuses: dict[str, Any],
    restart_delay: float,
    say: Callable[[str], None],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    # one pulse or reverb, restarted ``restart_delay`` after each crash
    started = False
    for run in itertools.count():  # one iteration per (re)start; ends only by cancellation
        scope = trio.CancelScope()
        local.scopes[instance_id] = scope
        with scope:
            async with trio.open_nursery() as nursery:
                try:
                    statuses[instance_id] = await nursery.start(start)
                except BackbeatError as exc:
                    say(f"{instance_id} could not start: {exc}")
                else:
                    if run:
                        say(f"{instance_id} restarted")
                if not started:
                    started = True
                    task_status.started()
        await trio.sleep(restart_delay)


async def _watch_publishers(
    local: LocalCluster,
    cfg: HAPulseConfig,
    what: str,
    subject: str,
    type_: type[BeatFrame] | type[BarReport],
    on_message: Callable[[int, Any, float], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    # follow ``subject`` on the cluster and hand on each message with its publisher's HLC node
    conn = Config(
        cluster_id=cfg.cluster_id,
        agent_id=f"cluster-{what}",
        nats_url=local.urls,
        reconnect_delay=0.25,
        connect_attempts=3,
        name=f"backbeat-cluster-{what}",
    )
    async with open_nats_transport(conn) as transport:
        sub = await transport.subscribe(subject, buffer=4096)
        task_status.started()
        async for msg in sub.messages:
            try:
                item = decode(msg.data, type_)
                node = HLCStamp.parse(item.hlc).node
            except WireError:
                continue
            on_message(node, item, trio.current_time())


async def _watch_bars(
    local: LocalCluster,
    cfg: HAPulseConfig,
    say: Callable[[str], None],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    names = {node_id_for(f"reverb-{i}"): f"reverb-{i}" for i in range(1, 6)}
    last_node: int | None = None
    last_to: int | None = None

    def on_report(node: int, report: BarReport, now: float) -> None:
        nonlocal last_node, last_to
        if node != last_node:
            who = names.get(node, f"node {node:04x}")
            span = f"window {report.from_beat}-{report.to_beat}"
            if last_node is None:
                say(f"bars {span}: {who} publishes")
            else:
                say(f"bars {span}: {who} took over reporting (previous window ended {last_to})")
            last_node = node
        last_to = report.to_beat

    subject = bar_subject(cfg.cluster_id)
    await _watch_publishers(
        local, cfg, "bars", subject, BarReport, on_report, task_status=task_status
    )


async def _watch_beats(
    local: LocalCluster,
    cfg: HAPulseConfig,
    first_beat: trio.Event,
    say: Callable[[str], None],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    names = {node_id_for(f"pulse-{i}"): f"pulse-{i}" for i in range(1, 10)}
    last_node: int | None = None
    last_at = 0.0
    last_index: int | None = None

    def on_frame(node: int, frame: BeatFrame, now: float) -> None:
        nonlocal last_node, last_at, last_index
        if node != last_node:
            who = names.get(node, f"node {node:04x}")
            if last_node is None:
                say(f"beat {frame.beat_index}: {who} leads")
            else:
                say(
                    f"beat {frame.beat_index}: {who} took over after a {now - last_at:.3f} s "
                    f"gap (previous beat {last_index})"
                )
            last_node = node
            first_beat.set()
        last_at, last_index = now, frame.beat_index

    subject = beat_subject(cfg.cluster_id)
    await _watch_publishers(
        local, cfg, "watch", subject, BeatFrame, on_frame, task_status=task_status
    )
