"""Wire messages: round trips, constraints, RFC 3339 handling and Go golden vectors."""

from __future__ import annotations

import datetime as dt
import json
import re
import string
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backbeat_trio._core import wire as _wire
from backbeat_trio._core.beats import window_id
from backbeat_trio._core.hlc import HLCStamp
from backbeat_trio._core.wire import (
    CLAIM_STATES,
    GO_ZERO_TIME,
    HLC_RE,
    ID_RE,
    OPTIONAL_HLC_RE,
    WINDOW_ID_RE,
    BarIssue,
    BarReport,
    BeatFrame,
    HealthStatus,
    LegacyBeatInfo,
    StatusClaim,
    TempoChange,
    decode,
    encode,
    encode_claim,
)
from backbeat_trio._errors import InvalidStatusClaim, WireError

UTC = dt.UTC

# --- strategies ----------------------------------------------------------------------------------
ids = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")
beat_indexes = st.integers(min_value=0, max_value=2**63 - 1)
hlcs = st.builds(
    lambda wall, c, n: str(HLCStamp(wall, c, n)),
    st.integers(0, 2**48 - 1),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
)
window_ids = st.from_regex(r"\A[0-9a-f]{32}\Z")
tempos = st.integers(min_value=1, max_value=1200)
offsets = st.builds(lambda m: dt.timezone(dt.timedelta(minutes=m)), st.integers(-23 * 60, 23 * 60))
aware_times = st.datetimes(
    min_value=dt.datetime(1970, 1, 1), max_value=dt.datetime(2200, 1, 1), timezones=offsets
)
utc_times = st.datetimes(
    min_value=dt.datetime(1970, 1, 1), max_value=dt.datetime(2200, 1, 1), timezones=st.just(UTC)
)
finite = st.floats(allow_nan=False, allow_infinity=False)
counts = st.integers(min_value=0, max_value=2**63 - 1)

beat_frames = st.builds(
    BeatFrame,
    cluster_id=ids,
    beat_index=beat_indexes,
    downbeat=st.booleans(),
    phase=st.text(min_size=1, max_size=64),
    hlc=hlcs,
    deadline_at=aware_times,
    tempo_bpm=tempos,
    window_id=window_ids,
)
status_claims = st.builds(
    StatusClaim,
    agent_id=ids,
    task_id=st.text(min_size=1, max_size=128),
    beat_index=beat_indexes,
    hlc=hlcs,
    state=st.sampled_from(CLAIM_STATES),
    wait_for=st.lists(st.text(min_size=1, max_size=256), max_size=5),
    beats_left=counts,
    progress=st.floats(min_value=0.0, max_value=1.0),
    notes=st.text(max_size=300),
)
bar_reports = st.builds(
    BarReport,
    cluster_id=ids,
    window_id=window_ids,
    from_beat=beat_indexes,
    to_beat=beat_indexes,
    hlc=hlcs,
    agents_reporting=counts,
    claims=counts,
    by_state=st.dictionaries(st.sampled_from(CLAIM_STATES), st.integers(0, 10_000)),
    on_time_reviews=counts,
    late=counts,
    rejected=counts,
    mean_progress=finite,
    max_beats_left=counts,
    tempo_drift_ms=finite,
    blocked=st.lists(ids, max_size=5),
    issues=st.lists(
        st.builds(
            BarIssue,
            agent_id=ids,
            kind=st.sampled_from(["failed", "stalled", "overrun", "deadlock"]),
            detail=st.text(max_size=50),
        ),
        max_size=5,
    ),
)
tempo_changes = st.builds(
    TempoChange,
    cluster_id=ids,
    tempo_bpm=tempos,
    requested_by=st.text(max_size=128),
    hlc=st.one_of(st.just(""), hlcs),
    reason=st.text(max_size=200),
)
health_statuses = st.builds(
    HealthStatus,
    connected=st.booleans(),
    last_beat=beat_indexes,
    last_beat_time=utc_times,
    time_drift=st.integers(-(2**63), 2**63 - 1),
    reconnect_count=st.integers(0, 2**31),
    local_degradation=st.booleans(),
    current_tempo=st.integers(0, 1200),
    tempo_drift=st.integers(-(2**63), 2**63 - 1),
    measured_bpm=finite,
    errors=st.lists(st.text(max_size=30), max_size=3),
    delivery=st.sampled_from(["core", "jetstream"]),
    metrics=st.dictionaries(st.text(max_size=10), st.integers(0, 2**40), max_size=3),
)
legacy_infos = st.builds(LegacyBeatInfo, bar=st.integers(1, 2**62), beat=st.integers(1, 2**16))

MESSAGE_STRATEGIES = {
    "BeatFrame": beat_frames,
    "StatusClaim": status_claims,
    "BarReport": bar_reports,
    "TempoChange": tempo_changes,
    "HealthStatus": health_statuses,
    "LegacyBeatInfo": legacy_infos,
}


# --- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("type_name", MESSAGE_STRATEGIES)
def test_every_message_type_round_trips(type_name: str) -> None:
    @given(MESSAGE_STRATEGIES[type_name])
    def round_trip(msg: msgspec.Struct) -> None:
        assert type(msg).__name__ == type_name
        data = encode(msg)
        assert decode(data, type(msg)) == msg

    round_trip()


