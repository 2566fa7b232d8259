"""The reverb's bar aggregation (sans-IO): counts, late/rejected, stalls, deadlocks, issue caps."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backbeat_trio._core.aggregate import MAX_ISSUES, BarAggregator, find_deadlocks
from backbeat_trio._core.beats import window_id
from backbeat_trio._core.wire import BarReport, ClaimState, StatusClaim, decode, encode
from backbeat_trio._errors import ConfigError

HLC = "000000000001:0000:0001"
STATES: tuple[str, ...] = get_args(ClaimState)
AGENTS = [f"a{i}" for i in range(8)]


def claim(
    agent: str,
    beat: int,
    state: str = "executing",
    *,
    wait_for: Sequence[str] = (),
    beats_left: int = 3,
    progress: float = 0.5,
    task: str = "t1",
    hlc: str = HLC,
) -> StatusClaim:
    return StatusClaim(
        agent_id=agent,
        task_id=task,
        beat_index=beat,
        hlc=hlc,
        state=state,  # type: ignore[arg-type]
        wait_for=list(wait_for),
        beats_left=beats_left,
        progress=progress,
    )


def kinds(report: BarReport, kind: str) -> list[str]:
    return [i.agent_id for i in report.issues if i.kind == kind]


claims_in_window_0 = st.lists(
    st.builds(
        claim,
        agent=st.sampled_from(AGENTS),
        beat=st.integers(0, 3),
        state=st.sampled_from(STATES),
        wait_for=st.lists(st.sampled_from([f"agent://{a}" for a in AGENTS] + ["task://x"])),
        beats_left=st.integers(0, 5),
        progress=st.floats(0, 1),
        task=st.sampled_from(["t1", "t2"]),
        hlc=st.integers(0, 50).map(lambda n: f"{n:012x}:0000:0001"),
    ),
    max_size=40,
)


@given(claims=claims_in_window_0, arrivals=st.lists(st.integers(0, 7), min_size=40, max_size=40))
def test_counts_add_up(claims: list[StatusClaim], arrivals: list[int]) -> None:
    agg = BarAggregator("prod")
    for c, arrival in zip(claims, arrivals, strict=False):
        assert agg.add_claim(c, arrival_beat=arrival) == "counted"
    report = agg.close_window(0, HLC)
    assert (report.from_beat, report.to_beat) == (0, 3)
    assert report.window_id == window_id("prod", 0)
    assert report.claims == len(claims)
    assert sum(report.by_state.values()) == report.claims
    assert all(n > 0 for n in report.by_state.values())
    for state in STATES:
        assert report.by_state.get(state, 0) == sum(c.state == state for c in claims)
    assert report.agents_reporting == len({c.agent_id for c in claims})
    # latest per agent: highest (beat_index, hlc), later arrival breaking ties
    latest: dict[str, tuple[tuple[int, str, int], StatusClaim]] = {}
    for seq, c in enumerate(claims):
        key = (c.beat_index, c.hlc, seq)
        if c.agent_id not in latest or key > latest[c.agent_id][0]:
            latest[c.agent_id] = (key, c)
    final = [c for _, c in latest.values()]
    if final:
        assert math.isclose(report.mean_progress, sum(c.progress for c in final) / len(final))
    else:
        assert report.mean_progress == 0.0
    assert report.max_beats_left == max((c.beats_left for c in final), default=0)
    on_time = {
        c.agent_id
        for c, arrival in zip(claims, arrivals, strict=False)
        if c.state in ("review", "done") and arrival <= 3
    }
    assert report.on_time_reviews == len(on_time)
    assert report.blocked == sorted(
        a for a, c in latest.items() if c[1].state == "waiting" and c[1].wait_for
    )
    assert sorted(set(kinds(report, "failed"))) == sorted(
        {c.agent_id for c in claims if c.state == "failed"}
    )
    assert report.late == report.rejected == 0
    assert decode(encode(report), BarReport) == report


def has_cycle_through(graph: Mapping[str, Iterable[str]], node: str) -> bool:
    """Independent check: can ``node`` reach itself in one or more steps?"""
    seen: set[str] = set()
    todo = list(graph.get(node, ()))
    while todo:
        current = todo.pop()
        if current == node:
            return True
        if current not in seen:
            seen.add(current)
            todo.extend(graph.get(current, ()))
    return False


def reaches(graph: Mapping[str, Iterable[str]], a: str, b: str) -> bool:
    seen, todo = {a}, [a]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt == b:
                return True
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return a == b


graphs = st.dictionaries(
    st.sampled_from(AGENTS),
    st.tuples(st.booleans(), st.lists(st.sampled_from(AGENTS), max_size=3)),
    max_size=len(AGENTS),
)


@given(graph=graphs)
def test_deadlock_reported_iff_the_wait_for_graph_has_a_cycle(
    graph: dict[str, tuple[bool, list[str]]],
) -> None:
    agg = BarAggregator("prod")
    for agent, (is_waiting, targets) in graph.items():
        refs = [f"agent://{t}" for t in targets] + ["task://ignored"]
        agg.add_claim(claim(agent, 1, "waiting" if is_waiting else "executing", wait_for=refs))
    report = agg.close_window(0, HLC)
    # only waiting agents' wait_for forms the graph
    edges = {a: targets for a, (w, targets) in graph.items() if w}
    edges = {a: [t for t in ts if t in edges] for a, ts in edges.items()}
    on_cycle = {a for a in edges if has_cycle_through(edges, a)}
    deadlocks = [i for i in report.issues if i.kind == "deadlock"]
    assert bool(deadlocks) == bool(on_cycle)
    named: set[str] = set()
    for issue in deadlocks:
        path, _, group = issue.detail.partition(" (deadlocked group: ")
        cycle = path.split(" -> ")
        assert cycle[0] == cycle[-1] == issue.agent_id
        assert all(b in edges[a] for a, b in itertools.pairwise(cycle))
        members = set(group.rstrip(")").split(", ")) if group else set(cycle)
        assert issue.agent_id == min(members)
        assert not named & members  # each deadlocked group once
        named |= members
    assert named == on_cycle
    # groups are the mutual-reachability classes of the cycle nodes
    classes = {
        frozenset(b for b in on_cycle if reaches(edges, a, b) and reaches(edges, b, a))
        for a in on_cycle
    }
    assert len(deadlocks) == len(classes)
    assert report.blocked == sorted(a for a, (w, ts) in graph.items() if w)


def test_find_deadlocks_names_shortest_cycle_from_smallest_agent() -> None:
    graph = {"c": ["a"], "a": ["b", "c"], "b": ["a"], "d": ["d"], "e": ["a"]}
    assert find_deadlocks(graph) == [["a", "b", "a"], ["d", "d"]]
    assert find_deadlocks({"a": ["b"], "b": ["c"], "c": []}) == []
    chain = {f"n{i:05d}": [f"n{i + 1:05d}"] for i in range(5000)}
    chain["n05000"] = ["n00000"]
    (cycle,) = find_deadlocks(chain)  # deep graph: no recursion limit
    assert len(cycle) == 5002


def test_deadlock_detail_names_the_group_and_persists_across_windows() -> None:
    agg = BarAggregator("prod", beats_per_bar=2)
    agg.add_claim(claim("a", 0, "waiting", wait_for=["agent://b", "agent://c"]))
    agg.add_claim(claim("b", 0, "waiting", wait_for=["agent://a"]))
    agg.add_claim(claim("c", 0, "waiting", wait_for=["agent://a"]))
    first = agg.close_window(0, HLC)
    (issue,) = [i for i in first.issues if i.kind == "deadlock"]
    assert (issue.agent_id, issue.detail) == ("a", "a -> b -> a (deadlocked group: a, b, c)")
    # b keeps reporting; a and c are silent but their last wait_for still stands
    agg.add_claim(claim("b", 2, "waiting", wait_for=["agent://a"]))
    second = agg.close_window(2, HLC)
    assert [i.agent_id for i in second.issues if i.kind == "deadlock"] == ["a"]
    assert second.blocked == ["a", "b", "c"]
    # a moves on: the deadlock is gone
    agg.add_claim(claim("a", 4, "executing"))
    third = agg.close_window(4, HLC)
    assert kinds(third, "deadlock") == []
    assert third.blocked == ["b", "c"]


def test_late_claims_count_in_the_next_report_only() -> None:
    agg = BarAggregator("prod")
    agg.add_claim(claim("a", 1))
    first = agg.close_window(0, HLC)
    assert (first.claims, first.late) == (1, 0)
    assert agg.add_claim(claim("b", 3)) == "late"
    assert agg.add_claim(claim("b", 0)) == "late"
    assert agg.add_claim(claim("b", 5)) == "counted"
    second = agg.close_window(4, HLC)
    assert (second.claims, second.late, second.agents_reporting) == (1, 2, 1)
    assert agg.close_window(8, HLC).late == 0


def test_claims_of_a_skipped_window_count_as_late() -> None:
    agg = BarAggregator("prod")
    agg.add_claim(claim("a", 1))
    agg.add_claim(claim("a", 2))
    agg.add_claim(claim("a", 9))
    report = agg.close_window(8, HLC)
    assert (report.claims, report.late) == (1, 2)


def test_on_time_reviews_need_arrival_inside_the_window() -> None:
    agg = BarAggregator("prod")
    agg.observe_beat(3, 0.0, tempo_bpm=60)
    agg.add_claim(claim("a", 3, "review"))  # arrival defaults to the latest beat, 3
    agg.observe_beat(4, 1.0, tempo_bpm=60)
    agg.add_claim(claim("b", 3, "done"))  # arrives in the next window: counted, not on time
    agg.add_claim(claim("c", 2, "review"), arrival_beat=2)
    agg.add_claim(claim("d", 2, "executing"), arrival_beat=2)
    report = agg.close_window(0, HLC)
    assert report.claims == 4
    assert report.on_time_reviews == 2


def test_stalled_agents_are_reported_then_forgotten() -> None:
    agg = BarAggregator("prod", forget_after_windows=2)
    agg.add_claim(claim("a", 0))
    agg.add_claim(claim("b", 0))
    agg.add_claim(claim("done-agent", 0, "done", beats_left=0))
    first = agg.close_window(0, HLC)
    assert kinds(first, "stalled") == []
    agg.add_claim(claim("b", 4))
    second = agg.close_window(4, HLC)
    assert kinds(second, "stalled") == ["a"]
    assert "no claim for 1 window(s)" in second.issues[0].detail
    agg.add_claim(claim("b", 8))
    third = agg.close_window(8, HLC)
    assert kinds(third, "stalled") == ["a"]
    assert agg.tracked_agents == ["b"]  # a silent twice: forgotten, done-agent too
    agg.add_claim(claim("b", 12))
    assert kinds(agg.close_window(12, HLC), "stalled") == []
    # an agent coming back is tracked afresh
    agg.add_claim(claim("a", 16))
    agg.add_claim(claim("b", 16))
    assert agg.close_window(16, HLC).agents_reporting == 2
    assert agg.tracked_agents == ["a", "b"]


def test_rejected_counts_go_to_the_next_report() -> None:
    agg = BarAggregator("prod")
    agg.reject("bad signature")
    agg.reject("bad signature")
    agg.reject("replay")
    first = agg.close_window(0, HLC)
    assert first.rejected == 3
    assert agg.close_window(4, HLC).rejected == 0
    assert agg.rejection_reasons == {"bad signature": 2, "replay": 1}


def test_claims_too_far_ahead_are_rejected() -> None:
    agg = BarAggregator("prod", max_windows_ahead=2)
    agg.observe_beat(0, 0.0, tempo_bpm=60)
    assert agg.add_claim(claim("a", 11)) == "counted"  # window 8: two ahead
    assert agg.add_claim(claim("a", 12)) == "rejected"
    report = agg.close_window(0, HLC)
    assert (report.claims, report.rejected) == (0, 1)
    assert agg.close_window(8, HLC).claims == 1


def test_failed_and_overrun_issues() -> None:
    agg = BarAggregator("prod")
    agg.add_claim(claim("f", 0, "failed", beats_left=0, task="boom"))
    agg.add_claim(claim("o", 0, "executing", beats_left=0, task="slow"))
    agg.add_claim(claim("ok", 0, "done", beats_left=0))
    agg.add_claim(claim("fixed", 0, "executing", beats_left=0, task="x"))
    agg.add_claim(claim("fixed", 1, "done", beats_left=0, task="x"))
    report = agg.close_window(0, HLC)
    assert [(i.kind, i.agent_id) for i in report.issues] == [("failed", "f"), ("overrun", "o")]
    assert report.issues[0].detail == "task boom failed"
    assert "task slow" in report.issues[1].detail


def test_issues_are_capped_at_one_hundred() -> None:
    agg = BarAggregator("prod")
    for i in range(150):
        agg.add_claim(claim(f"agent-{i:03d}", 0, "failed"))
    report = agg.close_window(0, HLC)
    assert len(report.issues) == MAX_ISSUES
    assert all(i.kind == "failed" for i in report.issues[:-1])
    assert report.issues[-1].kind == "truncated"
    assert report.issues[-1].detail == "51 more issue(s) not listed"
    assert report.issues[0].agent_id == "agent-000"


def test_issue_order_is_deterministic() -> None:
    def run(order: list[StatusClaim]) -> BarReport:
        agg = BarAggregator("prod")
        agg.add_claim(claim("s", 0))
        agg.close_window(0, HLC)
        for c in order:
            agg.add_claim(c)
        return agg.close_window(4, HLC)

    cs = [
        claim("z", 4, "failed"),
        claim("y", 4, "waiting", wait_for=["agent://y"]),
        claim("x", 4, "planning", beats_left=0),
        claim("b", 4, "failed"),
    ]
    a, b = run(cs), run(cs[::-1])
    assert a.issues == b.issues
    assert [(i.kind, i.agent_id) for i in a.issues] == [
        ("deadlock", "y"),
        ("failed", "b"),
        ("failed", "z"),
        ("overrun", "x"),
        ("stalled", "s"),
    ]


def test_tempo_drift_is_mean_excess_interval_in_ms() -> None:
    agg = BarAggregator("prod")
    assert agg.observe_beat(0, 100.0, tempo_bpm=60) is None
    assert agg.observe_beat(1, 101.010, tempo_bpm=60) is None
    assert agg.observe_beat(1, 101.5, tempo_bpm=60) is None  # duplicate: ignored
    assert agg.observe_beat(3, 103.030, tempo_bpm=60) is None  # beat 2 missed
    assert agg.observe_beat(4, 104.025, tempo_bpm=60) == 0  # opened window 4
    assert agg.current_window_start == 4
    report = agg.close_window(0, HLC)
    # excesses: +10 ms over one beat, +20 ms over two beats -> 30 ms / 3 beats
    assert math.isclose(report.tempo_drift_ms, 10.0)
    assert math.isclose(agg.close_window(4, HLC).tempo_drift_ms, -5.0)


def test_observe_beat_accepts_frames() -> None:
    from datetime import UTC, datetime

    from backbeat_trio._core.wire import BeatFrame

    agg = BarAggregator("prod")
    frames = [
        BeatFrame(
            cluster_id="prod",
            beat_index=i,
            downbeat=i % 4 == 0,
            phase="plan",
            hlc=HLC,
            deadline_at=datetime(2030, 1, 1, tzinfo=UTC),
            tempo_bpm=120,
            window_id=window_id("prod", i),
        )
        for i in range(5)
    ]
    results = [agg.observe_beat(f, 0.55 * i) for i, f in enumerate(frames)]
    assert results == [None, None, None, None, 0]
    assert math.isclose(agg.close_window(0, HLC).tempo_drift_ms, 50.0)
    with pytest.raises(ValueError, match="tempo_bpm"):
        agg.observe_beat(9, 1.0)


def test_close_window_checks_its_argument() -> None:
    agg = BarAggregator("prod")
    with pytest.raises(ValueError, match="first beat"):
        agg.close_window(3, HLC)
    agg.close_window(4, HLC)
    with pytest.raises(ValueError, match="not after"):
        agg.close_window(4, HLC)
    with pytest.raises(ValueError, match="not after"):
        agg.close_window(0, HLC)
    assert "closed_through=4" in repr(agg)
    with pytest.raises(ConfigError, match="cluster_id"):
        BarAggregator("no spaces")
    with pytest.raises(ConfigError, match="forget_after_windows"):
        BarAggregator("c", forget_after_windows=0)
