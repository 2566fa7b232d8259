"""Many clients in one process on one NATS connection (``NatsTransport.view``), over a real
nats-server: beats in and signed claims out for every client, every view told of a server
restart, and views that detach without closing the connection.
"""

from __future__ import annotations

from typing import Any

import nats
import pytest
import trio
import trio_asyncio

import backbeat_trio as bb3
from backbeat_trio._embedded import NatsServerProcess

pytestmark = pytest.mark.nats

FAST = 600


def pulse_config(url: str, cluster: str) -> bb3.PulseConfig:
    return bb3.PulseConfig(cluster_id=cluster, tempo_bpm=FAST, nats_url=url, pulse_id="pulse-1")


def agent_config(url: str, cluster: str, i: int, **kw: Any) -> bb3.Config:
    kw = {"reconnect_delay": 0.05, "jitter_tolerance": 0.08, **kw}
    return bb3.Config(cluster_id=cluster, agent_id=f"agent-{i}", nats_url=url, **kw)


async def test_clients_on_one_connection_get_beats_and_send_claims(nats_url: str) -> None:
    cluster = "shared"
    n = 5
    keys = [bb3.generate_signing_key() for _ in range(n)]
    got: dict[int, list[int]] = {}
    sent: dict[int, bb3.StatusClaim] = {}
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        nc = await trio_asyncio.aio_as_trio(nats.connect)(nats_url)
        raw = await trio_asyncio.aio_as_trio(nc.subscribe)(f"backbeat.status.{cluster}")
        await trio_asyncio.aio_as_trio(nc.flush)()
        await nursery.start(bb3.run_pulse, pulse_config(nats_url, cluster))
        async with bb3.open_nats_transport(agent_config(nats_url, cluster, 0)) as conn:

            async def agent(i: int) -> None:
                cfg = agent_config(nats_url, cluster, i, signing_key=keys[i])
                async with conn.view() as t, bb3.open_client(cfg, transport=t) as bb:
                    beats = bb.beats()
                    got[i] = [(await beats.receive()).beat_index for _ in range(4)]
                    sent[i] = await bb.emit_status(bb3.StatusClaim(notes=f"from {i}"))
                    await bb.flush_claims()

            with trio.fail_after(15):
                async with trio.open_nursery() as agents:
                    for i in range(n):
                        agents.start_soon(agent, i)
                    await trio.sleep(0.3)
                    assert len(conn._views) == n  # one view per client, all on this connection
                    assert "views=5" in repr(conn)
            assert conn._views == []  # each client's view detached when it closed
            assert conn.connected
            msgs = [await trio_asyncio.aio_as_trio(raw.next_msg)(timeout=5) for _ in range(n)]
        await trio_asyncio.aio_as_trio(nc.close)()
        nursery.cancel_scope.cancel()
    for i in range(n):
        assert got[i] == list(range(got[i][0], got[i][0] + 4))
    by_agent = {m.headers["Backbeat-Agent"]: m for m in msgs}
    assert sorted(by_agent) == [f"agent-{i}" for i in range(n)]
    keyring = bb3.Keyring({f"agent-{i}": keys[i].verify_key for i in range(n)})
    for i in range(n):
        msg = by_agent[f"agent-{i}"]
        claim = bb3.verify_claim(msg.data, msg.headers, keyring)
        assert claim.notes == f"from {i}"
        assert claim.hlc == sent[i].hlc


async def test_every_view_is_told_of_a_server_restart(
    nats_server: NatsServerProcess, nats_url: str
) -> None:
    cluster = "shared-restart"
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(bb3.run_pulse, pulse_config(nats_url, cluster))
        async with (
            bb3.open_nats_transport(agent_config(nats_url, cluster, 0)) as conn,
            conn.view() as ta,
            conn.view() as tb,
            bb3.open_client(agent_config(nats_url, cluster, 1), transport=ta) as a,
            bb3.open_client(agent_config(nats_url, cluster, 2), transport=tb) as b,
        ):
            with trio.fail_after(20):
                await a.wait_for_beat()
                await b.wait_for_beat()
                nats_server.kill()
                await a.wait_connected(False)
                await b.wait_connected(False)
                await trio.to_thread.run_sync(nats_server.restart)
                await a.wait_connected(True)
                await b.wait_connected(True)
                beats_before = a.metrics.beats
                # the pulse is back too: both follow it again
                for c in (a, b):
                    while c.metrics.resyncs < 1:
                        await c.wait_for_beat()
                await a.wait_for_beat()
        nursery.cancel_scope.cancel()
    for c in (a, b):
        assert c.metrics.disconnects >= 1
        assert c.metrics.reconnects >= 1
        assert "disconnected from NATS" in (c.health().errors or [])
    assert a.metrics.beats > beats_before


