"""A claim that reached the reverb before the beat that ends its window counts in that window,
whichever of the reverb's tasks (the claims, the beat) runs first (issue 19, item 6).

A reverb under load can run its beat before its claims: its claim subscription holds claims for
a window's last beat when the next window's first beat arrives. If it closed the window before
taking those claims in, they would count ``late`` and their agents would be reported
``stalled`` though they claimed on time. On the fake cluster the claims are published in the
same step as the beat that closes their window, and the reverb's claims task is starved: it
gets to its buffer only every ``STARVED`` seconds.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
import trio.testing

from backbeat_trio._core.beats import beat_subject, status_subject
from backbeat_trio._core.hlc import HLC
from backbeat_trio._core.wire import BeatFrame, StatusClaim, decode, encode
from backbeat_trio._services.reverb_claims import CLAIM_BATCH, CLOSE_DRAIN, ClaimReader
from backbeat_trio._transport.base import Message
from backbeat_trio.testing import open_fake_cluster
from backbeat_trio.testing.memory import MemoryBroker, MemoryJetStream, MemoryTransport

AGENTS = ("a", "b", "c")
WINDOWS = 24
#: seconds between the starved claims task's turns (a window is a second at 240 BPM)
STARVED = 0.7


async def starved_batch(reader: ClaimReader) -> list[Message]:
    """``ClaimReader.next_batch`` of a reverb busy elsewhere: what its buffer holds, once in a
    while, never waiting for a claim (so a claim never goes straight to a waiting task)."""
    await trio.sleep(STARVED)
    return reader.ready(CLAIM_BATCH)


def claim(agent: str, beat: int, hlc: str | None = None) -> StatusClaim:
    return StatusClaim(
        agent_id=agent,
        task_id="t",
        beat_index=beat,
        state="executing",
        progress=0.5,
        beats_left=1_000_000,
        hlc=hlc or f"{beat + 1:012x}:0000:0001",
    )


class ClaimsBeforeDownbeats:
    """The pulse's transport: before it publishes a window's first beat, every agent's claim
    for the beat before it is published."""

    def __init__(self, inner: MemoryTransport, cluster: str) -> None:
        self._inner = inner
        self._beats = beat_subject(cluster)
        self._claims = status_subject(cluster)
        self._hlc = {agent: HLC(agent) for agent in AGENTS}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def publish(self, subject: str, payload: bytes, **kwargs: Any) -> None:
        if subject == self._beats:
            index = decode(payload, BeatFrame).beat_index
            if index % 4 == 0 and index > 0:
                for agent in AGENTS:
                    made = claim(agent, index - 1, str(self._hlc[agent].now()))
                    self._inner.publish(self._claims, encode(made))
        self._inner.publish(subject, payload, **kwargs)


async def test_claims_in_before_the_closing_beat_count_in_their_window(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ClaimReader, "next_batch", starved_batch)
    with trio.fail_after(600):
        async with open_fake_cluster("order", tempo_bpm=240, start=False, reverb=True) as cluster:
            connect = cluster.broker.connect
            # the pulse's connection, opened next
            monkeypatch.setattr(
                cluster.broker, "connect", lambda: ClaimsBeforeDownbeats(connect(), "order")
            )
            await cluster.start_pulse()
            for _ in range(WINDOWS):
                await cluster.next_report()
            reports = list(cluster.reports)
            status = cluster.reverb
            assert status is not None
    claimed = [r for r in reports if r.claims]
    assert len(claimed) >= WINDOWS - 2
    assert [(r.from_beat, r.claims, r.late) for r in claimed] == [
        (r.from_beat, len(AGENTS), 0) for r in claimed
    ]
    assert [i for r in reports for i in r.issues] == []
    assert status.claims_late == 0


async def test_claims_taken_before_a_close_never_overtake_one_on_its_way(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The claims task waits on an empty buffer; claims arrive with the closing beat, and the
    first goes straight to that task (a memory channel hands it over past the buffer). Taking
    the rest before it runs would record later sequences first and drop that one as seen."""
    broker = MemoryBroker()
    subject = status_subject("c")
    broker.add_stream("S", [subject])
    transport = broker.connect()
    reader = ClaimReader(transport, subject, "S")
    await reader.subscribe()
    taken: list[int] = []

    async def claims_task() -> None:
        while True:
            taken.extend(decode(m.data, StatusClaim).beat_index for m in await reader.next_batch())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(claims_task)
        await trio.testing.wait_all_tasks_blocked()  # waiting on its empty buffer
        opened = trio.current_time()
        for beat in (1, 2, 3):
            transport.publish(subject, encode(claim("a", beat)))
        # the beat closes the window before the claims task has run
        assert reader.ready(CLOSE_DRAIN) == []
        assert reader.blind_during(opened, trio.current_time())  # it is behind
        await trio.testing.wait_all_tasks_blocked()
        assert taken == [1, 2, 3]
        assert not reader.blind_during(opened, trio.current_time())
        nursery.cancel_scope.cancel()
    # with no task waiting, what the buffer holds is taken, in order
    for beat in (4, 5):
        transport.publish(subject, encode(claim("a", beat)))
    assert [decode(m.data, StatusClaim).beat_index for m in reader.ready(CLOSE_DRAIN)] == [4, 5]
    assert reader.last_seq == 5


