"""Claims out, the trio side: publishing what the :class:`~.._core.outbox.Outbox` says, the
confirmer (core mode: a PING/PONG confirms what the server has) and the ack-listener (JetStream
mode: PubAcks on one wildcard inbox, unacknowledged claims retried)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable

import trio

from .._core.outbox import Outbox, Outgoing
from .._core.wire import StatusClaim
from .._errors import NotConnected
from .._transport.base import Message, Transport

__all__ = ["BURST_BATCH_S", "ClaimDelivery"]

#: JetStream mode: a claim emitted within this many seconds of the last publish waits for the
#: next batch instead of going out alone (a burst then costs the connection and the server a
#: write per batch, not per trio scheduler pass); a claim after a quiet spell goes out at once.
BURST_BATCH_S = 0.005


class ClaimDelivery:
    """Publishes one client's claims and waits for them to be delivered.

    Args:
        outbox: the sans-IO outbox that decides what to publish and keeps what is undelivered.
        transport: the connection claims are published on.
        status_subject: the subject they go to.

    Attributes:
        outbox: as given.
        connected: the client's view of the connection (from its connection events).
        spawn: core mode: starts the confirmer with the first claim written (a client that
            never claims runs no confirmer); None: it is started as a task of its own.
    """

    def __init__(self, outbox: Outbox, transport: Transport, status_subject: str) -> None:
        self.outbox = outbox
        self.connected = transport.connected
        self._transport = transport
        self._status_subject = status_subject
        # made when a task first waits on them: most clients of a big host never do
        self._changed: trio.Event | None = None
        self._waiters = 0  # tasks in flush(), waiting for _changed
        self._confirm_wake: trio.Event | None = None
        self._confirm_scope: trio.CancelScope | None = None
        # JetStream mode: claims of a burst waiting for their batch (all in outbox.pending)
        self._held: list[Outgoing] = []
        self._held_wake = trio.Event()
        self._last_publish = -math.inf
        self.spawn: Callable[[Callable[[], Awaitable[None]]], object] | None = None

    def __repr__(self) -> str:
        return f"<ClaimDelivery {self.outbox!r} connected={self.connected}>"

    async def detect_mode(self, want: bool | None, cluster_id: str) -> None:
        """Use JetStream when a stream captures the status subject (``want``: None), or as told.

        Raises:
            NotConnected: ``want`` is True and no stream captures the status subject.
        """
        if want is False:
            return
        stream = await self._transport.jetstream.find_stream(self._status_subject)
        if stream is None:
            if want:
                raise NotConnected(
                    f"jetstream=True but no JetStream stream captures {self._status_subject!r} "
                    f"(run the reverb, or create BACKBEAT_STATUS_{cluster_id})"
                )
            return
        self.outbox.use_jetstream(f"{self._transport.new_inbox()}.ack")

    # ------------------------------------------------------------------ publishing
    def emit(self, claim: StatusClaim, beat_index: int) -> StatusClaim:
        """Hand one claim to the outbox and publish it if the outbox says so; returns it as sent.

        Raises:
            InvalidStatusClaim: the claim breaks the contract; nothing was kept.
            NotConnected: the outbox is full.
        """
        # the transport knows about a dead connection before its event reaches the supervisor:
        # a claim emitted in between waits in the outbox instead of going into a dead socket
        # (JetStream mode keeps every claim in the outbox until its PubAck, and send() asks the
        # transport before each publish: one question per claim is enough)
        outbox = self.outbox
        connected = self.connected and (outbox.mode == "jetstream" or self._transport.connected)
        out, send_now = outbox.admit(claim, beat_index, connected=connected)
        if send_now:
            if outbox.mode == "jetstream":
                # (a held claim is in the outbox already: kept, listed, re-published, as any other)
                held = self._held
                if held:  # a batch is being gathered: join it (no clock read per claim)
                    held.append(out)
                    return out.claim
                now = trio.current_time()
                if now - self._last_publish < BURST_BATCH_S:
                    self._held_wake.set()
                    held.append(out)
                    return out.claim
                self._last_publish = now
            self.send(out)
        return out.claim

    def send(self, out: Outgoing, now: float | None = None) -> None:
        """Publish ``out`` now (or keep it in the outbox when the connection is down); ``now``:
        the current time when the caller has read it already."""
        transport = self._transport
        if not transport.connected:
            # known dead (its event may still be on the way): keep it for the reconnect
            self.outbox.keep(out)
            return
        try:
            transport.publish(self._status_subject, out.body, headers=out.headers, reply=out.reply)
        except NotConnected:
            self.outbox.keep(out)
            return
        if self.outbox.published(out, trio.current_time() if now is None else now):
            self._wake_confirmer()
            spawn = self.spawn
            if spawn is not None:  # the first claim to confirm: start the confirmer
                self.spawn = None
                spawn(self._confirm)
            if self._waiters:  # checked here too: no call per claim when nobody waits
                self._notify()

    def _wake_confirmer(self) -> None:
        wake = self._confirm_wake
        if wake is not None:
            wake.set()

    def _notify(self) -> None:
        # Swap, then set: every waiter (flush may be awaited by several tasks) wakes and
        # re-checks; waiters never replace the event themselves, or one could strand another.
        # Nobody waiting (the common case, once per claim): nothing to wake, no new Event.
        # A waiter only leaves once nothing is undelivered: waking it for every PubAck of a
        # burst would cost a task switch per claim for nothing.
        if self._waiters and not self.outbox.busy:
            event, self._changed = self._changed, None
            if event is not None:
                event.set()

    async def flush(self) -> None:
        """Wait until every claim so far is delivered (see ``Client.flush_claims``)."""
        self._release_held()  # the caller waits for them: no reason to wait for their batch
        while self.outbox.busy:
            if self._changed is None:  # made by the first waiter, shared by the others
                self._changed = trio.Event()
            self._waiters += 1
            try:
                await self._changed.wait()
            finally:
                self._waiters -= 1
        # JetStream mode: each claim's PubAck says the stream stored it, which no PONG can add
        # to; a PING then would only cost the caller a round trip (and a crossing of the bridge)
        if self.connected and self.outbox.mode == "core":
            with contextlib.suppress(NotConnected):
                await self._transport.flush()
        else:
            await trio.lowlevel.checkpoint()

    async def deliver_queued(self, grace: float) -> None:
        """The client closes: give what is queued ``grace`` seconds to be delivered, then put
        core-mode claims the server never confirmed back among the undelivered."""
        if self.outbox.busy:
            with trio.move_on_after(grace):
                self.retry()
                await self.flush()
        self.outbox.close()

    # ------------------------------------------------------------------ connection events
    def on_connected(self) -> None:
        """The connection is up: confirm what was written meanwhile."""
        self._wake_confirmer()

    def on_disconnected(self) -> None:
        """The connection dropped: a confirmation under way is void; unconfirmed claims are
        written off."""
        if self._confirm_scope is not None:
            self._confirm_scope.cancel()
        self._held.clear()  # they stay in the outbox, re-published in order after the reconnect
        if self.outbox.disconnected():
            self._notify()

    def on_reconnected(self) -> None:
        """The connection is back: re-publish the outbox in order."""
        for out in self.outbox.reconnected():
            self.send(out)
        self._wake_confirmer()

    # ------------------------------------------------------------------ tasks
    async def run_confirmer(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Core mode: a PING/PONG after each batch of claims confirms the server has them.

        Without it nobody could tell which claims a dying connection swallowed; with it the
        possible loss is bounded by, and counted as, the claims still unconfirmed at a disconnect.
        """
        task_status.started()
        del task_status  # it holds trio's start-up nursery: let it go for the task's life
        await self._confirm()

    async def _confirm(self) -> None:
        outbox = self.outbox
        while True:
            while not (outbox.unconfirmed and self.connected):
                self._confirm_wake = trio.Event()
                await self._confirm_wake.wait()
            generation = outbox.generation
            written = outbox.written  # the PING below reaches this far, no further
            confirmed = False
            with trio.move_on_after(outbox.ack_timeout) as scope:
                self._confirm_scope = scope
                try:
                    await self._transport.flush()
                    confirmed = True
                except NotConnected:
                    pass
            self._confirm_scope = None
            if confirmed:
                if outbox.confirm(generation, written):
                    self._notify()
            else:
                await trio.sleep(outbox.ack_timeout / 8)  # back off; the disconnect event follows

    async def run_ack_listener(self, *, task_status: trio.TaskStatus[None]) -> None:
        """JetStream mode: PubAcks arrive on one wildcard inbox; unacked claims are retried."""
        outbox = self.outbox
        prefix_len = len(outbox.ack_prefix) + 1

        def handle(msg: Message) -> None:
            self.on_ack(msg.subject[prefix_len:], msg.data)

        # Each PubAck is handled as the transport parses it (no task wake-up per ack); a
        # transport that declines the handler delivers on ``messages`` instead, read below.
        sub = await self._transport.subscribe(
            f"{outbox.ack_prefix}.*", buffer=65536, handler=handle
        )
        task_status.started()
        del task_status  # it holds trio's start-up nursery: let it go for the task's life
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._publish_held)
                while True:
                    # retry on a fixed period: a steady flow of acks must not starve the retries
                    with trio.move_on_after(outbox.ack_timeout / 2):
                        async for msg in sub.messages:
                            handle(msg)
                        if sub.failure is not None:
                            raise sub.failure  # the handler raised: the client's own bug
                        break  # the subscription ended: the client is closing
                    self.retry()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await sub.unsubscribe()

    async def _publish_held(self) -> None:
        """JetStream mode: publish a burst's held claims, one batch per ``BURST_BATCH_S``."""
        while True:
            await self._held_wake.wait()
            await trio.sleep_until(self._last_publish + BURST_BATCH_S)
            self._release_held()

    def _release_held(self) -> None:
        """Publish the held claims now, in order."""
        if self._held_wake.is_set():
            # replaced only once set: the task waiting on the old one has been woken
            self._held_wake = trio.Event()
        if not self._held:
            return
        held, self._held = self._held, []
        self._last_publish = now = trio.current_time()
        if self.outbox.hold_new:
            return  # a refusal holds new claims (still in the outbox): they go when it says
        pending = self.outbox.pending
        send = self.send
        for out in held:
            # a retry may have published it meanwhile, and its ack taken it out
            if out.sent_at is None and out.seq in pending:
                send(out, now)  # one batch, one time: no clock read per claim

    def on_ack(self, token: str, data: bytes) -> None:
        """A reply arrived on ``{ack_prefix}.{token}``."""
        release = self.outbox.acked(token, data)
        if release is not None:
            self._notify()
            for out in release:
                self.send(out)

    def retry(self) -> None:
        """Publish (again) what is due: unacknowledged claims past the ack timeout, queued ones."""
        if self.connected:
            for out in self.outbox.due_for_retry(trio.current_time()):
                self.send(out)