@given(status_claims)
def test_claims_encode_with_omitempty_wait_for(claim: StatusClaim) -> None:
    obj = json.loads(encode_claim(claim))
    assert ("wait_for" in obj) == bool(claim.wait_for)
    assert obj["type"] == "backbeat.statusclaim.v1"


def test_wait_for_omitted_when_empty_present_when_not() -> None:
    claim = StatusClaim(agent_id="a", task_id="t", hlc="1:2:3", state="waiting")
    assert b"wait_for" not in encode_claim(claim)
    claim.wait_for = ["agent://b"]
    assert json.loads(encode_claim(claim))["wait_for"] == ["agent://b"]
    # a missing wait_for decodes as empty, like Go's nil slice
    data = b'{"type":"backbeat.statusclaim.v1","agent_id":"a","task_id":"t","hlc":"1:2:3"}'
    assert decode(data, StatusClaim).wait_for == []


def test_unknown_fields_are_ignored() -> None:
    data = (
        b'{"type":"backbeat.tempochange.v1","cluster_id":"c","tempo_bpm":60,'
        b'"future_field":{"nested":[1,2,3]},"requested_by":"ops","hlc":"","reason":"r","x":null}'
    )
    assert decode(data, TempoChange) == TempoChange(
        cluster_id="c", tempo_bpm=60, requested_by="ops", reason="r"
    )


def test_tempo_change_without_hlc_round_trips() -> None:
    msg = TempoChange(cluster_id="c", tempo_bpm=61)
    assert msg.hlc == ""
    assert decode(encode(msg), TempoChange) == msg


# --- constraints on decode -----------------------------------------------------------------------
def _claim_obj(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "type": "backbeat.statusclaim.v1",
        "agent_id": "agent-7",
        "task_id": "task:0badf00d",
        "beat_index": 12,
        "hlc": "0192a3b4c5d6:0001:cfad",
        "state": "executing",
        "beats_left": 3,
        "progress": 0.5,
        "notes": "",
    }
    obj.update(changes)
    return {k: v for k, v in obj.items() if v is not _DROP}


def _frame_obj(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "type": "backbeat.beatframe.v1",
        "cluster_id": "prod",
        "beat_index": 1234,
        "downbeat": False,
        "phase": "execute",
        "hlc": "0192a3b4c5d6:0001:372e",
        "deadline_at": "2025-01-02T03:04:05Z",
        "tempo_bpm": 60,
        "window_id": window_id("prod", 1234),
    }
    obj.update(changes)
    return {k: v for k, v in obj.items() if v is not _DROP}


class _Drop:
    def __repr__(self) -> str:
        return "<dropped>"


_DROP: Any = _Drop()


def test_valid_bases_decode() -> None:
    # the bases the rejection cases mutate are themselves valid, so each rejection is about
    # exactly the field it changes
    assert decode(json.dumps(_claim_obj()), StatusClaim).agent_id == "agent-7"
    assert decode(json.dumps(_frame_obj()), BeatFrame).beat_index == 1234


BAD_IDS = ["", "a" * 65, "a.b", "a b", "a*", "a>", "agent\n", "\nagent", "ägent", "a/b"]


@pytest.mark.parametrize(
    "changes",
    [
        {"state": "sleeping"},
        {"state": "Done"},
        {"state": None},
        {"progress": -0.01},
        {"progress": 1.0000001},
        {"progress": "0.5"},
        {"progress": None},
        {"beats_left": -1},
        {"beats_left": 1.5},
        {"beat_index": -1},
        {"beat_index": 2**63},
        {"notes": "x" * 4097},
        {"task_id": "t" * 129},
        {"task_id": ""},
        {"wait_for": [""]},
        {"wait_for": "agent://b"},
        {"hlc": "nope"},
        {"hlc": "1:2:3\n"},
        {"hlc": "1:2"},
        {"type": "backbeat.statusclaim.v2"},
        {"type": "backbeat.beatframe.v1"},
        {"type": ""},
        # the fields the SDK fills in may not be missing from a received claim
        {"agent_id": _DROP},
        {"task_id": _DROP},
        {"hlc": _DROP},
        *({"agent_id": bad} for bad in BAD_IDS),
    ],
    ids=repr,
)
def test_claim_constraint_violations_are_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(WireError, match="StatusClaim"):
        decode(json.dumps(_claim_obj(**changes)), StatusClaim)


def test_missing_type_tag_is_tolerated() -> None:
    # decided: a wrong tag is refused, a missing one is not (msgspec's rule for a single tagged
    # type; the subject already says what the message is)
    assert decode(json.dumps(_claim_obj(type=_DROP)), StatusClaim).agent_id == "agent-7"
    assert decode(json.dumps(_frame_obj(type=_DROP)), BeatFrame).beat_index == 1234


