"""An in-memory broker and transport (pure trio), for deterministic tests on MockClock.

Never the only proof that something works over NATS.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import msgspec
import trio

from .._errors import NotConnected
from .._transport.base import ConnEvent, MemoryMessage, Message, Subscription, _offer

if TYPE_CHECKING:
    pass


# ------------------------------------------------------------------------------------------------
# In-memory transport (pure trio) for deterministic tests
# ------------------------------------------------------------------------------------------------
def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching with ``*`` (one token) and ``>`` (the rest)."""
    p = pattern.split(".")
    s = subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


@dataclass
class _MemoryStream:
    name: str
    subjects: list[str]
    messages: list[MemoryMessage] = field(default_factory=list)
    msg_ids: set[str] = field(default_factory=set)


class MemoryBroker:
    """A tiny in-process NATS look-alike: subjects with wildcards, headers, reply subjects and a
    JetStream-like stream that acks publishes and drops duplicate ``Nats-Msg-Id`` s.

    ``set_down()`` / ``set_up()`` simulate an outage: transports see disconnected/reconnected
    events and what is published meanwhile is lost (as bytes in flight are on a real server).
    """

    def __init__(self) -> None:
        self._transports: list[MemoryTransport] = []
        self.streams: dict[str, _MemoryStream] = {}
        self._stream_subs: dict[str, list[Subscription]] = {}
        self.up = True
        self.lost_while_down = 0
        self.lost_in_flight = 0
        self._lose_next = 0
        self.jetstream_available = True
        """False: streams store nothing and answer publishes with an empty 503 reply, as a
        JetStream that is recovering or electing a leader does."""

    def __repr__(self) -> str:
        return f"<MemoryBroker up={self.up} transports={len(self._transports)}>"

    def connect(self) -> MemoryTransport:
        """A new transport attached to this broker."""
        t = MemoryTransport(self)
        self._transports.append(t)
        return t

    def add_stream(self, name: str, subjects: Sequence[str]) -> None:
        """Create a stream that captures ``subjects``."""
        self.streams.setdefault(name, _MemoryStream(name, list(subjects)))

    def set_down(self) -> None:
        """Simulate the server going away."""
        self.up = False
        for t in self._transports:
            t._emit(ConnEvent("disconnected"))

    def lose_next(self, count: int = 1) -> None:
        """The next ``count`` messages vanish in flight with no event at all (a connection dying
        under a publish), so only acknowledgements can tell."""
        self._lose_next += count

    def set_up(self) -> None:
        """Simulate the server coming back."""
        self.up = True
        for t in self._transports:
            t._emit(ConnEvent("reconnected", "memory"))

    def _route(self, msg: MemoryMessage) -> int:
        """Deliver ``msg``; returns how many subscriptions (and streams) took it."""
        if not self.up:
            self.lost_while_down += 1
            return 0
        if self._lose_next:
            self._lose_next -= 1
            self.lost_in_flight += 1
            return 0
        taken = 0
        for stream in self.streams.values():
            if any(subject_matches(p, msg.subject) for p in stream.subjects):
                if not self.jetstream_available:
                    if msg.reply:
                        self._route(MemoryMessage(msg.reply, b"", headers={"Status": "503"}))
                    break
                msg_id = (msg.headers or {}).get("Nats-Msg-Id")
                duplicate = msg_id is not None and msg_id in stream.msg_ids
                taken += 1
                if not duplicate:
                    stream.messages.append(msg)
                    if msg_id is not None:
                        stream.msg_ids.add(msg_id)
                    for sub in self._stream_subs.get(stream.name, ()):
                        if subject_matches(sub.subject, msg.subject):
                            sub._deliver(msg)
                if msg.reply:
                    ack = {"stream": stream.name, "seq": len(stream.messages)}
                    if duplicate:
                        ack["duplicate"] = True
                    self._route(MemoryMessage(msg.reply, msgspec.json.encode(ack)))
                break
        for t in self._transports:
            for sub in t._subs:
                if subject_matches(sub.subject, msg.subject):
                    sub._deliver(msg)
                    taken += 1
        return taken


