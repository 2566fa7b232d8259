"""Hybrid logical clock: monotonicity under any interleaving, bounds, overflow, string form."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backbeat_trio._core.hlc import HLC, HLCStamp, node_id_for
from backbeat_trio._errors import WireError

MAX_FORWARD_MS = 5_000
START_MS = 1_700_000_000_000


class FakeWall:
    """An injectable wall clock in ms that tests move by hand (also backwards)."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


# an op is ("now",), ("recv", remote l relative to our wall clock, remote c) or ("jump", delta ms)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("now")),
        st.tuples(
            st.just("recv"),
            st.one_of(
                st.integers(-100_000, 100_000),  # ordinary skew either way
                st.integers(-3, 3),  # ties with our wall clock
                st.integers(MAX_FORWARD_MS - 2, MAX_FORWARD_MS + 2),  # around the bound
                st.integers(10**9, 10**12),  # a peer with a broken clock, far in the future
            ),
            st.one_of(
                st.integers(0, 0xFFFF), st.sampled_from([0xFFFE, 0xFFFF]), st.integers(0, 2**32)
            ),
        ),
        st.tuples(
            st.just("jump"),
            st.one_of(st.integers(-(10**7), 10**7), st.integers(-5, 5), st.just(0)),
        ),
    ),
    min_size=1,
    max_size=200,
)


@given(ops)
def test_stamps_strictly_increase_and_stay_bounded(
    script: list[tuple[str] | tuple[str, int] | tuple[str, int, int]],
) -> None:
    wall = FakeWall(START_MS)
    clock = HLC("agent-7", wall_ms=wall, max_forward_ms=MAX_FORWARD_MS)
    previous: HLCStamp | None = None
    # nothing may push l past the furthest wall time seen + the forward bound; each counter
    # overflow may add 1 ms on top of that
    highest_wall = wall.now_ms
    events = 0
    rejected = 0
    for op in script:
        if op[0] == "jump":
            wall.now_ms = max(0, wall.now_ms + op[1])  # type: ignore[misc]
            highest_wall = max(highest_wall, wall.now_ms)
            continue
        events += 1
        if op[0] == "now":
            stamp = clock.now()
        else:
            _, rel, c = op  # type: ignore[misc]
            remote = HLCStamp(max(0, wall.now_ms + rel), c, 0x1234)
            stamp = clock.update(remote)
            if remote.l > wall.now_ms + MAX_FORWARD_MS:
                rejected += 1
                # handled as a local event: not dragged towards the remote's l
                floor = previous.l if previous is not None else 0
                assert stamp.l <= max(floor, wall.now_ms) + 1
            else:
                # an accepted remote stamp is merged: ours is past it
                assert (stamp.l, stamp.c) > (remote.l, remote.c)
        assert stamp.node == node_id_for("agent-7")
        assert stamp == clock.last
        assert stamp.l >= wall.now_ms  # never behind the physical clock
        assert stamp.c <= 0xFFFF
        assert stamp.l <= highest_wall + MAX_FORWARD_MS + events
        if previous is not None:
            assert (stamp.l, stamp.c) > (previous.l, previous.c)
        previous = stamp
    assert clock.rejected_remote == rejected


def test_far_future_remote_is_not_adopted() -> None:
    wall = FakeWall(START_MS)
    clock = HLC("n", wall_ms=wall, max_forward_ms=1_000)
    first = clock.now()
    stamp = clock.update(HLCStamp(START_MS + 10**9, 5, 1))
    assert stamp == HLCStamp(START_MS, first.c + 1, clock.node)
    assert clock.rejected_remote == 1
    # just inside the bound is adopted
    inside = clock.update(HLCStamp(START_MS + 1_000, 7, 1))
    assert inside == HLCStamp(START_MS + 1_000, 8, clock.node)
    assert clock.rejected_remote == 1


def test_receive_rules() -> None:
    wall = FakeWall(1_000)
    clock = HLC(0x0042, wall_ms=wall)
    assert clock.now() == HLCStamp(1_000, 0, 0x42)
    assert clock.now() == HLCStamp(1_000, 1, 0x42)
    # remote ahead: adopt its l, its c + 1
    assert clock.update(HLCStamp(1_500, 9, 1)) == HLCStamp(1_500, 10, 0x42)
    # same l on both sides: max of counters + 1
    assert clock.update(HLCStamp(1_500, 3, 1)) == HLCStamp(1_500, 11, 0x42)
    assert clock.update(HLCStamp(1_500, 20, 1)) == HLCStamp(1_500, 21, 0x42)
    # remote behind: ours + 1
    assert clock.update(HLCStamp(10, 999, 1)) == HLCStamp(1_500, 22, 0x42)
    # wall clock overtakes everything: c resets
    wall.now_ms = 2_000
    assert clock.update(HLCStamp(1_999, 999, 1)) == HLCStamp(2_000, 0, 0x42)
    # strings are parsed, any width
    assert clock.update("7d0:5:1") == HLCStamp(2_000, 6, 0x42)


