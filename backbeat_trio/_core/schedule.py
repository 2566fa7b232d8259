"""The pulse's beat schedule, sans-IO: which beat is next, when it is due, and tempo changes.

Times are plain floats in whatever clock the caller uses (``trio.current_time()`` for the pulse);
nothing here sleeps or reads a clock.

Due times never accumulate float error: the schedule keeps an *anchor* ``(index, time, tempo)``
that moves only when the tempo changes, and computes ``due(k) = anchor_time + (k - anchor_index) *
60 / tempo`` (one multiplication of exact integers, one division, one addition) instead of adding
beat durations one by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final, Self

from .._core.beats import (
    MAX_TEMPO_BPM,
    MIN_TEMPO_BPM,
    is_downbeat,
    phase_for,
    validate_beats_per_bar,
    validate_id,
    validate_tempo,
    window_id,
)
from .._errors import ConfigError

__all__ = ["WALL_SLEW", "PulseSchedule", "ScheduledBeat", "TempoDecision", "WallAnchor"]

STATE_VERSION: Final = 1

#: How fast a pulse's :class:`WallAnchor` follows the wall clock: at most this many seconds per
#: second of schedule. Consecutive ``deadline_at`` values then stay at least ``1 - WALL_SLEW``
#: beat lengths apart, and a wall clock that runs apart from the monotonic one by less than this
#: rate is kept up with.
WALL_SLEW: Final = 0.05


@dataclass(frozen=True, slots=True)
class ScheduledBeat:
    """One beat as the schedule hands it out, ready to become a ``BeatFrame``.

    Attributes:
        beat_index: the beat's index.
        due: when the beat starts (caller's clock).
        deadline: when the next beat starts (``due`` + this beat's duration).
        tempo_bpm: the tempo this beat is played at.
        downbeat: True when the beat opens a bar.
        phase: ``plan`` / ``execute`` / ``review``.
        window_id: the bar's window id.
    """

    beat_index: int
    due: float
    deadline: float
    tempo_bpm: int
    downbeat: bool
    phase: str
    window_id: str

    @property
    def duration(self) -> float:
        """Seconds this beat lasts (``deadline - due``, computed from the tempo)."""
        return 60.0 / self.tempo_bpm


@dataclass(frozen=True, slots=True)
class TempoDecision:
    """The schedule's answer to a tempo request.

    Attributes:
        accepted: True when the change is now pending (or there was nothing to change).
        tempo_bpm: the tempo that was requested.
        previous_bpm: the tempo in force when the request was made.
        effective_beat: the downbeat the change takes effect on (None when refused or a no-op).
        reason: why a request was refused, or a short note on an accepted one.
    """

    accepted: bool
    tempo_bpm: object
    previous_bpm: int
    effective_beat: int | None
    reason: str


def _check_step(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError("max_tempo_step", f"must be a fraction > 0 or None, got {value!r}")
    step = float(value)
    if not (math.isfinite(step) and step > 0):
        raise ConfigError("max_tempo_step", f"must be a fraction > 0 or None, got {value!r}")
    return step


def _check_time(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(field, f"must be a finite number of seconds, got {value!r}")
    t = float(value)
    if not math.isfinite(t):
        raise ConfigError(field, f"must be a finite number of seconds, got {value!r}")
    return t


def _check_index(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ConfigError(field, f"must be an int in [0, 2**63), got {value!r}")
    return value


class PulseSchedule:
    """The beat schedule of one cluster's pulse.

    Beat ``start_index`` is due at ``t0``; every later beat is due one beat duration (at the tempo
    in force) after the previous one. Tempo changes wait for the next downbeat.

    Args:
        cluster_id: the cluster (for window ids).
        tempo_bpm: the starting tempo, an int in [1, 1200].
        beats_per_bar: bar length (>= 1).
        start_index: the first beat to hand out (it need not be a downbeat).
        t0: when beat ``start_index`` is due, in the caller's clock.
        max_tempo_step: largest accepted relative tempo step (0.10 = ±10 %) without ``force``;
            None disables the check.

    Raises:
        ConfigError: an argument breaks a rule.
    """

    __slots__ = (
        "_anchor_index",
        "_anchor_time",
        "_cursor",
        "_pending",
        "_tempo",
        "beats_per_bar",
        "cluster_id",
        "max_tempo_step",
    )

    def __init__(
        self,
        cluster_id: str,
        *,
        tempo_bpm: int,
        beats_per_bar: int = 4,
        start_index: int = 0,
        t0: float,
        max_tempo_step: float | None = 0.10,
    ) -> None:
        self.cluster_id = validate_id("cluster_id", cluster_id)
        self.beats_per_bar = validate_beats_per_bar(beats_per_bar)
        self.max_tempo_step = _check_step(max_tempo_step)
        self._tempo = validate_tempo(tempo_bpm)
        self._anchor_index = _check_index("start_index", start_index)
        self._anchor_time = _check_time("t0", t0)
        self._cursor = self._anchor_index
        self._pending: int | None = None

    # --- reading ---------------------------------------------------------------------------------
    @property
    def tempo_bpm(self) -> int:
        """The tempo in force (a pending change is not in force until its downbeat)."""
        return self._tempo

    @property
    def pending_tempo(self) -> int | None:
        """An accepted tempo waiting for the next downbeat, or None."""
        return self._pending

    @property
    def beat_duration(self) -> float:
        """Seconds per beat at the tempo in force."""
        return 60.0 / self._tempo

    @property
    def next_index(self) -> int:
        """The index :meth:`next_beat` hands out next."""
        return self._cursor

    @property
    def next_due(self) -> float:
        """When the next beat is due (a pending tempo does not move it: it applies from there)."""
        return self._due(self._cursor)

    @property
    def next_downbeat(self) -> int:
        """The first downbeat at or after :attr:`next_index` (where a pending tempo lands)."""
        rem = self._cursor % self.beats_per_bar
        return self._cursor if rem == 0 else self._cursor + self.beats_per_bar - rem

    def _due(self, index: int) -> float:
        # Exact integer product, then a single division and a single addition: no drift.
        return self._anchor_time + ((index - self._anchor_index) * 60) / self._tempo

    def __repr__(self) -> str:
        pending = f" pending={self._pending}bpm@{self.next_downbeat}" if self._pending else ""
        return (
            f"<PulseSchedule {self.cluster_id} next={self._cursor} due={self.next_due:.6f} "
            f"tempo={self._tempo}bpm{pending} bar={self.beats_per_bar} "
            f"anchor=({self._anchor_index}, {self._anchor_time:.6f})>"
        )

    # --- advancing -------------------------------------------------------------------------------
    def _apply_pending(self) -> None:
        if self._pending is not None and is_downbeat(self._cursor, self.beats_per_bar):
            due = self._due(self._cursor)
            self._anchor_index, self._anchor_time = self._cursor, due
            self._tempo, self._pending = self._pending, None

    def next_beat(self) -> ScheduledBeat:
        """Hand out the next beat and advance past it.

        A pending tempo change takes effect when the beat handed out is a downbeat.

        Returns:
            The beat, with its due time and deadline in the caller's clock.
        """
        self._apply_pending()
        index = self._cursor
        self._cursor = index + 1
        return ScheduledBeat(
            beat_index=index,
            due=self._due(index),
            deadline=self._due(index + 1),
            tempo_bpm=self._tempo,
            downbeat=is_downbeat(index, self.beats_per_bar),
            phase=phase_for(index, self.beats_per_bar),
            window_id=window_id(self.cluster_id, index, self.beats_per_bar),
        )

    def skip_to(self, now: float) -> int:
        """Skip the beats that are wholly in the past at ``now`` (after a stall), without a burst.

        Every beat whose deadline (the next beat's due time) is at or before ``now`` is dropped;
        the beat in progress at ``now``, if any, is kept, so a publisher that is only slightly late
        still publishes it. A pending tempo change still lands on the first downbeat passed.

        Args:
            now: the current time in the caller's clock.

        Returns:
            How many beats were skipped (0 when not behind by a whole beat).
        """
        start = self._cursor
        # a change pending for the beat at the cursor sets that beat's duration
        self._apply_pending()
        if self._due(self._cursor + 1) > now:
            return 0
        if self._pending is not None:
            downbeat = self.next_downbeat
            if self._due(downbeat) <= now:
                self._cursor = downbeat
                self._apply_pending()
        # The beat in progress: the largest k with due(k) <= now (corrected for rounding).
        elapsed_beats = math.floor((now - self._anchor_time) * self._tempo / 60)
        target = max(self._cursor, self._anchor_index + elapsed_beats)
        for _ in range(4):  # float rounding moves the estimate by at most one either way
            if target > self._cursor and self._due(target) > now:
                target -= 1
            elif self._due(target + 1) <= now:
                target += 1
            else:
                break
        self._cursor = target
        return target - start

    # --- tempo -----------------------------------------------------------------------------------
    def request_tempo(self, bpm: object, *, force: bool = False) -> TempoDecision:
        """Ask for a new tempo; an accepted change waits for the next downbeat.

        The step is measured against the tempo *in force*, not a pending one, so the change that
        actually happens at the downbeat respects the limit. A later request replaces a pending
        one; asking for the tempo in force cancels a pending change.

        Args:
            bpm: the wanted tempo, an int in [1, 1200].
            force: accept a step larger than ``max_tempo_step``.

        Returns:
            The decision; refusals carry a reason and change nothing.
        """
        current = self._tempo
        if isinstance(bpm, bool) or not isinstance(bpm, int):
            return TempoDecision(False, bpm, current, None, f"tempo must be an int, got {bpm!r}")
        if not MIN_TEMPO_BPM <= bpm <= MAX_TEMPO_BPM:
            return TempoDecision(
                False,
                bpm,
                current,
                None,
                f"tempo {bpm} BPM is outside [{MIN_TEMPO_BPM}, {MAX_TEMPO_BPM}]",
            )
        if bpm == current:
            cancelled = self._pending
            self._pending = None
            note = f"cancels pending {cancelled} BPM" if cancelled is not None else "no change"
            return TempoDecision(True, bpm, current, None, f"already at {bpm} BPM; {note}")
        step = self.max_tempo_step
        # The tiny tolerance keeps an exact ±10 % (66 from 60) from failing on float rounding.
        if not force and step is not None and abs(bpm - current) > step * current * (1 + 1e-12):
            change = (bpm - current) / current
            return TempoDecision(
                False,
                bpm,
                current,
                None,
                f"step from {current} to {bpm} BPM is {change:+.1%}, more than ±{step:.0%}; "
                "pass force=True to allow it",
            )
        self._pending = bpm
        effective = self.next_downbeat
        return TempoDecision(True, bpm, current, effective, f"takes effect at beat {effective}")

    # --- hand-over -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """A JSON-friendly snapshot from which :meth:`from_state` continues identically.

        Keys: ``cluster_id``, ``beat_index`` (the next beat to hand out), ``due`` (its due time),
        ``tempo_bpm``, ``beats_per_bar``, ``pending_tempo_bpm``, ``max_tempo_step``, plus the
        anchor (``anchor_index``, ``anchor_time``) so due times stay bit-identical.
        """
        return {
            "version": STATE_VERSION,
            "cluster_id": self.cluster_id,
            "beat_index": self._cursor,
            "due": self.next_due,
            "tempo_bpm": self._tempo,
            "beats_per_bar": self.beats_per_bar,
            "pending_tempo_bpm": self._pending,
            "max_tempo_step": self.max_tempo_step,
            "anchor_index": self._anchor_index,
            "anchor_time": self._anchor_time,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], *, shift: float = 0.0) -> Self:
        """Continue a schedule from :meth:`state` (an HA successor taking over).

        Args:
            state: a snapshot; the anchor keys are optional (without them the schedule re-anchors
                at ``beat_index``/``due``).
            shift: added to every time, to move the snapshot into the successor's clock (e.g.
                ``local_monotonic_now - shared_wall_now`` when the snapshot holds wall times).

        Returns:
            A schedule whose next beat is ``state["beat_index"]``.

        Raises:
            ConfigError: the snapshot is missing a key or breaks a rule.
        """
        try:
            cursor = _check_index("beat_index", state["beat_index"])
            anchor_index = _check_index("anchor_index", state.get("anchor_index", cursor))
            if "anchor_time" in state:
                anchor_time = _check_time("anchor_time", state["anchor_time"])
            else:
                anchor_time = _check_time("due", state["due"])
            sched = cls(
                state["cluster_id"],
                tempo_bpm=state["tempo_bpm"],
                beats_per_bar=state.get("beats_per_bar", 4),
                start_index=anchor_index,
                t0=anchor_time + shift,
                max_tempo_step=state.get("max_tempo_step", 0.10),
            )
        except KeyError as exc:
            raise ConfigError("state", f"snapshot lacks {exc.args[0]!r}") from exc
        if cursor < anchor_index:
            raise ConfigError("state", f"beat_index {cursor} precedes anchor_index {anchor_index}")
        sched._cursor = cursor
        pending = state.get("pending_tempo_bpm")
        if pending is not None:
            sched._pending = validate_tempo(pending, "pending_tempo_bpm")
        return sched


class WallAnchor:
    """Where a pulse's schedule (on its monotonic clock) sits on the wall clock: a beat due at
    schedule time ``t`` has ``deadline_at = t + offset``.

    The offset starts as the wall clock's offset from the monotonic clock and then follows it
    (:meth:`follow`, once per beat) by at most ``slew`` seconds per second of schedule. So a step
    of the wall clock never makes ``deadline_at`` jump or go back (it is taken in over
    ``step / slew`` seconds), and a wall clock that runs at another rate than the monotonic one
    (some virtual machines' does) is kept up with instead of drifting apart beat after beat.

    Args:
        offset: the wall clock minus the monotonic clock, at start.
        slew: the most the offset moves per second of schedule (``0 <= slew < 1``).
    """

    __slots__ = ("_at", "offset", "slew")

    def __init__(self, offset: float, *, slew: float = WALL_SLEW) -> None:
        if not (math.isfinite(offset) and 0.0 <= slew < 1.0):
            raise ConfigError("slew", f"needs a finite offset and 0 <= slew < 1, got {slew!r}")
        self.offset = offset
        self.slew = slew
        self._at: float | None = None  # the latest schedule time asked for

    def __repr__(self) -> str:
        return f"<WallAnchor offset={self.offset:.6f} slew={self.slew}>"

    def follow(self, t: float, wall_offset: float) -> float:
        """The offset for a deadline at schedule time ``t``, moved towards ``wall_offset`` (the
        wall clock minus the monotonic clock now) by at most ``slew`` times the schedule time
        since the last call. A ``t`` before that one moves nothing."""
        at = self._at
        if at is None or t > at:
            if at is not None and math.isfinite(wall_offset):
                room = self.slew * (t - at)
                self.offset += min(max(wall_offset - self.offset, -room), room)
            self._at = t
        return self.offset