def test_claim_nan_progress_is_rejected() -> None:
    # JSON has no NaN; Python's json writes the non-standard token, which must not slip through
    data = json.dumps(_claim_obj(progress=float("nan")))
    assert "NaN" in data
    with pytest.raises(WireError):
        decode(data, StatusClaim)
    with pytest.raises(WireError):
        decode(json.dumps(_claim_obj(progress=float("inf"))), StatusClaim)


@pytest.mark.parametrize(
    "changes",
    [
        {"tempo_bpm": 0},
        {"tempo_bpm": 1201},
        {"tempo_bpm": 60.5},
        {"deadline_at": "2025-01-02T03:04:05"},  # naive: no offset
        {"deadline_at": "2025-01-02T03:04:05.123"},
        {"deadline_at": "yesterday"},
        {"deadline_at": "2025-13-02T03:04:05Z"},
        {"window_id": "ABCDEF" * 5 + "AB"},
        {"window_id": "abc"},
        {"window_id": "0" * 32 + "\n"},
        {"phase": ""},
        {"downbeat": 0},
        {"type": "backbeat.beatframe.v0"},
        {"beat_index": _DROP},
        *({"cluster_id": bad} for bad in BAD_IDS),
    ],
    ids=repr,
)
def test_frame_constraint_violations_are_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(WireError, match="BeatFrame"):
        decode(json.dumps(_frame_obj(**changes)), BeatFrame)


@pytest.mark.parametrize("tempo", [0, 1201, -60])
def test_tempo_change_tempo_range(tempo: int) -> None:
    data = json.dumps({"type": "backbeat.tempochange.v1", "cluster_id": "c", "tempo_bpm": tempo})
    with pytest.raises(WireError):
        decode(data, TempoChange)


@pytest.mark.parametrize("tempo", [1, 1200])
def test_tempo_range_edges_accepted(tempo: int) -> None:
    assert decode(json.dumps(_frame_obj(tempo_bpm=tempo)), BeatFrame).tempo_bpm == tempo
    data = json.dumps({"type": "backbeat.tempochange.v1", "cluster_id": "c", "tempo_bpm": tempo})
    assert decode(data, TempoChange).tempo_bpm == tempo


@pytest.mark.parametrize("garbage", [b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"type":1}'])
def test_garbage_is_a_wire_error(garbage: bytes) -> None:
    with pytest.raises(WireError):
        decode(garbage, BeatFrame)


# --- RFC 3339 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("digits", range(10))
@pytest.mark.parametrize(
    ("suffix", "offset"),
    [
        ("Z", dt.timedelta(0)),
        ("+00:00", dt.timedelta(0)),
        ("+02:00", dt.timedelta(hours=2)),
        ("-05:30", -dt.timedelta(hours=5, minutes=30)),
    ],
)
def test_rfc3339_offsets_and_fraction_digits(
    digits: int, suffix: str, offset: dt.timedelta
) -> None:
    fraction = "987654321"[:digits]
    text = "2025-01-02T03:04:05" + (f".{fraction}" if digits else "") + suffix
    frame = decode(json.dumps(_frame_obj(deadline_at=text)), BeatFrame)
    nanos = int(fraction.ljust(9, "0")) if digits else 0
    expected = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone(offset)) + dt.timedelta(
        microseconds=round(nanos / 1000)
    )
    assert frame.deadline_at == expected
    assert frame.deadline_at.utcoffset() == offset


def test_we_encode_utc_with_z() -> None:
    frame = decode(json.dumps(_frame_obj()), BeatFrame)
    assert json.loads(encode(frame))["deadline_at"] == "2025-01-02T03:04:05Z"


