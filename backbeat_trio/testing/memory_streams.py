"""In-memory JetStream streams for :mod:`backbeat_trio.testing.memory`: what a stream stores,
its limits, and the messages it delivers (pure trio data, no I/O)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from .._transport.base import MemoryMessage
from .._transport.jetstream import StoredMessage, StreamLimits, StreamSummary

__all__ = ["StreamDelivery", "stored_size", "subject_matches"]


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


#: What a stream hands each of its watchers: the stored copy and the message as published.
_StreamWatcher = Callable[[StoredMessage, MemoryMessage], None]


def stored_size(msg: StoredMessage) -> int:
    """The bytes a stored message counts against a memory stream's ``max_bytes``: subject,
    headers (as NATS frames them) and body, close to what JetStream counts."""
    headers = msg.headers or {}
    framed = 12 + sum(len(k) + len(v) + 4 for k, v in headers.items()) if headers else 0
    return len(msg.subject) + framed + len(msg.data)


@dataclass
class _MemoryStream:
    name: str
    subjects: list[str]
    max_msgs: int = -1
    #: messages kept per subject (a KV bucket's history); -1: no limit
    max_per_subject: int = -1
    messages: list[StoredMessage] = field(default_factory=list)
    last_seq: int = 0
    msg_ids: dict[str, int] = field(default_factory=dict)  # Nats-Msg-Id -> its stream seq
    watchers: list[tuple[str, _StreamWatcher]] = field(default_factory=list)
    #: byte limit (-1: none), enforced as ``discard="old"``; ``max_age``, ``discard`` and
    #: ``duplicate_window`` are kept for :attr:`limits` only (not enforced: no clock here)
    max_bytes: int = -1
    max_age: float | None = None
    discard: Literal["old", "new"] = "old"
    duplicate_window: float = 120.0
    stored_bytes: int = 0

    @property
    def limits(self) -> StreamLimits:
        """The stream's limits."""
        return StreamLimits(
            self.max_msgs, self.max_bytes, self.max_age, self.discard, self.duplicate_window
        )

    def bound(self, limits: StreamLimits) -> None:
        """Set the stream's limits (a stream update); the oldest messages past them go."""
        self.max_msgs, self.max_bytes, self.max_age, self.discard, self.duplicate_window = limits
        self._trim()

    def _keep(self, stored: StoredMessage) -> None:
        self.messages.append(stored)
        self.stored_bytes += stored_size(stored)
        if self.max_per_subject > 0:
            same = [i for i, m in enumerate(self.messages) if m.subject == stored.subject]
            for i in reversed(same[: -self.max_per_subject]):
                self.stored_bytes -= stored_size(self.messages.pop(i))
        self._trim()

    def _trim(self) -> None:
        # the oldest go first (discard old), as many as either limit needs, in one cut
        drop = max(0, len(self.messages) - self.max_msgs) if self.max_msgs > 0 else 0
        freed = sum(map(stored_size, self.messages[:drop]))
        if self.max_bytes > 0:
            while drop < len(self.messages) and self.stored_bytes - freed > self.max_bytes:
                freed += stored_size(self.messages[drop])
                drop += 1
        if drop:
            del self.messages[:drop]
            self.stored_bytes -= freed

    def captures(self, subject: str) -> bool:
        return any(subject_matches(p, subject) for p in self.subjects)

    def stored_on(self, subject: str) -> list[StoredMessage]:
        """The messages kept on ``subject`` (wildcards allowed), oldest first."""
        return [m for m in self.messages if subject_matches(subject, m.subject)]

    def last_on(self, subject: str) -> StoredMessage | None:
        return next(
            (m for m in reversed(self.messages) if subject_matches(subject, m.subject)), None
        )

    def store(self, msg: MemoryMessage) -> StoredMessage | None:
        """Store ``msg`` (None: a duplicate ``Nats-Msg-Id``, dropped) and tell the watchers."""
        msg_id = (msg.headers or {}).get("Nats-Msg-Id")
        if msg_id is not None:
            if msg_id in self.msg_ids:
                return None
            self.msg_ids[msg_id] = self.last_seq + 1
        self.last_seq += 1
        stored = StoredMessage(self.last_seq, msg.subject, msg.data, msg.headers)
        self._keep(stored)
        for subject, watcher in list(self.watchers):
            if subject_matches(subject, msg.subject):
                watcher(stored, msg)
        return stored

    def watch(
        self, subject: str, watcher: _StreamWatcher, *, last_per_subject: bool = False
    ) -> Callable[[], None]:
        """Call ``watcher`` for each message stored on ``subject`` from now on (first, with
        ``last_per_subject``, for the latest stored one of each matching subject); returns the
        function that stops it."""
        if last_per_subject:
            latest = {m.subject: m for m in self.stored_on(subject)}
            for stored in sorted(latest.values()):
                watcher(stored, MemoryMessage(stored.subject, stored.data, "", stored.headers))
        entry = (subject, watcher)
        self.watchers.append(entry)

        def stop() -> None:
            if entry in self.watchers:
                self.watchers.remove(entry)

        return stop

    def summary(self) -> StreamSummary:
        first = self.messages[0].seq if self.messages else self.last_seq + 1
        return StreamSummary(
            name=self.name,
            first_seq=first,
            last_seq=self.last_seq,
            messages=len(self.messages),
            replicas=1,
            leader="memory",
            subjects=tuple(self.subjects),
            max_msgs=self.max_msgs,
        )


@dataclass(slots=True)
class StreamDelivery(MemoryMessage):
    """A message :meth:`MemoryJetStream.stream_subscribe` delivered: ``seq`` is its stream
    sequence."""

    seq: int = 0
