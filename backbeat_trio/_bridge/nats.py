"""The transport: the only module that touches asyncio and nats-py.

Everything above it is pure trio. The bridge is crossed as rarely as possible:

* **Receive**: each message is handed to trio with ``send_nowait`` on a bounded memory channel —
  no await crosses the bridge per message. For core subscriptions on a known nats-py version this
  happens right in nats-py's parser (:class:`_DirectPending`), skipping its per-subscription task;
  otherwise nats-py's subscription callback does it.
* **Publish**: trio appends to a deque and sets an ``asyncio.Event``; one long-lived asyncio task
  drains the whole deque into nats-py's write buffer, so a burst costs one wake-up, not one
  crossing per message. A header-less message with nothing queued ahead of it, on a connected
  socket that keeps up, is written at once instead (:meth:`NatsTransport._write_now`), which saves
  the drainer's and nats-py's flusher's wake-ups (a beat frame's latency).
* **Events** (disconnected, reconnected, closed, error, slow consumer) arrive the same way as
  messages, on their own channel.

Both worlds run on one thread (trio-asyncio), which is what makes the synchronous hand-offs safe.

:class:`MemoryTransport` is a pure-trio stand-in with the same interface, for deterministic timing
tests on trio's MockClock; it is never the only proof that something works over NATS.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import trio
import trio_asyncio

from .._errors import BackbeatError, NotConnected
from .._transport.base import ConnEvent, EventKind, Message, Subscription, _offer
from .jetstream import NatsJetStream

if TYPE_CHECKING:
    from .._client.config import Config


log = logging.getLogger("backbeat_trio.transport")

_FAILED_CLOSE_BOUND = 0.25  # seconds to let nats-py close a connection whose handshake failed

#: Messages the trio side may queue for the asyncio drainer before publish() refuses.
MAX_QUEUED_PUBLISHES = 65_536


# ------------------------------------------------------------------------------------------------
# nats-py over trio-asyncio
# ------------------------------------------------------------------------------------------------
class NatsTransport:
    """nats-py bridged into trio. Build it with :func:`open_nats_transport`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, event_buffer: int = 1024) -> None:
        self._loop = loop
        self._nc: Any = None
        self._js: Any = None
        self._event_send, self._events = trio.open_memory_channel[ConnEvent](event_buffer)
        self._outq: collections.deque[tuple[str, bytes, dict[str, str] | None, str]] = (
            collections.deque()
        )
        self._wake = asyncio.Event()
        # set while the drainer has nothing queued or in hand (what flush() waits for)
        self._idle = asyncio.Event()
        self._idle.set()
        self._drainer: asyncio.Task[None] | None = None
        self._closed = False
        self._ready = False  # events of failed first-connect attempts are not reported
        self.published = 0
        self.publish_errors = 0
        self.direct_writes = 0  # of ``published``: written at once, without the drainer
        self.events_dropped = 0
        self.last_error: str | None = None
        self._views: list[NatsTransportView] = []

    def __repr__(self) -> str:
        url = getattr(self._nc, "connected_url", None)
        where = url.netloc if url is not None else "-"
        views = f" views={len(self._views)}" if self._views else ""
        return (
            f"<NatsTransport {where} connected={self.connected} published={self.published} "
            f"queued={len(self._outq)}{views}>"
        )

    # -- sharing --------------------------------------------------------------------------------
    def view(self) -> NatsTransportView:
        """A handle on this connection for one more user: many clients in one process can
        share one connection::

            async with bb3.open_nats_transport(cfg) as conn:
                async with conn.view() as t, bb3.open_client(agent_cfg, transport=t) as bb:
                    ...

        Each view gets every connection event on its own ``events`` channel (the transport's
        own ``events`` keeps getting them too) and otherwise does what the transport does. One
        connection instead of one per client saves each client its socket's share of every beat
        (trio-asyncio's per-socket task and nats-py's read loop): see ``docs/scale.md`` §6.
        Events are the connection's: an ``error`` for a publish that nats-py refused, a slow
        consumer or a server ``-ERR`` reaches every view, whoever caused it. Closing a view
        detaches it (using it then raises ``NotConnected``, and a client still running on it
        stops with ``NotConnected``) and leaves the connection open; closing the transport ends
        every view's ``events``.

        Raises:
            NotConnected: the transport is closed.
        """
        if self._closed:
            raise NotConnected("the NATS connection is closed")
        view = NatsTransportView(self)
        self._views.append(view)
        return view

    # -- events ---------------------------------------------------------------------------------
    def _emit(self, kind: EventKind, detail: str = "") -> None:
        if not self._ready:
            return
        event = ConnEvent(kind, detail)
        for view in self._views:
            view._push(event)
        if not _offer(self._event_send, event):
            self.events_dropped += 1

    async def _on_disconnected(self) -> None:
        self._emit("disconnected")

    async def _on_reconnected(self) -> None:
        url = getattr(self._nc, "connected_url", None)
        self._emit("reconnected", url.netloc if url is not None else "")
        self._wake.set()

    async def _on_closed(self) -> None:
        self._emit("closed")

    async def _on_error(self, exc: Exception) -> None:
        import nats.errors

        self.last_error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, nats.errors.SlowConsumerError):
            self._emit("slow_consumer", str(exc))
        else:
            self._emit("error", self.last_error)

    async def _on_lame_duck(self) -> None:
        self._emit("lame_duck")

    @property
    def events(self) -> trio.MemoryReceiveChannel[ConnEvent]:
        """Connection events; one consumer (the client's reconnect-supervisor) reads them."""
        return self._events

    @property
    def connected(self) -> bool:
        """True while nats-py has a live connection."""
        return self._nc is not None and bool(self._nc.is_connected)

    @property
    def client_id(self) -> int | None:
        """The server-assigned client id (useful in logs)."""
        return getattr(self._nc, "client_id", None) if self._nc else None

    # -- connect / close ------------------------------------------------------------------------
    async def _connect(
        self, servers: Sequence[str], options: dict[str, Any], attempts: int, delay: float
    ) -> None:
        import nats.aio.client
        import nats.errors

        # nats-py retries a failing *first* connect forever when max_reconnect_attempts is -1
        # (and loops over the pool even with allow_reconnect=False), so a wrong port or a bad
        # token would hang open_client. The first connect therefore runs with reconnects off and
        # a bounded, immediate retry (nats-py tries each server max_reconnect_attempts + 1 times);
        # our own loop does the `attempts`, and the real reconnect policy is installed afterwards.
        first_connect = {
            **options,
            "allow_reconnect": False,
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0,
        }
        last: BaseException | None = None
        for attempt in range(attempts):
            if attempt:
                await trio.sleep(delay)
            nc = nats.aio.client.Client()
            try:
                await trio_asyncio.aio_as_trio(nc.connect)(
                    servers=list(servers),
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                    error_cb=self._on_error,
                    lame_duck_mode_cb=self._on_lame_duck,
                    **first_connect,
                )
            except (TimeoutError, OSError, nats.errors.Error) as exc:
                last = exc
                log.debug("connect attempt %d/%d failed: %r", attempt + 1, attempts, exc)
                # A refused handshake (bad credentials) leaves nats-py's socket open: close it.
                # Bounded: after a failed TLS upgrade nats-py's close() closes the socket, then
                # waits for ever on the stream that start_tls replaced (nats-py 2.16).
                with contextlib.suppress(Exception), trio.move_on_after(_FAILED_CLOSE_BOUND):
                    await trio_asyncio.aio_as_trio(nc.close)()
                continue
            for key in ("allow_reconnect", "max_reconnect_attempts", "reconnect_time_wait"):
                nc.options[key] = options.get(key, nc.options[key])
            self._nc = nc
            break
        else:
            assert last is not None
            raise NotConnected(_explain_connect_error(servers, last, self.last_error)) from last
        self._ready = True
        self._js = self._nc.jetstream()
        self._drainer = self._loop.create_task(self._drain())

    async def aclose(self) -> None:
        """Flush what is queued (bounded), then close the connection."""
        if self._closed:
            return
        self._closed = True
        # the flush has its own bound: a flush that cannot finish (a stalled server) must not
        # use up the time the connection needs to be closed
        with trio.move_on_after(1.5, shield=True), contextlib.suppress(BackbeatError):
            await self.flush()
        with trio.move_on_after(1.5, shield=True):
            if self._drainer is not None:
                self._drainer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await trio_asyncio.aio_as_trio(asyncio.wait)({self._drainer}, timeout=1.0)
            if self._nc is not None and not self._nc.is_closed:
                # when the grace runs out mid-close, trio-asyncio surfaces asyncio's own
                # CancelledError (not an Exception subclass): it must not escape aclose
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await trio_asyncio.aio_as_trio(_close_nats)(self._nc)
        self._event_send.close()
        for view in self._views:
            view._event_send.close()
        self._views.clear()

    # -- publish --------------------------------------------------------------------------------
    def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: dict[str, str] | None = None,
        reply: str = "",
    ) -> None:
        """Queue one message; the asyncio-side drainer writes it with the rest of its batch.

        Raises:
            NotConnected: the transport is closed.
        """
        if self._closed or self._nc is None or self._nc.is_closed:
            raise NotConnected("the NATS connection is closed")
        if headers is None and not self._outq and self._write_now(subject, payload, reply):
            return
        self._outq.append((subject, payload, headers, reply))
        if len(self._outq) >= MAX_QUEUED_PUBLISHES:
            # the drainer is stuck (a stalled server blocks nats-py's writes): refuse rather than
            # grow without bound; the client keeps the claim in its outbox for later
            raise NotConnected(
                f"{len(self._outq)} messages already wait to be written: the server is not "
                "taking them"
            )
        self._idle.clear()
        if not self._wake.is_set():
            self._wake.set()

    def _write_now(self, subject: str, payload: bytes, reply: str) -> bool:
        """Write one message straight to the socket when nothing is queued ahead of it.

        This is what nats-py's flusher task would do a couple of asyncio wake-ups later (each
        costs ~0.1-0.3 ms under trio-asyncio): append the PUB to nats-py's own pending buffer and
        write that buffer out, so bytes nats-py queued first (SUB, PING) still go first. Returns
        False, having done nothing, whenever the general path must take the message: another
        nats-py version, not connected, the drainer busy, a socket that is not keeping up
        (the drainer waits for it), or anything nats-py would refuse (it reports why).
        """
        drainer = self._drainer
        if (
            not self._idle.is_set()
            or drainer is None
            or drainer.done()  # nothing could take over once the socket pushes back
            or not _direct_nats_supported()
        ):
            return False
        import nats.aio.transport

        nc = self._nc
        io: Any = nc._transport
        plain_tcp = type(io) is nats.aio.transport.TcpTransport  # not WebSocket
        if nc._status != nc.CONNECTED or not plain_tcp:
            return False
        writer = getattr(io, "_io_writer", None)
        if writer is None or writer.transport.get_write_buffer_size():
            return False
        cmd = _wire_bytes(nc, subject, payload, None, reply)
        if cmd is None:
            return False
        pending: list[bytes] = nc._pending
        size: int = nc._pending_data_size
        nc._pending = []
        nc._pending_data_size = 0
        try:
            io.writelines([*pending, cmd])
        except Exception:
            # a transport that is going away: hand everything back to nats-py's own path
            nc._pending = pending + nc._pending
            nc._pending_data_size += size
            return False
        nc.stats["out_msgs"] += 1
        nc.stats["out_bytes"] += len(payload)
        self.published += 1
        self.direct_writes += 1
        return True

    def _encode_queued(self, nc: Any, limit: int) -> int:
        """Move up to ``limit`` queued messages into nats-py's pending buffer as wire bytes.

        Per message this is what ``nc.publish`` does (the same subject, size and header checks,
        the same HPUB/PUB bytes and statistics) without its two coroutine calls and per-header
        ``strip``/``translate``/``encode``: about 5 µs less per claim with four headers. It stops
        at the first message it cannot vouch for (a header value nats-py would rewrite, anything
        it would refuse), which then takes the general path so nats-py reports it. The caller
        hands the buffer to nats-py's flusher. Returns how many messages were moved.
        """
        max_pending = nc._max_pending_size
        pending: list[bytes] = nc._pending
        q = self._outq
        moved = 0
        size = 0
        payload_bytes = 0

        try:
            while q and moved < limit:
                subject, payload, headers, reply = q[0]
                cmd = _wire_bytes(nc, subject, payload, headers, reply)
                if cmd is None:
                    break
                q.popleft()
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
            self.published += moved
        return moved

    async def _drain(self) -> None:
        # asyncio side: runs for the life of the connection
        nc = self._nc
        q = self._outq
        fast = _direct_nats_supported()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while q:
                if fast and nc._status == nc.CONNECTED and self._encode_queued(nc, 4096):
                    # what nats-py's _send_command and _send_publish do after appending: push
                    # back on a full buffer, else wake its flusher
                    try:
                        if 0 < nc._max_pending_size < nc._pending_data_size:
                            await nc._flush_pending(force_flush=True)
                        elif nc._flush_queue is not None and nc._flush_queue.empty():
                            await nc._flush_pending()
                    except Exception as exc:  # its flusher reports a dead connection itself
                        self.last_error = f"flush: {type(exc).__name__}: {exc}"
                    continue
                subject, payload, headers, reply = q.popleft()
                try:
                    await nc.publish(subject, payload, reply=reply, headers=headers)
                    self.published += 1
                except Exception as exc:  # a closed connection, a bad subject: report, go on
                    self.publish_errors += 1
                    self.last_error = f"publish {subject}: {type(exc).__name__}: {exc}"
                    self._emit("error", self.last_error)
            self._idle.set()

    async def flush(self) -> None:
        """Wait until everything queued so far was written and the server answered a PING.

        Raises:
            NotConnected: not connected, or the server did not answer in time.
        """
        if self._nc is None or not self._nc.is_connected:
            raise NotConnected("not connected: cannot flush")

        nc = self._nc

        async def _flush() -> None:
            self._wake.set()
            await self._idle.wait()  # everything queued so far is in nats-py's buffer
            pongs = getattr(nc, "_pongs_received", None)
            await nc.flush(timeout=5)
            # nats-py's flush returns at once, without any PONG, when its read loop has already
            # died with the connection; only a PONG proves the server has what was written
            if not nc.is_connected or (pongs is not None and nc._pongs_received == pongs):
                raise NotConnected("the connection dropped before the server answered")

        # nats-py's PING waits on a future it keeps in a list until the PONG arrives; cancelling
        # that future (a trio cancel scope around this flush) makes the PONG's set_result raise
        # inside nats-py's read loop, which then stops reading for every user of the connection
        # until its stale-ping check reconnects (10-15 s). So the flush runs shielded to its
        # own end (bounded by its 5 s timeout); a caller that gives up just stops waiting.
        task = self._loop.create_task(_flush())
        try:
            await trio_asyncio.run_aio_future(asyncio.shield(task))
        except trio.Cancelled:
            task.add_done_callback(_retrieve)
            raise
        except NotConnected:
            raise
        except Exception as exc:
            raise NotConnected(f"flush failed: {type(exc).__name__}: {exc}") from exc

    # -- subscribe / request --------------------------------------------------------------------
    async def _bridged(
        self,
        subject: str,
        buffer: int,
        what: str,
        subscribe: Callable[..., Any],
        *,
        direct: bool = False,
        handler: Callable[[Message], None] | None = None,
        **options: Any,
    ) -> Subscription:
        # One nats-py subscription whose callback hands each message to trio without awaiting
        # anything across the bridge (see the module docstring). ``direct``: core subscriptions
        # skip nats-py's per-subscription task when the installed nats-py allows it.
        holder: list[Any] = []

        async def unsubscribe() -> None:
            if holder and not self._nc.is_closed:
                with contextlib.suppress(Exception):
                    await trio_asyncio.aio_as_trio(holder[0].unsubscribe)()

        sub = Subscription(subject, buffer, unsubscribe, handler)
        deliver = sub._deliver

        async def cb(msg: Any) -> None:
            deliver(msg)

        async def _subscribe() -> Any:
            nsub = await subscribe(
                subject, cb=cb, pending_msgs_limit=max(buffer * 4, 65536), **options
            )
            # no await since subscribe() returned: nats-py's read loop cannot have run
            if direct:
                _deliver_directly(nsub, deliver)
            return nsub

        try:
            holder.append(await trio_asyncio.aio_as_trio(_subscribe)())
        except Exception as exc:
            raise NotConnected(f"{what} {subject!r} failed: {exc}") from exc
        return sub

    async def subscribe(
        self,
        subject: str,
        *,
        buffer: int = 1024,
        handler: Callable[[Message], None] | None = None,
    ) -> Subscription:
        """Subscribe; messages arrive on ``Subscription.messages`` (bounded; overflow counted),
        or are handed to ``handler`` as nats-py parses them (see :class:`Subscription`)."""
        return await self._bridged(
            subject,
            buffer,
            "subscribe",
            self._nc.subscribe,
            direct=_direct_nats_supported(),
            handler=handler,
        )

    def new_inbox(self) -> str:
        """A fresh unique inbox subject."""
        return str(self._nc.new_inbox())

    async def request(self, subject: str, payload: bytes) -> bytes:
        """One request/response; bound the wait with a cancel scope (not for hot paths).

        Raises:
            NotConnected: nobody answers on ``subject`` (NATS 503) or the connection is down.
        """
        inbox = self.new_inbox()
        sub = await self.subscribe(inbox, buffer=1)
        try:
            self.publish(subject, payload, reply=inbox)
            msg = await sub.messages.receive()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await sub.unsubscribe()
        if not msg.data and (msg.headers or {}).get("Status") == "503":
            raise NotConnected(f"request {subject!r}: no responders")
        return bytes(msg.data)

    # -- JetStream ------------------------------------------------------------------------------
    @property
    def jetstream(self) -> NatsJetStream:
        """Streams and key/value buckets on this connection (:class:`NatsJetStream`)."""
        return NatsJetStream(lambda: self)

    async def find_stream(self, subject: str) -> str | None:
        """The JetStream stream capturing ``subject``, or None (also when JetStream is off)."""
        return await self.jetstream.find_stream(subject)

    async def ensure_stream(
        self,
        name: str,
        subjects: Sequence[str],
        *,
        duplicate_window: float = 120.0,
        replicas: int = 1,
    ) -> int:
        """Create (or keep) a stream capturing ``subjects``: :meth:`NatsJetStream.ensure_stream`.

        Returns:
            The stream's replica count.

        Raises:
            BackbeatError: JetStream refused (not enabled, or subjects overlap another stream).
        """
        return await self.jetstream.ensure_stream(
            name, subjects, duplicate_window=duplicate_window, replicas=replicas
        )

    async def stream_subscribe(
        self,
        subject: str,
        stream: str,
        *,
        buffer: int = 65536,
        deliver: Literal["new", "last_per_subject"] = "new",
        handler: Callable[[Message], None] | None = None,
    ) -> Subscription:
        """Receive what ``stream`` stores on ``subject`` from now on (an ordered consumer).

        Unlike a core subscription, this sees each ``Nats-Msg-Id`` once: the stream has already
        dropped re-published duplicates. ``deliver="last_per_subject"`` starts with the latest
        stored message of each matching subject (a key/value watch). Each message's
        ``metadata.sequence.stream`` is its stream sequence (a KV key's revision). ``handler``
        as for :meth:`subscribe`.
        """
        from nats.js.api import DeliverPolicy

        policy = DeliverPolicy.NEW if deliver == "new" else DeliverPolicy.LAST_PER_SUBJECT
        return await self._bridged(
            subject,
            buffer,
            f"stream subscribe {stream}/",
            self._js.subscribe,
            handler=handler,
            stream=stream,
            ordered_consumer=True,
            deliver_policy=policy,
        )