def test_counter_overflow_on_receive_advances_l() -> None:
    clock = HLC("n", wall_ms=lambda: 1_000)
    assert clock.update(HLCStamp(1_000, 0xFFFF, 3)) == HLCStamp(1_001, 0, clock.node)
    assert clock.now() == HLCStamp(1_001, 1, clock.node)


def test_counter_overflow_on_local_events_advances_l() -> None:
    clock = HLC("n", wall_ms=lambda: 5_000)
    stamps = [clock.now() for _ in range(0x10001)]
    assert stamps[0] == HLCStamp(5_000, 0, clock.node)
    assert stamps[0xFFFF] == HLCStamp(5_000, 0xFFFF, clock.node)
    assert stamps[0x10000] == HLCStamp(5_001, 0, clock.node)
    assert max(s.c for s in stamps) == 0xFFFF


def test_node_id_is_first_two_bytes_of_sha256() -> None:
    for name in ("agent-7", "pulse-1", "x"):
        expected = int.from_bytes(hashlib.sha256(name.encode()).digest()[:2], "big")
        assert node_id_for(name) == expected
        assert HLC(name).node == expected
    assert node_id_for("pulse-1") == 0x372E


_FIXED = re.compile(r"[0-9a-f]{12}:[0-9a-f]{4}:[0-9a-f]{4}")


@given(st.integers(0, 2**48 - 1), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_string_form_is_fixed_width_lowercase_and_parses_back(wall: int, c: int, node: int) -> None:
    stamp = HLCStamp(wall, c, node)
    text = str(stamp)
    assert _FIXED.fullmatch(text), text
    assert HLCStamp.parse(text) == stamp
    assert HLCStamp.parse(text.upper()) == stamp


def test_string_form_examples() -> None:
    assert str(HLCStamp(1, 2, 3)) == "000000000001:0002:0003"
    assert str(HLCStamp(0xABCDEF, 0xAB, 0xCDEF)) == "000000abcdef:00ab:cdef"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1:2:3", HLCStamp(1, 2, 3)),
        ("0000000000000001:00000002:0003", HLCStamp(1, 2, 3)),
        ("ABCDEF:A:b", HLCStamp(0xABCDEF, 10, 11)),
        ("ffffffffffffffff:ffffffff:ffff", HLCStamp(2**64 - 1, 2**32 - 1, 0xFFFF)),
    ],
)
def test_parse_accepts_other_widths(text: str, expected: HLCStamp) -> None:
    assert HLCStamp.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1:2",
        "1:2:3:4",
        "x:1:2",
        "1:2:3\n",
        " 1:2:3",
        "1::2",
        "-1:2:3",
        "0x1:2:3",
        "1:2:3 ",
        "1" * 17 + ":2:3",
        "1;2;3",
        "１:2:3",  # a full-width digit
        None,
        123,
    ],
)
def test_parse_rejects_garbage(text: object) -> None:
    with pytest.raises(WireError, match="HLC"):
        HLCStamp.parse(text)  # type: ignore[arg-type]


def test_update_with_garbage_string_raises_and_keeps_state() -> None:
    clock = HLC("n", wall_ms=lambda: 10)
    before = clock.now()
    with pytest.raises(WireError):
        clock.update("garbage")
    assert clock.last == before


def test_order_is_tuple_order_not_string_order() -> None:
    narrow, wide = "a:0:0", "10:0:0"
    assert narrow > wide  # as strings "a" sorts after "1"...
    assert HLCStamp.parse(narrow) < HLCStamp.parse(wide)  # ...but 0xa < 0x10
    assert HLCStamp.parse("1:ffff:0") < HLCStamp.parse("2:0:0")
    assert HLCStamp.parse("1:2:3") < HLCStamp.parse("1:2:4")  # node breaks ties
    # the clock merges by value too: a narrow but larger remote stamp wins
    clock = HLC("n", wall_ms=lambda: 0x10)
    assert clock.update("11:0:1").l == 0x11


@given(ops)
def test_now_text_is_the_text_of_now_and_is_at_tells_a_moved_clock(
    script: list[tuple[str] | tuple[str, int] | tuple[str, int, int]],
) -> None:
    """``now_text`` (the claims' stamp) gives ``str(now())`` of a twin clock under any
    interleaving, its cached wall part included; ``is_at`` is False once the clock moved."""
    wall = FakeWall(START_MS)
    ours = HLC("agent-7", wall_ms=wall, max_forward_ms=MAX_FORWARD_MS)
    twin = HLC("agent-7", wall_ms=wall, max_forward_ms=MAX_FORWARD_MS)
    for op in script:
        if op[0] == "jump":
            wall.now_ms = max(0, wall.now_ms + op[1])  # type: ignore[misc]
            continue
        seen = ours.last
        assert ours.is_at(seen)
        if op[0] == "now":
            assert ours.now_text() == str(twin.now())
        else:
            _, rel, c = op  # type: ignore[misc]
            remote = HLCStamp(max(0, wall.now_ms + rel), c, 0x1234)
            assert ours.update(remote) == twin.update(remote)
        assert ours.last == twin.last
        assert not ours.is_at(seen)  # every event moves the clock
    assert not ours.is_at(None)
    assert not ours.is_at(ours.last._replace(node=ours.node ^ 1))