# --- golden vectors: byte strings exactly as Go's encoding/json writes these types ----------------
GO_BEATFRAME_NANOS = (
    b'{"type":"backbeat.beatframe.v1","cluster_id":"prod","beat_index":1234,"downbeat":false,'
    b'"phase":"execute","hlc":"0192a3b4c5d6:0001:372e",'
    b'"deadline_at":"2025-01-02T03:04:05.123456789Z","tempo_bpm":60,'
    b'"window_id":"5a1f63c5c28315950a5c03f078d30851"}'
)
# Go trims trailing zeros of the fraction (RFC3339Nano) and writes whole seconds without one
GO_BEATFRAME_TRIMMED = (
    b'{"type":"backbeat.beatframe.v1","cluster_id":"prod","beat_index":1232,"downbeat":true,'
    b'"phase":"plan","hlc":"0192a3b4c5d6:0000:372e","deadline_at":"2025-01-02T03:04:05.5+02:00",'
    b'"tempo_bpm":120,"window_id":"5a1f63c5c28315950a5c03f078d30851"}'
)
GO_BEATFRAME_WHOLE_SECONDS = (
    b'{"type":"backbeat.beatframe.v1","cluster_id":"prod","beat_index":0,"downbeat":true,'
    b'"phase":"plan","hlc":"0192a3b4c5d6:0000:372e","deadline_at":"2025-01-02T03:04:05Z",'
    b'"tempo_bpm":1,"window_id":"bfe4dce201b3d78315225c72ad4b659d"}'
)
GO_CLAIM = (
    b'{"type":"backbeat.statusclaim.v1","agent_id":"agent-7","task_id":"task:0badf00d",'
    b'"beat_index":1234,"hlc":"0192a3b4c5d6:0002:cfad","state":"executing","beats_left":3,'
    b'"progress":0.4,"notes":"halfway"}'
)
# Go escapes <, > and & in strings (HTML-safe) and writes a float64 1 as `1`
GO_CLAIM_WAITING = (
    b'{"type":"backbeat.statusclaim.v1","agent_id":"agent-7","task_id":"task:0badf00d",'
    b'"beat_index":1235,"hlc":"0192a3b4c5d7:0000:cfad","state":"waiting",'
    b'"wait_for":["agent://agent-9","db-migration"],"beats_left":0,"progress":1,'
    b'"notes":"a\\u003cb \\u0026 c\\u003ed \\u00e9\\u2028"}'
)
GO_TEMPO_CHANGE = (
    b'{"type":"backbeat.tempochange.v1","cluster_id":"prod","tempo_bpm":66,'
    b'"requested_by":"ops-7","hlc":"0192a3b4c5d6:0003:0001","reason":"catch up"}'
)
GO_BAR_REPORT = (
    b'{"type":"backbeat.barreport.v1","cluster_id":"prod",'
    b'"window_id":"5a1f63c5c28315950a5c03f078d30851","from_beat":1232,"to_beat":1235,'
    b'"hlc":"0192a3b4c5d6:0004:0002","agents_reporting":2,"claims":5,'
    b'"by_state":{"done":1,"executing":1},"on_time_reviews":1,"late":0,"rejected":1,'
    b'"mean_progress":0.55,"max_beats_left":3,"tempo_drift_ms":1.25,"blocked":["agent-2"],'
    b'"issues":[{"agent_id":"agent-2","kind":"failed","detail":"boom"}]}'
)
GO_HEALTH = (
    b'{"connected":true,"last_beat":1234,"last_beat_time":"2025-01-02T03:04:05.5Z",'
    b'"time_drift":1500000,"reconnect_count":2,"local_degradation":false,"current_tempo":60,'
    b'"tempo_drift":-250000,"measured_bpm":59.98,"errors":["nats: timeout"]}'
)
GO_HEALTH_ZERO = (
    b'{"connected":false,"last_beat":0,"last_beat_time":"0001-01-01T00:00:00Z","time_drift":0,'
    b'"reconnect_count":0,"local_degradation":false,"current_tempo":0,"tempo_drift":0,'
    b'"measured_bpm":0,"errors":[]}'
)
GO_LEGACY = b'{"bar":309,"beat":3}'


def _keys(data: bytes) -> list[str]:
    return list(json.loads(data))


def test_golden_beatframe_with_nanoseconds() -> None:
    frame = decode(GO_BEATFRAME_NANOS, BeatFrame)
    assert frame == BeatFrame(
        cluster_id="prod",
        beat_index=1234,
        downbeat=False,
        phase="execute",
        hlc="0192a3b4c5d6:0001:372e",
        # nanoseconds round to the nearest microsecond
        deadline_at=dt.datetime(2025, 1, 2, 3, 4, 5, 123457, tzinfo=UTC),
        tempo_bpm=60,
        window_id=window_id("prod", 1234),
    )
    assert frame.window_id == "5a1f63c5c28315950a5c03f078d30851"
    assert frame.beat_duration == 1.0
    ours = encode(frame)
    assert _keys(ours) == _keys(GO_BEATFRAME_NANOS)
    assert decode(ours, BeatFrame) == frame


def test_golden_beatframe_trimmed_fraction_and_offset() -> None:
    frame = decode(GO_BEATFRAME_TRIMMED, BeatFrame)
    assert frame.deadline_at == dt.datetime(2025, 1, 2, 1, 4, 5, 500000, tzinfo=UTC)
    assert frame.downbeat is True
    assert frame.phase == "plan"
    assert frame.started_at == dt.datetime(2025, 1, 2, 1, 4, 5, 0, tzinfo=UTC)
    assert decode(encode(frame), BeatFrame) == frame


def test_golden_beatframe_is_byte_identical_when_go_would_agree() -> None:
    # no fraction to format differently: our bytes are Go's bytes
    frame = decode(GO_BEATFRAME_WHOLE_SECONDS, BeatFrame)
    assert frame.tempo_bpm == 1
    assert encode(frame) == GO_BEATFRAME_WHOLE_SECONDS


def test_golden_claim() -> None:
    claim = decode(GO_CLAIM, StatusClaim)
    assert claim == StatusClaim(
        agent_id="agent-7",
        task_id="task:0badf00d",
        beat_index=1234,
        hlc="0192a3b4c5d6:0002:cfad",
        state="executing",
        wait_for=[],
        beats_left=3,
        progress=0.4,
        notes="halfway",
    )
    assert encode_claim(claim) == GO_CLAIM


def test_golden_claim_waiting_with_escapes() -> None:
    claim = decode(GO_CLAIM_WAITING, StatusClaim)
    assert claim.wait_for == ["agent://agent-9", "db-migration"]
    assert claim.progress == 1.0
    assert isinstance(claim.progress, float)
    assert claim.notes == "a<b & c>d é\u2028"
    ours = encode_claim(claim)
    assert _keys(ours) == _keys(GO_CLAIM_WAITING)
    assert decode(ours, StatusClaim) == claim


