"""Every use of nats-py's private names, behind one gate.

nats-py has no contract for anything below its public API, so each fast path here was read and
tested against the versions in :data:`_DIRECT_NATS_VERSIONS`, and :func:`fast_path_enabled` takes
them only there, when the names they touch have the expected shape, and unless the environment
says ``BACKBEAT_TRIO_NATS_FAST=0`` (which forces nats-py's public path, to test it). The rest of
:mod:`backbeat_trio._bridge` uses nats-py's public API only, and calls into this module only
after asking the gate (once per connection). What each fast path saves:

* :class:`DirectPending` / :func:`deliver_directly`: a core subscription's messages are handed to
  trio right in nats-py's parser, without waiting for the subscription's own asyncio task.
* :func:`read_directly` / :func:`read_plain`: the header-less, reply-less messages of those
  subscriptions (PubAcks, beat frames) are read before nats-py's parser, without building a
  ``Msg`` or awaiting a coroutine each.
* :func:`encode_queued` / :func:`push_pending`: the transport's drainer writes a burst of queued
  publishes into nats-py's buffer without two coroutine calls per message.
* :func:`write_now` / :func:`join_pending` / :func:`write_pending`: a publish with nothing queued
  ahead of it goes to the socket at once, not a couple of asyncio wake-ups later; the publishes
  that follow it in the same trio batch go out together in one write when that batch ends.
* :func:`pongs_received`: ``flush`` proves the server answered its PING (nats-py's public
  ``flush`` returns without one when its read loop has died).
* :func:`sweep_closed`: a close that nats-py could not finish still ends all of its tasks.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import re
from collections.abc import Callable
from typing import Any, Final

import trio

from .._transport.base import MemoryMessage
from .errors import nats_failures

log = logging.getLogger("backbeat_trio.transport")

#: nats-py versions whose internals the fast paths were read and tested against; any other
#: version (or a shape that does not match) takes nats-py's public path.
_DIRECT_NATS_VERSIONS = ("2.16.",)

#: Set to ``0`` to force nats-py's public path whatever the version (tests, a suspected bug).
FAST_ENV = "BACKBEAT_TRIO_NATS_FAST"

Queued = tuple[str, bytes, dict[str, str] | None, str]

#: nats-py's subject check (``_SUBJECT_INVALID_RE``) as read: it refuses these characters only.
#: :func:`wire_bytes` looks for them in a reply (which differs per message) with ``in``, so the
#: gate takes the fast paths only while nats-py's rule is this one.
_SUBJECT_REFUSED = r"[ \t\r\n]"


@functools.cache
def _shape_supported() -> bool:
    """The installed nats-py is a pinned version and has every private name used here."""
    try:
        import nats.aio.client
        import nats.aio.subscription
        import nats.aio.transport
        import nats.protocol.command
        import nats.protocol.parser
    except ImportError:  # pragma: no cover - nats-py is a dependency
        return False
    version = str(getattr(nats.aio.client, "__version__", ""))
    client_names = (
        "_pending",
        "_pending_data_size",
        "_max_pending_size",
        "_flush_pending",
        "_flush_queue",
        "_pongs_received",
        "_status",
        "_transport",
        "_subs",
        "_reading_task",
        "_ping_interval_task",
        "_flusher_task",
        "_reconnection_task",
        "_max_payload",
        "_skip_subject_validation",
        "_ps",
        "stats",
    )
    if not version.startswith(_DIRECT_NATS_VERSIONS):
        return False
    probe = nats.aio.client.Client()
    return (
        all(hasattr(probe, name) for name in client_names)
        and callable(getattr(nats.aio.subscription.Subscription, "_wait_for_msgs", None))
        and callable(getattr(nats.aio.client, "_validate_subject", None))
        and hasattr(getattr(nats.aio.client, "_HEADER_KEY_RE", None), "fullmatch")
        and getattr(getattr(nats.aio.client, "_SUBJECT_INVALID_RE", None), "pattern", None)
        == _SUBJECT_REFUSED
        and callable(getattr(nats.protocol.command, "pub_cmd", None))
        and hasattr(nats.aio.transport, "TcpTransport")
        and all(hasattr(probe._ps, name) for name in ("buf", "state", "parse"))
        and getattr(nats.protocol.parser, "AWAITING_CONTROL_LINE", None) == probe._ps.state
        and {"in_msgs", "in_bytes"} <= set(probe.stats)
    )


def fast_path_enabled() -> bool:
    """True when the fast paths may be taken: a pinned nats-py of the expected shape, and
    ``BACKBEAT_TRIO_NATS_FAST`` is not ``0``. A connection asks once, when it connects."""
    if os.environ.get(FAST_ENV, "").strip() == "0":
        return False
    return _shape_supported()


# --- publish -------------------------------------------------------------------------------------
#: subjects and header names nats-py's checks passed already (a process publishes to a few
#: subjects with a few header names, again and again); bounded, and only ever added to
_CHECKED_SUBJECTS: set[str] = set()
_CHECKED_KEYS: set[str] = set()
_CHECKED_MAX = 1024


@functools.cache
def _natspy_checks() -> tuple[Callable[[str], None], Callable[[str], object]]:
    """nats-py's subject check and header-name rule (its private _validate_subject and
    _HEADER_KEY_RE), imported once rather than per message."""
    import nats.aio.client

    return nats.aio.client._validate_subject, nats.aio.client._HEADER_KEY_RE.fullmatch


def _checked(seen: set[str], text: str, check: Callable[[str], object]) -> bool:
    """Whether ``check(text)`` passes (raises or returns None when it does not), remembered."""
    if text in seen:
        return True
    if check(text) is None:
        return False
    if len(seen) < _CHECKED_MAX:
        seen.add(text)
    return True


def wire_bytes(
    nc: Any, subject: str, payload: bytes, headers: dict[str, str] | None, reply: str
) -> bytes | None:
    """The PUB/HPUB bytes nats-py's ``publish`` would queue for this message, after its checks
    (subject, reply, size, header names and values); None for anything nats-py would refuse or
    rewrite (values it strips or whose CR/LF it replaces, empty keys it skips): its own path
    then takes the message and reports what is wrong. Shared by both publish fast paths."""
    try:
        if type(subject) is not str or not subject or type(reply) is not str:
            return None
        if type(payload) is not bytes or len(payload) > nc._max_payload:
            return None
        if not nc._skip_subject_validation:
            if subject not in _CHECKED_SUBJECTS:
                _natspy_checks()[0](subject)  # raises when nats-py refuses it
                if len(_CHECKED_SUBJECTS) < _CHECKED_MAX:
                    _CHECKED_SUBJECTS.add(subject)
            if reply and (" " in reply or "\t" in reply or "\r" in reply or "\n" in reply):
                return None  # nats-py's check refuses it
        n = len(payload)
        if headers is None:
            return f"PUB {subject} {reply} {n}\r\n".encode() + payload + b"\r\n"
        checked = _CHECKED_KEYS
        lines = ["NATS/1.0"]
        for k, v in headers.items():
            if (
                type(k) is not str
                or type(v) is not str
                or (k not in checked and not _checked(checked, k, _natspy_checks()[1]))
                or v.strip() != v  # nats-py would strip it
                or "\r" in v
                or "\n" in v
            ):
                return None
            lines.append(f"{k}: {v}")
        lines.append("\r\n")
        hdr = "\r\n".join(lines).encode()
        h = len(hdr)
        return b"".join((f"HPUB {subject} {reply} {h} {h + n}\r\n".encode(), hdr, payload, b"\r\n"))
    except nats_failures():
        # a subject nats-py refuses: declined, and nats-py's own publish then reports it
        return None
    except UnicodeError:
        # text that does not encode: the same (nats-py's publish reports it)
        return None


def encode_queued(nc: Any, outq: collections.deque[Queued], limit: int) -> int:
    """Move up to ``limit`` messages from ``outq`` into nats-py's pending buffer as wire bytes.

    Per message this is what ``nc.publish`` does (the same subject, size and header checks,
    the same HPUB/PUB bytes and statistics) without its two coroutine calls and per-header
    ``translate``/``encode``. It stops at the first message it cannot vouch for (a
    header value nats-py would rewrite, anything it would refuse), which then takes the general
    path so nats-py reports it. Returns how many messages were moved; the caller hands the
    buffer on with :func:`push_pending`.
    """
    max_pending = nc._max_pending_size
    pending: list[bytes] = nc._pending
    moved = 0
    size = 0
    payload_bytes = 0
    try:
        while outq and moved < limit:
            subject, payload, headers, reply = outq[0]
            cmd = wire_bytes(nc, subject, payload, headers, reply)
            if cmd is None:
                break
            outq.popleft()
            pending.append(cmd)
            size += len(cmd)
            payload_bytes += len(payload)
            moved += 1
            if 0 < max_pending < nc._pending_data_size + size:
                break  # nats-py pushes back here: let the caller flush first
    finally:
        nc._pending_data_size += size
        nc.stats["out_msgs"] += moved
        nc.stats["out_bytes"] += payload_bytes
    return moved


async def push_pending(nc: Any) -> None:
    """What nats-py's ``_send_command``/``_send_publish`` do after appending to its buffer: push
    back on a full buffer, else wake its flusher."""
    if 0 < nc._max_pending_size < nc._pending_data_size:
        await nc._flush_pending(force_flush=True)
    elif nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


def write_now(
    nc: Any, subject: str, payload: bytes, headers: dict[str, str] | None, reply: str
) -> bool:
    """Write one message straight to the socket.

    This is what nats-py's flusher task would do a couple of asyncio wake-ups later: append the
    PUB/HPUB to nats-py's own pending buffer and write that buffer out, so bytes nats-py queued
    first (SUB, PING) still go first. Returns False, having done nothing, when nats-py's path must
    take the message: not connected, not plain TCP, a socket that is not keeping up, or anything
    nats-py would refuse or rewrite (it reports why).
    """
    import nats.aio.transport

    io: Any = nc._transport
    plain_tcp = type(io) is nats.aio.transport.TcpTransport  # not WebSocket
    if nc._status != nc.CONNECTED or not plain_tcp:
        return False
    writer = getattr(io, "_io_writer", None)
    if writer is None or writer.transport.get_write_buffer_size():
        return False
    cmd = wire_bytes(nc, subject, payload, headers, reply)
    if cmd is None:
        return False
    pending: list[bytes] = nc._pending
    size: int = nc._pending_data_size
    nc._pending = []
    nc._pending_data_size = 0
    try:
        io.writelines([*pending, cmd])
    except (OSError, RuntimeError, AttributeError) as exc:
        # a transport that is going away: hand everything back to nats-py's own path
        log.debug("direct write refused (%r); nats-py's path takes the message", exc)
        nc._pending = pending + nc._pending
        nc._pending_data_size += size
        return False
    nc.stats["out_msgs"] += 1
    nc.stats["out_bytes"] += len(payload)
    return True


def join_pending(
    nc: Any, subject: str, payload: bytes, headers: dict[str, str] | None, reply: str
) -> bool:
    """Append one message to nats-py's pending buffer, for :func:`write_pending` to write with
    the others of its trio batch. Returns False, having done nothing, where :func:`write_now`
    would, or when the buffer would pass nats-py's bound (its own path then pushes back)."""
    if nc._status != nc.CONNECTED:
        return False
    cmd = wire_bytes(nc, subject, payload, headers, reply)
    if cmd is None:
        return False
    size = len(cmd)
    if 0 < nc._max_pending_size < nc._pending_data_size + size:
        return False
    nc._pending.append(cmd)
    nc._pending_data_size += size
    stats = nc.stats
    stats["out_msgs"] += 1
    stats["out_bytes"] += len(payload)
    return True


