"""JetStream over nats-py: :class:`NatsJetStream` and the asyncio coroutines behind it.

:class:`NatsJetStream` is the :class:`~backbeat_trio._transport.jetstream.JetStream` of a
:class:`~backbeat_trio._bridge.nats.NatsTransport` (``transport.jetstream``). Each of its methods
runs one of the plain ``async def f(nc, ..., op_timeout)`` coroutine functions below on the asyncio
side, inside :func:`~.errors.map_nats_errors`: whatever nats-py raises comes out as a
:class:`~backbeat_trio._errors.BackbeatError` (:mod:`.errors` holds the one mapping).

The coroutines return plain values (ints, bytes, the NamedTuples of the transport layer), never
nats-py objects, so nothing from the asyncio world leaks across the bridge. Each builds a JetStream
context with its ``op_timeout``, so one slow request cannot hold a caller past its own bound.

Outcomes that callers must tell apart are *returned*, not raised: a compare-and-set that lost
(``None`` from :func:`kv_write`) is a definite answer, while an exception (timeout, no responders,
connection lost) means the outcome is unknown -- the write may or may not have been stored.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from .._errors import BackbeatError, NotConnected
from .._transport.base import Message, Subscription
from .._transport.jetstream import (
    KVEntry,
    KVWatch,
    StoredMessage,
    StreamLimits,
    StreamSummary,
    kv_stream,
    kv_subject,
)
from . import _natspy_private as private
from .errors import (
    ignore_nats_errors,
    map_nats_errors,
    nats_failures,
    not_found_errors,
    refusal_code,
    refusal_errors,
)
from .stream_limits import config_fields, conform_stream

if TYPE_CHECKING:
    from .nats import NatsTransport

__all__ = [
    "NatsJetStream",
    "kv_ensure_bucket",
    "kv_read",
    "kv_write",
    "stream_ensure",
    "stream_find_name",
    "stream_find_seq",
    "stream_last",
    "stream_read",
    "stream_summary",
]

log = logging.getLogger("backbeat_trio.jetstream")

T = TypeVar("T")

#: JetStream's "wrong last sequence" error codes (JSStreamWrongLastSequenceErrF and its
#: constant twin): the expected-last-subject-sequence check failed, i.e. a CAS lost.
_WRONG_LAST_SEQUENCE: Final = frozenset({10071, 10164})
#: Codes meaning "this many replicas cannot be placed here" (non-clustered server, too few peers,
#: insufficient resources): a request for replicas > 1 falls back to 1 on these.
_NO_REPLICAS: Final = frozenset({10074, 10005, 10023})
_EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
#: A JetStream-delivered message's reply subject starts so; its tokens carry the sequences.
_ACK_PREFIX: Final = "$JS.ACK."
#: Seconds per JetStream API request unless a caller asks for another bound.
DEFAULT_OP_TIMEOUT: Final = 5.0


# --- the JetStream of a NatsTransport -------------------------------------------------------------
class NatsJetStream:
    """:class:`~backbeat_trio._transport.jetstream.JetStream` over a NATS connection.

    Args:
        transport: returns the transport to use for each call (a view's raises ``NotConnected``
            once it is closed).
        op_timeout: seconds per JetStream API request.
    """

    def __init__(
        self, transport: Callable[[], NatsTransport], op_timeout: float = DEFAULT_OP_TIMEOUT
    ) -> None:
        self._transport = transport
        self.op_timeout = op_timeout

    def __repr__(self) -> str:
        return f"<NatsJetStream op_timeout={self.op_timeout}>"

    def with_op_timeout(self, op_timeout: float) -> NatsJetStream:
        """This JetStream with another per-request bound."""
        return NatsJetStream(self._transport, op_timeout)

    async def _run(
        self, what: str, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
    ) -> T:
        transport = self._transport()
        nc = transport._nc
        if nc is None or nc.is_closed:
            raise NotConnected(f"{what}: the NATS connection is closed")
        with map_nats_errors(what, jetstream=True):
            result: T = await transport._aio(fn)(nc, *args, op_timeout=self.op_timeout, **kwargs)
        return result

    # -- streams ---------------------------------------------------------------------------------
    async def find_stream(self, subject: str) -> str | None:
        """The stream capturing ``subject``; None when none does (or JetStream is off)."""
        try:
            return await self._run(f"find the stream of {subject!r}", stream_find_name, subject)
        except BackbeatError as exc:
            # no JetStream here (the client then delivers claims over core NATS): not an error
            log.debug("no stream found for %r: %s", subject, exc)
            return None

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
        """Create the stream unless it exists, with the asked bounds in force; its replicas."""
        limits = StreamLimits(max_msgs, max_bytes, max_age, discard, duplicate_window)
        return await self._run(
            f"cannot create (or bound) JetStream stream {name!r}",
            stream_ensure,
            name,
            list(subjects),
            replicas=replicas,
            limits=limits,
            description=description,
        )

    async def stream_summary(self, name: str) -> StreamSummary | None:
        """The stream's bounds and placement; None when it does not exist."""
        return await self._run(f"stream info of {name!r}", stream_summary, name)

    async def stream_read(
        self,
        name: str,
        subject: str,
        start_seq: int,
        *,
        max_msgs: int,
        stop_seq: int | None = None,
    ) -> list[StoredMessage]:
        """Messages on ``subject`` from ``start_seq`` on (see :func:`stream_read`)."""
        return await self._run(
            f"read stream {name!r}",
            stream_read,
            name,
            subject,
            start_seq,
            max_msgs=max_msgs,
            stop_seq=stop_seq,
        )

    async def stream_find(self, name: str, subject: str, seq: int) -> StoredMessage | None:
        """The first message on ``subject`` at or after ``seq``."""
        return await self._run(f"read stream {name!r}", stream_find_seq, name, subject, seq)

    async def stream_last(self, name: str, subject: str) -> StoredMessage | None:
        """The last message on ``subject``."""
        return await self._run(f"read stream {name!r}", stream_last, name, subject)

    async def stream_subscribe(
        self,
        subject: str,
        stream: str,
        *,
        buffer: int = 65536,
        deliver: Literal["new", "last_per_subject"] = "new",
        start_seq: int | None = None,
        handler: Callable[[Message], None] | None = None,
    ) -> Subscription:
        """An ordered consumer on ``stream`` (see :meth:`JetStream.stream_subscribe`); each
        message's ``metadata.sequence.stream`` is its stream sequence (a KV key's revision).
        ``handler`` as for :meth:`NatsTransport.subscribe`.

        Raises:
            NotConnected: the subscription could not be made.
            JetStreamError: JetStream refused the consumer (``code`` says why).
        """
        from nats.js.api import ConsumerConfig, DeliverPolicy

        t = self._transport()
        policy = DeliverPolicy.NEW if deliver == "new" else DeliverPolicy.LAST_PER_SUBJECT
        options: dict[str, Any] = dict(stream=stream, ordered_consumer=True, deliver_policy=policy)
        if start_seq is not None:
            options["deliver_policy"] = DeliverPolicy.BY_START_SEQUENCE
            options["config"] = ConsumerConfig(opt_start_seq=max(1, start_seq))
        what = f"stream subscribe {stream}/"
        return await t._bridged(subject, buffer, what, t._js.subscribe, handler=handler, **options)

    def sequence_of(self, msg: Message) -> int | None:
        """The stream sequence JetStream delivered ``msg`` with (None: a core message)."""
        if not msg.reply.startswith(_ACK_PREFIX):
            return None
        unreadable: tuple[type[BaseException], ...] = (
            AttributeError,
            IndexError,
            ValueError,
            *nats_failures(),
        )
        try:
            return _stream_sequence(msg)
        except unreadable:
            return None

    # -- key/value -------------------------------------------------------------------------------
    async def ensure_kv(
        self, bucket: str, *, replicas: int = 1, history: int = 1, description: str = ""
    ) -> int:
        """Create the KV bucket unless it exists; returns its replica count."""
        return await self._run(
            f"cannot create KV bucket {bucket!r}",
            kv_ensure_bucket,
            bucket,
            replicas=replicas,
            history=history,
            description=description,
        )

    async def kv_read(self, bucket: str, key: str) -> KVEntry | None:
        """The key's latest revision, read from the stream leader."""
        return await self._run(f"read {bucket}/{key}", kv_read, bucket, key)

    async def kv_write(self, bucket: str, key: str, value: bytes, *, last: int) -> int | None:
        """Compare-and-set; None when the CAS lost, an error when the outcome is unknown."""
        return await self._run(f"write {bucket}/{key}", kv_write, bucket, key, value, last=last)

    async def kv_watch(self, bucket: str, key: str, *, buffer: int = 256) -> KVWatch:
        """An ordered consumer on the key: its latest revision, then every new one."""
        watch = KVWatch(key, buffer)
        deliver = functools.partial(watch._deliver_message, revision=_stream_sequence)
        subject, stream = kv_subject(bucket, key), kv_stream(bucket)
        sub = await self.stream_subscribe(
            subject, stream, buffer=buffer, deliver="last_per_subject", handler=deliver
        )
        watch._stop = sub.unsubscribe
        return watch