def test_golden_tempo_change() -> None:
    msg = decode(GO_TEMPO_CHANGE, TempoChange)
    assert msg == TempoChange(
        cluster_id="prod",
        tempo_bpm=66,
        requested_by="ops-7",
        hlc="0192a3b4c5d6:0003:0001",
        reason="catch up",
    )
    assert encode(msg) == GO_TEMPO_CHANGE


def test_golden_bar_report() -> None:
    report = decode(GO_BAR_REPORT, BarReport)
    assert report == BarReport(
        cluster_id="prod",
        window_id="5a1f63c5c28315950a5c03f078d30851",
        from_beat=1232,
        to_beat=1235,
        hlc="0192a3b4c5d6:0004:0002",
        agents_reporting=2,
        claims=5,
        by_state={"done": 1, "executing": 1},
        on_time_reviews=1,
        late=0,
        rejected=1,
        mean_progress=0.55,
        max_beats_left=3,
        tempo_drift_ms=1.25,
        blocked=["agent-2"],
        issues=[BarIssue(agent_id="agent-2", kind="failed", detail="boom")],
    )
    assert encode(report) == GO_BAR_REPORT


def test_golden_health_status() -> None:
    health = decode(GO_HEALTH, HealthStatus)
    assert health.connected is True
    assert health.last_beat == 1234
    assert health.last_beat_time == dt.datetime(2025, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)
    assert health.time_drift == 1_500_000
    assert health.time_drift_s == pytest.approx(0.0015)
    assert health.tempo_drift_s == pytest.approx(-0.00025)
    assert health.reconnect_count == 2
    assert health.current_tempo == 60
    assert health.measured_bpm == 59.98
    assert health.errors == ["nats: timeout"]
    ours = encode(health)
    # Go's fields first, in Go's order; ours (delivery, metrics) follow
    go_keys = _keys(GO_HEALTH)
    assert _keys(ours)[: len(go_keys)] == go_keys
    assert decode(ours, HealthStatus) == health
    assert isinstance(json.loads(ours)["time_drift"], int)


def test_golden_health_zero_value() -> None:
    health = decode(GO_HEALTH_ZERO, HealthStatus)
    assert health == HealthStatus()
    assert health.last_beat_time == GO_ZERO_TIME
    assert json.loads(encode(HealthStatus()))["last_beat_time"] == "0001-01-01T00:00:00Z"


def test_golden_legacy() -> None:
    info = decode(GO_LEGACY, LegacyBeatInfo)
    assert info == LegacyBeatInfo(bar=309, beat=3)
    assert encode(info) == GO_LEGACY


# --- encode_claim ---------------------------------------------------------------------------------
_GOOD_CLAIM = StatusClaim(agent_id="agent-7", task_id="task:1", hlc="1:0:2", progress=0.5)


@pytest.mark.parametrize(
    "changes",
    [
        {"progress": 1.5},
        {"progress": -0.1},
        {"progress": float("nan")},
        {"progress": float("inf")},
        {"state": "bogus"},
        {"beats_left": -1},
        {"beat_index": -5},
        {"notes": "n" * 4097},
        {"task_id": "t" * 129},
        {"task_id": ""},
        {"agent_id": ""},
        {"agent_id": "has.dot"},
        {"hlc": ""},
        {"hlc": "not-an-hlc"},
        {"wait_for": [""]},
    ],
    ids=repr,
)
def test_encode_claim_rejects_bad_claims(changes: dict[str, Any]) -> None:
    bad = msgspec.structs.replace(_GOOD_CLAIM, **changes)
    with pytest.raises(InvalidStatusClaim):
        encode_claim(bad)
    with pytest.raises(InvalidStatusClaim):
        encode(bad)  # encode() routes claims through encode_claim


def test_encode_claim_accepts_the_edges() -> None:
    for changes in (
        {"progress": 0.0},
        {"progress": 1.0},
        {"notes": "n" * 4096},
        {"task_id": "t" * 128},
    ):
        claim = msgspec.structs.replace(_GOOD_CLAIM, **changes)
        assert decode(encode_claim(claim), StatusClaim) == claim


# --- the joined post-decode rules agree with the field rules --------------------------------------
# _wire checks a message's patterned fields with one regex over the fields joined by a space;
# these compare that, on arbitrary strings, with the field rules themselves (ID_RE, HLC_RE,
# OPTIONAL_HLC_RE, WINDOW_ID_RE). Note `$` would also match before a trailing newline: the rules
# use `\Z`, and the strategies add trailing newlines on purpose.
_ID_ALPHABET = string.ascii_letters + string.digits + "_-"
_HEX = "0123456789abcdefABCDEF"
# look-alikes: unicode digits and letters (str.isdigit/isalnum accept them), fullwidth forms,
# a letter that changes length when case-folded, the joint itself, whitespace, NUL
_ODD = "\u0663\uff11\uff21\u00e9\u0130\u212a\u00df \n\t\r\x00:.*>/"
_hex_runs = st.text(alphabet=_HEX, max_size=17)
_field_text = st.one_of(
    st.text(),
    st.text(alphabet=_ID_ALPHABET + _ODD, max_size=70),
    st.text(alphabet=_ID_ALPHABET, min_size=62, max_size=66),  # around the 64-char limit
    st.text(alphabet=_HEX + ":" + _ODD, max_size=55),
    st.builds(lambda a, b, c: f"{a}:{b}:{c}", _hex_runs, _hex_runs, _hex_runs),
    st.text(alphabet="0123456789abcdef" + "A\n \u0663", min_size=30, max_size=34),
    ids,
    hlcs,
    window_ids,
)
tricky_text = st.one_of(
    _field_text,
    _field_text.map(lambda s: s + "\n"),
    _field_text.map(lambda s: "\n" + s),
    _field_text.map(lambda s: s.upper()),
)


