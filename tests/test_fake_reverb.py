"""The fake cluster's reverb: the issues an agent's author wants to see in a bar report (failed,
deadlock, overrun) show deterministically on the MockClock, and a clean agent's reports are
clean; clients sharing one memory connection share one beat subscription; the README's agent
gets clean reports."""

from __future__ import annotations

import ast
import contextlib
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import backbeat_trio as bb3
from backbeat_trio.testing import FakeCluster, open_fake_cluster, virtual_wall_clock

README = Path(__file__).resolve().parent.parent / "README.md"


@contextlib.asynccontextmanager
async def bounded_cluster(**kwargs: Any) -> AsyncIterator[FakeCluster]:
    """``open_fake_cluster`` bounded in virtual time: on the autojump clock a wait that never
    ends would spin for ever instead of failing."""
    with trio.fail_after(600):
        async with open_fake_cluster(**kwargs) as cluster:
            yield cluster


def issues(reports: list[bb3.BarReport]) -> list[tuple[int, str, str, str]]:
    return [(r.from_beat, i.kind, i.agent_id, i.detail) for r in reports for i in r.issues]


async def clean_agent(bb: bb3.Client, task: str = "t-1") -> None:
    """Plans on a downbeat, works three beats with an estimate it keeps, finishes."""
    await bb.wait_for_downbeat()
    await bb.emit_status(bb3.StatusClaim(task_id=task, state="planning", beats_left=4))
    for step in range(1, 4):
        await bb.wait_for_beat()
        await bb.emit_status(
            bb3.StatusClaim(task_id=task, state="executing", progress=step / 4, beats_left=4 - step)
        )
    await bb.wait_for_beat()
    await bb.emit_status(bb3.StatusClaim(task_id=task, state="done", progress=1.0))


async def test_a_clean_agent_gets_clean_reports(autojump_clock: trio.testing.MockClock) -> None:
    async with (
        bounded_cluster(tempo_bpm=120, reverb=True) as cluster,
        cluster.open_client("ada") as bb,
    ):
        await clean_agent(bb)
        last = await cluster.report_for(bb.current_beat)
    reports = cluster.reports
    assert [(r.from_beat, r.claims, r.agents_reporting) for r in reports] == [
        (0, 0, 0),
        (4, 4, 1),
        (8, 1, 1),
    ]
    assert last is reports[-1]
    assert last.by_state == {"done": 1}
    assert issues(reports) == []
    assert cluster.reverb is not None
    assert cluster.reverb.rejected == 0


async def test_a_failure_shows_in_the_next_report(autojump_clock: trio.testing.MockClock) -> None:
    async with (
        bounded_cluster(tempo_bpm=120, reverb=True) as cluster,
        cluster.open_client("bob") as bb,
    ):
        await bb.wait_for_downbeat()
        await bb.emit_status(bb3.StatusClaim(task_id="fetch", state="executing", beats_left=3))
        await bb.wait_for_beat()
        await bb.emit_status(
            bb3.StatusClaim(task_id="fetch", state="failed", notes="upstream said 503")
        )
        report = await cluster.next_report()
    assert (report.from_beat, report.by_state) == (4, {"executing": 1, "failed": 1})
    assert issues([report]) == [(4, "failed", "bob", "task fetch failed: upstream said 503")]


async def test_a_deadlock_shows_in_the_next_report(autojump_clock: trio.testing.MockClock) -> None:
    async with (
        bounded_cluster(tempo_bpm=120, reverb=True) as cluster,
        cluster.open_client("cyd") as cyd,
        cluster.open_client("dot") as dot,
    ):
        await cyd.wait_for_downbeat()
        for bb, peer in ((cyd, "dot"), (dot, "cyd")):
            await bb.emit_status(
                bb3.StatusClaim(
                    task_id="merge", state="waiting", beats_left=4, wait_for=[f"agent://{peer}"]
                )
            )
        report = await cluster.next_report()
    assert report.blocked == ["cyd", "dot"]
    assert issues([report]) == [(4, "deadlock", "cyd", "cyd -> dot -> cyd")]


async def test_an_estimate_that_runs_out_shows_as_overrun(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        bounded_cluster(tempo_bpm=120, reverb=True) as cluster,
        cluster.open_client("eno") as bb,
    ):
        await bb.wait_for_downbeat()  # beat 4
        await bb.emit_status(bb3.StatusClaim(task_id="export", state="executing", beats_left=3))
        assert issues([await cluster.next_report()]) == []  # beats 4-7: not ran out at 7
        # silent since beat 4 (no claim in 8-11): stalled, and its estimate ran out
        assert issues([await cluster.next_report()]) == [
            (
                8,
                "overrun",
                "eno",
                "task export is still executing 7 beats after estimating 3 at beat 4 (progress 0%)",
            ),
            (
                8,
                "stalled",
                "eno",
                "no claim for 1 window(s); last claim at beat 4 (executing, task export)",
            ),
        ]
        await bb.emit_status(
            bb3.StatusClaim(task_id="export", state="executing", progress=0.5, beats_left=0)
        )
        assert issues([await cluster.next_report()]) == [
            (
                12,
                "overrun",
                "eno",
                "task export has 0 beats left but is executing (progress 50%; "
                "it estimated 3 beat(s) at beat 4)",
            )
        ]
        await bb.emit_status(bb3.StatusClaim(task_id="export", state="done", progress=1.0))
        assert issues([await cluster.next_report()]) == []