def _stream_sequence(msg: Message) -> int:
    """A JetStream-delivered message's stream sequence (a KV key's revision)."""
    return int(msg.metadata.sequence.stream)  # type: ignore[attr-defined]


# --- the asyncio side -----------------------------------------------------------------------------
async def _replicas_of(jsx: Any, stream: str) -> int:
    info = await jsx.stream_info(stream)
    return int(info.config.num_replicas or 1)


def _clustered(nc: Any) -> bool:
    # the server's INFO names its cluster (a private field of nats-py's); on the public path a
    # pool of more than one server (configured or discovered from the cluster) stands in for it
    if private.fast_path_enabled():
        return private.server_cluster(nc) is not None
    return len(nc.servers) > 1


class _ReplicaPlacement:
    """What to ask for after JetStream could not place ``count`` > 1 replicas.

    On a single server: one replica, at once. On a cluster the refusal can be temporary (right
    after the servers start, JetStream's meta group may not know every peer yet), so the same
    count is asked for again every 0.25 s for up to half of ``op_timeout`` before settling for
    one replica (seen: an R3 stream created as R1 on a 3-node cluster started under load).
    """

    def __init__(self, nc: Any, op_timeout: float) -> None:
        self._clustered = _clustered(nc)
        self._until = asyncio.get_running_loop().time() + op_timeout / 2

    async def next_count(self, count: int) -> int:
        if self._clustered and asyncio.get_running_loop().time() < self._until:
            await asyncio.sleep(0.25)
            return count
        return 1


