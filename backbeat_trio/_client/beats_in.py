"""Beats in, for :class:`~.client.Client`: the subscriber (frames taken in as the transport
parses them, alone or through the connection's shared subscription) and the tempo-sampler (the
local metronome that notices a silent pulse and keeps time alone)."""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import trio

from .._core.beats import beat_subject
from .._core.intake import (
    DELIVERED,
    REFUSED,
    BeatTracker,
    FrameScreen,
    IntakeOutcome,
    ScreenedFrame,
)
from .._core.metrics import ClientMetrics, ErrorLog
from .._errors import NotConnected
from .._transport.base import Message, Subscription, Transport
from .._transport.shared import SharedSubscription, SharingTransport
from .._util.sleep import SPIN_S, precise_clock
from .budgets import BeatBudgets
from .config import Config
from .fanout import BeatFanout
from .watch import BeatWatch

__all__ = ["BeatInput", "no_beat_hint"]

log = logging.getLogger("backbeat_trio.client")

#: how long a starting client waits for the server to confirm its beat subscription
SUBSCRIBED_WAIT_S = 2.0


def no_beat_hint(cluster_id: str, seconds: float) -> str:
    """What a client says when no beat came in the ``seconds`` after it started (and what
    ``backbeat-trio health`` and ``tail`` say for the same silence)."""
    return (
        f"no beat on {beat_subject(cluster_id)} in the {seconds:g} s since connecting: check "
        f"that {cluster_id!r} is the cluster id the pulse beats for and that a pulse is running "
        f"(a tempo under {60 / seconds:g} BPM is this quiet too)"
    )