class NatsTransportView:
    """One user's handle on a shared :class:`NatsTransport` (made by :meth:`NatsTransport.view`).

    It is a :class:`Transport`: its own ``events`` channel (every connection event), everything
    else done by the shared transport. :meth:`aclose` detaches it; the connection stays open.

    Attributes:
        transport: the shared transport.
        events_dropped: events this view's full ``events`` channel could not take.
    """

    def __init__(self, transport: NatsTransport, event_buffer: int = 1024) -> None:
        self.transport = transport
        self._event_send, self._events = trio.open_memory_channel[ConnEvent](event_buffer)
        self.events_dropped = 0
        self._detached = False

    def __repr__(self) -> str:
        state = "detached " if self._detached else ""
        return f"<NatsTransportView {state}of {self.transport!r}>"

    def _shared_transport(self) -> NatsTransport:
        if self._detached:
            raise NotConnected("this view of the NATS connection was closed")
        return self.transport

    def _push(self, event: ConnEvent) -> None:
        if not _offer(self._event_send, event):
            self.events_dropped += 1

    @property
    def connected(self) -> bool:
        """True while the shared connection is up."""
        return not self._detached and self.transport.connected

    @property
    def events(self) -> trio.MemoryReceiveChannel[ConnEvent]:
        """This view's connection events (one consumer)."""
        return self._events

    def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: dict[str, str] | None = None,
        reply: str = "",
    ) -> None:
        """:meth:`NatsTransport.publish`."""
        self._shared_transport().publish(subject, payload, headers=headers, reply=reply)

    async def flush(self) -> None:
        """:meth:`NatsTransport.flush` (waits for everything queued on the connection)."""
        await self._shared_transport().flush()

    async def subscribe(
        self,
        subject: str,
        *,
        buffer: int = 1024,
        handler: Callable[[Message], None] | None = None,
    ) -> Subscription:
        """:meth:`NatsTransport.subscribe`."""
        return await self._shared_transport().subscribe(subject, buffer=buffer, handler=handler)

    async def request(self, subject: str, payload: bytes) -> bytes:
        """:meth:`NatsTransport.request`."""
        return await self._shared_transport().request(subject, payload)

    def new_inbox(self) -> str:
        """:meth:`NatsTransport.new_inbox`."""
        return self._shared_transport().new_inbox()

    @property
    def jetstream(self) -> NatsJetStream:
        """:attr:`NatsTransport.jetstream` (through this view while it is open)."""
        return NatsJetStream(self._shared_transport)

    async def find_stream(self, subject: str) -> str | None:
        """:meth:`NatsTransport.find_stream`."""
        return await self.jetstream.find_stream(subject)

    async def ensure_stream(
        self,
        name: str,
        subjects: Sequence[str],
        *,
        duplicate_window: float = 120.0,
        replicas: int = 1,
    ) -> int:
        """:meth:`NatsTransport.ensure_stream`."""
        return await self.jetstream.ensure_stream(
            name, subjects, duplicate_window=duplicate_window, replicas=replicas
        )

    async def stream_subscribe(
        self,
        subject: str,
        stream: str,
        *,
        buffer: int = 65536,
        deliver: Literal["new", "last_per_subject"] = "new",
        handler: Callable[[Message], None] | None = None,
    ) -> Subscription:
        """:meth:`NatsTransport.stream_subscribe`."""
        return await self._shared_transport().stream_subscribe(
            subject, stream, buffer=buffer, deliver=deliver, handler=handler
        )

    async def __aenter__(self) -> NatsTransportView:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Detach this view (its ``events`` ends); the shared connection stays open."""
        self._detached = True
        with contextlib.suppress(ValueError):
            self.transport._views.remove(self)
        self._event_send.close()
        await trio.lowlevel.checkpoint()


# ------------------------------------------------------------------------------------------------
# Fast paths through nats-py internals, pinned to the versions they were checked against
# ------------------------------------------------------------------------------------------------
#: nats-py versions whose internals the fast paths below were read and tested against; any other
#: version (or a shape that does not match) takes nats-py's public path.
_DIRECT_NATS_VERSIONS = ("2.16.",)


@functools.cache
def _direct_nats_supported() -> bool:
    try:
        import nats.aio.client
        import nats.aio.subscription
        import nats.aio.transport
        import nats.protocol.command
    except ImportError:  # pragma: no cover - nats-py is a dependency
        return False
    version = str(getattr(nats.aio.client, "__version__", ""))
    return (
        version.startswith(_DIRECT_NATS_VERSIONS)
        and callable(getattr(nats.aio.subscription.Subscription, "_wait_for_msgs", None))
        and callable(getattr(nats.aio.client, "_validate_subject", None))
        and callable(getattr(nats.protocol.command, "pub_cmd", None))
        and hasattr(nats.aio.transport, "TcpTransport")
    )


def _wire_bytes(
    nc: Any, subject: str, payload: bytes, headers: dict[str, str] | None, reply: str
) -> bytes | None:
    """The PUB/HPUB bytes nats-py's ``publish`` would queue for this message, after its checks
    (subject, reply, size, header names and values); None for anything nats-py would refuse or
    rewrite (values it strips or whose CR/LF it replaces, empty keys it skips): its own path
    then takes the message and reports what is wrong. Shared by both fast paths (the drainer's
    batch, the write at once); nats-py 2.16 only, like them."""
    import nats.aio.client

    try:
        if type(subject) is not str or not subject or type(reply) is not str:
            return None
        if type(payload) is not bytes or len(payload) > nc._max_payload:
            return None
        if not nc._skip_subject_validation:
            nats.aio.client._validate_subject(subject)
            if reply:
                nats.aio.client._validate_subject(reply)
        n = len(payload)
        if headers is None:
            return f"PUB {subject} {reply} {n}\r\n".encode() + payload + b"\r\n"
        header_key = nats.aio.client._HEADER_KEY_RE.fullmatch
        lines = ["NATS/1.0\r\n"]
        for k, v in headers.items():
            if (
                type(k) is not str
                or type(v) is not str
                or header_key(k) is None
                or "\r" in v
                or "\n" in v
                or (v and (v[0].isspace() or v[-1].isspace()))
            ):
                return None
            lines.append(f"{k}: {v}\r\n")
        lines.append("\r\n")
        hdr = "".join(lines).encode()
        h = len(hdr)
        return f"HPUB {subject} {reply} {h} {h + n}\r\n".encode() + hdr + payload + b"\r\n"
    except Exception:  # a subject nats-py refuses, text that does not encode...
        return None


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Done-callback for a task nobody awaits any more: read its outcome (no asyncio warning)."""
    if not task.cancelled():
        task.exception()