# per field: valid values, values just past a length limit, and anything tricky_text makes
id_like = st.one_of(ids, st.text(alphabet=_ID_ALPHABET, min_size=63, max_size=66), tricky_text)
_hex_edge = st.text(alphabet=_HEX, min_size=15, max_size=17)
hlc_like = st.one_of(
    hlcs, st.builds(lambda a, b, c: f"{a}:{b}:{c}", _hex_edge, _hex_edge, _hex_edge), tricky_text
)
wid_like = st.one_of(
    window_ids, st.text(alphabet="0123456789abcdef", min_size=31, max_size=33), tricky_text
)


def _rule(regex: re.Pattern[str], value: str) -> bool:
    return regex.match(value) is not None


@settings(max_examples=1000)
@given(
    cluster_id=id_like,
    hlc=hlc_like,
    wid=wid_like,
)
def test_frame_and_report_checks_agree_with_the_field_rules(
    cluster_id: str, hlc: str, wid: str
) -> None:
    wanted = [
        ("cluster_id", _rule(ID_RE, cluster_id)),
        ("hlc", _rule(HLC_RE, hlc)),
        ("window_id", _rule(WINDOW_ID_RE, wid)),
    ]
    ok = all(good for _, good in wanted)
    frame = BeatFrame(
        cluster_id=cluster_id,
        beat_index=1,
        downbeat=False,
        phase="execute",
        hlc=hlc,
        deadline_at=dt.datetime(2025, 1, 2, tzinfo=UTC),
        tempo_bpm=60,
        window_id=wid,
    )
    report = BarReport(cluster_id=cluster_id, window_id=wid, from_beat=0, to_beat=3, hlc=hlc)
    first_bad = next((name for name, good in wanted if not good), None)
    for problem in (_wire._check_frame(frame), _wire._check_report(report)):
        assert (problem is None) == ok
        if first_bad is not None:  # the message names the first broken field, as it always did
            assert problem is not None
            assert problem.endswith(f"at `$.{first_bad}`")
    # and through decode, where the Struct's length bounds come first
    for type_, obj in ((BeatFrame, _frame_obj()), (BarReport, json.loads(GO_BAR_REPORT))):
        obj.update(cluster_id=cluster_id, hlc=hlc, window_id=wid)
        if ok:
            decode(json.dumps(obj), type_)
        else:
            with pytest.raises(WireError, match=type_.__name__):
                decode(json.dumps(obj), type_)


@settings(max_examples=1000)
@given(
    agent_id=id_like,
    task_id=st.sampled_from(["", "t", "task:0a1b2c3d"]),
    hlc=hlc_like,
)
def test_claim_check_agrees_with_the_field_rules(agent_id: str, task_id: str, hlc: str) -> None:
    ok = bool(agent_id and task_id and hlc) and _rule(ID_RE, agent_id) and _rule(HLC_RE, hlc)
    claim = StatusClaim(agent_id=agent_id, task_id=task_id, hlc=hlc)
    assert (_wire._check_claim(claim) is None) == ok
    if len(agent_id) <= 64:  # the old check left the length to the Struct, which comes first
        assert _wire._check_claim(claim) == _reference_check_claim(claim)
    obj = _claim_obj(agent_id=agent_id, task_id=task_id, hlc=hlc)
    if ok:
        assert decode(json.dumps(obj), StatusClaim).agent_id == agent_id
    else:
        with pytest.raises(WireError, match="StatusClaim"):
            decode(json.dumps(obj), StatusClaim)


@settings(max_examples=1000)
@given(cluster_id=id_like, hlc=st.one_of(st.just(""), hlc_like))
def test_tempo_check_agrees_with_the_field_rules(cluster_id: str, hlc: str) -> None:
    ok = _rule(ID_RE, cluster_id) and _rule(OPTIONAL_HLC_RE, hlc)
    change = TempoChange(cluster_id=cluster_id, tempo_bpm=60, hlc=hlc)
    assert (_wire._check_tempo(change) is None) == ok
    obj = {"type": "backbeat.tempochange.v1", "cluster_id": cluster_id, "tempo_bpm": 60, "hlc": hlc}
    if ok:
        assert decode(json.dumps(obj), TempoChange) == change
    else:
        with pytest.raises(WireError, match="TempoChange"):
            decode(json.dumps(obj), TempoChange)


