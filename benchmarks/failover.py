"""Benchmark 12, HA failover on a 3-node cluster: is the successor's first frame on time?

Three HA pulses (``backbeat-trio pulse --ha``, each its own process, every cluster URL) beat at
240 BPM with the default lease (TTL two beats plus the 50 ms jitter tolerance). Then:

* **pulse kills**: the leading pulse's process is SIGKILLed (10 times; 3 with ``--quick``), and
  restarted as a follower once its successor beats;
* **server kills**: the nats-server holding the lease stream's Raft leader is SIGKILLed (3
  times; 1 with ``--quick``), and restarted once beats flow again; then as often the leading
  pulse's nats-server, with the lease stream's leader moved off it first.

Frames are received on every server (one pinned connection each, the earliest arrival of each
beat kept), stamped with the wall clock as they arrive. A frame's *lateness* is its arrival
minus its due time (its ``deadline_at`` minus one beat), delivery included. Per kill it reports
the successor's first frame's lateness, the gap from the last frame before the kill to it, and
the failover time (kill to that frame); the goal is that no frame of the run comes later than
the jitter tolerance after its due time (a successor publishes on time or skips the beat).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import trio

from backbeat_trio import NatsCluster, NatsServerProcess
from backbeat_trio._bridge import open_nats_transport
from backbeat_trio._core.beats import beat_subject
from backbeat_trio._core.hlc import HLCStamp, node_id_for
from backbeat_trio._core.lease import lease_bucket_name
from backbeat_trio._core.wire import BeatFrame, decode
from backbeat_trio._embedded import open_embedded_nats_cluster
from backbeat_trio._errors import BackbeatError
from backbeat_trio._transport.base import Message, Transport
from backbeat_trio._transport.options import ConnectionOptions
from benchmarks._report import Row
from benchmarks._runner import ROOT, Outcome, Params, solo_row
from benchmarks._stats import median

BENCH = "12 HA failover"
CLUSTER = "failover"
TEMPO = 240
BEAT = 60 / TEMPO
TOLERANCE = 0.050  # HAPulseConfig's default jitter_tolerance, which the CLI keeps
TTL = 2 * BEAT + TOLERANCE
PULSES = ("p1", "p2", "p3")
#: bound on any one wait (a failover, a restart): a stuck run fails instead of hanging
WAIT_S = 30.0


@dataclass(frozen=True)
class Arrival:
    at: float  # wall clock when the first copy arrived
    frame: BeatFrame
    node: int

    @property
    def lateness(self) -> float:
        return self.at - self.frame.started_at.timestamp()


@dataclass
class Kill:
    kind: str
    killed_at: float
    last: Arrival  # the last frame that arrived before the kill
    first: Arrival  # the first frame after it from the pulse that leads then

    @property
    def gap(self) -> float:
        return self.first.at - self.last.at

    @property
    def failover(self) -> float:
        return self.first.at - self.killed_at


class Beats:
    """Every beat index's earliest arrival, from a connection pinned to each server."""

    def __init__(self) -> None:
        self.by_index: dict[int, Arrival] = {}
        self.order: list[Arrival] = []

    def record(self, msg: Message) -> None:
        at = time.time()
        try:
            frame = decode(msg.data, BeatFrame)
        except Exception:  # the subject is ours alone; nothing else is expected on it
            return
        if frame.beat_index in self.by_index:
            return
        arrival = Arrival(at, frame, HLCStamp.parse(frame.hlc).node)
        self.by_index[frame.beat_index] = arrival
        self.order.append(arrival)

    def since(self, wall: float) -> list[Arrival]:
        return [a for a in self.order if a.at > wall]

    async def wait(self, count: int, since: float, *, other_than: int | None = None) -> None:
        """Poll (the frames arrive on the asyncio side) until ``count`` frames arrived after
        ``since`` (from a pulse other than ``other_than``)."""
        with trio.fail_after(WAIT_S):
            while True:
                got = [a for a in self.since(since) if other_than is None or a.node != other_than]
                if len(got) >= count:
                    return
                await trio.sleep(BEAT / 4)


async def _listen(url: str, beats: Beats, task_status: trio.TaskStatus[None]) -> None:
    opts = ConnectionOptions(nats_url=url, reconnect_delay=0.1, connect_attempts=3)
    async with open_nats_transport(opts) as transport:
        sub = await transport.subscribe(beat_subject(CLUSTER), buffer=4096, handler=beats.record)
        task_status.started()
        await trio.sleep_forever()
        del sub


