"""How the commands print beats, claims, bar reports and pulse progress, one line each."""

from __future__ import annotations

import datetime as _dt
from typing import TYPE_CHECKING

import msgspec

from .._core.edge import decode_json
from .._core.signing import HEADER_AGENT, HEADER_KEY, HEADER_SIG
from .._core.wire import BarReport, BeatFrame, StatusClaim, encode

if TYPE_CHECKING:
    from .._services.lease import LeadershipChange
    from .._services.pulse import PulseStatus

__all__ = [
    "compact_json",
    "format_beat",
    "format_claim",
    "format_report",
    "format_role_change",
    "pulse_beat_line",
    "report_lines",
]


def compact_json(data: bytes) -> str:
    """One line of JSON, every field kept (including ones this version does not know)."""
    return msgspec.json.encode(decode_json(data)).decode()


def _clock(t: _dt.datetime) -> str:
    return t.astimezone(_dt.UTC).strftime("%H:%M:%S.%f")[:-3] + "Z"


def format_beat(frame: BeatFrame) -> str:
    """A beat frame as one line."""
    return (
        f"beat {frame.beat_index:>6}  {'downbeat' if frame.downbeat else '        '}  "
        f"{frame.phase:<8} {frame.tempo_bpm:>4} BPM  window {frame.window_id[:8]}  "
        f"deadline {_clock(frame.deadline_at)}"
    )


def format_claim(claim: StatusClaim, headers: dict[str, str] | None) -> str:
    """A status claim as one line, with who signed it (shown, not verified)."""
    headers = headers or {}
    if headers.get(HEADER_SIG):
        key = headers.get(HEADER_KEY, "")
        signer = headers.get(HEADER_AGENT, "?")
        signed = f"signed as {signer} (key {key[:8]}…, not verified here)"
    else:
        signed = "unsigned"
    parts = [
        f"claim {claim.agent_id}",
        claim.task_id,
        f"beat {claim.beat_index}",
        claim.state,
        f"{claim.progress * 100:.0f}%",
        f"{claim.beats_left} beats left",
    ]
    if claim.wait_for:
        parts.append("waits for " + ",".join(claim.wait_for))
    parts.append(signed)
    if claim.notes:
        parts.append(repr(claim.notes))
    return "  ".join(parts)


def format_report(report: BarReport) -> list[str]:
    """A bar report: one head line, then a line per issue."""
    head = (
        f"bar report beats {report.from_beat}-{report.to_beat}  window {report.window_id[:8]}  "
        f"agents {report.agents_reporting}  claims {report.claims}  rejected {report.rejected}  "
        f"late {report.late}  reviews {report.on_time_reviews}  "
        f"progress {report.mean_progress * 100:.0f}%  drift {report.tempo_drift_ms:+.1f} ms"
    )
    if report.blocked:
        head += f"  blocked {','.join(report.blocked)}"
    return [head] + [f"  ! {i.kind} {i.agent_id}: {i.detail}" for i in report.issues]


def report_lines(report: BarReport, as_json: bool) -> list[str]:
    """A bar report as one JSON line or as :func:`format_report`'s lines."""
    return [encode(report).decode()] if as_json else format_report(report)


def pulse_beat_line(status: PulseStatus, beats_per_bar: int, beat: int, skipped: int = 0) -> str:
    """The pulse's line for a beat it published."""
    skipped += status.skipped_disconnected + status.skipped_late
    return (
        f"beat {beat:>6}  bar {beat // beats_per_bar + 1} {beat % beats_per_bar + 1}/"
        f"{beats_per_bar}  {status.tempo_bpm} BPM  published {status.published}  "
        f"skipped {skipped}"
    )


def format_role_change(change: LeadershipChange) -> str:
    """An HA pulse's role change as one line."""
    if change.role == "leader":
        start = f" from beat {change.next_beat}" if change.next_beat is not None else ""
        return f"role leader: {change.pulse_id} leads{start} ({change.reason})"
    holder = f"; lease held by {change.holder}" if change.holder else ""
    return f"role follower: {change.pulse_id} stopped leading ({change.reason}){holder}"
