"""The trio client: ``async with open_client(cfg) as bb:``.

One nursery owns the subscriber (beat frames in), the reconnect-supervisor (connection events,
claim re-publishing), the ack-listener (JetStream PubAcks) and the tempo-sampler (the local
metronome that notices a silent pulse and keeps time alone). Users get frames through bounded
drop-oldest channels, Go-style callbacks, and beat budgets that are plain trio cancel scopes.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import inspect
import logging
import math
import secrets
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar

import msgspec
import trio

from ._beats import beat_subject, phase_for, status_subject, window_id
from ._channel import DropOldestChannel
from ._config import Config
from ._errors import BeatBudgetExceeded, NotConnected, WireError
from ._hlc import HLC
from ._tempo import TempoEstimator
from ._transport import ConnEvent, Transport, open_nats_transport
from ._wire import BeatFrame, HealthStatus, StatusClaim, decode, encode_claim

__all__ = ["Client", "ClientMetrics", "UndeliveredClaims", "open_client"]

log = logging.getLogger("backbeat_trio.client")

T = TypeVar("T")
BeatCallback = Callable[[BeatFrame], Any]

_MAX_RECENT_ERRORS = 16


class UndeliveredClaims(NotConnected):
    """Raised when a client closes with claims that never reached the server (or were never
    acknowledged in JetStream mode). ``claims`` holds their bodies, oldest first."""

    def __init__(self, claims: list[StatusClaim]) -> None:
        super().__init__(
            f"{len(claims)} status claim(s) were not delivered before the client closed"
        )
        self.claims = claims


@dataclass
class ClientMetrics:
    """Counters a client keeps (also in ``health().metrics``)."""

    beats: int = 0
    downbeats: int = 0
    degraded_beats: int = 0
    degraded_episodes: int = 0
    resyncs: int = 0
    forward_jumps: int = 0
    beats_skipped: int = 0
    dropped: int = 0
    stale: int = 0
    duplicate_or_old: int = 0
    malformed: int = 0
    oversized: int = 0
    wrong_cluster: int = 0
    transport_dropped: int = 0
    callback_errors: int = 0
    claims_ok: int = 0
    claims_failed: int = 0
    claims_acked: int = 0
    claims_republished: int = 0
    claims_queued: int = 0
    budgets_created: int = 0
    budgets_completed: int = 0
    budgets_timed_out: int = 0
    reconnects: int = 0
    disconnects: int = 0
    slow_consumer: int = 0
    errors: int = 0


@dataclass
class _Outgoing:
    seq: int
    claim: StatusClaim
    body: bytes
    headers: dict[str, str]
    sent_at: float | None = None  # trio time of the last publish


@dataclass
class _Budget:
    target: float  # fractional beat position at which the budget ends


class Client:
    """A BACKBEAT agent's connection; build it with :func:`open_client`.

    Attributes:
        config: the configuration it runs with.
        metrics: its counters.
    """

    def __init__(
        self,
        config: Config,
        transport: Transport,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.metrics = ClientMetrics()
        self._transport = transport
        self._wall = wall_clock
        self._hlc = HLC(config.agent_id)
        self._estimator = TempoEstimator()
        self._beat_subject = beat_subject(config.cluster_id)
        self._status_subject = status_subject(config.cluster_id)
        self._signer: Any = None
        if config.signing_key is not None:
            from ._signing import Signer

            self._signer = Signer(config.signing_key, config.agent_id)
        # beat state
        self._last_frame: BeatFrame | None = None
        self._last_index: int | None = None
        self._last_start: float = 0.0  # trio time the current beat started
        self._last_wall: float = 0.0
        self._tempo_bpm: int = 0
        self._beats_per_bar = config.beats_per_bar
        self._beats_since_downbeat: int | None = None
        self._bar_contiguous = False
        self._next_due: float = math.inf  # trio time the next beat is due
        self._degraded = False
        self._pulse_anchor: tuple[int, _dt.datetime] | None = None  # (index, deadline_at)
        self._beat_event = trio.Event()
        self._wake_sampler = trio.Event()
        # consumers
        self._channels: list[DropOldestChannel[BeatFrame]] = []
        self._downbeat_channels: list[DropOldestChannel[BeatFrame]] = []
        self._budgets: weakref.WeakKeyDictionary[trio.CancelScope, _Budget] = (
            weakref.WeakKeyDictionary()
        )
        # claims
        self._mode: Literal["jetstream", "core"] = "core"
        self._outbox: collections.OrderedDict[int, _Outgoing] = collections.OrderedDict()
        self._seq = 0
        self._ack_prefix = ""
        self._ack_timeout = 2.0
        self._outbox_changed = trio.Event()
        # connection
        self._connected = transport.connected
        self._reconnect_count = 0
        self._recent_errors: collections.deque[str] = collections.deque(maxlen=_MAX_RECENT_ERRORS)
        self._nursery: trio.Nursery | None = None
        self._closing = False

    def __repr__(self) -> str:
        return (
            f"<Client {self.config.agent_id}@{self.config.cluster_id} "
            f"connected={self._connected} beat={self._last_index} tempo={self._tempo_bpm} "
            f"degraded={self._degraded} mode={self._mode} outbox={len(self._outbox)}>"
        )

    # ------------------------------------------------------------------ public state
    @property
    def current_beat(self) -> int | None:
        """The index of the last beat delivered (None before the first)."""
        return self._last_index

    @property
    def current_frame(self) -> BeatFrame | None:
        """The last frame delivered (from the pulse or, while degraded, synthesised)."""
        return self._last_frame

    @property
    def current_window(self) -> str | None:
        """The window id of the current bar (None before the first beat)."""
        return self._last_frame.window_id if self._last_frame else None

    def in_window(self, wid: str) -> bool:
        """True when ``wid`` is the current window."""
        return self._last_frame is not None and self._last_frame.window_id == wid

    @property
    def current_tempo(self) -> int:
        """The tempo in BPM the pulse last announced (0 before the first beat)."""
        return self._tempo_bpm

    @property
    def tempo_drift(self) -> float:
        """Mean observed beat interval minus nominal, in seconds (positive: the pulse is behind)."""
        return self._estimator.tempo_drift

    @property
    def measured_bpm(self) -> float:
        """The tempo the arrivals show."""
        return self._estimator.measured_bpm

    @property
    def beats_per_bar(self) -> int:
        """The bar length in force (learned from the pulse's downbeats)."""
        return self._beats_per_bar

    @property
    def degraded(self) -> bool:
        """True while the client keeps time on its own."""
        return self._degraded

    @property
    def delivery_mode(self) -> Literal["jetstream", "core"]:
        """``jetstream`` (claims kept until acked) or ``core`` (at-most-once)."""
        return self._mode

    @property
    def pending_claims(self) -> int:
        """Claims queued or awaiting their acknowledgement."""
        return len(self._outbox)

    def health(self) -> HealthStatus:
        """A snapshot in the Go SDK's shape (see :class:`HealthStatus`)."""
        last_time = (
            _dt.datetime.fromtimestamp(self._last_wall, _dt.UTC)
            if self._last_frame is not None
            else HealthStatus().last_beat_time
        )
        return HealthStatus(
            connected=self._connected,
            last_beat=self._last_index or 0,
            last_beat_time=last_time,
            time_drift=round(self._estimator.clock_offset * 1e9),
            reconnect_count=self._reconnect_count,
            local_degradation=self._degraded,
            current_tempo=self._tempo_bpm,
            tempo_drift=round(self._estimator.tempo_drift * 1e9),
            measured_bpm=self._estimator.measured_bpm,
            errors=list(self._recent_errors),
            delivery=self._mode,
            metrics=asdict(self.metrics),
        )

    # ------------------------------------------------------------------ beats out
    def beats(self, *, buffer: int | None = None) -> DropOldestChannel[BeatFrame]:
        """A new channel of every beat from now on (``async for frame in bb.beats():``).

        When the consumer falls ``buffer`` frames behind, the oldest is dropped and counted.
        The channel ends when the client closes.
        """
        return self._new_channel(self._channels, buffer, "beats")

    def downbeats(self, *, buffer: int | None = None) -> DropOldestChannel[BeatFrame]:
        """Like :meth:`beats`, downbeats only."""
        return self._new_channel(self._downbeat_channels, buffer, "downbeats")

    def _new_channel(
        self, where: list[DropOldestChannel[BeatFrame]], buffer: int | None, name: str
    ) -> DropOldestChannel[BeatFrame]:
        chan = DropOldestChannel[BeatFrame](buffer or self.config.beat_buffer, name)
        if self._closing:
            chan.close_send()
        else:
            where.append(chan)
        return chan

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
        chan = self.downbeats() if downbeats else self.beats()
        self._nursery.start_soon(self._run_callback, callback, chan)
        return chan.close

    async def _run_callback(self, callback: BeatCallback, chan: DropOldestChannel[BeatFrame]) -> None:
        async for frame in chan:
            try:
                result = callback(frame)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                self.metrics.callback_errors += 1
                self._note_error(f"callback {getattr(callback, '__name__', callback)!r}: {exc!r}")
                log.exception("beat callback %r raised", callback)

    async def wait_for_beat(self) -> BeatFrame:
        """Wait for the next beat and return its frame."""
        await self._beat_event.wait()
        assert self._last_frame is not None
        return self._last_frame

    async def wait_for_downbeat(self) -> BeatFrame:
        """Wait for the next downbeat (start of the next bar) and return its frame."""
        while True:
            frame = await self.wait_for_beat()
            if frame.downbeat:
                return frame

    # ------------------------------------------------------------------ beat budgets
    def _position(self, now: float) -> float | None:
        """Fractional beat position at trio time ``now`` (None before the first beat)."""
        if self._last_index is None or not self._tempo_bpm:
            return None
        duration = 60.0 / self._tempo_bpm
        return self._last_index + (now - self._last_start) / duration

    def _deadline_for(self, target: float) -> float:
        if self._last_index is None or not self._tempo_bpm:
            return math.inf
        return self._last_start + (target - self._last_index) * 60.0 / self._tempo_bpm

    def beat_budget(self, beats: float) -> trio.CancelScope:
        """A cancel scope that ends ``beats`` beats from now (``move_on_after`` semantics).

        The deadline is anchored in beats: it is re-projected on every beat and tempo change, so
        it ends when the beat position reaches ``now + beats`` whatever the tempo does meanwhile
        (while degraded, the local schedule drives it). Before the first beat it starts counting
        at the first beat. Closing the client cancels it.

        Raises:
            ValueError: ``beats`` is not a positive finite number.
        """
        if isinstance(beats, bool) or not isinstance(beats, int | float) or not (
            0 < beats < math.inf
        ):
            raise ValueError(f"a beat budget needs a positive number of beats, got {beats!r}")
        now = trio.current_time()
        pos = self._position(now)
        target = (pos if pos is not None else math.nan) + beats
        scope = trio.CancelScope(deadline=self._deadline_for(target) if pos is not None else math.inf)
        self._budgets[scope] = _Budget(target if pos is not None else -beats)
        self.metrics.budgets_created += 1
        if self._closing:
            scope.cancel()
        return scope

    @contextlib.contextmanager
    def fail_after_beats(self, beats: float) -> Iterator[trio.CancelScope]:
        """Like :meth:`beat_budget`, but raise :class:`BeatBudgetExceeded` when it runs out."""
        scope = self.beat_budget(beats)
        try:
            with scope:
                yield scope
        finally:
            self._count_budget(scope)
        if scope.cancelled_caught and not self._closing:
            raise BeatBudgetExceeded(beats)

    async def with_beat_budget(
        self, beats: float, afn: Callable[..., Awaitable[T]], *args: Any
    ) -> T:
        """Go's ``WithBeatBudget``: run ``await afn(*args)`` within ``beats`` beats.

        Raises:
            BeatBudgetExceeded: the budget ran out first.
        """
        with self.fail_after_beats(beats):
            return await afn(*args)
        raise AssertionError("unreachable")  # pragma: no cover

    def _count_budget(self, scope: trio.CancelScope) -> None:
        self._budgets.pop(scope, None)
        if scope.cancelled_caught:
            self.metrics.budgets_timed_out += 1
        else:
            self.metrics.budgets_completed += 1

    def _reproject_budgets(self) -> None:
        if not self._budgets:
            return
        for scope, budget in list(self._budgets.items()):
            if budget.target < 0:  # waiting for the first beat: start counting now
                assert self._last_index is not None
                budget.target = self._last_index + (-budget.target)
            scope.deadline = self._deadline_for(budget.target)

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
        await trio.lowlevel.checkpoint()
        return self.emit_status_nowait(claim)

    def emit_status_nowait(self, claim: StatusClaim) -> StatusClaim:
        """:meth:`emit_status` without the checkpoint (for sync callbacks)."""
        if self._closing and self._nursery is None:
            raise NotConnected("the client is closed")
        filled = msgspec.structs.replace(
            claim,
            agent_id=self.config.agent_id,
            beat_index=self._last_index or 0,
            hlc=str(self._hlc.now()),
            task_id=claim.task_id or f"task:{secrets.token_hex(4)}",
        )
        body = encode_claim(filled)  # raises InvalidStatusClaim
        if len(self._outbox) >= self.config.outbox_size:
            self.metrics.claims_failed += 1
            raise NotConnected(
                f"claim outbox full ({self.config.outbox_size} claims waiting for "
                f"{'acknowledgement' if self._mode == 'jetstream' else 'the connection'})"
            )
        headers = self._signer.headers(body) if self._signer is not None else {}
        headers["Nats-Msg-Id"] = f"{filled.agent_id}:{filled.hlc}"
        self._seq += 1
        out = _Outgoing(self._seq, filled, body, headers)
        if self._mode == "jetstream" or not self._connected:
            self._outbox[out.seq] = out
            self.metrics.claims_queued += 1
        if self._connected:
            self._send(out)
        return filled

    def _send(self, out: _Outgoing) -> None:
        reply = f"{self._ack_prefix}.{out.seq}" if self._mode == "jetstream" else ""
        try:
            self._transport.publish(self._status_subject, out.body, headers=out.headers, reply=reply)
        except NotConnected:
            self._outbox.setdefault(out.seq, out)
            return
        out.sent_at = trio.current_time()
        if self._mode == "core":
            self._outbox.pop(out.seq, None)
            self.metrics.claims_ok += 1
            self._outbox_changed.set()

    def _republish_all(self) -> None:
        for out in list(self._outbox.values()):
            if out.sent_at is not None:
                self.metrics.claims_republished += 1
            self._send(out)

    async def flush_claims(self) -> None:
        """Wait until every claim emitted so far is delivered (acked in JetStream mode).

        Wrap it in a cancel scope to bound the wait.
        """
        while self._outbox:
            self._outbox_changed = trio.Event()
            await self._outbox_changed.wait()
        if self._connected:
            with contextlib.suppress(NotConnected):
                await self._transport.flush()

    def undelivered(self) -> list[StatusClaim]:
        """Claims not yet delivered (queued, or unacknowledged in JetStream mode), oldest first."""
        return [o.claim for o in self._outbox.values()]

    # ------------------------------------------------------------------ frames in
    def _note_error(self, text: str) -> None:
        self.metrics.errors += 1
        self._recent_errors.append(text)

    def _intake(self, data: bytes, now: float) -> None:
        """Validate one raw beat payload and deliver it (or count why not)."""
        if len(data) > self.config.max_frame_bytes:
            self.metrics.oversized += 1
            self._note_error(f"oversized beat frame ({len(data)} bytes)")
            return
        try:
            frame = decode(data, BeatFrame)
        except WireError as exc:
            self.metrics.malformed += 1
            self._note_error(str(exc)[:200])
            return
        if frame.cluster_id != self.config.cluster_id:
            self.metrics.wrong_cluster += 1
            self._note_error(f"beat frame for cluster {frame.cluster_id!r}")
            return
        wall = self._wall()
        self._hlc.update(frame.hlc)
        deadline_ts = frame.deadline_at.timestamp()
        duration = 60.0 / frame.tempo_bpm
        start_ts = deadline_ts - duration
        self._estimator.observe(
            frame.beat_index, now, frame.tempo_bpm, wall_arrival=wall, scheduled_start=start_ts
        )
        lateness = (wall - self._estimator.clock_offset) - start_ts  # >= 0 up to jitter
        if lateness - duration > self.config.jitter_tolerance:
            self.metrics.stale += 1
            self._note_error(f"stale beat {frame.beat_index} ({lateness - duration:.3f} s late)")
            return
        # the pulse is alive: anchor the local schedule on its clock
        self._pulse_anchor = (frame.beat_index, frame.deadline_at)
        start_local = now - max(0.0, lateness)
        if self._degraded:
            self._degraded = False
            self.metrics.resyncs += 1
            log.info("pulse is back at beat %d; resynchronised", frame.beat_index)
        if self._last_index is not None and frame.beat_index <= self._last_index:
            self.metrics.duplicate_or_old += 1
            if frame.beat_index == self._last_index:
                # same beat as the one we synthesised: adopt the pulse's timing
                self._last_start = start_local
                self._next_due = start_local + duration
                self._wake_sampler.set()
            return
        if self._last_index is not None and frame.beat_index > self._last_index + 1:
            self.metrics.forward_jumps += 1
            self.metrics.beats_skipped += frame.beat_index - self._last_index - 1
        self._last_wall = wall
        self._deliver(frame, start_local)

    def _deliver(self, frame: BeatFrame, start_local: float) -> None:
        if self._last_index is not None and frame.beat_index != self._last_index + 1:
            self._bar_contiguous = False
        if frame.downbeat:
            # a whole bar seen without gaps tells the bar length the pulse uses
            if self._beats_since_downbeat is not None and self._bar_contiguous:
                self._beats_per_bar = self._beats_since_downbeat
            self._beats_since_downbeat = 0
            self._bar_contiguous = True
        if self._beats_since_downbeat is not None:
            self._beats_since_downbeat += 1
        self._last_frame = frame
        self._last_index = frame.beat_index
        self._last_start = start_local
        self._tempo_bpm = frame.tempo_bpm
        self._next_due = start_local + 60.0 / frame.tempo_bpm
        self.metrics.beats += 1
        if frame.downbeat:
            self.metrics.downbeats += 1
        self._reproject_budgets()
        self._fan_out(frame)
        self._wake_sampler.set()

    def _fan_out(self, frame: BeatFrame) -> None:
        for where, wanted in ((self._channels, True), (self._downbeat_channels, frame.downbeat)):
            if not wanted:
                continue
            alive = []
            for chan in where:
                before = chan.dropped
                if chan.put(frame):
                    alive.append(chan)
                    self.metrics.dropped += chan.dropped - before
            where[:] = alive
        event, self._beat_event = self._beat_event, trio.Event()
        event.set()

    def _synthesise(self, due: float) -> None:
        """Deliver the next beat from the local schedule (the pulse is silent)."""
        assert self._last_index is not None and self._last_frame is not None
        index = self._last_index + 1
        bpb = self._beats_per_bar
        duration = 60.0 / self._tempo_bpm
        if self._pulse_anchor is not None:
            anchor_index, anchor_deadline = self._pulse_anchor
            deadline = anchor_deadline + _dt.timedelta(seconds=(index - anchor_index) * duration)
        else:
            deadline = _dt.datetime.fromtimestamp(self._wall() + duration, _dt.UTC)
        frame = BeatFrame(
            cluster_id=self.config.cluster_id,
            beat_index=index,
            downbeat=index % bpb == 0,
            phase=phase_for(index, bpb),
            hlc=str(self._hlc.now()),
            deadline_at=deadline.astimezone(_dt.UTC),
            tempo_bpm=self._tempo_bpm,
            window_id=window_id(self.config.cluster_id, index, bpb),
        )
        self.metrics.degraded_beats += 1
        self._last_wall = self._wall()
        self._deliver(frame, due)

    # ------------------------------------------------------------------ tasks
    async def _run_subscriber(self, *, task_status: trio.TaskStatus[None]) -> None:
        sub = await self._transport.subscribe(self._beat_subject, buffer=4096)
        task_status.started()
        intake = self._intake
        try:
            async for msg in sub.messages:
                intake(msg.data, trio.current_time())
                if sub.dropped:
                    self.metrics.transport_dropped += sub.dropped
                    sub.dropped = 0
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await sub.unsubscribe()

    async def _run_tempo_sampler(self, *, task_status: trio.TaskStatus[None]) -> None:
        """The local metronome: notices a silent pulse and keeps time alone (degradation)."""
        task_status.started()
        jitter = self.config.jitter_tolerance
        while True:
            self._wake_sampler = trio.Event()
            if self._last_index is None:
                await self._wake_sampler.wait()
                continue
            # a healthy pulse gets one beat + jitter; once degraded we keep the exact schedule
            due = self._next_due
            alarm = due if self._degraded else due + jitter
            with trio.move_on_at(alarm):
                await self._wake_sampler.wait()
                continue  # a frame came in: the schedule moved
            if self._next_due != due:
                continue
            if not self._degraded:
                self._degraded = True
                self.metrics.degraded_episodes += 1
                self._note_error(f"no beat after {self._last_index}: keeping time locally")
                log.warning("pulse silent after beat %s; degrading to local beats", self._last_index)
            self._synthesise(due)

    async def _run_supervisor(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Watches connection events; re-publishes claims after a reconnect."""
        task_status.started()
        async for event in self._transport.events:
            self._on_event(event)

    def _on_event(self, event: ConnEvent) -> None:
        if event.kind == "disconnected":
            self._connected = False
            self.metrics.disconnects += 1
            self._note_error("disconnected from NATS")
        elif event.kind == "reconnected":
            self._connected = True
            self._reconnect_count += 1
            self.metrics.reconnects += 1
            log.info("reconnected (%s); re-publishing %d claim(s)", event.detail, len(self._outbox))
            self._republish_all()
        elif event.kind == "closed":
            self._connected = False
            if not self._closing:
                self._note_error("NATS connection closed (reconnect attempts exhausted)")
        elif event.kind == "slow_consumer":
            self.metrics.slow_consumer += 1
            self._note_error(f"slow consumer: {event.detail}")
        elif event.kind == "error":
            self._note_error(event.detail)
        elif event.kind == "connected":
            self._connected = True

    async def _run_ack_listener(self, *, task_status: trio.TaskStatus[None]) -> None:
        """JetStream mode: PubAcks arrive on one wildcard inbox; unacked claims are retried."""
        sub = await self._transport.subscribe(f"{self._ack_prefix}.*", buffer=65536)
        task_status.started()
        prefix_len = len(self._ack_prefix) + 1
        try:
            while True:
                with trio.move_on_after(self._ack_timeout / 2):
                    msg = await sub.messages.receive()
                    self._on_ack(msg.subject[prefix_len:], msg.data)
                    continue
                self._retry_unacked()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await sub.unsubscribe()

    def _on_ack(self, token: str, data: bytes) -> None:
        try:
            seq = int(token)
            ack = msgspec.json.decode(data)
        except (ValueError, msgspec.DecodeError):
            self._note_error(f"unreadable PubAck {data[:80]!r}")
            return
        if not isinstance(ack, dict) or "error" in ack or "stream" not in ack:
            # e.g. a 503 no-responders status (empty body) or a JetStream error: retried later
            self._note_error(f"claim {seq} not acknowledged: {data[:120]!r}")
            return
        if self._outbox.pop(seq, None) is not None:
            self.metrics.claims_acked += 1
            self.metrics.claims_ok += 1
            self._outbox_changed.set()

    def _retry_unacked(self) -> None:
        if not self._connected or not self._outbox:
            return
        cutoff = trio.current_time() - self._ack_timeout
        for out in list(self._outbox.values()):
            if out.sent_at is None or out.sent_at <= cutoff:
                if out.sent_at is not None:
                    self.metrics.claims_republished += 1
                self._send(out)

    async def _detect_mode(self) -> None:
        want = self.config.jetstream
        if want is False:
            self._mode = "core"
            return
        stream = await self._transport.find_stream(self._status_subject)
        if stream is None:
            if want:
                raise NotConnected(
                    f"jetstream=True but no JetStream stream captures {self._status_subject!r} "
                    f"(run the reverb, or create BACKBEAT_STATUS_{self.config.cluster_id})"
                )
            self._mode = "core"
            return
        self._mode = "jetstream"
        self._ack_prefix = f"{self._transport.new_inbox()}.ack"

    async def _drain_on_close(self) -> None:
        """Give queued claims a bounded grace to be delivered, then give up loudly."""
        if not self._outbox:
            return
        with trio.move_on_after(self.config.close_grace):
            if self._connected:
                self._retry_unacked()
            await self.flush_claims()


@contextlib.asynccontextmanager
async def open_client(
    config: Config,
    *,
    transport: Transport | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> AsyncIterator[Client]:
    """Connect to NATS and run a BACKBEAT client for the duration of the block.

    Args:
        config: a validated :class:`Config`.
        transport: use this transport instead of connecting with nats-py (tests: a
            :class:`~backbeat_trio.testing` memory transport).
        wall_clock: the wall clock (POSIX seconds); tests on MockClock pass a virtual one.

    Raises:
        NotConnected: the first connect failed, or the block ended with claims undelivered
            (:class:`UndeliveredClaims`) — unless the block itself raised, which wins.
    """
    if not isinstance(config, Config):
        raise TypeError(f"open_client needs a backbeat_trio.Config, got {type(config).__name__}")
    user_exc: BaseException | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            if transport is None:
                transport = await stack.enter_async_context(open_nats_transport(config))
            client = Client(config, transport, wall_clock=wall_clock)
            await client._detect_mode()
            async with trio.open_nursery() as nursery:
                client._nursery = nursery
                await nursery.start(client._run_supervisor)
                if client._mode == "jetstream":
                    await nursery.start(client._run_ack_listener)
                await nursery.start(client._run_subscriber)
                await nursery.start(client._run_tempo_sampler)
                try:
                    yield client
                except BaseException as exc:
                    user_exc = exc
                    raise
                finally:
                    with trio.CancelScope(shield=True):
                        if user_exc is None:
                            await client._drain_on_close()
                        client._closing = True
                        for scope in list(client._budgets):
                            scope.cancel()
                        for chan in client._channels + client._downbeat_channels:
                            chan.close_send()
                        nursery.cancel_scope.cancel()
            client._nursery = None
            left = client.undelivered()
            if left and user_exc is None:
                raise UndeliveredClaims(left)
            if left:
                log.error("%d claim(s) undelivered at close", len(left))
    except BaseExceptionGroup as group:
        if user_exc is not None:
            raise user_exc from None
        leaves = _leaves(group)
        real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
        if len(real) == 1:
            raise real[0] from None
        raise


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        else:
            out.append(exc)
    return out
