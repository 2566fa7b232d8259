"""Beat-frame intake and local time-keeping, sans-IO: :class:`BeatTracker`.

The tracker decides what a client does with each raw payload on the beat subject: refuse it
(oversized, malformed, another cluster's, a duplicate, stale or implausibly early against the
clock offset the previous frames established), adopt it (the pulse's own frame for a beat the
client synthesised while it was silent) or deliver it. It keeps the beat schedule, learns the bar
length from gap-free bars, hands arrivals to the :class:`~.tempo.TempoEstimator`, and says when
the pulse has gone silent and what the locally synthesised beat is. Time comes in as floats: ``now``
on the caller's monotonic clock (trio's) and ``wall`` in POSIX seconds. The caller moves its own
timers, budgets and consumers after each call; nothing here blocks or touches I/O.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import math
from typing import Final, Literal

from .._errors import WireError
from .beats import phase_for, window_id
from .hlc import HLC, HLCStamp
from .metrics import ClientMetrics, ErrorLog
from .rules import MAX_FRAME_BEAT_INDEX
from .tempo import TempoEstimator
from .wire import BeatFrame, decode_frame

__all__ = [
    "ADOPTED",
    "DELIVERED",
    "MAX_CLOCK_SKEW",
    "RECALIBRATE_AFTER",
    "REFUSED",
    "BeatTracker",
    "IntakeOutcome",
    "ScreenedFrame",
    "screen_frame",
]

#: :meth:`BeatTracker.intake` outcomes (plain ints: the per-frame path allocates nothing for them).
REFUSED: Final = 0
"""The payload was refused (and counted); nothing changed."""
ADOPTED: Final = 1
"""The pulse's frame for a beat synthesised locally: the schedule moved, nothing to deliver."""
DELIVERED: Final = 2
"""A new beat: deliver :attr:`BeatTracker.last_frame`; the schedule moved."""
IntakeOutcome = Literal[0, 1, 2]

MAX_CLOCK_SKEW = 300.0
"""Seconds the first beat frame's deadline may be away from the local clock (after one beat):
further off, it is refused as implausible rather than trusted to calibrate the clock offset."""

RECALIBRATE_AFTER = 8
"""Consecutive frames refused as stale or implausible after which the clock offset to the pulse
is measured afresh (a clock was stepped), instead of refusing the pulse for ever."""

log = logging.getLogger("backbeat_trio.client")


def screen_frame(
    data: bytes, cluster_id: str, max_frame_bytes: int, errors: ErrorLog
) -> BeatFrame | None:
    """What every tracker of ``cluster_id`` would refuse alike: an oversized payload, one that
    does not decode as a valid :class:`BeatFrame` (or nests too deeply to decode), another
    cluster's frame, and one whose beat index lies within ``rules.BEAT_INDEX_HEADROOM`` of int64's
    end (counted as malformed: what follows from it would leave int64). Counted in
    ``errors.metrics`` (``oversized``, ``malformed``, ``wrong_cluster``) and noted.

    Returns:
        The decoded frame, or None when it is refused.
    """
    metrics = errors.metrics
    if len(data) > max_frame_bytes:
        metrics.oversized += 1
        errors.note(f"oversized beat frame ({len(data)} bytes)")
        return None
    try:
        frame = decode_frame(data)
    except WireError as exc:
        metrics.malformed += 1
        errors.note(str(exc)[:200])
        return None
    if frame.cluster_id != cluster_id:
        metrics.wrong_cluster += 1
        errors.note(f"beat frame for cluster {frame.cluster_id!r}")
        return None
    if frame.beat_index > MAX_FRAME_BEAT_INDEX:
        # the beats this client would synthesise from it, and the bars they name, leave int64
        metrics.malformed += 1
        errors.note(f"beat {frame.beat_index} leaves no room before int64's end")
        return None
    return frame