async def _ensure_replicated(
    nc: Any,
    jsx: Any,
    stream: str,
    replicas: int,
    op_timeout: float,
    create: Callable[[int], Awaitable[object]],
) -> int:
    """Create ``stream`` with ``create(count)`` unless it exists; returns its replica count.

    An existing stream is used as it is. A refused ``count`` > 1 (a single server, too few
    peers) is asked for again as :class:`_ReplicaPlacement` says, else settled at one replica.
    Several callers may race: one that lost the creation race uses what the winner made.
    """
    try:
        return await _replicas_of(jsx, stream)
    except not_found_errors():
        pass
    count = max(1, replicas)
    placing = _ReplicaPlacement(nc, op_timeout)
    while True:
        try:
            await create(count)
            return count
        except refusal_errors() as exc:
            if refusal_code(exc) in _NO_REPLICAS and count > 1:
                count = await placing.next_count(count)
                continue
            # Lost a creation race to a caller with other settings: use what it made.
            try:
                return await _replicas_of(jsx, stream)
            except not_found_errors():
                raise exc from None


async def kv_ensure_bucket(
    nc: Any,
    bucket: str,
    *,
    replicas: int,
    history: int = 1,
    description: str = "",
    op_timeout: float = DEFAULT_OP_TIMEOUT,
) -> int:
    """Create the KV bucket ``bucket`` (``[A-Za-z0-9_-]+``) unless it exists; its replica count."""
    from nats.js.api import KeyValueConfig

    jsx = nc.jetstream(timeout=op_timeout)

    async def create(count: int) -> None:
        await jsx.create_key_value(
            KeyValueConfig(
                bucket=bucket, history=history, replicas=count, description=description or None
            )
        )

    return await _ensure_replicated(nc, jsx, kv_stream(bucket), replicas, op_timeout, create)