def write_pending(nc: Any) -> None:
    """Hand nats-py's pending buffer to the socket now, as its flusher task would.

    Disconnected, the buffer stays where it is (nats-py writes it after a reconnect). A socket
    that is not keeping up takes it into its own buffer, in order; the next direct write waits
    until that has drained (:func:`write_now`).
    """
    io: Any = nc._transport
    if not nc._pending or nc._status != nc.CONNECTED or io is None:
        return
    pending: list[bytes] = nc._pending
    size: int = nc._pending_data_size
    nc._pending = []
    nc._pending_data_size = 0
    try:
        io.writelines(pending)
    except (OSError, RuntimeError, AttributeError) as exc:
        # a transport that is going away: nats-py's reconnect takes the buffer
        log.debug("writing nats-py's buffer refused (%r); it is kept for nats-py", exc)
        nc._pending = pending + nc._pending
        nc._pending_data_size += size


class BatchWriter:
    """The direct writes of one connection.

    A message with nothing queued ahead of it is written at once (:func:`write_now`); the ones
    published after it in the same trio batch (many clients claiming on one beat) join nats-py's
    buffer (:func:`join_pending`), and :meth:`run`, woken once per such batch, writes them
    together when the batch ends (:func:`write_pending`). None of it runs an asyncio callback:
    under trio-asyncio each one costs a pass of trio's scheduler.
    """

    def __init__(self, nc: Any) -> None:
        self._nc = nc
        self._open = False  # a message was written at once in the current trio batch
        self._end = trio.lowlevel.ParkingLot()  # where run() waits for such a batch to end
        self._scope = trio.CancelScope()
        self.ended = trio.Event()  # run() has returned
        self.joined = 0  # messages that went out with the write ending their batch

    def send(
        self, subject: str, payload: bytes, headers: dict[str, str] | None, reply: str
    ) -> bool:
        """Write the message or join it to this batch's write; False, having done nothing, when
        nats-py's path must take it (see :func:`write_now` and :func:`join_pending`)."""
        if self._open:
            if not join_pending(self._nc, subject, payload, headers, reply):
                return False
            self.joined += 1
            return True
        if not len(self._end) or not write_now(self._nc, subject, payload, headers, reply):
            return False  # (a batch is opened only while run() waits to end it)
        self._open = True
        self._end.unpark()
        return True

    async def run(self) -> None:
        """Until :meth:`aclose`: in the trio batch after one that wrote a message at once, write
        what joined it."""
        try:
            with self._scope:
                while True:
                    await self._end.park()
                    self._open = False
                    write_pending(self._nc)
        finally:
            self.ended.set()

    async def aclose(self) -> None:
        """Stop :meth:`run` (what joined the current batch is written first) and wait for it."""
        self._scope.cancel()
        with trio.move_on_after(1.0, shield=True):
            await self.ended.wait()


