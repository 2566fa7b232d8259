"""One subscription per subject for many users of a connection: each message is prepared once
(decoded, screened) and the result handed to every member.

A transport that offers :meth:`SharingTransport.subscribe_shared` keeps a
:class:`SharedSubscriptions` registry. The first member of a ``key`` makes the one subscription;
the last to leave ends it; the transport's close ends them all. Members are isolated from each
other: one whose handler raises is dropped alone (its subscription ends with the ``failure``
kept for its owner), and each member's channel is its own (a full one counts its own drops).

Pure trio, like the rest of :mod:`backbeat_trio._transport`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import trio

from .._errors import NotConnected
from .base import Message, Subscription, Transport, _Feed

__all__ = ["SharedSubscription", "SharedSubscriptions", "SharingTransport", "ViewableTransport"]

T = TypeVar("T")

log = logging.getLogger("backbeat_trio.transport")

#: a ``prepare``: one message in, the item every member gets out (None: refused, nobody gets it)
Prepare = Callable[[bytes], T | None]


class SharedSubscription(_Feed[T]):
    """One member's handle on a shared subscription (made by ``subscribe_shared``).

    Items reach ``handler(item)`` synchronously as the connection delivers them when the
    transport runs handlers inline (NATS), else ``messages`` (the memory transport, which models
    a network hop). ``messages`` also ends when the member leaves or its handler raised (then
    ``failure`` holds the exception for its owner to re-raise).

    Attributes:
        subject: the subject.
        key: what members must agree on to share (e.g. the subject and how items are prepared).
        prepared: the shared ``prepare`` object (its counters are the connection's, not this
            member's).
        failure: the exception this member's handler raised, if it did.
    """

    def __init__(
        self,
        entry: _Entry[T],
        buffer: int,
        handler: Callable[[T], None] | None,
    ) -> None:
        if buffer == 0:  # a member that takes nothing from here: no channel of its own
            self._send, self._receive = entry.closed_channel()
            self.delivered = self.dropped = 0
        else:
            super().__init__(buffer)
        self._entry = entry
        self.subject = entry.subject
        self.key = entry.key
        self.prepared = entry.prepare
        self.messages = self._receive
        self._handler = handler
        self.failure: Exception | None = None
        self._left = False

    def __repr__(self) -> str:
        how = " inline" if self._handler is not None else ""
        return (
            f"<SharedSubscription {self.subject!r}{how} members={len(self._entry.members)} "
            f"delivered={self.delivered} dropped={self.dropped}>"
        )

    def _deliver(self, item: T) -> None:
        handler = self._handler
        if handler is None:
            super()._deliver(item)
            return
        try:
            handler(item)
        except Exception as exc:  # this member's bug: drop it alone, hand it to its owner
            self.failure = exc
            self._entry.remove(self)
            self._send.close()
            return
        self.delivered += 1

    async def unsubscribe(self) -> None:
        """Leave: this member gets nothing more; the last member's leaving ends the
        subscription on the connection."""
        if self._left:
            await trio.lowlevel.checkpoint()
            return
        self._left = True
        self._send.close()
        await self._entry.leave(self)


class _Entry(Generic[T]):
    """One subscription on the connection and its members."""

    def __init__(
        self,
        registry: SharedSubscriptions,
        subject: str,
        key: Hashable,
        prepare: Prepare[T],
    ) -> None:
        self.registry = registry
        self.subject = subject
        self.key = key
        self.prepare = prepare
        # replaced, never mutated: deliver() iterates the tuple it read while members come
        # and go from inside a handler
        self.members: tuple[SharedSubscription[T], ...] = ()
        self.sub: Subscription | None = None
        self.ready = trio.Event()
        self.error: BaseException | None = None
        self._closed_channel: tuple[trio.MemorySendChannel[T], trio.MemoryReceiveChannel[T]] | None
        self._closed_channel = None

    def closed_channel(self) -> tuple[trio.MemorySendChannel[T], trio.MemoryReceiveChannel[T]]:
        """One closed channel for every member that takes nothing (``buffer=0``): its
        ``messages`` ends at once, and an item handed to it is not counted."""
        if self._closed_channel is None:
            send, receive = trio.open_memory_channel[T](0)
            send.close()
            self._closed_channel = (send, receive)
        return self._closed_channel

    def deliver(self, msg: Message) -> None:
        try:
            item = self.prepare(msg.data)
        except Exception as exc:  # a bug in prepare: every member must hear of it, not hang
            log.exception("preparing a message on %r failed; ending its members", self.subject)
            for member in self.members:
                member.failure = exc
                member._send.close()
            self.members = ()
            return
        if item is None:
            return
        for member in self.members:
            member._deliver(item)

    def remove(self, member: SharedSubscription[T]) -> None:
        if member in self.members:
            self.members = tuple(m for m in self.members if m is not member)

    async def leave(self, member: SharedSubscription[T]) -> None:
        self.remove(member)
        if self.members or not self.ready.is_set():
            await trio.lowlevel.checkpoint()
            return
        # the last one out: forget the entry now (a new member makes a new subscription)
        # and end this one; a member of an entry already replaced forgets nothing
        entries = self.registry._entries
        if entries.get(self.key) is self:
            del entries[self.key]
        sub, self.sub = self.sub, None
        if sub is not None:
            await sub.unsubscribe()
        else:
            await trio.lowlevel.checkpoint()


class SharedSubscriptions:
    """A connection's shared subscriptions, by key (kept by the transport that owns them).

    Args:
        subscribe: the transport's own ``subscribe(subject, handler)``: a subscription whose
            messages are handed to ``handler`` synchronously as they arrive.
        inline: whether members' handlers run as messages arrive (else members read their
            ``messages`` channel).
    """

    def __init__(
        self,
        subscribe: Callable[[str, Callable[[Message], None]], Awaitable[Subscription]],
        *,
        inline: bool = True,
    ) -> None:
        self._subscribe = subscribe
        self._inline = inline
        self._entries: dict[Hashable, _Entry[Any]] = {}
        self._closed = False

    def __repr__(self) -> str:
        members = sum(len(e.members) for e in self._entries.values())
        return f"<SharedSubscriptions subscriptions={len(self._entries)} members={members}>"

    @property
    def subscriptions(self) -> list[tuple[str, Any, int]]:
        """``(subject, prepare, members)`` of every live shared subscription."""
        return [(e.subject, e.prepare, len(e.members)) for e in self._entries.values()]

    async def join(
        self,
        subject: str,
        *,
        key: Hashable,
        prepare: Callable[[], Prepare[T]],
        handler: Callable[[T], None] | None = None,
        buffer: int = 1024,
    ) -> SharedSubscription[T]:
        """Become a member of the subscription for ``key``, making it if it is the first.

        Args:
            subject: the subject.
            key: members with equal keys share (the key must cover everything ``prepare``
                depends on besides the payload).
            prepare: makes the shared ``prepare(payload)`` (called by the first member only).
            handler: called with each prepared item (see :class:`SharedSubscription`).
            buffer: the member's ``messages`` channel size; 0 for a member that takes nothing
                from the subscription itself (its ``prepare`` does the work): no channel.

        Raises:
            NotConnected: the connection is closed, or subscribing failed.
        """
        while True:
            if self._closed:
                raise NotConnected("the connection is closed")
            found: _Entry[T] | None = self._entries.get(key)
            if found is None:
                entry: _Entry[T] = _Entry(self, subject, key, prepare())
                self._entries[key] = entry
                try:
                    entry.sub = await self._subscribe(subject, entry.deliver)
                    if self._closed:  # the connection closed meanwhile: nothing to join
                        raise NotConnected("the connection closed while subscribing")
                except BaseException as exc:
                    if self._entries.get(key) is entry:
                        del self._entries[key]
                    entry.error = exc
                    sub, entry.sub = entry.sub, None
                    if sub is not None:
                        with trio.CancelScope(shield=True):
                            await sub.unsubscribe()
                    raise
                finally:
                    entry.ready.set()
            else:
                entry = found
                await entry.ready.wait()
                error = entry.error
                if isinstance(error, Exception):
                    raise NotConnected(f"subscribing to {subject!r} failed: {error!r}")
                if self._entries.get(key) is not entry:
                    # its maker was cancelled, or every member left while this one waited:
                    # that subscription is gone; make (or join) a new one
                    continue
            member = SharedSubscription(entry, buffer, handler if self._inline else None)
            entry.members = (*entry.members, member)
            return member

    def close(self) -> None:
        """The connection closes: every member's ``messages`` ends."""
        self._closed = True
        for entry in self._entries.values():
            for member in entry.members:
                member._send.close()
            entry.members = ()
        self._entries.clear()


@runtime_checkable
class SharingTransport(Protocol):
    """A transport whose users can share one subscription per subject (NATS: ``NatsTransport``
    and its views)."""

    async def subscribe_shared(
        self,
        subject: str,
        *,
        key: Hashable,
        prepare: Callable[[], Prepare[T]],
        handler: Callable[[T], None] | None = None,
        buffer: int = 1024,
    ) -> SharedSubscription[T]:
        """See :meth:`SharedSubscriptions.join`."""
        ...


@runtime_checkable
class ViewableTransport(Protocol):
    """A connection many users share, each through its own view (``NatsTransport``): a client
    handed one opens a view for itself and closes only that."""

    def view(self) -> AbstractAsyncContextManager[Transport]:
        """A handle on this connection for one more user."""
        ...