async def kv_read(
    nc: Any, bucket: str, key: str, *, op_timeout: float = DEFAULT_OP_TIMEOUT
) -> KVEntry | None:
    """A key's latest revision, read from the stream leader (never a possibly stale replica);
    None when the key has never been written (or was purged away)."""
    jsx = nc.jetstream(timeout=op_timeout)
    try:
        msg = await jsx.get_msg(kv_stream(bucket), subject=kv_subject(bucket, key), direct=False)
    except not_found_errors():
        return None
    return KVEntry.of(int(msg.seq), bytes(msg.data or b""), msg.headers)


async def kv_write(
    nc: Any,
    bucket: str,
    key: str,
    value: bytes,
    *,
    last: int,
    op_timeout: float = DEFAULT_OP_TIMEOUT,
) -> int | None:
    """Compare-and-set: store ``value`` only if the key's latest revision is ``last`` (0: none).

    Returns:
        The new revision, or None when the key's latest revision was not ``last`` (the CAS lost;
        nothing was stored).

    Raises:
        Exception: timeout, no responders, connection loss... -- the outcome is then *unknown*.
    """
    jsx = nc.jetstream(timeout=op_timeout)
    try:
        ack = await jsx.publish(
            kv_subject(bucket, key),
            value,
            timeout=op_timeout,
            headers={_EXPECTED_LAST_SUBJECT_SEQ: str(int(last))},
        )
    except refusal_errors() as exc:
        if refusal_code(exc) in _WRONG_LAST_SEQUENCE:
            return None
        raise
    return int(ack.seq)


async def stream_find_name(
    nc: Any, subject: str, *, op_timeout: float = DEFAULT_OP_TIMEOUT
) -> str | None:
    """The stream capturing ``subject``; None when none does."""
    jsx = nc.jetstream(timeout=op_timeout)
    try:
        name = await jsx.find_stream_name_by_subject(subject)
    except not_found_errors():
        return None
    return str(name) if name else None


async def stream_ensure(
    nc: Any,
    name: str,
    subjects: list[str],
    *,
    replicas: int = 1,
    limits: StreamLimits,
    description: str = "",
    op_timeout: float = DEFAULT_OP_TIMEOUT,
) -> int:
    """Create a stream unless it exists, and put ``limits``'s bounds in force on an existing one
    (:func:`conform_stream`); its replica count."""
    from nats.js.api import StreamConfig

    jsx = nc.jetstream(timeout=op_timeout)

    async def create(count: int) -> None:
        await jsx.add_stream(
            StreamConfig(
                name=name,
                description=description or None,
                subjects=list(subjects),
                num_replicas=count,
                **config_fields(limits),
            )
        )

    count = await _ensure_replicated(nc, jsx, name, replicas, op_timeout, create)
    await conform_stream(jsx, name, limits)
    return count


