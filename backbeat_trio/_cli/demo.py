"""``backbeat-trio demo``: a whole BACKBEAT cluster in one process, with zero set-up.

An embedded nats-server, a pulse, a reverb that verifies signatures, and a cast of simulated
agents, each a real :func:`~backbeat_trio.open_client` over NATS with its own ed25519 key (made in
memory and put on the reverb's keyring). Their lives differ so that every issue the reverb knows
shows up within a few bars:

* ``finisher`` plans, executes over a few beats, goes to review and is ``done``;
* ``failer`` starts, then claims ``failed`` with notes (the ``failed`` issue);
* two ``waiter`` agents wait on each other, ``wait_for=["agent://<peer>"]`` (``deadlock``);
* ``overrunner`` works under ``client.fail_after_beats(n)`` for longer than ``n`` beats, catches
  :class:`~backbeat_trio.BeatBudgetExceeded`, reports it (``overrun``) and finishes late;
* from the sixth agent on: a ``staller`` that goes silent mid-task (``stalled``), then finishers;
* an ``impostor`` who is not on the keyring sends one signed claim; the reverb rejects it.

:func:`simulate_agent` is the reusable part (benchmarks drive many agents with it);
:func:`run_demo` wires up the cluster and feeds a view: :class:`PlainView` (a line per beat and
per bar report) or :class:`LiveView` (a ``rich`` live table).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Final, Literal, Protocol, Self, TextIO

import trio
from nacl.signing import SigningKey

from .._client.client import Client, UndeliveredClaims, open_client
from .._client.config import Config
from .._core.beats import validate_beats_per_bar, validate_id, validate_tempo
from .._core.signing import Keyring, generate_signing_key
from .._core.wire import BarReport, BeatFrame, StatusClaim
from .._embedded import open_embedded_nats
from .._errors import BeatBudgetExceeded, ConfigError
from .._services.pulse import PulseConfig, PulseStatus, run_pulse
from .._services.reverb import ReverbConfig, ReverbStatus, run_reverb
from .._util.channel import DropOldestChannel

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live

__all__ = [
    "EXPECTED_ISSUES",
    "AgentLife",
    "AgentView",
    "DemoOptions",
    "DemoState",
    "DemoView",
    "IssueSeen",
    "LiveView",
    "PlainView",
    "Role",
    "demo_cast",
    "format_summary",
    "run_demo",
    "simulate_agent",
]

Role = Literal["finisher", "failer", "waiter", "overrunner", "staller", "impostor"]

#: The issue kinds the default cast is there to show (the summary says which were seen).
EXPECTED_ISSUES: Final = ("deadlock", "failed", "overrun")

_NAMES: Final = ("ada", "bob", "cyd", "dot", "eno", "fay", "gus", "hal", "ivy", "jon", "kai")
_IMPOSTOR_ID: Final = "mallory"
_MAX_AGENTS: Final = 64
_PULSE_LEAD_S: Final = 0.1
_AGENT_GRACE_S: Final = 3.0


# --- one simulated agent -------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class AgentLife:
    """What a simulated agent does, beat by beat.

    Args:
        agent_id: the agent's id (also its client's ``agent_id``).
        role: its life (see the module docstring).
        peer: for a ``waiter``, the agent it waits for (``wait_for=["agent://<peer>"]``).
        task_id: the task its claims name (default ``<role>-<agent_id>``).
        work_beats: beats of work (``finisher``, ``overrunner``).
        budget_beats: the ``overrunner``'s beat budget (make it smaller than ``work_beats``).
        fail_at: the ``failer`` claims ``failed`` on this beat of its life.
        stall_at: the ``staller`` goes silent after this many beats.
    """

    agent_id: str
    role: Role
    peer: str | None = None
    task_id: str = ""
    work_beats: int = 6
    budget_beats: int = 3
    fail_at: int = 3
    stall_at: int = 3

    def __post_init__(self) -> None:
        validate_id("agent_id", self.agent_id)
        if self.role == "waiter":
            validate_id("peer", self.peer)
        for name in ("work_beats", "budget_beats", "fail_at", "stall_at"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be an int >= 1, got {value!r}")

    @property
    def task(self) -> str:
        """The task id its claims carry."""
        return self.task_id or f"{self.role}-{self.agent_id}"


@dataclass
class AgentView:
    """A simulated agent's own view of itself: what it last claimed (updated as it emits).

    Attributes:
        agent_id: the agent.
        role: its life.
        state: the state it last claimed (``starting`` before its first claim).
        progress: the progress it last claimed.
        beats_left: the beats left it last claimed.
        notes: the notes it last claimed.
        claims_sent: claims emitted.
        beats_seen: beats it received.
        last_beat: the beat index of its last claim.
        budget_exceeded: it caught :class:`~backbeat_trio.BeatBudgetExceeded`.
        finished: its life came to its end (not stopped or cancelled on the way).
        undelivered: claims its client could not deliver as it closed (demo only).
    """

    agent_id: str
    role: Role
    state: str = "starting"
    progress: float = 0.0
    beats_left: int = 0
    notes: str = ""
    claims_sent: int = 0
    beats_seen: int = 0
    last_beat: int | None = None
    budget_exceeded: bool = False
    finished: bool = False
    undelivered: int = 0


class _LifeOver(Exception):
    """The agent's ``max_beats`` ran out."""


