"""One judgement of the beat for every client of a connection: :class:`BeatJudge`.

Clients with equal beat settings on one connection hear the same frames at the same moment, so
what to make of a frame is decided once: the judge screens it (size, decoding, cluster), judges
it against the clock offset the earlier frames established, merges its HLC stamp, feeds the tempo
estimate, and keeps the local metronome that takes over when the pulse goes silent. Each client
(a *member*) keeps only what is its own: its channels and callbacks, its beat budgets, its claims
and the view of the judge's counters since it joined.

* The judge is the ``prepare`` step of the connection's shared subscription to the beat subject
  (:mod:`backbeat_trio._transport.shared`), keyed by every setting that changes a judgement. Over
  NATS it runs as nats-py parses the frame; the memory transport runs it one scheduler hop after
  the publish, as a network would. A client alone on its connection is a judge's only member:
  the same path.
* The metronome is one task, run in the nursery of the member that keeps it. When that member
  leaves, the task ends and another member's nursery runs a new one (the state is the tracker's,
  not the task's).
* Silence is verified before the first beat of a degraded episode is made up: the alarm rang,
  so the judge asks the server for a round trip (a PING). Every frame the server sent before
  its PONG is judged before the PONG is; when a frame arrived meanwhile (on time or not), the
  process was busy, not the pulse silent. A busy process (a thousand clients joining, a long
  garbage collection) thus never makes up a beat the pulse is still sending.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

from .._core.beats import beat_subject
from .._core.hlc import HLC
from .._core.intake import DELIVERED, REFUSED, BeatTracker, FrameScreen
from .._core.metrics import MAX_RECENT_ERRORS, ClientMetrics, ErrorLog
from .._errors import BackbeatError, NotConnected
from .._util.sleep import SPIN_S, precise_clock

if TYPE_CHECKING:
    from .._core.wire import BeatFrame
    from .._transport.base import Transport
    from .._transport.shared import SharedSubscription
    from .config import Config

__all__ = [
    "SILENCE_CHECK_S",
    "SUBSCRIBED_WAIT_S",
    "BeatJudge",
    "Member",
    "MemberCounts",
    "judge_key",
    "leave_subscription",
    "mirror",
    "no_beat_hint",
]

log = logging.getLogger("backbeat_trio.client")

SUBSCRIBED_WAIT_S = 2.0
"""How long the first member waits for the server to confirm the beat subscription."""

SILENCE_CHECK_S = 1.0
"""How long the judge waits for the server's answer to its silence check before it takes the
quiet for silence (a server that answers no PING cannot be passing frames on either)."""

#: the counters the judge keeps for its members (a member's are the judge's since it joined)
JUDGED = (
    "beats",
    "downbeats",
    "degraded_beats",
    "degraded_episodes",
    "resyncs",
    "forward_jumps",
    "beats_skipped",
    "stale",
    "implausible",
    "duplicate_or_old",
)
#: the counters the screen keeps (refused before any judgement)
SCREENED = ("malformed", "oversized", "wrong_cluster")


def no_beat_hint(cluster_id: str, seconds: float) -> str:
    """What a client says when no beat came in the ``seconds`` after it started (and what
    ``backbeat-trio health`` and ``tail`` say for the same silence)."""
    return (
        f"no beat on {beat_subject(cluster_id)} in the {seconds:g} s since connecting: check "
        f"that {cluster_id!r} is the cluster id the pulse beats for and that a pulse is running "
        f"(a tempo under {60 / seconds:g} BPM is this quiet too)"
    )


def judge_key(config: Config, wall: Callable[[], float]) -> tuple[object, ...]:
    """What clients must agree on to share a judgement (the subscription's key)."""
    return (
        "beat",
        config.cluster_id,
        config.max_frame_bytes,
        config.jitter_tolerance,
        config.beats_per_bar,
        config.first_beat_warning,
        wall,
    )


class Member(Protocol):
    """What the judge needs of a client (:class:`~.client.Client`)."""

    _transport: Transport

    @property
    def _nursery(self) -> trio.Nursery | None: ...

    @property
    def agent_id(self) -> str: ...

    def _judged_beat(self, frame: BeatFrame) -> None:
        """A new beat: deliver it (channels, waiters) and move the budgets."""

    def _judged_move(self) -> None:
        """The schedule moved without a new beat: move the budgets."""

    def _judge_failed(self, exc: BaseException) -> None:
        """Handing this member a beat raised: it is no longer a member; end it with ``exc``."""


class BeatJudge:
    """The shared judgement of one connection's beat subject (see the module).

    Args:
        config: the settings every member shares (:func:`judge_key`).
        wall: the wall clock (POSIX seconds).

    Attributes:
        screen: refuses what every member would refuse alike (its counters are the connection's).
        tracker: the beat schedule, clock offset, tempo estimate and degradation of every member.
        judged: the judgement's counters (``beats`` delivered, ``stale``, ``degraded_beats``…).
        errors: the texts of the latest judgements that refused a frame or changed state.
        frames: frames the screen passed on.
        fresh: those of them for a beat after the last one judged (on time or not): what a
            silence check counts as the pulse still sending (a replayed old frame is not).
        silences: how many times the pulse was found silent (a degraded episode began).
        checks: how many silence checks (server round trips) the metronome made.
        busy: how many of them found frames arriving: a busy process, not a silent pulse.
        handovers: how many times the metronome passed to another member's nursery.
        keeper: the agent id of the member whose nursery runs the metronome, or None.
        confirmed: whether the server confirmed the subscription (a PONG after it).
        no_beat_warned: whether the judge warned that no beat came since it started.
    """

    __slots__ = (
        "_confirming",
        "_keeper",
        "_metronome",
        "_sleep",
        "_wake",
        "_wall",
        "busy",
        "checks",
        "cluster_id",
        "confirmed",
        "errors",
        "first_beat_warning",
        "frames",
        "fresh",
        "handovers",
        "judged",
        "members",
        "no_beat_warned",
        "screen",
        "silences",
        "started",
        "tracker",
        "version",
    )

    def __init__(self, config: Config, wall: Callable[[], float]) -> None:
        self.cluster_id = config.cluster_id
        self.first_beat_warning = config.first_beat_warning
        self._wall = wall
        self.screen = FrameScreen(config.cluster_id, config.max_frame_bytes)
        self.judged = ClientMetrics()
        self.errors = ErrorLog(self.judged)
        self.tracker = BeatTracker(
            cluster_id=config.cluster_id,
            beats_per_bar=config.beats_per_bar,
            jitter_tolerance=config.jitter_tolerance,
            max_frame_bytes=config.max_frame_bytes,
            # made-up frames are stamped by the judge's own node, not by one of its members
            hlc=HLC(f"backbeat-local:{config.cluster_id}"),
            errors=self.errors,
        )
        # replaced, never mutated: a delivery iterates the tuple it read while members leave
        self.members: tuple[Member, ...] = ()
        self.frames = 0
        self.fresh = 0
        # bumped by whatever changes a counter other than a plain next beat's: members bring
        # their view of the counters along when it moved (a plain beat they count themselves)
        self.version = 0
        self.silences = 0
        self.checks = 0
        self.busy = 0
        self.handovers = 0
        self.confirmed = False
        self.no_beat_warned = False
        self.started = trio.current_time()
        self._keeper: Member | None = None
        self._confirming: trio.Event | None = None  # the first member's confirming flush
        self._metronome: trio.CancelScope | None = None
        self._sleep: trio.CancelScope | None = None  # the metronome's sleep, moved by frames
        self._wake = trio.Event()  # set when the first frame arrives

    def __repr__(self) -> str:
        t = self.tracker
        return (
            f"<BeatJudge {self.cluster_id} members={len(self.members)} beat={t.last_index} "
            f"degraded={t.degraded} keeper={self.keeper} silences={self.silences} "
            f"refused={self.refused}>"
        )

    @property
    def keeper(self) -> str | None:
        """The agent id of the member whose nursery runs the metronome."""
        keeper = self._keeper
        return None if keeper is None else keeper.agent_id

    @property
    def watching(self) -> bool:
        """Whether a metronome runs (it does while any member is in the judge)."""
        return self._metronome is not None

    @property
    def metrics(self) -> ClientMetrics:
        """The screen's counters (refusals, and ``beats`` passed on to judgement)."""
        return self.screen.metrics

    @property
    def refused(self) -> int:
        """Payloads the screen refused so far."""
        return self.screen.refused

    # ------------------------------------------------------------------ frames in
    def __call__(self, data: bytes) -> None:
        """Judge one payload on the beat subject (the shared subscription's ``prepare``) and
        hand what follows from it to every member. Returns None: nothing goes to members'
        channels. A failure of the judgement itself (a bug, a wall clock that raises) ends
        every member with it: none of them could keep time any more."""
        try:
            self._judge(data)
        except Exception as exc:
            log.exception("judging a beat frame on %s failed; ending its clients", self.cluster_id)
            for member in self.members:
                self._drop(member, exc)

    def _judge(self, data: bytes) -> None:
        now = trio.current_time()
        screened = self.screen(data, now, self._wall())
        if screened is None:
            self.version += 1
            return
        self.frames += 1
        tracker = self.tracker
        last, degraded = tracker.last_index, tracker.degraded
        frame = screened.frame
        if last is None or frame.beat_index > last:
            self.fresh += 1
        outcome = tracker.accept(
            frame, now, screened.arrived_wall, screened.stamp, screened.start_ts
        )
        if outcome != DELIVERED or degraded or (last is not None and frame.beat_index != last + 1):
            self.version += 1
        if outcome == REFUSED:
            return
        if outcome == DELIVERED:
            for member in self.members:
                try:
                    member._judged_beat(frame)
                except Exception as exc:  # that member's bug: it alone leaves
                    self._drop(member, exc)
        else:
            for member in self.members:
                try:
                    member._judged_move()
                except Exception as exc:
                    self._drop(member, exc)
        self._rearm()

    def _drop(self, member: Member, exc: Exception) -> None:
        log.error("handing a beat to %s raised %r; it leaves", member.agent_id, exc)
        self._remove(member)
        member._judge_failed(exc)

    def _rearm(self) -> None:
        """The schedule moved: move the metronome's sleep (it is not woken)."""
        sleep = self._sleep
        if sleep is None:
            self._wake.set()
            return
        tracker = self.tracker
        spin = SPIN_S if tracker.degraded and precise_clock() else 0.0
        sleep.deadline = tracker.alarm() - spin

    # ------------------------------------------------------------------ members
    async def confirm(self, transport: Transport) -> None:
        """Until the server confirmed the subscription (a bounded while; once per judge), so
        that when ``open_client``'s block starts a frame published from anywhere reaches the
        client. Not connected, the subscription is the connection's to renew when it reconnects;
        a server too slow to answer holds up no client's start."""
        if self.confirmed:
            return
        confirming = self._confirming
        if confirming is not None:  # another member asked already: its answer does for all
            await confirming.wait()
            return
        self._confirming = confirming = trio.Event()
        try:
            with trio.move_on_after(SUBSCRIBED_WAIT_S) as waited:
                await transport.flush()
        except NotConnected as exc:
            log.debug("subscribed while not connected (%s): the reconnect renews it", exc)
            return
        finally:
            self._confirming = None
            confirming.set()
        self.confirmed = not waited.cancelled_caught
        if waited.cancelled_caught:
            log.debug("the server did not confirm the beat subscription in %s s", SUBSCRIBED_WAIT_S)

    def recent_errors(self, own: ErrorLog) -> list[str]:
        """The latest error texts of the judge (screen and judgement) and a member's ``own``."""
        texts = [*self.screen.errors.recent, *self.errors.recent, *own.recent]
        return texts[-MAX_RECENT_ERRORS:]

    def join(self, member: Member) -> None:
        """Take ``member`` in; the first one's nursery runs the metronome."""
        self.members = (*self.members, member)
        if self._metronome is None:
            self._start_metronome()

    def leave(self, member: Member) -> None:
        """``member`` leaves; when it kept the metronome, another member's nursery takes it."""
        self._remove(member)

    def _remove(self, member: Member) -> None:
        if member not in self.members:
            return
        self.members = tuple(m for m in self.members if m is not member)
        if self._keeper is member:
            scope = self._metronome
            self._keeper = self._metronome = None
            if scope is not None:
                scope.cancel()
            if self.members:
                self.handovers += 1
                self._start_metronome()

    def _start_metronome(self) -> None:
        for member in self.members:
            nursery = member._nursery
            if nursery is None:
                continue
            # shielded: cancelling the keeper's block must not stop the metronome of every
            # member; it ends when the keeper leaves the judge (its ``open_client`` makes sure)
            scope = trio.CancelScope(shield=True)
            nursery.start_soon(self._run_metronome, scope, name=f"metronome:{self.cluster_id}")
            self._keeper, self._metronome = member, scope
            return

    # ------------------------------------------------------------------ the metronome
    async def _run_metronome(self, scope: trio.CancelScope) -> None:
        with scope:
            await self._first_beat()
            await self._keep_time()

    async def _first_beat(self) -> None:
        """Until the first frame; warns once if none comes in ``first_beat_warning`` seconds."""
        tracker = self.tracker
        quiet = self.first_beat_warning
        while tracker.last_index is None:
            if quiet is None or self.no_beat_warned:
                await self._wake.wait()
                continue
            due = self.started + quiet
            with trio.move_on_at(due):
                await self._wake.wait()
            if tracker.last_index is not None:
                break
            keeper = self._keeper
            if keeper is not None and keeper._transport.connected:
                self._warn_no_first_beat(quiet)
            else:  # disconnected, silence says nothing about the cluster: ask again later
                self.started = trio.current_time()
        if self.no_beat_warned:
            log.info(
                "first beat on %s, %.1f s after the first client started",
                beat_subject(self.cluster_id),
                trio.current_time() - self.started,
            )

    def _warn_no_first_beat(self, seconds: float) -> None:
        hint = no_beat_hint(self.cluster_id, seconds)
        self.errors.note(hint)
        self.version += 1
        self.no_beat_warned = True
        log.warning("%s", hint)

    async def _keep_time(self) -> None:
        tracker = self.tracker
        spin = SPIN_S if precise_clock() else 0.0
        while True:
            # Sleep until the alarm; frames move it (``_rearm``) without waking this task.
            with trio.CancelScope() as sleep:
                sleep.deadline = tracker.alarm() - (spin if tracker.degraded else 0.0)
                self._sleep = sleep
                try:
                    await trio.sleep_forever()
                finally:
                    if self._sleep is sleep:  # (a successor's metronome may have its own now)
                        self._sleep = None
            due = tracker.next_due
            if tracker.degraded:
                # the last stretch: yield until the beat (trio's sleeps wake a little late),
                # unless a frame moves the schedule meanwhile
                while tracker.next_due == due:
                    remaining = tracker.alarm() - trio.current_time()
                    if remaining <= 0 or remaining > spin:
                        break
                    await trio.lowlevel.checkpoint()
            if tracker.next_due != due or not tracker.synthesis_due(trio.current_time()):
                continue  # the schedule moved: sleep to the new alarm
            if not tracker.degraded and not await self._silent():
                continue
            if tracker.next_due != due:
                continue
            if not tracker.degraded:
                self.silences += 1
            # beats whose whole duration passed while the check waited are skipped (counted),
            # never made up in a burst (as the pulse skips a beat it is too late for)
            passed = int((trio.current_time() - due) // (60.0 / tracker.tempo_bpm))
            frame = tracker.synthesise(due, self._wall(), skip=max(0, passed))
            self.version += 1
            for member in self.members:
                try:
                    member._judged_beat(frame)
                except Exception as exc:
                    self._drop(member, exc)

    async def _silent(self) -> bool:
        """The alarm rang on a healthy pulse: ask the server for a round trip and say whether
        the quiet is the pulse's (no frame for a new beat arrived meanwhile) rather than this
        process's. A frame for a beat already judged (a replay, a duplicate) is no sign of a
        live pulse: a peer replaying old frames cannot keep the members from keeping time."""
        keeper = self._keeper
        seen = self.fresh
        self.checks += 1
        if keeper is not None:
            try:
                with trio.move_on_after(SILENCE_CHECK_S):
                    await keeper._transport.flush()
            except BackbeatError as exc:  # no connection: the pulse cannot reach us either
                log.debug("silence check on %s: %r", self.cluster_id, exc)
        if self.fresh != seen:
            self.busy += 1
            log.debug(
                "beat alarm rang while frames were still arriving on %s: busy, not silent",
                self.cluster_id,
            )
            return False
        return True

    # ------------------------------------------------------------------ members' counters
    def counts(self) -> tuple[int, ...]:
        """The judged and screened counters and the error count, in the order a member's view
        subtracts them (:data:`JUDGED`, :data:`SCREENED`, errors)."""
        m, s = self.judged, self.screen.metrics
        return (
            *(getattr(m, name) for name in JUDGED),
            *(getattr(s, name) for name in SCREENED),
            m.errors + s.errors,
        )


async def leave_subscription(member: SharedSubscription[None]) -> None:
    """Leave the shared subscription (shielded, bounded): the last member's leaving ends it."""
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        await member.unsubscribe()


class MemberCounts:
    """A member's view of the judge's counters: the judge's since the member joined, written
    into the member's own :class:`ClientMetrics` when it is read, and with a beat whenever the
    judge counted more than a plain next beat since (a kept metrics object sees every counter
    move as it did when each client judged for itself).

    Attributes:
        left: the member is out of the judge: its counters stay where they are.
    """

    __slots__ = ("_base", "_errors_shown", "_judge", "_metrics", "_version", "left")

    def __init__(self, judge: BeatJudge, metrics: ClientMetrics) -> None:
        self._judge = judge
        self._metrics = metrics
        self.left = False
        self.start()

    def __repr__(self) -> str:
        return f"<MemberCounts of {self._judge!r} left={self.left}>"

    def start(self) -> None:
        """Count from here: what the judge counted before is not the member's."""
        judge = self._judge
        self._base = judge.counts()
        self._version = judge.version
        self._errors_shown = 0

    def beat(self, frame: BeatFrame) -> None:
        """The member was handed ``frame``."""
        if self._judge.version != self._version:
            self.mirror()  # not a plain next beat: bring every counter along
        else:
            m = self._metrics
            m.beats += 1
            if frame.downbeat:
                m.downbeats += 1

    def mirror(self) -> None:
        """Write the judge's counters since the member joined into its metrics."""
        if self.left:
            return
        judge, m = self._judge, self._metrics
        self._version = judge.version
        since = mirror(judge, self._base, m)
        m.errors += since - self._errors_shown  # (the member's own errors are counted there)
        self._errors_shown = since

    def stop(self) -> None:
        """The member leaves: bring the counters along one last time, then keep them."""
        self.mirror()
        self.left = True


def mirror(judge: BeatJudge, base: tuple[int, ...], into: ClientMetrics) -> int:
    """Write the judge's counters since ``base`` into ``into``; returns the error count since
    ``base`` (the caller adds its own errors)."""
    now = judge.counts()
    names = (*JUDGED, *SCREENED)
    for i, name in enumerate(names):
        setattr(into, name, now[i] - base[i])
    return now[-1] - base[-1]
