"""An in-memory broker and transport (pure trio), for deterministic tests on MockClock.

Never the only proof that something works over NATS.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable, Hashable, Sequence
from typing import Literal, TypeVar

import msgspec
import trio

from .._errors import JetStreamError, NotConnected
from .._transport.base import ConnEvent, EventFeed, MemoryMessage, Message, Subscription
from .._transport.jetstream import (
    KVEntry,
    KVWatch,
    StoredMessage,
    StreamLimits,
    StreamSummary,
    kv_stream,
    kv_subject,
)
from .._transport.shared import Prepare, SharedSubscription, SharedSubscriptions
from .memory_streams import StreamDelivery as StreamDelivery
from .memory_streams import _MemoryStream
from .memory_streams import stored_size as stored_size
from .memory_streams import subject_matches as subject_matches

T = TypeVar("T")

log = logging.getLogger("backbeat_trio.testing")


# ------------------------------------------------------------------------------------------------
# In-memory transport (pure trio) for deterministic tests
# ------------------------------------------------------------------------------------------------
class MemoryBroker:
    """A tiny in-process NATS look-alike: subjects with wildcards, headers, reply subjects and
    JetStream-like streams that ack publishes, drop duplicate ``Nats-Msg-Id`` s and keep their
    messages with sequence numbers (range reads, last per subject), and KV buckets on such
    streams (revisions, compare-and-set, watches): see :class:`MemoryJetStream`.

    ``set_down()`` / ``set_up()`` simulate an outage: transports see disconnected/reconnected
    events and what is published meanwhile is lost (as bytes in flight are on a real server).
    """

    def __init__(self) -> None:
        self._transports: list[MemoryTransport] = []
        self.streams: dict[str, _MemoryStream] = {}
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

    def add_stream(
        self,
        name: str,
        subjects: Sequence[str],
        *,
        max_msgs: int = -1,
        max_per_subject: int = -1,
    ) -> None:
        """Create a stream that captures ``subjects`` (an existing one is left as it is)."""
        self.streams.setdefault(
            name, _MemoryStream(name, list(subjects), max_msgs, max_per_subject)
        )

    def stream_of(self, subject: str) -> _MemoryStream | None:
        """The stream capturing ``subject``, if any."""
        for stream in self.streams.values():
            if stream.captures(subject):
                return stream
        return None

    # -- key/value (synchronous; :class:`MemoryJetStream` and the memory lease store use them) --
    def add_kv(self, bucket: str, *, history: int = 1) -> None:
        """Create KV bucket ``bucket`` (its stream ``KV_<bucket>``) unless it exists."""
        self.add_stream(kv_stream(bucket), [f"$KV.{bucket}.>"], max_per_subject=max(1, history))

    def _kv(self, bucket: str) -> _MemoryStream:
        stream = self.streams.get(kv_stream(bucket))
        if stream is None:
            raise JetStreamError(f"KV bucket {bucket!r} does not exist", code=10059)
        return stream

    def kv_get(self, bucket: str, key: str) -> KVEntry | None:
        """The key's latest revision; None when it was never written."""
        stored = self._kv(bucket).last_on(kv_subject(bucket, key))
        return None if stored is None else KVEntry.of(stored.seq, stored.data, stored.headers)

    def kv_put(self, bucket: str, key: str, value: bytes, *, last: int) -> int | None:
        """Compare-and-set (``last`` 0: the key has no entry); None when the CAS lost."""
        stream, subject = self._kv(bucket), kv_subject(bucket, key)
        current = stream.last_on(subject)
        if (0 if current is None else current.seq) != last:
            return None
        msg = MemoryMessage(subject, bytes(value))
        stored = stream.store(msg)
        assert stored is not None  # no Nats-Msg-Id: never a duplicate
        self._deliver_core(msg)
        return stored.seq

    def kv_watch(
        self, bucket: str, key: str, deliver: Callable[[KVEntry], None]
    ) -> Callable[[], None]:
        """Hand ``deliver`` the key's latest revision, then each new one; returns the function
        that stops it."""

        def watcher(stored: StoredMessage, _msg: MemoryMessage) -> None:
            deliver(KVEntry.of(stored.seq, stored.data, stored.headers))

        return self._kv(bucket).watch(kv_subject(bucket, key), watcher, last_per_subject=True)

    # -- outages ---------------------------------------------------------------------------------
    def set_down(self) -> None:
        """Simulate the server going away."""
        self.up = False
        for t in self._transports:
            t._push(ConnEvent("disconnected"))

    def lose_next(self, count: int = 1) -> None:
        """The next ``count`` messages vanish in flight with no event at all (a connection dying
        under a publish), so only acknowledgements can tell."""
        self._lose_next += count

    def set_up(self) -> None:
        """Simulate the server coming back."""
        self.up = True
        for t in self._transports:
            t._push(ConnEvent("reconnected", "memory"))

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
        stream = self.stream_of(msg.subject)
        if stream is not None:
            if not self.jetstream_available:
                if msg.reply:
                    self._route(MemoryMessage(msg.reply, b"", headers={"Status": "503"}))
            else:
                taken += 1
                stored = stream.store(msg)
                if msg.reply:
                    ack: dict[str, object] = {"stream": stream.name, "seq": stream.last_seq}
                    if stored is None:
                        # as nats-server says it: the seq of the message holding the id
                        ack["seq"] = stream.msg_ids[(msg.headers or {})["Nats-Msg-Id"]]
                        ack["duplicate"] = True
                    self._route(MemoryMessage(msg.reply, msgspec.json.encode(ack)))
        return taken + self._deliver_core(msg)

    def _deliver_core(self, msg: MemoryMessage) -> int:
        taken = 0
        for t in self._transports:
            for sub in t._subs:
                if subject_matches(sub.subject, msg.subject):
                    sub._deliver(msg)
                    taken += 1
        return taken