# --- flush ---------------------------------------------------------------------------------------
def pongs_received(nc: Any) -> int:
    """How many PONGs nats-py has matched to a PING so far."""
    return int(nc._pongs_received)


# --- server facts --------------------------------------------------------------------------------
def server_cluster(nc: Any) -> str | None:
    """The NATS cluster name the connected server announced in its INFO, or None."""
    cluster = (nc._server_info or {}).get("cluster")
    return str(cluster) if cluster else None


# --- receive -------------------------------------------------------------------------------------
class DirectPending:
    """Stands in for a nats-py subscription's pending ``asyncio.Queue``: nats-py's parser calls
    ``put_nowait`` for each message, which hands it to trio at once.

    Without it every message waits for the subscription's own asyncio task to be scheduled. The
    bound and the overflow count move to the trio channel behind ``deliver``
    (:class:`~backbeat_trio._transport.base.Subscription`), so nothing is lost silently.
    """

    __slots__ = ("_deliver", "_nsub")

    def __init__(self, nsub: Any, deliver: Callable[[Any], None]) -> None:
        self._nsub = nsub
        self._deliver = deliver

    def put_nowait(self, msg: Any) -> None:
        # nats-py counted the bytes as pending (its slow-consumer check); they are handed on
        self._nsub._pending_size -= len(msg.data)
        self._deliver(msg)

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def full(self) -> bool:
        return False

    def task_done(self) -> None:
        pass

    async def join(self) -> None:
        pass


