"""The asyncio half of the JetStream KV and stream-history bridge.

Every function here is a plain ``async def f(nc, js, ...)`` coroutine function that runs on the
asyncio side through :meth:`~backbeat_trio._transport.NatsTransport.call`, which passes nats-py's
connection (``nc``) and JetStream context (``js``) and translates any exception that escapes into a
:class:`~backbeat_trio._errors.BackbeatError`. Nothing here is called from trio directly: the trio
halves are :mod:`backbeat_trio._ha` (the pulse lease) and :mod:`backbeat_trio._history` (bar
reports).

The functions return plain values (ints, bytes, tuples), never nats-py objects, so nothing from
the asyncio world leaks across the bridge. Each takes an ``op_timeout`` and builds a JetStream
context with it, so one slow call cannot hold a caller past its own bound.

Outcomes that callers must tell apart are *returned*, not raised: a compare-and-set that lost
(``None`` from :func:`kv_write`) is a definite answer, while an exception (timeout, no responders,
connection lost) means the outcome is unknown -- the write may or may not have been stored.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final, NamedTuple

__all__ = [
    "KV_OPERATION_HEADER",
    "StoredMessage",
    "StreamSummary",
    "kv_ensure_bucket",
    "kv_read",
    "kv_stream",
    "kv_subject",
    "kv_write",
    "stream_ensure",
    "stream_find_seq",
    "stream_last",
    "stream_read",
    "stream_summary",
]

#: JetStream's "wrong last sequence" error codes (JSStreamWrongLastSequenceErrF and its
#: constant twin): the expected-last-subject-sequence check failed, i.e. a CAS lost.
_WRONG_LAST_SEQUENCE: Final = frozenset({10071, 10164})
#: Codes meaning "this many replicas cannot be placed here" (non-clustered server, too few peers,
#: insufficient resources): a request for replicas > 1 falls back to 1 on these.
_NO_REPLICAS: Final = frozenset({10074, 10005, 10023})
_EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
#: Header marking a KV delete or purge entry.
KV_OPERATION_HEADER: Final = "KV-Operation"


class StoredMessage(NamedTuple):
    """One message read back from a stream."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] | None


class StreamSummary(NamedTuple):
    """What callers need from ``stream_info``."""

    name: str
    first_seq: int
    last_seq: int
    messages: int
    replicas: int
    leader: str | None
    subjects: tuple[str, ...]


def kv_stream(bucket: str) -> str:
    """The stream behind KV bucket ``bucket``."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str) -> str:
    """The subject a KV key's writes are published on."""
    return f"$KV.{bucket}.{key}"


def _err_code(exc: BaseException) -> int | None:
    code = getattr(exc, "err_code", None)
    return code if isinstance(code, int) else None


async def _replicas_of(jsx: Any, stream: str) -> int:
    info = await jsx.stream_info(stream)
    return int(info.config.num_replicas or 1)


# --- key/value ------------------------------------------------------------------------------------
async def kv_ensure_bucket(
    nc: Any,
    js: Any,
    bucket: str,
    *,
    replicas: int,
    history: int = 1,
    description: str = "",
    op_timeout: float = 5.0,
) -> int:
    """Create the KV bucket ``bucket`` unless it exists; several callers may race safely.

    An existing bucket is used as it is (its settings are not changed). When ``replicas`` > 1
    cannot be placed (a single server, too few peers) the bucket is created with one replica.

    Args:
        nc: nats-py connection (passed by ``NatsTransport.call``).
        js: its JetStream context (unused; a context with ``op_timeout`` is built instead).
        bucket: the bucket name (``[A-Za-z0-9_-]+``).
        replicas: wanted replica count.
        history: values kept per key.
        description: stream description.
        op_timeout: seconds per JetStream API request.

    Returns:
        The bucket's replica count.
    """
    import nats.js.errors
    from nats.js.api import KeyValueConfig

    jsx = nc.jetstream(timeout=op_timeout)
    stream = kv_stream(bucket)
    try:
        return await _replicas_of(jsx, stream)
    except nats.js.errors.NotFoundError:
        pass
    count = max(1, replicas)
    placing = _ReplicaPlacement(nc, op_timeout)
    while True:
        config = KeyValueConfig(
            bucket=bucket, history=history, replicas=count, description=description or None
        )
        try:
            await jsx.create_key_value(config)
            return count
        except nats.js.errors.APIError as exc:
            if _err_code(exc) in _NO_REPLICAS and count > 1:
                count = await placing.next_count(count)
                continue
            # Lost a creation race to a caller with other settings: use what it made.
            try:
                return await _replicas_of(jsx, stream)
            except nats.js.errors.NotFoundError:
                raise exc from None