@dataclass
class _Agent:
    client: Client
    beats: DropOldestChannel[BeatFrame]
    life: AgentLife
    view: AgentView
    max_beats: int | None

    async def next_beat(self) -> BeatFrame:
        if self.max_beats is not None and self.view.beats_seen >= self.max_beats:
            raise _LifeOver
        frame = await self.beats.receive()
        self.view.beats_seen += 1
        return frame

    async def emit(
        self,
        state: Literal["executing", "planning", "waiting", "review", "done", "failed"],
        progress: float,
        beats_left: int,
        notes: str = "",
        wait_for: Sequence[str] = (),
    ) -> StatusClaim:
        sent = await self.client.emit_status(
            StatusClaim(
                task_id=self.life.task,
                state=state,
                progress=round(min(max(progress, 0.0), 1.0), 4),
                beats_left=max(beats_left, 0),
                notes=notes,
                wait_for=list(wait_for),
            )
        )
        v = self.view
        v.state, v.progress, v.beats_left, v.notes = state, sent.progress, sent.beats_left, notes
        v.claims_sent += 1
        v.last_beat = sent.beat_index
        return sent


async def _live_finisher(a: _Agent) -> None:
    work = a.life.work_beats
    await a.next_beat()
    await a.emit("planning", 0.0, work + 1, "reading the ticket, planning the change")
    for step in range(1, work):
        await a.next_beat()
        await a.emit("executing", step / work, work + 1 - step, f"step {step} of {work - 1}")
    await a.next_beat()
    await a.emit("review", 0.9, 1, "waiting for the reviewer's approval")
    await a.next_beat()
    await a.emit("done", 1.0, 0, "merged")


async def _live_failer(a: _Agent) -> None:
    await a.next_beat()
    await a.emit("planning", 0.0, 6, "fetching the upstream schema")
    for step in range(1, a.life.fail_at):
        await a.next_beat()
        await a.emit("executing", 0.15 * step, 6 - step, "calling the upstream API")
    await a.next_beat()
    await a.emit(
        "failed", 0.15 * a.life.fail_at, 0, "upstream API answered HTTP 503 three times; giving up"
    )


async def _live_waiter(a: _Agent) -> None:
    peer = a.life.peer
    while True:
        await a.next_beat()
        await a.emit(
            "waiting", 0.5, 4, f"needs {peer}'s output to go on", wait_for=[f"agent://{peer}"]
        )


