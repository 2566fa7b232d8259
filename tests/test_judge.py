"""The connection's beat judge (``_client/judge.py``) over a real nats-server: clients on one
connection share one judgement of each frame and one metronome; a silent pulse degrades every
one of them (found once, checked with the server) and its return resynchronises them; the
metronome passes to another member's nursery when its keeper leaves; and neither a stall of this
very process nor a thousand clients joining it is taken for silence.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio_asyncio

import backbeat_trio as bb3
from backbeat_trio._client.judge import BeatJudge

pytestmark = pytest.mark.nats

FAST = 600  # 100 ms beats


def agent_config(url: str, cluster: str, i: int, **kw: Any) -> bb3.Config:
    kw = {"reconnect_delay": 0.05, "jetstream": False, **kw}
    return bb3.Config(cluster_id=cluster, agent_id=f"agent-{i}", nats_url=url, **kw)


class Pulse:
    """A pulse that can be stopped and started again further on (its own cancel scope)."""

    def __init__(self, nursery: trio.Nursery, url: str, cluster: str) -> None:
        self.nursery = nursery
        self.url = url
        self.cluster = cluster
        self.scope: trio.CancelScope | None = None

    async def start(self, start_index: int = 0) -> None:
        cfg = bb3.PulseConfig(
            cluster_id=self.cluster,
            tempo_bpm=FAST,
            nats_url=self.url,
            pulse_id="pulse-1",
            start_index=start_index,
        )

        async def run(*, task_status: trio.TaskStatus[None]) -> None:
            with trio.CancelScope() as scope:
                self.scope = scope
                await bb3.run_pulse(cfg, task_status=task_status)

        await self.nursery.start(run)

    def stop(self) -> None:
        assert self.scope is not None
        self.scope.cancel()


@contextlib.asynccontextmanager
async def fleet(
    url: str, cluster: str, n: int, **kw: Any
) -> AsyncIterator[tuple[Pulse, bb3.NatsTransport, list[bb3.Client], contextlib.AsyncExitStack]]:
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        pulse = Pulse(nursery, url, cluster)
        await pulse.start()
        async with (
            bb3.open_nats_transport(agent_config(url, cluster, -1)) as conn,
            contextlib.AsyncExitStack() as stack,
        ):
            clients = [
                await stack.enter_async_context(
                    bb3.open_client(agent_config(url, cluster, i, **kw), transport=conn)
                )
                for i in range(n)
            ]
            yield pulse, conn, clients, stack
        nursery.cancel_scope.cancel()


def the_judge(conn: bb3.NatsTransport) -> BeatJudge:
    [(_, watch, _)] = conn.shared_subscriptions.subscriptions
    assert isinstance(watch, BeatJudge)
    return watch


async def until(predicate: Any, *, poll: float = 0.02) -> None:
    """Until ``predicate()`` (counters with no event of their own; the caller's deadline
    bounds it)."""
    while True:
        if predicate():
            return
        await trio.sleep(poll)


async def test_a_silent_pulse_degrades_every_shared_client_and_its_return_resyncs_them(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="backbeat_trio")
    n = 50
    with trio.fail_after(30):
        async with fleet(nats_url, "watch-silence", n, jitter_tolerance=0.05) as (
            pulse,
            conn,
            clients,
            _,
        ):
            await until(lambda: all(c.metrics.beats >= 3 for c in clients))
            watch = the_judge(conn)
            await until(lambda: watch.watching)
            assert watch.silences == 0
            assert all(c.metrics.degraded_beats == 0 for c in clients)
            pulse.stop()
            # one judge noticed for all of them, checked with the server, and keeps time for all
            await until(lambda: all(c.metrics.degraded_beats >= 3 for c in clients))
            assert watch.silences >= 1
            assert watch.checks >= watch.silences
            assert all(c.degraded for c in clients)
            # one warning for the fifty of them
            warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert len([m for m in warned if "degrading to local beats" in m]) == watch.silences
            assert watch.watching  # one metronome keeps time for every member
            # every member got the same made-up beats, once each
            local = {c.metrics.degraded_beats for c in clients}
            assert max(local) - min(local) <= 1, local
            last = max(c.metrics.beats for c in clients) + 20
            await pulse.start(start_index=last)
            await until(lambda: all(not c.degraded for c in clients))
            assert all(c.metrics.resyncs == 1 for c in clients)
            # healthy again: the one metronome notices the next silence too
            await until(lambda: watch.watching)
            silences = watch.silences
            degraded = [c.metrics.degraded_beats for c in clients]
            pulse.stop()
            await until(
                lambda: all(
                    c.metrics.degraded_beats > d for c, d in zip(clients, degraded, strict=True)
                )
            )
            assert watch.silences > silences


async def test_the_watch_passes_on_when_its_keeper_leaves(nats_url: str) -> None:
    n = 20
    cluster = "watch-handover"
    with trio.fail_after(30):
        async with fleet(nats_url, cluster, 0) as (pulse, conn, _, _):
            clients: list[bb3.Client] = []
            stops: list[trio.Event] = []
            closed: list[trio.Event] = []

            async def agent(i: int, *, task_status: trio.TaskStatus[None]) -> None:
                stop, done = trio.Event(), trio.Event()
                stops.append(stop)
                closed.append(done)
                try:
                    async with bb3.open_client(
                        agent_config(nats_url, cluster, i), transport=conn
                    ) as bb:
                        clients.append(bb)
                        task_status.started()
                        await stop.wait()
                finally:
                    done.set()

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    await nursery.start(agent, i)
                await until(lambda: all(c.metrics.beats >= 3 for c in clients))
                watch = the_judge(conn)
                # close the client keeping the watch
                await until(lambda: watch.keeper is not None)
                keeper = watch.keeper
                k = next(i for i, c in enumerate(clients) if c.config.agent_id == keeper)
                stops[k].set()
                await closed[k].wait()
                assert watch.handovers == 1
                left, remaining = [clients[k]], clients[:k] + clients[k + 1 :]
                # another member took it over
                await until(lambda: watch.keeper not in (None, keeper))
                beats = [c.metrics.beats for c in remaining]
                await until(
                    lambda: all(
                        c.metrics.beats >= b + 2 for c, b in zip(remaining, beats, strict=True)
                    )
                )
                assert all(c.metrics.degraded_beats == 0 for c in remaining)
                pulse.stop()
                # the silence is noticed without the member that kept the watch at first
                await until(lambda: all(c.metrics.degraded_beats >= 2 for c in remaining))
                assert all(c.metrics.degraded_beats == 0 for c in left)
                for stop in stops:
                    stop.set()


PULSE_PROCESS = """
import sys, trio, trio_asyncio, backbeat_trio as bb3
async def main():
    async with trio_asyncio.open_loop():
        await bb3.run_pulse(bb3.PulseConfig(
            cluster_id=sys.argv[2], tempo_bpm=int(sys.argv[3]), nats_url=sys.argv[1]))