class BeatInput:
    """The client's beat intake and metronome (a part of :class:`~.client.Client`, which sets
    these attributes up)."""

    config: Config
    _metrics: ClientMetrics
    _errors: ErrorLog
    _connected: bool
    _transport: Transport
    _tracker: BeatTracker
    _budgets: BeatBudgets
    _fanout: BeatFanout
    _wall: Callable[[], float]
    _beat_subject: str
    _share_beats: bool
    _wake_sampler: trio.Event
    _sampler_scope: trio.CancelScope | None
    _sampler_spin: float
    # the shared subscription's silence watch while this client is a member, and whether this
    # client's sampler waits on it (healthy: frames then cost this client no timer)
    _watch: BeatWatch | None = None
    _watched = False
    # the connection's FrameScreen while this client is a member, and its counts at joining
    _screen: FrameScreen | None = None
    _screen_base = (0, 0, 0)
    _screen_noted = 0  # the screen's error count when the counts were last mirrored

    def _mirror_screen(self) -> None:
        """Copy what the connection's shared subscription refused since this client joined into
        its own counters (read when they are read: no cost per refused frame per client)."""
        screen = self._screen
        if screen is None:
            return
        sm, m = screen.metrics, self._metrics
        self._screen_noted = sm.errors
        malformed, oversized, wrong_cluster = self._screen_base
        m.malformed = sm.malformed - malformed
        m.oversized = sm.oversized - oversized
        m.wrong_cluster = sm.wrong_cluster - wrong_cluster

    # ------------------------------------------------------------------ frames in
    def _intake(self, data: bytes, now: float) -> None:
        """Validate one raw beat payload and deliver it (or count why not)."""
        self._taken_in(self._tracker.intake(data, now, self._wall()))

    def _intake_screened(self, screened: ScreenedFrame) -> None:
        """Deliver one frame the connection's shared subscription already decoded and screened."""
        screen = self._screen
        if screen is not None and screen.metrics.errors != self._screen_noted:
            self._mirror_screen()  # junk arrived since the last frame: bring the counts along
        # the wall clock at the frame's arrival, unless this client was given a clock of its own
        wall = screened.arrived_wall if self._wall is time.time else self._wall()
        self._taken_in(
            self._tracker.accept(
                screened.frame, screened.arrived, wall, screened.stamp, screened.start_ts
            )
        )

    def _taken_in(self, outcome: IntakeOutcome) -> None:
        """The tracker judged a frame: a new beat goes out; either way the schedule moved."""
        if outcome != REFUSED:
            self._budgets.reproject()
            if outcome == DELIVERED:
                self._fanout.put(self._tracker.last_frame)  # type: ignore[arg-type]
            if not self._watched:
                self._rearm_sampler()
                return
        elif not self._watched:
            return
        # waiting on the shared watch: hand it this client's alarm, after a refusal too (the
        # watch must still hear when this client is due)
        self._watch.note_alarm(self._tracker.alarm())  # type: ignore[union-attr]

    def _rearm_sampler(self) -> None:
        """The schedule moved: move the sampler's own alarm (a sampler waiting on the shared
        watch is never here). A sleeping sampler is not woken (a healthy pulse then costs no
        sampler wake-up per beat) unless the alarm is now due."""
        tracker = self._tracker
        scope = self._sampler_scope
        if scope is None:
            self._wake_sampler.set()
        elif self._watch is not None and not tracker.degraded:
            scope.cancel()  # healthy again on a shared subscription: back to the shared watch
        else:
            scope.deadline = tracker.alarm() - self._spin()

    def _spin(self) -> float:
        """How long before a local beat the sampler stops sleeping and yields until it is due
        (trio's sleeps wake ~1 ms late). Only local beats need that precision, and only a client
        alone: while the pulse is healthy the alarm just notices its silence (a jitter tolerance
        late already), and the members of a shared subscription, a thousand of them spinning at
        once, would take the time the process needs to catch up with the pulse."""
        if self._tracker.degraded and self._watch is None:
            return self._sampler_spin
        return 0.0

    async def _heard_by_server(self) -> None:
        """Once subscribed, wait (a bounded while) for the server to answer a PING: when
        ``open_client``'s block starts, a frame published from anywhere reaches this client.
        Not connected, the subscription is the connection's to renew when it reconnects; a
        server too slow to answer holds up no client's start: nothing more to wait for."""
        try:
            with trio.move_on_after(SUBSCRIBED_WAIT_S) as waited:
                await self._transport.flush()
        except NotConnected as exc:
            log.debug("subscribed while not connected (%s): the reconnect renews it", exc)
            return
        if waited.cancelled_caught:
            log.debug(
                "the server did not confirm the beat subscription within %s s", SUBSCRIBED_WAIT_S
            )

    # ------------------------------------------------------------------ tasks
    async def _run_subscriber(self, *, task_status: trio.TaskStatus[None]) -> None:
        # Over NATS, frames are taken in as nats-py parses them: a beat then wakes its consumers
        # directly, one task hop sooner than through a channel read by this task. ``_intake``
        # is synchronous and never blocks.
        transport = self._transport
        intake = self._intake
        current_time = trio.current_time

        def handle(msg: Message) -> None:
            intake(msg.data, current_time())

        subscribe = transport.subscribe
        if _takes_keyword(subscribe, "handler"):
            sub = await subscribe(self._beat_subject, buffer=4096, handler=handle)
        else:  # a transport written before ``handler`` existed
            sub = await subscribe(self._beat_subject, buffer=4096)
        await self._heard_by_server()
        task_status.started()
        del task_status  # it holds trio's start-up nursery: let it go for the task's life
        try:
            # a transport that declines ``handler`` (MemoryTransport: it models a network hop)
            # delivers here instead: take those in the same way
            await self._take_from(sub, handle)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await sub.unsubscribe()

    async def _take_from(
        self, sub: Subscription | SharedSubscription[Any], take: Callable[[Any], None]
    ) -> None:
        """Take in what ``sub`` delivers through its channel (a transport that runs no handler
        inline), counting what the channel dropped; when it ends, raise its failure if any."""
        async for item in sub.messages:
            take(item)
            if sub.dropped:
                self._metrics.transport_dropped += sub.dropped
                sub.dropped = 0
        if sub.failure is not None:
            raise sub.failure

    def _subscriber(self) -> Callable[..., Any]:
        """The subscriber task for this client's transport: shared or its own subscription."""
        if self._share_beats and isinstance(self._transport, SharingTransport):
            return self._run_shared_subscriber
        return self._run_subscriber

    async def _run_shared_subscriber(self, *, task_status: trio.TaskStatus[None]) -> None:
        # One subscription per connection and cluster: the frame is decoded and screened once
        # (what is refused is counted by the connection's FrameScreen and reaches no client),
        # then each client's tracker judges it against its own clock, schedule and channels.
        config = self.config
        transport = self._transport
        assert isinstance(transport, SharingTransport)
        sub = await transport.subscribe_shared(
            self._beat_subject,
            key=("beat", config.cluster_id, config.max_frame_bytes),
            prepare=lambda: BeatWatch(FrameScreen(config.cluster_id, config.max_frame_bytes)),
            handler=self._intake_screened,
            buffer=4096,
        )
        watch = sub.prepared
        assert isinstance(watch, BeatWatch)
        screen = watch.screen
        sm = screen.metrics
        self._screen, self._screen_base = screen, (sm.malformed, sm.oversized, sm.wrong_cluster)
        self._watch = watch
        self._tracker.episode_log_level = logging.DEBUG  # the watch warns once for all
        await self._heard_by_server()
        task_status.started()
        del task_status  # it holds trio's start-up nursery: let it go for the task's life
        try:
            await self._take_from(sub, self._intake_screened)
        finally:
            self._mirror_screen()  # the counts stop here: this client no longer sees the subject
            self._screen = None
            self._watch = None
            self._tracker.episode_log_level = logging.WARNING
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await sub.unsubscribe()

    async def _run_tempo_sampler(self, *, task_status: trio.TaskStatus[None]) -> None:
        """The local metronome: notices a silent pulse and keeps time alone (degradation)."""
        task_status.started()
        del task_status  # it holds trio's start-up nursery: let it go for the task's life
        tracker = self._tracker
        self._sampler_spin = SPIN_S if precise_clock() else 0.0
        started = trio.current_time()
        quiet = self.config.first_beat_warning
        quiet_until = math.inf if quiet is None else started + quiet
        warned = False
        while True:
            if tracker.last_index is None:
                self._wake_sampler = trio.Event()
                with trio.move_on_at(quiet_until):
                    await self._wake_sampler.wait()
                if tracker.last_index is None and trio.current_time() >= quiet_until:
                    assert quiet is not None
                    # disconnected, silence says nothing about the cluster: ask again later
                    warned = self._connected
                    if warned:
                        self._warn_no_first_beat(quiet)
                    quiet_until = math.inf if warned else trio.current_time() + quiet
                continue
            if warned:
                warned = False
                log.info(
                    "first beat on %s, %.1f s after connecting",
                    self._beat_subject,
                    trio.current_time() - started,
                )
            watch = self._watch
            if watch is not None and not tracker.degraded:
                # healthy on a shared subscription: one watch notices silence for every member
                self._watched = True
                try:
                    silent = await watch.wait(tracker.alarm(), self.config.agent_id)
                finally:
                    self._watched = False
                if not silent:
                    continue  # the watcher left: wait again (maybe as the watcher)
                # silence: from here this client checks its own alarm, as alone
            spin = self._spin()
            # Sleep until the alarm; frames move it (``_rearm_sampler``) without waking us.
            with trio.CancelScope() as scope:
                scope.deadline = tracker.alarm() - spin
                self._sampler_scope = scope
                try:
                    await trio.sleep_forever()
                finally:
                    self._sampler_scope = None
            due = tracker.next_due
            # the last stretch: yield until the alarm (trio's sleeps wake ~1 ms late), unless
            # a frame moves the schedule meanwhile
            while tracker.next_due == due:
                remaining = tracker.alarm() - trio.current_time()
                if remaining <= 0 or remaining > spin:
                    break
                await trio.lowlevel.checkpoint()
            if tracker.next_due != due or not tracker.synthesis_due(trio.current_time()):
                continue  # the schedule moved: sleep to the new alarm
            frame = tracker.synthesise(due, self._wall())
            self._budgets.reproject()
            self._fanout.put(frame)
            self._rearm_sampler()

    def _warn_no_first_beat(self, seconds: float) -> None:
        """No beat since the client started: say so once (once per connection for the clients
        sharing its beat subscription), and keep it in ``health().errors``."""
        hint = no_beat_hint(self.config.cluster_id, seconds)
        self._errors.note(hint)
        watch = self._watch
        level = logging.WARNING
        if watch is not None:
            level = logging.DEBUG if watch.no_beat_warned else logging.WARNING
            watch.no_beat_warned = True
        log.log(level, "%s", hint)


def _takes_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` accepts the keyword argument ``name`` (or any, through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