def deliver_directly(nsub: Any, deliver: Callable[[Any], None]) -> bool:
    """Route a fresh nats-py callback subscription around its per-subscription task.

    Call it with no await since ``subscribe`` returned (nats-py's read loop cannot have run).
    Returns False (and changes nothing) when ``nsub`` does not look as expected; the callback
    path then keeps working as before.
    """
    queue = getattr(nsub, "_pending_queue", None)
    task = getattr(nsub, "_wait_for_msgs_task", None)
    if (
        not isinstance(queue, asyncio.Queue)
        or not isinstance(task, asyncio.Task)
        or not isinstance(getattr(nsub, "_pending_size", None), int)
        or getattr(nsub, "_future", None) is not None
        or getattr(nsub, "_jsi", None) is not None
    ):
        log.debug("nats-py subscription internals differ; using its callback task")
        return False
    nsub._pending_queue = DirectPending(nsub, deliver)
    # the task never ran (no await since it was created); it ends at its first step
    task.cancel()
    while not queue.empty():  # defensive: nothing should be queued yet
        msg = queue.get_nowait()
        nsub._pending_size -= len(msg.data)
        deliver(msg)
    return True


def is_direct(nsub: Any) -> bool:
    """True when ``nsub`` was routed by :func:`deliver_directly`."""
    return isinstance(getattr(nsub, "_pending_queue", None), DirectPending)