async def test_claims_taken_by_both_tasks_are_each_taken_once_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The claims task and the closing of windows (``ready``) take from one buffer, interleaved
    at random: every claim is taken once, in order, none dropped as seen."""
    rng = random.Random(19)
    broker = MemoryBroker()
    subject = status_subject("c")
    broker.add_stream("S", [subject])
    transport = broker.connect()
    reader = ClaimReader(transport, subject, "S")
    await reader.subscribe()
    taken: list[int] = []

    def beats(msgs: list[Message]) -> list[int]:
        return [decode(m.data, StatusClaim).beat_index for m in msgs]

    async def claims_task() -> None:
        while True:
            taken.extend(beats(await reader.next_batch()))

    async def closer() -> None:
        while True:
            await trio.sleep(rng.choice((0.0, 0.001)))
            taken.extend(beats(reader.ready(CLOSE_DRAIN)))

    published = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(claims_task)
        nursery.start_soon(closer)
        for _ in range(500):
            for _ in range(rng.randint(1, 3 * CLAIM_BATCH)):
                transport.publish(subject, encode(claim("a", published)))
                published += 1
            await trio.sleep(rng.choice((0.0, 0.001, 0.002)))
        await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert taken == list(range(published))


async def test_a_close_that_leaves_claims_in_the_buffer_is_blind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Closing a window takes at most ``CLOSE_DRAIN`` claims from the buffer first; claims it
    left there may be the window's own, so the window is one the reverb is behind on (in the
    soak, a window closed with 112 claims left, 50 of them its own: all agents ``stalled``)."""
    broker = MemoryBroker()
    subject = status_subject("c")
    broker.add_stream("S", [subject])
    transport = broker.connect()
    reader = ClaimReader(transport, subject, "S")
    await reader.subscribe()
    await trio.sleep(1)
    assert reader.ready(CLOSE_DRAIN) == []  # found empty: drained now
    opened = trio.current_time()
    for beat in range(CLOSE_DRAIN + 10):
        transport.publish(subject, encode(claim("a", beat)))
    assert len(reader.ready(CLOSE_DRAIN)) == CLOSE_DRAIN
    assert reader.blind_during(opened, trio.current_time())
    assert len(reader.ready(CLOSE_DRAIN)) == 10  # the rest: drained again
    assert not reader.blind_during(opened, trio.current_time())


class BusyReverbConnection(MemoryTransport):
    """The reverb's connection in a process busy for a while: what arrives meanwhile waits, and
    when the process runs again the beat frames reach trio first and the claims a moment later
    (nats-py hands a core frame over as it parses it, a JetStream claim through a task of its
    own); its round trips (the judge's check for a silent pulse) wait too."""

    def __init__(self, broker: MemoryBroker) -> None:
        super().__init__(broker)
        broker._transports.append(self)  # as broker.connect() does
        self.busy = False
        self._idle = trio.Event()
        self._idle.set()
        self._beats: list[tuple[Any, Message]] = []
        self._claims: list[tuple[Any, Message]] = []

    def hold(self) -> None:
        self.busy = True
        self._idle = trio.Event()

    async def release(self) -> None:
        self.busy = False
        for hop, msg in self._beats:
            hop(msg)
        self._idle.set()
        await trio.sleep(0.001)  # the reverb takes its beats in first
        for deliver, msg in self._claims:
            deliver(msg)
        self._beats, self._claims = [], []

    async def flush(self) -> None:
        await self._idle.wait()
        await super().flush()

    async def _subscribe_handing_to(self, subject: str, handler: Any) -> Any:
        sub = await super()._subscribe_handing_to(subject, handler)
        hop = sub._handler

        def held(msg: Message) -> None:
            if self.busy:
                self._beats.append((hop, msg))
            else:
                hop(msg)

        sub._handler = held
        return sub

    @property
    def jetstream(self) -> Any:
        return BusyJetStream(self)


