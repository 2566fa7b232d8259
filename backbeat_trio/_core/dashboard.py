"""What the live dashboard shows, kept from the messages of one cluster, sans-IO.

:class:`DashboardState` takes the raw bytes of what arrives on the cluster's beat and bar
subjects, with the arrival times, and the claims a reverb *accepted* (never raw bytes from the
status subject: anyone allowed to publish there could forge a row), and keeps:

* the latest beat (index, phase, position in its bar) and the tempo, announced by the frames and
  measured from their arrivals (:class:`~.tempo.TempoEstimator`);
* each agent's latest accepted claim (state, progress, beats left, notes, ``wait_for``), marked
  signed only when the reverb verified its signature against the keyring;
* the last bar reports and their issues, a deadlock's detail parsed into its wait-for cycle;
* HA hand-overs: the HLC node id of the beat frames (the publishing pulse) or of the bar reports
  (the publishing reverb) changing from one message to the next.

Every change returns JSON-able *deltas* (dicts with a ``type`` and an increasing ``seq``);
:meth:`DashboardState.snapshot` is the whole state with the ``seq`` it includes. A message that
does not decode is counted per subject and skipped.
"""

from __future__ import annotations

import datetime as _dt
from collections import OrderedDict, deque
from typing import Any, Final

from .._errors import WireError
from .hlc import HLCStamp
from .tempo import TempoEstimator
from .wire import BarIssue, BarReport, BeatFrame, StatusClaim, decode

__all__ = ["DashboardState", "Delta", "deadlock_cycle"]

Delta = dict[str, Any]

_AGENT_REF: Final = "agent://"
_ERROR_TEXT_MAX: Final = 200


def deadlock_cycle(issue: BarIssue) -> list[str] | None:
    """The wait-for cycle a ``deadlock`` issue names, e.g. ``["a", "b", "a"]``.

    The reverb writes the cycle as ``a -> b -> a`` and may add `` (deadlocked group: …)``.

    Returns:
        The agents along the cycle, first repeated last; None for another kind of issue or a
        detail that names no cycle.
    """
    if issue.kind != "deadlock":
        return None
    text = issue.detail.split(" (", 1)[0]
    nodes = [part.strip() for part in text.split("->")]
    if len(nodes) < 2 or not all(nodes) or nodes[0] != nodes[-1]:
        return None
    return nodes


def _node(hlc: str) -> str | None:
    try:
        return f"{HLCStamp.parse(hlc).node:04x}"
    except WireError:
        return None


def _iso(wall: float) -> str:
    return _dt.datetime.fromtimestamp(wall, _dt.UTC).isoformat(timespec="milliseconds")


