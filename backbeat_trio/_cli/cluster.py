"""``backbeat-trio cluster``: a local NATS cluster with HA pulses and reverbs, to watch a
failover.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from .._bridge import open_nats_transport
from .._core.beats import bar_subject, beat_subject, validate_id
from .._core.hlc import HLCStamp, node_id_for
from .._core.wire import BarReport, BeatFrame, decode
from .._embedded import NatsCluster, open_embedded_nats_cluster
from .._errors import BackbeatError, ConfigError, WireError
from .._services.ha_pulse import HAPulseConfig, HAPulseStatus, run_ha_pulse
from .._services.lease import _finite_positive
from .._transport.options import ConnectionOptions

if TYPE_CHECKING:
    from .._services.reverb import ReverbConfig, ReverbStatus


# --- a local cluster to watch a failover ----------------------------------------------------------
@dataclass
class LocalCluster:
    """What :func:`run_local_cluster` hands to ``nursery.start``: servers, pulses and reverbs."""

    cluster_id: str
    nats: NatsCluster
    pulses: dict[str, HAPulseStatus] = field(default_factory=dict)
    reverbs: dict[str, ReverbStatus] = field(default_factory=dict)
    scopes: dict[str, trio.CancelScope] = field(default_factory=dict)
    failovers: int = 0
    lines: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"<LocalCluster {self.cluster_id} servers={len(self.nats.urls)} "
            f"pulse leader={self.leader()} reverb publishing={self.reverb_leader()} "
            f"failovers={self.failovers}>"
        )

    @property
    def urls(self) -> list[str]:
        """Every server's client URL."""
        return self.nats.urls

    def leader(self) -> str | None:
        """The pulse currently leading, if any."""
        for pulse_id, status in self.pulses.items():
            if status.leading:
                return pulse_id
        return None

    def reverb_leader(self) -> str | None:
        """The reverb currently publishing, if any."""
        for reverb_id, status in self.reverbs.items():
            if status.lease is not None and status.lease.leading:
                return reverb_id
        return None

    def crash(self, instance_id: str) -> None:
        """Stop a pulse or reverb without releasing its lease, as a crash would (it restarts)."""
        scope = self.scopes.get(instance_id)
        if scope is not None:
            scope.cancel()


