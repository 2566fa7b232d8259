"""A reverb under a nats-server SIGKILL and restart sees again at once (issue 19, item 6).

Over a real nats-server: a pulse at 600 BPM, a reverb with a keyring, signed agents on one
shared connection each claiming every beat. The server is SIGKILLed and restarted; the reverb
must count claims again within a second of the server accepting connections (its stream reader
is re-created on the reconnect, not after nats-py's missed heartbeats), report no agent
``stalled`` for the outage (their claims waited in their outboxes, and arrive ``late``), and
count every claim exactly once. One agent reconnects only every ``SLOW_RECONNECT`` seconds,
longer than the reverb's ``OUTAGE_GRACE``: its outbox claims arrive well after the reverb is
back, then its new ones, and it is not ``stalled`` either (it is one the reverb has not heard
from since the outage). CI runs it bounded; ``--soak`` runs more agents, a faster pulse and
more restarts.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio

import backbeat_trio as bb3
from backbeat_trio._bridge.nats import open_nats_transport
from backbeat_trio._core.aggregate import BarAggregator
from backbeat_trio._core.beats import status_subject
from backbeat_trio._core.wire import StatusClaim, decode, encode
from backbeat_trio._embedded import NatsServerProcess
from backbeat_trio._services.reverb_claims import (
    CATCH_UP_GRACE,
    CLAIM_BATCH,
    OUTAGE_GRACE,
    AcceptedClaim,
    ClaimReader,
)
from backbeat_trio._transport.base import Message
from backbeat_trio._util.channel import DropOldestChannel
from backbeat_trio.testing.memory import MemoryBroker

#: the reverb must count claims again within this many seconds of the server being back
RESUME_BOUND = 1.0
#: the slow agent's reconnect delay: past OUTAGE_GRACE after the reverb reads again
SLOW_RECONNECT = 2 * OUTAGE_GRACE

Watch = DropOldestChannel[AcceptedClaim]


# --- sans-IO: a window the reverb could not read ------------------------------------------------
def executing(agent: str, beat: int) -> StatusClaim:
    return StatusClaim(
        agent_id=agent,
        task_id="t",
        beat_index=beat,
        state="executing",
        progress=0.5,
        beats_left=1000,
        hlc=f"{beat + 1:012x}:0000:0001",
    )


def test_blind_windows_stall_no_one_and_their_claims_count_late() -> None:
    agg = BarAggregator("c", beats_per_bar=4, forget_after_windows=2)
    agg.add_claim(executing("a", 0))
    agg.add_claim(executing("b", 0))
    assert agg.close_window(0, "h").issues == []
    # the reverb could not read windows 4..15 (more than forget_after_windows of them)
    for start in (4, 8, 12):
        assert agg.close_window(start, "h", blind=True).issues == []
    assert agg.tracked_agents == ["a", "b"]  # not aged, not forgotten
    # what waited in b's outbox arrives late; a is not heard from again
    assert [agg.add_claim(executing("b", beat)) for beat in (5, 9)] == ["late", "late"]
    agg.add_claim(executing("b", 16))
    report = agg.close_window(16, "h")
    assert report.late == 2
    assert [(i.agent_id, i.kind) for i in report.issues] == [("a", "stalled")]
    assert "no claim for 1 window(s)" in report.issues[0].detail


def test_an_agent_unheard_since_a_blind_window_is_not_stalled_while_catching_up() -> None:
    agg = BarAggregator("c", beats_per_bar=4, forget_after_windows=2)
    for agent in ("a", "b", "c"):
        agg.add_claim(executing(agent, 0))
    agg.close_window(0, "h")
    agg.add_claim(executing("a", 4))
    assert agg.close_window(4, "h", blind=True).issues == []
    # a and b are current again; c still reconnects (or re-sends its outbox): not stalled
    for start in (8, 12, 16):
        agg.add_claim(executing("a", start))
        agg.add_claim(executing("b", start))
        assert agg.close_window(start, "h", catching_up=True).issues == []
    # b, heard from since the outage, falls silent: a real stall, even while catching up
    agg.add_claim(executing("a", 20))
    report = agg.close_window(20, "h", catching_up=True)
    assert [(i.agent_id, i.kind) for i in report.issues] == [("b", "stalled")]
    # c's outbox claims arrive late, then it is current: not stalled, not aged
    assert agg.add_claim(executing("c", 9)) == "late"
    agg.add_claim(executing("c", 24))
    agg.add_claim(executing("a", 24))
    report = agg.close_window(24, "h", catching_up=True)
    assert [(i.agent_id, i.kind) for i in report.issues] == [("b", "stalled")]
    # caught up: silence is judged again as usual (c's first silent window)
    agg.add_claim(executing("a", 28))
    report = agg.close_window(28, "h")
    assert [(i.agent_id, i.kind) for i in report.issues] == [("c", "stalled")]
    assert "no claim for 1 window(s)" in report.issues[0].detail
    assert agg.tracked_agents == ["a", "c"]  # b forgotten after two silent windows


def test_an_agent_unheard_after_catching_up_is_stalled() -> None:
    agg = BarAggregator("c", beats_per_bar=4, forget_after_windows=8)
    agg.add_claim(executing("a", 0))
    agg.close_window(0, "h")
    agg.close_window(4, "h", blind=True)
    assert agg.close_window(8, "h", catching_up=True).issues == []
    report = agg.close_window(12, "h")
    assert [(i.agent_id, i.kind) for i in report.issues] == [("a", "stalled")]
    # a later blind window starts over: unheard again
    agg.close_window(16, "h", blind=True)
    assert agg.close_window(20, "h", catching_up=True).issues == []


# --- in memory: the reader re-subscribes from where it was --------------------------------------
def decode_beat(msg: Message) -> int:
    return decode(msg.data, StatusClaim).beat_index


async def read_all(reader: ClaimReader) -> list[int]:
    """The beats of every claim the reader hands out until it has none for a while."""
    beats: list[int] = []
    with trio.move_on_after(0.1):
        while True:
            beats += [decode_beat(msg) for msg in await reader.next_batch()]
    return beats


async def test_reader_resumes_from_the_last_sequence_it_took(autojump_clock: object) -> None:
    broker = MemoryBroker()
    subject = status_subject("c")
    broker.add_stream("S", [subject])
    transport = broker.connect()
    transport.publish(subject, encode(executing("old", 0)))  # before the reverb: never read
    reader = ClaimReader(transport, subject, "S")
    first = await reader.subscribe()
    for beat in (1, 2):
        transport.publish(subject, encode(executing("a", beat)))
    assert await read_all(reader) == [1, 2]
    assert reader.last_seq == 3
    transport.publish(subject, encode(executing("a", 3)))  # not read before the outage
    broker.set_down()
    reader.went_down(trio.current_time())
    assert reader.blind_during(0.0, trio.current_time())
    await trio.sleep(1.0)
    broker.set_up()
    transport.publish(subject, encode(executing("a", 4)))
    await reader.resume()
    assert reader.sub is not first
    assert reader.resubscribed == 1
    # the old subscription's channel ends with what it held; the new one repeats it: once each
    assert await read_all(reader) == [3, 4]
    assert reader.last_seq == 5
    back = reader.resumed_at
    assert back is not None
    # blind from the outage until it caught up, and for OUTAGE_GRACE after
    assert reader.blind_during(back + OUTAGE_GRACE - 0.1, back + OUTAGE_GRACE)
    # catching up for CATCH_UP_GRACE after
    assert reader.catching_up(back + CATCH_UP_GRACE - 0.1, back + CATCH_UP_GRACE)
    assert not reader.catching_up(back + CATCH_UP_GRACE + 0.1, back + CATCH_UP_GRACE + 1)
    await trio.sleep(OUTAGE_GRACE)
    opened = trio.current_time()
    assert await read_all(reader) == []
    assert not reader.blind_during(opened, trio.current_time())


async def test_a_reader_behind_for_a_whole_window_is_blind(autojump_clock: object) -> None:
    broker = MemoryBroker()
    subject = status_subject("c")
    broker.add_stream("S", [subject])
    transport = broker.connect()
    reader = ClaimReader(transport, subject, "S")
    await reader.subscribe()
    assert await read_all(reader) == []  # its buffer found empty
    opened = trio.current_time()
    for beat in range(CLAIM_BATCH + 8):  # a burst: more than one batch
        transport.publish(subject, encode(executing("a", beat)))
    assert len(await reader.next_batch()) == CLAIM_BATCH
    await trio.sleep(1.0)
    assert not reader.blind_during(opened, trio.current_time())  # it emptied it in the window
    opened = trio.current_time()
    assert len(await reader.next_batch()) == 8
    assert reader.blind_during(opened, trio.current_time())  # not empty once since opened
    assert await read_all(reader) == []
    assert not reader.blind_during(opened, trio.current_time())


# --- over nats-server -----------------------------------------------------------------------------
@dataclass
class Agents:
    """Signed agents on one connection, each claiming every beat it sees."""

    clients: list[bb3.Client] = field(default_factory=list)
    emitted: int = 0
    stop: trio.Event = field(default_factory=trio.Event)
    silent: set[str] = field(default_factory=set)

    async def claim_every_beat(
        self, bb: bb3.Client, beats: DropOldestChannel[bb3.BeatFrame]
    ) -> None:
        async for _frame in beats:
            if self.stop.is_set():
                return
            if bb.config.agent_id in self.silent:
                continue
            claim = bb3.StatusClaim(
                task_id="work", state="executing", beats_left=1_000_000, progress=0.5
            )
            await bb.emit_status(claim)
            self.emitted += 1


@contextlib.asynccontextmanager
async def open_agents(
    url: str, cluster: str, keys: dict[str, bb3.SigningKey], slow: str
) -> AsyncIterator[Agents]:
    agents = Agents()
    conn_cfg = bb3.Config(
        cluster_id=cluster, agent_id="agents-conn", nats_url=url, reconnect_delay=0.1
    )
    async with (
        open_nats_transport(conn_cfg) as conn,
        trio.open_nursery() as nursery,
        contextlib.AsyncExitStack() as stack,
    ):
        # the slow agent reconnects on its own connection, at its own slow pace
        slow_conn = await stack.enter_async_context(
            open_nats_transport(
                bb3.Config(
                    cluster_id=cluster,
                    agent_id=slow,
                    nats_url=url,
                    reconnect_delay=SLOW_RECONNECT,
                )
            )
        )
        for agent_id, key in keys.items():
            cfg = bb3.Config(
                cluster_id=cluster,
                agent_id=agent_id,
                nats_url=url,
                signing_key=key,
                jetstream=True,
                jitter_tolerance=0.1,
            )
            transport = slow_conn if agent_id == slow else conn
            bb = await stack.enter_async_context(bb3.open_client(cfg, transport=transport))
            agents.clients.append(bb)
            nursery.start_soon(agents.claim_every_beat, bb, bb.beats(buffer=64))
        yield agents
        agents.stop.set()
        with trio.fail_after(30):
            for bb in agents.clients:
                await bb.flush_claims()
        nursery.cancel_scope.cancel()


async def counting_again(status: bb3.ReverbStatus, watch: Watch, since: float) -> float:
    """Seconds from ``since`` until the reverb counts a claim in a window (not ``late``) after
    the ones counted now."""
    baseline = status.claims_counted
    while status.claims_counted <= baseline:
        await watch.receive()
    return trio.current_time() - since


async def note_stalled(
    status: bb3.ReverbStatus, kills: list[float], noted: list[tuple[float, int, list[str]]]
) -> None:
    """Note every report listing an agent ``stalled``: seconds since the latest kill, the
    window, the agents (where a restart's false ones come from)."""
    seen = status.reports
    while True:
        await status.wait_for_report()
        new = min(status.reports - seen, len(status.history))
        seen = status.reports
        for report in list(status.history)[len(status.history) - new :]:
            agents = sorted(i.agent_id for i in report.issues if i.kind == "stalled")
            if agents:
                since = trio.current_time() - max(kills, default=0.0)
                noted.append((round(since, 2), report.from_beat, agents))


async def accepted(status: bb3.ReverbStatus, watch: Watch, emitted: int) -> None:
    """Wait until the reverb has counted (or counted late) ``emitted`` claims."""
    while status.claims_counted + status.claims_late < emitted:
        await watch.receive()


@pytest.mark.chaos
@pytest.mark.nats
async def test_reverb_counts_again_within_a_second_of_a_restart(
    nats_server: NatsServerProcess, nats_url: str, soak: bool
) -> None:
    cluster = "reverb-restart-soak" if soak else "reverb-restart"
    n_agents, tempo, restarts, between = (50, 1200, 10, 60.0) if soak else (5, 600, 2, 9.0)
    keys = {f"agent-{i}": bb3.generate_signing_key() for i in range(n_agents)}
    slow = "agent-0"
    keyring = bb3.Keyring({agent: key.verify_key for agent, key in keys.items()})
    pulse_cfg = bb3.PulseConfig(
        cluster_id=cluster, nats_url=nats_url, tempo_bpm=tempo, reconnect_delay=0.1
    )
    reverb_cfg = bb3.ReverbConfig(
        cluster_id=cluster, nats_url=nats_url, keyring=keyring, reconnect_delay=0.1
    )
    blind: list[float] = []
    ready: list[float] = []
    kills: list[float] = []
    noted: list[tuple[float, int, list[str]]] = []
    with trio.fail_after(120 + restarts * (between + 10)):
        async with trio.open_nursery() as nursery:
            pulse: bb3.PulseStatus = await nursery.start(bb3.run_pulse, pulse_cfg)
            status: bb3.ReverbStatus = await nursery.start(bb3.run_reverb, reverb_cfg)
            watch = status.watch_claims(buffer=1_000_000)
            nursery.start_soon(note_stalled, status, kills, noted)
            with trio.fail_after(10):
                await status.first_beat.wait()
            async with open_agents(nats_url, cluster, keys, slow) as agents:
                with trio.fail_after(10):
                    while len(status.latest_claims) < n_agents:
                        await status.wait_for_report()
                for _ in range(restarts):
                    await trio.sleep(between / 2)
                    nats_server.kill()
                    kills.append(trio.current_time())
                    await trio.sleep(0.5)  # down for several beats
                    # from its launch: an upper bound on the time since it accepted connections
                    launched = trio.current_time()
                    await trio.to_thread.run_sync(nats_server.start)
                    ready.append(trio.current_time() - launched)
                    with trio.fail_after(10):
                        blind.append(await counting_again(status, watch, launched))
                    await trio.sleep(between / 2)
                # every agent reported since the last restart, before any of them stops
                with trio.fail_after(10):
                    for _ in range(3):
                        await status.wait_for_report()
                stalled = status.issues_by_kind.get("stalled", 0)
                reports = status.reports
                assert status._frame_counts is not None
                # the reverb lost the beat once per outage, never while it caught up
                degraded = status._frame_counts().degraded_episodes
                # a real stall is still reported: an agent that stops claiming, connected
                agents.silent.add("agent-1")
                with trio.fail_after(10):
                    while not any(
                        (i.agent_id, i.kind) == ("agent-1", "stalled")
                        for i in (await status.wait_for_report()).issues
                    ):
                        pass
            emitted = agents.emitted  # every one of them acknowledged by the stream
            with trio.fail_after(30):
                await accepted(status, watch, emitted)
            await trio.sleep(0.5)  # anything counted twice would show by now
            nursery.cancel_scope.cancel()
    print(
        f"server launched -> ready: {[round(s, 3) for s in ready]} s, -> reverb counting again: "
        f"{[round(s, 3) for s in blind]} s; reports {reports}; stalled (s after kill, window, "
        f"agents): {noted}"
    )
    assert max(blind) < RESUME_BOUND, blind
    assert stalled == 0, status.history
    # once per outage, and for beats the pulse itself skipped (a process it shares, loaded)
    assert degraded <= restarts + pulse.skipped_late
    assert status.claims_counted + status.claims_late == emitted
    assert status.rejected == 0, status.rejected_by_reason
    assert status.claims_dropped == 0
    assert status.claims_late > 0  # the outbox claims of the outages arrived, late