# --- read ----------------------------------------------------------------------------------------
#: A complete header-less MSG control line without a reply: ``MSG <subject> <sid> <size>``, as
#: nats-server writes it (single spaces). Anything else (a reply, headers, PING, INFO, extra
#: spaces) does not match and goes to nats-py's parser.
_PLAIN_MSG: Final = re.compile(rb"MSG ([^ \t\r\n]+) ([0-9]{1,18}) ([0-9]{1,10})\r\n")
#: nats-py's bound on a control line (its parser's ``MAX_CONTROL_LINE_SIZE``); the largest
#: message a :class:`PlainReader` keeps until the next read completes it (a larger one is left
#: to nats-py's parser, whose buffer grows without copying what it holds)
_MAX_CONTROL_LINE, _MAX_KEPT = 4096, 1 << 16


def read_plain(nc: Any, data: bytes) -> tuple[int, bool]:
    """Hand the leading complete header-less, reply-less MSGs of ``data`` for subscriptions
    routed by :func:`deliver_directly` straight to them.

    It stops at the first thing it does not take: another command, a message with a reply or
    headers, one for another subscription, or the end of ``data``. What it counts is what
    nats-py counts for such a message.

    Returns:
        How many bytes were taken, and whether what follows may be the start of a message it
        would take, cut off by the end of ``data`` (to be read again with the next bytes).
    """
    subs = nc._subs
    stats = nc.stats
    match = _PLAIN_MSG.match
    end_of_data = len(data)
    pos = 0
    while pos < end_of_data:
        m = match(data, pos)
        if m is None:  # another command, or a control line not complete yet
            return pos, (data.find(b"\n", pos) < 0 and end_of_data - pos < _MAX_CONTROL_LINE)
        sub = subs.get(int(m[2]))
        if sub is None or sub._max_msgs or type(sub._pending_queue) is not DirectPending:
            return pos, False
        start = m.end()
        size = int(m[3])
        end = start + size
        if end + 2 > end_of_data:
            return pos, end + 2 - pos <= _MAX_KEPT
        if data[end : end + 2] != b"\r\n":
            return pos, False  # nats-py's parser decides what to make of it
        stats["in_msgs"] += 1
        stats["in_bytes"] += size
        sub._received += 1
        pos = end + 2
        sub._pending_queue._deliver(MemoryMessage(m[1].decode(), data[start:end]))
    return pos, False