async def _live_overrunner(a: _Agent) -> None:
    budget, work = a.life.budget_beats, a.life.work_beats
    await a.next_beat()
    await a.emit(
        "planning", 0.0, budget, f"has a budget of {budget} beats for {work} beats of work"
    )
    done = 0
    try:
        with a.client.fail_after_beats(budget):
            while done < work:
                await a.next_beat()
                done += 1
                await a.emit(
                    "executing", 0.9 * done / work, budget - done, f"step {done} of {work}"
                )
    except BeatBudgetExceeded as exc:
        a.view.budget_exceeded = True
        note = f"overran: {exc} ({done} of {work} steps done); finishing late"
        await a.emit("executing", 0.9 * done / work, 0, note)
        while done < work:
            await a.next_beat()
            done += 1
            await a.emit("executing", 0.9 * done / work, 0, f"over budget: step {done} of {work}")
    await a.next_beat()
    late = " (late)" if a.view.budget_exceeded else ""
    await a.emit("done", 1.0, 0, f"finished{late}")


async def _live_staller(a: _Agent) -> None:
    await a.next_beat()
    await a.emit("planning", 0.0, 8, "starting a long export")
    for step in range(1, a.life.stall_at):
        await a.next_beat()
        await a.emit("executing", 0.1 * step, 8 - step, "exporting")
    a.view.notes = "(silent: stuck in a call that never returns)"
    while True:  # connected and following the beat, but never claims again
        await a.next_beat()


async def _live_impostor(a: _Agent) -> None:
    await a.next_beat()
    await a.next_beat()
    await a.emit("done", 1.0, 0, "trust me, everything is done")


_LIVES: Final[dict[Role, Callable[[_Agent], Awaitable[None]]]] = {
    "finisher": _live_finisher,
    "failer": _live_failer,
    "waiter": _live_waiter,
    "overrunner": _live_overrunner,
    "staller": _live_staller,
    "impostor": _live_impostor,
}


