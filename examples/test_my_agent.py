"""Testing an agent with the fake cluster, bar reports included: a pytest file to copy.

Run it with ``python -m pytest examples/test_my_agent.py`` (from the repository root, or copy it
next to your agent). It needs pytest and pytest-trio (``pip install pytest pytest-trio``) and
``trio_mode = true`` under ``[tool.pytest.ini_options]`` in your ``pyproject.toml`` (or mark each
test ``@pytest.mark.trio``).

``open_fake_cluster(reverb=True)`` runs the real pulse and the real reverb on an in-memory bus.
Under pytest-trio's ``autojump_clock`` fixture sleeping is free, so the dozens of beats below
take milliseconds, and the same test gives the same bar reports every time: each issue the
reverb knows (``failed``, ``deadlock``, ``overrun``) can be asserted exactly.
"""

from __future__ import annotations

import trio
import trio.testing

import backbeat_trio as bb3
from backbeat_trio.testing import open_fake_cluster


# --- the agent under test: in your project it lives in its own module ---------------------------
async def run_task(bb: bb3.Client, task_id: str, *, work_beats: int, budget: int) -> bool:
    """Work ``work_beats`` beats on a task under a budget of ``budget`` beats.

    Every claim names the task and says how many beats it still needs (``beats_left``), and the
    task ends with ``done`` or ``failed``: a task left open past its estimate is an ``overrun``.

    Returns:
        True when the task was done within its budget.
    """
    await bb.emit_status(bb3.StatusClaim(task_id=task_id, state="planning", beats_left=work_beats))
    with bb.beat_budget(budget) as scope:
        for step in range(1, work_beats + 1):
            await bb.wait_for_beat()  # the real work would go here
            await bb.emit_status(
                bb3.StatusClaim(
                    task_id=task_id,
                    state="executing",
                    progress=step / work_beats,
                    beats_left=work_beats - step,
                )
            )
    if scope.cancelled_caught:
        await bb.emit_status(
            bb3.StatusClaim(task_id=task_id, state="failed", notes=f"over its {budget}-beat budget")
        )
        return False
    await bb.emit_status(bb3.StatusClaim(task_id=task_id, state="done", progress=1.0))
    return True


# --- its tests ------------------------------------------------------------------------------------
def issues(cluster_reports: list[bb3.BarReport]) -> list[tuple[str, str]]:
    """``(kind, agent_id)`` of every issue in the reports."""
    return [(issue.kind, issue.agent_id) for r in cluster_reports for issue in r.issues]


async def test_a_task_within_its_budget_gives_clean_reports(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):  # virtual seconds: a wait that never ends fails instead of spinning
        async with (
            open_fake_cluster(tempo_bpm=120, reverb=True) as cluster,
            cluster.open_client("agent-1") as bb,
        ):
            await bb.wait_for_downbeat()
            assert await run_task(bb, "build", work_beats=3, budget=6)
            last = await cluster.next_report()  # the window of the task's last claim
    assert [claim.state for claim in cluster.claims] == [
        "planning", "executing", "executing", "executing", "done"
    ]  # fmt: skip
    assert sum(report.claims for report in cluster.reports) == 5
    assert last.by_state == {"planning": 1, "executing": 3, "done": 1}
    assert issues(cluster.reports) == []


async def test_a_task_over_its_budget_is_reported_failed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with (
            open_fake_cluster(tempo_bpm=120, reverb=True) as cluster,
            cluster.open_client("agent-1") as bb,
        ):
            await bb.wait_for_downbeat()
            assert not await run_task(bb, "build", work_beats=8, budget=3)
            report = await cluster.next_report()
    assert ("failed", "agent-1") in issues([report])
    assert issues(cluster.reports) == [("failed", "agent-1")]


async def test_an_estimate_that_runs_out_is_reported_overrun(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # an agent that says "2 beats left", then goes quiet without finishing
    with trio.fail_after(60):
        async with (
            open_fake_cluster(tempo_bpm=120, reverb=True) as cluster,
            cluster.open_client("agent-1") as bb,
        ):
            await bb.wait_for_downbeat()
            await bb.emit_status(bb3.StatusClaim(task_id="export", state="executing", beats_left=2))
            report = await cluster.next_report()
    [overrun] = [issue for issue in report.issues if issue.kind == "overrun"]
    assert overrun.agent_id == "agent-1"
    assert overrun.detail.startswith("task export is still executing")


async def test_two_agents_waiting_on_each_other_are_reported_deadlocked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with (
            open_fake_cluster(tempo_bpm=120, reverb=True) as cluster,
            cluster.open_client("alice") as alice,
            cluster.open_client("bob") as bob,
        ):
            await alice.wait_for_downbeat()
            for bb, peer in ((alice, "bob"), (bob, "alice")):
                await bb.emit_status(
                    bb3.StatusClaim(
                        task_id="merge",
                        state="waiting",
                        beats_left=4,
                        wait_for=[f"agent://{peer}"],
                    )
                )
            report = await cluster.next_report()
    assert report.blocked == ["alice", "bob"]
    assert [(i.kind, i.detail) for i in report.issues] == [("deadlock", "alice -> bob -> alice")]