async def kv_read(
    nc: Any, js: Any, bucket: str, key: str, *, op_timeout: float = 5.0
) -> tuple[int, bytes | None] | None:
    """Read a key's latest revision from the stream leader (never a possibly stale replica).

    Returns:
        None when the key has never been written (or was purged away); ``(revision, None)`` when
        its latest entry is a delete/purge marker; otherwise ``(revision, value)``.
    """
    import nats.js.errors

    jsx = nc.jetstream(timeout=op_timeout)
    try:
        msg = await jsx.get_msg(kv_stream(bucket), subject=kv_subject(bucket, key), direct=False)
    except nats.js.errors.NotFoundError:
        return None
    headers = msg.headers or {}
    if headers.get(KV_OPERATION_HEADER) in ("DEL", "PURGE"):
        return int(msg.seq), None
    return int(msg.seq), bytes(msg.data or b"")


async def kv_write(
    nc: Any,
    js: Any,
    bucket: str,
    key: str,
    value: bytes,
    *,
    last: int,
    op_timeout: float = 5.0,
) -> int | None:
    """Compare-and-set: store ``value`` only if the key's latest revision is ``last``.

    ``last=0`` is "create": it succeeds only while the key has no entry at all.

    Returns:
        The new revision, or None when the key's latest revision was not ``last`` (the CAS lost;
        nothing was stored).

    Raises:
        Exception: timeout, no responders, connection loss... -- the outcome is then *unknown*
            (``NatsTransport.call`` turns it into a ``BackbeatError``).
    """
    import nats.js.errors

    jsx = nc.jetstream(timeout=op_timeout)
    try:
        ack = await jsx.publish(
            kv_subject(bucket, key),
            value,
            timeout=op_timeout,
            headers={_EXPECTED_LAST_SUBJECT_SEQ: str(int(last))},
        )
    except nats.js.errors.APIError as exc:
        if _err_code(exc) in _WRONG_LAST_SEQUENCE:
            return None
        raise
    return int(ack.seq)


# --- streams --------------------------------------------------------------------------------------
class _ReplicaPlacement:
    """What to ask for after JetStream could not place ``count`` > 1 replicas.

    On a single server: one replica, at once. On a cluster the refusal can be temporary (right
    after the servers start, JetStream's meta group may not know every peer yet), so the same
    count is asked for again every 0.25 s for up to half of ``op_timeout`` before settling for
    one replica (seen: an R3 stream created as R1 on a 3-node cluster started under load).
    """

    def __init__(self, nc: Any, op_timeout: float) -> None:
        self._clustered = bool((getattr(nc, "_server_info", None) or {}).get("cluster"))
        self._until = asyncio.get_running_loop().time() + op_timeout / 2

    async def next_count(self, count: int) -> int:
        if self._clustered and asyncio.get_running_loop().time() < self._until:
            await asyncio.sleep(0.25)
            return count
        return 1


async def stream_ensure(
    nc: Any,
    js: Any,
    name: str,
    subjects: list[str],
    *,
    replicas: int = 1,
    max_msgs: int = -1,
    max_age: float | None = None,
    duplicate_window: float = 120.0,
    description: str = "",
    op_timeout: float = 5.0,
) -> int:
    """Create a stream unless it exists (an existing one is left as it is).

    Replicas > 1 that cannot be placed fall back to 1.

    Returns:
        The stream's replica count.
    """
    import nats.js.errors
    from nats.js.api import StreamConfig

    jsx = nc.jetstream(timeout=op_timeout)
    try:
        return await _replicas_of(jsx, name)
    except nats.js.errors.NotFoundError:
        pass
    count = max(1, replicas)
    placing = _ReplicaPlacement(nc, op_timeout)
    while True:
        config = StreamConfig(
            name=name,
            description=description or None,
            subjects=list(subjects),
            num_replicas=count,
            max_msgs=max_msgs,
            max_age=max_age,
            duplicate_window=duplicate_window,
        )
        try:
            await jsx.add_stream(config)
            return count
        except nats.js.errors.APIError as exc:
            if _err_code(exc) in _NO_REPLICAS and count > 1:
                count = await placing.next_count(count)
                continue
            try:
                return await _replicas_of(jsx, name)
            except nats.js.errors.NotFoundError:
                raise exc from None


