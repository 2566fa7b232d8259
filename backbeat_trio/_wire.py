"""Wire messages (SPEC.md, "Messages") as msgspec Structs, with encoders/decoders built once.

Field names and order match the Go SDK's JSON tags. Constraints are enforced on decode; a claim
built in code is validated by :func:`encode_claim`, which round-trips it through the validating
decoder before anything is signed or sent.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable
from typing import Annotated, Any, Final, Literal, TypeVar, get_args

import msgspec

from ._beats import ID_PATTERN
from ._errors import InvalidStatusClaim, WireError

__all__ = [
    "BarIssue",
    "BarReport",
    "BeatFrame",
    "HealthStatus",
    "LegacyBeatInfo",
    "StatusClaim",
    "TempoChange",
    "decode",
    "encode",
    "encode_claim",
]

# --- constraint aliases -------------------------------------------------------------------------
# The three patterned fields (ids, HLC stamps, window ids) are checked after decoding by
# `_check_patterns`, with the same regexes, rather than by msgspec: msgspec's per-field regex
# hook costs ~1 µs a field, five times a plain `fullmatch`, and is most of a frame's decode time.
# The Struct fields carry the length bounds (checked in C); `decode` adds the character rules.
ID_RE: Final = re.compile(ID_PATTERN)
# ID_RE's characters as a set: with the 1..64 length the Struct field enforces, a subset test
# is exactly ID_RE, at a third of the cost
_ID_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_HLC_BODY = r"[0-9a-fA-F]{1,16}:[0-9a-fA-F]{1,16}:[0-9a-fA-F]{1,16}"
HLC_RE: Final = re.compile(rf"^{_HLC_BODY}\Z")
OPTIONAL_HLC_RE: Final = re.compile(rf"^(?:{_HLC_BODY})?\Z")
WINDOW_ID_RE: Final = re.compile(r"^[0-9a-f]{32}\Z")

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
BeatIndex = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
TempoBPM = Annotated[int, msgspec.Meta(ge=1, le=1200)]
Phase = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
HLCString = Annotated[str, msgspec.Meta(min_length=5, max_length=50)]
OptionalHLCString = Annotated[str, msgspec.Meta(max_length=50)]
WindowId = Annotated[str, msgspec.Meta(min_length=32, max_length=32)]
AwareTime = Annotated[_dt.datetime, msgspec.Meta(tz=True)]
Progress = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
BeatsLeft = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Notes = Annotated[str, msgspec.Meta(max_length=4096)]
TaskId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
WaitRef = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]

ClaimState = Literal["executing", "planning", "waiting", "review", "done", "failed"]
CLAIM_STATES: Final[tuple[str, ...]] = get_args(ClaimState)

GO_ZERO_TIME: Final = _dt.datetime(1, 1, 1, tzinfo=_dt.UTC)


class BeatFrame(
    msgspec.Struct, kw_only=True, frozen=True, tag_field="type", tag="backbeat.beatframe.v1"
):
    """One beat, as the pulse publishes it on ``backbeat.beat.<cluster_id>``."""

    cluster_id: Id
    beat_index: BeatIndex
    downbeat: bool
    phase: Phase
    hlc: HLCString
    deadline_at: AwareTime
    tempo_bpm: TempoBPM
    window_id: WindowId

    @property
    def beat_duration(self) -> float:
        """Seconds this beat lasts at its tempo."""
        return 60.0 / self.tempo_bpm

    @property
    def started_at(self) -> _dt.datetime:
        """The beat's scheduled start (its deadline minus one beat)."""
        return self.deadline_at - _dt.timedelta(seconds=self.beat_duration)


class StatusClaim(msgspec.Struct, kw_only=True, tag_field="type", tag="backbeat.statusclaim.v1"):
    """An agent's claim about its task. ``agent_id``, ``beat_index``, ``hlc`` (and ``task_id``
    when empty) are filled in by the SDK when the claim is emitted."""

    agent_id: Id = ""
    task_id: TaskId = ""
    beat_index: BeatIndex = 0
    hlc: HLCString = ""
    state: ClaimState = "executing"
    wait_for: list[WaitRef] = msgspec.field(default_factory=list)
    beats_left: BeatsLeft = 0
    progress: Progress = 0.0
    notes: Notes = ""


