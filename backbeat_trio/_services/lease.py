"""Holding a lease over I/O: :class:`LeaseKeeper` (bounded reads, CAS writes, following with a
watch kept fresh, release), shared by the HA pulse and the HA reverb; the lease stores live in
:mod:`backbeat_trio._services.lease_store` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

import trio

from .._core.lease import (
    LeaseElection,
    LeaseRecord,
    LeaseTimings,
    Role,
    ScheduleSnapshot,
    WatchFreshness,
    decode_lease,
    encode_lease,
)
from .._errors import BackbeatError, ConfigError
from .._transport.jetstream import KVEntry, KVWatch
from .lease_store import _WATCH_BUFFER as _WATCH_BUFFER
from .lease_store import LEASE_KEY as LEASE_KEY
from .lease_store import REVERB_LEASE_KEY as REVERB_LEASE_KEY
from .lease_store import KVLeaseStore as KVLeaseStore
from .lease_store import LeaseStore as LeaseStore
from .lease_store import NatsLeaseStore as NatsLeaseStore
from .lease_store import ensure_lease_store as ensure_lease_store

log = logging.getLogger("backbeat_trio.ha")

_CHANGES_KEPT: Final = 256
#: Compare-and-set writes a leader retries in a row over revisions that are no lease record
#: (each needs a read first); past that the write counts as an unknown outcome.
_OVERWRITES: Final = 3

WriteOutcome = Literal["ok", "conflict", "unknown"]


# --- configuration and status ---------------------------------------------------------------------
def _finite_positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(name, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


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
        kv_unclaimed: revisions seen that were no lease record (anything a publisher made
            JetStream store on the key, e.g. a PubAck whose reply subject named it; a delete
            marker): nobody's claim, overwritten by a leader, never a vacancy.
        kv_overwrites: such revisions this instance overwrote while leading.
        watch_fallbacks: times the watch lagged: a read found a revision it had not delivered
            a poll later (it died silently, e.g. its consumer lived on a server that went away),
            so the follower polled every ``poll_interval`` and reopened the watch.
        watch_reopens: watches opened again in place of a lagging one.
        changes: the latest role changes, oldest first.
        expires_at: the latest record's ``expires_at`` (its writer's wall clock, POSIX seconds;
            informational), None before a record was seen.
        released: the latest record says its holder stepped down.
        takeover_at: ``trio.current_time()`` from which a follower may take over the lease it
            saw (``-inf``: at once; ``inf``: nothing read yet): a follower before it follows a
            live leader.
        valid_until: while leading, ``trio.current_time()`` until which this instance may act
            on the lease.
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
    kv_unclaimed: int = 0
    kv_overwrites: int = 0
    watching: bool = False
    watch_fallbacks: int = 0
    watch_reopens: int = 0
    last_error: str | None = None
    changes: deque[LeadershipChange] = field(default_factory=lambda: deque(maxlen=_CHANGES_KEPT))
    role_event: trio.Event = field(default_factory=trio.Event)
    expires_at: float | None = None
    released: bool = False
    takeover_at: float = math.inf
    valid_until: float = -math.inf

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
        self.watch: KVWatch | None = None
        self._next_read = -math.inf
        self._last_read = -math.inf  # when the latest successful read was answered
        self.fresh = WatchFreshness(timings)

    def __repr__(self) -> str:
        return (
            f"<LeaseKeeper {self.owner_id} {self.election.role} watching={self.watch is not None}>"
        )

    @property
    def read_interval(self) -> float:
        """How often a follower reads the key: the TTL while the watch keeps up, else
        ``poll_interval``."""
        if self.watch is None or self.fresh.lagging:
            return self.t.poll_interval
        return max(self.t.ttl, self.t.poll_interval)

    # -- bookkeeping -----------------------------------------------------------------------------
    def sync_status(self, reason: str = "") -> None:
        """Copy the election's state into the status; record a role change."""
        e, st = self.election, self.status
        st.holder = e.holder
        st.lease_revision = e.revision
        st.terms = e.terms
        st.expires_at = e.record.expires_at if e.record is not None else None
        st.released = e.record is not None and e.record.released
        st.takeover_at = e.expires_at()
        st.valid_until = e.valid_until
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
        self.fresh.opened(trio.current_time())

    async def _reopen_watch(self) -> None:
        """Replace a lagging watch by a new one (bounded); keep polling if that fails.

        Never waited on past the takeover time the follower knows of: a reopen that hangs (no
        stream leader yet) must not delay a takeover its polls would allow.
        """
        now = trio.current_time()
        bound = min(
            self.t.op_timeout + 0.5, max(self.t.poll_interval, self.election.expires_at() - now)
        )
        new: KVWatch | None = None
        with trio.move_on_after(bound):
            try:
                new = await self.store.watch()
            except BackbeatError as exc:
                self._kv_error(f"reopening the lease watch failed: {exc}")
                return
        if new is None:
            self._kv_error("reopening the lease watch timed out")
            self.fresh.reopen_timed_out(trio.current_time())
            return
        old, self.watch = self.watch, new
        self.status.watch_reopens += 1
        self.fresh.opened(trio.current_time())
        log.info(
            "%s reopened its lease watch (it had not delivered revision %s)",
            self.owner_id,
            self.fresh.behind,
        )
        if old is not None:
            with trio.move_on_after(1.0, shield=True):
                await old.aclose()

    async def close_watch(self) -> None:
        """Stop watching (bounded)."""
        watch, self.watch = self.watch, None
        self.status.watching = False
        if watch is not None:
            with trio.move_on_after(1.0, shield=True):
                await watch.aclose()

    def _observe_entry(self, entry: KVEntry) -> None:
        revision, value = entry
        self.status.kv_watched += 1
        self.fresh.delivered_entry(revision, trio.current_time())
        self._observe(revision, value)

    def _observe(self, revision: int, value: bytes | None) -> None:
        e = self.election
        record = decode_lease(value)
        if record is None and (not e.known or e.revision is None or revision > e.revision):
            self.status.kv_unclaimed += 1
            log.warning(
                "%s: lease revision %d is no lease record: nobody's claim", self.owner_id, revision
            )
        e.observe(revision, record, trio.current_time())
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
        if got is None:
            self.election.observe(None, None, trio.current_time())
            self.sync_status()
        else:
            self._observe(*got)
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
        """A CAS write of this instance's record (bounded).

        A leader whose write loses reads the key; unless the newer revision is someone else's
        record it writes again on it, at most ``_OVERWRITES`` times and only while its lease
        runs: a revision that is no lease record is nobody's claim, so it must not cost the
        leader its lease.

        Returns:
            ``"ok"``; ``"conflict"``: it does not lead (any more), someone else's record is
            newer; ``"unknown"``: the outcome is unknown, or the overwrites ran out (the leader
            then does not publish until a write is confirmed).
        """
        e = self.election
        outcome = await self._write_once(snapshot)
        for _ in range(_OVERWRITES):
            if outcome != "conflict" or e.role != "leader":
                break
            if not await self.read():
                return "unknown"
            if not e.check(trio.current_time()):
                self.sync_status()
                return "conflict"
            if e.contested:  # the read did not settle it (an answer older than we know)
                return "unknown"
            overwriting = e.unclaimed  # else the newer revision was a write of our own
            outcome = await self._write_once(snapshot)
            if outcome == "ok" and overwriting:
                self.status.kv_overwrites += 1
        if outcome == "conflict" and e.role == "leader":
            return "unknown"
        return outcome

    async def _write_once(self, snapshot: ScheduleSnapshot | None) -> WriteOutcome:
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
        e, fresh = self.election, self.fresh
        if self.watch is not None:
            # what arrived while leading is our own writes: stale now (the read below is newer)
            now = trio.current_time()
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                while True:
                    fresh.delivered_entry(self.watch.entries.receive_nowait().revision, now)
            e.needs_read = True
        while True:
            now = trio.current_time()
            if self.watch is not None:
                if fresh.check(now):
                    # a revision a read showed is still not delivered: poll, and open a new
                    # watch rather than wait for nats-py to notice its consumer is gone
                    self.status.watch_fallbacks += 1
                    log.info("%s: the lease watch lags; polling and reopening it", self.owner_id)
                if fresh.may_reopen(now):
                    await self._reopen_watch()
                    continue
            # Watching, a takeover is decided on what the watch delivered; one read confirms
            # it first (a watch that died silently would otherwise make the CAS fail, costing a
            # TTL). Not for an immediate takeover (released, our own record, no key).
            confirm = self.watch is not None and self._last_read < e.expires_at() <= now
            quiet = self.watch is not None and now >= fresh.quiet_at()
            if e.needs_read or now >= self._next_read or confirm or quiet:
                ok = await self.read()
                if not ok:
                    self._next_read = trio.current_time() + self.read_interval
                    await trio.sleep(self.t.poll_interval)
                    continue
                now = self._last_read = trio.current_time()
                if self.watch is not None:
                    fresh.read(e.revision if e.known else None, now)
                self._next_read = now + self.read_interval
            if e.may_acquire(now):
                if await self.write(acquisition_snapshot()) == "ok":
                    return
                continue  # lost the race or unknown: needs_read is set
            wake = min(self._next_read, e.expires_at())
            if self.watch is not None:
                wake = min(wake, fresh.wake_at())
            wake = max(wake, now)
            if self.watch is None:
                await trio.sleep_until(wake)
                continue
            with trio.move_on_at(wake):
                try:
                    entry = await self.watch.entries.receive()
                except trio.EndOfChannel:  # the store closed its watch: poll from now on
                    log.warning("%s: the lease watch ended; polling instead", self.owner_id)
                    self.watch = None
                    self.status.watching = False
                    self._next_read = trio.current_time()
                    continue
                self._observe_entry(entry)

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