class DashboardState:
    """The dashboard's state for one cluster, fed with raw messages (no I/O, no trio).

    Args:
        cluster_id: the cluster shown; frames and reports of another cluster are counted as
            malformed.
        history: how many bar reports (and HA hand-overs) to keep.
        beats_per_bar: the bar length, when known; otherwise it is taken from the bar reports
            (``to_beat - from_beat + 1``) and assumed 4 until the first one.
        max_agents: how many agents to track; the one heard from least recently is forgotten
            first (a flood of made-up agent ids cannot grow the state without bound).
    """

    def __init__(
        self,
        cluster_id: str,
        *,
        history: int = 8,
        beats_per_bar: int | None = None,
        max_agents: int = 256,
    ) -> None:
        if history < 1:
            raise ValueError("history must be >= 1")
        self.cluster_id = cluster_id
        self.history = history
        self._bpb_known = beats_per_bar is not None
        self.beats_per_bar = beats_per_bar or 4
        self._max_agents = max_agents
        self.seq = 0
        self._tempo = TempoEstimator()
        self._beat: Delta | None = None
        self._agents: OrderedDict[str, Delta] = OrderedDict()
        self._agent_stamps: dict[str, HLCStamp] = {}
        self._reports: deque[Delta] = deque(maxlen=history)
        self._handovers: deque[Delta] = deque(maxlen=history)
        self._pulse_node: str | None = None
        self._reverb_node: str | None = None
        self.counters: dict[str, int] = {"beats": 0, "claims": 0, "reports": 0, "handovers": 0}
        self.malformed: dict[str, int] = {"beat": 0, "bar": 0}
        self.last_error = ""

    def __repr__(self) -> str:
        beat = self._beat["beat_index"] if self._beat else None
        return (
            f"<DashboardState {self.cluster_id!r} seq={self.seq} beat={beat} "
            f"agents={len(self._agents)} reports={len(self._reports)} malformed={self.malformed}>"
        )

    # --- feeding ----------------------------------------------------------------------------------
    def _next(self, kind: str, **fields: Any) -> Delta:
        self.seq += 1
        return {"type": kind, "seq": self.seq, **fields}

    def _malformed(self, subject_kind: str, problem: str) -> list[Delta]:
        self.malformed[subject_kind] += 1
        self.last_error = f"{subject_kind}: {problem}"[:_ERROR_TEXT_MAX]
        return [self._next("malformed", malformed=dict(self.malformed), last_error=self.last_error)]

    def on_beat(self, data: bytes, *, arrival: float, wall: float) -> list[Delta]:
        """A message on the beat subject.

        Args:
            data: the message body.
            arrival: local monotonic arrival time (seconds), for the measured tempo.
            wall: local wall-clock arrival (POSIX seconds), shown on the page.

        Returns:
            The deltas: a ``beat``, preceded by a ``handover`` when the pulse's node changed; a
            ``malformed`` one when the message did not decode.
        """
        try:
            frame = decode(data, BeatFrame)
        except WireError as exc:
            return self._malformed("beat", str(exc))
        if frame.cluster_id != self.cluster_id:
            return self._malformed("beat", f"frame of cluster {frame.cluster_id!r}")
        deltas: list[Delta] = []
        node = _node(frame.hlc)
        if node is not None:
            if self._pulse_node is not None and node != self._pulse_node:
                old = self._pulse_node
                deltas.append(self._handover("pulse", old, node, frame.beat_index, wall))
            self._pulse_node = node
        self.counters["beats"] += 1
        self._tempo.observe(frame.beat_index, arrival, frame.tempo_bpm)
        self._beat = self._beat_view(frame, node, wall)
        deltas.append(self._next("beat", beat=self._beat, counters=dict(self.counters)))
        return deltas

    def _beat_view(self, frame: BeatFrame, node: str | None, wall: float) -> Delta:
        bpb = self.beats_per_bar
        return {
            "beat_index": frame.beat_index,
            "phase": frame.phase,
            "downbeat": frame.downbeat,
            "window_id": frame.window_id,
            "beats_per_bar": bpb,
            "position": frame.beat_index % bpb,
            "bar": frame.beat_index // bpb + 1,
            "tempo_bpm": frame.tempo_bpm,
            "measured_bpm": round(self._tempo.measured_bpm, 2),
            "drift_ms": round(self._tempo.tempo_drift * 1000, 2),
            "deadline_at": frame.deadline_at.isoformat(),
            "pulse_node": node,
            "received_at": _iso(wall),
        }

    def on_claim(
        self, claim: StatusClaim, *, signed: bool, key: str = "", wall: float
    ) -> list[Delta]:
        """A claim a reverb accepted: the agent's row, if this claim is its latest.

        Feed it only what a verifier accepted (``ReverbStatus.watch_claims``): an agent gets a
        row only through an accepted claim. A claim older (by HLC) than the agent's latest one
        shown is counted but changes nothing; the very claim shown, handed over again (every HA
        reverb accepts each claim), is neither counted nor shown again.

        Args:
            claim: the accepted claim.
            signed: its signature verified against the keyring (False: accepted unsigned).
            key: the keyring key it verified with (std base64), shown abbreviated.
            wall: when it was accepted (POSIX seconds), shown on the page.

        Returns:
            An ``agent`` delta, or nothing.
        """
        try:
            stamp = HLCStamp.parse(claim.hlc)
        except WireError:  # a verifier has parsed it already; a hand-made claim may not be
            return []
        agent_id = claim.agent_id
        previous = self._agents.get(agent_id)
        if previous is not None:
            shown = self._agent_stamps[agent_id]
            if stamp == shown:
                return []
            if stamp < shown:
                self.counters["claims"] += 1
                # rows already handed out in deltas are never changed in place
                self._agents[agent_id] = {**previous, "claims": previous["claims"] + 1}
                return []
        self.counters["claims"] += 1
        row = {
            "agent_id": agent_id,
            "task_id": claim.task_id,
            "state": claim.state,
            "progress": claim.progress,
            "beats_left": claim.beats_left,
            "notes": claim.notes,
            "wait_for": [
                ref[len(_AGENT_REF) :] if ref.startswith(_AGENT_REF) else ref
                for ref in claim.wait_for
            ],
            "beat_index": claim.beat_index,
            "signed": signed,
            "key": key[:12] if signed else "",
            "claims": (previous["claims"] if previous else 0) + 1,
            "seen_at": _iso(wall),
        }
        self._agents[agent_id] = row
        self._agents.move_to_end(agent_id)
        self._agent_stamps[agent_id] = stamp
        while len(self._agents) > self._max_agents:
            gone, _ = self._agents.popitem(last=False)
            del self._agent_stamps[gone]
        return [self._next("agent", agent=row, counters=dict(self.counters))]

    def on_report(self, data: bytes, *, wall: float) -> list[Delta]:
        """A message on the bar subject.

        Returns:
            A ``report`` delta, preceded by a ``handover`` when the reverb's node changed; or a
            ``malformed`` one.
        """
        try:
            report = decode(data, BarReport)
        except WireError as exc:
            return self._malformed("bar", str(exc))
        if report.cluster_id != self.cluster_id:
            return self._malformed("bar", f"report of cluster {report.cluster_id!r}")
        if report.to_beat < report.from_beat:
            return self._malformed("bar", "to_beat before from_beat")
        deltas: list[Delta] = []
        node = _node(report.hlc)
        if node is not None:
            if self._reverb_node is not None and node != self._reverb_node:
                deltas.append(
                    self._handover("reverb", self._reverb_node, node, report.from_beat, wall)
                )
            self._reverb_node = node
        if not self._bpb_known:
            self.beats_per_bar = report.to_beat - report.from_beat + 1
        self.counters["reports"] += 1
        view = self._report_view(report, node, wall)
        for i, kept in enumerate(self._reports):
            if kept["window_id"] == report.window_id:  # a repeat (a restarted reverb): replace
                self._reports[i] = view
                break
        else:
            self._reports.append(view)
        deltas.append(self._next("report", report=view, counters=dict(self.counters)))
        return deltas

    def _report_view(self, report: BarReport, node: str | None, wall: float) -> Delta:
        return {
            "window_id": report.window_id,
            "from_beat": report.from_beat,
            "to_beat": report.to_beat,
            "bar": report.from_beat // (report.to_beat - report.from_beat + 1) + 1,
            "agents_reporting": report.agents_reporting,
            "claims": report.claims,
            "rejected": report.rejected,
            "late": report.late,
            "mean_progress": report.mean_progress,
            "by_state": dict(report.by_state),
            "blocked": list(report.blocked),
            "tempo_drift_ms": report.tempo_drift_ms,
            "issues": [
                {
                    "kind": issue.kind,
                    "agent_id": issue.agent_id,
                    "detail": issue.detail,
                    "cycle": deadlock_cycle(issue),
                }
                for issue in report.issues
            ],
            "reverb_node": node,
            "received_at": _iso(wall),
        }

    def _handover(self, role: str, old: str, new: str, beat_index: int, wall: float) -> Delta:
        self.counters["handovers"] += 1
        handover = {
            "role": role,
            "from_node": old,
            "to_node": new,
            "beat_index": beat_index,
            "at": _iso(wall),
        }
        self._handovers.append(handover)
        return self._next("handover", handover=handover, counters=dict(self.counters))

    # --- reading ----------------------------------------------------------------------------------
    def snapshot(self) -> Delta:
        """The whole state, as a ``snapshot`` delta (its ``seq`` is the last change it includes)."""
        return {
            "type": "snapshot",
            "seq": self.seq,
            "cluster_id": self.cluster_id,
            "history": self.history,
            "beats_per_bar": self.beats_per_bar,
            "beat": self._beat,
            "agents": sorted(self._agents.values(), key=lambda row: row["agent_id"]),
            "reports": list(self._reports),
            "handovers": list(self._handovers),
            "pulse_node": self._pulse_node,
            "reverb_node": self._reverb_node,
            "counters": dict(self.counters),
            "malformed": dict(self.malformed),
            "last_error": self.last_error,
        }
