"""The JetStream interface: streams and key/value buckets, as the services need them.

Pure trio: nothing here imports asyncio or nats-py. The NATS implementation is
:class:`backbeat_trio._bridge.jetstream.NatsJetStream`; an in-memory one lives in
:mod:`backbeat_trio.testing.memory`. Every method returns plain values (ints, bytes, the
NamedTuples below), never a library's objects.

Outcomes that callers must tell apart are *returned*, not raised: a compare-and-set that lost
(``None`` from :meth:`JetStream.kv_write`) is a definite answer, while a
:class:`~backbeat_trio._errors.BackbeatError` (timeout, no responders, connection lost) means the
outcome is unknown -- the write may or may not have been stored.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Literal, NamedTuple, Protocol

import trio

from .base import Message, Subscription, _Feed

__all__ = [
    "KV_OPERATION_HEADER",
    "JetStream",
    "KVEntry",
    "KVWatch",
    "StoredMessage",
    "StreamLimits",
    "StreamSummary",
    "kv_stream",
    "kv_subject",
]

log = logging.getLogger("backbeat_trio.jetstream")

#: Header marking a KV delete or purge entry.
KV_OPERATION_HEADER: Final = "KV-Operation"


def kv_stream(bucket: str) -> str:
    """The stream behind KV bucket ``bucket``."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str) -> str:
    """The subject a KV key's writes are published on."""
    return f"$KV.{bucket}.{key}"


class StoredMessage(NamedTuple):
    """One message read back from a stream."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] | None


class StreamLimits(NamedTuple):
    """What a stream keeps: message, byte and age limits (-1 / None: none), which messages go
    when one is reached (``old``: the oldest make room; ``new``: new ones are refused), and the
    de-duplication window in seconds (JetStream wants it no longer than ``max_age``)."""

    max_msgs: int = -1
    max_bytes: int = -1
    max_age: float | None = None
    discard: Literal["old", "new"] = "old"
    duplicate_window: float = 120.0

    def conform(self, existing: StreamLimits) -> StreamLimits | None:
        """The limits an ``existing`` stream must be updated to so that every bound asked for
        here is in force; None when it already is.

        Only bounds are imposed: a limit asked for as none (-1, None) leaves the existing one,
        so a caller that asks for less never loosens what an operator set. ``discard`` comes
        with any change, and a duplicate window longer than the new ``max_age`` is shortened.
        """
        bounded = self.max_msgs > 0 or self.max_bytes > 0 or self.max_age is not None
        max_age = existing.max_age if self.max_age is None else self.max_age
        window = existing.duplicate_window
        if max_age is not None and window > max_age:
            window = min(self.duplicate_window, max_age)
        updated = StreamLimits(
            max_msgs=self.max_msgs if self.max_msgs > 0 else existing.max_msgs,
            max_bytes=self.max_bytes if self.max_bytes > 0 else existing.max_bytes,
            max_age=max_age,
            discard=self.discard if bounded else existing.discard,
            duplicate_window=window,
        )
        return None if updated._in_ns() == existing._in_ns() else updated

    def _in_ns(self) -> tuple[object, ...]:
        # JetStream stores ages and windows as nanoseconds: compare what it would store
        age = None if self.max_age is None else round(self.max_age * 1e9)
        window = round(self.duplicate_window * 1e9)
        return (self.max_msgs, self.max_bytes, age, self.discard, window)


class StreamSummary(NamedTuple):
    """A stream's bounds, size and placement."""

    name: str
    first_seq: int
    last_seq: int
    messages: int
    replicas: int
    leader: str | None
    subjects: tuple[str, ...]
    #: the stream's message limit (-1: none)
    max_msgs: int = -1


class KVEntry(NamedTuple):
    """One stored revision of a key; ``value`` is None for a delete or purge marker."""

    revision: int
    value: bytes | None

    @classmethod
    def of(cls, revision: int, data: bytes, headers: dict[str, str] | None) -> KVEntry:
        """The entry a stream message stores (a delete/purge marker has no value)."""
        if (headers or {}).get(KV_OPERATION_HEADER) in ("DEL", "PURGE"):
            return cls(revision, None)
        return cls(revision, bytes(data))


