"""The reverb's bar aggregation, sans-IO: claims and beats in, one BarReport per window out.

The I/O layer feeds :meth:`BarAggregator.observe_beat` every beat frame it receives and
:meth:`BarAggregator.add_claim` every verified claim (and :meth:`BarAggregator.reject` every one
it dropped), then calls :meth:`BarAggregator.close_window` when it decides a window is complete.
Times are plain floats in the caller's clock.

Rules SPEC.md leaves open, decided here:

* A claim belongs to the window of its ``beat_index``. A claim naming a window that is already
  closed (or older) counts as ``late``, in the next report, and not among any window's claims;
  what it says of its agent (its state, a failure, an estimate) still stands in the window open
  when it arrives, as an older claim of that window would (a later claim of the agent wins): a
  failure stamped just before its bar closed shows in the next report, and the agent that sent
  it is not ``stalled``. Claims
  left in an older window that was never closed (the caller skipped it) count as ``late`` in the
  report that passes over them. A claim naming a window more than ``max_windows_ahead`` windows
  beyond the current one is rejected (it would pin memory). The reverb hands claims over only
  once it has observed a beat, so there is always a current window to measure "ahead" from.
* ``beat_index`` is an int64 (SPEC), and so is every index a report carries. A window is opened
  only when it *and the window after it* end within int64 (a window is closed by a beat of the
  next one, so the last window int64 holds could never be reported): a beat in any later window
  is refused and counted in :attr:`BarAggregator.beats_refused`, a claim naming one is rejected,
  both under the reason ``int64``. Every report's ``from_beat`` and ``to_beat`` are in
  ``[0, 2**63 - 1]``.
* Each agent's *latest* claim is ordered by ``(beat_index, hlc, arrival order)``. ``mean_progress``
  and ``max_beats_left`` are over each reporting agent's latest claim in the window.
* Agent state persists across windows: ``blocked`` and ``deadlock`` use every tracked agent's latest
  claim up to and including the window, even if the agent sent nothing new in it. An agent that
  stays silent is reported ``stalled`` in each of ``forget_after_windows`` consecutive reports,
  then forgotten (dropping out of ``blocked`` and of the deadlock graph). An agent whose latest
  claim is ``done`` or ``failed`` has finished; its silence is not a stall. Nor is silence in a
  window the caller closes as ``blind`` (it could not read all of it): its claims arrive ``late``.
  After a blind window, every agent tracked then is *unheard* until one of its claims is counted
  in a later window: while the caller says it is still ``catching_up`` (agents reconnect on their
  own schedule, and re-send what waited in their outboxes before anything new), an unheard
  agent's silence is not a stall either, and does not age it; once the caller stops catching up,
  every agent is judged again as usual.
* ``failed``: one issue per ``(agent, task)`` with any ``failed`` claim in the window.
* ``overrun`` (SPEC): one per tracked ``(agent, task)`` that gave an estimate (``beats_left > 0``)
  and is not ``done``, ``failed`` or ``review`` once it ran out: its latest claim says 0 beats
  left, or more beats passed from its latest estimate's ``beat_index`` to the window's last beat
  than that estimate gave. Tasks are tracked across windows (a task silent past its estimate is
  reported until forgotten with its agent), at most ``max_tasks_per_agent`` per agent and
  ``max_tasks`` in all: past a bound the task claimed least recently (of that agent, or of all)
  is forgotten, a blind spot, never a false report.
* ``deadlock``: the graph's nodes are tracked agents whose latest claim is ``waiting``; an edge
  ``a -> b`` is a ``wait_for`` ref exactly ``agent://b``. One issue per strongly connected component
  that holds a cycle (including a self-wait), so a tangle of cycles is one issue, not an
  exponential number; the issue's ``agent_id`` is the component's smallest id and the detail names
  the shortest cycle through it, e.g. ``a -> b -> a``, plus the whole group when it is larger.
* Issues are ordered deadlock, failed, overrun, stalled, then by agent id and detail. More than
  100 are cut to 99 plus one ``truncated`` issue saying how many were left out.
* ``tempo_drift_ms`` averages, per beat, the excess of the observed interval between consecutive
  received beats over the nominal one (60 / the earlier beat's tempo); a gap of missed beats
  counts as that many beats. An interval is credited to the window of its later beat.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Final, Literal

from .._core.beats import bar_start, validate_beats_per_bar, validate_id, window_id
from .._core.hlc import HLCStamp
from .._core.rules import INT64_MAX
from .._core.wire import CLAIM_STATES, BarIssue, BarReport, BeatFrame, StatusClaim
from .._errors import ConfigError, WireError
from .deadlock import deadlock_groups, find_deadlocks

__all__ = [
    "MAX_ISSUES",
    "MAX_TASKS",
    "MAX_TASKS_PER_AGENT",
    "OUT_OF_RANGE",
    "TOO_FAR_AHEAD",
    "BarAggregator",
    "ClaimOutcome",
    "find_deadlocks",
]

MAX_ISSUES: Final = 100
AGENT_REF_PREFIX: Final = "agent://"
TERMINAL_STATES: Final = frozenset({"done", "failed"})
#: A task in one of these states has stopped spending its estimate: it is never overrun.
OFF_THE_CLOCK: Final = frozenset({"done", "failed", "review"})
#: Default bounds on the tasks remembered across windows (hostile input names any number).
MAX_TASKS_PER_AGENT: Final = 256
MAX_TASKS: Final = 10_000
_KIND_ORDER: Final = {"deadlock": 0, "failed": 1, "overrun": 2, "stalled": 3}
_NOTE_EXCERPT: Final = 200
#: Rejection reason of a claim naming a window more than ``max_windows_ahead`` ahead.
TOO_FAR_AHEAD: Final = "claim names a window too far ahead"
#: Refusal reason of a beat or a claim whose window arithmetic would leave int64.
OUT_OF_RANGE: Final = "int64"

ClaimOutcome = Literal["counted", "late", "rejected"]
_Key = tuple[int, tuple[int, int, int], int]


def _hlc_key(text: str) -> tuple[int, int, int]:
    try:
        return tuple(HLCStamp.parse(text))  # type: ignore[return-value]
    except WireError:
        return (-1, -1, -1)


@dataclass(slots=True)
class _Window:
    claims: int = 0
    by_state: Counter[str] = field(default_factory=Counter)
    latest_by_agent: dict[str, tuple[_Key, StatusClaim]] = field(default_factory=dict)
    latest_by_task: dict[tuple[str, str], tuple[_Key, StatusClaim]] = field(default_factory=dict)
    #: each task's latest claim with ``beats_left > 0``: its key, beat and the beats it gave
    estimate_by_task: dict[tuple[str, str], tuple[_Key, int, int]] = field(default_factory=dict)
    failed: dict[tuple[str, str], StatusClaim] = field(default_factory=dict)
    on_time_reviews: set[str] = field(default_factory=set)
    drift_excess_s: float = 0.0
    drift_beats: int = 0


@dataclass(slots=True)
class _Track:
    key: _Key
    claim: StatusClaim
    silent_windows: int = 0


@dataclass(slots=True)
class _TaskTrack:
    # only what the overrun rule reads: a claim's notes and wait_for are not kept per task
    key: _Key
    state: str
    beats_left: int
    progress: float
    #: the latest estimate: its claim's key, ``beat_index`` and ``beats_left``
    estimate: tuple[_Key, int, int] | None = None

    def take(self, key: _Key, claim: StatusClaim) -> None:
        if key > self.key:
            self.key, self.state = key, claim.state
            self.beats_left, self.progress = claim.beats_left, claim.progress

    def overrun(self, task: str, last_beat: int) -> str | None:
        """The overrun issue's detail at ``last_beat``, or None when the task is not overrun."""
        if self.estimate is None or self.state in OFF_THE_CLOCK:
            return None
        _, at, gave = self.estimate
        progress = f"progress {self.progress:.0%}"
        if self.beats_left == 0:
            return (
                f"task {task} has 0 beats left but is {self.state} ({progress}; "
                f"it estimated {gave} beat(s) at beat {at})"
            )
        passed = last_beat - at
        if passed > gave:
            return (
                f"task {task} is still {self.state} {passed} beats after estimating {gave} "
                f"at beat {at} ({progress})"
            )
        return None