def test_joined_rules_edge_cases() -> None:
    # the cases the property tests are most likely to need luck for, spelled out
    good_hlc, good_wid = "0192a3b4c5d6:0001:372e", "0" * 32
    for bad in ["a\n", "a ", " a", "a b", "\u0663", "a" * 65, "", "a\x00"]:
        assert _wire._check_frame(msgspec.structs.replace(_FRAME, cluster_id=bad)) is not None
        assert _wire._check_claim(StatusClaim(agent_id=bad, task_id="t", hlc=good_hlc))
    for bad in [good_hlc + "\n", "1:2:3 ", "1:2", "1:2:3:4", "1::3", "g:1:1", "1" * 17 + ":1:1"]:
        assert _wire._check_frame(msgspec.structs.replace(_FRAME, hlc=bad)) is not None
    for bad in [good_wid + "\n", "A" * 32, "0" * 31, "0" * 33, "0" * 31 + "\u0663"]:
        assert _wire._check_frame(msgspec.structs.replace(_FRAME, window_id=bad)) is not None
    assert _wire._check_frame(msgspec.structs.replace(_FRAME, cluster_id="a" * 64)) is None
    assert (
        _wire._check_frame(msgspec.structs.replace(_FRAME, hlc="F" * 16 + ":0:" + "a" * 16)) is None
    )
    # a field may not smuggle the joint: "a 1:2:3" as cluster_id with a valid hlc must fail
    assert _wire._check_claim(StatusClaim(agent_id="a 1:2:3", task_id="t", hlc="1:2:3"))


_FRAME = BeatFrame(
    cluster_id="prod",
    beat_index=1,
    downbeat=False,
    phase="plan",
    hlc="0192a3b4c5d6:0001:372e",
    deadline_at=dt.datetime(2025, 1, 2, tzinfo=UTC),
    tempo_bpm=60,
    window_id="0" * 32,
)


# --- encode_claim's direct checks agree with validating by decoding -----------------------------
_REF_ID_CHARS = frozenset(_ID_ALPHABET)


def _reference_check_claim(claim: StatusClaim) -> str | None:
    # _wire._check_claim as it was before the joined rule
    if not (claim.agent_id and claim.task_id and claim.hlc):
        missing = [name for name in ("agent_id", "task_id", "hlc") if not getattr(claim, name)]
        return f"missing required field(s) {', '.join(map(repr, missing))}"
    if not _REF_ID_CHARS.issuperset(claim.agent_id):
        return _wire._bad(claim.agent_id, "agent_id", ID_RE)
    if not HLC_RE.match(claim.hlc):
        return _wire._bad(claim.hlc, "hlc", HLC_RE)
    return None


