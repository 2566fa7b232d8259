"""The one decoding edge: every decoder of outside bytes gives its value or the documented refusal.

Each decoder is fed arbitrary bytes, arbitrary JSON (deep, wide, huge integers, NaN and
infinities, duplicate keys, a BOM, invalid UTF-8 inside strings) and hand-built nests deeper than
the interpreter's recursion limit. What may come out is the decoded value or the documented
refusal (`WireError`, and `SignatureError` where a signature or key is judged); anything else,
`RecursionError` and `MemoryError` included, fails the test.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import backbeat_trio as bb3
from backbeat_trio._core import edge, wire
from backbeat_trio._core.intake import screen_frame
from backbeat_trio._core.lease import LeaseRecord, decode_lease
from backbeat_trio._core.metrics import ClientMetrics, ErrorLog
from backbeat_trio._core.outbox import Outbox
from backbeat_trio._core.wire import (
    BarReport,
    BeatFrame,
    HealthStatus,
    LegacyBeatInfo,
    StatusClaim,
    TempoChange,
    decode,
    encode,
)
from backbeat_trio._errors import SignatureError, WireError

DEPTH_PAST_RECURSION = sys.getrecursionlimit() * 2

WIRE_TYPES: list[type[Any]] = [
    BeatFrame,
    StatusClaim,
    BarReport,
    TempoChange,
    HealthStatus,
    LegacyBeatInfo,
    LeaseRecord,
]


def _nest(depth: int, opener: bytes = b"[", closer: bytes = b"]") -> bytes:
    return opener * depth + closer * depth


def _deep_object(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def deep_payloads() -> list[bytes]:
    """Nests past every bound: bare, inside a known field, inside an unknown field, objects."""
    d = DEPTH_PAST_RECURSION
    return [
        _nest(d),
        _deep_object(d),
        b'{"type":"backbeat.beatframe.v1","x":' + _nest(d) + b"}",
        b'{"notes":' + _nest(d) + b"}",
        b'{"wait_for":' + _nest(d) + b"}",
        _nest(edge.MAX_NESTING + 1),
        _nest(d)[:-5],  # unterminated as well as deep
        b"[" * 200_000,
    ]


# --- the decoders under test: each takes bytes, returns a value or raises a refusal ------------


def _keyring() -> bb3.Keyring:
    return bb3.Keyring({"agent-a": bb3.generate_signing_key().verify_key})


KEYRING = _keyring()


def _screen(data: bytes) -> Any:
    errors = ErrorLog(ClientMetrics())
    before = errors.metrics.malformed + errors.metrics.oversized + errors.metrics.wrong_cluster
    frame = screen_frame(data, "c1", 1 << 20, errors)
    after = errors.metrics.malformed + errors.metrics.oversized + errors.metrics.wrong_cluster
    # the screen never raises: a refusal is a count, and a frame passed on is not counted
    assert (frame is None) == (after == before + 1)
    return frame


def _verify(data: bytes) -> Any:
    headers = {"Backbeat-Agent": "agent-a", "Backbeat-Sig": "AAAA", "Backbeat-Key": "AAAA"}
    return bb3.verify_claim(data, headers, KEYRING)


def _ack(data: bytes) -> Any:
    outbox = Outbox(
        agent_id="agent-a",
        status_subject="backbeat.status.c1",
        outbox_size=10,
        ack_timeout=1.0,
        hlc=bb3.HLC("agent-a"),
        signer=None,
        errors=ErrorLog(ClientMetrics()),
    )
    outbox.use_jetstream("_INBOX.edge.ack")
    out, _ = outbox.admit(StatusClaim(state="done"), 1, connected=True)
    outbox.published(out, 0.0)
    return outbox.acked("1", data)


DECODERS: dict[str, tuple[Callable[[bytes], Any], tuple[type[BaseException], ...]]] = {
    **{f"decode[{t.__name__}]": ((lambda d, t=t: decode(d, t)), (WireError,)) for t in WIRE_TYPES},
    "decode_frame": (wire.decode_frame, (WireError,)),
    "decode_claim": (wire.decode_claim, (WireError,)),
    "decode_json": (edge.decode_json, (WireError,)),
    "decode_toml": (edge.decode_toml, (WireError,)),
    "screen_frame": (_screen, ()),
    "verify_claim": (_verify, (WireError, SignatureError)),
    "decode_lease": (decode_lease, ()),
    "outbox.on_ack": (_ack, ()),
}


def _feed(name: str, data: bytes) -> None:
    decoder, refusals = DECODERS[name]
    with contextlib.suppress(refusals):
        decoder(data)


# --- JSON that a decoder might choke on ----------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=40,
)


def _dump(value: Any) -> bytes:
    # the stdlib writes NaN, Infinity and integers of any size, which a Go peer would not
    return json.dumps(value, allow_nan=True).encode()


def _mutations(base: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from(
        [
            base,
            b"\xef\xbb\xbf" + base,  # a BOM
            base.replace(b'"', b'"\xff\xfe', 1),  # invalid UTF-8 inside a string
            base.replace(b"{", b'{"k":1,"k":2,', 1),  # duplicate keys
            base[: len(base) // 2],  # cut short
            base + b"garbage",
        ]
    )


def _claim_like() -> st.SearchStrategy[bytes]:
    fields = st.fixed_dictionaries(
        {
            "type": st.just("backbeat.statusclaim.v1"),
            "agent_id": st.sampled_from(["agent-a", "", "a.b", "x" * 65]),
            "task_id": st.text(max_size=3),
            "beat_index": st.integers(min_value=-(2**70), max_value=2**70),
            "hlc": st.sampled_from(["1:1:1", "", "ffffffffffffffffff:1:1", "z"]),
            "state": st.sampled_from(["done", "waiting", "nope"]),
            "progress": st.floats(allow_nan=True, allow_infinity=True),
            "beats_left": st.integers(min_value=-(2**70), max_value=2**70),
            "wait_for": json_values,
            "notes": json_values,
        }
    )
    return fields.map(_dump)


hostile_bytes = (
    st.binary(max_size=600)
    | json_values.map(_dump)
    | _claim_like()
    | json_values.map(_dump).flatmap(_mutations)
    | _claim_like().flatmap(_mutations)
)


@pytest.mark.parametrize("name", sorted(DECODERS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hostile_bytes)
@example(data=b"")
@example(data=b"\xef\xbb\xbf{}")
@example(data=b'{"beat_index": 1e400}')
@example(data=b'{"beat_index": 99999999999999999999999999999}')
@example(data=b'{"tempo_bpm": NaN}')
def test_every_decoder_gives_a_value_or_its_refusal(name: str, data: bytes) -> None:
    _feed(name, data)


@pytest.mark.parametrize("name", sorted(DECODERS))
@pytest.mark.parametrize("payload", deep_payloads(), ids=lambda p: f"{len(p)}B")
def test_nesting_past_the_recursion_limit_is_a_refusal(name: str, payload: bytes) -> None:
    _feed(name, payload)


@pytest.mark.parametrize("payload", deep_payloads(), ids=lambda p: f"{len(p)}B")
def test_too_deep_is_refused_before_the_decoder_under_its_reason(
    payload: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bytes] = []
    monkeypatch.setattr(wire, "_decode_frame_unchecked", seen.append)
    monkeypatch.setattr(edge, "_json_decode", seen.append)
    with pytest.raises(WireError) as info:
        decode(payload, BeatFrame)
    assert info.value.reason == edge.TOO_DEEP
    with pytest.raises(WireError) as info:
        edge.decode_json(payload)
    assert info.value.reason == edge.TOO_DEEP
    assert seen == []  # neither decoder was handed the payload


def test_recursion_and_memory_errors_in_a_decoder_become_refusals() -> None:
    def recursing(data: Any) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    def exhausting(data: Any) -> Any:
        raise MemoryError

    with pytest.raises(WireError) as info:
        edge.guarded(recursing, b"[]", "thing")
    assert info.value.reason == edge.TOO_DEEP
    assert isinstance(info.value.__cause__, RecursionError)
    with pytest.raises(WireError) as info:
        edge.guarded(exhausting, b"[]", "thing")
    assert info.value.reason == edge.TOO_LARGE


def test_a_nest_just_inside_the_bound_decodes() -> None:
    inside = _nest(edge.MAX_NESTING)
    assert edge.decode_json(inside) is not None
    with pytest.raises(WireError) as info:
        edge.decode_json(_nest(edge.MAX_NESTING + 1))
    assert info.value.reason == edge.TOO_DEEP


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    notes = "[{" * 2000 + '\\"]' + "\\" + "]]"
    claim = StatusClaim(
        agent_id="agent-a",
        task_id="t-1",
        hlc="1:1:1",
        notes=notes[: 4096 - 8],
        wait_for=["[" * 200],
    )
    data = encode(claim)
    assert data.count(b"[") > edge.MAX_NESTING
    assert decode(data, StatusClaim).notes == claim.notes
    # an escaped quote does not end the string early and let its brackets count
    tricky = b'{"a":"\\"' + b"[" * 600 + b'"}'
    assert edge.decode_json(tricky) == {"a": '"' + "[" * 600}


def test_toml_tables_and_strings_are_measured_apart() -> None:
    text = "[agents]\n" + "\n".join(f'a{i} = "[[[[[[ {i}"' for i in range(400)) + "\n# [[[[[[[\n"
    assert len(edge.decode_toml(text)["agents"]) == 400
    deep = "x = " + "[" * 5000 + "]" * 5000 + "\n"
    with pytest.raises(WireError) as info:
        edge.decode_toml(deep)
    assert info.value.reason == edge.TOO_DEEP
    with pytest.raises(WireError, match="invalid TOML"):
        edge.decode_toml(b"\xff\xfe = 1")


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_the_nesting_bound_agrees_with_a_reference_depth(value: Any) -> None:
    data = _dump(value)

    def depth(v: Any) -> int:
        if isinstance(v, list):
            return 1 + max(map(depth, v), default=0)
        if isinstance(v, dict):
            return 1 + max(map(depth, v.values()), default=0)
        return 0

    wrapped = (
        b"[" * (edge.MAX_NESTING - depth(value)) + data + b"]" * (edge.MAX_NESTING - depth(value))
    )
    edge.check_nesting(wrapped)  # exactly at the bound: passes
    with pytest.raises(WireError):
        edge.check_nesting(b"[" + wrapped + b"]")


def test_keyring_and_key_files_refuse_hostile_files(tmp_path: Path) -> None:
    ring = tmp_path / "ring.toml"
    ring.write_bytes(b"[agents]\nx = " + b"[" * 100_000)
    with pytest.raises(SignatureError, match="not valid TOML") as info:
        bb3.Keyring.load(ring)
    assert info.value.reason == "malformed"
    ring.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SignatureError, match="not valid TOML"):
        bb3.Keyring.load(ring)
    key = tmp_path / "agent.key"
    key.write_bytes(b"[" * 10_000)
    key.chmod(0o600)
    with pytest.raises(SignatureError):
        bb3.load_signing_key(key)


def test_msgspec_itself_would_have_crashed_on_these() -> None:
    # the hazard the edge exists for: without it, the decoder raises RecursionError
    with pytest.raises(RecursionError):
        msgspec.json.decode(_nest(DEPTH_PAST_RECURSION))
