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
    stalled = next(i for i in second.issues if i.kind == "stalled")
    assert "no claim for 1 window(s)" in stalled.detail
    # a's estimate (3 beats at beat 0) ran out while it was silent
    assert kinds(second, "overrun") == ["a"]
    agg.add_claim(claim("b", 8))
    third = agg.close_window(8, HLC)
    assert kinds(third, "stalled") == ["a"]
    assert agg.tracked_agents == ["b"]  # a silent twice: forgotten, done-agent too
    assert agg.tracked_tasks == 1  # their tasks with them
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
    agg.add_claim(claim("o", 0, "planning", beats_left=2, task="slow", progress=0.25))
    agg.add_claim(claim("o", 1, "executing", beats_left=0, task="slow", progress=0.25))
    agg.add_claim(claim("ok", 0, "done", beats_left=0))
    agg.add_claim(claim("fixed", 0, "executing", beats_left=1, task="x"))
    agg.add_claim(claim("fixed", 1, "executing", beats_left=0, task="x"))
    agg.add_claim(claim("fixed", 2, "done", beats_left=0, task="x"))
    agg.add_claim(claim("rev", 0, "executing", beats_left=1))
    agg.add_claim(claim("rev", 3, "review", beats_left=0))
    report = agg.close_window(0, HLC)
    assert [(i.kind, i.agent_id) for i in report.issues] == [("failed", "f"), ("overrun", "o")]
    assert report.issues[0].detail == "task boom failed"
    assert report.issues[1].detail == (
        "task slow has 0 beats left but is executing (progress 25%; "
        "it estimated 2 beat(s) at beat 0)"
    )


def test_a_task_that_never_gave_an_estimate_is_never_overrun() -> None:
    # what the Go SDK sends when the caller sets neither task_id nor beats_left
    agg = BarAggregator("prod")
    for window in range(0, 40, 4):
        for beat in range(window, window + 4):
            agg.add_claim(claim("go", beat, "executing", beats_left=0, task=f"rand-{beat}"))
            agg.add_claim(claim("one", beat, "executing", beats_left=0, task="same"))
        assert agg.close_window(window, HLC).issues == []


def test_overrun_when_more_beats_pass_than_the_estimate_gave() -> None:
    agg = BarAggregator("prod")
    agg.add_claim(claim("a", 1, "executing", beats_left=6, task="long"))
    agg.add_claim(claim("a", 2, "executing", beats_left=9, task="renewed"))
    assert agg.close_window(0, HLC).issues == []
    agg.add_claim(claim("a", 4, "waiting", beats_left=5, task="renewed"))  # a new estimate
    # beat 7: 6 beats since beat 1, as estimated: not yet
    assert agg.close_window(4, HLC).issues == []
    agg.add_claim(claim("a", 8, "executing", beats_left=7, task="renewed"))
    report = agg.close_window(8, HLC)  # beat 11: 10 beats after beat 1
    assert [(i.kind, i.agent_id, i.detail) for i in report.issues] == [
        ("overrun", "a", "task long is still executing 10 beats after estimating 6 at beat 1 "
         "(progress 50%)"),
    ]  # fmt: skip
    agg.add_claim(claim("a", 12, "done", beats_left=0, task="long"))
    assert agg.close_window(12, HLC).issues == []  # long is done; renewed: 7 beats, as given
    report = agg.close_window(16, HLC)
    assert [i.detail for i in report.issues] == [
        "task renewed is still executing 11 beats after estimating 7 at beat 8 (progress 50%)"
    ]


claims_over_six_windows = st.lists(
    st.builds(
        claim,
        agent=st.sampled_from(AGENTS[:3]),
        beat=st.integers(0, 23),
        state=st.sampled_from(STATES),
        beats_left=st.integers(0, 6),
        task=st.sampled_from(["t1", "t2", "t3"]),
        hlc=st.integers(0, 9).map(lambda n: f"{n:012x}:0000:0001"),
    ),
    max_size=60,
)


