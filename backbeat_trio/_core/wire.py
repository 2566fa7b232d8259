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

from .._errors import InvalidStatusClaim, WireError
from . import rules as R
from .edge import SCAN_ABOVE as _SCAN_ABOVE
from .edge import check_nesting, refusal

__all__ = [
    "BarIssue",
    "BarReport",
    "BeatFrame",
    "HealthStatus",
    "LegacyBeatInfo",
    "StatusClaim",
    "TempoChange",
    "decode",
    "decode_claim",
    "decode_frame",
    "encode",
    "encode_claim",
]

# --- constraint aliases -------------------------------------------------------------------------
# Every number below comes from the one table in `rules`. The three patterned fields (ids, HLC
# stamps, window ids) are checked after decoding rather than by msgspec's per-field pattern hook,
# which benchmarks/codec.py measured as most of a frame's decode time: the Struct fields carry the
# length bounds (checked in C); `decode` adds the character rules. ID_RE, HLC_RE, OPTIONAL_HLC_RE
# and WINDOW_ID_RE are those rules; error messages quote them.
ID_RE: Final = re.compile(R.ID_PATTERN)
HLC_RE: Final = re.compile(R.HLC_PATTERN)
OPTIONAL_HLC_RE: Final = re.compile(R.OPTIONAL_HLC_PATTERN)
WINDOW_ID_RE: Final = re.compile(R.WINDOW_ID_PATTERN)

# The hot path runs them as one regex per message over the message's patterned fields joined by
# `_SEP` (one regex call per message instead of one per field). `_SEP` is in none of the rules'
# character sets, so the joined string matches iff each field matches its own rule (a field
# containing `_SEP` fails, as it fails its rule alone). tests/test_wire.py checks the joined rules
# against the rules above on arbitrary strings.
_SEP: Final = " "
_FRAME_RULE: Final = re.compile(f"{R.ID_FAST} {R.HLC_FAST} {R.WINDOW_ID_FAST}").fullmatch
_CLAIM_RULE: Final = re.compile(f"{R.ID_FAST} {R.HLC_FAST}").fullmatch  # agent_id hlc
_TEMPO_RULE: Final = re.compile(f"{R.ID_FAST} (?:{R.HLC_FAST})?").fullmatch  # cluster_id hlc

Id = Annotated[str, msgspec.Meta(min_length=R.ID_MIN_LEN, max_length=R.ID_MAX_LEN)]
BeatIndex = Annotated[int, msgspec.Meta(ge=0, le=R.INT64_MAX)]
TempoBPM = Annotated[int, msgspec.Meta(ge=R.MIN_TEMPO_BPM, le=R.MAX_TEMPO_BPM)]
Phase = Annotated[str, msgspec.Meta(min_length=1, max_length=R.PHASE_MAX_LEN)]
HLCString = Annotated[str, msgspec.Meta(min_length=R.HLC_MIN_LEN, max_length=R.HLC_MAX_LEN)]
OptionalHLCString = Annotated[str, msgspec.Meta(max_length=R.HLC_MAX_LEN)]
WindowId = Annotated[str, msgspec.Meta(min_length=R.WINDOW_ID_LEN, max_length=R.WINDOW_ID_LEN)]
AwareTime = Annotated[_dt.datetime, msgspec.Meta(tz=True)]
Progress = Annotated[float, msgspec.Meta(ge=R.PROGRESS_MIN, le=R.PROGRESS_MAX)]
BeatsLeft = Annotated[int, msgspec.Meta(ge=0, le=R.INT64_MAX)]
Notes = Annotated[str, msgspec.Meta(max_length=R.NOTES_MAX_LEN)]
TaskId = Annotated[str, msgspec.Meta(min_length=1, max_length=R.TASK_ID_MAX_LEN)]
WaitRef = Annotated[str, msgspec.Meta(min_length=1, max_length=R.WAIT_REF_MAX_LEN)]
Count = Annotated[int, msgspec.Meta(ge=0, le=R.INT64_MAX)]
Text = Annotated[str, msgspec.Meta(max_length=R.TEXT_MAX_LEN)]
RequestedBy = Annotated[str, msgspec.Meta(max_length=R.REQUESTED_BY_MAX_LEN)]

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
    by_state: dict[str, Count] = msgspec.field(default_factory=dict)
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
    requested_by: RequestedBy = ""
    hlc: OptionalHLCString = ""
    reason: Text = ""