async def simulate_agent(
    config: Config,
    life: AgentLife,
    *,
    view: AgentView | None = None,
    max_beats: int | None = None,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[AgentView] = trio.TASK_STATUS_IGNORED,
) -> AgentView:
    """Connect as ``config.agent_id`` and live ``life``, one step per beat, emitting real claims.

    ``waiter`` and ``staller`` lives never end on their own: set ``stop``, pass ``max_beats``,
    or cancel the task. ``stop`` is the gentle way: the life ends where it is, and the client
    closes normally, delivering the claims it has queued (cancelling from outside cuts that
    delivery short).

    Args:
        config: the client's configuration (its ``agent_id`` should be ``life.agent_id``; give it
            a ``signing_key`` for a reverb that checks signatures).
        life: what the agent does.
        view: the :class:`AgentView` to keep up to date (a new one by default).
        max_beats: end the life after this many beats, whatever it was doing.
        stop: end the life as soon as this event is set.
        task_status: ``nursery.start`` gets the view once the client is connected and
            subscribed, so no beat is missed from then on.

    Returns:
        The view, once the life is over and its claims are delivered.

    Raises:
        NotConnected: the first connect failed, or claims could not be delivered.
    """
    if view is None:
        view = AgentView(life.agent_id, life.role)
    async with open_client(config) as client:
        agent = _Agent(client, client.beats(), life, view, max_beats)
        task_status.started(view)
        async with trio.open_nursery() as nursery:
            if stop is not None:
                nursery.start_soon(_cancel_when_set, stop, nursery.cancel_scope)
            with contextlib.suppress(_LifeOver):
                await _LIVES[life.role](agent)
            view.finished = True
            nursery.cancel_scope.cancel()
    return view


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def demo_cast(agents: int = 5) -> list[AgentLife]:
    """The demo's agents: finisher, failer, two waiters on each other, overrunner, then extras.

    Args:
        agents: how many (5 or more); the sixth is a ``staller``, later ones are finishers with
            varying amounts of work.

    Raises:
        ConfigError: fewer than 5 or more than 64 agents.
    """
    if isinstance(agents, bool) or not isinstance(agents, int) or not 5 <= agents <= _MAX_AGENTS:
        raise ConfigError("agents", f"the demo needs 5..{_MAX_AGENTS} agents, got {agents!r}")
    names = [_NAMES[i] if i < len(_NAMES) else f"agent-{i + 1}" for i in range(agents)]
    cast = [
        AgentLife(agent_id=names[0], role="finisher", work_beats=5),
        AgentLife(agent_id=names[1], role="failer", fail_at=4),
        AgentLife(agent_id=names[2], role="waiter", peer=names[3]),
        AgentLife(agent_id=names[3], role="waiter", peer=names[2]),
        AgentLife(agent_id=names[4], role="overrunner", budget_beats=3, work_beats=6),
    ]
    for i in range(5, agents):
        if i == 5:
            cast.append(AgentLife(agent_id=names[i], role="staller"))
        else:
            cast.append(AgentLife(agent_id=names[i], role="finisher", work_beats=4 + i % 5))
    return cast


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
) -> DemoState:
    """Run the demo cluster: embedded nats-server, pulse, signing reverb and simulated agents.

    Args:
        options: how to run (defaults: 4 bars at 240 BPM, 5 agents).
        view: told about start-up, every beat and every bar report.
        state: the state to fill in (pass one to read it even if the demo is cancelled).
        stop: end the demo early, as cleanly as at the end (``state.completed`` stays False).

    Returns:
        The state, with ``completed`` set, once ``options.bars`` bar reports have arrived (with
        ``bars=None``: once ``stop`` is set).

    Raises:
        EmbeddedServerError: the nats-server did not start.
        NotConnected: a component could not connect.
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


# --- text ----------------------------------------------------------------------------------------
def _percent(progress: float) -> str:
    return f"{progress * 100:.0f}%"


def _agent_brief(agent: AgentView) -> str:
    if agent.state in ("executing", "planning", "review"):
        return f"{agent.agent_id}={agent.state} {_percent(agent.progress)}"
    return f"{agent.agent_id}={agent.state}"


def _beat_line(state: DemoState, frame: BeatFrame) -> str:
    bpb = state.options.beats_per_bar
    measured = f"{state.measured_bpm:.1f}" if state.measured_bpm else "-"
    agents = "  ".join(_agent_brief(a) for a in state.agents)
    return (
        f"beat {frame.beat_index:>4}  bar {state.bar_of(frame.beat_index)} "
        f"{frame.beat_index % bpb + 1}/{bpb}  {frame.phase:<7}  {frame.tempo_bpm} BPM "
        f"(measured {measured})  {agents}"
    )


def _report_lines(state: DemoState, report: BarReport) -> list[str]:
    head = (
        f"bar {state.bar_of(report.from_beat)} report (beats {report.from_beat}-{report.to_beat}): "
        f"{report.agents_reporting} agents, {report.claims} claims, {report.rejected} rejected, "
        f"{report.late} late, mean progress {_percent(report.mean_progress)}"
    )
    if report.blocked:
        head += f", blocked: {', '.join(report.blocked)}"
    lines = [head]
    lines += [f"  ! {i.kind} {i.agent_id}: {i.detail}" for i in report.issues]
    if not report.issues:
        lines.append("  (no issues)")
    return lines


def format_summary(state: DemoState) -> list[str]:
    """The demo's closing summary, as plain text lines.

    Names every issue seen (the deadlock's cycle, the failure's agent and notes, the overrun) and
    says which of :data:`EXPECTED_ISSUES` never showed up.
    """
    opts = state.options
    how = "completed" if state.completed else "interrupted"
    measured = f", measured {state.measured_bpm:.1f} BPM" if state.measured_bpm else ""
    lines = [
        f"demo summary ({how}): {state.bars_seen} bars, {state.beats_seen} beats at "
        f"{opts.tempo_bpm} BPM{measured}, {len(state.agents)} agents",
    ]
    reverb = state.reverb
    if reverb is not None:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(reverb.rejection_reasons.items()))
        lines.append(
            f"claims: {reverb.claims_counted} counted, {reverb.rejected} rejected"
            + (f" ({reasons})" if reasons else "")
            + f", {reverb.claims_late} late"
        )
    if state.issues:
        lines.append("issues seen:")
        order = {kind: i for i, kind in enumerate(("deadlock", "failed", "overrun", "stalled"))}
        for issue in sorted(
            state.issues.values(), key=lambda i: (order.get(i.kind, 9), i.first_bar, i.agent_id)
        ):
            lines.append(
                f"  {issue.kind:<8} {issue.agent_id:<8} {issue.detail}  ({issue.bars_text})"
            )
    else:
        lines.append("issues seen: none")
    missing = [k for k in EXPECTED_ISSUES if not any(i.kind == k for i in state.issues.values())]
    if missing:
        lines.append(f"not seen (run more bars?): {', '.join(missing)}")
    lines.append("agents:")
    for a in state.agents:
        extra = " [beat budget exceeded]" if a.budget_exceeded else ""
        if a.undelivered:
            extra += f" [{a.undelivered} claim(s) undelivered at the stop]"
        lines.append(
            f"  {a.agent_id:<8} {a.role:<10} {a.state:<9} {_percent(a.progress):>4}  "
            f"{a.claims_sent} claims  {a.notes}{extra}".rstrip()
        )
    if state.impostor is not None:
        imp = state.impostor
        lines.append(
            f"  {imp.agent_id:<8} {imp.role:<10} sent {imp.claims_sent} claim(s) signed with a "
            f"key not on the keyring (rejected by the reverb)"
        )
    return lines


class PlainView:
    """Plain lines: one per beat, a few per bar report. For pipes, logs and ``--plain``.

    Args:
        out: where to write (flushed after every line).
    """

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def _write(self, lines: Iterable[str]) -> None:
        for line in lines:
            self._out.write(line + "\n")
        self._out.flush()

    def started(self, state: DemoState) -> None:
        """Print what runs where."""
        opts = state.options
        names = ", ".join(f"{a.agent_id} ({a.role})" for a in state.agents)
        self._write(
            [
                f"nats-server at {state.nats_url}; cluster {opts.cluster_id!r}; pulse at "
                f"{opts.tempo_bpm} BPM, {opts.beats_per_bar}/bar; reverb verifying signatures",
                f"agents: {names}",
            ]
        )

    def beat(self, state: DemoState, frame: BeatFrame) -> None:
        """Print one beat line."""
        self._write([_beat_line(state, frame)])

    def report(self, state: DemoState, report: BarReport) -> None:
        """Print the report and its issues."""
        self._write(_report_lines(state, report))

    def summary(self, state: DemoState) -> None:
        """Print the closing summary."""
        self._write(["", *format_summary(state)])


_STATE_STYLE: Final = {
    "starting": "dim",
    "planning": "cyan",
    "executing": "blue",
    "waiting": "yellow",
    "review": "magenta",
    "done": "green",
    "failed": "bold red",
}
_ISSUE_STYLE: Final = {
    "deadlock": "bold red",
    "failed": "red",
    "overrun": "yellow",
    "stalled": "magenta",
}


class LiveView:
    """A ``rich`` live view: beat, tempo, every agent's state and progress, the latest issues.

    Use it as a context manager around :func:`run_demo`; it redraws on every beat and report.

    Args:
        console: the ``rich`` console to draw on.
    """

    def __init__(self, console: Console) -> None:
        from rich.live import Live

        self.console = console
        self._state: DemoState | None = None
        self._live: Live = Live(
            console=console, auto_refresh=False, transient=False, redirect_stderr=False
        )

    def __enter__(self) -> Self:
        self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state is not None:
            self._live.update(self.render(self._state), refresh=True)
        self._live.__exit__(exc_type, exc, tb)

    def started(self, state: DemoState) -> None:
        """Draw the first frame."""
        self._state = state
        self._live.update(self.render(state), refresh=True)

    def beat(self, state: DemoState, frame: BeatFrame) -> None:
        """Redraw."""
        self._state = state
        self._live.update(self.render(state), refresh=True)

    def report(self, state: DemoState, report: BarReport) -> None:
        """Redraw."""
        self._state = state
        self._live.update(self.render(state), refresh=True)

    def render(self, state: DemoState) -> RenderableType:
        """The whole view, for the current state."""
        from rich import box
        from rich.console import Group
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        opts = state.options
        frame = state.frame
        head = Text()
        if frame is None:
            head.append("waiting for the first beat…", style="dim")
        else:
            bpb = opts.beats_per_bar
            head.append(f"bar {state.bar_of(frame.beat_index)}", style="bold")
            head.append(f"  beat {frame.beat_index % bpb + 1}/{bpb}", style="bold")
            head.append(f"  (#{frame.beat_index})  phase ")
            head.append(frame.phase, style="bold cyan")
            head.append(f"   tempo {frame.tempo_bpm} BPM")
            if state.measured_bpm:
                head.append(f" (measured {state.measured_bpm:.1f})", style="dim")
        reverb = state.reverb
        if reverb is not None:
            head.append(
                f"\nbar reports {state.bars_seen}"
                + (f"/{opts.bars}" if opts.bars else "")
                + f"   claims counted {reverb.claims_counted}   rejected {reverb.rejected}"
                f"   late {reverb.claims_late}"
            )
        header = Panel(
            head, title=f"BACKBEAT demo · cluster {opts.cluster_id}", subtitle=state.nats_url
        )

        agents = Table(box=box.SIMPLE_HEAD, expand=True)
        agents.add_column("agent", no_wrap=True)
        agents.add_column("life", no_wrap=True)
        agents.add_column("state", no_wrap=True)
        agents.add_column("progress", no_wrap=True)
        agents.add_column("left", justify="right", no_wrap=True)
        agents.add_column("claims", justify="right", no_wrap=True)
        agents.add_column("notes", ratio=1, no_wrap=True, overflow="ellipsis", min_width=12)
        for a in state.agents:
            progress = Table.grid(padding=(0, 1))
            progress.add_row(
                ProgressBar(total=1.0, completed=a.progress, width=12),
                Text(_percent(a.progress), justify="right"),
            )
            notes = a.notes + (" [budget exceeded]" if a.budget_exceeded else "")
            agents.add_row(
                Text(a.agent_id),
                a.role,
                Text(a.state, style=_STATE_STYLE.get(a.state, "")),
                progress,
                str(a.beats_left) if a.claims_sent else "",
                str(a.claims_sent),
                Text(notes),
            )

        issues = Table(box=box.SIMPLE_HEAD, expand=True, title_justify="left")
        report = state.latest_report
        issues.title = (
            "latest bar report: none yet"
            if report is None
            else f"issues in bar {state.bar_of(report.from_beat)}'s report "
            f"({report.claims} claims, {report.agents_reporting} agents)"
        )
        issues.add_column("issue", no_wrap=True)
        issues.add_column("agent", no_wrap=True)
        issues.add_column("detail", ratio=1)
        for issue in report.issues if report is not None else []:
            issues.add_row(
                Text(issue.kind, style=_ISSUE_STYLE.get(issue.kind, "")),
                Text(issue.agent_id),
                Text(issue.detail),
            )
        if report is not None and not report.issues:
            issues.add_row(Text("none", style="green"), "", "")
        return Group(header, agents, issues)

    def summary(self, state: DemoState) -> None:
        """Print the closing summary below the view."""
        from rich.text import Text

        self.console.print()
        for line in format_summary(state):
            style = ""
            stripped = line.lstrip()
            for kind, kind_style in _ISSUE_STYLE.items():
                if stripped.startswith(kind + " "):
                    style = kind_style
            self.console.print(Text(line, style=style))