async def stream_summary(
    nc: Any, name: str, *, op_timeout: float = DEFAULT_OP_TIMEOUT
) -> StreamSummary | None:
    """The stream's bounds, size, replica count and current leader; None when it does not exist."""
    jsx = nc.jetstream(timeout=op_timeout)
    try:
        info = await jsx.stream_info(name)
    except not_found_errors():
        return None
    state = info.state
    cluster = getattr(info, "cluster", None)
    max_msgs = info.config.max_msgs
    return StreamSummary(
        name=name,
        first_seq=int(state.first_seq or 0),
        last_seq=int(state.last_seq or 0),
        messages=int(state.messages or 0),
        replicas=int(info.config.num_replicas or 1),
        leader=getattr(cluster, "leader", None) if cluster is not None else None,
        subjects=tuple(info.config.subjects or ()),
        max_msgs=-1 if max_msgs is None else int(max_msgs),
    )


def _stored(msg: Any, seq: int) -> StoredMessage:
    headers = msg.headers
    return StoredMessage(
        seq=seq,
        subject=str(msg.subject),
        data=bytes(msg.data or b""),
        headers={str(k): str(v) for k, v in headers.items()} if headers else None,
    )


async def stream_last(
    nc: Any, name: str, subject: str, *, op_timeout: float = DEFAULT_OP_TIMEOUT
) -> StoredMessage | None:
    """The last message ``name`` stores on ``subject``; None when there is none (or no stream)."""
    jsx = nc.jetstream(timeout=op_timeout)
    try:
        msg = await jsx.get_msg(name, subject=subject, direct=False)
    except not_found_errors():
        return None
    return _stored(msg, int(msg.seq))


async def stream_find_seq(
    nc: Any, name: str, subject: str, seq: int, *, op_timeout: float = DEFAULT_OP_TIMEOUT
) -> StoredMessage | None:
    """The first message on ``subject`` at or after sequence ``seq``; None when there is none."""
    jsx = nc.jetstream(timeout=op_timeout)
    try:
        msg = await jsx.get_msg(name, seq=max(1, seq), subject=subject, next=True, direct=False)
    except not_found_errors():
        return None
    return _stored(msg, int(msg.seq))


async def stream_read(
    nc: Any,
    name: str,
    subject: str,
    start_seq: int,
    *,
    max_msgs: int,
    stop_seq: int | None = None,
    batch: int = 256,
    op_timeout: float = DEFAULT_OP_TIMEOUT,
) -> list[StoredMessage]:
    """Read up to ``max_msgs`` messages on ``subject`` from ``start_seq`` on, in stream order.

    Uses an ephemeral, unacknowledged pull consumer (memory storage, one replica) that is deleted
    afterwards (and expires by itself if this call dies). Stops at ``stop_seq`` (default: the
    stream's last sequence when the call started), when ``max_msgs`` were read, or when the
    consumer reports nothing pending. Bounded: at most ``max_msgs // batch + 2`` fetches.
    """
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    jsx = nc.jetstream(timeout=op_timeout)
    if max_msgs <= 0:
        return []
    if stop_seq is None:
        try:
            info = await jsx.stream_info(name)
        except not_found_errors():
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
            except TimeoutError:  # nats-py's fetch: nothing more arrived in time
                break
            done = False
            for msg in msgs:
                meta = msg.metadata
                seq = int(meta.sequence.stream)
                if seq > stop_seq:
                    done = True
                    break
                out.append(_stored(msg, seq))
                if len(out) >= max_msgs or seq >= stop_seq or not meta.num_pending:
                    done = True
                    break
            if done or not msgs:
                break
    finally:
        with ignore_nats_errors(
            f"read of {name!r}: deleting its consumer",
            "the consumer expires on its own (inactive_threshold)",
            logger=log,
        ):
            consumer = (await psub.consumer_info()).name
            await psub.unsubscribe()
            await jsx.delete_consumer(name, consumer)
    return out
