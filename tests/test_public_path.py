"""nats-py's public path, forced with ``BACKBEAT_TRIO_NATS_FAST=0``, over a real nats-server.

Whatever nats-py version is installed, the switch must turn every fast path through nats-py's
private names off (no direct write, no subscription routed around nats-py's task), and the
transport must still do its job on the public API alone: beats flow, flush detects a dead
connection, and closing leaves no asyncio task behind.
"""

from __future__ import annotations

import asyncio

import pytest
import trio
import trio_asyncio
from _guards import fail_on_bare_cancel

import backbeat_trio as bb3
from backbeat_trio._bridge._natspy_private import FAST_ENV, fast_path_enabled, is_direct
from backbeat_trio._bridge.nats import NatsTransport, open_nats_transport
from backbeat_trio._embedded import NatsServerProcess

pytestmark = pytest.mark.nats


@pytest.fixture(autouse=True)
def public_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAST_ENV, "0")


def conn(name: str, url: str) -> bb3.Config:
    return bb3.Config(cluster_id="public", agent_id=name, nats_url=url, reconnect_delay=0.1)


def routed(transport: NatsTransport) -> int:
    return sum(is_direct(nsub) for nsub in transport._nsubs)


def _request_mux_task(task: asyncio.Task[object]) -> bool:
    frame = getattr(task.get_coro(), "cr_frame", None)
    sub = frame.f_locals.get("self") if frame is not None else None
    return getattr(getattr(sub, "_cb", None), "__name__", "") == "_request_sub_callback"


def test_the_switch_turns_the_gate_off() -> None:
    assert not fast_path_enabled()


async def test_no_fast_path_is_taken_and_messages_still_arrive(nats_url: str) -> None:
    n = 500
    async with (
        open_nats_transport(conn("rx", nats_url)) as rx,
        open_nats_transport(conn("tx", nats_url)) as tx,
    ):
        assert not rx.fast
        assert not tx.fast
        sub = await rx.subscribe("public.order", buffer=n)
        assert routed(rx) == 0
        await rx.flush()
        for i in range(n):
            headers = {"Seq": str(i)} if i % 3 == 0 else None
            tx.publish("public.order", b"%d" % i, headers=headers)
            if i % 100 == 0:
                await trio.sleep(0.001)  # let the drainer go idle: a direct write could happen
        await tx.flush()
        with trio.fail_after(10):
            got = [int((await sub.messages.receive()).data) for _ in range(n)]
        assert got == list(range(n))
        assert tx.published == n
        assert tx.direct_writes == 0


async def test_beats_flow_from_a_pulse_to_a_client(nats_url: str) -> None:
    cluster = "public-beats"
    async with trio.open_nursery() as nursery:
        pulse = bb3.PulseConfig(cluster_id=cluster, nats_url=nats_url, tempo_bpm=1200)
        await nursery.start(bb3.run_pulse, pulse)
        cfg = bb3.Config(cluster_id=cluster, agent_id="a", nats_url=nats_url)
        async with bb3.open_client(cfg) as client:
            beats = client.beats()
            with trio.fail_after(5):
                frames = [await beats.receive() for _ in range(5)]
            assert [f.beat_index for f in frames] == sorted(f.beat_index for f in frames)
            assert len({f.beat_index for f in frames}) == 5
        nursery.cancel_scope.cancel()


@fail_on_bare_cancel
async def test_flush_and_close_with_the_server_gone_leave_no_asyncio_task() -> None:
    server = NatsServerProcess(jetstream=True)
    async with trio_asyncio.open_loop() as loop:
        for attempt in range(3):
            await trio.to_thread.run_sync(server.start)
            try:
                before = {t for t in asyncio.all_tasks(loop) if not t.done()}
                async with open_nats_transport(conn("gone", server.url)) as transport:
                    sub = await transport.subscribe("public.gone", buffer=64)
                    stream = f"PUBLIC_GONE_{attempt}"
                    await transport.jetstream.ensure_stream(stream, [f"public.js.{attempt}"])
                    await transport.jetstream.stream_subscribe(f"public.js.{attempt}", stream)
                    transport.publish("public.gone", b"1")
                    await transport.flush()
                    await sub.messages.receive()
                    await trio.to_thread.run_sync(server.kill)
                    for _ in range(20):  # lands in nats-py's reconnect buffer
                        transport.publish("public.gone", b"x" * 100)
                    await trio.sleep(0.02 * attempt)
                    with pytest.raises(bb3.NotConnected), trio.fail_after(6):
                        await transport.flush()
                left = {t for t in asyncio.all_tasks(loop) if not t.done()} - before
                # documented (NatsTransport.aclose): when nats-py's close() fails, its own
                # request-reply subscription's task is all that may wait for the loop's end
                assert all(_request_mux_task(t) for t in left), (attempt, left)
                for task in left:
                    task.cancel()
            finally:
                if server.running:
                    await trio.to_thread.run_sync(server.kill)
