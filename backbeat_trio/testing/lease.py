"""An in-memory lease store for deterministic HA tests: a memory KV key with latency and
partitions."""

from __future__ import annotations

import trio

from .._services.lease import _WATCH_BUFFER, LEASE_KEY
from .._transport.jetstream import KVEntry, KVWatch
from .memory import MemoryBroker


class MemoryLeaseStore:
    """A pure-trio lease store for deterministic tests (shared by every pulse of a test).

    The lease is one key of a KV bucket on a :class:`MemoryBroker` (its own unless one is
    given): revisions, compare-and-set and the watch are the broker's. What this adds is what
    a test needs to stage trouble: ``latency`` delays every call (each way); :meth:`handle`
    gives one pulse its own view that a test can cut off (``partitioned = True``: calls hang
    until the caller's bound, and its watch delivers nothing).

    Attributes:
        writes: CAS writes stored (through any view).
        conflicts: CAS writes lost (through any view).
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        broker: MemoryBroker | None = None,
        bucket: str = "BACKBEAT_HA_memory",
        key: str = LEASE_KEY,
    ) -> None:
        self.latency = latency
        self.broker = MemoryBroker() if broker is None else broker
        self.bucket = bucket
        self.key = key
        self.broker.add_kv(bucket)
        self.writes = 0
        self.conflicts = 0
        self.partitioned = False

    def __repr__(self) -> str:
        return f"<MemoryLeaseStore rev={self.key_revision} writes={self.writes}>"

    @property
    def _shared(self) -> MemoryLeaseStore:
        """The store whose counters every view shares."""
        return self

    @property
    def key_revision(self) -> int | None:
        """The key's latest revision; None before its first write."""
        entry = self.broker.kv_get(self.bucket, self.key)
        return None if entry is None else entry.revision

    @property
    def value(self) -> bytes | None:
        """The key's latest value."""
        entry = self.broker.kv_get(self.bucket, self.key)
        return None if entry is None else entry.value

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
        """Nothing to create (the bucket exists)."""
        await self._delay()

    async def read(self) -> KVEntry | None:
        """The current revision and value."""
        await self._delay()
        result = self.broker.kv_get(self.bucket, self.key)
        await self._delay()
        return result

    async def write(self, value: bytes, *, last: int) -> int | None:
        """Compare-and-set."""
        await self._delay()
        revision = self.broker.kv_put(self.bucket, self.key, value, last=last)
        if revision is None:
            self._shared.conflicts += 1
        else:
            self._shared.writes += 1
        await self._delay()
        return revision

    async def watch(self) -> KVWatch:
        """The current revision (if any), then every stored write, while not partitioned."""
        await self._delay()
        watch = KVWatch(self.key, _WATCH_BUFFER)

        def deliver(entry: KVEntry) -> None:
            if not self.partitioned:
                watch._deliver(entry)

        watch._stop = self.broker.kv_watch(self.bucket, self.key, deliver)
        return watch


class _MemoryLeaseHandle(MemoryLeaseStore):
    def __init__(self, backend: MemoryLeaseStore) -> None:
        super().__init__(
            latency=backend.latency, broker=backend.broker, bucket=backend.bucket, key=backend.key
        )
        self._backend = backend

    def __repr__(self) -> str:
        return f"<MemoryLeaseStore view partitioned={self.partitioned} of {self._backend!r}>"

    @property
    def _shared(self) -> MemoryLeaseStore:
        return self._backend
