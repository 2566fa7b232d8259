"""``backbeat-trio demo``: a whole BACKBEAT cluster in one process, with zero set-up.

An embedded nats-server, a pulse, a reverb that verifies signatures, and a cast of simulated
agents (:mod:`.demo_agents`), each a real :func:`~backbeat_trio.open_client` over NATS with its own
ed25519 key (made in memory and put on the reverb's keyring).

:func:`run_demo` wires up the cluster, keeps a :class:`DemoState` and feeds a :class:`DemoView`
(see :mod:`.demo_views`: a line per beat and per bar report, or a ``rich`` live table).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Final, Protocol

import trio
from nacl.signing import SigningKey

from .._client.client import Client, open_client
from .._client.config import Config
from .._core.beats import validate_beats_per_bar, validate_id, validate_tempo
from .._core.signing import Keyring, generate_signing_key
from .._core.wire import BarReport, BeatFrame
from .._embedded import open_embedded_nats
from .._errors import ConfigError, UndeliveredClaims
from .._services.pulse import PulseConfig, PulseStatus, run_pulse
from .._services.reverb import ReverbConfig, ReverbStatus, run_reverb
from .._util.channel import DropOldestChannel
from .demo_agents import AgentLife, AgentView, demo_cast, simulate_agent

__all__ = [
    "EXPECTED_ISSUES",
    "DemoOptions",
    "DemoState",
    "DemoView",
    "IssueSeen",
    "run_demo",
]

#: The issue kinds the default cast is there to show (the summary says which were seen).
EXPECTED_ISSUES: Final = ("deadlock", "failed", "overrun")

_IMPOSTOR_ID: Final = "mallory"
_PULSE_LEAD_S: Final = 0.1
_AGENT_GRACE_S: Final = 3.0


# --- the whole cluster ---------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """How the demo runs.

    Args:
        bars: stop after this many bar reports; None runs until cancelled.
        tempo_bpm: the pulse's tempo.
        agents: the number of simulated agents (5 or more).
        beats_per_bar: the bar length.
        cluster_id: the cluster the demo runs.
        impostor: also run an agent that is not on the keyring (its claim is rejected).

    Raises:
        ConfigError: a value is out of range.
    """

    bars: int | None = 4
    tempo_bpm: int = 240
    agents: int = 5
    beats_per_bar: int = 4
    cluster_id: str = "demo"
    impostor: bool = True

    def __post_init__(self) -> None:
        if self.bars is not None and (
            isinstance(self.bars, bool) or not isinstance(self.bars, int) or self.bars < 1
        ):
            raise ConfigError("bars", f"must be an int >= 1, got {self.bars!r}")
        validate_tempo(self.tempo_bpm)
        validate_beats_per_bar(self.beats_per_bar)
        validate_id("cluster_id", self.cluster_id)
        demo_cast(self.agents)


@dataclass
class IssueSeen:
    """One issue (kind, agent) across the bar reports it appeared in."""

    kind: str
    agent_id: str
    detail: str
    first_bar: int
    last_bar: int
    reports: int = 1

    @property
    def bars_text(self) -> str:
        """``bar 3`` or ``bars 1-4``."""
        if self.first_bar == self.last_bar:
            return f"bar {self.first_bar}"
        return f"bars {self.first_bar}-{self.last_bar}"


@dataclass
class DemoState:
    """Everything the views show, kept up to date by :func:`run_demo` (readable after it ends)."""

    options: DemoOptions
    agents: list[AgentView] = field(default_factory=list)
    impostor: AgentView | None = None
    nats_url: str = ""
    pulse: PulseStatus | None = None
    reverb: ReverbStatus | None = None
    observer: Client | None = None
    frame: BeatFrame | None = None
    beats_seen: int = 0
    measured_bpm: float = 0.0
    bars_seen: int = 0
    latest_report: BarReport | None = None
    issues: dict[tuple[str, str], IssueSeen] = field(default_factory=dict)
    completed: bool = False
    web_url: str = ""

    def bar_of(self, beat_index: int) -> int:
        """The 1-based bar number of a beat."""
        return beat_index // self.options.beats_per_bar + 1

    def record_report(self, report: BarReport) -> None:
        """Fold one bar report into :attr:`issues`."""
        self.bars_seen += 1
        self.latest_report = report
        bar = self.bar_of(report.from_beat)
        for issue in report.issues:
            key = (issue.kind, issue.agent_id)
            seen = self.issues.get(key)
            if seen is None:
                self.issues[key] = IssueSeen(issue.kind, issue.agent_id, issue.detail, bar, bar)
            else:
                seen.last_bar = bar
                seen.reports += 1


class DemoView(Protocol):
    """What :func:`run_demo` tells as the demo runs."""

    def started(self, state: DemoState) -> None:
        """The cluster is up; beats are about to start."""

    def beat(self, state: DemoState, frame: BeatFrame) -> None:
        """A beat arrived (``state.frame`` is it)."""

    def report(self, state: DemoState, report: BarReport) -> None:
        """A bar report arrived (already folded into ``state``)."""


async def run_demo(
    options: DemoOptions | None = None,
    *,
    view: DemoView | None = None,
    state: DemoState | None = None,
    stop: trio.Event | None = None,
    web: str | None = None,
    web_any_port_if_busy: bool = False,
) -> DemoState:
    """Run the demo cluster: embedded nats-server, pulse, signing reverb and simulated agents.

    Args:
        options: how to run (defaults: 4 bars at 240 BPM, 5 agents).
        view: told about start-up, every beat and every bar report.
        state: the state to fill in (pass one to read it even if the demo is cancelled).
        stop: end the demo early, as cleanly as at the end (``state.completed`` stays False).
        web: also serve the live dashboard at this loopback ``"HOST:PORT"`` (its URL goes in
            ``state.web_url`` before ``view.started``); needs the ``ops`` extra.
        web_any_port_if_busy: serve it on any free port when ``web``'s port is taken.

    Returns:
        The state, with ``completed`` set, once ``options.bars`` bar reports have arrived (with
        ``bars=None``: once ``stop`` is set).

    Raises:
        EmbeddedServerError: the nats-server did not start.
        NotConnected: a component could not connect.
        ConfigError: ``web`` is not a free loopback address, or the ``ops`` extra is missing.
    """
    options = options or DemoOptions()
    if state is None:
        state = DemoState(options)
    cast = demo_cast(options.agents)
    keys = {life.agent_id: generate_signing_key() for life in cast}
    keyring = Keyring({agent_id: key.verify_key for agent_id, key in keys.items()})
    state.agents = [AgentView(life.agent_id, life.role) for life in cast]
    cluster = options.cluster_id
    bpb = options.beats_per_bar

    def agent_config(agent_id: str, key: SigningKey) -> Config:
        return Config(
            cluster_id=cluster,
            agent_id=agent_id,
            nats_url=state.nats_url,
            signing_key=key,
            beats_per_bar=bpb,
        )

    async with open_embedded_nats() as url, trio.open_nursery() as services:
        state.nats_url = url
        state.reverb = await services.start(
            run_reverb,
            ReverbConfig(cluster_id=cluster, nats_url=url, keyring=keyring, beats_per_bar=bpb),
        )
        pulses: dict[str, PulseStatus] = {}  # the admin server's view; the pulse starts later
        if web is not None:
            from .demo_web import serve_demo_dashboard

            state.web_url = await services.start(
                functools.partial(
                    serve_demo_dashboard,
                    url,
                    cluster,
                    bpb,
                    web,
                    reverb=state.reverb,
                    pulses=pulses,
                    any_port_if_busy=web_any_port_if_busy,
                )
            )
        observer_cfg = Config(
            cluster_id=cluster,
            agent_id="demo-view",
            nats_url=url,
            beats_per_bar=bpb,
            jetstream=False,
        )
        async with open_client(observer_cfg) as observer:
            state.observer = observer
            beats = observer.beats()
            agents_stop = trio.Event()
            async with trio.open_nursery() as agents:
                async with trio.open_nursery() as connecting:
                    for life, agent_view in zip(cast, state.agents, strict=True):
                        cfg = agent_config(life.agent_id, keys[life.agent_id])
                        connecting.start_soon(_start, agents, cfg, life, agent_view, agents_stop)
                    if options.impostor:
                        life = AgentLife(agent_id=_IMPOSTOR_ID, role="impostor")
                        state.impostor = AgentView(life.agent_id, life.role)
                        cfg = agent_config(life.agent_id, generate_signing_key())  # not trusted
                        connecting.start_soon(
                            _start, agents, cfg, life, state.impostor, agents_stop
                        )
                pulse_cfg = PulseConfig(
                    cluster_id=cluster,
                    nats_url=url,
                    tempo_bpm=options.tempo_bpm,
                    beats_per_bar=bpb,
                    pulse_id="demo-pulse",
                )
                state.pulse = await services.start(
                    functools.partial(run_pulse, pulse_cfg, lead=_PULSE_LEAD_S)
                )
                pulses[pulse_cfg.pulse_id] = state.pulse
                if view is not None:
                    view.started(state)
                finish = trio.Event()
                services.start_soon(_follow_beats, beats, state, view)
                services.start_soon(_follow_reports, state, view, finish)
                if stop is not None:
                    services.start_soon(_set_when_set, stop, finish)
                await finish.wait()
                state.completed = stop is None or not stop.is_set()
                # Agents end at their next step and close normally (delivering what they
                # queued) while the pulse still beats; the bound is for a stuck one.
                agents_stop.set()
                agents.cancel_scope.deadline = trio.current_time() + _AGENT_GRACE_S
            services.cancel_scope.cancel()
    return state


async def _set_when_set(source: trio.Event, target: trio.Event) -> None:
    await source.wait()
    target.set()


async def _start(
    nursery: trio.Nursery, config: Config, life: AgentLife, view: AgentView, stop: trio.Event
) -> None:
    await nursery.start(functools.partial(_run_agent, config, life, view, stop))


async def _run_agent(
    config: Config,
    life: AgentLife,
    view: AgentView,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[AgentView] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await simulate_agent(config, life, view=view, stop=stop, task_status=task_status)
    except UndeliveredClaims as exc:
        # Stopping with the server gone (a terminal's Ctrl-C reaches it too) loses the last
        # claims; that is no failure of the demo. Before the stop it is one.
        view.undelivered = len(exc.claims)
        if not stop.is_set():
            raise


async def _follow_beats(
    beats: DropOldestChannel[BeatFrame], state: DemoState, view: DemoView | None
) -> None:
    async for frame in beats:
        state.frame = frame
        state.beats_seen += 1
        if state.observer is not None:
            state.measured_bpm = state.observer.measured_bpm
        if view is not None:
            view.beat(state, frame)


async def _follow_reports(state: DemoState, view: DemoView | None, done: trio.Event) -> None:
    reverb = state.reverb
    assert reverb is not None
    handled = 0
    while True:
        if reverb.reports == handled:
            await reverb.wait_for_report()
            continue
        fresh = min(reverb.reports - handled, len(reverb.history))
        handled = reverb.reports
        for report in list(reverb.history)[-fresh:] if fresh else []:
            state.record_report(report)
            if view is not None:
                view.report(state, report)
        bars = state.options.bars
        if bars is not None and state.bars_seen >= bars:
            done.set()
            return