class BusyJetStream(MemoryJetStream):
    async def stream_subscribe(self, *args: Any, **kwargs: Any) -> Any:
        sub = await super().stream_subscribe(*args, **kwargs)
        conn = self._transport
        assert isinstance(conn, BusyReverbConnection)
        deliver = sub._deliver

        def held(msg: Message) -> None:
            if conn.busy:
                conn._claims.append((deliver, msg))
            else:
                deliver(msg)

        sub._deliver = held  # type: ignore[method-assign]
        return sub


class ClaimsAfterEveryBeat:
    """The pulse's transport: after each frame, every agent's claim for that beat; the
    reverb's process is busy from the first beat of window ``BUSY`` to the first of the next."""

    def __init__(self, inner: MemoryTransport, cluster: str, reverb: BusyReverbConnection) -> None:
        self._inner = inner
        self._beats = beat_subject(cluster)
        self._claims = status_subject(cluster)
        self._hlc = {agent: HLC(agent) for agent in AGENTS}
        self._reverb = reverb
        self.burst_over = trio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def publish(self, subject: str, payload: bytes, **kwargs: Any) -> None:
        if subject != self._beats:
            self._inner.publish(subject, payload, **kwargs)
            return
        index = decode(payload, BeatFrame).beat_index
        if index == BUSY:
            self._reverb.hold()
        self._inner.publish(subject, payload, **kwargs)
        for agent in AGENTS:
            made = claim(agent, index, str(self._hlc[agent].now()))
            self._inner.publish(self._claims, encode(made))
        if index == BUSY + 4:
            self.burst_over.set()


#: the window whose beats and claims reach the busy reverb together
BUSY = 16


async def test_a_window_whose_beats_came_in_a_burst_reports_no_agent_stalled(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The soak's false ``stalled``: the reverb's process did not run for longer than a window;
    then the window's beats (and the next window's first) reached it in a burst, before the
    claims the agents had sent on time, so it closed the window a moment after opening it with
    none of them in. A window open for less than half its length is one the reverb is behind on:
    no agent is ``stalled`` in it; its claims come ``late``."""
    with trio.fail_after(600):
        async with open_fake_cluster("busy", tempo_bpm=240, start=False) as cluster:
            connect = cluster.broker.connect
            reverb_conn = BusyReverbConnection(cluster.broker)
            monkeypatch.setattr(cluster.broker, "connect", lambda: reverb_conn)
            # late frames are still taken (not stale), and no beat is made up meanwhile
            status = await cluster.start_reverb(jitter_tolerance=1.0, lease_ttl=5.0)
            pulse_conn: list[ClaimsAfterEveryBeat] = []

            def pulse_connect() -> ClaimsAfterEveryBeat:
                pulse_conn.append(ClaimsAfterEveryBeat(connect(), "busy", reverb_conn))
                return pulse_conn[0]

            monkeypatch.setattr(cluster.broker, "connect", pulse_connect)
            await cluster.start_pulse()
            await pulse_conn[0].burst_over.wait()
            await reverb_conn.release()
            while not cluster.reports or cluster.reports[-1].from_beat < BUSY + 12:
                await cluster.next_report()
            reports = list(cluster.reports)
    busy = next(r for r in reports if r.from_beat == BUSY)
    assert busy.claims == 0  # closed before its claims reached the reverb
    assert [(r.from_beat, i.kind, i.agent_id) for r in reports for i in r.issues] == []
    assert sum(r.late for r in reports) == 4 * len(AGENTS)
    assert status.claims_late == 4 * len(AGENTS)
    assert all(r.claims == 4 * len(AGENTS) for r in reports if 4 <= r.from_beat != BUSY)