class _DirectPending:
    """Stands in for a nats-py subscription's pending ``asyncio.Queue``: nats-py's parser calls
    ``put_nowait`` for each message, which hands it to trio at once.

    Without it every message waits for the subscription's own asyncio task to be scheduled,
    which costs ~0.25 ms per message under trio-asyncio. The bound and the overflow count move
    to the trio channel behind ``deliver`` (:class:`Subscription`), so nothing is lost silently.
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


def _deliver_directly(nsub: Any, deliver: Callable[[Any], None]) -> bool:
    """Route a fresh nats-py callback subscription around its per-subscription task.

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
    nsub._pending_queue = _DirectPending(nsub, deliver)
    # the task never ran (no await since it was created); it ends at its first step
    task.cancel()
    while not queue.empty():  # defensive: nothing should be queued yet
        msg = queue.get_nowait()
        nsub._pending_size -= len(msg.data)
        deliver(msg)
    return True


async def _close_nats(nc: Any) -> None:
    """Close a nats-py client and make sure none of its asyncio tasks outlive it.

    nats-py 2.16's ``close()`` writes its reconnect buffer into the old socket before it cancels
    the subscriptions' tasks; while disconnected that write raises ``ConnectionResetError`` and
    the tasks are left pending for ever (seen as a leaked ``Subscription._wait_for_msgs``). So a
    client that is not connected drops that buffer first (its bytes could not reach a server
    anyway: claims are still held by the client's outbox), and whatever happens inside
    ``close()``, a sweep afterwards cancels what is left and closes the socket.
    """
    try:
        if not nc.is_connected:
            nc._pending = []
            nc._pending_data_size = 0
        await nc.close()
    finally:
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
            with contextlib.suppress(Exception):
                nc._transport.close()
        if left:
            await asyncio.wait(left, timeout=0.5)


