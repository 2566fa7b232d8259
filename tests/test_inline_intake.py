"""Beat frames are taken in by the transport as they arrive, not by a task reading a channel.

The client subscribes to the beat subject with a synchronous handler (``Subscription`` with
``handler=``): over NATS it runs inside nats-py's parser, in memory inside the publisher's call.
That saves one task wake-up per beat. These tests pin where the intake runs, that a bug in it
still ends the client with that bug (instead of vanishing into nats-py's read loop), and that a
transport which ignores ``handler`` still gets its frames delivered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio_asyncio

import backbeat_trio as bb3
from backbeat_trio import testing as bbt
from backbeat_trio._client import Client
from backbeat_trio._transport import MemoryTransport, Message, Subscription, open_nats_transport

FAST = 600


def record_intake_tasks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Patch ``Client._intake`` to note the name of the task each frame is taken in on."""
    names: list[str] = []
    real = Client._intake

    def spy(self: Client, data: bytes, now: float) -> None:
        names.append(trio.lowlevel.current_task().name)
        real(self, data, now)

    monkeypatch.setattr(Client, "_intake", spy)
    return names


def fail_intake_on(monkeypatch: pytest.MonkeyPatch, nth: int) -> None:
    """Patch ``Client._intake`` to raise on the ``nth`` frame (a stand-in for a bug in it)."""
    real = Client._intake
    seen = 0

    def broken(self: Client, data: bytes, now: float) -> None:
        nonlocal seen
        seen += 1
        if seen == nth:
            raise RuntimeError(f"intake bug at frame {nth}")
        real(self, data, now)

    monkeypatch.setattr(Client, "_intake", broken)


# --- in memory (MockClock) ---------------------------------------------------------------------
async def test_frames_are_taken_in_by_the_publish_not_the_subscriber_task(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = record_intake_tasks(monkeypatch)
    async with bbt.open_fake_cluster(tempo_bpm=FAST) as cluster, cluster.open_client() as bb:
        frames = []
        async for frame in bb.beats():
            frames.append(frame.beat_index)
            if len(frames) == 5:
                break
    assert frames == list(range(frames[0], frames[0] + 5))
    assert len(names) >= 5
    # the pulse's publish call hands the frame over; the client's subscriber task never does
    assert not any("_run_subscriber" in name for name in names), names
    assert any("pulse" in name for name in names), names


async def test_a_bug_in_the_intake_ends_the_client_with_that_error(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_intake_on(monkeypatch, 3)
    async with bbt.open_fake_cluster(tempo_bpm=FAST) as cluster:
        got: list[int] = []

        async def consume() -> None:
            async with cluster.open_client() as bb:
                async for frame in bb.beats():
                    got.append(frame.beat_index)

        with pytest.raises(RuntimeError, match="intake bug at frame 3"):
            await consume()
        assert len(got) == 2
        # the pulse that delivered the frame is unharmed
        assert cluster.pulse is not None
        before = cluster.pulse.published
        await trio.sleep(1.0)
        assert cluster.pulse.published > before


class QueueingTransport(MemoryTransport):
    """A transport written before ``handler`` existed: every message goes to the channel."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.handlers_ignored = 0

    async def subscribe(
        self,
        subject: str,
        *,
        buffer: int = 1024,
        handler: Callable[[Message], None] | None = None,
    ) -> Subscription:
        self.handlers_ignored += handler is not None
        return await super().subscribe(subject, buffer=buffer)


async def test_a_transport_that_ignores_the_handler_still_delivers_beats(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bbt.open_fake_cluster(tempo_bpm=FAST) as cluster:
        transport = QueueingTransport(cluster.broker)
        cluster.broker._transports.append(transport)
        async with bb3.open_client(
            cluster.config(), transport=transport, wall_clock=bbt.virtual_wall_clock
        ) as bb:
            frames = []
            async for frame in bb.beats():
                frames.append(frame.beat_index)
                if len(frames) == 4:
                    break
            assert bb.metrics.beats >= 4
        assert transport.handlers_ignored == 1
    assert frames == list(range(frames[0], frames[0] + 4))


# --- over a real nats-server ---------------------------------------------------------------------
def pulse_config(url: str, cluster: str) -> bb3.PulseConfig:
    return bb3.PulseConfig(cluster_id=cluster, tempo_bpm=FAST, nats_url=url, pulse_id="pulse-1")


@pytest.mark.nats
async def test_over_nats_frames_are_taken_in_inside_the_asyncio_reader(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = record_intake_tasks(monkeypatch)
    cluster = "inline"
    async with trio_asyncio.open_loop(), trio.open_nursery() as n:
        await n.start(bb3.run_pulse, pulse_config(nats_url, cluster))
        cfg = bb3.Config(cluster_id=cluster, agent_id="agent-1", nats_url=nats_url)
        async with bb3.open_client(cfg) as bb:
            frames = []
            with trio.fail_after(10):
                async for frame in bb.beats():
                    frames.append(frame.beat_index)
                    if len(frames) == 4:
                        break
        n.cancel_scope.cancel()
    assert frames == list(range(frames[0], frames[0] + 4))
    assert len(names) >= 4
    assert not any("_run_subscriber" in name for name in names), names


@pytest.mark.nats
async def test_over_nats_a_bug_in_the_intake_ends_the_client_with_that_error(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_intake_on(monkeypatch, 2)
    cluster = "inline-bug"
    async with trio_asyncio.open_loop(), trio.open_nursery() as n:
        await n.start(bb3.run_pulse, pulse_config(nats_url, cluster))
        cfg = bb3.Config(cluster_id=cluster, agent_id="agent-1", nats_url=nats_url)
        with trio.fail_after(10), pytest.raises(RuntimeError, match="intake bug at frame 2"):
            async with bb3.open_client(cfg) as bb:
                await trio.sleep_forever()
        assert bb.metrics.beats == 1
        n.cancel_scope.cancel()


@pytest.mark.nats
async def test_subscription_handler_over_nats(nats_url: str) -> None:
    # the handler runs as each message is parsed; a raising handler ends the subscription
    # (its channel closes, ``failure`` holds the error) and the connection is unharmed
    cfg = bb3.Config(cluster_id="inline", agent_id="rx", nats_url=nats_url)
    seen: list[bytes] = []

    def handler(msg: Message) -> None:
        if msg.data == b"boom":
            raise ValueError("handler failed")
        seen.append(bytes(msg.data))

    async with open_nats_transport(cfg) as rx:
        sub = await rx.subscribe("inline.sub", buffer=1, handler=handler)
        assert "inline" in repr(sub)
        control = await rx.subscribe("inline.control", buffer=16)
        await rx.flush()
        for i in range(50):  # far more than the channel's buffer of 1: nothing is dropped
            rx.publish("inline.sub", str(i).encode())
        rx.publish("inline.sub", b"boom")
        rx.publish("inline.sub", b"after")
        rx.publish("inline.control", b"still here")
        await rx.flush()
        with trio.fail_after(10):
            assert (await control.messages.receive()).data == b"still here"
            with pytest.raises(trio.EndOfChannel):
                await sub.messages.receive()
        assert rx.connected
    assert seen == [str(i).encode() for i in range(50)]
    assert (sub.delivered, sub.dropped) == (50, 0)
    assert isinstance(sub.failure, ValueError)