trio.run(main)
"""


@contextlib.asynccontextmanager
async def pulse_process(url: str, cluster: str) -> AsyncIterator[None]:
    """A pulse in a process of its own (it keeps beating while this one stalls), under an
    asyncio loop for the clients; stopped when the block ends."""
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        nursery.start_soon(
            functools.partial(
                trio.run_process,
                [sys.executable, "-c", PULSE_PROCESS, url, cluster, str(FAST)],
                check=False,
            )
        )
        yield
        nursery.cancel_scope.cancel()


def each_got(clients: list[bb3.Client], beats: list[int]) -> bool:
    """Whether each client counted at least its number of ``beats``."""
    return all(c.metrics.beats >= b for c, b in zip(clients, beats, strict=True))


def stall(seconds: float) -> None:
    """Block this process's event loop, as a long garbage collection does."""
    time.sleep(seconds)


async def test_a_stall_of_this_process_is_not_a_silent_pulse(nats_url: str) -> None:
    n = 30
    cluster = "watch-stall"
    with trio.fail_after(30):
        async with (
            pulse_process(nats_url, cluster),
            bb3.open_nats_transport(agent_config(nats_url, cluster, -1)) as conn,
            contextlib.AsyncExitStack() as stack,
        ):
            clients = [
                await stack.enter_async_context(
                    bb3.open_client(agent_config(nats_url, cluster, i), transport=conn)
                )
                for i in range(n)
            ]
            await until(lambda: all(c.metrics.beats >= 5 for c in clients))
            watch = the_judge(conn)
            for _ in range(3):
                beats = [c.metrics.beats for c in clients]
                await until(lambda: watch.watching)
                # this whole process stops for four beats (a long garbage collection, a
                # task that blocks): the frames wait on the socket, every alarm passes
                stall(0.4)
                await until(functools.partial(each_got, clients, [b + 3 for b in beats]))
            assert all(c.metrics.degraded_beats == 0 for c in clients), [
                c.metrics.degraded_beats for c in clients
            ]
            assert watch.silences == 0
            # the frames that waited were judged as any late frame is, not synthesised over
            assert all(c.metrics.stale + c.metrics.beats_skipped >= 3 for c in clients)