class PlainReader:
    """Reads what arrives on a connection before nats-py's parser does (:func:`read_plain`).

    nats-py's parser builds a ``Msg`` and awaits a coroutine per message; the header-less,
    reply-less messages of our direct subscriptions (PubAcks, beat frames) are read here instead,
    when a read begins between two commands with nothing in the parser's buffer. The rest of a
    read goes to nats-py's parser. A small message of ours cut off by the end of a read is kept
    until the next read, and dropped with the parser's buffer when nats-py resets its parser.
    """

    def __init__(self, parser: Any, nc: Any) -> None:
        from nats.protocol.parser import AWAITING_CONTROL_LINE

        self._between = AWAITING_CONTROL_LINE
        self._parser = parser
        self._nc = nc
        self._parse = parser.parse  # nats-py's own, bound
        self._reset = parser.reset
        self._carry = b""
        self.taken = 0  # messages read here (tests, diagnostics)

    async def parse(self, data: bytes = b"") -> None:
        """nats-py's ``Parser.parse``, with :func:`read_plain` first."""
        if self._carry:
            data = self._carry + data
            self._carry = b""
        parser = self._parser
        if data and not parser.buf and parser.state == self._between:
            received = self._nc.stats["in_msgs"]
            taken, cut_off = read_plain(self._nc, data)
            self.taken += self._nc.stats["in_msgs"] - received
            if cut_off:
                self._carry = data[taken:]
                return
            if taken:
                if taken == len(data):
                    return
                data = data[taken:]
        await self._parse(data)

    def reset(self) -> None:
        """nats-py's ``Parser.reset`` (a new connection): what was kept goes with its buffer."""
        self._carry = b""
        self._reset()


def read_directly(nc: Any) -> PlainReader:
    """Install a :class:`PlainReader` in front of ``nc``'s parser (once per connection)."""
    parser = nc._ps
    reader = PlainReader(parser, nc)
    parser.parse = reader.parse
    parser.reset = reader.reset
    return reader


# --- close ---------------------------------------------------------------------------------------
def drop_reconnect_buffer(nc: Any) -> None:
    """Drop what a disconnected client holds for the next server.

    nats-py 2.16's ``close()`` writes its reconnect buffer into the old socket before it cancels
    its tasks; while disconnected that write raises ``ConnectionResetError`` and ``close()``
    stops there. Those bytes could not reach a server anyway (claims are still held by the
    client's outbox).
    """
    if not nc.is_connected:
        nc._pending = []
        nc._pending_data_size = 0


async def sweep_closed(nc: Any) -> None:
    """After ``close()`` (however it ended): cancel every nats-py task still running, forget the
    subscriptions and close the socket, so nothing of the client outlives it."""
    nc._status = nc.CLOSED
    current = asyncio.current_task()
    tasks = [
        nc._reading_task,
        nc._ping_interval_task,
        nc._flusher_task,
        nc._reconnection_task,
        *(sub._wait_for_msgs_task for sub in nc._subs.values()),
    ]
    left = [t for t in tasks if t is not None and t is not current and not t.done()]
    for task in left:
        task.cancel()
    nc._subs.clear()
    if nc._transport is not None:
        try:
            nc._transport.close()
        except (OSError, RuntimeError) as exc:
            log.debug("closing nats-py's socket after close(): %r (it is being dropped)", exc)
    if left:
        await asyncio.wait(left, timeout=0.5)