async def test_a_task_with_no_estimate_is_never_overrun(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # what a Go agent sends when it sets neither task_id nor beats_left, claim after claim
    async with (
        bounded_cluster(tempo_bpm=120, reverb=True) as cluster,
        cluster.open_client("go") as bb,
    ):
        for _ in range(12):
            await bb.wait_for_beat()
            await bb.emit_status(bb3.StatusClaim(state="executing"))
        await cluster.next_report()
    assert sum(r.claims for r in cluster.reports) == 12
    assert issues(cluster.reports) == []


async def test_a_signing_reverb_on_the_fake_cluster_rejects_unknown_keys(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key, stranger = bb3.generate_signing_key(), bb3.generate_signing_key()
    async with bounded_cluster(tempo_bpm=120) as cluster:
        await cluster.start_reverb(keyring=bb3.Keyring({"ada": key.verify_key}))
        async with (
            cluster.open_client("ada", signing_key=key) as ada,
            cluster.open_client("eve", signing_key=stranger) as eve,
            cluster.open_client("anon") as anon,
        ):
            await ada.wait_for_downbeat()
            for bb in (ada, eve, anon):
                await bb.emit_status(bb3.StatusClaim(task_id="t", state="done"))
            report = await cluster.next_report()
    assert (report.claims, report.rejected) == (1, 2)


async def test_clients_on_one_memory_connection_share_one_beat_subscription(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bounded_cluster(tempo_bpm=240) as cluster:
        conn = cluster.connect()
        assert isinstance(conn, bb3.testing.MemoryTransport)
        async with (
            cluster.open_client("a1", connection=conn) as a1,
            cluster.open_client("a2", connection=conn) as a2,
            bb3.open_client(
                cluster.config("a3"), transport=conn, wall_clock=virtual_wall_clock
            ) as a3,
            cluster.open_client("lone") as lone,
        ):
            [(subject, _prepare, members)] = conn.shared_subscriptions.subscriptions
            assert (subject, members) == (f"backbeat.beat.{cluster.cluster_id}", 3)
            chans = [bb.beats() for bb in (a1, a2, a3, lone)]
            seen = [[(await chan.receive()).beat_index for _ in range(12)] for chan in chans]
            # the lone client's own connection shares nothing
            assert lone._transport is not conn
            assert not hasattr(lone._transport, "shared_subscriptions")
        first = seen[0][0]
        assert all(indices == list(range(first, first + 12)) for indices in seen)
        assert all(bb.metrics.beats >= 12 for bb in (a1, a2, a3))
        # the last member left: the one subscription ended
        assert conn.shared_subscriptions.subscriptions == []
        await conn.aclose()


# --- the README's agent ---------------------------------------------------------------------
def readme_main() -> ast.AsyncFunctionDef:
    """The ``main`` of the README's first Python block, as written there."""
    text = README.read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    tree = ast.parse(block)
    [main] = [n for n in tree.body if isinstance(n, ast.AsyncFunctionDef) and n.name == "main"]
    return main


def readme_agent(cluster: FakeCluster, do_work: Callable[[], Awaitable[None]]) -> Any:
    """The README's ``main``, run as written, but its ``open_client`` on the fake cluster."""

    def open_client(cfg: bb3.Config) -> Any:
        return cluster.open_client(cfg.agent_id)

    shim = types.SimpleNamespace(**{n: getattr(bb3, n) for n in bb3.__all__})
    shim.open_client = open_client
    namespace: dict[str, Any] = {
        "trio": trio,
        "bb3": shim,
        "cfg": cluster.config("agent-7"),
        "do_work": do_work,
    }
    module = ast.Module(body=[readme_main()], type_ignores=[])
    exec(compile(module, str(README), "exec"), namespace)  # the README's own code
    return namespace["main"]


@pytest.mark.parametrize("work_s", [0.2, 2.0], ids=["in budget", "over budget"])
async def test_the_readme_agent_gets_clean_reports(
    autojump_clock: trio.testing.MockClock, work_s: float
) -> None:
    async def do_work() -> None:
        await trio.sleep(work_s)

    async with bounded_cluster(tempo_bpm=120, reverb=True) as cluster:
        main = readme_agent(cluster, do_work)
        with trio.move_on_after(20):  # 40 beats, 10 bars
            await main()
        await cluster.next_report()
    assert len(cluster.reports) >= 10
    claims = sum(r.claims for r in cluster.reports)
    assert claims >= 8
    found = issues(cluster.reports)
    if work_s < 1.5:  # the budget is 3 beats, 1.5 s
        assert found == []
    else:  # out of beats: the README's agent says it failed, and nothing else is wrong
        assert found
        assert {kind for _, kind, _, _ in found} == {"failed"}


async def test_unnamed_claims_with_estimates_are_one_task_and_not_overrun(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # no task_id: the SDK's default task of this client, so each estimate follows the last
    async with (
        bounded_cluster(tempo_bpm=120, reverb=True) as cluster,
        cluster.open_client("una") as bb,
    ):
        await bb.wait_for_downbeat()
        for left in (3, 2, 1):
            await bb.emit_status(bb3.StatusClaim(state="executing", beats_left=left))
            await bb.wait_for_beat()
        done = await bb.emit_status(bb3.StatusClaim(state="done", progress=1.0))
        for _ in range(8):
            await bb.wait_for_beat()
        await cluster.report_for(bb.current_beat)
    assert done.task_id.startswith("task:")
    assert issues(cluster.reports) == []
