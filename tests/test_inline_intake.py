"""Per beat, a client runs only its consumers: no task of its own wakes for it.

The connection's judge (``_client/judge.py``) is the ``prepare`` step of the shared subscription
to the beat subject: over NATS nats-py's parser calls it as the frame is parsed, instead of a
task reading a channel. The in-memory bus runs it one scheduler hop after the publish (it models
a network: a publisher never runs a subscriber's code). Everywhere, the judge's metronome sleeps
in a cancel scope whose deadline each frame moves, so it wakes only when the pulse is late.
These tests pin where the judgement runs, that the metronome stays asleep while the pulse is
healthy and still takes over when it goes silent, and that a bug in handing a client its beat
still ends that client with that bug (instead of vanishing into nats-py's read loop).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio_asyncio

import backbeat_trio as bb3
from backbeat_trio import testing as bbt
from backbeat_trio._bridge.nats import open_nats_transport
from backbeat_trio._client.client import Client
from backbeat_trio._client.judge import BeatJudge
from backbeat_trio._transport.base import Message, Subscription
from backbeat_trio.testing.memory import MemoryTransport

FAST = 600


def record_intake_tasks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Patch ``BeatJudge.__call__`` to note the name of the task each frame is judged on."""
    names: list[str] = []
    real = BeatJudge.__call__

    def spy(self: BeatJudge, data: bytes) -> None:
        names.append(trio.lowlevel.current_task().name)
        real(self, data)

    monkeypatch.setattr(BeatJudge, "__call__", spy)
    return names


class StepCounter(trio.abc.Instrument):
    """Counts the steps of the client's own tasks, by task-name fragment."""

    def __init__(self, *fragments: str) -> None:
        self.steps = dict.fromkeys(fragments, 0)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        for fragment in self.steps:
            if fragment in task.name:
                self.steps[fragment] += 1


def fail_intake_on(monkeypatch: pytest.MonkeyPatch, nth: int) -> None:
    """Patch ``Client._judged_beat`` to raise on the ``nth`` beat (a stand-in for a bug)."""
    real = Client._judged_beat
    seen = 0

    def broken(self: Client, frame: bb3.BeatFrame) -> None:
        nonlocal seen
        seen += 1
        if seen == nth:
            raise RuntimeError(f"intake bug at frame {nth}")
        real(self, frame)

    monkeypatch.setattr(Client, "_judged_beat", broken)


# --- in memory (MockClock) ---------------------------------------------------------------------
async def test_in_memory_the_publisher_never_runs_the_clients_intake(
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
    # one scheduler hop after the publish, in no task of the pulse's
    assert not any("pulse" in name for name in names), names


async def test_a_healthy_pulse_never_wakes_the_sampler(
    autojump_clock: trio.testing.MockClock,
) -> None:
    counter = StepCounter("metronome:")
    async with bbt.open_fake_cluster(tempo_bpm=FAST) as cluster, cluster.open_client() as bb:
        beats = bb.beats()
        for _ in range(2):  # the first frame wakes the sampler once, to start its schedule
            await beats.receive()
        trio.lowlevel.add_instrument(counter)
        try:
            for _ in range(50):
                await beats.receive()
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert not bb.degraded
        # then the pulse goes silent: the sampler wakes at one beat + jitter and keeps time
        cluster.stop_pulse()
        last = bb.current_beat
        assert last is not None
        t0 = trio.current_time()
        frame = await beats.receive()
        waited = trio.current_time() - t0
    assert counter.steps == {"metronome:": 0}, counter.steps
    assert frame.beat_index == last + 1
    assert bb.metrics.degraded_beats >= 1
    beat = 60 / FAST
    assert beat < waited <= beat + bb.config.jitter_tolerance + 1e-9


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
    assert all("metronome" not in name for name in names), names
    assert len(set(names)) == 1, names  # nats-py's reader, every time


@pytest.mark.nats
async def test_over_nats_a_beat_wakes_no_client_task(nats_url: str) -> None:
    counter = StepCounter("metronome:")
    cluster = "inline-steps"
    async with trio_asyncio.open_loop(), trio.open_nursery() as n:
        await n.start(bb3.run_pulse, pulse_config(nats_url, cluster))
        cfg = bb3.Config(cluster_id=cluster, agent_id="agent-1", nats_url=nats_url)
        async with bb3.open_client(cfg) as bb:
            beats = bb.beats()
            with trio.fail_after(10):
                for _ in range(2):  # the first frame wakes the sampler once, to start its schedule
                    await beats.receive()
                trio.lowlevel.add_instrument(counter)
                try:
                    got = [(await beats.receive()).beat_index for _ in range(10)]
                finally:
                    trio.lowlevel.remove_instrument(counter)
            assert bb.metrics.degraded_beats == 0
        n.cancel_scope.cancel()
    assert got == list(range(got[0], got[0] + 10))
    # 0 each when every frame comes in well within its beat + jitter; a machine stalling for
    # ~50 ms may wake the sampler once or twice (a task per beat would be >= 10)
    assert counter.steps["metronome:"] <= 3, counter.steps


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


async def test_a_burst_on_a_queueing_transport_is_all_taken_in(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # the memory bus queues frames for the subscriber task: a burst published before that task
    # runs must fit its queue (4 096), not be cut to what an inline handler would need
    async with (
        bbt.open_fake_cluster(tempo_bpm=FAST, start=False) as cluster,
        cluster.open_client() as bb,
    ):
        for _ in range(100):
            cluster.publish_raw(b"{not a frame")
        await trio.testing.wait_all_tasks_blocked()
        assert (bb.metrics.malformed, bb.metrics.transport_dropped) == (100, 0)


class OldTransport(MemoryTransport):
    """A transport written before ``handler`` existed (its ``subscribe`` has no such keyword)."""

    async def subscribe(self, subject: str, *, buffer: int = 1024) -> Subscription:  # type: ignore[override]
        return await super().subscribe(subject, buffer=buffer)


async def test_a_transport_without_the_handler_keyword_still_works(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bbt.open_fake_cluster(tempo_bpm=FAST) as cluster:
        transport = OldTransport(cluster.broker)
        cluster.broker._transports.append(transport)
        # (its type no longer matches the Transport protocol; at run time it still works)
        old: Any = transport
        async with bb3.open_client(
            cluster.config(), transport=old, wall_clock=bbt.virtual_wall_clock
        ) as bb:
            frames = [(await bb.wait_for_beat()).beat_index for _ in range(4)]
    assert frames == list(range(frames[0], frames[0] + 4))