class ScreenedFrame:
    """A beat frame screened once for every client on a connection: the frame, its parsed HLC
    stamp, the pulse's start of the beat (POSIX seconds), and the local monotonic and wall-clock
    times it arrived, all immutable, so every client may hold them (and judge the frame as of
    its arrival, not as of its own turn in the fan-out)."""

    __slots__ = ("arrived", "arrived_wall", "frame", "stamp", "start_ts")

    def __init__(
        self, frame: BeatFrame, stamp: HLCStamp, arrived: float, arrived_wall: float
    ) -> None:
        self.frame = frame
        self.stamp = stamp
        self.start_ts = frame.deadline_at.timestamp() - 60.0 / frame.tempo_bpm
        self.arrived = arrived
        self.arrived_wall = arrived_wall

    def __repr__(self) -> str:
        return f"<ScreenedFrame beat={self.frame.beat_index} {self.frame.cluster_id}>"


class FrameScreen:
    """Decodes and screens a beat subject's payloads once for all the clients that share a
    subscription to it (:func:`screen_frame`): what it refuses is counted here, once per
    process, and reaches no client.

    Args:
        cluster_id: the cluster whose beat subject this is.
        max_frame_bytes: larger payloads are refused unread.

    Attributes:
        metrics: ``malformed``, ``oversized`` and ``wrong_cluster`` count the refusals; ``beats``
            the frames passed on.
        errors: the texts of the latest refusals.
    """

    __slots__ = ("cluster_id", "errors", "max_frame_bytes", "metrics")

    def __init__(self, cluster_id: str, max_frame_bytes: int) -> None:
        self.cluster_id = cluster_id
        self.max_frame_bytes = max_frame_bytes
        self.metrics = ClientMetrics()
        self.errors = ErrorLog(self.metrics)

    def __repr__(self) -> str:
        m = self.metrics
        return (
            f"<FrameScreen {self.cluster_id} passed={m.beats} malformed={m.malformed} "
            f"oversized={m.oversized} wrong_cluster={m.wrong_cluster}>"
        )

    @property
    def refused(self) -> int:
        """Payloads refused so far."""
        m = self.metrics
        return m.malformed + m.oversized + m.wrong_cluster

    def __call__(self, data: bytes, arrived: float, arrived_wall: float) -> ScreenedFrame | None:
        """Screen one payload that arrived at local monotonic time ``arrived`` (wall clock:
        ``arrived_wall``, POSIX seconds): the frame with its parsed stamp, or None (refused,
        counted)."""
        frame = screen_frame(data, self.cluster_id, self.max_frame_bytes, self.errors)
        if frame is None:
            return None
        try:
            stamp = HLCStamp.parse(frame.hlc)
        except WireError as exc:  # the wire check should have refused it already
            self.metrics.malformed += 1
            self.errors.note(str(exc)[:200])
            return None
        self.metrics.beats += 1
        return ScreenedFrame(frame, stamp, arrived, arrived_wall)


