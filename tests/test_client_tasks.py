"""What a client runs, on virtual time (MockClock and the in-memory bus): its tasks live in
``open_client``'s nursery behind shields of their own (``_client/tasks.py``); a core-mode client
starts its confirmer with its first claim; the clients of one connection share one judge and
one metronome, which passes to another member when its keeper leaves, and made-up beats reach
every member once.
"""

from __future__ import annotations

import trio
import trio.testing

import backbeat_trio as bb3
from backbeat_trio import testing as bbt
from backbeat_trio._client.judge import BeatJudge

CLAIM = bb3.StatusClaim(task_id="t", state="executing", beats_left=1, progress=0.5)


def metronomes() -> int:
    """Tasks running a judge's metronome now."""
    root = trio.lowlevel.current_root_task()
    count = 0
    todo = [root]
    while todo:
        task = todo.pop()
        count += task.name.startswith("metronome:")
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return count


async def test_a_client_that_never_claims_runs_no_confirmer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        bbt.open_fake_cluster("tasks", tempo_bpm=120) as cluster,
        cluster.open_client() as bb,
    ):
        await bb.wait_for_beat()
        assert len(bb._tasks) == 1  # the reconnect-supervisor only
        await bb.emit_status(CLAIM)
        await bb.flush_claims()
        assert len(bb._tasks) == 2  # the confirmer came with the first claim
        assert bb.metrics.claims_confirmed == 1
    assert len(bb._tasks) == 0  # closing the client ended both


async def test_clients_of_one_connection_share_one_judge_and_one_metronome(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bbt.open_fake_cluster("tasks-shared", tempo_bpm=120) as cluster:
        conn = cluster.connect()
        stops = [trio.Event() for _ in range(20)]
        clients: list[bb3.Client] = []

        async def agent(i: int, *, task_status: trio.TaskStatus[None]) -> None:
            async with cluster.open_client(f"agent-{i}", connection=conn) as bb:
                clients.append(bb)
                task_status.started()
                await stops[i].wait()

        async with trio.open_nursery() as nursery:
            for i in range(20):
                await nursery.start(agent, i)
            await clients[-1].wait_for_beat()
            judges = {id(c._judge) for c in clients}
            assert len(judges) == 1
            judge = clients[0]._judge
            assert isinstance(judge, BeatJudge)
            assert len(judge.members) == 20
            assert metronomes() == 1
            # the member keeping the metronome leaves: another member's nursery takes it
            keeper = next(i for i, c in enumerate(clients) if c.agent_id == judge.keeper)
            stops[keeper].set()
            await trio.testing.wait_all_tasks_blocked()
            assert judge.keeper not in (None, f"agent-{keeper}")
            assert judge.handovers == 1
            assert metronomes() == 1
            remaining = [c for i, c in enumerate(clients) if i != keeper]
            # the pulse goes silent: one metronome makes the beats up, once for every member
            cluster.stop_pulse()
            before = [c.metrics.degraded_beats for c in remaining]
            await trio.sleep(5.0)
            after = [c.metrics.degraded_beats for c in remaining]
            assert len(set(after)) == 1, after
            assert after[0] >= 8, after
            assert all(a > b for a, b in zip(after, before, strict=True))
            assert judge.silences == 1
            assert judge.checks == 1  # one check with the server for the whole episode
            for stop in stops:
                stop.set()
        assert judge.members == ()
        assert metronomes() == 0
        await conn.aclose()


async def test_cancelling_the_block_leaves_the_claims_their_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # the block that holds the client is cancelled with a claim unconfirmed and the bus down:
    # the shielded shutdown still waits its close_grace for the bus, and delivers the claim
    async with (
        bbt.open_fake_cluster("tasks-cancel", tempo_bpm=120) as cluster,
        trio.open_nursery() as nursery,
    ):

        async def back() -> None:
            await trio.sleep(3.0)
            cluster.broker.set_up()

        with trio.move_on_after(2.0):
            async with cluster.open_client(close_grace=5.0) as bb:
                await bb.wait_for_beat()
                cluster.broker.set_down()
                nursery.start_soon(back)
                await bb.emit_status(CLAIM)
                await trio.sleep_forever()
        assert trio.current_time() >= 3.0  # the shutdown waited for the bus
        assert bb.undelivered() == []
        assert bb.metrics.claims_confirmed == 1