class KVWatch(_Feed[KVEntry]):
    """The stored revisions of one key: ``entries`` is a bounded trio channel, the latest
    revision first, then every new one; overflow is counted in ``dropped``.

    Only *stored* writes arrive (a lost compare-and-set never does). The channel ends when the
    watch is closed (:meth:`aclose`) or its transport ended it.
    """

    def __init__(self, key: str, buffer: int) -> None:
        super().__init__(buffer)
        self.key = key
        self.entries = self._receive
        self._stop: Callable[[], Awaitable[None] | None] | None = None
        self.unreadable = 0

    def __repr__(self) -> str:
        return f"<KVWatch {self.key!r} delivered={self.delivered} dropped={self.dropped}>"

    def _deliver_message(self, msg: Message, revision: Callable[[Message], int]) -> None:
        """Deliver a stream message (``revision`` reads its stream sequence); an unreadable one
        is counted and logged, never raised into whatever delivers it."""
        try:
            entry = KVEntry.of(revision(msg), msg.data, msg.headers)
        except (AttributeError, TypeError, ValueError) as exc:
            self.unreadable += 1
            log.warning("watch of %r: unreadable message on %r: %r", self.key, msg.subject, exc)
            return
        self._deliver(entry)

    async def aclose(self) -> None:
        """Stop watching and close ``entries``."""
        self._send.close()
        stop, self._stop = self._stop, None
        if stop is not None:
            result = stop()
            if result is not None:
                await result
        else:
            await trio.lowlevel.checkpoint()


class JetStream(Protocol):
    """JetStream as the services use it: streams, stream reads, a KV bucket's keys.

    Every method raises :class:`~backbeat_trio._errors.BackbeatError` (``NotConnected`` when
    the connection is down) when JetStream did not give an answer; "not found" is an answer
    (``None`` or ``[]``), not an error.
    """

    def with_op_timeout(self, op_timeout: float) -> JetStream:
        """The same JetStream, whose requests each give up after ``op_timeout`` seconds (a
        JetStream API request's own bound; callers still bound whole operations with cancel
        scopes)."""
        ...

    # -- streams ---------------------------------------------------------------------------------
    async def find_stream(self, subject: str) -> str | None:
        """The stream capturing ``subject``; None when none does (or JetStream is off)."""
        ...

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
        """Create the stream unless it exists; returns its replica count. ``replicas`` > 1 that
        cannot be placed falls back to 1.

        The limits are a :class:`StreamLimits`'s. An existing stream is updated so that every
        bound asked for is in force (:meth:`StreamLimits.conform`: a stream created without
        limits gets them; a limit asked for as none leaves the stream's own); its subjects and
        replicas are left as they are."""
        ...

    async def stream_summary(self, name: str) -> StreamSummary | None:
        """The stream's bounds and placement; None when it does not exist."""
        ...

    async def stream_read(
        self,
        name: str,
        subject: str,
        start_seq: int,
        *,
        max_msgs: int,
        stop_seq: int | None = None,
    ) -> list[StoredMessage]:
        """Up to ``max_msgs`` messages on ``subject`` from ``start_seq`` on, in stream order,
        up to ``stop_seq`` (default: the stream's last sequence when the call started)."""
        ...

    async def stream_find(self, name: str, subject: str, seq: int) -> StoredMessage | None:
        """The first message on ``subject`` at or after sequence ``seq``; None if there is
        none."""
        ...

    async def stream_last(self, name: str, subject: str) -> StoredMessage | None:
        """The last message ``name`` stores on ``subject``; None when there is none (or no
        stream)."""
        ...

    async def stream_subscribe(
        self,
        subject: str,
        stream: str,
        *,
        buffer: int = 65536,
        deliver: Literal["new", "last_per_subject"] = "new",
        start_seq: int | None = None,
    ) -> Subscription:
        """What ``stream`` stores on ``subject`` from now on (``last_per_subject``: the latest
        stored message of each matching subject first; ``start_seq``, in place of ``deliver``:
        every message from that stream sequence on), each ``Nats-Msg-Id`` once.
        :meth:`sequence_of` reads each delivered message's stream sequence."""
        ...

    def sequence_of(self, msg: Message) -> int | None:
        """The stream sequence of a message :meth:`stream_subscribe` delivered; None for a
        message that carries none (one a core subscription delivered)."""
        ...

    # -- key/value -------------------------------------------------------------------------------
    async def ensure_kv(
        self, bucket: str, *, replicas: int = 1, history: int = 1, description: str = ""
    ) -> int:
        """Create the KV bucket unless it exists (several callers may race); returns its replica
        count. ``replicas`` > 1 that cannot be placed falls back to 1."""
        ...

    async def kv_read(self, bucket: str, key: str) -> KVEntry | None:
        """The key's latest revision (from the stream leader); None when it was never written."""
        ...

    async def kv_write(self, bucket: str, key: str, value: bytes, *, last: int) -> int | None:
        """Compare-and-set: store ``value`` only if the key's latest revision is ``last`` (0: the
        key has no entry). Returns the new revision, or None when the CAS lost (nothing stored).

        Raises:
            BackbeatError: the outcome is unknown (timeout, no responders, connection lost).
        """
        ...

    async def kv_watch(self, bucket: str, key: str, *, buffer: int = 256) -> KVWatch:
        """Watch ``key``: its latest stored revision, then every new one."""
        ...
