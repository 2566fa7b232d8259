"""HA reverb: several reverbs per cluster, exactly one publishing each window's report.

Over a real nats-server: two reverbs share the ``reverb-lease`` key; the publishing one is crashed
(no release) right after a report; every window is then reported exactly once, in order, with no
window missing -- the successor publishes what it aggregated on standby that the bar stream lacks.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest
import trio
import trio.testing
from _ha_harness import Fleet, collect, open_fleet, wait_until

from backbeat_trio._bridge.nats import open_nats_transport
from backbeat_trio._client.config import Config
from backbeat_trio._core.beats import bar_subject
from backbeat_trio._core.lease import decode_lease, lease_bucket_name
from backbeat_trio._core.wire import BarReport, decode
from backbeat_trio._errors import ConfigError
from backbeat_trio._services.history import bar_stream_name, last_reported_window, replay_bars
from backbeat_trio._services.pulse import PulseConfig, run_pulse
from backbeat_trio._services.reverb import ReverbConfig, ReverbStatus, run_reverb
from backbeat_trio.testing import virtual_wall_clock
from backbeat_trio.testing.lease import MemoryLeaseStore
from backbeat_trio.testing.memory import MemoryBroker

TEMPO = 600  # 100 ms beats
BPB = 4  # 400 ms windows


def bar_recorder(seen: list[tuple[float, BarReport]]) -> Callable[[bytes], None]:
    """Appends each report with the time it arrived to ``seen``."""

    def record(data: bytes) -> None:
        seen.append((trio.current_time(), decode(data, BarReport)))

    return record


async def collect_bars(
    url: str,
    cluster: str,
    seen: list[tuple[float, BarReport]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    conn = Config(cluster_id=cluster, agent_id="bar-watch", nats_url=url)
    async with open_nats_transport(conn) as transport:
        await collect(
            transport,
            bar_subject(cluster),
            bar_recorder(seen),
            buffer=4096,
            task_status=task_status,
        )


async def start_ha_fleet(
    nursery: trio.Nursery, url: str, cluster: str, **changes: object
) -> Fleet[ReverbStatus]:
    """Two HA reverbs (each in its own cancel scope), then a pulse, on a real server."""
    fleet: Fleet[ReverbStatus] = Fleet(nursery, lambda status: status.publishing)
    for rid in ("r1", "r2"):
        values: dict[str, object] = {
            "cluster_id": cluster,
            "nats_url": url,
            "reverb_id": rid,
            "beats_per_bar": BPB,
            "allow_unsigned": True,
            "ha": True,
        }
        values.update(changes)
        cfg = ReverbConfig(**values)  # type: ignore[arg-type]
        await fleet.start_scoped(rid, functools.partial(run_reverb, cfg))
    await nursery.start(
        run_pulse,
        PulseConfig(cluster_id=cluster, nats_url=url, tempo_bpm=TEMPO, beats_per_bar=BPB),
    )
    return fleet


async def crash_right_after_a_report(
    fleet: Fleet[ReverbStatus], seen: list[tuple[float, BarReport]], old: str, *, reports_after: int
) -> None:
    """Crash ``old`` (no release) just after a report, then wait for ``reports_after`` more."""
    count = len(seen)
    await wait_until(lambda: len(seen) > count)
    fleet.crash(old)
    crashed_at = trio.current_time()
    await wait_until(lambda: sum(1 for at, _ in seen if at > crashed_at) >= reports_after)


@pytest.mark.nats
async def test_ha_reverbs_report_every_window_once_across_a_crash(nats_url: str) -> None:
    cluster = "rha-crash"
    seen: list[tuple[float, BarReport]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(collect_bars, nats_url, cluster, seen)
        fleet = await start_ha_fleet(
            nursery,
            nats_url,
            cluster,
            lease_ttl=1.0,  # > a window: the first window after the crash has no publisher
            release_on_exit=False,  # a crash
        )
        await wait_until(lambda: len(seen) >= 4)
        leaders = fleet.holders()
        assert len(leaders) == 1, leaders
        old = leaders[0]
        new = next(r for r in fleet.status if r != old)
        assert fleet.status[new].reports_standby >= 3  # it aggregated, but did not publish
        await crash_right_after_a_report(fleet, seen, old, reports_after=5)
        nursery.cancel_scope.cancel()

    # no window twice on the bar subject, none missing
    assert_every_window_once(seen)
    windows = [r.window_id for _, r in seen]
    successor = fleet.status[new]
    assert successor.lease is not None
    assert successor.lease.terms == 1
    # it followed the lease through the watch: the current value when it started, then the
    # leader's renewals (every 0.5 s for the >= 1.6 s of 4 reports before the crash); a watch
    # that stopped after its first delivery would show 1
    assert successor.lease.kv_watched >= 3, successor.lease.kv_watched
    assert successor.reports_caught_up >= 1  # the window the crash left unreported
    # the bar stream holds each window once as well
    conn = Config(cluster_id=cluster, agent_id="check", nats_url=nats_url)
    async with open_nats_transport(conn) as transport:
        stored = await transport.jetstream.stream_read(
            bar_stream_name(cluster), bar_subject(cluster), 1, max_msgs=10_000
        )
    stored_windows = [decode(m.data, BarReport).window_id for m in stored]
    assert len(stored_windows) == len(set(stored_windows))
    assert set(windows) <= set(stored_windows)


@pytest.mark.nats
async def test_a_stopped_ha_reverb_hands_over_at_once(nats_url: str) -> None:
    cluster = "rha-release"
    seen: list[tuple[float, BarReport]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(collect_bars, nats_url, cluster, seen)
        # a TTL of 30 s: only the release can hand over within this test
        fleet = await start_ha_fleet(nursery, nats_url, cluster, lease_ttl=30.0)
        await wait_until(lambda: len(seen) >= 2)
        old = fleet.holders()[0]
        new = next(r for r in fleet.status if r != old)
        fleet.scopes[old].cancel()  # a stop: the reverb releases its lease on the way out
        stopped_at = trio.current_time()
        await wait_until(lambda: fleet.status[new].publishing, bound=5.0)
        assert trio.current_time() - stopped_at < 2.0
        await wait_until(lambda: sum(1 for at, _ in seen if at > stopped_at) >= 3)
        nursery.cancel_scope.cancel()
    assert_every_window_once(seen)


def test_reverb_ha_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="replicas"):
        ReverbConfig(cluster_id="c", replicas=0)
    with pytest.raises(ConfigError, match="lease_ttl"):
        ReverbConfig(cluster_id="c", ha=True, lease_ttl=0.0)
    with pytest.raises(ConfigError, match="lease_ttl"):
        ReverbConfig(cluster_id="c", ha=True, lease_ttl=0.1, jitter_tolerance=0.05)
    timings = ReverbConfig(cluster_id="c", lease_ttl=4.0).lease_timings()
    assert timings.renew_interval == 2.0
    assert timings.lease_span < 4.0


async def test_ha_on_a_memory_transport_keeps_its_lease_in_the_transports_kv(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # no lease store given: the reverb lease is a key of the transport's own KV bucket
    broker = MemoryBroker()
    cfg = ReverbConfig(cluster_id="c", ha=True, lease_ttl=1.0, allow_unsigned=True)
    async with trio.open_nursery() as nursery:
        status = await nursery.start(
            lambda task_status: run_reverb(
                cfg,
                transport=broker.connect(),
                wall_clock=virtual_wall_clock,
                task_status=task_status,
            )
        )
        assert status.lease is not None
        with trio.fail_after(5):
            await status.lease.wait_for_role("leader")
        entry = broker.kv_get(lease_bucket_name("c"), "reverb-lease")
        assert entry is not None
        assert entry.revision == status.lease.lease_revision
        assert decode_lease(entry.value) is not None
        nursery.cancel_scope.cancel()


# --- deterministic, on MockClock with the in-memory bus -----------------------------------------
class MemoryReverbs(Fleet[ReverbStatus]):
    """A pulse and two HA reverbs on a memory bus and a memory lease store (``bar_stream``: the
    reverbs create the memory bar stream, else no stream at all)."""

    def __init__(self, nursery: trio.Nursery, *, bar_stream: bool = False) -> None:
        super().__init__(nursery, lambda status: status.publishing)
        self.bar_stream = bar_stream
        self.broker = MemoryBroker()
        self.store = MemoryLeaseStore()
        self.seen: list[tuple[float, BarReport]] = []

    async def start(self) -> None:
        await self.nursery.start(
            functools.partial(
                collect,
                self.broker.connect(),
                bar_subject("mem"),
                bar_recorder(self.seen),
                buffer=4096,
            )
        )
        for rid in ("r1", "r2"):
            cfg = ReverbConfig(
                cluster_id="mem",
                reverb_id=rid,
                beats_per_bar=BPB,
                allow_unsigned=True,
                ha=True,
                lease_ttl=1.0,
                release_on_exit=False,
                create_stream=self.bar_stream,
            )
            await self.start_scoped(
                rid,
                functools.partial(
                    run_reverb,
                    cfg,
                    transport=self.broker.connect(),
                    lease_store=self.store.handle(),
                    wall_clock=virtual_wall_clock,
                ),
            )
        pulse_cfg = PulseConfig(cluster_id="mem", tempo_bpm=TEMPO, beats_per_bar=BPB)
        await self.nursery.start(
            functools.partial(
                run_pulse, pulse_cfg, transport=self.broker.connect(), wall_clock=virtual_wall_clock
            )
        )

    async def crash_the_publisher(self) -> str:
        """After 6 reports, crash the publisher right after a report and wait for 6 more;
        returns the other reverb, which publishes them."""
        await wait_until(lambda: len(self.seen) >= 6)
        old = self.publisher()
        new = next(r for r in self.status if r != old)
        await crash_right_after_a_report(self, self.seen, old, reports_after=6)
        assert self.publisher() == new
        return new

    def publisher(self) -> str:
        holder = self.holder()
        assert holder is not None
        return holder


def open_memory_reverbs(*, bar_stream: bool = False) -> AbstractAsyncContextManager[MemoryReverbs]:
    """Started :class:`MemoryReverbs`; they all stop with the block."""

    async def make(nursery: trio.Nursery) -> MemoryReverbs:
        mem = MemoryReverbs(nursery, bar_stream=bar_stream)
        await mem.start()
        return mem

    return open_fleet(make)


def assert_every_window_once(seen: list[tuple[float, BarReport]]) -> None:
    windows = [r.window_id for _, r in seen]
    assert len(windows) == len(set(windows)), windows
    starts = [r.from_beat for _, r in seen]
    assert all(b - a == BPB for a, b in itertools.pairwise(starts)), starts


async def test_a_crash_without_a_bar_stream_loses_and_doubles_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # no bar history to ask: the successor relies on the reports it saw on the bar subject
    async with open_memory_reverbs() as mem:
        new = await mem.crash_the_publisher()
        assert mem.status[new].reports_caught_up >= 1
    assert_every_window_once(mem.seen)


async def test_a_crash_with_a_memory_bar_stream_resumes_from_its_history(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # the memory bus keeps bar history too: the successor asks it, and a replay returns exactly
    # the reports that were published
    async with open_memory_reverbs(bar_stream=True) as mem:
        assert bar_stream_name("mem") in mem.broker.streams
        await mem.crash_the_publisher()
        reader = mem.broker.connect()
        replayed = await replay_bars(reader, "mem")
        published = [r for _, r in mem.seen]
        assert len(replayed) >= 12
        assert [r.window_id for r in replayed] == [r.window_id for r in published[: len(replayed)]]
        assert await last_reported_window(reader, "mem") == replayed[-1].from_beat
    assert_every_window_once(mem.seen)


async def test_reports_wait_out_a_disconnection_instead_of_being_buffered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_reverbs() as mem:
        await wait_until(lambda: len(mem.seen) >= 3)
        leader = mem.publisher()
        before = mem.status[leader].reports_standby
        mem.broker.set_down()  # the reverbs keep time locally and close windows meanwhile
        await trio.sleep(3 * BPB * 60 / TEMPO)
        assert mem.status[leader].reports_standby > before  # kept, not handed to the bus
        mem.broker.set_up()
        count = len(mem.seen)
        await wait_until(lambda: len(mem.seen) >= count + 5)
    assert_every_window_once(mem.seen)
