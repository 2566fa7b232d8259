"""An in-memory lease store for deterministic HA tests."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import trio

from .._services.lease import _WATCH_BUFFER, LEASE_KEY
from .._transport.base import MemoryMessage, Message, Subscription

if TYPE_CHECKING:
    pass


class MemoryLeaseStore:
    """A pure-trio lease store for deterministic tests (shared by every pulse of a test).

    ``latency`` delays every call (each way); :meth:`handle` gives one pulse its own view that a
    test can cut off (``partitioned = True``: calls hang until the caller's bound).
    """

    def __init__(self, *, latency: float = 0.0) -> None:
        self.latency = latency
        self.revision = 0
        self.value: bytes | None = None
        self.key_revision: int | None = None
        self.writes = 0
        self.conflicts = 0
        self.partitioned = False
        self._watchers: list[tuple[MemoryLeaseStore, Subscription]] = []

    def __repr__(self) -> str:
        return f"<MemoryLeaseStore rev={self.key_revision} writes={self.writes}>"

    def handle(self) -> MemoryLeaseStore:
        """A view of this store with its own ``partitioned`` and ``latency`` switches."""
        return _MemoryLeaseHandle(self)

    async def _delay(self) -> None:
        if self.partitioned:
            await trio.sleep_forever()
        if self.latency:
            await trio.sleep(self.latency)
        else:
            await trio.lowlevel.checkpoint()

    async def ensure(self) -> None:
        """Nothing to create."""
        await self._delay()

    async def read(self) -> tuple[int, bytes | None] | None:
        """The current revision and value."""
        await self._delay()
        result = self._read_now()
        await self._delay()
        return result

    async def write(self, value: bytes, *, last: int) -> int | None:
        """Compare-and-set."""
        await self._delay()
        result = self._write_now(value, last)
        await self._delay()
        return result

    async def watch(self) -> Subscription:
        """The current revision (if any), then every stored write, while not partitioned."""
        await self._delay()
        return self._watch_now(self)

    def entry(self, msg: Message) -> tuple[int, bytes | None]:
        """``(revision, value)`` of a watched message."""
        return int((msg.headers or {})["Revision"]), msg.data

    def _watch_now(self, view: MemoryLeaseStore) -> Subscription:
        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._watchers.remove((view, sub))

        sub = Subscription(LEASE_KEY, _WATCH_BUFFER, unsubscribe)
        self._watchers.append((view, sub))
        if self.key_revision is not None:
            sub._deliver(self._entry_message(self.key_revision, self.value))
        return sub

    @staticmethod
    def _entry_message(revision: int, value: bytes | None) -> MemoryMessage:
        return MemoryMessage(LEASE_KEY, value or b"", headers={"Revision": str(revision)})

    def _read_now(self) -> tuple[int, bytes | None] | None:
        return None if self.key_revision is None else (self.key_revision, self.value)

    def _write_now(self, value: bytes, last: int) -> int | None:
        if (self.key_revision or 0) != last:
            self.conflicts += 1
            return None
        self.revision += 1
        self.writes += 1
        self.key_revision, self.value = self.revision, bytes(value)
        for view, sub in self._watchers:
            if not view.partitioned:
                sub._deliver(self._entry_message(self.revision, self.value))
        return self.revision


class _MemoryLeaseHandle(MemoryLeaseStore):
    def __init__(self, backend: MemoryLeaseStore) -> None:
        super().__init__(latency=backend.latency)
        self._backend = backend

    def __repr__(self) -> str:
        return f"<MemoryLeaseStore view partitioned={self.partitioned} of {self._backend!r}>"

    # the view's own delays (and partition), the shared backend's state
    def _read_now(self) -> tuple[int, bytes | None] | None:
        return self._backend._read_now()

    def _write_now(self, value: bytes, last: int) -> int | None:
        return self._backend._write_now(value, last)

    def _watch_now(self, view: MemoryLeaseStore) -> Subscription:
        return self._backend._watch_now(view)