class MemoryTransport:
    """The :class:`Transport` interface over a :class:`MemoryBroker`; pure trio, deterministic."""

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker
        self._subs: list[Subscription] = []
        self._event_send, self._events = trio.open_memory_channel[ConnEvent](1024)
        self._closed = False
        self.published = 0

    def __repr__(self) -> str:
        return f"<MemoryTransport connected={self.connected} published={self.published}>"

    def _emit(self, ev: ConnEvent) -> None:
        _offer(self._event_send, ev)  # a full channel drops it

    @property
    def connected(self) -> bool:
        """True while the broker is up and this transport open."""
        return self._broker.up and not self._closed

    @property
    def events(self) -> trio.MemoryReceiveChannel[ConnEvent]:
        """Connection events."""
        return self._events

    def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: dict[str, str] | None = None,
        reply: str = "",
    ) -> None:
        """Deliver at once to every matching subscription (and stream)."""
        if self._closed:
            raise NotConnected("the transport is closed")
        self.published += 1
        self._broker._route(MemoryMessage(subject, bytes(payload), reply, headers))

    async def flush(self) -> None:
        """Nothing is buffered; checkpoints only."""
        await trio.lowlevel.checkpoint()
        if not self.connected:
            raise NotConnected("not connected: cannot flush")

    async def subscribe(
        self,
        subject: str,
        *,
        buffer: int = 1024,
        handler: Callable[[Message], None] | None = None,
    ) -> Subscription:
        """Subscribe to ``subject`` (wildcards allowed).

        ``handler`` is not called: messages always arrive on ``Subscription.messages``, read by
        the subscriber's own task, as they would after a network hop. A publisher therefore never
        runs a subscriber's code inside its ``publish`` call, which keeps the order of events in
        MockClock tests the order a real deployment has (e.g. a pulse started just before a
        client waits for its first beat does not hand that beat over before the wait begins).
        """
        await trio.lowlevel.checkpoint()

        def unsubscribe() -> None:
            if sub in self._subs:
                self._subs.remove(sub)

        sub = Subscription(subject, buffer, unsubscribe)
        self._subs.append(sub)
        return sub

    def new_inbox(self) -> str:
        """A fresh unique inbox subject."""
        return f"_INBOX.{secrets.token_hex(8)}"

    async def request(self, subject: str, payload: bytes) -> bytes:
        """Publish with a reply inbox and wait for the first answer (bound it with a cancel scope).

        Raises:
            NotConnected: nobody subscribes to ``subject`` (NATS would answer 503).
        """
        inbox = self.new_inbox()
        sub = await self.subscribe(inbox, buffer=1)
        try:
            if not self._broker._route(MemoryMessage(subject, bytes(payload), inbox)):
                raise NotConnected(f"request {subject!r}: no responders")
            self.published += 1
            msg = await sub.messages.receive()
            return msg.data
        finally:
            await sub.unsubscribe()

    async def find_stream(self, subject: str) -> str | None:
        """The stream capturing ``subject``, if any."""
        await trio.lowlevel.checkpoint()
        for stream in self._broker.streams.values():
            if any(subject_matches(p, subject) for p in stream.subjects):
                return stream.name
        return None

    async def ensure_stream(
        self,
        name: str,
        subjects: Sequence[str],
        *,
        duplicate_window: float = 120.0,
        replicas: int = 1,
    ) -> int:
        """Create the stream on the broker (one replica: the broker is one process)."""
        await trio.lowlevel.checkpoint()
        self._broker.add_stream(name, subjects)
        return 1

    async def stream_subscribe(
        self,
        subject: str,
        stream: str,
        *,
        buffer: int = 65536,
        deliver: Literal["new", "last_per_subject"] = "new",
    ) -> Subscription:
        """Like :meth:`subscribe`, but only messages ``stream`` stored (duplicates dropped)."""
        await trio.lowlevel.checkpoint()

        def unsubscribe() -> None:
            self._broker._stream_subs.get(stream, []).remove(sub)

        sub = Subscription(subject, buffer, unsubscribe)
        self._broker._stream_subs.setdefault(stream, []).append(sub)
        return sub

    async def aclose(self) -> None:
        """Detach from the broker (also when called in a cancelled scope)."""
        self._closed = True
        self._event_send.close()
        for sub in self._subs:
            sub._send.close()
        self._subs.clear()
        if self in self._broker._transports:
            self._broker._transports.remove(self)
        await trio.lowlevel.checkpoint()
