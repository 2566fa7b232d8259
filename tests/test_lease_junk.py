"""A lease revision that is no lease record is nobody's claim.

Anyone who may publish on a subject a JetStream stream captures names the reply subject of the
PubAck; naming a lease key's subject (``$KV.BACKBEAT_HA_<cluster>.pulse-lease``) makes the server
store the PubAck as the key's newest revision (docs/security.md). Such a revision -- or any other
value that is no lease record, or a delete marker -- must not cost the leader its lease, must not
look like a vacancy to a follower, and must not make a successor start the beat index again.

Sans-IO properties of :class:`LeaseElection`, then HA pulses and HA reverbs on MockClock with
junk written straight into the memory KV, then two HA pulses over a real nats-server while an
admin connection puts junk on the key.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import nats
import pytest
import trio
import trio.testing
import trio_asyncio
from _ha_harness import Fleet, collect, open_fleet, wait_until
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from backbeat_trio._bridge.nats import open_nats_transport
from backbeat_trio._client.config import Config
from backbeat_trio._core.beats import beat_subject
from backbeat_trio._core.hlc import HLCStamp, node_id_for
from backbeat_trio._core.lease import (
    LeaseElection,
    LeaseRecord,
    LeaseTimings,
    ScheduleSnapshot,
    decode_lease,
    lease_bucket_name,
)
from backbeat_trio._core.wire import BeatFrame, decode
from backbeat_trio._services.ha_pulse import HAPulseConfig, HAPulseStatus, run_ha_pulse
from backbeat_trio._services.lease import (
    LEASE_KEY,
    REVERB_LEASE_KEY,
    LeaseKeeper,
    LeaseStatus,
    LeaseStore,
)
from backbeat_trio._services.reverb_ha import hold_lease
from backbeat_trio._transport.jetstream import KVEntry, KVWatch
from backbeat_trio.testing import virtual_wall_clock
from backbeat_trio.testing.lease import MemoryLeaseStore
from backbeat_trio.testing.memory import MemoryBroker

CLUSTER = "junk"
TEMPO = 300  # 0.2 s beats
BEAT = 60 / TEMPO
START = 200_000

#: what a reflected PubAck stores on the key, and other values that are no lease record
PUBACK = b'{"stream":"BACKBEAT_STATUS_main","seq":17}'
JUNK = [PUBACK, b"", b"{}", b"not json", b"\xff\xfe\x00", b'{"holder":"p9"}', b"[" * 300]


def timings(**changes: float) -> LeaseTimings:
    values = {
        "ttl": 1.0,
        "guard": 0.05,
        "clock_drift": 0.001,
        "poll_interval": 0.05,
        "renew_interval": 0.5,
        "op_timeout": 0.3,
    }
    values.update(changes)
    return LeaseTimings(**values)


def snapshot(beat_index: int) -> ScheduleSnapshot:
    return ScheduleSnapshot.fresh(
        CLUSTER,
        start_index=beat_index,
        due=1.7e9,
        tempo_bpm=TEMPO,
        beats_per_bar=4,
        max_tempo_step=0.1,
    )


def record(
    holder: str = "p1",
    *,
    instance: str = "L",
    seq: int = 1,
    released: bool = False,
    beat_index: int = START,
) -> LeaseRecord:
    return LeaseRecord(
        holder=holder,
        instance=instance,
        seq=seq,
        ttl=1.0,
        released=released,
        schedule=snapshot(beat_index),
    )


junk_values = st.one_of(
    st.binary(max_size=256),
    st.sampled_from(JUNK),
    st.builds(
        lambda stream, seq: f'{{"stream":"{stream}","seq":{seq}}}'.encode(),
        st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_", min_size=1, max_size=20),
        st.integers(0, 2**64),
    ),
    st.none(),  # a delete marker
)


def leading(t: LeaseTimings, *, at: float = 0.0) -> tuple[LeaseElection, LeaseRecord]:
    """An election that leads with its first write (revision 1), sent at ``at``."""
    e = LeaseElection("p1", t, instance="L")
    e.observe(None, None, now=at)
    seq, _ = e.prepare_write(now=at)
    mine = record(seq=seq)
    e.write_succeeded(seq, 1, mine, now=at + 0.01)
    assert e.role == "leader"
    return e, mine


# --- the sans-IO election -------------------------------------------------------------------------
@pytest.mark.parametrize("data", [*JUNK, None])
def test_junk_decodes_to_no_record(data: bytes | None) -> None:
    assert decode_lease(data) is None


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(junk_values, min_size=1, max_size=5),
    via_conflict=st.booleans(),
    gaps=st.lists(st.integers(1, 1000), min_size=5, max_size=5),
)
def test_junk_never_makes_a_leader_step_down(
    values: list[bytes | None], via_conflict: bool, gaps: list[int]
) -> None:
    t = timings()
    e, _ = leading(t)
    now, revision = 0.02, 1
    for i, data in enumerate(values):
        parsed = decode_lease(data)
        assume(parsed is None)
        revision += gaps[i]  # other keys of the bucket share the revision sequence
        if via_conflict:  # the leader's next write loses to the junk, then reads it
            e.prepare_write(now)
            e.write_conflicted(now)
            assert not e.may_publish(now)  # nothing goes out until a read says whose it is
        e.observe(revision, parsed, now)
        assert e.role == "leader"
        assert e.terms == 1
        assert e.may_publish(now)  # the lease of the last confirmed write still runs
        assert e.record is not None
        assert e.record.schedule is not None
        assert e.record.schedule.beat_index == START
        assert e.expected_last() == revision  # the next write overwrites the junk
        # the overwrite succeeds: the lease is renewed from its send time
        sent = now + 0.01
        seq, last = e.prepare_write(sent)
        assert last == revision
        revision += 1
        e.write_succeeded(seq, revision, record(seq=seq), now=sent + 0.01)
        assert e.role == "leader"
        assert e.valid_until == pytest.approx(sent + t.lease_span)
        now = sent + 0.1


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(junk_values, min_size=1, max_size=5),
    beat_index=st.integers(0, 2**62),
    spacing=st.floats(0.0, 2.0),
)
def test_junk_never_makes_a_successor_restart_the_index(
    values: list[bytes | None], beat_index: int, spacing: float
) -> None:
    t = timings()
    f = LeaseElection("p2", t, instance="F")
    f.observe(1, record(beat_index=beat_index), now=0.0)
    now = 0.0
    for i, data in enumerate(values):
        parsed = decode_lease(data)
        assume(parsed is None)
        now += spacing
        f.observe(2 + i, parsed, now)
        # not a vacancy: the junk revision is waited out in full from its first sight
        assert not f.may_acquire(now)
        assert f.expires_at() == pytest.approx(now + t.ttl)
        assert f.holder == "p1"
        assert f.record is not None
        assert f.record.schedule is not None
        assert f.record.schedule.beat_index == beat_index
    assert f.may_acquire(now + t.ttl)
    assert f.expected_last() == 1 + len(values)  # the takeover overwrites the junk


@pytest.mark.parametrize(
    "below",
    [record(released=True), record("p2", instance="F")],
    ids=["released", "own-record"],
)
def test_junk_on_top_of_a_record_cancels_the_immediate_takeover(below: LeaseRecord) -> None:
    # the junk may hide a newer record the follower's reads missed
    f = LeaseElection("p2", timings(), instance="F")
    f.observe(4, below, now=0.0)
    assert f.may_acquire(0.0)
    f.observe(9, None, now=0.5)
    assert not f.may_acquire(1.4)
    assert f.may_acquire(1.5)


@settings(max_examples=200, deadline=None)
@given(
    ttl=st.floats(0.2, 60.0),
    guard_frac=st.floats(0.0, 0.4),
    drift=st.floats(0.0, 0.01),
    leader_rate=st.floats(-1.0, 1.0),
    follower_rate=st.floats(-1.0, 1.0),
    junk_delay=st.floats(0.0, 5.0),
    read_delay=st.floats(0.0, 5.0),
)
def test_a_follower_that_saw_only_junk_still_waits_out_the_hidden_leader(
    ttl: float,
    guard_frac: float,
    drift: float,
    leader_rate: float,
    follower_rate: float,
    junk_delay: float,
    read_delay: float,
) -> None:
    # The follower missed the leader's write W and sees only the junk stored after it: its
    # takeover must still come a guard after the leader's last publish.
    t = timings(ttl=ttl, guard=guard_frac * ttl, clock_drift=drift)
    rl, rf = 1 + leader_rate * drift, 1 + follower_rate * drift
    leader = LeaseElection("p1", t, instance="L")
    leader.observe(None, None, now=0.0)
    seq, _ = leader.prepare_write(now=1.0 * rl)
    leader.write_succeeded(seq, 1, record(seq=seq), now=1.001 * rl)
    follower = LeaseElection("p2", t, instance="F")
    junk_stored = 1.0 + junk_delay
    follower.observe(2, None, now=(junk_stored + read_delay) * rf)
    last_publish_real = leader.valid_until / rl
    takeover_real = follower.expires_at() / rf
    assert last_publish_real + t.guard <= takeover_real + 1e-9 * ttl


def test_a_conflict_lost_to_someone_elses_record_still_ends_leadership() -> None:
    e, _ = leading(timings())
    e.prepare_write(0.1)
    e.write_conflicted(0.1)
    assert not e.may_publish(0.1)
    e.observe(2, record("p2", instance="F"), now=0.12)
    assert e.role == "follower"
    assert not e.may_acquire(0.12 + 0.99)


def test_a_vanished_key_still_ends_leadership_but_keeps_the_schedule() -> None:
    e, _ = leading(timings())
    e.observe(None, None, now=0.2)
    assert e.role == "follower"
    assert e.may_acquire(0.2)  # nothing to wait out: the key does not exist
    assert e.record is not None
    assert e.record.schedule is not None
    assert e.record.schedule.beat_index == START


# --- HA pulses and reverbs on MockClock -----------------------------------------------------------
class Seen:
    def __init__(self, at: float, data: bytes) -> None:
        frame = decode(data, BeatFrame)
        self.at = at
        self.index = frame.beat_index
        self.node = HLCStamp.parse(frame.hlc).node


class JunkFleet(Fleet[HAPulseStatus]):
    """HA pulses on a memory bus and one memory lease store; a test writes junk into it."""

    def __init__(self, nursery: trio.Nursery) -> None:
        super().__init__(nursery, lambda status: status.leading)
        self.broker = MemoryBroker()
        self.store = MemoryLeaseStore()
        self.seen: list[Seen] = []

    def put_junk(self, data: bytes) -> int:
        """Store ``data`` as the key's newest revision, as a reflected PubAck would be."""
        revision = self.store.broker.kv_put(
            self.store.bucket, self.store.key, data, last=self.store.key_revision or 0
        )
        assert revision is not None
        return revision

    async def start(
        self, pulse_id: str, wrap: Callable[[LeaseStore], LeaseStore] | None = None
    ) -> HAPulseStatus:
        cfg = HAPulseConfig(
            cluster_id=CLUSTER,
            pulse_id=pulse_id,
            tempo_bpm=TEMPO,
            start_index=START,
            lease_ttl=1.0,
            release_on_exit=False,
        )
        handle: LeaseStore = self.store.handle()
        return await self.start_scoped(
            pulse_id,
            functools.partial(
                run_ha_pulse,
                cfg,
                transport=self.broker.connect(),
                store=handle if wrap is None else wrap(handle),
                wall_clock=virtual_wall_clock,
            ),
        )

    def indices(self) -> list[int]:
        return [s.index for s in self.seen]


