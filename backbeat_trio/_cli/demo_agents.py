"""The demo's simulated agents: each a real :func:`~backbeat_trio.open_client` over NATS.

Their lives differ so that every issue the reverb knows shows up within a few bars:

* ``finisher`` plans, executes over a few beats, goes to review and is ``done``;
* ``failer`` starts, then claims ``failed`` with notes (the ``failed`` issue);
* two ``waiter`` agents wait on each other, ``wait_for=["agent://<peer>"]`` (``deadlock``);
* ``overrunner`` works under ``client.fail_after_beats(n)`` for longer than ``n`` beats, catches
  :class:`~backbeat_trio.BeatBudgetExceeded`, reports it (``overrun``) and finishes late;
* from the sixth agent on: a ``staller`` that goes silent mid-task (``stalled``), then finishers;
* an ``impostor`` who is not on the keyring sends one signed claim; the reverb rejects it.

:func:`simulate_agent` is the reusable part (benchmarks drive many agents with it);
:func:`demo_cast` is the demo's cast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import trio

from .._client.client import Client, open_client
from .._client.config import Config
from .._core.beats import validate_id
from .._core.wire import BeatFrame, StatusClaim
from .._errors import BeatBudgetExceeded, ConfigError
from .._util.channel import DropOldestChannel

__all__ = ["AgentLife", "AgentView", "Role", "demo_cast", "simulate_agent"]

Role = Literal["finisher", "failer", "waiter", "overrunner", "staller", "impostor"]

_NAMES: Final = ("ada", "bob", "cyd", "dot", "eno", "fay", "gus", "hal", "ivy", "jon", "kai")
_MAX_AGENTS: Final = 64


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