class HealthStatus(msgspec.Struct, kw_only=True):
    """A client's health, in the Go SDK's shape (durations as int nanoseconds on the wire).

    The Go fields come first; ``delivery`` and ``metrics`` are ours.
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
    """Decode and validate bytes from outside as ``type_``: the decoding edge
    (:mod:`~backbeat_trio._core.edge`) for the wire's messages and any other msgspec type.

    Raises:
        WireError: the bytes are not valid JSON, break the contract, nest too deeply or are too
            large; the message says where and ``reason`` says which.
    """
    try:
        edge = _edges[type_]
    except KeyError:  # another msgspec type (a lease record, say): its edge, made on first use
        edge = _edges[type_] = _edge(type_)
    return edge(data)  # type: ignore[no-any-return]


def _bad(value: str, field: str, regex: re.Pattern[str]) -> str:
    return f"Expected `str` matching regex {regex.pattern!r}, got {value!r} - at `$.{field}`"


# The `_check_*` functions return what is wrong with a decoded message, or None. Each first runs
# its message's joined rule (the common, valid case: one regex call); only when that fails does
# it look at the fields one by one, with the rules themselves, to say which one broke.


def _check_frame(frame: BeatFrame) -> str | None:
    if _FRAME_RULE(f"{frame.cluster_id} {frame.hlc} {frame.window_id}"):
        return None
    if not ID_RE.match(frame.cluster_id):
        return _bad(frame.cluster_id, "cluster_id", ID_RE)
    if not HLC_RE.match(frame.hlc):
        return _bad(frame.hlc, "hlc", HLC_RE)
    return _bad(frame.window_id, "window_id", WINDOW_ID_RE)


def _check_claim(claim: StatusClaim) -> str | None:
    # StatusClaim's defaults exist so users can build a claim without the fields the SDK fills
    # in; msgspec does not validate defaults, so a received claim that *omits* them would decode
    # with placeholders no sender may emit. Missing identity fields are a broken claim. (The
    # joined rule refuses an empty agent_id or hlc, so only task_id needs its own test here.)
    if claim.task_id and _CLAIM_RULE(f"{claim.agent_id} {claim.hlc}"):
        return None
    if not (claim.agent_id and claim.task_id and claim.hlc):
        missing = [name for name in ("agent_id", "task_id", "hlc") if not getattr(claim, name)]
        return f"missing required field(s) {', '.join(map(repr, missing))}"
    if not ID_RE.match(claim.agent_id):
        return _bad(claim.agent_id, "agent_id", ID_RE)
    return _bad(claim.hlc, "hlc", HLC_RE)


def _check_report(report: BarReport) -> str | None:
    if _FRAME_RULE(f"{report.cluster_id} {report.hlc} {report.window_id}"):
        return None
    if not ID_RE.match(report.cluster_id):
        return _bad(report.cluster_id, "cluster_id", ID_RE)
    if not HLC_RE.match(report.hlc):
        return _bad(report.hlc, "hlc", HLC_RE)
    return _bad(report.window_id, "window_id", WINDOW_ID_RE)


def _check_tempo(change: TempoChange) -> str | None:
    if _TEMPO_RULE(f"{change.cluster_id} {change.hlc}"):
        return None
    if not ID_RE.match(change.cluster_id):
        return _bad(change.cluster_id, "cluster_id", ID_RE)
    return _bad(change.hlc, "hlc", OPTIONAL_HLC_RE)


_POST_CHECKS: Final[dict[type[Any], Callable[[Any], str | None]]] = {
    BeatFrame: _check_frame,
    StatusClaim: _check_claim,
    BarReport: _check_report,
    TempoChange: _check_tempo,
}


def _edge(type_: type[Any]) -> Callable[[Any], Any]:
    """``type_``'s decoder behind the edge (nesting bounded first, every failure a refusal),
    followed by its post-decode check when it has one."""
    raw = _decoders[type_].decode if type_ in _decoders else msgspec.json.Decoder(type_).decode
    check = _POST_CHECKS.get(type_)
    name = type_.__name__

    def decode_at_the_edge(data: Any) -> Any:
        if len(data) > _SCAN_ABOVE:
            check_nesting(data, name)
        try:
            msg = raw(data)
        except Exception as exc:  # the edge: every decoder failure is a refusal, by reason
            raise refusal(name, exc) from exc
        problem = None if check is None else check(msg)
        if problem is not None:
            raise WireError(f"invalid {name}: {problem}")
        return msg

    return decode_at_the_edge


_decode_frame_unchecked: Final = _decoders[BeatFrame].decode
_decode_claim_unchecked: Final = _decoders[StatusClaim].decode


def decode_frame(data: bytes | bytearray | memoryview | str) -> BeatFrame:
    """``decode(data, BeatFrame)`` in one call, the same edge: every client's screen calls it
    for every frame (``_check_frame``'s joined rule inlined).

    Raises:
        WireError: as :func:`decode`.
    """
    if len(data) > _SCAN_ABOVE:
        check_nesting(data, "BeatFrame")
    try:
        frame: BeatFrame = _decode_frame_unchecked(data)
    except Exception as exc:  # the edge, as in `_edge`
        raise refusal("BeatFrame", exc) from exc
    if _FRAME_RULE(f"{frame.cluster_id} {frame.hlc} {frame.window_id}"):
        return frame
    raise WireError(f"invalid BeatFrame: {_check_frame(frame)}")


def decode_claim(data: bytes | bytearray | memoryview | str) -> StatusClaim:
    """``decode(data, StatusClaim)`` in one call, the same edge: the reverb's and
    :func:`~backbeat_trio.verify_claim`'s hot path (``_check_claim``'s fast path inlined).

    Raises:
        WireError: as :func:`decode`.
    """
    if len(data) > _SCAN_ABOVE:
        check_nesting(data, "StatusClaim")
    try:
        claim: StatusClaim = _decode_claim_unchecked(data)
    except Exception as exc:  # the edge, as in `_edge`
        raise refusal("StatusClaim", exc) from exc
    if claim.task_id and _CLAIM_RULE(f"{claim.agent_id} {claim.hlc}"):
        return claim
    raise WireError(f"invalid StatusClaim: {_check_claim(claim)}")


# type -> its edge, so `decode` is one dict lookup and one call away from msgspec
_edges: Final[dict[type[Any], Callable[[Any], Any]]] = {t: _edge(t) for t in _decoders}
_edges[BeatFrame] = decode_frame
_edges[StatusClaim] = decode_claim

_CLAIM_STATE_SET: Final = frozenset(CLAIM_STATES)
# module-level names for encode_claim's checks (a global lookup, not an attribute lookup, per test)
_INT64_MAX: Final = R.INT64_MAX
_TASK_ID_MAX_LEN: Final = R.TASK_ID_MAX_LEN
_WAIT_REF_MAX_LEN: Final = R.WAIT_REF_MAX_LEN
_NOTES_MAX_LEN: Final = R.NOTES_MAX_LEN
_PROGRESS_MIN: Final = R.PROGRESS_MIN
_PROGRESS_MAX: Final = R.PROGRESS_MAX


def encode_claim(claim: StatusClaim) -> bytes:
    """Encode a claim as Go writes it (``wait_for`` omitted when empty) and validate it.

    What is returned is exactly what a receiver's :func:`decode` accepts: a claim whose fields
    have their plain types (``str``, ``int``, ``float``, a ``list`` of ``str``) is checked field
    by field against the StatusClaim constraints; anything else (a ``str`` subclass, an ``int``
    progress, a tuple ``wait_for``...) and every invalid claim is decoded again with the
    validating decoder, which decides, and names the broken field.

    Raises:
        InvalidStatusClaim: the claim breaks a SPEC rule; nothing is returned.
    """
    agent_id, task_id, beat_index, hlc, state, wait_for, beats_left, progress, notes = (
        msgspec.structs.astuple(claim)
    )
    if type(wait_for) is not list and isinstance(wait_for, str | bytes):
        # list() would send a string as its characters, each a ref of its own
        raise InvalidStatusClaim(
            f"invalid status claim: wait_for is a list of refs, not a string: "
            f"write wait_for=[{wait_for!r}]"
        )
    try:
        data = _encoder.encode(
            _StatusClaimWire(
                agent_id=agent_id,
                task_id=task_id,
                beat_index=beat_index,
                hlc=hlc,
                state=state,
                wait_for=list(wait_for) if wait_for else msgspec.UNSET,
                beats_left=beats_left,
                progress=progress,
                notes=notes,
            )
        )
    except (TypeError, ValueError) as exc:  # unencodable: a lone surrogate, an odd object
        raise InvalidStatusClaim(f"invalid status claim: {exc}") from exc
    # Each test implies the StatusClaim field's constraint holds for the decoded value (the joined
    # rule bounds the lengths of agent_id and hlc; strings and floats survive the round trip).
    if (
        type(agent_id) is str
        and type(hlc) is str
        and _CLAIM_RULE(f"{agent_id} {hlc}")
        and type(task_id) is str
        and 0 < len(task_id) <= _TASK_ID_MAX_LEN
        and type(beat_index) is int
        and 0 <= beat_index <= _INT64_MAX
        and type(state) is str
        and state in _CLAIM_STATE_SET
        and type(beats_left) is int
        and 0 <= beats_left <= _INT64_MAX
        and type(progress) is float
        and _PROGRESS_MIN <= progress <= _PROGRESS_MAX
        and type(notes) is str
        and len(notes) <= _NOTES_MAX_LEN
        and type(wait_for) is list
        # (most claims wait for nothing: no generator to start then)
        and (
            not wait_for
            or all(type(ref) is str and 0 < len(ref) <= _WAIT_REF_MAX_LEN for ref in wait_for)
        )
    ):
        return data
    try:
        sent = _decoders[StatusClaim].decode(data)
    except msgspec.DecodeError as exc:
        raise InvalidStatusClaim(f"invalid status claim: {exc}") from exc
    problem = _check_claim(sent)
    if problem is not None:
        raise InvalidStatusClaim(f"invalid status claim: {problem}")
    return data