class _StatusClaimWire(
    msgspec.Struct, kw_only=True, tag_field="type", tag="backbeat.statusclaim.v1"
):
    # StatusClaim as written on the wire: Go's `omitempty` on wait_for and on nothing else, which
    # msgspec can only express per struct, hence this twin used by encode_claim.
    agent_id: str
    task_id: str
    beat_index: int
    hlc: str
    state: str
    wait_for: list[str] | msgspec.UnsetType = msgspec.UNSET
    beats_left: int
    progress: float
    notes: str


class BarIssue(msgspec.Struct, kw_only=True, frozen=True):
    """One problem the reverb saw in a window (``failed``, ``stalled``, ``overrun``, …)."""

    agent_id: str
    kind: str
    detail: str = ""


class BarReport(msgspec.Struct, kw_only=True, tag_field="type", tag="backbeat.barreport.v1"):
    """The reverb's summary of one window, published once on ``backbeat.bar.<cluster_id>``."""

    cluster_id: Id
    window_id: WindowId
    from_beat: BeatIndex
    to_beat: BeatIndex
    hlc: HLCString
    agents_reporting: Count = 0
    claims: Count = 0
    by_state: dict[str, int] = msgspec.field(default_factory=dict)
    on_time_reviews: Count = 0
    late: Count = 0
    rejected: Count = 0
    mean_progress: float = 0.0
    max_beats_left: Count = 0
    tempo_drift_ms: float = 0.0
    blocked: list[str] = msgspec.field(default_factory=list)
    issues: list[BarIssue] = msgspec.field(default_factory=list)


class TempoChange(
    msgspec.Struct, kw_only=True, frozen=True, tag_field="type", tag="backbeat.tempochange.v1"
):
    """A request to change a cluster's tempo, published on ``backbeat.tempo.<cluster_id>``."""

    cluster_id: Id
    tempo_bpm: TempoBPM
    requested_by: Annotated[str, msgspec.Meta(max_length=128)] = ""
    hlc: OptionalHLCString = ""
    reason: Text = ""


class HealthStatus(msgspec.Struct, kw_only=True):
    """A client's health, in the Go SDK's shape (durations as int nanoseconds on the wire).

    The Go fields come first; ``delivery``, ``degraded_since`` and ``metrics`` are ours.
    """

    connected: bool = False
    last_beat: int = 0
    last_beat_time: _dt.datetime = GO_ZERO_TIME
    time_drift: int = 0
    reconnect_count: int = 0
    local_degradation: bool = False
    current_tempo: int = 0
    tempo_drift: int = 0
    measured_bpm: float = 0.0
    errors: list[str] | None = msgspec.field(default_factory=list)  # Go may send null
    delivery: str = "core"
    metrics: dict[str, int] = msgspec.field(default_factory=dict)

    @property
    def time_drift_s(self) -> float:
        """``time_drift`` in seconds."""
        return self.time_drift / 1e9

    @property
    def tempo_drift_s(self) -> float:
        """``tempo_drift`` in seconds."""
        return self.tempo_drift / 1e9


class LegacyBeatInfo(msgspec.Struct, frozen=True):
    """The deprecated 1-based ``{bar, beat}`` address (BACKBEAT-REQ-043)."""

    bar: Annotated[int, msgspec.Meta(ge=1)]
    beat: Annotated[int, msgspec.Meta(ge=1)]


# --- codecs, built once ------------------------------------------------------------------------
_encoder: Final = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {
    t: msgspec.json.Decoder(t)
    for t in (BeatFrame, StatusClaim, BarReport, TempoChange, HealthStatus, LegacyBeatInfo)
}

T = TypeVar("T")


def encode(msg: msgspec.Struct) -> bytes:
    """Encode any wire message to JSON bytes. Claims go through :func:`encode_claim` instead."""
    if isinstance(msg, StatusClaim):
        return encode_claim(msg)
    return _encoder.encode(msg)


