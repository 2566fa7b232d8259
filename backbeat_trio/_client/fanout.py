"""Beats out: the client's bounded drop-oldest channels, Go-style callbacks, and the event
``wait_for_beat`` waits on."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import trio

from .._core.metrics import ErrorLog
from .._core.wire import BeatFrame
from .._util.channel import DropOldestChannel

__all__ = ["BeatCallback", "BeatFanout"]

BeatCallback = Callable[[BeatFrame], Any]

log = logging.getLogger("backbeat_trio.client")


class BeatFanout:
    """Hands each beat to every open ``beats()``/``downbeats()`` channel and wakes the waiters.

    Args:
        errors: ``metrics.dropped`` counts the frames consumers fell too far behind to receive;
            raising callbacks are counted and noted here.
        default_buffer: a channel's size when none is asked for.

    Attributes:
        beat_event: what ``wait`` waits on (made by the first wait); set and dropped on every
            beat while a task waits on it, and at close.
        closed: True once :meth:`close` ran; new channels are then born closed.
    """

    __slots__ = (
        "_beats",
        "_default_buffer",
        "_downbeats",
        "_errors",
        "_metrics",
        "_waiting",
        "beat_event",
        "closed",
    )

    def __init__(self, errors: ErrorLog, default_buffer: int) -> None:
        self._errors = errors
        self._metrics = errors.metrics
        self._default_buffer = default_buffer
        # tuples: channels come and go rarely, and the empty tuple costs a client nothing
        self._beats: tuple[DropOldestChannel[BeatFrame], ...] = ()
        self._downbeats: tuple[DropOldestChannel[BeatFrame], ...] = ()
        self.beat_event: trio.Event | None = None
        self._waiting = 0  # tasks in wait_for_beat(): without any, no new Event per beat
        self.closed = False

    def __repr__(self) -> str:
        return (
            f"<BeatFanout beats={len(self._beats)} downbeats={len(self._downbeats)} "
            f"closed={self.closed}>"
        )

    def open_channel(self, buffer: int | None, *, downbeats: bool) -> DropOldestChannel[BeatFrame]:
        """A new channel of every beat (or downbeat) from now on, ``buffer`` frames deep.

        Raises:
            ValueError: ``buffer`` is given and is not a positive int.
        """
        name = "downbeats" if downbeats else "beats"
        if buffer is None:
            buffer = self._default_buffer
        elif isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ValueError(f"{name}(buffer=...) needs a positive int, got {buffer!r}")
        chan = DropOldestChannel[BeatFrame](buffer, name)
        if self.closed:
            chan.close_send()
        elif downbeats:
            self._downbeats = (*self._downbeats, chan)
        else:
            self._beats = (*self._beats, chan)
        return chan

    def add_callback(
        self,
        spawn: Callable[..., trio.CancelScope],
        callback: BeatCallback,
        *,
        downbeats: bool,
    ) -> Callable[[], None]:
        """Run ``callback(frame)`` on every beat (or downbeat) in a task ``spawn`` starts (it
        returns the task's cancel scope).

        Returns:
            A function that removes the callback.
        """
        chan = self.open_channel(None, downbeats=downbeats)
        scope = spawn(self._run_callback, callback, chan)

        def remove() -> None:
            chan.close()
            scope.cancel()

        return remove

    async def _run_callback(
        self, callback: BeatCallback, chan: DropOldestChannel[BeatFrame]
    ) -> None:
        with contextlib.suppress(trio.ClosedResourceError):
            async for frame in chan:
                try:
                    result = callback(frame)
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:
                    self._metrics.callback_errors += 1
                    name = getattr(callback, "__name__", callback)
                    self._errors.note(f"callback {name!r}: {exc!r}")
                    log.exception("beat callback %r raised", callback)

    def put(self, frame: BeatFrame) -> None:
        """Deliver ``frame``; channels their consumers closed are forgotten."""
        if self._put(self._beats, frame):  # forget the channels their consumers closed
            self._beats = tuple(chan for chan in self._beats if chan.accepting)
        if frame.downbeat and self._downbeats and self._put(self._downbeats, frame):
            self._downbeats = tuple(chan for chan in self._downbeats if chan.accepting)
        if self._waiting:
            event, self.beat_event = self.beat_event, None
            if event is not None:
                event.set()

    def _put(self, where: tuple[DropOldestChannel[BeatFrame], ...], frame: BeatFrame) -> bool:
        """Put ``frame`` in each channel; True if one of them is gone."""
        gone = False
        for chan in where:
            before = chan.dropped
            if chan.put(frame):
                if chan.dropped != before:
                    self._metrics.dropped += chan.dropped - before
            else:
                gone = True
        return gone

    async def wait(self) -> None:
        """Until the next :meth:`put` (or :meth:`close`)."""
        if self.closed:
            await trio.lowlevel.checkpoint()
            return
        if self.beat_event is None:
            self.beat_event = trio.Event()
        self._waiting += 1
        try:
            await self.beat_event.wait()
        finally:
            self._waiting -= 1

    def close(self) -> None:
        """End every channel and wake every ``wait_for_beat``."""
        self.closed = True
        for chan in self._beats + self._downbeats:
            chan.close_send()
        self._beats = self._downbeats = ()
        if self.beat_event is not None:
            self.beat_event.set()
