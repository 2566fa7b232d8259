"""Ownership follows scope, over a real nats-server.

Every SDK object (a client, a pulse, a reverb, an HA pulse) owns what it opened, and nothing
else. A task started from inside a client's ``async with`` block inherits the block's context
(and with it trio-asyncio's ``current_loop``), not its lifetime: when the client closes first,
whatever was started under it must keep running and close cleanly later. Each scenario below
opens objects in sibling and nested tasks, closes them in a given order and checks, after every
close, that the surviving clients still receive beats; at the end, that no trio task, asyncio
task or trio-asyncio loop is left behind.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import trio
import trio.testing

import backbeat_trio as bb3
from backbeat_trio._bridge.loop import sdk_loops

pytestmark = pytest.mark.nats

Kind = Literal["client", "pulse", "reverb", "ha"]
TEMPO = 1200  # beats every 50 ms: a few beats prove a survivor is still fed, quickly
BEATS = 3


@dataclass
class Running:
    """One opened object: its cancel scope (to close it) and, for a client, its beats."""

    name: str
    kind: Kind
    scope: trio.CancelScope
    closed: trio.Event = field(default_factory=trio.Event)
    beats: Any = None


@dataclass(frozen=True)
class Node:
    name: str
    kind: Kind
    parent: str | None = None  # started from inside this client's block (None: by the test)


async def _hold(
    node: Node,
    url: str,
    cluster: str,
    children: list[Node],
    nursery: trio.Nursery,
    running: dict[str, Running],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open ``node``'s object, start its ``children`` from inside its block, run until closed."""
    scope = trio.CancelScope()
    handle = Running(node.name, node.kind, scope)
    running[node.name] = handle
    try:
        with scope:
            if node.kind == "client":
                cfg = bb3.Config(cluster_id=cluster, agent_id=node.name, nats_url=url)
                async with bb3.open_client(cfg) as client:
                    handle.beats = client.beats()
                    for child in children:
                        # the child task is spawned here, inside this client's block: it
                        # inherits the block's context but lives in the outer nursery
                        await nursery.start(_hold, child, url, cluster, [], nursery, running)
                    task_status.started()
                    await trio.sleep_forever()
            assert not children, "only clients start children in these scenarios"
            run: Callable[..., Awaitable[None]]
            if node.kind == "pulse":
                cfg_p = bb3.PulseConfig(
                    cluster_id=cluster, nats_url=url, tempo_bpm=TEMPO, pulse_id=node.name
                )
                run, args = bb3.run_pulse, (cfg_p,)
            elif node.kind == "reverb":
                cfg_r = bb3.ReverbConfig(
                    cluster_id=cluster, nats_url=url, keyring=bb3.Keyring({}), allow_unsigned=True
                )
                run, args = bb3.run_reverb, (cfg_r,)
            else:
                cfg_h = bb3.HAPulseConfig(
                    cluster_id=cluster, nats_url=url, tempo_bpm=TEMPO, pulse_id=node.name
                )
                run, args = bb3.run_ha_pulse, (cfg_h,)
            async with trio.open_nursery() as inner:
                await inner.start(run, *args)
                task_status.started()
    finally:
        handle.closed.set()


async def _more_beats(handle: Running, n: int) -> None:
    with trio.fail_after(5):
        for _ in range(n):
            await handle.beats.receive()