class Pulse:
    """One ``backbeat-trio pulse --ha`` process, restartable under the same pulse id."""

    def __init__(self, pulse_id: str, urls: str, logdir: Path) -> None:
        self.pulse_id = pulse_id
        self.node = node_id_for(pulse_id)
        self.urls = urls
        self.log_path = logdir / f"failover-{pulse_id}.log"
        self.proc: trio.Process | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the process; back once it printed its first role (it holds the lease bucket)."""
        with self.log_path.open("ab") as log:
            self.proc = await trio.lowlevel.open_process(
                [
                    *(sys.executable, "-m", "backbeat_trio", "pulse", "--ha", "-q"),
                    *("-s", self.urls, "-c", CLUSTER, "--tempo", str(TEMPO)),
                    *("--pulse-id", self.pulse_id),
                ],
                stdin=None,
                stdout=-1,
                stderr=log,
                cwd=str(ROOT),
            )
        started = trio.Event()
        nursery.start_soon(self._read, self.proc, started)
        with trio.fail_after(WAIT_S):
            await started.wait()

    async def _read(self, proc: trio.Process, started: trio.Event) -> None:
        assert proc.stdout is not None
        seen = b""
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            async for chunk in proc.stdout:
                seen = (seen + chunk)[-4096:]
                if b"role " in seen:
                    started.set()

    async def kill(self) -> None:
        """SIGKILL (no release of the lease: a crash)."""
        if self.proc is not None:
            self.proc.kill()
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            with trio.move_on_after(5.0):
                await self.proc.wait()
            await self.kill()


def _lease_stream_leader(nats: NatsCluster) -> NatsServerProcess | None:
    stream = f"KV_{lease_bucket_name(CLUSTER)}"
    names = {s.server_name: s for s in nats.servers}
    for server in (s for s in nats.servers if s.running):
        jsz = server.monitor("jsz?accounts=true&streams=true")
        for account in jsz.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == stream:
                    leader = (detail.get("cluster") or {}).get("leader")
                    if leader in names:
                        return names[leader]
    return None


def _server_of(nats: NatsCluster, connection_name: str) -> NatsServerProcess | None:
    for server in (s for s in nats.servers if s.running):
        names = [c.get("name") for c in server.monitor("connz").get("connections") or []]
        if connection_name in names:
            return server
    return None


@contextlib.asynccontextmanager
async def _open_pulses(urls: str, logdir: Path) -> AsyncIterator[tuple[trio.Nursery, list[Pulse]]]:
    pulses = [Pulse(p, urls, logdir) for p in PULSES]
    try:
        async with trio.open_nursery() as nursery:
            for pulse in pulses:
                await pulse.start(nursery)
            yield nursery, pulses
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for pulse in pulses:
                await pulse.stop()


async def _kill_leading_pulse(beats: Beats, pulses: list[Pulse], nursery: trio.Nursery) -> Kill:
    await beats.wait(6, time.time() - BEAT)
    leader = next(p for p in pulses if p.node == beats.order[-1].node)
    killed_at = time.time()
    await leader.kill()
    await beats.wait(1, killed_at, other_than=leader.node)
    last = [a for a in beats.order if a.at <= killed_at][-1]
    first = next(a for a in beats.since(killed_at) if a.node != leader.node)
    await leader.start(nursery)  # back as a follower
    return Kill("pulse", killed_at, last, first)


async def _pulse_server_apart(
    beats: Beats, nats: NatsCluster, pulses: list[Pulse], admin: Transport
) -> NatsServerProcess:
    """The leading pulse's server, once the lease stream's leader is on another one."""
    stream = f"KV_{lease_bucket_name(CLUSTER)}"
    with trio.fail_after(WAIT_S):
        while True:
            await beats.wait(6, time.time() - BEAT)
            leader = next(p for p in pulses if p.node == beats.order[-1].node)
            doomed = _server_of(nats, f"backbeat-ha-pulse:{leader.pulse_id}")
            if doomed is not None and doomed is not _lease_stream_leader(nats):
                return doomed
            with contextlib.suppress(BackbeatError):
                await admin.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"")
            await trio.sleep(1.0)


async def _kill_server(
    beats: Beats, nats: NatsCluster, kind: str, doomed: NatsServerProcess | None = None
) -> Kill:
    """SIGKILL ``doomed`` (by default the lease stream's leader), measure, start it again."""
    await beats.wait(6, time.time() - BEAT)
    doomed = doomed or _lease_stream_leader(nats)
    if doomed is None:
        raise RuntimeError("the lease stream has no leader")
    killed_at = time.time()
    await trio.to_thread.run_sync(doomed.kill)
    await beats.wait(4, killed_at)
    last = [a for a in beats.order if a.at <= killed_at][-1]
    after = beats.since(killed_at)
    # the frame that ends the longest silence after the kill (frames in flight came first)
    gaps = [(b.at - a.at, b) for a, b in zip([last, *after], after, strict=False)]
    first = max(gaps, key=lambda g: g[0])[1]
    await trio.to_thread.run_sync(nats.start)  # the killed member again, on its ports and store
    await beats.wait(4, time.time())
    return Kill(kind, killed_at, last, first)


async def bench_failover(p: Params, out: Outcome, logdir: Path) -> None:
    pulse_kills, server_kills = (3, 1) if p.quick else (10, 3)
    beats = Beats()
    kills: list[Kill] = []
    async with (
        open_embedded_nats_cluster(3, name="benchha") as nats,
        trio.open_nursery() as listeners,
    ):
        for url in nats.urls:
            await listeners.start(_listen, url, beats)
        async with _open_pulses(nats.url, logdir) as (nursery, pulses):
            await beats.wait(8, 0.0)
            started = time.time()
            for _ in range(pulse_kills):
                kills.append(await _kill_leading_pulse(beats, pulses, nursery))
            for _ in range(server_kills):
                kills.append(await _kill_server(beats, nats, "raft"))
            async with open_nats_transport(ConnectionOptions(nats_url=nats.urls)) as admin:
                for _ in range(server_kills):
                    doomed = await _pulse_server_apart(beats, nats, pulses, admin)
                    kills.append(await _kill_server(beats, nats, "server", doomed))
            await beats.wait(4, time.time())
        listeners.cancel_scope.cancel()
    _rows(out, kills, [a for a in beats.order if a.at > started], pulse_kills, server_kills)


def _rows(
    out: Outcome, kills: list[Kill], run: list[Arrival], pulse_kills: int, server_kills: int
) -> None:
    ms = 1000.0
    by_pulse = [k for k in kills if k.kind == "pulse"]
    by_raft = [k for k in kills if k.kind == "raft"]
    by_server = [k for k in kills if k.kind == "server"]
    late = [k.first.lateness * ms for k in by_pulse]
    worst = max(a.lateness for a in run) * ms
    tol = TOLERANCE * ms
    rows: list[Row] = [
        solo_row(
            BENCH,
            f"leading pulse SIGKILLed ×{pulse_kills}: successor's first frame after its due time",
            "ms",
            late,
            f"≤ {tol:g} ms (jitter tolerance)",
            max(late) <= tol,
        ),
        solo_row(
            BENCH,
            f"every frame of the run ({len(run)} beats, all kills): worst lateness",
            "ms",
            [worst],
            f"≤ {tol:g} ms",
            worst <= tol,
        ),
        solo_row(
            BENCH,
            "leading pulse SIGKILLed: gap, last frame before the kill to the successor's first",
            "s",
            [k.gap for k in by_pulse],
            f"≤ TTL + one beat ({TTL + BEAT:g} s)",
            max(k.gap for k in by_pulse) <= TTL + BEAT,
        ),
        solo_row(
            BENCH,
            "leading pulse SIGKILLed: failover time (kill to the successor's first frame)",
            "s",
            [k.failover for k in by_pulse],
        ),
    ]
    for group, what in (
        (by_raft, "the nats-server holding the lease stream's Raft leader"),
        (by_server, "the leading pulse's nats-server (the lease stream's leader elsewhere)"),
    ):
        rows += [
            solo_row(
                BENCH, f"{what} SIGKILLed ×{len(group)}: beat gap", "s", [k.gap for k in group]
            ),
            solo_row(
                BENCH,
                "same: the first frame after the gap, after its due time",
                "ms",
                [k.first.lateness * ms for k in group],
                f"≤ {tol:g} ms",
                max(k.first.lateness for k in group) * ms <= tol,
            ),
        ]
    out.rows.extend(rows)
    skipped = sum(k.first.frame.beat_index - k.last.frame.beat_index - 1 for k in kills)
    out.notes.append(
        f"HA failover: 3 HA pulses (own processes) on a 3-node cluster, {TEMPO} BPM, lease TTL "
        f"{TTL:g} s, jitter tolerance {TOLERANCE * ms:g} ms; {pulse_kills} SIGKILLs of the "
        f"leading pulse (failover median {median([k.failover for k in by_pulse]):.2f} s), "
        f"{server_kills} of the nats-server holding the lease stream's Raft leader and "
        f"{server_kills} of the leading pulse's nats-server, each restarted; beat "
        f"indices skipped across all kills: {skipped}; frames received on every server, "
        "lateness = arrival - due time (delivery included)."
    )