@given(claims=claims_over_six_windows)
def test_overrun_is_an_estimate_that_ran_out(claims: list[StatusClaim]) -> None:
    # SPEC's rule, stated directly over every claim counted so far, against the aggregator's
    agg = BarAggregator("prod")
    seen: list[StatusClaim] = []  # in the order the aggregator took them
    for window in range(0, 24, 4):
        for c in claims:
            if window <= c.beat_index < window + 4:
                assert agg.add_claim(c) == "counted"
                seen.append(c)
        report = agg.close_window(window, HLC)
        expected = set()
        for agent, task in {(c.agent_id, c.task_id) for c in seen}:
            mine = [(c.beat_index, c.hlc, n, c) for n, c in enumerate(seen)]
            mine = [m for m in mine if (m[3].agent_id, m[3].task_id) == (agent, task)]
            latest = max(mine, key=lambda m: m[:3])[3]
            estimates = [m for m in mine if m[3].beats_left > 0]
            if not estimates or latest.state in ("done", "failed", "review"):
                continue
            estimate = max(estimates, key=lambda m: m[:3])[3]
            ran_out = window + 3 - estimate.beat_index > estimate.beats_left
            if latest.beats_left == 0 or ran_out:
                expected.add((agent, task))
        got = {(i.agent_id, i.detail.split()[1]) for i in report.issues if i.kind == "overrun"}
        assert got == expected


def test_tasks_tracked_are_bounded_per_agent_and_overall() -> None:
    agg = BarAggregator("prod", max_tasks_per_agent=3, max_tasks=5)
    agg.add_claim(claim("a", 0, "executing", beats_left=1, task="first"))
    for i in range(5):
        agg.add_claim(claim("a", 1, "executing", beats_left=1, task=f"flood-{i}"))
    agg.close_window(0, HLC)
    assert agg.tracked_tasks == 3  # a's oldest, "first" among them, forgotten
    for i in range(4):
        agg.add_claim(claim(f"b{i}", 4, "executing", beats_left=1))
    report = agg.close_window(4, HLC)
    assert agg.tracked_tasks == 5
    assert agg.tasks_evicted == 3 + 2
    # the least recently claimed overall went: two of a's three
    assert sorted(kinds(report, "overrun")) == ["a", "b0", "b1", "b2", "b3"]
    assert "task flood-4 " in str(report.issues)


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
        agg.add_claim(claim("s", 0, beats_left=0))
        agg.add_claim(claim("x", 0, "planning", beats_left=2))
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


def test_a_late_failure_shows_in_the_next_report_and_its_agent_is_not_stalled() -> None:
    # a budget ran out just before the bar ended: the `failed` claim names the closed window
    agg = BarAggregator("prod")
    for beat in range(4):
        agg.observe_beat(beat, float(beat), tempo_bpm=60)
    assert agg.add_claim(claim("bob", 1, beats_left=2, task="fetch")) == "counted"
    assert agg.add_claim(claim("ann", 2, task="a")) == "counted"
    agg.observe_beat(4, 4.0, tempo_bpm=60)
    first = agg.close_window(0, HLC)
    assert kinds(first, "failed") == []
    # in window 4: bob's failure for beat 3 arrives late; ann claims in time
    assert agg.add_claim(claim("bob", 3, "failed", beats_left=0, task="fetch")) == "late"
    assert agg.add_claim(claim("ann", 5, task="a")) == "counted"
    agg.observe_beat(8, 8.0, tempo_bpm=60)
    second = agg.close_window(4, HLC)
    assert second.late == 1
    assert second.claims == 1  # the late one is not among the window's claims
    assert kinds(second, "failed") == ["bob"]
    assert kinds(second, "stalled") == []
    assert kinds(second, "overrun") == []  # failed ends the task


def test_a_late_claim_never_overrides_a_newer_one() -> None:
    agg = BarAggregator("prod")
    for beat in range(5):
        agg.observe_beat(beat, float(beat), tempo_bpm=60)
    agg.close_window(0, HLC)
    assert agg.add_claim(claim("cy", 5, "done", beats_left=0)) == "counted"
    assert agg.add_claim(claim("cy", 2, "waiting", wait_for=["agent://cy"])) == "late"
    agg.observe_beat(8, 8.0, tempo_bpm=60)
    report = agg.close_window(4, HLC)
    assert report.by_state == {"done": 1}
    assert report.blocked == []
    assert kinds(report, "deadlock") == []