async def run_local_cluster(
    *,
    pulses: int = 3,
    servers: int = 3,
    reverbs: int = 2,
    cluster_id: str = "local",
    tempo_bpm: int = 60,
    beats_per_bar: int = 4,
    lease_ttl: float | None = None,
    failover_every: float | None = None,
    restart_after: float | None = None,
    duration: float | None = None,
    out: Callable[[str], None] = print,
    http: str | None = None,
    http_token: str | None = None,
    http_allow_hosts: Sequence[str] = (),
    http_event_streams: int = 64,
    task_status: trio.TaskStatus[LocalCluster] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start a local NATS cluster with HA pulses and reverbs; report leadership changes.

    For ``backbeat-trio cluster``: prints the URLs, then one line per leadership change seen on
    the beat subject (which pulse, from which beat, after how long a gap) and on the bar subject
    (which reverb publishes). With ``failover_every`` it crashes the leading pulse and the
    publishing reverb that often (no lease release) and restarts them ``restart_after`` seconds
    later, so a user can watch failovers.

    Args:
        pulses: HA pulse instances (1..9).
        servers: nats-servers in the cluster (1..5; replicas are ``min(3, servers)``).
        reverbs: HA reverb instances (0..5; they accept unsigned claims: there is no keyring).
        cluster_id: the BACKBEAT cluster id.
        tempo_bpm: tempo (1..1200).
        beats_per_bar: bar length.
        lease_ttl: lease TTL in seconds (default two beats plus 50 ms).
        failover_every: seconds between crashes of the leader; None: never.
        restart_after: seconds before a crashed pulse restarts (default: the lease TTL).
        duration: stop after this many seconds; None: run until cancelled.
        out: where lines go (default ``print``).
        http: ``"HOST:PORT"`` of an admin server over every pulse and reverb (None: none).
        http_token: the bearer token its ``POST /tempo`` requires (None: read-only).
        http_allow_hosts: ``Host`` names it answers to besides loopback and its address.
        http_event_streams: the dashboard's ``/events`` streams served at once.
        task_status: ``nursery.start`` gets the :class:`LocalCluster` once a pulse leads.

    Raises:
        ConfigError: an argument is out of range.
    """
    if not 1 <= pulses <= 9:
        raise ConfigError("pulses", f"must be in 1..9, got {pulses}")
    if not 1 <= servers <= 5:
        raise ConfigError("servers", f"must be in 1..5, got {servers}")
    if not 0 <= reverbs <= 5:
        raise ConfigError("reverbs", f"must be in 0..5, got {reverbs}")
    validate_id("cluster_id", cluster_id)
    for name, value in (
        ("failover_every", failover_every),
        ("restart_after", restart_after),
        ("duration", duration),
    ):
        if value is not None:
            _finite_positive(name, value)
    replicas = min(3, servers)
    base = HAPulseConfig(
        cluster_id=cluster_id,
        tempo_bpm=tempo_bpm,
        beats_per_bar=beats_per_bar,
        lease_ttl=lease_ttl,
        lease_replicas=replicas,
        release_on_exit=False,
    )
    ttl = base.timings().ttl
    restart_delay = restart_after if restart_after is not None else ttl
    with trio.move_on_after(math.inf if duration is None else duration):
        async with open_embedded_nats_cluster(servers, name=f"bb-{cluster_id}"[:32]) as nats:
            local = LocalCluster(cluster_id, nats)

            def say(line: str) -> None:
                local.lines.append(line)
                del local.lines[:-1000]
                out(line)

            say(f"NATS cluster of {servers} up: {nats.url}")
            say(f"agents: BACKBEAT_NATS_URL={nats.url} BACKBEAT_CLUSTER_ID={cluster_id}")
            say(f"{pulses} HA pulse(s), {tempo_bpm} BPM, lease TTL {ttl:.3f} s")
            if reverbs:
                say(f"{reverbs} HA reverb(s), lease TTL {ttl:.3f} s")
            async with trio.open_nursery() as nursery:
                first_beat = trio.Event()
                await nursery.start(_watch_beats, local, base, first_beat, say)
                for i in range(pulses):
                    pulse_id = f"pulse-{i + 1}"
                    urls = _rotated(nats.urls, i)
                    cfg = base.replace(pulse_id=pulse_id, nats_url=urls)
                    await nursery.start(
                        _instance_slot,
                        local,
                        pulse_id,
                        functools.partial(run_ha_pulse, cfg),
                        local.pulses,
                        restart_delay,
                        say,
                    )
                if reverbs:
                    await nursery.start(_watch_bars, local, base, say)
                for i in range(reverbs):
                    rcfg = _reverb_config(base, i, replicas, ttl, _rotated(nats.urls, i + 1))
                    await nursery.start(
                        _instance_slot,
                        local,
                        rcfg.reverb_id,
                        _reverb_runner(rcfg),
                        local.reverbs,
                        restart_delay,
                        say,
                    )
                await first_beat.wait()
                if http is not None:
                    admin = _AdminSettings(http, http_token, http_allow_hosts, http_event_streams)
                    await nursery.start(_serve_cluster_admin, local, admin, say)
                task_status.started(local)
                if failover_every is None:
                    await trio.sleep_forever()
                for _ in itertools.count():
                    await trio.sleep(failover_every)
                    crashed = [i for i in (local.leader(), local.reverb_leader()) if i is not None]
                    if crashed:
                        local.failovers += 1
                        say(
                            f"crashing the leader {' and '.join(crashed)} "
                            f"(failover #{local.failovers})"
                        )
                        for instance_id in crashed:
                            local.crash(instance_id)


@dataclass(frozen=True)
class _AdminSettings:
    bind: str
    token: str | None
    allowed_hosts: Sequence[str]
    event_streams: int


async def _serve_cluster_admin(
    local: LocalCluster,
    admin: _AdminSettings,
    say: Callable[[str], None],
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    # one admin server over every instance (live mappings: restarted instances show up), with a
    # connection of its own for /readyz, /bars and the dashboard at / (which shows hand-overs)
    from .._ops import serve_admin
    from .._ops.dashboard import Dashboard

    conn = ConnectionOptions(
        nats_url=local.urls,
        reconnect_delay=0.25,
        connect_attempts=3,
        name="backbeat-cluster-admin",
    )
    async with open_nats_transport(conn) as transport, trio.open_nursery() as nursery:
        dashboard = Dashboard(local.cluster_id, max_streams=admin.event_streams)
        await nursery.start(functools.partial(dashboard.run, transport, reverb=local.reverbs))
        bound = await nursery.start(
            functools.partial(
                serve_admin,
                admin.bind,
                pulse=local.pulses,
                reverb=local.reverbs,
                transport=transport,
                cluster_id=local.cluster_id,
                token=admin.token,
                fallback=dashboard,
                allowed_hosts=admin.allowed_hosts,
            )
        )
        mode = (
            "tempo changes need the token"
            if admin.token
            else "read-only: no token, see BACKBEAT_HTTP_TOKEN"
        )
        say(
            f"admin API on http://{bound}: /healthz /readyz /metrics /tempo /leader /bars "
            f"({mode}); dashboard at /"
        )
        task_status.started(bound)


def _rotated(urls: Sequence[str], by: int) -> list[str]:
    n = len(urls)
    return [urls[(i + by) % n] for i in range(n)]


def _reverb_config(
    base: HAPulseConfig, index: int, replicas: int, ttl: float, urls: list[str]
) -> ReverbConfig:
    from .._services.reverb import ReverbConfig

    return ReverbConfig(
        cluster_id=base.cluster_id,
        nats_url=urls,
        reverb_id=f"reverb-{index + 1}",
        beats_per_bar=base.beats_per_bar,
        allow_unsigned=True,
        replicas=replicas,
        ha=True,
        lease_ttl=max(ttl, 3 * base.jitter_tolerance),
        release_on_exit=False,
    )


def _reverb_runner(cfg: ReverbConfig) -> Callable[..., Awaitable[None]]:
    from .._services.reverb import run_reverb

    return functools.partial(run_reverb, cfg)


async def _instance_slot(
    local: LocalCluster,
    instance_id: str,
    start: Callable[..., Awaitable[None]],
    statuses: dict[str, Any],
    restart_delay: float,
    say: Callable[[str], None],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    # one pulse or reverb, restarted ``restart_delay`` after each crash
    started = False
    for run in itertools.count():  # one iteration per (re)start; ends only by cancellation
        scope = trio.CancelScope()
        local.scopes[instance_id] = scope
        with scope:
            async with trio.open_nursery() as nursery:
                try:
                    statuses[instance_id] = await nursery.start(start)
                except BackbeatError as exc:
                    say(f"{instance_id} could not start: {exc}")
                else:
                    if run:
                        say(f"{instance_id} restarted")
                if not started:
                    started = True
                    task_status.started()
        await trio.sleep(restart_delay)


async def _watch_publishers(
    local: LocalCluster,
    cfg: HAPulseConfig,
    what: str,
    subject: str,
    type_: type[BeatFrame] | type[BarReport],
    on_message: Callable[[int, Any, float], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    # follow ``subject`` on the cluster and hand on each message with its publisher's HLC node
    conn = ConnectionOptions(
        nats_url=local.urls,
        reconnect_delay=0.25,
        connect_attempts=3,
        name=f"backbeat-cluster-{what}",
    )
    async with open_nats_transport(conn) as transport:
        sub = await transport.subscribe(subject, buffer=4096)
        task_status.started()
        async for msg in sub.messages:
            try:
                item = decode(msg.data, type_)
                node = HLCStamp.parse(item.hlc).node
            except WireError:
                continue
            on_message(node, item, trio.current_time())


async def _watch_bars(
    local: LocalCluster,
    cfg: HAPulseConfig,
    say: Callable[[str], None],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    names = {node_id_for(f"reverb-{i}"): f"reverb-{i}" for i in range(1, 6)}
    last_node: int | None = None
    last_to: int | None = None

    def on_report(node: int, report: BarReport, now: float) -> None:
        nonlocal last_node, last_to
        if node != last_node:
            who = names.get(node, f"node {node:04x}")
            span = f"window {report.from_beat}-{report.to_beat}"
            if last_node is None:
                say(f"bars {span}: {who} publishes")
            else:
                say(f"bars {span}: {who} took over reporting (previous window ended {last_to})")
            last_node = node
        last_to = report.to_beat

    subject = bar_subject(cfg.cluster_id)
    await _watch_publishers(
        local, cfg, "bars", subject, BarReport, on_report, task_status=task_status
    )


async def _watch_beats(
    local: LocalCluster,
    cfg: HAPulseConfig,
    first_beat: trio.Event,
    say: Callable[[str], None],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    names = {node_id_for(f"pulse-{i}"): f"pulse-{i}" for i in range(1, 10)}
    last_node: int | None = None
    last_at = 0.0
    last_index: int | None = None

    def on_frame(node: int, frame: BeatFrame, now: float) -> None:
        nonlocal last_node, last_at, last_index
        if node != last_node:
            who = names.get(node, f"node {node:04x}")
            if last_node is None:
                say(f"beat {frame.beat_index}: {who} leads")
            else:
                say(
                    f"beat {frame.beat_index}: {who} took over after a {now - last_at:.3f} s "
                    f"gap (previous beat {last_index})"
                )
            last_node = node
            first_beat.set()
        last_at, last_index = now, frame.beat_index

    subject = beat_subject(cfg.cluster_id)
    await _watch_publishers(
        local, cfg, "watch", subject, BeatFrame, on_frame, task_status=task_status
    )