async def _scenario(url: str, cluster: str, nodes: list[Node], order: list[str]) -> None:
    await trio.testing.wait_all_tasks_blocked()
    tasks_before = trio.lowlevel.current_statistics().tasks_living
    sources = {n.name for n in nodes if n.kind in ("pulse", "ha")}
    running: dict[str, Running] = {}
    async with trio.open_nursery() as nursery:
        for node in nodes:
            if node.parent is None:
                children = [n for n in nodes if n.parent == node.name]
                await nursery.start(_hold, node, url, cluster, children, nursery, running)
        assert set(running) == {n.name for n in nodes}
        for name in order:
            alive = [h for h in running.values() if not h.closed.is_set()]
            if sources & {h.name for h in alive}:
                for handle in alive:
                    if handle.kind == "client":
                        await _more_beats(handle, BEATS)
            running[name].scope.cancel()
            with trio.fail_after(10):
                await running[name].closed.wait()
            alive = [h for h in running.values() if not h.closed.is_set()]
            if sources & {h.name for h in alive}:
                for handle in alive:
                    if handle.kind == "client":
                        # drop what was queued before the close: fresh beats prove it is fed
                        while True:
                            try:
                                handle.beats.receive_nowait()
                            except trio.WouldBlock:
                                break
                        await _more_beats(handle, BEATS)
        assert all(h.closed.is_set() for h in running.values())
    # nothing left behind: trio tasks, the loops the SDK opened (and their asyncio tasks)
    await trio.testing.wait_all_tasks_blocked()
    assert trio.lowlevel.current_statistics().tasks_living == tasks_before
    assert all(loop.is_closed() for loop in sdk_loops())


SCENARIOS: dict[str, list[Node]] = {
    # a pulse started from inside a client's block; an observer client outside both
    "pulse-in-client": [
        Node("c0", "client"),
        Node("c1", "client"),
        Node("p", "pulse", parent="c1"),
    ],
    # a second client started from inside the first one's block
    "client-in-client": [
        Node("p", "pulse"),
        Node("c1", "client"),
        Node("c2", "client", parent="c1"),
    ],
    # a reverb and a client both started from inside one client's block
    "reverb-and-client-in-client": [
        Node("p", "pulse"),
        Node("c1", "client"),
        Node("r", "reverb", parent="c1"),
        Node("c2", "client", parent="c1"),
    ],
    # an HA pulse started from inside a client's block
    "ha-in-client": [
        Node("c0", "client"),
        Node("c1", "client"),
        Node("h", "ha", parent="c1"),
    ],
    # siblings only
    "siblings": [
        Node("p", "pulse"),
        Node("r", "reverb"),
        Node("c1", "client"),
        Node("c2", "client"),
    ],
}

ORDERS: list[tuple[str, list[str]]] = [
    ("pulse-in-client", ["c1", "p", "c0"]),
    ("pulse-in-client", ["p", "c1", "c0"]),
    ("pulse-in-client", ["c0", "c1", "p"]),
    ("client-in-client", ["c1", "c2", "p"]),
    ("client-in-client", ["c2", "c1", "p"]),
    ("client-in-client", ["p", "c1", "c2"]),
    ("reverb-and-client-in-client", ["c1", "r", "c2", "p"]),
    ("reverb-and-client-in-client", ["c2", "r", "c1", "p"]),
    ("reverb-and-client-in-client", ["r", "c1", "p", "c2"]),
    ("ha-in-client", ["c1", "h", "c0"]),
    ("ha-in-client", ["h", "c1", "c0"]),
    ("siblings", ["p", "r", "c1", "c2"]),
    ("siblings", ["c2", "c1", "r", "p"]),
]


@pytest.mark.parametrize(
    ("scenario", "order"), ORDERS, ids=[f"{s}:{'>'.join(o)}" for s, o in ORDERS]
)
async def test_objects_close_in_any_order_and_survivors_keep_their_beats(
    nats_url: str, scenario: str, order: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="backbeat_trio.transport")
    nodes = SCENARIOS[scenario]
    assert sorted(order) == sorted(n.name for n in nodes)
    cluster = f"own-{scenario}-{''.join(order)}"
    await _scenario(nats_url, cluster, nodes, order)
    leaks = [r for r in caplog.records if "asyncio tasks left" in r.getMessage()]
    assert not leaks, [r.getMessage() for r in leaks]


async def test_a_loop_the_user_opened_is_shared(nats_url: str) -> None:
    # the user's loop around the run is reused (one loop for everything), and nothing the SDK
    # opened is adopted by a later object
    import trio_asyncio

    async with trio_asyncio.open_loop() as loop:
        cfg = bb3.Config(cluster_id="own-user", agent_id="a", nats_url=nats_url)
        async with bb3.open_nats_transport(cfg) as transport:
            assert transport._loop is loop
        assert loop not in set(sdk_loops())
