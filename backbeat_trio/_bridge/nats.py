"""The transport: nats-py bridged into trio (with :mod:`.view`, :mod:`.loop`, :mod:`.options`,
:mod:`.errors` and :mod:`._natspy_private` the only code that touches asyncio and nats-py).

Everything above it is pure trio. The bridge is crossed as rarely as possible:

* **Receive**: each message is handed to trio with ``send_nowait`` on a bounded memory channel —
  no await crosses the bridge per message. For core subscriptions on a known nats-py version this
  happens right in nats-py's parser (:class:`~._natspy_private.DirectPending`), skipping its
  per-subscription task, and their header-less messages with no reply (PubAcks, beat frames)
  are read before nats-py's parser builds a ``Msg`` for them
  (:func:`~._natspy_private.read_directly`); otherwise nats-py's subscription callback does it.
* **Publish**: on a known nats-py version, a message with nothing queued ahead of it, on a
  connected socket that keeps up, is written at once (a beat frame's latency, a claim's), and
  the messages published after it in the same trio batch (many clients claiming on one beat)
  join nats-py's buffer and go out in one write when that batch ends (a trio task of the
  connection's, woken once per batch): no asyncio callback runs for them, and each asyncio
  callback costs a pass of trio's scheduler under trio-asyncio. Otherwise trio appends to a
  deque and sets an ``asyncio.Event``; one long-lived asyncio task drains the whole deque into
  nats-py, so a burst costs one wake-up, not one crossing per message.
* **Events** (disconnected, reconnected, closed, error, slow consumer) arrive the same way as
  messages, on their own channel.

Both worlds run on one thread (trio-asyncio), which is what makes the synchronous hand-offs safe.

nats-py's private names are used only by :mod:`._natspy_private`, behind one gate asked once per
connection (``BACKBEAT_TRIO_NATS_FAST=0`` forces the public path). Differences on the public path
are described where they matter (:meth:`NatsTransport.flush`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import trio
import trio_asyncio

from .._errors import BackbeatError, NotConnected
from .._transport.base import ConnEvent, EventFeed, EventKind, Message, Subscription
from .._transport.shared import Prepare, SharedSubscription, SharedSubscriptions
from . import _natspy_private as private
from .errors import describe, ignore_nats_errors, is_slow_consumer, map_nats_errors
from .jetstream import NatsJetStream
from .loop import asyncio_loop as _asyncio_loop
from .options import connect_accepts, connect_nats
from .options import nats_options as _nats_options
from .view import NatsTransportView

if TYPE_CHECKING:
    from .._transport.options import ConnectionOptions

__all__ = [
    "MAX_QUEUED_PUBLISHES",
    "NatsTransport",
    "NatsTransportView",
    "_asyncio_loop",
    "_nats_options",
    "open_nats_transport",
]

log = logging.getLogger("backbeat_trio.transport")

T = TypeVar("T")

#: Messages the trio side may queue for the asyncio drainer before publish() refuses.
MAX_QUEUED_PUBLISHES = 65_536


class NatsTransport(EventFeed):
    """nats-py bridged into trio. Build it with :func:`open_nats_transport`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, event_buffer: int = 1024) -> None:
        super().__init__(event_buffer)
        self._loop = loop
        self._nc: Any = None
        self._js: Any = None
        self._outq: collections.deque[private.Queued] = collections.deque()
        self._wake = asyncio.Event()
        # set while the drainer has nothing queued or in hand (what flush() waits for)
        self._idle = asyncio.Event()
        self._idle.set()
        self._drainer: asyncio.Task[None] | None = None
        self._closed = False
        self._ready = False  # events of failed first-connect attempts are not reported
        # nats-py's fast paths (its private names) for this connection; decided at connect
        self.fast = False
        self._nsubs: set[Any] = set()  # live nats-py subscriptions, unsubscribed at close
        self.published = 0
        self.publish_errors = 0
        self.direct_writes = 0  # of ``published``: written at once or joining, without the drainer
        self._batches: private.BatchWriter | None = None  # the direct writes (fast path)
        self.last_error: str | None = None
        # what the error callback saw during the first connect (its refusal names it)
        self._connect_failure: BaseException | None = None
        self._views: list[NatsTransportView] = []
        self._shared = SharedSubscriptions(self._subscribe_inline)
        self.drain_batches = 0  # wake-ups of the drainer that wrote queued messages
        self.flush_rounds = 0  # PINGs sent by flush(), shared by the callers of one round
        self._flush_pending: asyncio.Task[None] | None = None  # the round not yet started

    def __repr__(self) -> str:
        url = getattr(self._nc, "connected_url", None)
        where = url.netloc if url is not None else "-"
        views = f" views={len(self._views)}" if self._views else ""
        return (
            f"<NatsTransport {where} connected={self.connected} published={self.published} "
            f"queued={len(self._outq)}{views}>"
        )

    def _aio(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        # this connection's loop, named: the caller's context may hold another one (or none)
        return trio_asyncio.aio_as_trio(fn, loop=self._loop)  # type: ignore[no-any-return]

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
        self._push(event)

    async def _on_disconnected(self) -> None:
        self._emit("disconnected")

    async def _on_reconnected(self) -> None:
        url = getattr(self._nc, "connected_url", None)
        self._emit("reconnected", url.netloc if url is not None else "")
        self._wake.set()

    async def _on_closed(self) -> None:
        self._emit("closed")

    async def _on_error(self, exc: Exception) -> None:
        if not self._ready:  # a live connection need not hold on to its errors' tracebacks
            self._connect_failure = exc
        self.last_error = describe(exc)
        if is_slow_consumer(exc):
            self._emit("slow_consumer", str(exc))
        else:
            self._emit("error", self.last_error)

    async def _on_lame_duck(self) -> None:
        self._emit("lame_duck")

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
        callbacks: dict[str, Any] = {
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "closed_cb": self._on_closed,
            "error_cb": self._on_error,
        }
        if connect_accepts("lame_duck_mode_cb"):
            callbacks["lame_duck_mode_cb"] = self._on_lame_duck
        self._nc = await connect_nats(
            self._loop,
            servers,
            {**options, **callbacks},
            attempts,
            delay,
            lambda: self._connect_failure,
        )
        self._ready = True
        self._connect_failure = None
        self.fast = private.fast_path_enabled()
        self._js = self._nc.jetstream()
        self._drainer = self._loop.create_task(self._drain())
        if self.fast:
            private.read_directly(self._nc)
            # a system task: no cancel scope of a user's ends it; aclose does
            self._batches = private.BatchWriter(self._nc)
            trio.lowlevel.spawn_system_task(self._batches.run, name="backbeat-nats-batches")

    async def aclose(self) -> None:
        """Flush what is queued (bounded), then close the connection.

        Every subscription is unsubscribed first (which ends nats-py's tasks for it, JetStream
        heartbeat and flow-control ones included), then nats-py closes the connection. On the
        fast path nothing of nats-py's outlives this call. On the public path one thing can:
        when nats-py's ``close()`` fails (2.16 does while it holds a reconnect buffer for a dead
        server), the task of nats-py's own request-reply subscription (made by JetStream calls)
        waits until its loop closes; the loop's owner (see :mod:`.loop`) then ends it.
        """
        if self._closed:
            return
        self._closed = True
        self._shared.close()
        if self._batches is not None:  # no direct writes from now on: the flush takes them
            await self._batches.aclose()
        # the flush has its own bound: a flush that cannot finish (a stalled server) must not
        # use up the time the connection needs to be closed
        with trio.move_on_after(1.5, shield=True):
            try:
                await self.flush()
            except BackbeatError as exc:
                log.debug("closing without a final flush: %s", exc)
        with trio.move_on_after(1.5, shield=True):
            try:
                if self._drainer is not None:
                    self._drainer.cancel()
                    await self._aio(asyncio.wait)({self._drainer}, timeout=1.0)
                if self._nc is not None and not self._nc.is_closed:
                    await self._aio(self._close_nats)()
            except asyncio.CancelledError:
                # when the grace runs out mid-close, trio-asyncio surfaces asyncio's own
                # CancelledError (not an Exception subclass): it must not escape aclose
                log.debug("closing the NATS connection ran out of time; dropped")
        self._end_events()
        for view in self._views:
            view._end_events()
        self._views.clear()

    async def _close_nats(self) -> None:
        # asyncio side
        nc = self._nc
        for nsub in list(self._nsubs):
            with ignore_nats_errors(
                "unsubscribe at close",
                "the connection is closing: its UNSUB could not be sent; the tasks are ended",
            ):
                await nsub.unsubscribe()
        self._nsubs.clear()
        if self.fast:
            private.drop_reconnect_buffer(nc)
        try:
            # nats-py 2.16 writes its reconnect buffer into a dead socket in close() and stops
            # there (before its subscriptions' tasks: those were unsubscribed above)
            with ignore_nats_errors("nats-py's close()", "our subscriptions were ended first"):
                await nc.close()
        finally:
            if self.fast:
                await private.sweep_closed(nc)

    # -- publish --------------------------------------------------------------------------------
    def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: dict[str, str] | None = None,
        reply: str = "",
    ) -> None:
        """Send one message: written at once, or with the others of this trio batch when it ends
        (fast path), else queued for the asyncio-side drainer (see the module docstring).

        Raises:
            NotConnected: the transport is closed.
        """
        if self._closed or self._nc is None or self._nc.is_closed:
            raise NotConnected("the NATS connection is closed")
        if not self._outq and self._write_now(subject, payload, headers, reply):
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

    def _write_now(
        self, subject: str, payload: bytes, headers: dict[str, str] | None, reply: str
    ) -> bool:
        """Write one message straight to the socket when nothing is queued ahead of it, or join
        it to the write that ends this trio batch (fast path only, see
        :class:`~._natspy_private.BatchWriter`); False when the drainer must."""
        drainer = self._drainer
        batches = self._batches
        if (
            batches is None
            or not self._idle.is_set()
            or drainer is None
            or drainer.done()  # nothing could take over once the socket pushes back
            or not batches.send(subject, payload, headers, reply)
        ):
            return False
        self.published += 1
        self.direct_writes += 1
        return True

    @property
    def joined_writes(self) -> int:
        """Of ``direct_writes``: the messages that went out with the write ending their trio
        batch (the first of a batch is written at once)."""
        return self._batches.joined if self._batches is not None else 0

    def _encode_queued(self, nc: Any, limit: int) -> int:
        """Move up to ``limit`` queued messages into nats-py's buffer (fast path only, see
        :func:`~._natspy_private.encode_queued`). Returns how many were moved."""
        moved = private.encode_queued(nc, self._outq, limit)
        self.published += moved
        return moved

    async def _drain(self) -> None:
        # asyncio side: runs for the life of the connection
        nc = self._nc
        q = self._outq
        fast = self.fast
        while True:
            await self._wake.wait()
            self._wake.clear()
            if q:
                self.drain_batches += 1
            while q:
                if fast and nc.is_connected and self._encode_queued(nc, 4096):
                    try:
                        with map_nats_errors("flush"):
                            await private.push_pending(nc)
                    except BackbeatError as exc:  # its flusher reports a dead connection itself
                        self.last_error = str(exc)
                        log.debug("drainer: %s; nats-py's flusher reports", exc)
                    continue
                subject, payload, headers, reply = q.popleft()
                try:
                    with map_nats_errors(f"publish {subject}"):
                        await nc.publish(subject, payload, reply=reply, headers=headers)
                except BackbeatError as exc:  # a closed connection, a bad subject: report, go on
                    self.publish_errors += 1
                    self.last_error = str(exc)
                    self._emit("error", self.last_error)
                else:
                    self.published += 1
            self._idle.set()

    async def flush(self) -> None:
        """Wait until everything queued so far was written and the server answered a PING.

        On nats-py's public path (another nats-py version, or ``BACKBEAT_TRIO_NATS_FAST=0``) a
        dead connection is detected by nats-py's own state only: nats-py's ``flush`` returns
        without a PONG when its read loop has already ended, and this flush then raises only
        if nats-py also says it is no longer connected (the fast path counts the PONGs).

        Raises:
            NotConnected: not connected, or the server did not answer in time.
        """
        if self._nc is None or not self._nc.is_connected:
            raise NotConnected("not connected: cannot flush")
        # nats-py's PING waits on a future it keeps in a list until the PONG arrives; cancelling
        # that future (a trio cancel scope around this flush) makes the PONG's set_result raise
        # inside nats-py's read loop, which then stops reading for every user of the connection
        # until its stale-ping check reconnects (10-15 s). So the flush runs shielded to its
        # own end (bounded by its 5 s timeout); a caller that gives up just stops waiting.
        task = self._flush_round()
        try:
            with map_nats_errors("flush"):
                await trio_asyncio.run_aio_future(asyncio.shield(task))
        except trio.Cancelled:
            task.add_done_callback(_retrieve)
            raise
        except NotConnected as exc:
            # the round's exception is shared by all its callers: each gets its own
            raise NotConnected(str(exc)) from exc

    def _flush_round(self) -> asyncio.Task[None]:
        """The flush a caller arriving now waits for.

        Callers share flushes: many clients on one connection confirming their claims at the
        same moment cost one PING, not one each. A round covers every message queued before it
        starts, so a caller joins the round that has not started yet, else makes a new one.
        Rounds never wait for each other: one that a dropped connection left waiting for its
        PONG must not hold up the rounds after the reconnect.
        """
        pending = self._flush_pending
        if pending is None:
            pending = self._flush_pending = self._loop.create_task(self._run_flush_round())
        return pending

    async def _run_flush_round(self) -> None:
        # asyncio side
        self._flush_pending = None  # later callers need a round that starts after this point
        nc = self._nc
        if not nc.is_connected:
            raise NotConnected("not connected: cannot flush")
        self.flush_rounds += 1
        fast = self.fast
        self._wake.set()
        await self._idle.wait()  # everything queued so far is in nats-py's buffer
        if fast:
            # nats-py writes its PING straight to the socket: what waits in its buffer (a trio
            # batch's joined messages, say) must go first, or the PONG would not cover it
            private.write_pending(nc)
        pongs = private.pongs_received(nc) if fast else None
        with map_nats_errors("flush"):
            await nc.flush(timeout=5)
        # nats-py's flush returns at once, without any PONG, when its read loop has already
        # died with the connection; only a PONG proves the server has what was written
        if not nc.is_connected or (pongs is not None and private.pongs_received(nc) == pongs):
            raise NotConnected("the connection dropped before the server answered")

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
        # skip nats-py's per-subscription task (fast path only).
        holder: list[Any] = []

        async def unsubscribe() -> None:
            if not holder or holder[0] not in self._nsubs:
                return
            nsub = holder[0]
            self._nsubs.discard(nsub)
            if self._nc.is_closed:
                return
            with ignore_nats_errors(
                f"unsubscribe {subject!r}",
                "the connection went away meanwhile: nats-py drops its interest with it",
            ):
                await self._aio(nsub.unsubscribe)()

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
                private.deliver_directly(nsub, deliver)
            return nsub

        with map_nats_errors(f"{what} {subject!r}"):
            nsub = await self._aio(_subscribe)()
        holder.append(nsub)
        self._nsubs.add(nsub)
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
            direct=self.fast,
            handler=handler,
        )

    async def _subscribe_inline(
        self, subject: str, handler: Callable[[Message], None]
    ) -> Subscription:
        return await self.subscribe(subject, buffer=1, handler=handler)

    async def subscribe_shared(
        self,
        subject: str,
        *,
        key: Hashable,
        prepare: Callable[[], Prepare[T]],
        handler: Callable[[T], None] | None = None,
        buffer: int = 1024,
    ) -> SharedSubscription[T]:
        """Join the one subscription to ``subject`` that every user of this connection with
        the same ``key`` shares: the server sends each message once, ``prepare`` (made by the
        first member) turns it into one item, and each member's ``handler`` gets that item as
        nats-py parses the message (see :mod:`backbeat_trio._transport.shared`). The last
        member to leave ends the subscription.

        Raises:
            NotConnected: the transport is closed, or subscribing failed.
        """
        return await self._shared.join(
            subject, key=key, prepare=prepare, handler=handler, buffer=buffer
        )

    @property
    def shared_subscriptions(self) -> SharedSubscriptions:
        """The shared subscriptions of this connection (their members and ``prepare`` counters)."""
        return self._shared

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


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Done-callback for a task nobody awaits any more: read its outcome (no asyncio warning)."""
    if not task.cancelled():
        task.exception()


@contextlib.asynccontextmanager
async def open_nats_transport(cfg: ConnectionOptions) -> AsyncIterator[NatsTransport]:
    """Connect to NATS as ``cfg`` says and yield a :class:`NatsTransport`.

    It runs on the trio-asyncio loop the user opened around it, else on one of its own (never
    on a loop another SDK object opened: see :mod:`.loop`).

    Args:
        cfg: the connection options: a :class:`~backbeat_trio.Config`, a service's config
            (``PulseConfig``, ``HAPulseConfig``, ``ReverbConfig``) or a bare
            :class:`~backbeat_trio.ConnectionOptions`.

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
