"""A bounded receive channel that drops its *oldest* item when full (beats go stale; the newest
matters), counting the drops."""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, TypeVar

import outcome
import trio

from ._trio_private import wait_message

__all__ = ["DropOldestChannel"]

T = TypeVar("T")


class DropOldestChannel(trio.abc.ReceiveChannel[T], Generic[T]):
    """What :meth:`Client.beats` returns: ``async for frame in channel`` until the client closes.

    The producer calls :meth:`put` (never blocks); when ``maxlen`` items wait unread, the oldest is
    dropped and :attr:`dropped` counts it.
    """

    def __init__(self, maxlen: int, name: str = "beats") -> None:
        if maxlen < 1:
            raise ValueError(f"a channel holds at least one item, not {maxlen}")
        # A consumer that keeps up has one item waiting at most: it sits in a slot, and the
        # queue behind it is made only when a second item waits (an empty deque is a block of
        # memory per channel, and a thousand clients each have one).
        self._first: T | None = None
        self._has_first = False
        self._rest: collections.deque[T] | None = None
        self._maxlen = maxlen
        # The tasks waiting for an item, woken oldest first by rescheduling them directly (a
        # ParkingLot allocates a generator and a list per wake-up). A consumer waits once per
        # beat, so the first waiter has a slot of its own, with an abort bound once: waiting
        # there allocates nothing the garbage collector tracks. More waiters queue behind it.
        self._waiter: trio.lowlevel.Task | None = None
        self._waiter_reused = False  # the slot's waiter is a _SlotWait: wake it with _WOKEN
        self._waiters: collections.deque[trio.lowlevel.Task] | None = None
        self._abort_waiter = self._abort_slot
        message = wait_message(self._abort_waiter)
        self._slot_wait = None if message is None else _SlotWait(self, message)
        self._send_closed = False
        self._recv_closed = False
        self.name = name
        self.dropped = 0
        self.delivered = 0

    def __repr__(self) -> str:
        return (
            f"<DropOldestChannel {self.name} pending={self.pending}/{self._maxlen} "
            f"delivered={self.delivered} dropped={self.dropped}>"
        )

    @property
    def pending(self) -> int:
        """How many items wait unread."""
        rest = self._rest
        return self._has_first + (len(rest) if rest is not None else 0)

    @property
    def closed(self) -> bool:
        """True once the consumer closed it."""
        return self._recv_closed

    @property
    def accepting(self) -> bool:
        """True while :meth:`put` takes items (neither side closed)."""
        return not (self._recv_closed or self._send_closed)

    def put(self, item: T) -> bool:
        """Add an item (producer side). Returns False when the consumer has gone away."""
        if self._recv_closed or self._send_closed:
            return False
        if self.pending >= self._maxlen:
            self._pop()
            self.dropped += 1
        if not self._has_first:
            self._first, self._has_first = item, True
        else:
            rest = self._rest
            if rest is None:
                rest = self._rest = collections.deque()
            rest.append(item)
        if self._waiter is not None:
            self._wake_slot()
        elif self._waiters:
            trio.lowlevel.reschedule(self._waiters.popleft())
        return True

    def _wake_slot(self) -> None:
        task, self._waiter = self._waiter, None
        assert task is not None
        if self._waiter_reused:
            trio.lowlevel.reschedule(task, _WOKEN)
        else:
            trio.lowlevel.reschedule(task)

    def _pop(self) -> T:
        """Take the oldest item (one waits)."""
        item = self._first
        rest = self._rest
        if rest:
            self._first = rest.popleft()
        else:
            self._first, self._has_first = None, False
        return item  # type: ignore[return-value]  # (an item waited: it is a T)

    def _park(self, task: trio.lowlevel.Task, *, reused: bool) -> bool:
        """Put ``task`` in the waiters' slot (True) or, when it is taken, in the queue behind it
        (False); ``reused``: it waits through the channel's :class:`_SlotWait`."""
        if self._waiter is None and not self._waiters:
            self._waiter, self._waiter_reused = task, reused
            return True
        if self._waiters is None:
            self._waiters = collections.deque()
        self._waiters.append(task)
        return False

    @property
    def _readable(self) -> bool:
        """A read would not wait: an item is there, or a side closed."""
        return self._has_first or self._send_closed or self._recv_closed

    def _abort_queued(self, task: trio.lowlevel.Task) -> Callable[[object], trio.lowlevel.Abort]:
        waiters = self._waiters
        assert waiters is not None

        def abort(_: object) -> trio.lowlevel.Abort:
            waiters.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        return abort

    def _abort_slot(self, _: object) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _wake_all(self) -> None:
        if self._waiter is not None:
            self._wake_slot()
        waiters = self._waiters
        while waiters:
            trio.lowlevel.reschedule(waiters.popleft())

    def close_send(self) -> None:
        """No more items: the consumer gets what is left, then ``EndOfChannel``."""
        self._send_closed = True
        self._wake_all()

    def receive_nowait(self) -> T:
        """The oldest unread item.

        Raises:
            trio.WouldBlock: nothing to read yet.
            trio.EndOfChannel: the producer is done and everything was read.
            trio.ClosedResourceError: this channel was closed.
        """
        if self._recv_closed:
            raise trio.ClosedResourceError
        if self._has_first:
            self.delivered += 1
            return self._pop()
        if self._send_closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def receive(self) -> T:
        """Wait for the next item.

        Raises:
            trio.EndOfChannel: the producer is done and everything was read.
            trio.ClosedResourceError: this channel was closed.
        """
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            raise trio.EndOfChannel from None

    def __anext__(self) -> Awaitable[T]:  # type: ignore[override]  # (an awaitable, as async for needs)
        # ``async for`` lands here directly (not trio's __anext__ around receive()): a consumer
        # of every beat of a thousand clients waits here once per beat
        if self._readable:
            return self._ready()
        wait = self._slot_wait
        if wait is not None and self._waiter is None and not self._waiters:
            return wait  # waits in the slot, allocating nothing (see _SlotWait)
        return self._wait()

    async def _ready(self) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        item = self._next()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return item

    async def _wait(self) -> T:
        # nothing yet: waiting is this call's checkpoint; put() and both closes wake it
        task = trio.lowlevel.current_task()
        while True:
            if self._park(task, reused=False):
                await trio.lowlevel.wait_task_rescheduled(self._abort_waiter)
            else:  # another task waits already: queued behind it
                await trio.lowlevel.wait_task_rescheduled(self._abort_queued(task))
            if self._readable:
                return self._next()

    def _next(self) -> T:
        try:
            return self.receive_nowait()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop receiving (the producer forgets this channel)."""
        self._recv_closed = True
        self._first, self._has_first, self._rest = None, False, None
        self._wake_all()

    async def aclose(self) -> None:
        """Close and checkpoint."""
        self.close()
        await trio.lowlevel.checkpoint()


#: what a channel wakes its reused slot waiter with: one shared outcome instead of a new one per
#: wake-up (trio's default), which a thousand waking consumers would hold at once on every beat
_WOKEN: outcome.Value[None] = outcome.Value(None)


class _SlotWait(Generic[T]):
    """What ``__anext__`` returns to a consumer that waits in the channel's slot: one object per
    channel, awaited again and again. It is its own iterator: its first step takes the slot and
    yields the wait message of :func:`~._trio_private.wait_message` (the run loop then parks the
    task as in :func:`trio.lowlevel.wait_task_rescheduled`); resumed with the outcome the task
    was rescheduled with, it unwraps it (a cancellation raises here) and returns the next item,
    ends the iteration, or waits again if another reader took the item first. No coroutine,
    generator or message is made per wait, so a thousand waiting consumers leave nothing for
    the garbage collector to promote on every beat.
    """

    __slots__ = ("_chan", "_message")

    def __init__(self, chan: DropOldestChannel[T], message: object) -> None:
        self._chan = chan
        self._message = message

    def __await__(self) -> Generator[Any, Any, T]:
        return self  # type: ignore[return-value]  # (an iterator with send, as awaits use)

    def __next__(self) -> object:
        return self._park()

    def send(self, resumed: Any) -> object:
        """Step on: ``resumed`` is the outcome the task was rescheduled with."""
        if resumed is not _WOKEN:  # (the one wake-up all channels share is never unwrapped)
            resumed.unwrap()  # raises the cancellation (the abort emptied the slot)
        chan = self._chan
        if chan._readable:
            raise StopIteration(chan._next())  # (an ended channel raises StopAsyncIteration)
        return self._park()

    def _park(self) -> object:
        chan = self._chan
        task = trio.lowlevel.current_task()
        if chan._park(task, reused=True):
            return self._message
        # the slot is taken (the same awaitable awaited by two tasks): queued behind it, with a
        # message of this wait's own
        message = wait_message(chan._abort_queued(task))
        assert message is not None  # (the slot's message was made the same way)
        return message