async def stream_summary(
    nc: Any, js: Any, name: str, *, op_timeout: float = 5.0
) -> StreamSummary | None:
    """The stream's bounds, size, replica count and current leader; None when it does not exist."""
    import nats.js.errors

    jsx = nc.jetstream(timeout=op_timeout)
    try:
        info = await jsx.stream_info(name)
    except nats.js.errors.NotFoundError:
        return None
    state = info.state
    cluster = getattr(info, "cluster", None)
    return StreamSummary(
        name=name,
        first_seq=int(state.first_seq or 0),
        last_seq=int(state.last_seq or 0),
        messages=int(state.messages or 0),
        replicas=int(info.config.num_replicas or 1),
        leader=getattr(cluster, "leader", None) if cluster is not None else None,
        subjects=tuple(info.config.subjects or ()),
    )


def _stored(msg: Any) -> StoredMessage:
    headers = msg.headers
    return StoredMessage(
        seq=int(msg.seq),
        subject=str(msg.subject),
        data=bytes(msg.data or b""),
        headers={str(k): str(v) for k, v in headers.items()} if headers else None,
    )


async def stream_last(
    nc: Any, js: Any, name: str, subject: str, *, op_timeout: float = 5.0
) -> StoredMessage | None:
    """The last message ``name`` stores on ``subject``; None when there is none (or no stream)."""
    import nats.js.errors

    jsx = nc.jetstream(timeout=op_timeout)
    try:
        msg = await jsx.get_msg(name, subject=subject, direct=False)
    except nats.js.errors.NotFoundError:
        return None
    return _stored(msg)


async def stream_find_seq(
    nc: Any, js: Any, name: str, subject: str, seq: int, *, op_timeout: float = 5.0
) -> StoredMessage | None:
    """The first message on ``subject`` at or after sequence ``seq``; None when there is none."""
    import nats.js.errors

    jsx = nc.jetstream(timeout=op_timeout)
    try:
        msg = await jsx.get_msg(name, seq=max(1, seq), subject=subject, next=True, direct=False)
    except nats.js.errors.NotFoundError:
        return None
    return _stored(msg)


async def stream_read(
    nc: Any,
    js: Any,
    name: str,
    subject: str,
    start_seq: int,
    *,
    max_msgs: int,
    stop_seq: int | None = None,
    batch: int = 256,
    op_timeout: float = 5.0,
) -> list[StoredMessage]:
    """Read up to ``max_msgs`` messages on ``subject`` from ``start_seq`` on, in stream order.

    Uses an ephemeral, unacknowledged pull consumer (memory storage, one replica) that is deleted
    afterwards (and expires by itself if this call dies). Stops at ``stop_seq`` (default: the
    stream's last sequence when the call started), when ``max_msgs`` were read, or when the
    consumer reports nothing pending. Bounded: at most ``max_msgs // batch + 2`` fetches.
    """
    import nats.errors
    import nats.js.errors
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    jsx = nc.jetstream(timeout=op_timeout)
    if max_msgs <= 0:
        return []
    if stop_seq is None:
        try:
            info = await jsx.stream_info(name)
        except nats.js.errors.NotFoundError:
            return []
        stop_seq = int(info.state.last_seq or 0)
    if stop_seq < start_seq:
        return []
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(1, start_seq),
        ack_policy=AckPolicy.NONE,
        inactive_threshold=max(5.0, 2 * op_timeout),
        mem_storage=True,
        num_replicas=1,
    )
    psub = await jsx.pull_subscribe(subject, stream=name, config=config)
    out: list[StoredMessage] = []
    try:
        for _ in range(max_msgs // max(1, batch) + 2):
            want = min(batch, max_msgs - len(out))
            if want <= 0:
                break
            try:
                msgs = await psub.fetch(want, timeout=op_timeout)
            except (nats.errors.TimeoutError, TimeoutError):
                break
            done = False
            for msg in msgs:
                meta = msg.metadata
                seq = int(meta.sequence.stream)
                if seq > stop_seq:
                    done = True
                    break
                headers = msg.headers
                out.append(
                    StoredMessage(
                        seq=seq,
                        subject=str(msg.subject),
                        data=bytes(msg.data or b""),
                        headers={str(k): str(v) for k, v in headers.items()} if headers else None,
                    )
                )
                if len(out) >= max_msgs or seq >= stop_seq or not meta.num_pending:
                    done = True
                    break
            if done or not msgs:
                break
    finally:
        try:
            consumer = (await psub.consumer_info()).name
            await psub.unsubscribe()
            await jsx.delete_consumer(name, consumer)
        except Exception:  # best effort: the consumer expires on its own (inactive_threshold)
            pass
    return out