async def test_a_stalled_lone_client_does_not_make_up_beats(nats_url: str) -> None:
    # a client on its own connection: its judge is its own, and the same check holds
    cluster = "judge-stall-lone"
    with trio.fail_after(30):
        async with (
            pulse_process(nats_url, cluster),
            bb3.open_client(agent_config(nats_url, cluster, 0)) as bb,
        ):
            await until(lambda: bb.metrics.beats >= 5)
            judge = bb._judge
            for _ in range(3):
                beats = bb.metrics.beats
                stall(0.4)  # four beats and more: every alarm passes
                await until(lambda: bb.metrics.beats >= beats + 3)  # noqa: B023
            assert bb.metrics.degraded_beats == 0, bb.metrics
            assert judge.silences == 0
            assert judge.busy >= 1  # the alarm rang, and the check found frames arriving
            assert bb.metrics.duplicate_or_old == 0


JOINING = 1000


async def test_a_thousand_clients_joining_a_busy_process_keep_time(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A pulse in a process of its own beats while this process takes in a thousand clients at
    # once (the join storm of a big agent host starting). Before the judge checked silence
    # with the server, the clients that had joined first made up beats while the frames waited
    # behind the joining, then discarded the pulse's frames for those beats.
    caplog.set_level(logging.WARNING, logger="backbeat_trio")
    cluster = "judge-join-storm"
    with trio.fail_after(120):
        # the pulse is beating before the storm begins
        async with (
            pulse_process(nats_url, cluster),
            bb3.open_nats_transport(agent_config(nats_url, cluster, -1)) as conn,
            bb3.open_client(agent_config(nats_url, cluster, -2), transport=conn) as first,
        ):
            await until(lambda: first.metrics.beats >= 3)
            clients: list[bb3.Client] = []
            stop = trio.Event()

            async def agent(i: int) -> None:
                cfg = agent_config(nats_url, cluster, i)
                async with bb3.open_client(cfg, transport=conn) as bb:
                    clients.append(bb)
                    await stop.wait()

            async with trio.open_nursery() as agents:
                for i in range(JOINING):
                    agents.start_soon(agent, i)
                await until(lambda: len(clients) == JOINING)
                beats = first.metrics.beats
                await until(lambda: first.metrics.beats >= beats + 5)
                judge = the_judge(conn)
                everyone = [first, *clients]
                local = [c.metrics.degraded_beats for c in everyone]
                discarded = [c.metrics.duplicate_or_old for c in everyone]
                stop.set()
    assert judge.silences == 0, judge
    assert set(local) == {0}, sorted(set(local))
    assert set(discarded) == {0}, sorted(set(discarded))
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) <= 1, warned