class BarAggregator:
    """Aggregates one cluster's claims and beats into one :class:`BarReport` per window.

    Args:
        cluster_id: the cluster.
        beats_per_bar: bar (window) length.
        forget_after_windows: consecutive silent windows after which an agent is forgotten.
        max_windows_ahead: claims naming a window further ahead of the current one are rejected.
        max_tasks_per_agent: tasks of one agent remembered across windows (for ``overrun``).
        max_tasks: tasks remembered across windows in all.

    Raises:
        ConfigError: an argument breaks a rule.
    """

    def __init__(
        self,
        cluster_id: str,
        *,
        beats_per_bar: int = 4,
        forget_after_windows: int = 8,
        max_windows_ahead: int = 16,
        max_tasks_per_agent: int = MAX_TASKS_PER_AGENT,
        max_tasks: int = MAX_TASKS,
    ) -> None:
        self.cluster_id = validate_id("cluster_id", cluster_id)
        self.beats_per_bar = validate_beats_per_bar(beats_per_bar)
        if forget_after_windows < 1:
            raise ConfigError("forget_after_windows", f"must be >= 1, got {forget_after_windows}")
        if max_windows_ahead < 0:
            raise ConfigError("max_windows_ahead", f"must be >= 0, got {max_windows_ahead}")
        for name, bound in (("max_tasks_per_agent", max_tasks_per_agent), ("max_tasks", max_tasks)):
            if bound < 1:
                raise ConfigError(name, f"must be >= 1, got {bound}")
        self.forget_after_windows = forget_after_windows
        self.max_tasks_per_agent = max_tasks_per_agent
        self.max_tasks = max_tasks
        self.max_windows_ahead = max_windows_ahead
        self._windows: dict[int, _Window] = {}
        self._agents: dict[str, _Track] = {}
        # agents not counted in a window since the latest blind one (see close_window)
        self._unheard: set[str] = set()
        # each agent's tasks, and every task, least recently claimed first
        self._tasks: dict[str, dict[str, _TaskTrack]] = {}
        self._task_order: dict[tuple[str, str], None] = {}
        self.tasks_evicted = 0
        """Tasks forgotten for a bound so far (cumulative)."""
        self._closed_through: int | None = None
        self._last_beat: tuple[int, float, int] | None = None  # index, arrival, tempo
        self._late = 0
        self._rejected = 0
        self._seq = 0
        self.rejection_reasons: Counter[str] = Counter()
        """Every rejection so far, by reason (cumulative, for metrics)."""
        self.beats_refused: Counter[str] = Counter()
        """Beats refused so far, by reason (cumulative): ``int64``."""
        self.reports_closed = 0

    def __repr__(self) -> str:
        return (
            f"<BarAggregator {self.cluster_id} bar={self.beats_per_bar} "
            f"window={self.current_window_start} closed_through={self._closed_through} "
            f"open={sorted(self._windows)} agents={len(self._agents)} "
            f"pending_late={self._late} pending_rejected={self._rejected}>"
        )

    # --- reading ---------------------------------------------------------------------------------
    @property
    def current_window_start(self) -> int | None:
        """First beat of the window of the latest beat observed, or None before any beat."""
        if self._last_beat is None:
            return None
        return bar_start(self._last_beat[0], self.beats_per_bar)

    @property
    def last_beat_index(self) -> int | None:
        """The latest beat index observed, or None."""
        return None if self._last_beat is None else self._last_beat[0]

    @property
    def closed_through(self) -> int | None:
        """First beat of the latest window closed, or None."""
        return self._closed_through

    @property
    def tracked_agents(self) -> list[str]:
        """Agents whose state is remembered across windows, sorted."""
        return sorted(self._agents)

    @property
    def tracked_tasks(self) -> int:
        """Tasks remembered across windows (for ``overrun``)."""
        return len(self._task_order)

    def _window(self, start: int) -> _Window:
        w = self._windows.get(start)
        if w is None:
            w = self._windows[start] = _Window()
        return w

    def _is_closed(self, start: int) -> bool:
        return self._closed_through is not None and start <= self._closed_through

    def _reportable(self, start: int) -> bool:
        # the window and the next one (whose first beat closes it) both end within int64
        return start >= 0 and start + 2 * self.beats_per_bar - 1 <= INT64_MAX

    # --- input -----------------------------------------------------------------------------------
    def observe_beat(
        self, beat: BeatFrame | int, arrival: float, tempo_bpm: int | None = None
    ) -> int | None:
        """Record a received beat (for ``tempo_drift_ms`` and the current window).

        Duplicate or out-of-order beats (index not above the last one) are ignored. A beat
        outside int64, or in a window that could never be reported within it, is refused and
        counted in :attr:`beats_refused` (``int64``).

        Args:
            beat: the frame, or a beat index (then ``tempo_bpm`` is required).
            arrival: when it arrived, in the caller's clock (seconds).
            tempo_bpm: the frame's tempo, when ``beat`` is an index.

        Returns:
            The first beat of the window this beat *left*, when it opened a new window (a cue to
            close that window, now or after a grace period); otherwise None.

        Raises:
            ValueError: ``beat`` is an index and ``tempo_bpm`` is missing or not positive.
        """
        if isinstance(beat, BeatFrame):
            index, tempo = beat.beat_index, beat.tempo_bpm
        else:
            if tempo_bpm is None or tempo_bpm <= 0:
                raise ValueError("observe_beat(index, ...) needs a positive tempo_bpm")
            index, tempo = beat, tempo_bpm
        if not self._reportable(bar_start(index, self.beats_per_bar)):
            self.beats_refused[OUT_OF_RANGE] += 1
            return None
        prev = self._last_beat
        if prev is not None and index <= prev[0]:
            return None
        start = bar_start(index, self.beats_per_bar)
        if prev is not None and not self._is_closed(start):
            gap = index - prev[0]
            w = self._window(start)
            w.drift_excess_s += (arrival - prev[1]) - gap * 60 / prev[2]
            w.drift_beats += gap
        self._last_beat = (index, arrival, tempo)
        if prev is None:
            return None
        left = bar_start(prev[0], self.beats_per_bar)
        return left if left != start else None

    def add_claim(self, claim: StatusClaim, arrival_beat: int | None = None) -> ClaimOutcome:
        """Count a verified claim in the window of its ``beat_index``.

        Args:
            claim: the claim (already decoded and verified).
            arrival_beat: the beat current when it arrived; defaults to the latest beat observed
                (or the claim's own beat before any). A ``review``/``done`` claim is an on-time
                review when this lies inside the claim's window.

        Returns:
            ``"counted"``, ``"late"`` (its window was already reported; counted in the next
            report) or ``"rejected"`` (it names a window too far ahead, or one past int64).
        """
        bpb = self.beats_per_bar
        start = bar_start(claim.beat_index, bpb)
        if not self._reportable(start):
            self.reject(OUT_OF_RANGE)
            return "rejected"
        if self._is_closed(start):
            self._late += 1
            current = self.current_window_start
            if current is not None and not self._is_closed(current):
                self._seq += 1
                carried: _Key = (claim.beat_index, _hlc_key(claim.hlc), self._seq)
                self._note(self._window(current), claim, carried)
            return "late"
        ref = self.current_window_start
        if ref is None and self._closed_through is not None:
            ref = self._closed_through + bpb
        if ref is not None and start > ref + self.max_windows_ahead * bpb:
            self.reject(TOO_FAR_AHEAD)
            return "rejected"
        w = self._window(start)
        w.claims += 1
        w.by_state[claim.state] += 1
        self._seq += 1
        key: _Key = (claim.beat_index, _hlc_key(claim.hlc), self._seq)
        self._note(w, claim, key)
        if arrival_beat is None:
            arrival_beat = self._last_beat[0] if self._last_beat else claim.beat_index
        if claim.state in ("review", "done") and start <= arrival_beat < start + bpb:
            w.on_time_reviews.add(claim.agent_id)
        return "counted"

    @staticmethod
    def _note(w: _Window, claim: StatusClaim, key: _Key) -> None:
        """What ``claim`` says of its agent and task, kept in window ``w``'s state."""
        agent, task = claim.agent_id, claim.task_id
        held = w.latest_by_agent.get(agent)
        if held is None or key > held[0]:
            w.latest_by_agent[agent] = (key, claim)
        held = w.latest_by_task.get((agent, task))
        if held is None or key > held[0]:
            w.latest_by_task[(agent, task)] = (key, claim)
        if claim.beats_left > 0:
            est = w.estimate_by_task.get((agent, task))
            if est is None or key > est[0]:
                w.estimate_by_task[(agent, task)] = (key, claim.beat_index, claim.beats_left)
        if claim.state == "failed":
            w.failed.setdefault((agent, task), claim)

    def reject(self, reason: str) -> None:
        """Count a claim dropped for a bad signature, bad schema or replay (in the next report).

        Args:
            reason: a short reason, tallied in :attr:`rejection_reasons`.
        """
        self._rejected += 1
        self.rejection_reasons[reason] += 1

    def _fold_tasks(self, w: _Window) -> None:
        # oldest claim first, so each task lands at the recent end in the order it claimed
        for (agent, task), (key, claim) in sorted(
            w.latest_by_task.items(), key=lambda item: item[1][0]
        ):
            tasks = self._tasks.setdefault(agent, {})
            track = tasks.pop(task, None)
            self._task_order.pop((agent, task), None)
            if track is None:
                track = _TaskTrack(key, claim.state, claim.beats_left, claim.progress)
            else:
                track.take(key, claim)
            estimate = w.estimate_by_task.get((agent, task))
            if estimate is not None and (track.estimate is None or estimate[0] > track.estimate[0]):
                track.estimate = estimate
            tasks[task] = track
            self._task_order[(agent, task)] = None
            if len(tasks) > self.max_tasks_per_agent:
                oldest = next(iter(tasks))
                del tasks[oldest], self._task_order[(agent, oldest)]
                self.tasks_evicted += 1
        while len(self._task_order) > self.max_tasks:
            agent, task = next(iter(self._task_order))
            del self._task_order[(agent, task)]
            tasks = self._tasks[agent]
            del tasks[task]
            if not tasks:
                del self._tasks[agent]
            self.tasks_evicted += 1

    # --- output ----------------------------------------------------------------------------------
    def close_window(
        self, window_first_beat: int, hlc: str, *, blind: bool = False, catching_up: bool = False
    ) -> BarReport:
        """Close a window and build its report; later claims naming it count as ``late``.

        Args:
            window_first_beat: the window's first beat (a multiple of ``beats_per_bar``), after
                every window closed so far.
            hlc: the report's HLC stamp (the caller's clock).
            blind: the caller could not read claims for part of the window (its connection
                was down, or it was catching up): an agent silent in it is not ``stalled``,
                and the window does not count towards forgetting it.
            catching_up: the caller read again only a short while ago after a blind window:
                an agent not heard from in a window since then is not ``stalled`` (it may still
                be reconnecting or re-sending its outbox) and is not aged.

        Returns:
            The report, every SPEC field filled in.

        Raises:
            ValueError: ``window_first_beat`` is not a bar start, is not after the last window
                closed, or is a window past int64 (one no beat could have opened).
        """
        bpb = self.beats_per_bar
        start = window_first_beat
        if start < 0 or start % bpb:
            raise ValueError(f"{start} is not the first beat of a {bpb}-beat window")
        if not self._reportable(start):
            raise ValueError(f"window {start} of {bpb} beats is past int64")
        if self._is_closed(start):
            raise ValueError(
                f"window {start} is not after the last closed one, {self._closed_through}"
            )
        w = self._windows.pop(start, None) or _Window()
        late = self._late + sum(
            self._windows.pop(s).claims for s in sorted(self._windows) if s < start
        )
        rejected = self._rejected
        self._late = self._rejected = 0
        self._closed_through = start
        self.reports_closed += 1

        # Fold this window's claims into the per-agent state, then age the silent agents.
        reporting = w.latest_by_agent
        for agent, (key, claim) in reporting.items():
            track = self._agents.get(agent)
            if track is None:
                self._agents[agent] = _Track(key, claim)
            else:
                if key > track.key:
                    track.key, track.claim = key, claim
                track.silent_windows = 0
        self._fold_tasks(w)
        unheard = self._unheard
        if blind:
            unheard.update(self._agents)  # any of them may have claims waiting in an outbox
        elif catching_up:
            unheard.difference_update(reporting)
        else:
            unheard.clear()
        issues: list[BarIssue] = []
        for agent, track in self._agents.items():
            if agent in reporting or blind or agent in unheard:
                continue
            track.silent_windows += 1
            if track.claim.state not in TERMINAL_STATES:
                issues.append(
                    BarIssue(
                        agent_id=agent,
                        kind="stalled",
                        detail=(
                            f"no claim for {track.silent_windows} window(s); last claim at beat "
                            f"{track.claim.beat_index} ({track.claim.state}, "
                            f"task {track.claim.task_id})"
                        ),
                    )
                )

        for (agent, task), claim in w.failed.items():
            note = f": {claim.notes[:_NOTE_EXCERPT]}" if claim.notes else ""
            issues.append(
                BarIssue(agent_id=agent, kind="failed", detail=f"task {task} failed{note}")
            )
        last_beat = start + bpb - 1
        for agent, tasks in self._tasks.items():
            for task, task_track in tasks.items():
                detail = task_track.overrun(task, last_beat)
                if detail is not None:
                    issues.append(BarIssue(agent_id=agent, kind="overrun", detail=detail))

        waiting = {a: t.claim for a, t in self._agents.items() if t.claim.state == "waiting"}
        blocked = sorted(a for a, c in waiting.items() if c.wait_for)
        graph = {
            a: [r[len(AGENT_REF_PREFIX) :] for r in c.wait_for if r.startswith(AGENT_REF_PREFIX)]
            for a, c in waiting.items()
        }
        for cycle, group in deadlock_groups(graph):
            detail = " -> ".join(cycle)
            if len(group) > len(cycle) - 1:
                detail += f" (deadlocked group: {', '.join(sorted(group))})"
            issues.append(BarIssue(agent_id=cycle[0], kind="deadlock", detail=detail))

        issues.sort(key=lambda i: (_KIND_ORDER.get(i.kind, len(_KIND_ORDER)), i.agent_id, i.detail))
        if len(issues) > MAX_ISSUES:
            left_out = len(issues) - (MAX_ISSUES - 1)
            issues = issues[: MAX_ISSUES - 1]
            issues.append(
                BarIssue(
                    agent_id="", kind="truncated", detail=f"{left_out} more issue(s) not listed"
                )
            )

        for agent in [
            a for a, t in self._agents.items() if t.silent_windows >= self.forget_after_windows
        ]:
            del self._agents[agent]
            unheard.discard(agent)
            for task in self._tasks.pop(agent, {}):
                del self._task_order[(agent, task)]

        latest = [claim for _, claim in reporting.values()]
        by_state = {s: w.by_state[s] for s in CLAIM_STATES if w.by_state[s]}
        by_state.update({s: n for s, n in sorted(w.by_state.items()) if s not in by_state and n})
        return BarReport(
            cluster_id=self.cluster_id,
            window_id=window_id(self.cluster_id, start, bpb),
            from_beat=start,
            to_beat=start + bpb - 1,
            hlc=hlc,
            agents_reporting=len(reporting),
            claims=w.claims,
            by_state=by_state,
            on_time_reviews=len(w.on_time_reviews),
            late=late,
            rejected=rejected,
            mean_progress=sum(c.progress for c in latest) / len(latest) if latest else 0.0,
            max_beats_left=max((c.beats_left for c in latest), default=0),
            tempo_drift_ms=1000 * w.drift_excess_s / w.drift_beats if w.drift_beats else 0.0,
            blocked=blocked,
            issues=issues,
        )