class MemoryTransport(EventFeed):
    """The :class:`Transport` interface over a :class:`MemoryBroker`; pure trio, deterministic.

    Like :class:`~backbeat_trio.NatsTransport` it offers :meth:`subscribe_shared`, so clients
    handed one memory transport share one beat subscription, as many agents on one NATS
    connection do.
    """

    def __init__(self, broker: MemoryBroker) -> None:
        super().__init__()
        self._broker = broker
        self._subs: list[Subscription] = []
        self._closed = False
        self.published = 0
        # members read their channels (a network hop), as with subscribe(); only ``prepare``
        # runs as the broker routes a message
        self._shared = SharedSubscriptions(self._subscribe_handing_to, inline=False)

    def __repr__(self) -> str:
        return f"<MemoryTransport connected={self.connected} published={self.published}>"

    @property
    def connected(self) -> bool:
        """True while the broker is up and this transport open."""
        return self._broker.up and not self._closed

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

    async def _subscribe_handing_to(
        self, subject: str, handler: Callable[[Message], None]
    ) -> Subscription:
        # through subscribe(), as NatsTransport does, so a subclass's subscribe rules both
        # routes; subscribe() declines handlers, the shared route's own is attached here. It
        # runs one scheduler hop after the publish, as after a network (a publisher never runs
        # a subscriber's code inside its publish call), in order, and in no task of its own.
        sub = await self.subscribe(subject, buffer=1)
        token = trio.lowlevel.current_trio_token()

        def take(msg: Message) -> None:
            if self._closed or sub not in self._subs:
                return  # unsubscribed, or closed, while the message was on its way
            try:
                handler(msg)
            except Exception:  # not raised into trio's scheduler: logged, as nats-py does
                log.exception("a shared subscription's handler on %r raised", subject)

        def hop(msg: Message) -> None:
            # the run is ending: nobody is left to hear it
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(take, msg)

        sub._handler = hop
        return sub

    async def subscribe_shared(
        self,
        subject: str,
        *,
        key: Hashable,
        prepare: Callable[[], Prepare[T]],
        handler: Callable[[T], None] | None = None,
        buffer: int = 1024,
    ) -> SharedSubscription[T]:
        """Join the one subscription to ``subject`` that every user of this transport with the
        same ``key`` shares (see :mod:`backbeat_trio._transport.shared`): ``prepare`` turns each
        message into one item once, and every member reads it on its own ``messages`` channel
        (``handler`` is not called inline, as with :meth:`subscribe`).

        Raises:
            NotConnected: the transport is closed.
        """
        return await self._shared.join(
            subject, key=key, prepare=prepare, handler=handler, buffer=buffer
        )

    @property
    def shared_subscriptions(self) -> SharedSubscriptions:
        """This transport's shared subscriptions (their members and ``prepare`` counters)."""
        return self._shared

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

    @property
    def jetstream(self) -> MemoryJetStream:
        """Streams and KV buckets on the broker (:class:`MemoryJetStream`)."""
        return MemoryJetStream(self)

    async def aclose(self) -> None:
        """Detach from the broker (also when called in a cancelled scope)."""
        self._closed = True
        self._end_events()
        self._shared.close()
        for sub in self._subs:
            sub._send.close()
        self._subs.clear()
        if self in self._broker._transports:
            self._broker._transports.remove(self)
        await trio.lowlevel.checkpoint()