def decode(data: bytes | bytearray | memoryview | str, type_: type[T]) -> T:
    """Decode and validate JSON bytes as ``type_``.

    Raises:
        WireError: the bytes are not valid JSON or break the contract; the message says where.
    """
    try:
        msg = _decoders[type_].decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise WireError(f"invalid {type_.__name__}: {exc}") from exc
    check = _POST_CHECKS.get(type_)
    if check is not None:
        problem = check(msg)
        if problem is not None:
            raise WireError(f"invalid {type_.__name__}: {problem}")
    return msg  # type: ignore[no-any-return]


def _bad(value: str, field: str, regex: re.Pattern[str]) -> str:
    return f"Expected `str` matching regex {regex.pattern!r}, got {value!r} - at `$.{field}`"


def _check_frame(frame: BeatFrame) -> str | None:
    if not _ID_CHARS.issuperset(frame.cluster_id):
        return _bad(frame.cluster_id, "cluster_id", ID_RE)
    if not HLC_RE.match(frame.hlc):
        return _bad(frame.hlc, "hlc", HLC_RE)
    if not WINDOW_ID_RE.match(frame.window_id):
        return _bad(frame.window_id, "window_id", WINDOW_ID_RE)
    return None


def _check_claim(claim: StatusClaim) -> str | None:
    # StatusClaim's defaults exist so users can build a claim without the fields the SDK fills
    # in; msgspec does not validate defaults, so a received claim that *omits* them would decode
    # with placeholders no sender may emit. Missing identity fields are a broken claim.
    if not (claim.agent_id and claim.task_id and claim.hlc):
        missing = [name for name in ("agent_id", "task_id", "hlc") if not getattr(claim, name)]
        return f"missing required field(s) {', '.join(map(repr, missing))}"
    if not _ID_CHARS.issuperset(claim.agent_id):
        return _bad(claim.agent_id, "agent_id", ID_RE)
    if not HLC_RE.match(claim.hlc):
        return _bad(claim.hlc, "hlc", HLC_RE)
    return None


def _check_report(report: BarReport) -> str | None:
    if not _ID_CHARS.issuperset(report.cluster_id):
        return _bad(report.cluster_id, "cluster_id", ID_RE)
    if not HLC_RE.match(report.hlc):
        return _bad(report.hlc, "hlc", HLC_RE)
    if not WINDOW_ID_RE.match(report.window_id):
        return _bad(report.window_id, "window_id", WINDOW_ID_RE)
    return None


def _check_tempo(change: TempoChange) -> str | None:
    if not _ID_CHARS.issuperset(change.cluster_id):
        return _bad(change.cluster_id, "cluster_id", ID_RE)
    if not OPTIONAL_HLC_RE.match(change.hlc):
        return _bad(change.hlc, "hlc", OPTIONAL_HLC_RE)
    return None


_POST_CHECKS: Final[dict[type[Any], Callable[[Any], str | None]]] = {
    BeatFrame: _check_frame,
    StatusClaim: _check_claim,
    BarReport: _check_report,
    TempoChange: _check_tempo,
}


def encode_claim(claim: StatusClaim) -> bytes:
    """Encode a claim as Go writes it (``wait_for`` omitted when empty) and validate it.

    The bytes are decoded again with the validating decoder, so what is returned is exactly what a
    receiver will accept.

    Raises:
        InvalidStatusClaim: the claim breaks a SPEC rule; nothing is returned.
    """
    try:
        data = _encoder.encode(
            _StatusClaimWire(
                agent_id=claim.agent_id,
                task_id=claim.task_id,
                beat_index=claim.beat_index,
                hlc=claim.hlc,
                state=claim.state,
                wait_for=list(claim.wait_for) if claim.wait_for else msgspec.UNSET,
                beats_left=claim.beats_left,
                progress=claim.progress,
                notes=claim.notes,
            )
        )
        _decoders[StatusClaim].decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, TypeError, ValueError) as exc:
        raise InvalidStatusClaim(f"invalid status claim: {exc}") from exc
    problem = _check_claim(claim)
    if problem is not None:
        raise InvalidStatusClaim(f"invalid status claim: {problem}")
    return data
