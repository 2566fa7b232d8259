"""The trio client: ``async with open_client(cfg) as bb:``.

``open_client``'s nursery owns the client's parts. The subscriber: a membership of the
connection's :class:`~._client.judge.BeatJudge`, which judges each frame once as it is parsed and
hands the beat to every member; its tempo-sampler (the metronome that notices a silent pulse and
keeps time alone) is one task, in the nursery of the member that keeps it. The reconnect-
supervisor: the transport hands it each connection event as it happens (claims re-published
after a reconnect), so no task waits for them. The ack-listener (JetStream PubAcks) or the
confirmer (core-mode PING/PONG, started with the first claim): a task each, behind its own
shield (:class:`~._client.tasks.ShieldedTasks`). Users get frames through bounded drop-oldest
channels, Go-style callbacks, and beat budgets that are plain trio cancel scopes. What to make
of each frame and each claim is decided by the sans-IO cores
(:class:`~backbeat_trio._core.intake.BeatTracker`, :class:`~backbeat_trio._core.outbox.Outbox`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict
from typing import Any, Literal, TypeVar

import trio

from .._bridge import open_nats_transport
from .._client.config import Config
from .._core.beats import beat_subject, status_subject
from .._core.hlc import HLC, HLCStamp
from .._core.metrics import ClientMetrics, ErrorLog
from .._core.outbox import Outbox
from .._core.wire import BeatFrame, HealthStatus, StatusClaim
from .._errors import BeatBudgetExceeded, NotConnected, UndeliveredClaims
from .._transport.base import ConnEvent, Transport
from .._transport.shared import ViewableTransport
from .._util.channel import DropOldestChannel
from .._util.groups import exception_to_raise, reraise
from .._util.trio_only import require_trio
from .budgets import BeatBudget, BeatBudgets
from .delivery import ClaimDelivery
from .fanout import BeatCallback, BeatFanout
from .judge import BeatJudge, MemberCounts, judge_key, leave_subscription
from .tasks import ShieldedTasks

__all__ = ["Client", "ClientMetrics", "UndeliveredClaims", "open_client"]

#: emit_status yields to other tasks at most this often (seconds): bursts go out in batches.
EMIT_YIELD_INTERVAL_S = 0.001

#: seconds a JetStream claim may wait for its PubAck (and a core-mode PING for its PONG)
ACK_TIMEOUT_S = 2.0

log = logging.getLogger("backbeat_trio.client")

T = TypeVar("T")


class Client:
    """A BACKBEAT agent's connection; build it with :func:`open_client`.

    Beats are judged by the connection's :class:`~._client.judge.BeatJudge`, once for every
    client with the same beat settings on it (a client alone on its connection is its judge's
    only member); what is this client's own are its channels and callbacks, its beat budgets,
    its claims, and its view of the judge's counters since it joined.

    Attributes:
        config: the configuration it runs with.
        metrics: its counters.
    """

    def __init__(
        self,
        config: Config,
        transport: Transport,
        judge: BeatJudge,
    ) -> None:
        self.config = config
        self._metrics = ClientMetrics()
        self._errors = ErrorLog(self._metrics)
        self._transport = transport
        self._hlc = hlc = HLC(config.agent_id)
        self._merged: HLCStamp | None = None  # the judge's stamp last merged into ``_hlc``
        self._beat_subject = beat_subject(config.cluster_id)
        self._status_subject = status_subject(config.cluster_id)
        signer = None
        if config.signing_key is not None:
            from .._core.signing import Signer

            signer = Signer(config.signing_key, config.agent_id)
        # beats in: judged once per connection; this client moves its budgets and channels
        self._judge = judge
        self._tracker = judge.tracker
        self._counts = MemberCounts(judge, self._metrics)
        # beats out
        self._fanout = BeatFanout(self._errors, config.beat_buffer)
        self._budgets = BeatBudgets(self._tracker, self._metrics)
        # claims out: the sans-IO outbox decides; this client publishes and waits
        self._outbox = Outbox(
            agent_id=config.agent_id,
            status_subject=self._status_subject,
            outbox_size=config.outbox_size,
            ack_timeout=ACK_TIMEOUT_S,
            hlc=hlc,
            signer=signer,
            errors=self._errors,
        )
        self._delivery = ClaimDelivery(self._outbox, transport, self._status_subject)
        # connection
        self._connected = transport.connected
        self._reconnect_count = 0
        # made by the first wait: most clients never wait for their connection
        self._connection_changed: trio.Event | None = None
        self._tasks = ShieldedTasks()
        self._unlisten: Callable[[], None] = lambda: None  # stops its connection-event listener
        self._last_emit_yield = -math.inf
        self._closing = False

    def __repr__(self) -> str:
        tracker = self._tracker
        return (
            f"<Client {self.config.agent_id}@{self.config.cluster_id} "
            f"connected={self._connected} beat={tracker.last_index} tempo={tracker.tempo_bpm} "
            f"degraded={tracker.degraded} mode={self._outbox.mode} "
            f"outbox={len(self._outbox.pending)}>"
        )

    # ------------------------------------------------------------------ the judge's member
    @property
    def agent_id(self) -> str:
        """``config.agent_id``."""
        return self.config.agent_id

    @property
    def _nursery(self) -> trio.Nursery | None:
        """Where its tasks (and, while it keeps it, the judge's metronome) run."""
        return self._tasks.nursery

    def _judged_beat(self, frame: BeatFrame) -> None:
        """The judge delivered a new beat: move the budgets, hand it to channels and waiters."""
        self._counts.beat(frame)
        self._budgets.reproject()
        self._fanout.put(frame)

    def _judged_move(self) -> None:
        """The judge moved the schedule without a new beat: move the budgets."""
        self._budgets.reproject()

    def _judge_failed(self, exc: BaseException) -> None:
        """Handing this client a beat raised (a bug): end the client with it."""
        self._counts.left = True  # its counters stop here
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """End the running client with ``exc`` (raised in its nursery)."""
        nursery = self._nursery
        if nursery is not None:

            async def fail() -> None:
                raise exc

            nursery.start_soon(fail)

    def _leave_judge(self) -> None:
        """Out of the judge: no more beats; the counters stop where they are."""
        self._counts.stop()
        self._judge.leave(self)

    async def _join_beats(self) -> None:
        await self._judge.confirm(self._transport)
        self._counts.start()  # what the judge counted before is not this client's
        self._judge.join(self)

    # ------------------------------------------------------------------ public state
    @property
    def metrics(self) -> ClientMetrics:
        """Its counters (also in ``health().metrics``).

        Beats are judged once per connection for every client with the same beat settings, so
        the counters of beats and of refused frames (``beats`` … ``duplicate_or_old``,
        ``malformed``, ``oversized``, ``wrong_cluster``) are the judge's since this client
        joined: the same junk is counted once per connection, not once per client, and its cost
        does not grow with the number of clients. They are brought into this object when it is
        read through this property.
        """
        self._counts.mirror()
        return self._metrics

    @property
    def current_beat(self) -> int | None:
        """The index of the last beat delivered (None before the first)."""
        return self._tracker.last_index

    @property
    def current_frame(self) -> BeatFrame | None:
        """The last frame delivered (from the pulse or, while degraded, synthesised)."""
        return self._tracker.last_frame

    @property
    def current_window(self) -> str | None:
        """The window id of the current bar (None before the first beat)."""
        frame = self._tracker.last_frame
        return frame.window_id if frame else None

    def in_window(self, wid: str) -> bool:
        """True when ``wid`` is the current window."""
        frame = self._tracker.last_frame
        return frame is not None and frame.window_id == wid

    @property
    def current_tempo(self) -> int:
        """The tempo in BPM the pulse last announced (0 before the first beat)."""
        return self._tracker.tempo_bpm

    @property
    def tempo_drift(self) -> float:
        """Mean observed beat interval minus nominal, in seconds (positive: the pulse is behind)."""
        return self._tracker.estimator.tempo_drift

    @property
    def measured_bpm(self) -> float:
        """The tempo the arrivals show."""
        return self._tracker.estimator.measured_bpm

    @property
    def beats_per_bar(self) -> int:
        """The bar length in force (learned from the pulse's downbeats)."""
        return self._tracker.beats_per_bar

    @property
    def degraded(self) -> bool:
        """True while the client keeps time on its own."""
        return self._tracker.degraded

    @property
    def delivery_mode(self) -> Literal["jetstream", "core"]:
        """``jetstream`` (claims kept until acked) or ``core`` (at-most-once)."""
        return self._outbox.mode

    @property
    def pending_claims(self) -> int:
        """Claims queued or awaiting their acknowledgement."""
        return len(self._outbox.pending)

    def health(self) -> HealthStatus:
        """A snapshot in the Go SDK's shape (see :class:`HealthStatus`)."""
        tracker = self._tracker
        estimator = tracker.estimator
        last_time = (
            _dt.datetime.fromtimestamp(tracker.last_wall, _dt.UTC)
            if tracker.last_frame is not None
            else HealthStatus().last_beat_time
        )
        return HealthStatus(
            connected=self._connected,
            last_beat=tracker.last_index or 0,
            last_beat_time=last_time,
            time_drift=round(estimator.clock_offset * 1e9),
            reconnect_count=self._reconnect_count,
            local_degradation=tracker.degraded,
            current_tempo=tracker.tempo_bpm,
            tempo_drift=round(estimator.tempo_drift * 1e9),
            measured_bpm=estimator.measured_bpm,
            errors=self._judge.recent_errors(self._errors),
            delivery=self._outbox.mode,
            metrics=asdict(self.metrics),  # (the property: shared refusals mirrored)
        )

    # ------------------------------------------------------------------ beats out
    def beats(self, *, buffer: int | None = None) -> DropOldestChannel[BeatFrame]:
        """A new channel of every beat from now on (``async for frame in bb.beats():``).

        When the consumer falls ``buffer`` frames behind, the oldest is dropped and counted.
        The channel ends when the client closes.

        Raises:
            ValueError: ``buffer`` is given and is not a positive int.
        """
        return self._fanout.open_channel(buffer, downbeats=False)

    def downbeats(self, *, buffer: int | None = None) -> DropOldestChannel[BeatFrame]:
        """Like :meth:`beats`, downbeats only."""
        return self._fanout.open_channel(buffer, downbeats=True)

    def on_beat(self, callback: BeatCallback) -> Callable[[], None]:
        """Call ``callback(frame)`` (sync or async) on every beat, Go-style.

        A raising callback is logged and counted and never kills the client. Returns a function
        that removes the callback.
        """
        return self._add_callback(callback, downbeats=False)

    def on_downbeat(self, callback: BeatCallback) -> Callable[[], None]:
        """Like :meth:`on_beat`, downbeats only."""
        return self._add_callback(callback, downbeats=True)

    def _add_callback(self, callback: BeatCallback, *, downbeats: bool) -> Callable[[], None]:
        if self._nursery is None:
            raise NotConnected("the client is not running")
        return self._fanout.add_callback(self._tasks.spawn, callback, downbeats=downbeats)

    async def wait_connected(self, connected: bool = True) -> None:
        """Wait until the client sees its NATS connection up (or, with ``False``, down).

        Returns at once when it already is. Bound the wait with a cancel scope.
        """
        await trio.lowlevel.checkpoint()
        while self._connected != connected:
            if self._connection_changed is None:
                self._connection_changed = trio.Event()
            await self._connection_changed.wait()

    def _set_connected(self, connected: bool) -> None:
        if connected != self._connected:
            self._connected = self._delivery.connected = connected
            event, self._connection_changed = self._connection_changed, None
            if event is not None:
                event.set()

    async def wait_for_beat(self) -> BeatFrame:
        """Wait for the next beat and return its frame.

        Raises:
            NotConnected: the client closed (before or while waiting).
        """
        if self._closing:
            await trio.lowlevel.checkpoint()
            raise NotConnected("the client is closed: no more beats")
        await self._fanout.wait()
        if self._closing:
            raise NotConnected("the client closed while waiting for a beat")
        frame = self._tracker.last_frame
        assert frame is not None
        return frame

    async def wait_for_downbeat(self) -> BeatFrame:
        """Wait for the next downbeat (start of the next bar) and return its frame.

        Raises:
            NotConnected: the client closed (before or while waiting).
        """
        while True:
            frame = await self.wait_for_beat()
            if frame.downbeat:
                return frame

    # ------------------------------------------------------------------ beat budgets
    def beat_budget(self, beats: float) -> BeatBudget:
        """A cancel scope that ends ``beats`` beats from now (``move_on_after`` semantics).

        ``with bb.beat_budget(3) as scope:`` binds ``scope`` to a :class:`trio.CancelScope`.
        The deadline is anchored in beats: it is re-projected on every beat and tempo change, so
        it ends when the beat position reaches ``now + beats`` whatever the tempo does meanwhile
        (while degraded, the local schedule drives it). Before the first beat it starts counting
        at the first beat. Closing the client cancels it. Leaving the block counts the budget
        in ``metrics.budgets_completed`` or ``metrics.budgets_timed_out``.

        Raises:
            ValueError: ``beats`` is not a positive finite number.
        """
        return BeatBudget(self._budgets, self._budgets.open(beats, cancelled=self._closing))

    @contextlib.contextmanager
    def fail_after_beats(self, beats: float) -> Iterator[trio.CancelScope]:
        """Like :meth:`beat_budget`, but raise :class:`BeatBudgetExceeded` when it runs out.

        Raises:
            BeatBudgetExceeded: the budget ran out before the block finished.
            NotConnected: the client closed before the block finished (that cancels it too).
        """
        scope = self._budgets.open(beats, cancelled=self._closing)
        try:
            with scope:
                yield scope
        finally:
            self._budgets.count(scope)
        if scope.cancelled_caught:
            if self._closing:
                raise NotConnected("the client closed before the beat budget's work finished")
            raise BeatBudgetExceeded(beats)

    async def with_beat_budget(
        self, beats: float, afn: Callable[..., Awaitable[T]], *args: Any
    ) -> T:
        """Go's ``WithBeatBudget``: run ``await afn(*args)`` within ``beats`` beats.

        Raises:
            BeatBudgetExceeded: the budget ran out first.
            NotConnected: the client closed first.
        """
        with self.fail_after_beats(beats):
            return await afn(*args)
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ claims out
    async def emit_status(self, claim: StatusClaim) -> StatusClaim:
        """Send a status claim; returns it as sent.

        ``type``, ``agent_id``, ``beat_index`` and ``hlc`` are filled in, and ``task_id`` when
        empty. The claim is validated and signed (when a key is configured) before anything is
        sent. In JetStream mode it is kept until its PubAck arrives and re-published after a
        reconnect; in core mode it is published once. While disconnected it waits in the outbox.

        Raises:
            InvalidStatusClaim: the claim breaks the contract; nothing was sent.
            NotConnected: the outbox is full (``config.outbox_size``) or the client is closed.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        sent = self.emit_status_nowait(claim)
        # Yield at most once a millisecond: a burst of claims then reaches the transport's
        # drainer as one batch instead of one socket write per claim.
        now = trio.current_time()
        if now - self._last_emit_yield >= EMIT_YIELD_INTERVAL_S:
            self._last_emit_yield = now
            await trio.lowlevel.cancel_shielded_checkpoint()
        return sent

    def emit_status_nowait(self, claim: StatusClaim) -> StatusClaim:
        """:meth:`emit_status` without the checkpoint (for sync callbacks)."""
        if self._closing and self._nursery is None:
            raise NotConnected("the client is closed")
        judged = self._tracker.hlc
        if not judged.is_at(self._merged):  # the frames judged since the last claim came first
            self._merged = stamp = judged.last
            self._hlc.merge(stamp)
        return self._delivery.emit(claim, self._tracker.last_index or 0)

    async def flush_claims(self) -> None:
        """Wait until every claim emitted so far is delivered: acknowledged by JetStream, or (core
        mode) confirmed received by the server. Wrap it in a cancel scope to bound the wait.

        In core mode a claim that was on its way when the connection dropped is not waited for:
        it is counted in ``metrics.claims_unconfirmed`` (it may be lost; see :attr:`delivery_mode`).
        Nor is a claim the stream refused as a duplicate on its first publish (another message
        holds its id): it is counted in ``metrics.claims_suspected_collisions`` and listed by
        :meth:`undelivered`.
        """
        await self._delivery.flush()

    def undelivered(self) -> list[StatusClaim]:
        """Claims not yet delivered (queued, or in JetStream mode unacknowledged or refused as
        suspected id collisions), oldest first."""
        return self._outbox.undelivered()

    def _on_event_or_end(self, event: ConnEvent | None) -> None:
        """The transport hands each connection event here as it happens (no task waits)."""
        if event is not None:
            self._on_event(event)
        elif not self._closing and self._tasks.nursery is not None:
            # The events ended under a running client: its transport was closed (or, shared,
            # its view detached). Deaf to disconnects it could not keep its delivery promises.
            self._fail(
                NotConnected(
                    "the transport's connection events ended while the client was running (the "
                    "transport was closed, or its view detached, before the client)"
                )
            )

    def _on_event(self, event: ConnEvent) -> None:
        if event.kind == "disconnected":
            self._set_connected(False)
            self._metrics.disconnects += 1
            self._errors.note("disconnected from NATS")
            self._delivery.on_disconnected()
        elif event.kind == "reconnected":
            self._set_connected(True)
            self._reconnect_count += 1
            self._metrics.reconnects += 1
            n = len(self._outbox.pending)
            log.info("reconnected (%s); re-publishing %d claim(s)", event.detail, n)
            self._delivery.on_reconnected()
        elif event.kind == "closed":
            self._set_connected(False)
            if not self._closing:
                self._errors.note("NATS connection closed (reconnect attempts exhausted)")
        elif event.kind == "slow_consumer":
            self._metrics.slow_consumer += 1
            self._errors.note(f"slow consumer: {event.detail}")
        elif event.kind == "error":
            self._errors.note(event.detail)
        elif event.kind == "connected":
            self._set_connected(True)
            self._delivery.on_connected()

    # ------------------------------------------------------------------ tasks
    async def _start_tasks(self) -> None:
        """Start the client's tasks in ``open_client``'s nursery and join the beat."""
        self._unlisten = self._transport.listen(self._on_event_or_end)
        if self._outbox.mode == "jetstream":
            await self._tasks.start(self._delivery.run_ack_listener)
        else:  # the confirmer starts with the first claim: most agents of a big host send few
            self._delivery.spawn = self._tasks.spawn
        await self._join_beats()

    async def _shutdown(self) -> None:
        """Leave the block: deliver what is queued (bounded), then end budgets, channels, waits."""
        # Core-mode claims the server never confirmed are not written off quietly at close:
        # they go back to the outbox, so undelivered() lists them and open_client raises.
        await self._delivery.deliver_queued(self.config.close_grace)
        self._leave_judge()
        self._closing = True
        self._budgets.cancel_all()
        self._fanout.close()  # wakes wait_for_beat(), which then raises NotConnected


@contextlib.asynccontextmanager
async def open_client(
    config: Config,
    *,
    transport: Transport | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> AsyncIterator[Client]:
    """Connect to NATS and run a BACKBEAT client for the duration of the block.

    On the way out, queued claims get ``config.close_grace`` seconds to be delivered (shielded
    from cancellation), then every task, budget, channel and wait of the client ends.

    Args:
        config: a validated :class:`Config`.
        transport: use this connection instead of opening one. Many clients can share one
            :class:`~backbeat_trio.NatsTransport` (from :func:`~backbeat_trio.open_nats_transport`):
            each client takes its own view of it (its own connection events), all of them share
            one subscription to the beat (each frame is decoded once and handed to every
            client; what the shared subscription refuses as malformed, oversized or another
            cluster's is counted once, by the connection's ``shared_subscriptions``, and reaches
            no client) and one writer for their claims. The connection stays open when the
            client closes; it must outlive the client. Tests: a :mod:`~backbeat_trio.testing`
            memory transport.
        wall_clock: the wall clock (POSIX seconds); tests on MockClock pass a virtual one.

    Raises:
        NotUnderTrio: called outside trio (from asyncio, say); nothing was opened.
        NotConnected: the first connect failed, or the block ended with claims undelivered
            (:class:`UndeliveredClaims`) — unless the block itself raised, which wins (the
            undelivered claims are then logged and noted on that exception).
    """
    require_trio("open_client")
    if not isinstance(config, Config):
        raise TypeError(f"open_client needs a backbeat_trio.Config, got {type(config).__name__}")
    user_exc: BaseException | None = None
    uses: contextlib.AbstractAsyncContextManager[Transport]
    if transport is None:
        uses = open_nats_transport(config)
    elif isinstance(transport, ViewableTransport):
        # a connection others may use too: this client opens (and closes) its own view, with
        # its own connection events; the connection is the caller's
        uses = transport.view()
    else:
        uses = contextlib.nullcontext(transport)
    try:
        async with uses as transport:
            member = await transport.subscribe_shared(
                beat_subject(config.cluster_id),
                key=judge_key(config, wall_clock),
                prepare=lambda: BeatJudge(config, wall_clock),
                buffer=0,  # the judge hands the beat over: nothing comes on its channel
            )
            try:
                judge = member.prepared
                assert isinstance(judge, BeatJudge)
                client = Client(config, transport, judge)
                await client._delivery.detect_mode(config.jetstream, config.cluster_id)
                async with trio.open_nursery() as nursery:
                    client._tasks.nursery = nursery
                    try:
                        await client._start_tasks()
                        try:
                            yield client
                        except BaseException as exc:
                            user_exc = exc
                            raise
                        finally:
                            with trio.CancelScope(shield=True):
                                await client._shutdown()
                    finally:
                        client._leave_judge()  # (its metronome may run in this nursery)
                        client._tasks.stop()
                        client._unlisten()
                        left = client.undelivered()
                        if left:
                            log.error("%d claim(s) undelivered when the client closed", len(left))
                            if user_exc is not None and not isinstance(user_exc, trio.Cancelled):
                                user_exc.add_note(
                                    f"backbeat_trio: {len(left)} status claim(s) were not "
                                    f"delivered before the client closed"
                                )
            finally:
                await leave_subscription(member)
        left = client.undelivered()
        if left:
            raise UndeliveredClaims(left)
    except BaseExceptionGroup as group:
        chosen = exception_to_raise(group, user_exc)
        if chosen is None:
            raise
        reraise(chosen)