def _reference_encode_claim(claim: StatusClaim) -> bytes:
    # encode_claim as it was: encode, then validate by decoding the bytes again (and, since a
    # string wait_for was sent as its characters, refusing a string wait_for first)
    if isinstance(claim.wait_for, str | bytes):
        raise InvalidStatusClaim(
            "invalid status claim: wait_for is a list of refs, not a string: "
            f"write wait_for=[{claim.wait_for!r}]"
        )
    try:
        data = _wire._encoder.encode(
            _wire._StatusClaimWire(
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
        msgspec.json.Decoder(StatusClaim).decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, TypeError, ValueError) as exc:
        raise InvalidStatusClaim(f"invalid status claim: {exc}") from exc
    problem = _reference_check_claim(claim)
    if problem is not None:
        raise InvalidStatusClaim(f"invalid status claim: {problem}")
    return data


class _Str(str):
    pass


class _Int(int):
    pass


_INT64_MAX = 2**63 - 1
_odd_values = st.sampled_from([None, True, False, 1.5, -1, b"x", object(), [], {}])
_ints = st.one_of(
    st.integers(-3, 5),
    st.sampled_from([_INT64_MAX, _INT64_MAX + 1, 2**64, -(2**63), True, False]),
    st.integers(0, 5).map(_Int),
)
_strs = st.one_of(tricky_text, tricky_text.map(_Str))
_odd_claims = st.builds(
    StatusClaim,
    agent_id=st.one_of(ids, _strs, _odd_values),
    task_id=st.one_of(
        st.text(min_size=1, max_size=128),
        st.sampled_from(["t" * 127, "t" * 128, "t" * 129]),
        st.just(""),
        _strs,
        _odd_values,
    ),
    beat_index=st.one_of(_ints, _odd_values),
    hlc=st.one_of(hlcs, _strs, _odd_values),
    state=st.one_of(
        st.sampled_from(CLAIM_STATES),
        st.sampled_from(CLAIM_STATES).map(_Str),
        st.sampled_from(["Done", "sleeping", "", "done\n"]),
        _odd_values,
    ),
    wait_for=st.one_of(
        st.lists(st.text(min_size=1, max_size=256), max_size=3),
        st.lists(st.one_of(st.text(max_size=3), st.text(min_size=256, max_size=257)), max_size=3),
        st.lists(st.one_of(_strs, _odd_values), max_size=3),
        st.lists(st.text(max_size=5), max_size=3).map(tuple),
        st.sampled_from(["", "ab", None, {}]),
        _odd_values,
    ),
    beats_left=st.one_of(_ints, _odd_values),
    progress=st.one_of(
        st.floats(min_value=-0.5, max_value=1.5),
        st.sampled_from([0.0, -0.0, 1.0, 0, 1, 2, float("nan"), float("inf"), True]),
        st.floats(),
        _odd_values,
    ),
    notes=st.one_of(
        st.text(max_size=50),
        st.sampled_from(["n" * 4095, "n" * 4096, "n" * 4097]),
        st.sampled_from(["\ud800", "a\udfffb"]),  # lone surrogates: not encodable as UTF-8
        _strs,
        _odd_values,
    ),
)


# valid claims, and claims with any field odd or broken
claims_of_anything = st.one_of(
    status_claims,
    _odd_claims,
    st.builds(
        lambda c, o, f: msgspec.structs.replace(c, **{f: getattr(o, f)}),
        status_claims,
        _odd_claims,
        st.sampled_from(StatusClaim.__struct_fields__),
    ),
)


def _assert_encode_claim_agrees(claim: StatusClaim) -> None:
    expected: bytes | None = None
    refusal = ""
    try:
        expected = _reference_encode_claim(claim)
    except (InvalidStatusClaim, TypeError) as exc:
        refusal = str(exc)
    if expected is not None:
        assert encode_claim(claim) == expected
        decode(expected, StatusClaim)  # what is returned, a receiver accepts
        return
    # Refused both ways. The old code checked ids and stamps on the claim as given, so a non-str
    # value got a TypeError from `re` (bytes hlc) or its repr in the message (bytes agent_id, sent
    # as base64); now they are checked as sent, which always says InvalidStatusClaim.
    with pytest.raises(InvalidStatusClaim) as got:
        encode_claim(claim)
    if isinstance(claim.agent_id, str) and isinstance(claim.hlc, str):
        assert str(got.value) == refusal


@settings(max_examples=1000)
@given(claims_of_anything)
def test_encode_claim_accepts_and_rejects_exactly_what_decoding_did(claim: StatusClaim) -> None:
    _assert_encode_claim_agrees(claim)


@given(st.builds(HLCStamp, st.integers(0, 2**64 - 1), st.integers(0, 2**16), st.integers(0, 2**16)))
def test_emit_status_hlc_format_is_the_stamps_string_form(stamp: HLCStamp) -> None:
    # Client.emit_status_nowait formats the stamp with %-formatting (cheaper than str())
    assert "%012x:%04x:%04x" % stamp == str(stamp)  # noqa: UP031


_EDGE_EDITS: list[dict[str, Any]] = [
    *(
        {"agent_id": v}
        for v in ["a" * 64, "a" * 65, "a\n", "\u0663", "a b", _Str("agent-7"), 7, b"x"]
    ),
    *({"task_id": v} for v in ["t" * 128, "t" * 129, "", "\n", _Str("t"), None, 1]),
    *({"beat_index": v} for v in [0, -1, _INT64_MAX, _INT64_MAX + 1, 2**64, True, _Int(3), 1.0]),
    *({"hlc": v} for v in ["1:2:3", "1:2:3\n", "1:2", "", "f" * 16 + ":0:0", "f" * 17 + ":0:0"]),
    {"hlc": b"0123456789"},
    *({"state": v} for v in [*CLAIM_STATES, "Done", "", _Str("done"), None]),
    *({"wait_for": v} for v in [[], ["x" * 256], ["x" * 257], [""], [1], ("a",), "ab", None, {}]),
    *({"beats_left": v} for v in [0, -1, _INT64_MAX, _INT64_MAX + 1, False, _Int(1), 2.0]),
    *({"progress": v} for v in [0.0, -0.0, 1.0, 1.0000001, -1e-300, 0, 1, 2, True, "0.5"]),
    *({"progress": v} for v in [float("nan"), float("inf"), -float("inf"), None]),
    *({"notes": v} for v in ["n" * 4096, "n" * 4097, "\ud800", "\u2028<&>", _Str("n"), None]),
]


@pytest.mark.parametrize("changes", _EDGE_EDITS, ids=repr)
def test_encode_claim_edges_agree_with_validating_by_decoding(changes: dict[str, Any]) -> None:
    _assert_encode_claim_agrees(msgspec.structs.replace(_GOOD_CLAIM, **changes))


@pytest.mark.parametrize("ref", ["agent://x", b"agent://x"])
def test_a_string_wait_for_is_refused_not_sent_as_characters(ref: str | bytes) -> None:
    claim = StatusClaim(agent_id="agent-a", task_id="t", hlc="1:1:1", wait_for=ref)  # type: ignore[arg-type]
    with pytest.raises(
        InvalidStatusClaim, match=r"wait_for=\['agent://x'\]|wait_for=\[b'agent://x'\]"
    ):
        encode_claim(claim)
    assert (
        encode_claim(
            StatusClaim(agent_id="agent-a", task_id="t", hlc="1:1:1", wait_for=["agent://x"])
        ).count(b'"agent://x"')
        == 1
    )