def open_junk_fleet() -> AbstractAsyncContextManager[JunkFleet]:
    """A :class:`JunkFleet` that records the beat subject; every pulse stops with the block."""

    async def make(nursery: trio.Nursery) -> JunkFleet:
        fleet = JunkFleet(nursery)

        def keep(data: bytes) -> None:
            fleet.seen.append(Seen(trio.current_time(), data))

        await nursery.start(
            functools.partial(
                collect, fleet.broker.connect(), beat_subject(CLUSTER), keep, buffer=4096
            )
        )
        return fleet

    return open_fleet(make)


def step_downs(status: LeaseStatus) -> list[str]:
    return [c.reason for c in status.changes if c.role == "follower"]


def assert_increasing(indices: list[int]) -> None:
    assert indices
    assert all(b > a for a, b in itertools.pairwise(indices)), indices


async def test_junk_revisions_cost_the_ha_pulses_no_leader(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_junk_fleet() as fleet:
        p1 = await fleet.start("p1")
        await wait_until(lambda: p1.leading)
        p2 = await fleet.start("p2")
        await trio.sleep(5 * BEAT)
        for data in [*JUNK, *JUNK]:  # 14 junk revisions, 0.5 s apart
            fleet.put_junk(data)
            await trio.sleep(0.5)
        await trio.sleep(2.0)
        assert fleet.holder() == "p1"
        assert step_downs(p1) == []
        assert p1.terms == 1
        assert p2.terms == 0
        assert p1.kv_overwrites == 2 * len(JUNK)
        assert p2.kv_unclaimed >= 2 * len(JUNK)
        assert decode_lease(fleet.store.value) is not None  # the leader's record is back on top
    indices = fleet.indices()
    assert_increasing(indices)
    assert {s.node for s in fleet.seen} == {node_id_for("p1")}
    # no beat was lost to the junk: one frame per beat, the first to the last
    assert indices == list(range(indices[0], indices[-1] + 1))


async def test_a_successor_after_junk_continues_the_index(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_junk_fleet() as fleet:
        p1 = await fleet.start("p1")
        await wait_until(lambda: p1.leading)
        p2 = await fleet.start("p2")
        await trio.sleep(5 * BEAT)
        # the junk lands, and the leader dies before its next write could overwrite it
        fleet.put_junk(PUBACK)
        fleet.crash("p1")
        crashed_at = trio.current_time()
        last_before = fleet.indices()[-1]
        await wait_until(lambda: p2.leading, bound=5.0)
        await trio.sleep(5 * BEAT)
    after = [s for s in fleet.seen if s.at > crashed_at]
    assert after
    assert {s.node for s in after} == {node_id_for("p2")}
    assert after[0].index > last_before
    assert_increasing(fleet.indices())
    # nothing the old leader published is repeated, and the index went on with time
    assert after[0].index - last_before <= round((after[0].at - crashed_at) / BEAT) + 2


class JunkOnlyStore:
    """A view of a lease store in which every value reads as junk (revisions are kept)."""

    def __init__(self, inner: LeaseStore) -> None:
        self.inner = inner

    async def ensure(self) -> None:
        await self.inner.ensure()

    async def read(self) -> tuple[int, bytes | None] | None:
        got = await self.inner.read()
        return None if got is None else (got[0], PUBACK)

    async def write(self, value: bytes, *, last: int) -> int | None:
        return await self.inner.write(value, last=last)

    async def watch(self) -> KVWatch:
        watch = await self.inner.watch()
        deliver = watch._deliver

        def junk(entry: KVEntry) -> None:
            deliver(KVEntry(entry.revision, PUBACK))

        watch._deliver = junk  # type: ignore[method-assign]
        return watch


async def test_a_successor_that_never_saw_a_record_continues_from_the_last_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_junk_fleet() as fleet:
        p1 = await fleet.start("p1")
        await wait_until(lambda: p1.leading)
        p2 = await fleet.start("p2", wrap=JunkOnlyStore)  # the lease shows it only junk
        await trio.sleep(5 * BEAT)
        assert p2.holder is None
        fleet.crash("p1")
        crashed_at = trio.current_time()
        last_before = fleet.indices()[-1]
        await wait_until(lambda: p2.leading, bound=5.0)
        await trio.sleep(5 * BEAT)
    after = [s for s in fleet.seen if s.at > crashed_at]
    assert after
    assert after[0].index > last_before > START
    assert_increasing(fleet.indices())


async def test_junk_on_the_reverb_lease_costs_the_reverbs_no_leader(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryLeaseStore(key=REVERB_LEASE_KEY)
    t = timings(ttl=2.0, renew_interval=1.0, poll_interval=0.25, op_timeout=0.5)
    statuses: list[LeaseStatus] = []
    async with trio.open_nursery() as nursery:
        for reverb_id in ("r1", "r2"):
            election = LeaseElection(reverb_id, t)
            status = LeaseStatus(owner_id=reverb_id, instance=election.instance, timings=t)
            statuses.append(status)
            keeper = LeaseKeeper(reverb_id, t, store.handle(), status, election, virtual_wall_clock)
            nursery.start_soon(hold_lease, keeper, False)
            if reverb_id == "r1":
                await wait_until(lambda: statuses[0].leading)
        await trio.sleep(1.0)
        for data in JUNK:
            revision = store.broker.kv_put(
                store.bucket, store.key, data, last=store.key_revision or 0
            )
            assert revision is not None
            await trio.sleep(1.2)  # past a renewal: each junk revision is overwritten
        await trio.sleep(3.0)
        nursery.cancel_scope.cancel()
    r1, r2 = statuses
    assert r1.leading
    assert step_downs(r1) == []
    assert r1.terms == 1
    assert r2.terms == 0
    assert r1.kv_overwrites == len(JUNK)


# --- over a real nats-server ----------------------------------------------------------------------
@pytest.mark.nats
async def test_junk_put_on_the_lease_key_over_nats_costs_the_ha_pulses_no_leader(
    nats_url: str,
) -> None:
    cluster = "junknats"
    seen: list[Seen] = []
    statuses: list[HAPulseStatus] = []

    def keep(data: bytes) -> None:
        seen.append(Seen(trio.current_time(), data))

    async def watch_beats(task_status: trio.TaskStatus[None]) -> None:
        cfg = Config(cluster_id=cluster, agent_id="watch", nats_url=nats_url)
        async with open_nats_transport(cfg) as transport:
            await collect(
                transport, beat_subject(cluster), keep, buffer=4096, task_status=task_status
            )

    async with trio.open_nursery() as nursery:
        await nursery.start(watch_beats)
        for pulse_id in ("p1", "p2"):
            cfg = HAPulseConfig(
                cluster_id=cluster,
                pulse_id=pulse_id,
                nats_url=nats_url,
                tempo_bpm=TEMPO,
                start_index=START,
                lease_ttl=1.0,
                lease_replicas=1,
                release_on_exit=False,
            )
            statuses.append(await nursery.start(run_ha_pulse, cfg))
            await wait_until(lambda: any(s.leading for s in statuses), bound=10.0)
        leader = next(s for s in statuses if s.leading)
        follower = next(s for s in statuses if s is not leader)
        await trio.sleep(5 * BEAT)
        junk_from = len(seen)
        # an admin connection puts junk on the key, as a KV put (no compare-and-set)
        async with trio_asyncio.open_loop():
            aio = trio_asyncio.aio_as_trio
            nc = await aio(nats.connect)(nats_url, allow_reconnect=False)
            try:
                kv = await aio(nc.jetstream().key_value)(lease_bucket_name(cluster))
                for data in [*JUNK, *JUNK][:10]:  # ten of them, 0.5 s apart
                    await aio(kv.put)(LEASE_KEY, data)
                    await trio.sleep(0.5)
                for marker in (kv.delete, kv.purge):  # `nats kv del` and `nats kv purge`
                    await aio(marker)(LEASE_KEY)
                    await trio.sleep(0.5)
            finally:
                with trio.CancelScope(shield=True):
                    await aio(nc.close)()
        await trio.sleep(2.0)  # two lease TTLs: a lost lease would have shown by now
        nursery.cancel_scope.cancel()
    assert step_downs(leader) == []
    assert leader.terms == 1
    assert follower.terms == 0
    assert leader.kv_overwrites >= 6  # most land between two claims, each overwritten
    assert follower.kv_unclaimed >= 6
    indices = [s.index for s in seen]
    assert_increasing(indices)
    assert {s.node for s in seen} == {node_id_for(leader.pulse_id)}
    # the beats went on through the junk (a loaded machine may make the pulse skip a late one)
    during = indices[junk_from:]
    assert len(during) >= 0.7 * (during[-1] - during[0] + 1)
    assert len(during) >= 0.7 * 6.0 / BEAT
