"""The transport interface: what the client and the services need from a message bus.

Pure trio: nothing here imports asyncio or nats-py. The NATS implementation lives in
:mod:`backbeat_trio._bridge`; an in-memory one for deterministic tests in
:mod:`backbeat_trio.testing`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, runtime_checkable

import trio

if TYPE_CHECKING:
    from .jetstream import JetStream
    from .shared import SharedSubscription


T = TypeVar("T")

log = logging.getLogger("backbeat_trio.transport")

EventKind = Literal[
    "connected", "disconnected", "reconnected", "closed", "error", "slow_consumer", "lame_duck"
]


@runtime_checkable
class Message(Protocol):
    """What a subscription delivers (nats-py's ``Msg`` and :class:`MemoryMessage` both fit)."""

    subject: str
    reply: str
    data: bytes
    headers: dict[str, str] | None


@dataclass(slots=True)
class MemoryMessage:
    """A message of the in-memory transport."""

    subject: str
    data: bytes
    reply: str = ""
    headers: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class ConnEvent:
    """A connection event, as the transport saw it."""

    kind: EventKind
    detail: str = ""


def _offer(send: trio.MemorySendChannel[T], item: T) -> bool | None:
    """Hand ``item`` over without waiting: True when the channel took it, False when it is full,
    None when it is closed (its reader has gone: nothing to count)."""
    try:
        send.send_nowait(item)
    except trio.WouldBlock:
        return False
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        return None
    return True


class _Feed(Generic[T]):
    """A bounded trio channel its producer never waits on: ``delivered`` counts what it took,
    ``dropped`` what it could not take while full."""

    def __init__(self, buffer: int) -> None:
        self._send, self._receive = trio.open_memory_channel[T](buffer)
        self.delivered = 0
        self.dropped = 0

    def _deliver(self, item: T) -> None:
        taken = _offer(self._send, item)
        if taken:
            self.delivered += 1
        elif taken is False:
            self.dropped += 1


#: what :meth:`EventFeed.listen` hands each connection event to (None: the events ended)
EventListener = Callable[[ConnEvent | None], None]


class EventFeed:
    """A transport's connection events: on the ``events`` channel for one reader, and handed to
    every listener as they happen (:meth:`listen`). Events that come while there is neither a
    listener nor a reader are kept (up to the buffer) for the first of them.

    Attributes:
        events_dropped: events a full ``events`` channel (or backlog) could not take.
    """

    def __init__(self, event_buffer: int = 1024) -> None:
        self._event_buffer = event_buffer
        # made by the first reader: listeners need no channel
        self._event_channel: (
            tuple[trio.MemorySendChannel[ConnEvent], trio.MemoryReceiveChannel[ConnEvent]] | None
        ) = None
        self._listeners: tuple[EventListener, ...] = ()
        self._backlog: list[ConnEvent] = []  # events nobody has heard yet
        self._events_ended = False
        self.events_dropped = 0

    @property
    def events(self) -> trio.MemoryReceiveChannel[ConnEvent]:
        """Connection events, for one reader (e.g. the HA pulse's supervisor)."""
        if self._event_channel is None:
            send, receive = trio.open_memory_channel[ConnEvent](self._event_buffer)
            self._event_channel = (send, receive)
            backlog, self._backlog = self._backlog, []
            for event in backlog:
                self._offer(event)
            if self._events_ended:
                send.close()
        return self._event_channel[1]

    def listen(self, listener: EventListener) -> Callable[[], None]:
        """Hand every connection event from now on to ``listener`` as it happens (no task waits
        for them), and None once the events end (the transport closed, or this view of it);
        events kept for nobody so far are handed over first. ``listener`` must not block and
        should not raise: what it raises is logged and dropped.

        Returns:
            A function that stops it (its owner calls it when it leaves).
        """
        self._listeners = (*self._listeners, listener)
        backlog, self._backlog = self._backlog, []
        for event in backlog:
            self._tell(listener, event)
        if self._events_ended:
            self._tell(listener, None)

        def stop() -> None:
            self._listeners = tuple(x for x in self._listeners if x is not listener)

        return stop

    def _tell(self, listener: EventListener, event: ConnEvent | None) -> None:
        try:
            listener(event)
        except Exception:  # the listener's bug must not break the connection's own callbacks
            log.exception("a connection-event listener raised on %r", event)

    def _offer(self, event: ConnEvent) -> None:
        channel = self._event_channel
        if channel is not None:
            if _offer(channel[0], event) is False:
                self.events_dropped += 1
        elif len(self._backlog) < self._event_buffer:
            self._backlog.append(event)
        else:
            self.events_dropped += 1

    def _push(self, event: ConnEvent) -> None:
        listeners = self._listeners
        for listener in listeners:
            self._tell(listener, event)
        if self._event_channel is not None or not listeners:
            self._offer(event)

    def _end_events(self) -> None:
        """No more events: the channel ends, and every listener hears None (once)."""
        if self._events_ended:
            return
        self._events_ended = True
        if self._event_channel is not None:
            self._event_channel[0].close()
        for listener in self._listeners:
            self._tell(listener, None)


class Subscription(_Feed[Message]):
    """A subscription: ``messages`` is a bounded trio channel; overflow is counted in
    ``dropped``.

    With a ``handler``, each message is instead handed to ``handler(msg)`` synchronously by
    whatever delivers it (over NATS: nats-py's parser), which saves the wake-up of a task
    reading ``messages``. The handler must not block and should not raise: an exception ends
    the subscription (``messages`` closes) and is kept in ``failure`` for the owner to re-raise.
    A transport may decline ``handler`` (:class:`MemoryTransport` does) and deliver on
    ``messages`` as usual, so an owner passing one still reads ``messages``.
    """

    def __init__(
        self,
        subject: str,
        buffer: int,
        unsubscribe: Callable[[], Any],
        handler: Callable[[Message], None] | None = None,
    ) -> None:
        super().__init__(buffer)
        self.subject = subject
        self.messages = self._receive
        self._unsubscribe = unsubscribe
        self._handler = handler
        self.failure: Exception | None = None

    def __repr__(self) -> str:
        how = " inline" if self._handler is not None else ""
        return (
            f"<Subscription {self.subject!r}{how} delivered={self.delivered} "
            f"dropped={self.dropped}>"
        )

    def _deliver(self, msg: Message) -> None:
        handler = self._handler
        if handler is not None:
            try:
                handler(msg)
            except Exception as exc:  # the owner's bug: stop here, hand it to the owner's task
                self._handler = None
                self.failure = exc
                self._send.close()
                return
            self.delivered += 1
            return
        super()._deliver(msg)

    async def unsubscribe(self) -> None:
        """Stop the subscription and close its channel."""
        self._send.close()
        result = self._unsubscribe()
        if hasattr(result, "__await__"):
            await result


class Transport(Protocol):
    """What the client and the services need from a message bus."""

    @property
    def connected(self) -> bool: ...

    @property
    def events(self) -> trio.MemoryReceiveChannel[ConnEvent]: ...

    def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: dict[str, str] | None = None,
        reply: str = "",
    ) -> None: ...

    async def flush(self) -> None: ...

    async def subscribe(
        self,
        subject: str,
        *,
        buffer: int = 1024,
        handler: Callable[[Message], None] | None = None,
    ) -> Subscription: ...

    async def request(self, subject: str, payload: bytes) -> bytes: ...

    def listen(self, listener: EventListener) -> Callable[[], None]:
        """Hand connection events to ``listener`` as they happen; returns the function that
        stops it (:meth:`EventFeed.listen`)."""
        ...

    async def subscribe_shared(
        self,
        subject: str,
        *,
        key: Hashable,
        prepare: Callable[[], Callable[[bytes], Any]],
        handler: Callable[[Any], None] | None = None,
        buffer: int = 1024,
    ) -> SharedSubscription[Any]:
        """Join the one subscription to ``subject`` every user of this connection with the same
        ``key`` shares (:mod:`backbeat_trio._transport.shared`)."""
        ...

    def new_inbox(self) -> str: ...

    @property
    def jetstream(self) -> JetStream:
        """Streams and key/value buckets on this bus (:class:`~.jetstream.JetStream`)."""
        ...