async def test_views_detach_without_closing_the_connection(nats_url: str) -> None:
    async with (
        trio_asyncio.open_loop(),
        bb3.open_nats_transport(agent_config(nats_url, "detach", 0)) as conn,
    ):
        own = conn.events
        first, second = conn.view(), conn.view()
        conn._emit("error", "one")
        # every view, and the transport's own channel (a client may run on it directly)
        for channel in (own, first.events, second.events):
            assert channel.receive_nowait().detail == "one"
        await first.aclose()
        conn._emit("error", "two")
        with trio.fail_after(5), pytest.raises(trio.EndOfChannel):
            await first.events.receive()
        assert second.events.receive_nowait().detail == "two"
        # a detached view refuses to be used; the connection and the other view carry on
        assert not first.connected
        assert "detached" in repr(first)
        with pytest.raises(bb3.NotConnected, match=r"view .* was closed"):
            first.publish("detach.x", b"lost?")
        assert conn.connected
        assert second.connected
        sub = await second.subscribe("detach.x", buffer=4)
        second.publish("detach.x", b"still here")
        with trio.fail_after(5):
            assert (await sub.messages.receive()).data == b"still here"
    # closing the transport ended the remaining view's events

    async def drain() -> None:
        while True:
            await second.events.receive()

    with trio.fail_after(5), pytest.raises(trio.EndOfChannel):
        await drain()
    with pytest.raises(bb3.NotConnected):
        conn.view()


async def test_a_cancelled_flush_leaves_the_connection_reading_for_everyone(
    nats_url: str,
) -> None:
    # nats-py keeps the PING's future until the PONG: cancelling it used to make the PONG stop
    # nats-py's read loop, for every view, until a reconnect 10-15 s later
    async with (
        trio_asyncio.open_loop(),
        bb3.open_nats_transport(agent_config(nats_url, "flush-cancel", 0)) as conn,
        conn.view() as a,
        conn.view() as b,
    ):
        sub = await b.subscribe("flush.cancel", buffer=64)
        nc = conn._nc
        for attempt in range(5):
            with trio.CancelScope() as scope:

                async def cancel_once_pinged(scope: trio.CancelScope = scope) -> None:
                    while not nc._pongs:
                        await trio.lowlevel.checkpoint()
                    scope.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_once_pinged)
                    await a.flush()  # cancelled while it waits for its PONG
            assert scope.cancelled_caught
            await trio.sleep(0.1)  # the PONG arrives meanwhile
            assert not nc._reading_task.done(), f"nats-py's reader died (attempt {attempt})"
            a.publish("flush.cancel", b"%d" % attempt)
            with trio.fail_after(3):
                assert (await sub.messages.receive()).data == b"%d" % attempt
        with trio.fail_after(5):
            await b.flush()
        assert [e.kind for e in _pending(b.events)] == []  # no disconnect, no error


def _pending(channel: trio.MemoryReceiveChannel[Any]) -> list[Any]:
    out = []
    while True:
        try:
            out.append(channel.receive_nowait())
        except trio.WouldBlock:
            return out


async def test_a_client_whose_view_is_closed_under_it_stops_loudly(nats_url: str) -> None:
    cluster = "shared-deaf"
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(bb3.run_pulse, pulse_config(nats_url, cluster))
        async with bb3.open_nats_transport(agent_config(nats_url, cluster, 0)) as conn:
            view = conn.view()

            async def client_outliving_its_view() -> None:
                async with bb3.open_client(agent_config(nats_url, cluster, 1), transport=view) as c:
                    await c.wait_for_beat()
                    await view.aclose()  # wrong nesting: the view goes before its client
                    await trio.sleep_forever()

            with trio.fail_after(10), pytest.raises(bb3.NotConnected, match="events ended"):
                await client_outliving_its_view()
        nursery.cancel_scope.cancel()


async def test_history_helpers_accept_a_view(nats_url: str) -> None:
    cluster = "shared-history"
    async with (
        trio_asyncio.open_loop(),
        bb3.open_nats_transport(agent_config(nats_url, cluster, 0)) as conn,
        conn.view() as view,
    ):
        name = await bb3.ensure_bar_stream(view, cluster, max_reports=5)

        summary = await conn.jetstream.stream_summary(name)
        assert summary is not None
        assert summary.max_msgs == 5  # the options reached JetStream through the view
        assert await bb3.last_reported_window(view, cluster) is None
        assert await bb3.replay_bars(view, cluster) == []
