"""Where a lease lives: the :class:`LeaseStore` interface and the KV store every transport's
JetStream offers (re-exported by :mod:`backbeat_trio._services.lease`).
"""

from __future__ import annotations

from typing import Final, Protocol

import trio

from .._core.lease import lease_bucket_name
from .._errors import BackbeatError
from .._transport.base import Transport
from .._transport.jetstream import KVEntry, KVWatch

LEASE_KEY: Final = "pulse-lease"
#: The HA reverbs' lease, in the same bucket as the pulses'.
REVERB_LEASE_KEY: Final = "reverb-lease"
#: Lease revisions a watch may hold before the oldest unread ones are dropped (a follower reads
#: them as they come; the sparse reads catch anything dropped).
_WATCH_BUFFER: Final = 256


# --- lease stores ---------------------------------------------------------------------------------
class LeaseStore(Protocol):
    """Where the lease lives: one key with compare-and-set writes.

    ``read``/``write`` raise :class:`BackbeatError` when the outcome is unknown; a lost CAS is the
    definite answer None from ``write``.
    """

    async def ensure(self) -> None:
        """Create the bucket if it is missing."""
        ...

    async def read(self) -> tuple[int, bytes | None] | None:
        """``None`` (no key), or ``(revision, value)``; value None for a delete marker."""
        ...

    async def write(self, value: bytes, *, last: int) -> int | None:
        """Store ``value`` if the latest revision is ``last`` (0: no key); the new revision."""
        ...

    async def watch(self) -> KVWatch:
        """The key's stored revisions, the latest first, then every new one.

        Optional: a store without ``watch`` is polled every ``poll_interval``.
        """
        ...


class KVLeaseStore:
    """The lease as one key of a KV bucket on any transport's JetStream (NATS or in-memory).

    Args:
        transport: an open transport.
        cluster_id: the cluster (the bucket is :func:`lease_bucket_name`).
        replicas: wanted replica count of the bucket (falls back to 1 on a single server).
        op_timeout: seconds for each JetStream request.
        key: the key name.
    """

    def __init__(
        self,
        transport: Transport,
        cluster_id: str,
        *,
        replicas: int = 3,
        op_timeout: float = 2.0,
        key: str = LEASE_KEY,
    ) -> None:
        self.transport = transport
        self.bucket = lease_bucket_name(cluster_id)
        self.key = key
        self.replicas = replicas
        self.op_timeout = op_timeout

    def __repr__(self) -> str:
        return f"<KVLeaseStore {self.bucket}/{self.key} replicas={self.replicas}>"

    async def ensure(self) -> None:
        """Create the bucket (history 1) unless it exists; records the replica count in use."""
        js = self.transport.jetstream.with_op_timeout(max(self.op_timeout, 2.0))
        self.replicas = await js.ensure_kv(
            self.bucket, replicas=self.replicas, history=1, description="BACKBEAT pulse lease"
        )

    async def read(self) -> KVEntry | None:
        """The key's latest revision and value, read from the stream leader."""
        return await self.transport.jetstream.with_op_timeout(self.op_timeout).kv_read(
            self.bucket, self.key
        )

    async def write(self, value: bytes, *, last: int) -> int | None:
        """Compare-and-set write."""
        return await self.transport.jetstream.with_op_timeout(self.op_timeout).kv_write(
            self.bucket, self.key, value, last=last
        )

    async def watch(self) -> KVWatch:
        """An ordered consumer on the key: its latest revision, then every new one.

        Only *stored* writes arrive (a lost compare-and-set never does), each with its revision.
        """
        return await self.transport.jetstream.kv_watch(self.bucket, self.key, buffer=_WATCH_BUFFER)


#: The name the KV lease store had when only NATS could hold it.
NatsLeaseStore = KVLeaseStore


async def ensure_lease_store(store: LeaseStore, op_timeout: float, attempts: int = 10) -> None:
    """Create the lease bucket, retrying while JetStream is still electing (bounded)."""
    # JetStream may still be electing a meta leader right after a cluster starts.
    last: BackbeatError | None = None
    for attempt in range(attempts):
        if attempt:
            await trio.sleep(min(2.0, 0.1 * 2**attempt))
        try:
            with trio.fail_after(max(op_timeout, 2.0) + 1.0):
                await store.ensure()
            return
        except BackbeatError as exc:
            last = exc
        except trio.TooSlowError:
            last = BackbeatError("creating the lease bucket timed out")
    assert last is not None
    raise BackbeatError(f"cannot create the lease bucket: {last}") from last