class BeatTracker:
    """One client's view of the beat: what arrived, when the next beat is due, whether it keeps
    time alone.

    Args:
        cluster_id: frames for any other cluster are refused.
        beats_per_bar: the bar length assumed until the pulse's downbeats show it.
        jitter_tolerance: seconds a beat may be late before it is stale, or missing (degradation).
        max_frame_bytes: larger payloads are refused unread.
        hlc: the client's clock, advanced by every accepted frame's stamp.
        errors: where refusals and state changes are counted and noted.

    Attributes:
        last_frame: the last frame delivered or adopted (None before the first).
        last_index: the index of the last beat delivered (None before the first).
        last_start: the local (``now``) time the current beat started.
        last_wall: the wall time the current beat arrived or was synthesised.
        tempo_bpm: the tempo the last frame announced (0 before the first).
        beats_per_bar: the bar length in force.
        degraded: True while the beat is kept locally (the pulse is silent).
        next_due: the local time the next beat is due (inf before the first).
        estimator: the tempo, drift and clock-offset estimate.
    """

    __slots__ = (
        "_bar_contiguous",
        "_beats_since_downbeat",
        "_local_anchor_index",
        "_local_anchor_start",
        "_pulse_anchor_deadline",
        "_pulse_anchor_index",
        "_timing_refusals",
        "beats_per_bar",
        "cluster_id",
        "degraded",
        "episode_log_level",
        "errors",
        "estimator",
        "hlc",
        "jitter_tolerance",
        "last_frame",
        "last_index",
        "last_start",
        "last_wall",
        "max_frame_bytes",
        "metrics",
        "next_due",
        "tempo_bpm",
    )

    def __init__(
        self,
        *,
        cluster_id: str,
        beats_per_bar: int,
        jitter_tolerance: float,
        max_frame_bytes: int,
        hlc: HLC,
        errors: ErrorLog,
    ) -> None:
        self.cluster_id = cluster_id
        self.jitter_tolerance = jitter_tolerance
        self.max_frame_bytes = max_frame_bytes
        self.hlc = hlc
        self.errors = errors
        self.metrics = errors.metrics
        self.estimator = TempoEstimator()
        self.last_frame: BeatFrame | None = None
        self.last_index: int | None = None
        self.last_start = 0.0
        self.last_wall = 0.0
        self.tempo_bpm = 0
        self.beats_per_bar = beats_per_bar
        self.degraded = False
        # the level of the warnings a degradation or a re-calibration logs (a thousand clients
        # of one shared subscription log them at DEBUG; their watch warns once for all)
        self.episode_log_level = logging.WARNING
        self.next_due = math.inf
        self._beats_since_downbeat: int | None = None
        self._bar_contiguous = False
        # the last pulse frame's index and deadline_at (two fields, not a tuple per frame)
        self._pulse_anchor_index = 0
        self._pulse_anchor_deadline: _dt.datetime | None = None
        self._timing_refusals = 0  # consecutive frames refused as stale or implausible
        # (index, local start) of the last beat the pulse itself timed: while degraded, local
        # beats are due at anchor + k beats (absolute, no accumulated error)
        self._local_anchor_index: int | None = None
        self._local_anchor_start = 0.0

    def __repr__(self) -> str:
        return (
            f"<BeatTracker {self.cluster_id} beat={self.last_index} tempo={self.tempo_bpm} "
            f"degraded={self.degraded}>"
        )

    # ------------------------------------------------------------------ frames in
    def intake(self, data: bytes, now: float, wall: float) -> IntakeOutcome:
        """Judge one raw beat payload (:func:`screen_frame`, then :meth:`accept`).

        Args:
            data: the payload as received.
            now: local monotonic arrival time (seconds).
            wall: local wall-clock arrival time (POSIX seconds).

        Returns:
            :data:`REFUSED`, :data:`ADOPTED` or :data:`DELIVERED` (then :attr:`last_frame` is
            the beat to deliver).
        """
        frame = screen_frame(data, self.cluster_id, self.max_frame_bytes, self.errors)
        if frame is None:
            return REFUSED
        return self.accept(frame, now, wall)

    def accept(
        self,
        frame: BeatFrame,
        now: float,
        wall: float,
        stamp: HLCStamp | None = None,
        start_ts: float | None = None,
    ) -> IntakeOutcome:
        """Judge one decoded frame of this tracker's cluster (screened by :func:`screen_frame`,
        here or once for many trackers by a :class:`FrameScreen`).

        Args:
            frame: the decoded, validated frame.
            now: local monotonic arrival time (seconds).
            wall: local wall-clock arrival time (POSIX seconds).
            stamp: ``frame.hlc`` already parsed (saves each of many trackers parsing it).
            start_ts: the pulse's start of the beat, ``deadline_at`` minus one beat in POSIX
                seconds, if already computed (:class:`ScreenedFrame`).

        Returns:
            :data:`REFUSED`, :data:`ADOPTED` or :data:`DELIVERED`.
        """
        metrics = self.metrics
        self.hlc.merge(HLCStamp.parse(frame.hlc) if stamp is None else stamp)
        last = self.last_index
        # While degraded, the pulse's frame for the beat we synthesised is how it comes back;
        # anything else at or below the last delivered index is a duplicate, a replay or a
        # restarted pulse, and must neither be delivered nor move our schedule.
        if last is not None and (
            frame.beat_index < last or (frame.beat_index == last and not self.degraded)
        ):
            metrics.duplicate_or_old += 1
            self.errors.note(f"beat {frame.beat_index} is not after beat {last}: discarded")
            return REFUSED
        duration = 60.0 / frame.tempo_bpm
        jitter = self.jitter_tolerance
        if start_ts is None:
            start_ts = frame.deadline_at.timestamp() - duration
        # Judge the frame against the clock offset the *previous* frames established: a frame
        # must not vouch for its own timing (it would make any deadline look on time). The
        # first frame calibrates the offset, within a plausible clock skew.
        raw_offset = wall - start_ts
        estimator = self.estimator
        if estimator.samples:
            lateness = raw_offset - estimator.clock_offset  # >= 0 up to jitter
        elif abs(raw_offset) <= MAX_CLOCK_SKEW + duration:
            lateness = 0.0
        else:
            lateness = -math.inf
        if lateness < -(duration + jitter):
            self._refuse_timing(
                "implausible",
                f"beat {frame.beat_index} starts {-lateness:.3f} s after now (pulse clock)",
            )
            return REFUSED
        if lateness - duration > jitter:
            self._refuse_timing(
                "stale", f"stale beat {frame.beat_index} ({lateness - duration:.3f} s late)"
            )
            return REFUSED
        self._timing_refusals = 0
        estimator.add(frame.beat_index, now, duration, raw_offset)
        # the pulse is alive: anchor the local schedule on its clock
        self._pulse_anchor_index = frame.beat_index
        self._pulse_anchor_deadline = frame.deadline_at
        # Clocks that agree within the tolerance are trusted as they are: the local schedule is
        # then anchored on the pulse's own beat start, not on the fastest arrival seen.
        offset = estimator.clock_offset
        since_start = min(raw_offset, duration) if abs(offset) <= jitter else lateness
        start_local = now - max(0.0, since_start)
        if self.degraded:
            self.degraded = False
            metrics.resyncs += 1
            log.info("pulse is back at beat %d; resynchronised", frame.beat_index)
        self.last_wall = wall
        if frame.beat_index == last:
            # the beat we synthesised: adopt the pulse's frame and timing, deliver nothing
            self.last_frame = frame
            self.tempo_bpm = frame.tempo_bpm
            self._set_timing(frame.beat_index, start_local, duration)
            return ADOPTED
        if last is not None and frame.beat_index > last + 1:
            metrics.forward_jumps += 1
            metrics.beats_skipped += frame.beat_index - last - 1
        self._advance(frame, start_local, False)  # (positional: the hot path)
        return DELIVERED

    def _refuse_timing(self, metric: Literal["stale", "implausible"], text: str) -> None:
        setattr(self.metrics, metric, getattr(self.metrics, metric) + 1)
        self.errors.note(text)
        self._timing_refusals += 1
        if self._timing_refusals >= RECALIBRATE_AFTER:
            # that many refusals in a row with no frame on time: more likely a clock was stepped
            # (NTP, a new pulse host) than an attack; measure the offset afresh
            self._timing_refusals = 0
            self.estimator.reset()
            self.errors.note(
                f"{RECALIBRATE_AFTER} beat frames in a row refused for their timing: "
                f"re-calibrating the clock offset to the pulse"
            )
            log.log(
                self.episode_log_level,
                "beat frames keep arriving off time; re-calibrating the clock offset",
            )

    def _set_timing(self, index: int, start_local: float, duration: float) -> None:
        self._local_anchor_index = index  # (two fields: no tuple per frame)
        self._local_anchor_start = start_local
        self.last_start = start_local
        self.next_due = start_local + duration

    def _advance(self, frame: BeatFrame, start_local: float, synthetic: bool) -> None:
        """Make ``frame`` the current beat, started at local time ``start_local``."""
        last = self.last_index
        if last is not None and frame.beat_index != last + 1:
            self._bar_contiguous = False
        if frame.downbeat:
            # a whole bar seen without gaps tells the bar length the pulse uses
            if self._beats_since_downbeat is not None and self._bar_contiguous:
                self.beats_per_bar = self._beats_since_downbeat
            self._beats_since_downbeat = 0
            self._bar_contiguous = True
        if self._beats_since_downbeat is not None:
            self._beats_since_downbeat += 1
        self.last_frame = frame
        self.last_index = frame.beat_index
        self.tempo_bpm = frame.tempo_bpm
        duration = 60.0 / frame.tempo_bpm
        if synthetic:
            self.last_start = start_local
            self.next_due = start_local + duration
            anchor_index = self._local_anchor_index
            if anchor_index is not None:
                anchor_start = self._local_anchor_start
                self.next_due = anchor_start + (frame.beat_index + 1 - anchor_index) * duration
        else:
            self._set_timing(frame.beat_index, start_local, duration)
        metrics = self.metrics
        metrics.beats += 1
        if frame.downbeat:
            metrics.downbeats += 1

    # ------------------------------------------------------------------ the local metronome
    def alarm(self) -> float:
        """The local time at which, with no frame meanwhile, the next beat is synthesised.

        A healthy pulse gets one beat plus the jitter tolerance; once degraded the exact schedule
        is kept. ``inf`` before the first beat.
        """
        due = self.next_due
        return due if self.degraded else due + self.jitter_tolerance

    def synthesis_due(self, now: float) -> bool:
        """Whether the pulse is silent past the alarm at local time ``now`` (synthesise a beat)."""
        return self.last_index is not None and now >= self.alarm()

    def synthesise(self, due: float, wall: float, skip: int = 0) -> BeatFrame:
        """Deliver the next beat from the local schedule (the pulse is silent); returns its frame.

        The first one starts a degraded episode. The frame continues the pulse's timeline: its
        ``deadline_at`` is the last pulse frame's plus whole beats.

        Args:
            due: the local time the beat starts (:attr:`next_due` when the alarm rang).
            wall: the wall time now (POSIX seconds).
            skip: beats after the next one whose whole duration passed already: they are
                skipped (counted in ``beats_skipped``), and the beat due now is delivered.
        """
        assert self.last_index is not None
        metrics = self.metrics
        if not self.degraded:
            self.degraded = True
            metrics.degraded_episodes += 1
            self.errors.note(f"no beat after {self.last_index}: keeping time locally")
            log.log(
                self.episode_log_level,
                "pulse silent after beat %s; degrading to local beats",
                self.last_index,
            )
        index = self.last_index + 1 + skip
        if skip:
            metrics.forward_jumps += 1
            metrics.beats_skipped += skip
        bpb = self.beats_per_bar
        duration = 60.0 / self.tempo_bpm
        deadline: _dt.datetime | None = None
        anchor_deadline = self._pulse_anchor_deadline
        if anchor_deadline is not None:
            anchor_index = self._pulse_anchor_index
            with contextlib.suppress(OverflowError):  # the pulse's timeline ends in year 9999
                step = _dt.timedelta(seconds=(index - anchor_index) * duration)
                deadline = anchor_deadline + step
        if deadline is None:
            deadline = _dt.datetime.fromtimestamp(wall + duration, _dt.UTC)
        frame = BeatFrame(
            cluster_id=self.cluster_id,
            beat_index=index,
            downbeat=index % bpb == 0,
            phase=phase_for(index, bpb),
            hlc=str(self.hlc.now()),
            deadline_at=deadline.astimezone(_dt.UTC),
            tempo_bpm=self.tempo_bpm,
            window_id=window_id(self.cluster_id, index, bpb),
        )
        metrics.degraded_beats += 1
        self.last_wall = wall
        self._advance(frame, due + skip * duration, True)
        return frame

    # ------------------------------------------------------------------ beat positions
    def position(self, now: float) -> float | None:
        """Fractional beat position at local time ``now`` (None before the first beat)."""
        if self.last_index is None or not self.tempo_bpm:
            return None
        duration = 60.0 / self.tempo_bpm
        return self.last_index + (now - self.last_start) / duration

    def deadline_for(self, target: float) -> float:
        """The local time the beat position reaches ``target`` (inf before the first beat)."""
        if self.last_index is None or not self.tempo_bpm:
            return math.inf
        return self.last_start + (target - self.last_index) * 60.0 / self.tempo_bpm
