"""Beats out: the client's bounded drop-oldest channels and the event ``wait_for_beat`` waits on."""

from __future__ import annotations

import trio

from .._core.metrics import ClientMetrics
from .._core.wire import BeatFrame
from .._util.channel import DropOldestChannel

__all__ = ["BeatFanout"]


class BeatFanout:
    """Hands each beat to every open ``beats()``/``downbeats()`` channel and wakes the waiters.

    Args:
        metrics: ``dropped`` counts the frames consumers fell too far behind to receive.

    Attributes:
        beat_event: set (and replaced) on every beat, and at close.
        closed: True once :meth:`close` ran; new channels are then born closed.
    """

    __slots__ = ("_beats", "_downbeats", "_metrics", "beat_event", "closed")

    def __init__(self, metrics: ClientMetrics) -> None:
        self._metrics = metrics
        self._beats: list[DropOldestChannel[BeatFrame]] = []
        self._downbeats: list[DropOldestChannel[BeatFrame]] = []
        self.beat_event = trio.Event()
        self.closed = False

    def __repr__(self) -> str:
        return (
            f"<BeatFanout beats={len(self._beats)} downbeats={len(self._downbeats)} "
            f"closed={self.closed}>"
        )

    def open_channel(self, buffer: int, *, downbeats: bool) -> DropOldestChannel[BeatFrame]:
        """A new channel of every beat (or downbeat) from now on, ``buffer`` frames deep."""
        chan = DropOldestChannel[BeatFrame](buffer, "downbeats" if downbeats else "beats")
        if self.closed:
            chan.close_send()
        else:
            (self._downbeats if downbeats else self._beats).append(chan)
        return chan

    def put(self, frame: BeatFrame) -> None:
        """Deliver ``frame``; channels their consumers closed are forgotten."""
        for where, wanted in ((self._beats, True), (self._downbeats, frame.downbeat)):
            if not wanted:
                continue
            alive = []
            for chan in where:
                before = chan.dropped
                if chan.put(frame):
                    alive.append(chan)
                    self._metrics.dropped += chan.dropped - before
            where[:] = alive
        event, self.beat_event = self.beat_event, trio.Event()
        event.set()

    def close(self) -> None:
        """End every channel and wake every ``wait_for_beat``."""
        self.closed = True
        for chan in self._beats + self._downbeats:
            chan.close_send()
        self._beats.clear()
        self._downbeats.clear()
        self.beat_event.set()
