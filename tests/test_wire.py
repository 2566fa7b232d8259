"""Wire messages: round trips, constraints, RFC 3339 handling and Go golden vectors."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from backbeat_trio._beats import window_id
from backbeat_trio._errors import InvalidStatusClaim, WireError
from backbeat_trio._hlc import HLCStamp
from backbeat_trio._wire import (
    CLAIM_STATES,
    GO_ZERO_TIME,
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