def _explain_connect_error(
    servers: Sequence[str], exc: BaseException, cause: str | None = None
) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    if cause and cause not in text:
        # nats-py reports "no servers available"; the error callback saw the reason
        text = f"{cause} ({text})"
    low = text.lower()
    where = ", ".join(servers)
    if "authorization" in low or "auth" in low:
        return f"NATS at {where} refused the credentials (authorization violation): {text}"
    if "ssl" in low or "certificate" in low or "tls" in low:
        return f"TLS handshake with {where} failed: {text}"
    return f"could not connect to NATS at {where}: {text}"


def _nats_options(cfg: Config) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "name": cfg.name or f"backbeat-trio:{cfg.agent_id}",
        "allow_reconnect": True,
        "reconnect_time_wait": cfg.reconnect_delay,
        "max_reconnect_attempts": cfg.max_reconnects,
        "connect_timeout": 2,
        "ping_interval": 5,
        "max_outstanding_pings": 2,
    }
    if cfg.user is not None:
        opts["user"] = cfg.user
        opts["password"] = cfg.password
    if cfg.token is not None:
        opts["token"] = cfg.token
    if cfg.creds_file is not None:
        opts["user_credentials"] = cfg.creds_file
    if cfg.nkeys_seed is not None:
        opts["nkeys_seed"] = cfg.nkeys_seed
    ctx = cfg.ssl_context()
    if ctx is not None:
        opts["tls"] = ctx
    return opts


@contextlib.asynccontextmanager
async def _asyncio_loop() -> AsyncIterator[asyncio.AbstractEventLoop]:
    # reuse the caller's trio-asyncio loop when one is open
    try:
        loop = trio_asyncio.current_loop.get()
    except LookupError:
        loop = None
    if loop is not None:
        yield loop
    else:
        async with trio_asyncio.open_loop() as new_loop:
            yield new_loop


@contextlib.asynccontextmanager
async def open_nats_transport(cfg: Config) -> AsyncIterator[NatsTransport]:
    """Connect to NATS as ``cfg`` says and yield a :class:`NatsTransport`.

    Raises:
        NotConnected: the first connect failed ``cfg.connect_attempts`` times (the message says
            why: refused, credentials, TLS).
    """
    async with _asyncio_loop() as loop:
        transport = NatsTransport(loop)
        await transport._connect(
            cfg.servers, _nats_options(cfg), cfg.connect_attempts, cfg.reconnect_delay
        )
        try:
            yield transport
        finally:
            await transport.aclose()
