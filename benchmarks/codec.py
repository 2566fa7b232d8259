"""Codec: backbeat_trio's msgspec wire codec vs stdlib ``json`` plus equivalent hand validation.

The baseline gets every advantage a careful hand-written codec would have: regexes compiled once,
``__slots__`` dataclasses, a hand-written ``to_dict`` (not ``dataclasses.asdict``), compact
separators. It checks exactly the constraints ``_wire.py`` declares (types, ranges, patterns,
lengths, the tag, time-zone-aware ``deadline_at``; for claims the state set, ``wait_for`` items and
the identity fields).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from backbeat_trio import BeatFrame, StatusClaim
from backbeat_trio._core.wire import (
    _encoder,
    decode,
    decode_claim,
    decode_frame,
    encode,
    encode_claim,
)

T = TypeVar("T")

BEAT_TAG = "backbeat.beatframe.v1"
CLAIM_TAG = "backbeat.statusclaim.v1"
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
HLC_RE = re.compile(r"[0-9a-fA-F]{1,16}:[0-9a-fA-F]{1,16}:[0-9a-fA-F]{1,16}")
WID_RE = re.compile(r"[0-9a-f]{32}")
STATES = frozenset({"executing", "planning", "waiting", "review", "done", "failed"})
INT64_MAX = 2**63 - 1


class Invalid(ValueError):
    pass


@dataclass(slots=True, frozen=True)
class BeatFrameDC:
    cluster_id: str
    beat_index: int
    downbeat: bool
    phase: str
    hlc: str
    deadline_at: _dt.datetime
    tempo_bpm: int
    window_id: str


@dataclass(slots=True)
class StatusClaimDC:
    agent_id: str
    task_id: str
    beat_index: int
    hlc: str
    state: str
    wait_for: list[str] = field(default_factory=list)
    beats_left: int = 0
    progress: float = 0.0
    notes: str = ""


def _iso(t: _dt.datetime) -> str:
    text = t.isoformat(timespec="microseconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_loads = json.loads


def beat_encode_stdlib(f: BeatFrameDC) -> bytes:
    return _dumps(
        {
            "type": BEAT_TAG,
            "cluster_id": f.cluster_id,
            "beat_index": f.beat_index,
            "downbeat": f.downbeat,
            "phase": f.phase,
            "hlc": f.hlc,
            "deadline_at": _iso(f.deadline_at),
            "tempo_bpm": f.tempo_bpm,
            "window_id": f.window_id,
        }
    ).encode()


def _str(obj: dict[str, Any], key: str, lo: int = 0, hi: int | None = None) -> str:
    v = obj[key]
    if type(v) is not str or len(v) < lo or (hi is not None and len(v) > hi):
        raise Invalid(key)
    return v


def _int(obj: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = obj[key]
    if type(v) is not int or not lo <= v <= hi:
        raise Invalid(key)
    return v


def beat_decode_stdlib(data: bytes) -> BeatFrameDC:
    try:
        obj = _loads(data)
        if type(obj) is not dict or obj.get("type") != BEAT_TAG:
            raise Invalid("type")
        cluster_id = _str(obj, "cluster_id")
        if not ID_RE.fullmatch(cluster_id):
            raise Invalid("cluster_id")
        downbeat = obj["downbeat"]
        if type(downbeat) is not bool:
            raise Invalid("downbeat")
        hlc = _str(obj, "hlc")
        if not HLC_RE.fullmatch(hlc):
            raise Invalid("hlc")
        deadline = _dt.datetime.fromisoformat(_str(obj, "deadline_at"))
        if deadline.tzinfo is None:
            raise Invalid("deadline_at")
        window = _str(obj, "window_id")
        if not WID_RE.fullmatch(window):
            raise Invalid("window_id")
        return BeatFrameDC(
            cluster_id=cluster_id,
            beat_index=_int(obj, "beat_index", 0, INT64_MAX),
            downbeat=downbeat,
            phase=_str(obj, "phase", 1, 64),
            hlc=hlc,
            deadline_at=deadline,
            tempo_bpm=_int(obj, "tempo_bpm", 1, 1200),
            window_id=window,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise Invalid(str(exc)) from exc


def _check_claim(c: StatusClaimDC) -> None:
    if type(c.agent_id) is not str or not ID_RE.fullmatch(c.agent_id):
        raise Invalid("agent_id")
    if type(c.task_id) is not str or not 1 <= len(c.task_id) <= 128:
        raise Invalid("task_id")
    if type(c.beat_index) is not int or not 0 <= c.beat_index <= INT64_MAX:
        raise Invalid("beat_index")
    if type(c.hlc) is not str or not HLC_RE.fullmatch(c.hlc):
        raise Invalid("hlc")
    if c.state not in STATES:
        raise Invalid("state")
    if type(c.wait_for) is not list or any(
        type(w) is not str or not 1 <= len(w) <= 256 for w in c.wait_for
    ):
        raise Invalid("wait_for")
    if type(c.beats_left) is not int or not 0 <= c.beats_left <= INT64_MAX:
        raise Invalid("beats_left")
    if type(c.progress) not in (float, int) or not 0.0 <= c.progress <= 1.0:
        raise Invalid("progress")
    if type(c.notes) is not str or len(c.notes) > 4096:
        raise Invalid("notes")


def claim_encode_stdlib(c: StatusClaimDC) -> bytes:
    """Encode (Go's ``omitempty`` on ``wait_for``), no validation."""
    obj: dict[str, Any] = {
        "type": CLAIM_TAG,
        "agent_id": c.agent_id,
        "task_id": c.task_id,
        "beat_index": c.beat_index,
        "hlc": c.hlc,
        "state": c.state,
    }
    if c.wait_for:
        obj["wait_for"] = c.wait_for
    obj["beats_left"] = c.beats_left
    obj["progress"] = c.progress
    obj["notes"] = c.notes
    return _dumps(obj).encode()


def claim_check_encode_stdlib(c: StatusClaimDC) -> bytes:
    """Validate, then encode (what ``encode_claim`` guarantees: only valid claims get bytes)."""
    _check_claim(c)
    return claim_encode_stdlib(c)


def claim_decode_stdlib(data: bytes) -> StatusClaimDC:
    try:
        obj = _loads(data)
        if type(obj) is not dict or obj.get("type") != CLAIM_TAG:
            raise Invalid("type")
        progress = obj.get("progress", 0.0)
        if type(progress) is int:
            progress = float(progress)
        claim = StatusClaimDC(
            agent_id=obj["agent_id"],
            task_id=obj["task_id"],
            beat_index=obj.get("beat_index", 0),
            hlc=obj["hlc"],
            state=obj.get("state", "executing"),
            wait_for=obj.get("wait_for", []),
            beats_left=obj.get("beats_left", 0),
            progress=progress,
            notes=obj.get("notes", ""),
        )
        _check_claim(claim)
        return claim
    except (KeyError, ValueError, TypeError) as exc:
        raise Invalid(str(exc)) from exc


# ------------------------------------------------------------------------------------- samples
def _dataclass_twin(dc_type: type[T], struct: Any) -> T:
    """The baseline's dataclass holding the same values as ``struct`` (lists copied)."""
    values = {f.name: getattr(struct, f.name) for f in fields(dc_type)}
    return dc_type(**{k: list(v) if isinstance(v, list) else v for k, v in values.items()})


DEADLINE = _dt.datetime(2026, 11, 26, 21, 0, 0, 123456, tzinfo=_dt.UTC)
FRAME = BeatFrame(
    cluster_id="prod-cluster",
    beat_index=123_456,
    downbeat=False,
    phase="execute",
    hlc="0193a7b2c4d5:0001:3f2a",
    deadline_at=DEADLINE,
    tempo_bpm=120,
    window_id="0123456789abcdef0123456789abcdef",
)
FRAME_DC = _dataclass_twin(BeatFrameDC, FRAME)
CLAIM = StatusClaim(
    agent_id="agent-7",
    task_id="task:0a1b2c3d",
    beat_index=123_456,
    hlc="0193a7b2c4d5:0002:9c11",
    state="waiting",
    wait_for=["agent://agent-3", "artifact://build/42"],
    beats_left=4,
    progress=0.375,
    notes="waiting for the build artifact from agent-3 before the review phase",
)
CLAIM_DC = _dataclass_twin(StatusClaimDC, CLAIM)


def _check_equivalence() -> None:
    """Both codecs write the same bytes and read each other's (so the comparison is fair)."""
    fb, cb = encode(FRAME), encode_claim(CLAIM)
    assert fb == beat_encode_stdlib(FRAME_DC), (fb, beat_encode_stdlib(FRAME_DC))
    assert cb == claim_check_encode_stdlib(CLAIM_DC) == _encoder.encode(CLAIM)
    assert beat_decode_stdlib(fb) == FRAME_DC
    assert claim_decode_stdlib(cb) == CLAIM_DC
    assert decode(fb, BeatFrame) == FRAME
    assert decode(cb, StatusClaim) == CLAIM
    bad = fb.replace(b'"tempo_bpm":120', b'"tempo_bpm":1201')
    for fn in (lambda: decode(bad, BeatFrame), lambda: beat_decode_stdlib(bad)):
        try:
            fn()
        except Exception:
            pass
        else:
            raise AssertionError("an out-of-range tempo was accepted")


def _rate(fn: Callable[[Any], Any], arg: Any, n: int) -> float:
    """Operations per second of ``fn(arg)`` over ``n`` calls."""
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(n):
        fn(arg)
    return n / (time.perf_counter() - t0)


def _cases() -> list[tuple[str, Callable[[Any], Any], Any, Callable[[Any], Any], Any]]:
    frame_bytes = encode(FRAME)
    claim_bytes = encode_claim(CLAIM)
    return [
        ("BeatFrame encode", encode, FRAME, beat_encode_stdlib, FRAME_DC),
        (
            "BeatFrame decode+validate",
            lambda b: decode_frame(b),  # what every client's screen calls
            frame_bytes,
            beat_decode_stdlib,
            frame_bytes,
        ),
        ("StatusClaim encode", _encoder.encode, CLAIM, claim_encode_stdlib, CLAIM_DC),
        (
            "StatusClaim decode+validate",
            lambda b: decode_claim(b),  # what the reverb and verify_claim call
            claim_bytes,
            claim_decode_stdlib,
            claim_bytes,
        ),
        (
            "StatusClaim validate+encode (encode_claim)",
            encode_claim,
            CLAIM,
            claim_check_encode_stdlib,
            CLAIM_DC,
        ),
    ]


def run(reps: int, n: int) -> dict[str, dict[str, list[float]]]:
    """``{case: {"ours": [ops/s per rep], "base": [...]}}``; ours and base alternate per rep."""
    _check_equivalence()
    out: dict[str, dict[str, list[float]]] = {}
    for name, ours, ours_arg, base, base_arg in _cases():
        _rate(ours, ours_arg, n // 10)  # warm-up
        _rate(base, base_arg, n // 10)
        res: dict[str, list[float]] = {"ours": [], "base": []}
        for _ in range(reps):
            res["ours"].append(_rate(ours, ours_arg, n))
            res["base"].append(_rate(base, base_arg, n))
        out[name] = res
    return out


def _best_us(fn: Callable[[Any], Any], arg: Any, n: int) -> float:
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn(arg)
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def evidence(n: int) -> dict[str, float]:
    """Where msgspec's decode time goes: the same Structs with and without regex constraints."""
    import msgspec

    from backbeat_trio._core import wire as _wire

    frame_bytes = encode(FRAME)
    claim_bytes = encode_claim(CLAIM)

    def twin(base: type[Any], name: str, plain: set[str]) -> msgspec.json.Decoder[Any]:
        hints = {f.name: f.type for f in msgspec.structs.fields(base)}
        fields = [
            (
                f.name,
                str if f.name in plain else hints[f.name],
                msgspec.NODEFAULT if f.required else f.default,
            )
            if f.default_factory is msgspec.NODEFAULT
            else (f.name, hints[f.name], msgspec.field(default_factory=f.default_factory))
            for f in msgspec.structs.fields(base)
        ]
        struct = msgspec.defstruct(
            name, fields, kw_only=True, tag_field="type", tag=base.__struct_config__.tag
        )
        return msgspec.json.Decoder(struct)

    beat_no_re = twin(BeatFrame, "BeatFrameNoRegex", {"cluster_id", "hlc", "window_id"})
    claim_no_re = twin(StatusClaim, "StatusClaimNoRegex", {"agent_id", "hlc"})
    return {
        "BeatFrame `decode()`": _best_us(lambda b: decode(b, BeatFrame), frame_bytes, n),
        "BeatFrame without its 3 patterns": _best_us(beat_no_re.decode, frame_bytes, n),
        "stdlib BeatFrame": _best_us(beat_decode_stdlib, frame_bytes, n),
        "StatusClaim `decode()`": _best_us(lambda b: decode(b, StatusClaim), claim_bytes, n),
        "StatusClaim without its 2 patterns": _best_us(claim_no_re.decode, claim_bytes, n),
        "of which `_check_claim` (identity + patterns)": _best_us(
            _wire._check_claim, decode(claim_bytes, StatusClaim), n
        ),
        "stdlib StatusClaim": _best_us(claim_decode_stdlib, claim_bytes, n),
    }
