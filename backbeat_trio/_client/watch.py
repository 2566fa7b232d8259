"""One silence watch for every client on a connection's shared beat subscription.

Alone, a client's tempo-sampler sleeps until its own alarm (one beat plus the jitter tolerance
after the last frame) and every frame moves that alarm: a timer moved per client per beat. On a
shared subscription the members hear the same frames at the same moment, so one timer does for
all of them: :class:`BeatWatch` is the subscription's ``prepare`` step (the connection's
:class:`~backbeat_trio._core.intake.FrameScreen`, plus a frame count) and its silence watch.

* A healthy member's sampler waits in :meth:`BeatWatch.wait`; after judging a frame the member
  hands its new alarm to :meth:`BeatWatch.note_alarm` (a comparison, no timer).
* One of the waiting samplers keeps the watch: it sleeps until the earliest alarm handed in for
  the latest frame. A frame meanwhile sends it back to sleep until the next earliest alarm; no
  frame, and it declares silence: every waiting member wakes and checks its own alarm (each
  keeps its own schedule, tolerance and degradation, as alone).
* The watch belongs to whichever member's task holds it: when that member leaves, the others are
  woken and one of them takes it over. Nothing here outlives its members or runs on its own.

Before declaring silence the watcher yields a few times, so that input which waited behind a
stall of this very process (a long garbage collection, a consumer hogging the loop) is taken in
first: a slow process is not a silent pulse.
"""

from __future__ import annotations

import logging
import math
import time

import trio

from .._core.intake import FrameScreen, ScreenedFrame
from .._core.metrics import ClientMetrics

__all__ = ["BeatWatch"]

log = logging.getLogger("backbeat_trio.client")

#: how many times a watcher whose alarm rang yields to pending input before declaring silence
GRACE_CHECKPOINTS = 8


class BeatWatch:
    """A shared beat subscription's screen, frame count and silence watch (see the module).

    Args:
        screen: decodes and screens each payload once for every member.

    Attributes:
        screen: the connection's :class:`~backbeat_trio._core.intake.FrameScreen`.
        frames: frames passed on to the members so far.
        alarm: the earliest alarm a waiting member handed in since the latest frame (local
            trio time; ``inf`` until one does).
        silences: how many times the watch declared the pulse silent.
        handovers: how many times a watcher left and the watch passed to another member.
        keeper: who keeps the watch now (the name its member waits with), or None.
        waiting: how many members wait on the watch now (the keeper included).
        no_beat_warned: whether a member warned that no beat came after it started (the
            others sharing the subscription then say it at DEBUG only).
    """

    __slots__ = (
        "_scope",
        "_silence",
        "_watching",
        "alarm",
        "frames",
        "handovers",
        "keeper",
        "no_beat_warned",
        "screen",
        "silences",
        "waiting",
    )

    def __init__(self, screen: FrameScreen) -> None:
        self.screen = screen
        self.frames = 0
        self.alarm = math.inf
        self.silences = 0
        self.handovers = 0
        self.keeper: str | None = None
        self.waiting = 0
        self.no_beat_warned = False
        self._watching = False
        self._scope: trio.CancelScope | None = None  # the watcher's sleep
        self._silence = trio.Event()  # set (and replaced) when the watch ends, either way

    def __repr__(self) -> str:
        return (
            f"<BeatWatch {self.screen.cluster_id} frames={self.frames} keeper={self.keeper} "
            f"silences={self.silences} handovers={self.handovers} refused={self.refused}>"
        )

    @property
    def watching(self) -> bool:
        """Whether a member's sampler keeps the watch now (none does while every member is
        degraded, or checking its own alarm after a silence)."""
        return self._watching

    # the screen's counters, read through the subscription's ``prepared`` object
    @property
    def metrics(self) -> ClientMetrics:
        """The screen's counters (refusals, and ``beats`` passed on)."""
        return self.screen.metrics

    @property
    def refused(self) -> int:
        """Payloads the screen refused so far."""
        return self.screen.refused

    def __call__(self, data: bytes) -> ScreenedFrame | None:
        """Screen one payload (the subscription's ``prepare``); a frame passed on restarts the
        round of alarms."""
        # one arrival time for every member
        screened = self.screen(data, trio.current_time(), time.time())
        if screened is not None:
            self.frames += 1
            self.alarm = math.inf
        return screened

    def note_alarm(self, alarm: float) -> None:
        """A waiting member's alarm, after it judged the latest frame (or as it starts to wait).

        Alarms move later beat by beat, so the watcher, woken at the earlier alarm, just sleeps
        again; only an earlier one (a faster tempo) moves its timer now.
        """
        if alarm < self.alarm:
            self.alarm = alarm
            scope = self._scope
            if scope is not None and alarm < scope.deadline:
                scope.deadline = alarm

    async def wait(self, alarm: float, who: str) -> bool:
        """Wait as a healthy member, handing in ``alarm`` (its own, now); ``who`` names the
        member (:attr:`keeper` while it keeps the watch).

        Returns:
            True when the watch declared the pulse silent (the member checks its own alarm);
            False when the watcher left (call again: one of the members takes the watch over).
        """
        self.note_alarm(alarm)
        self.waiting += 1
        try:
            return await self._wait(who)
        finally:
            self.waiting -= 1

    async def _wait(self, who: str) -> bool:
        if self._watching:
            silences = self.silences
            await self._silence.wait()
            return self.silences != silences
        self._watching = True
        self.keeper = who
        silent = False
        try:
            silent = await self._keep_watch()
        finally:
            self._watching = False
            self.keeper = None
            if silent:
                self.silences += 1
                # once for every member (each logs its own degradation at DEBUG only)
                log.warning(
                    "pulse silent on cluster %s: no beat frame by the earliest alarm of the %d "
                    "client(s) sharing the subscription; each now keeps time from its own",
                    self.screen.cluster_id,
                    self.waiting,
                )
            else:  # cancelled: this member is leaving; another one takes the watch over
                self.handovers += 1
            ended, self._silence = self._silence, trio.Event()
            ended.set()
        return silent

    async def _keep_watch(self) -> bool:
        while True:
            seen = self.frames
            with trio.CancelScope(deadline=self.alarm) as scope:
                self._scope = scope
                try:
                    await trio.sleep_forever()
                finally:
                    self._scope = None
            if self.frames != seen:
                continue  # a frame came: sleep until the alarms it brought
            for _ in range(GRACE_CHECKPOINTS):
                await trio.lowlevel.checkpoint()
                if self.frames != seen:
                    break
            if self.frames == seen:
                return True
