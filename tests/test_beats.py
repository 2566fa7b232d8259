"""Beat arithmetic: window ids, phases, downbeats, legacy {bar, beat}, ids and subjects."""

from __future__ import annotations

import hashlib
import warnings

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from backbeat_trio._core import legacy as _legacy
from backbeat_trio._core.beats import (
    bar_start,
    bar_subject,
    beat_subject,
    is_downbeat,
    phase_for,
    status_stream_name,
    status_subject,
    tempo_subject,
    validate_id,
    window_id,
)
from backbeat_trio._core.legacy import from_legacy, to_legacy
from backbeat_trio._core.wire import LegacyBeatInfo
from backbeat_trio._errors import ConfigError

ids = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")
indexes = st.integers(min_value=0, max_value=2**63 - 1)
bar_lengths = st.integers(min_value=1, max_value=64)


@pytest.fixture
def fresh_legacy_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reset the once-per-process legacy warning flag (restored afterwards)."""
    monkeypatch.setattr(_legacy, "_legacy_warned", False)


# --- window ids ----------------------------------------------------------------------------------
def test_window_id_matches_the_spec_formula() -> None:
    assert window_id("prod", 1234) == "5a1f63c5c28315950a5c03f078d30851"
    assert window_id("prod", 0) == "bfe4dce201b3d78315225c72ad4b659d"
    expected = hashlib.sha256(b"prod:1232").hexdigest()[:32]
    assert window_id("prod", 1235, 4) == expected


@given(ids, indexes, bar_lengths)
def test_window_id_is_the_sha256_of_cluster_and_bar_start(
    cluster: str, index: int, bpb: int
) -> None:
    start = index - index % bpb
    expected = hashlib.sha256(f"{cluster}:{start}".encode()).hexdigest()[:32]
    assert window_id(cluster, index, bpb) == expected
    assert bar_start(index, bpb) == start


@given(ids, st.integers(0, 2**62), bar_lengths)
def test_window_id_is_constant_inside_a_bar(cluster: str, bar: int, bpb: int) -> None:
    first = bar * bpb
    wids = {window_id(cluster, first + i, bpb) for i in range(bpb)}
    assert len(wids) == 1
    assert all(bar_start(first + i, bpb) == first for i in range(bpb))


@given(ids, st.integers(0, 2**40), st.integers(0, 2**40), bar_lengths)
def test_window_id_differs_across_bars(cluster: str, a: int, b: int, bpb: int) -> None:
    assume(a // bpb != b // bpb)
    assert window_id(cluster, a, bpb) != window_id(cluster, b, bpb)


@given(ids, ids, indexes)
def test_window_id_differs_across_clusters(c1: str, c2: str, index: int) -> None:
    assume(c1 != c2)
    assert window_id(c1, index) != window_id(c2, index)


def test_window_id_shape() -> None:
    wid = window_id("c", 7, 3)
    assert len(wid) == 32
    assert wid == wid.lower()
    int(wid, 16)


# --- phases and downbeats ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bpb", "phases"),
    [
        (1, ["execute"]),
        (2, ["plan", "review"]),
        (3, ["plan", "execute", "review"]),
        (4, ["plan", "execute", "execute", "review"]),
        (7, ["plan", "execute", "execute", "execute", "execute", "execute", "review"]),
    ],
)
def test_phase_rules(bpb: int, phases: list[str]) -> None:
    for bar in (0, 1, 5, 10**12):
        got = [phase_for(bar * bpb + i, bpb) for i in range(bpb)]
        assert got == phases


def test_default_bar_is_four_beats() -> None:
    assert [phase_for(i) for i in range(8)] == ["plan", "execute", "execute", "review"] * 2
    assert [is_downbeat(i) for i in range(5)] == [True, False, False, False, True]


@given(indexes, bar_lengths)
def test_downbeat_is_first_beat_of_bar(index: int, bpb: int) -> None:
    assert is_downbeat(index, bpb) == (index % bpb == 0)
    assert is_downbeat(bar_start(index, bpb), bpb)
    if bpb > 1:
        assert is_downbeat(index, bpb) == (phase_for(index, bpb) == "plan")


def test_beat_zero_is_a_downbeat() -> None:
    for bpb in (1, 2, 3, 4, 7):
        assert is_downbeat(0, bpb)


# --- legacy {bar, beat} --------------------------------------------------------------------------
@given(indexes, bar_lengths)
def test_legacy_round_trip_from_index(index: int, bpb: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        info = to_legacy(index, bpb)
        assert info == LegacyBeatInfo(bar=index // bpb + 1, beat=index % bpb + 1)
        assert 1 <= info.beat <= bpb
        assert from_legacy(info, bpb) == index


@given(st.integers(1, 2**40), bar_lengths, st.data())
def test_legacy_round_trip_from_bar_beat(bar: int, bpb: int, data: st.DataObject) -> None:
    beat = data.draw(st.integers(1, bpb))
    info = LegacyBeatInfo(bar=bar, beat=beat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        index = from_legacy(info, bpb)
        assert index == (bar - 1) * bpb + beat - 1
        assert to_legacy(index, bpb) == info


def test_legacy_examples() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert to_legacy(0) == LegacyBeatInfo(bar=1, beat=1)
        assert to_legacy(5) == LegacyBeatInfo(bar=2, beat=2)
        assert to_legacy(7, 7) == LegacyBeatInfo(bar=2, beat=1)
        assert from_legacy(LegacyBeatInfo(bar=3, beat=4)) == 11


@pytest.mark.usefixtures("fresh_legacy_flag")
def test_legacy_conversion_warns_exactly_once_per_process() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # "always": a repeat would be recorded, not deduplicated
        to_legacy(5)
        from_legacy(LegacyBeatInfo(bar=1, beat=1))
        to_legacy(6)
    assert [w.category for w in record] == [DeprecationWarning]
    assert "BACKBEAT-REQ-043" in str(record[0].message)
    # the warning points at the caller, not at the library
    assert record[0].filename == __file__
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        to_legacy(7)
        from_legacy(LegacyBeatInfo(bar=2, beat=2))
    assert later == []


@pytest.mark.usefixtures("fresh_legacy_flag")
def test_from_legacy_alone_warns() -> None:
    with pytest.warns(DeprecationWarning, match="deprecated") as record:
        assert from_legacy(LegacyBeatInfo(bar=2, beat=1)) == 4
    assert len(record) == 1
    assert record[0].filename == __file__


@pytest.mark.usefixtures("fresh_legacy_flag")
def test_invalid_legacy_input_raises_without_warning() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="beat_index"):
            to_legacy(-1)
        with pytest.raises(ValueError, match="outside"):
            from_legacy(LegacyBeatInfo(bar=1, beat=5), 4)
        with pytest.raises(ValueError, match="outside"):
            from_legacy(LegacyBeatInfo(bar=0, beat=1), 4)
        with pytest.raises(ConfigError, match="beats_per_bar"):
            to_legacy(3, 0)
    assert record == []
    assert _legacy._legacy_warned is False


# --- ids and subjects ----------------------------------------------------------------------------
@given(ids)
def test_validate_id_accepts_valid(value: str) -> None:
    assert validate_id("agent_id", value) == value


@pytest.mark.parametrize(
    "value",
    ["", "a" * 65, "a.b", "a b", "a*", "a>", "a\n", "\na", "ägent", "a/b", "a:b", None, 7, b"ab"],
)
def test_validate_id_rejects_invalid(value: object) -> None:
    with pytest.raises(ConfigError, match="cluster_id") as info:
        validate_id("cluster_id", value)
    assert info.value.field == "cluster_id"
    assert isinstance(info.value, ValueError)


def test_validate_id_edges() -> None:
    assert validate_id("x", "a" * 64) == "a" * 64
    assert validate_id("x", "A-z_0") == "A-z_0"


def test_subjects() -> None:
    assert beat_subject("prod") == "backbeat.beat.prod"
    assert status_subject("prod") == "backbeat.status.prod"
    assert bar_subject("prod") == "backbeat.bar.prod"
    assert tempo_subject("prod") == "backbeat.tempo.prod"
    assert status_stream_name("prod") == "BACKBEAT_STATUS_prod"