class MemoryJetStream:
    """The :class:`~backbeat_trio._transport.jetstream.JetStream` of a :class:`MemoryTransport`:
    the broker's streams and KV buckets, answered at once (each call checkpoints).

    Like JetStream, it raises ``NotConnected`` while the broker is down (or the transport closed)
    and :class:`~backbeat_trio._errors.JetStreamError` while ``broker.jetstream_available`` is
    False; the outcome of a write is then unknown to the caller (here: nothing was stored).
    """

    def __init__(self, transport: MemoryTransport) -> None:
        self._transport = transport
        self._broker = transport._broker

    def __repr__(self) -> str:
        return f"<MemoryJetStream of {self._broker!r}>"

    def with_op_timeout(self, op_timeout: float) -> MemoryJetStream:
        """This JetStream (it answers at once: nothing to bound)."""
        return self

    async def _ready(self, what: str) -> None:
        await trio.lowlevel.checkpoint()
        if self._transport._closed:
            raise NotConnected(f"{what}: the transport is closed")
        if not self._broker.up:
            raise NotConnected(f"{what}: the connection is down")
        if not self._broker.jetstream_available:
            raise JetStreamError(f"{what}: JetStream did not answer (is it enabled?)")

    def _stream(self, name: str) -> _MemoryStream | None:
        return self._broker.streams.get(name)

    # -- streams ---------------------------------------------------------------------------------
    async def find_stream(self, subject: str) -> str | None:
        """The stream capturing ``subject``, if any."""
        await trio.lowlevel.checkpoint()
        stream = self._broker.stream_of(subject)
        return None if stream is None else stream.name

    async def ensure_stream(
        self,
        name: str,
        subjects: Sequence[str],
        *,
        replicas: int = 1,
        max_msgs: int = -1,
        max_bytes: int = -1,
        max_age: float | None = None,
        discard: Literal["old", "new"] = "old",
        duplicate_window: float = 120.0,
        description: str = "",
    ) -> int:
        """Create the stream unless it exists, with the asked bounds in force (an existing one
        is updated as :meth:`StreamLimits.conform` says); one replica (the broker is one
        process). ``max_msgs`` and ``max_bytes`` are enforced, discarding the oldest; ``max_age``,
        ``discard="new"`` and ``duplicate_window`` are not (duplicates are dropped for ever)."""
        await self._ready(f"cannot create stream {name!r}")
        asked = StreamLimits(max_msgs, max_bytes, max_age, discard, duplicate_window)
        stream = self._stream(name)
        if stream is None:
            self._broker.add_stream(name, subjects)
            self._broker.streams[name].bound(asked)
        elif (updated := asked.conform(stream.limits)) is not None:
            stream.bound(updated)
        return 1

    async def stream_summary(self, name: str) -> StreamSummary | None:
        """The stream's bounds; None when it does not exist."""
        await self._ready(f"stream info of {name!r}")
        stream = self._stream(name)
        return None if stream is None else stream.summary()

    async def stream_read(
        self,
        name: str,
        subject: str,
        start_seq: int,
        *,
        max_msgs: int,
        stop_seq: int | None = None,
    ) -> list[StoredMessage]:
        """Up to ``max_msgs`` messages on ``subject`` from ``start_seq`` to ``stop_seq``."""
        await self._ready(f"read stream {name!r}")
        stream = self._stream(name)
        if stream is None or max_msgs <= 0:
            return []
        stop = stream.last_seq if stop_seq is None else stop_seq
        return [m for m in stream.stored_on(subject) if start_seq <= m.seq <= stop][:max_msgs]

    async def stream_find(self, name: str, subject: str, seq: int) -> StoredMessage | None:
        """The first message on ``subject`` at or after ``seq``."""
        await self._ready(f"read stream {name!r}")
        stream = self._stream(name)
        if stream is None:
            return None
        return next((m for m in stream.stored_on(subject) if m.seq >= seq), None)

    async def stream_last(self, name: str, subject: str) -> StoredMessage | None:
        """The last message on ``subject``."""
        await self._ready(f"read stream {name!r}")
        stream = self._stream(name)
        return None if stream is None else stream.last_on(subject)

    async def stream_subscribe(
        self,
        subject: str,
        stream: str,
        *,
        buffer: int = 65536,
        deliver: Literal["new", "last_per_subject"] = "new",
        start_seq: int | None = None,
    ) -> Subscription:
        """What ``stream`` stores on ``subject`` (each ``Nats-Msg-Id`` once), delivered as it was
        published; ``last_per_subject`` starts with the latest stored message of each subject,
        ``start_seq`` with every stored one from that sequence on."""
        await trio.lowlevel.checkpoint()
        found = self._stream(stream)
        if found is None:
            raise JetStreamError(f"stream subscribe {stream}/{subject!r}: no such stream")
        stop: list[Callable[[], None]] = []

        def unsubscribe() -> None:
            while stop:
                stop.pop()()

        sub = Subscription(subject, buffer, unsubscribe)

        def deliver_stored(stored: StoredMessage, _msg: MemoryMessage) -> None:
            msg = StreamDelivery(stored.subject, stored.data, "", stored.headers, stored.seq)
            sub._deliver(msg)

        if start_seq is not None:
            for stored in found.stored_on(subject):
                if stored.seq >= start_seq:
                    deliver_stored(stored, MemoryMessage(stored.subject, stored.data))
        last_per_subject = start_seq is None and deliver == "last_per_subject"
        stop.append(found.watch(subject, deliver_stored, last_per_subject=last_per_subject))
        return sub

    def sequence_of(self, msg: Message) -> int | None:
        """The stream sequence of a message :meth:`stream_subscribe` delivered."""
        return msg.seq if isinstance(msg, StreamDelivery) else None

    # -- key/value -------------------------------------------------------------------------------
    async def ensure_kv(
        self, bucket: str, *, replicas: int = 1, history: int = 1, description: str = ""
    ) -> int:
        """Create the KV bucket unless it exists; one replica."""
        await self._ready(f"cannot create KV bucket {bucket!r}")
        self._broker.add_kv(bucket, history=history)
        return 1

    async def kv_read(self, bucket: str, key: str) -> KVEntry | None:
        """The key's latest revision; None when it was never written."""
        await self._ready(f"read {bucket}/{key}")
        return self._broker.kv_get(bucket, key)

    async def kv_write(self, bucket: str, key: str, value: bytes, *, last: int) -> int | None:
        """Compare-and-set; None when the CAS lost."""
        await self._ready(f"write {bucket}/{key}")
        return self._broker.kv_put(bucket, key, value, last=last)

    async def kv_watch(self, bucket: str, key: str, *, buffer: int = 256) -> KVWatch:
        """The key's latest revision, then every new one."""
        await self._ready(f"watch {bucket}/{key}")
        watch = KVWatch(key, buffer)
        watch._stop = self._broker.kv_watch(bucket, key, watch._deliver)
        return watch
