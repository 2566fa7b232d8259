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
import random
import secrets
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal, NoReturn, TypeVar

import msgspec
import trio

from .._bridge.nats import open_nats_transport
from .._client.config import Config
from .._core.beats import beat_subject, phase_for, status_subject, window_id
from .._core.hlc import HLC
from .._core.tempo import TempoEstimator
from .._core.wire import BeatFrame, HealthStatus, StatusClaim, decode, encode_claim
from .._errors import BeatBudgetExceeded, InvalidStatusClaim, NotConnected, WireError
from .._transport.base import ConnEvent, Message, Transport
from .._util.channel import DropOldestChannel
from .._util.sleep import SPIN_S, precise_clock

__all__ = ["Client", "ClientMetrics", "UndeliveredClaims", "open_client"]

#: emit_status yields to other tasks at most this often (seconds): bursts go out in batches.
EMIT_YIELD_INTERVAL_S = 0.001

log = logging.getLogger("backbeat_trio.client")
#: Default task ids only need to differ, not to be secret: a PRNG seeded once from the OS saves
#: a system call per claim (``secrets.token_hex`` reads urandom every time).
_task_ids = random.Random(secrets.randbits(128))

T = TypeVar("T")
BeatCallback = Callable[[BeatFrame], Any]

_MAX_RECENT_ERRORS = 16

MAX_CLOCK_SKEW = 300.0
"""Seconds the first beat frame's deadline may be away from the local clock (after one beat):
further off, it is refused as implausible rather than trusted to calibrate the clock offset."""

RECALIBRATE_AFTER = 8
"""Consecutive frames refused as stale or implausible after which the clock offset to the pulse
is measured afresh (a clock was stepped), instead of refusing the pulse for ever."""


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
    implausible: int = 0
    duplicate_or_old: int = 0
    malformed: int = 0
    oversized: int = 0
    wrong_cluster: int = 0
    transport_dropped: int = 0  # by a transport that queues frames (not NATS: taken in as parsed)
    callback_errors: int = 0
    claims_ok: int = 0
    claims_confirmed: int = 0
    claims_unconfirmed: int = 0
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
    beats: float  # the budget's length
    target: float | None  # fractional beat position at which it ends (None: before any beat)


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
            from .._core.signing import Signer

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
        self._timing_refusals = 0  # consecutive frames refused as stale or implausible
        # (index, trio start) of the last beat the pulse itself timed: while degraded, local
        # beats are due at anchor + k beats (absolute, no accumulated error)
        self._local_anchor: tuple[int, float] | None = None
        self._beat_event = trio.Event()
        self._wake_sampler = trio.Event()  # before the first beat only
        # the sampler's sleep; a new schedule moves its deadline instead of waking it
        self._sampler_scope: trio.CancelScope | None = None
        self._sampler_spin = 0.0  # SPIN_S on a real clock (set by the sampler)
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
        self._outbox_waiters = 0  # tasks in flush_claims, waiting for _outbox_changed
        # JetStream mode: after a reconnect or a refused publish, new claims wait until every
        # re-published one is acknowledged, so the stream stores claims in the order emitted
        self._hold_new = False
        self._resend_all = False
        # core mode: claims handed to the connection but not yet confirmed by a server PONG;
        # only these can be lost when the connection drops
        self._unconfirmed: collections.deque[_Outgoing] = collections.deque()
        self._confirm_wake = trio.Event()
        self._confirm_scope: trio.CancelScope | None = None
        self._conn_generation = 0
        # connection
        self._connected = transport.connected
        self._reconnect_count = 0
        self._connection_changed = trio.Event()
        self._recent_errors: collections.deque[str] = collections.deque(maxlen=_MAX_RECENT_ERRORS)
        self._nursery: trio.Nursery | None = None
        self._last_emit_yield = -math.inf
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

        Raises:
            ValueError: ``buffer`` is given and is not a positive int.
        """
        return self._new_channel(self._channels, buffer, "beats")

    def downbeats(self, *, buffer: int | None = None) -> DropOldestChannel[BeatFrame]:
        """Like :meth:`beats`, downbeats only."""
        return self._new_channel(self._downbeat_channels, buffer, "downbeats")

    def _new_channel(
        self, where: list[DropOldestChannel[BeatFrame]], buffer: int | None, name: str
    ) -> DropOldestChannel[BeatFrame]:
        if buffer is None:
            buffer = self.config.beat_buffer
        elif isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ValueError(f"{name}(buffer=...) needs a positive int, got {buffer!r}")
        chan = DropOldestChannel[BeatFrame](buffer, name)
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
        scope = trio.CancelScope()
        self._nursery.start_soon(self._run_callback, callback, chan, scope)

        def remove() -> None:
            chan.close()
            scope.cancel()

        return remove

    async def _run_callback(
        self, callback: BeatCallback, chan: DropOldestChannel[BeatFrame], scope: trio.CancelScope
    ) -> None:
        with scope, contextlib.suppress(trio.ClosedResourceError):
            async for frame in chan:
                try:
                    result = callback(frame)
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:
                    self.metrics.callback_errors += 1
                    name = getattr(callback, "__name__", callback)
                    self._note_error(f"callback {name!r}: {exc!r}")
                    log.exception("beat callback %r raised", callback)

    async def wait_connected(self, connected: bool = True) -> None:
        """Wait until the client sees its NATS connection up (or, with ``False``, down).

        Returns at once when it already is. Bound the wait with a cancel scope.
        """
        await trio.lowlevel.checkpoint()
        while self._connected != connected:
            await self._connection_changed.wait()

    def _set_connected(self, connected: bool) -> None:
        if connected != self._connected:
            self._connected = connected
            event, self._connection_changed = self._connection_changed, trio.Event()
            event.set()

    async def wait_for_beat(self) -> BeatFrame:
        """Wait for the next beat and return its frame.

        Raises:
            NotConnected: the client closed (before or while waiting).
        """
        if self._closing:
            await trio.lowlevel.checkpoint()
            raise NotConnected("the client is closed: no more beats")
        await self._beat_event.wait()
        if self._closing:
            raise NotConnected("the client closed while waiting for a beat")
        assert self._last_frame is not None
        return self._last_frame

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
        if (
            isinstance(beats, bool)
            or not isinstance(beats, int | float)
            or not (0 < beats < math.inf)
        ):
            raise ValueError(f"a beat budget needs a positive number of beats, got {beats!r}")
        pos = self._position(trio.current_time())
        target = None if pos is None else pos + beats
        deadline = math.inf if target is None else self._deadline_for(target)
        scope = trio.CancelScope(deadline=deadline)
        self._budgets[scope] = _Budget(beats, target)
        self.metrics.budgets_created += 1
        if self._closing:
            scope.cancel()
        return scope

    @contextlib.contextmanager
    def fail_after_beats(self, beats: float) -> Iterator[trio.CancelScope]:
        """Like :meth:`beat_budget`, but raise :class:`BeatBudgetExceeded` when it runs out.

        Raises:
            BeatBudgetExceeded: the budget ran out before the block finished.
            NotConnected: the client closed before the block finished (that cancels it too).
        """
        scope = self.beat_budget(beats)
        try:
            with scope:
                yield scope
        finally:
            self._count_budget(scope)
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
            if budget.target is None:  # made before the first beat: it starts counting now
                assert self._last_index is not None
                budget.target = self._last_index + budget.beats
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
        if not isinstance(claim, StatusClaim):
            raise InvalidStatusClaim(
                f"emit_status needs a backbeat_trio.StatusClaim, got {type(claim).__name__}"
            )
        agent_id = self.config.agent_id
        # HLCStamp.__str__'s format applied to the stamp (a tuple) directly: half the cost of
        # str(), which a format() call would give back
        hlc = "%012x:%04x:%04x" % self._hlc.now()  # noqa: UP031
        filled = msgspec.structs.replace(
            claim,
            agent_id=agent_id,
            beat_index=self._last_index or 0,
            hlc=hlc,
            task_id=claim.task_id or f"task:{_task_ids.getrandbits(32):08x}",
        )
        body = encode_claim(filled)  # raises InvalidStatusClaim
        if len(self._outbox) >= self.config.outbox_size:
            self.metrics.claims_failed += 1
            raise NotConnected(
                f"claim outbox full ({self.config.outbox_size} claims waiting for "
                f"{'acknowledgement' if self._mode == 'jetstream' else 'the connection'})"
            )
        headers = self._signer.headers(body) if self._signer is not None else {}
        headers["Nats-Msg-Id"] = f"{agent_id}:{hlc}"
        self._seq += 1
        out = _Outgoing(self._seq, filled, body, headers)
        # the transport knows about a dead connection before its event reaches the supervisor:
        # a claim emitted in between waits in the outbox instead of going into a dead socket
        connected = self._connected and self._transport.connected
        if self._mode == "jetstream" or not connected:
            self._outbox[out.seq] = out
            self.metrics.claims_queued += 1
        if connected and not self._hold_new:
            self._send(out)
        return filled

    def _send(self, out: _Outgoing) -> None:
        if not self._transport.connected:
            # known dead (its event may still be on the way): keep it for the reconnect
            self._outbox.setdefault(out.seq, out)
            return
        reply = f"{self._ack_prefix}.{out.seq}" if self._mode == "jetstream" else ""
        try:
            self._transport.publish(
                self._status_subject, out.body, headers=out.headers, reply=reply
            )
        except NotConnected:
            self._outbox.setdefault(out.seq, out)
            return
        out.sent_at = trio.current_time()
        if self._mode == "core":
            self._outbox.pop(out.seq, None)
            if len(self._unconfirmed) >= self.config.outbox_size:
                self._unconfirmed.popleft()
                self.metrics.claims_unconfirmed += 1
            self._unconfirmed.append(out)
            self._confirm_wake.set()
            self._notify_outbox()

    def _notify_outbox(self) -> None:
        # Swap, then set: every waiter (flush_claims may be awaited by several tasks) wakes and
        # re-checks; waiters never replace the event themselves, or one could strand another.
        # Nobody waiting (the common case, once per claim): nothing to wake, no new Event.
        if self._outbox_waiters:
            event, self._outbox_changed = self._outbox_changed, trio.Event()
            event.set()

    def _republish_all(self) -> None:
        for out in list(self._outbox.values()):
            if out.sent_at is not None:
                self.metrics.claims_republished += 1
            self._send(out)

    async def flush_claims(self) -> None:
        """Wait until every claim emitted so far is delivered: acknowledged by JetStream, or (core
        mode) confirmed received by the server. Wrap it in a cancel scope to bound the wait.

        In core mode a claim that was on its way when the connection dropped is not waited for:
        it is counted in ``metrics.claims_unconfirmed`` (it may be lost; see :attr:`delivery_mode`).
        """
        while self._outbox or self._unconfirmed:
            self._outbox_waiters += 1
            try:
                await self._outbox_changed.wait()
            finally:
                self._outbox_waiters -= 1
        if self._connected:
            with contextlib.suppress(NotConnected):
                await self._transport.flush()
        else:
            await trio.lowlevel.checkpoint()

    def undelivered(self) -> list[StatusClaim]:
        """Claims not yet delivered (queued, or unacknowledged in JetStream mode), oldest first."""
        return [o.claim for o in self._outbox.values()]

    def _forget_unconfirmed(self, why: str) -> None:
        """Core mode: claims the server never confirmed are written off as possibly lost."""
        if not self._unconfirmed:
            return
        n = len(self._unconfirmed)
        self._unconfirmed.clear()
        self.metrics.claims_unconfirmed += n
        self._note_error(
            f"{n} claim(s) sent {why} were not confirmed by the server and may be lost "
            f"(core NATS is at-most-once; a JetStream stream on {self._status_subject} makes "
            f"claims at-least-once)"
        )
        log.warning("%d claim(s) possibly lost (%s)", n, why)
        self._notify_outbox()

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
        except (WireError, UnicodeDecodeError) as exc:
            # UnicodeDecodeError: invalid UTF-8 inside a JSON string gets past _wire.decode
            self.metrics.malformed += 1
            text = str(exc) if isinstance(exc, WireError) else f"invalid BeatFrame: {exc!r}"
            self._note_error(text[:200])
            return
        if frame.cluster_id != self.config.cluster_id:
            self.metrics.wrong_cluster += 1
            self._note_error(f"beat frame for cluster {frame.cluster_id!r}")
            return
        self._hlc.update(frame.hlc)
        last = self._last_index
        # While degraded, the pulse's frame for the beat we synthesised is how it comes back;
        # anything else at or below the last delivered index is a duplicate, a replay or a
        # restarted pulse, and must neither be delivered nor move our schedule.
        if last is not None and (
            frame.beat_index < last or (frame.beat_index == last and not self._degraded)
        ):
            self.metrics.duplicate_or_old += 1
            self._note_error(f"beat {frame.beat_index} is not after beat {last}: discarded")
            return
        wall = self._wall()
        duration = 60.0 / frame.tempo_bpm
        jitter = self.config.jitter_tolerance
        start_ts = frame.deadline_at.timestamp() - duration
        # Judge the frame against the clock offset the *previous* frames established: a frame
        # must not vouch for its own timing (it would make any deadline look on time). The
        # first frame calibrates the offset, within a plausible clock skew.
        raw_offset = wall - start_ts
        if self._estimator.samples:
            lateness = raw_offset - self._estimator.clock_offset  # >= 0 up to jitter
        elif abs(raw_offset) <= MAX_CLOCK_SKEW + duration:
            lateness = 0.0
        else:
            lateness = -math.inf
        if lateness < -(duration + jitter):
            self._refuse_timing(
                "implausible",
                f"beat {frame.beat_index} starts {-lateness:.3f} s after now (pulse clock)",
            )
            return
        if lateness - duration > jitter:
            self._refuse_timing(
                "stale", f"stale beat {frame.beat_index} ({lateness - duration:.3f} s late)"
            )
            return
        self._timing_refusals = 0
        self._estimator.observe(
            frame.beat_index, now, frame.tempo_bpm, wall_arrival=wall, scheduled_start=start_ts
        )
        # the pulse is alive: anchor the local schedule on its clock
        self._pulse_anchor = (frame.beat_index, frame.deadline_at)
        # Clocks that agree within the tolerance are trusted as they are: the local schedule is
        # then anchored on the pulse's own beat start, not on the fastest arrival seen.
        offset = self._estimator.clock_offset
        since_start = min(raw_offset, duration) if abs(offset) <= jitter else lateness
        start_local = now - max(0.0, since_start)
        if self._degraded:
            self._degraded = False
            self.metrics.resyncs += 1
            log.info("pulse is back at beat %d; resynchronised", frame.beat_index)
        self._last_wall = wall
        if frame.beat_index == last:
            # the beat we synthesised: adopt the pulse's frame and timing, deliver nothing
            self._last_frame = frame
            self._tempo_bpm = frame.tempo_bpm
            self._set_timing(frame.beat_index, start_local, duration)
            self._reproject_budgets()
            return
        if last is not None and frame.beat_index > last + 1:
            self.metrics.forward_jumps += 1
            self.metrics.beats_skipped += frame.beat_index - last - 1
        self._deliver(frame, start_local)

    def _refuse_timing(self, metric: Literal["stale", "implausible"], text: str) -> None:
        setattr(self.metrics, metric, getattr(self.metrics, metric) + 1)
        self._note_error(text)
        self._timing_refusals += 1
        if self._timing_refusals >= RECALIBRATE_AFTER:
            # that many refusals in a row with no frame on time: more likely a clock was stepped
            # (NTP, a new pulse host) than an attack; measure the offset afresh
            self._timing_refusals = 0
            self._estimator.reset()
            self._note_error(
                f"{RECALIBRATE_AFTER} beat frames in a row refused for their timing: "
                f"re-calibrating the clock offset to the pulse"
            )
            log.warning("beat frames keep arriving off time; re-calibrating the clock offset")

    def _set_timing(self, index: int, start_local: float, duration: float) -> None:
        self._local_anchor = (index, start_local)
        self._last_start = start_local
        self._next_due = start_local + duration
        self._rearm_sampler()

    def _sampler_alarm(self) -> float:
        # a healthy pulse gets one beat + jitter; once degraded we keep the exact schedule
        due = self._next_due
        return due if self._degraded else due + self.config.jitter_tolerance

    def _rearm_sampler(self) -> None:
        """The schedule moved: move the sampler's alarm. A sleeping sampler is not woken (a
        healthy pulse then costs no sampler wake-up per beat) unless the alarm is now due."""
        scope = self._sampler_scope
        if scope is None:
            self._wake_sampler.set()
        else:
            scope.deadline = self._sampler_alarm() - self._sampler_spin

    def _deliver(self, frame: BeatFrame, start_local: float, *, synthetic: bool = False) -> None:
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
        self._tempo_bpm = frame.tempo_bpm
        duration = 60.0 / frame.tempo_bpm
        if synthetic:
            self._last_start = start_local
            self._next_due = start_local + duration
            if self._local_anchor is not None:
                anchor_index, anchor_start = self._local_anchor
                self._next_due = anchor_start + (frame.beat_index + 1 - anchor_index) * duration
        else:
            self._set_timing(frame.beat_index, start_local, duration)
        self.metrics.beats += 1
        if frame.downbeat:
            self.metrics.downbeats += 1
        self._reproject_budgets()
        self._fan_out(frame)
        self._rearm_sampler()

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
        assert self._last_index is not None
        index = self._last_index + 1
        bpb = self._beats_per_bar
        duration = 60.0 / self._tempo_bpm
        deadline: _dt.datetime | None = None
        if self._pulse_anchor is not None:
            anchor_index, anchor_deadline = self._pulse_anchor
            with contextlib.suppress(OverflowError):  # the pulse's timeline ends in year 9999
                step = _dt.timedelta(seconds=(index - anchor_index) * duration)
                deadline = anchor_deadline + step
        if deadline is None:
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
        self._deliver(frame, due, synthetic=True)

    # ------------------------------------------------------------------ tasks
    async def _run_subscriber(self, *, task_status: trio.TaskStatus[None]) -> None:
        # Over NATS, frames are taken in as nats-py parses them: a beat then wakes its consumers
        # directly, one task hop (~0.1 ms here) sooner than through a channel read by this task.
        # ``_intake`` is synchronous and never blocks.
        intake = self._intake
        current_time = trio.current_time

        def handle(msg: Message) -> None:
            intake(msg.data, current_time())

        subscribe = self._transport.subscribe
        if _takes_keyword(subscribe, "handler"):
            sub = await subscribe(self._beat_subject, buffer=4096, handler=handle)
        else:  # a transport written before ``handler`` existed
            sub = await subscribe(self._beat_subject, buffer=4096)
        task_status.started()
        try:
            # a transport that declines ``handler`` (MemoryTransport: it models a network hop)
            # delivers here instead: take those in the same way
            async for msg in sub.messages:
                handle(msg)
                if sub.dropped:
                    self.metrics.transport_dropped += sub.dropped
                    sub.dropped = 0
            if sub.failure is not None:
                raise sub.failure
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await sub.unsubscribe()

    async def _run_tempo_sampler(self, *, task_status: trio.TaskStatus[None]) -> None:
        """The local metronome: notices a silent pulse and keeps time alone (degradation)."""
        task_status.started()
        spin = self._sampler_spin = SPIN_S if precise_clock() else 0.0
        while True:
            if self._last_index is None:
                self._wake_sampler = trio.Event()
                await self._wake_sampler.wait()
                continue
            # Sleep until the alarm; frames move it (``_rearm_sampler``) without waking us.
            with trio.CancelScope() as scope:
                scope.deadline = self._sampler_alarm() - spin
                self._sampler_scope = scope
                try:
                    await trio.sleep_forever()
                finally:
                    self._sampler_scope = None
            due = self._next_due
            # the last stretch: yield until the alarm (trio's sleeps wake ~1 ms late), unless
            # a frame moves the schedule meanwhile
            while self._next_due == due:
                remaining = self._sampler_alarm() - trio.current_time()
                if remaining <= 0 or remaining > spin:
                    break
                await trio.lowlevel.checkpoint()
            if self._next_due != due or trio.current_time() < self._sampler_alarm():
                continue  # the schedule moved: sleep to the new alarm
            if not self._degraded:
                self._degraded = True
                self.metrics.degraded_episodes += 1
                self._note_error(f"no beat after {self._last_index}: keeping time locally")
                log.warning(
                    "pulse silent after beat %s; degrading to local beats", self._last_index
                )
            self._synthesise(due)

    async def _run_supervisor(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Watches connection events; re-publishes claims after a reconnect."""
        task_status.started()
        async for event in self._transport.events:
            self._on_event(event)
        # The events ended under a running client: its transport was closed (or, shared, its
        # view detached). Deaf to disconnects it could not keep its delivery promises: stop.
        raise NotConnected(
            "the transport's connection events ended while the client was running (the "
            "transport was closed, or its view detached, before the client)"
        )

    def _on_event(self, event: ConnEvent) -> None:
        if event.kind == "disconnected":
            self._set_connected(False)
            self._conn_generation += 1
            if self._confirm_scope is not None:
                self._confirm_scope.cancel()
            self.metrics.disconnects += 1
            self._note_error("disconnected from NATS")
            self._forget_unconfirmed("just before the connection dropped")
        elif event.kind == "reconnected":
            self._set_connected(True)
            self._reconnect_count += 1
            self.metrics.reconnects += 1
            log.info("reconnected (%s); re-publishing %d claim(s)", event.detail, len(self._outbox))
            if self._mode == "jetstream" and self._outbox:
                self._hold_new = True
            self._republish_all()
            self._confirm_wake.set()
        elif event.kind == "closed":
            self._set_connected(False)
            if not self._closing:
                self._note_error("NATS connection closed (reconnect attempts exhausted)")
        elif event.kind == "slow_consumer":
            self.metrics.slow_consumer += 1
            self._note_error(f"slow consumer: {event.detail}")
        elif event.kind == "error":
            self._note_error(event.detail)
        elif event.kind == "connected":
            self._set_connected(True)
            self._confirm_wake.set()

    async def _run_confirmer(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Core mode: a PING/PONG after each batch of claims confirms the server has them.

        Without it nobody could tell which claims a dying connection swallowed; with it the
        possible loss is bounded by, and counted as, the claims still unconfirmed at a disconnect.
        """
        task_status.started()
        while True:
            while not (self._unconfirmed and self._connected):
                self._confirm_wake = trio.Event()
                await self._confirm_wake.wait()
            generation = self._conn_generation
            batch = len(self._unconfirmed)
            confirmed = False
            with trio.move_on_after(self._ack_timeout) as scope:
                self._confirm_scope = scope
                try:
                    await self._transport.flush()
                    confirmed = True
                except NotConnected:
                    pass
            self._confirm_scope = None
            if confirmed and generation == self._conn_generation:
                done = min(batch, len(self._unconfirmed))
                for _ in range(done):
                    self._unconfirmed.popleft()
                self.metrics.claims_confirmed += done
                self.metrics.claims_ok += done
                self._notify_outbox()
            elif not confirmed:
                await trio.sleep(self._ack_timeout / 8)  # back off; the disconnect event follows

    async def _run_ack_listener(self, *, task_status: trio.TaskStatus[None]) -> None:
        """JetStream mode: PubAcks arrive on one wildcard inbox; unacked claims are retried."""
        sub = await self._transport.subscribe(f"{self._ack_prefix}.*", buffer=65536)
        task_status.started()
        prefix_len = len(self._ack_prefix) + 1
        try:
            while True:
                # retry on a fixed period: a steady flow of acks must not starve the retries
                with trio.move_on_after(self._ack_timeout / 2):
                    async for msg in sub.messages:
                        self._on_ack(msg.subject[prefix_len:], msg.data)
                    return  # the subscription ended: the client is closing
                self._retry_unacked()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await sub.unsubscribe()

    def _on_ack(self, token: str, data: bytes) -> None:
        try:
            seq = int(token)
        except ValueError:
            self._note_error(f"PubAck on an unexpected subject token {token!r}")
            return
        ack: Any = None
        if data:
            with contextlib.suppress(msgspec.DecodeError):
                ack = msgspec.json.decode(data)
        if not isinstance(ack, dict) or "error" in ack or "stream" not in ack:
            # a 503 (no JetStream responder: a stream still recovering or moving) or an error:
            # go back and re-publish every unacknowledged claim in order, holding new ones
            why = "no JetStream responder" if not data else repr(data[:120])
            self._note_error(f"claim {seq} not acknowledged ({why}); re-publishing in order")
            if seq in self._outbox:
                self._hold_new = self._resend_all = True
            return
        if self._outbox.pop(seq, None) is None:
            return  # a duplicate ack (we re-published a claim the stream already had)
        self.metrics.claims_acked += 1
        self.metrics.claims_ok += 1
        self._notify_outbox()
        if self._hold_new and all(o.sent_at is None for o in self._outbox.values()):
            # every re-published claim is in: release the held ones, in order
            self._hold_new = False
            for out in list(self._outbox.values()):
                self._send(out)

    def _retry_unacked(self) -> None:
        if not self._connected or not self._outbox:
            return
        if self._hold_new and all(o.sent_at is None for o in self._outbox.values()):
            self._hold_new = False  # nothing in flight to wait for (its publish never went out)
        cutoff = math.inf if self._resend_all else trio.current_time() - self._ack_timeout
        self._resend_all = False
        for out in list(self._outbox.values()):
            if out.sent_at is not None and out.sent_at <= cutoff:
                self.metrics.claims_republished += 1
                self._send(out)
            elif out.sent_at is None and not self._hold_new:
                self._send(out)  # queued while the transport was down

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

    async def _run_services(self, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        """Run the client's tasks in a shielded scope that only ``open_client`` cancels.

        Cancelling the block that holds the client must not kill the ack-listener before the
        shielded shutdown has had its chance to deliver queued claims; so the tasks live behind a
        shield, and leave when ``open_client`` cancels this scope after the shutdown.
        """
        with trio.CancelScope(shield=True) as scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._run_supervisor)
                if self._mode == "jetstream":
                    await nursery.start(self._run_ack_listener)
                else:
                    await nursery.start(self._run_confirmer)
                await nursery.start(self._run_subscriber)
                await nursery.start(self._run_tempo_sampler)
                task_status.started(scope)

    async def _shutdown(self) -> None:
        """Leave the block: deliver what is queued (bounded), then end budgets, channels, waits."""
        if self._outbox or self._unconfirmed:
            with trio.move_on_after(self.config.close_grace):
                if self._connected:
                    self._retry_unacked()
                await self.flush_claims()
        # Core-mode claims the server never confirmed are not written off quietly at close:
        # they go back to the outbox, so undelivered() lists them and open_client raises.
        for out in self._unconfirmed:
            self._outbox[out.seq] = out
        self._unconfirmed.clear()
        self._outbox = collections.OrderedDict(sorted(self._outbox.items()))
        self._closing = True
        for scope in list(self._budgets):
            scope.cancel()
        for chan in self._channels + self._downbeat_channels:
            chan.close_send()
        self._channels.clear()
        self._downbeat_channels.clear()
        self._beat_event.set()  # wakes wait_for_beat(), which then raises NotConnected


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
        transport: use this transport instead of connecting with nats-py (tests: a
            :class:`~backbeat_trio.testing` memory transport).
        wall_clock: the wall clock (POSIX seconds); tests on MockClock pass a virtual one.

    Raises:
        NotConnected: the first connect failed, or the block ended with claims undelivered
            (:class:`UndeliveredClaims`) — unless the block itself raised, which wins (the
            undelivered claims are then logged and noted on that exception).
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
                services = await nursery.start(client._run_services)
                try:
                    yield client
                except BaseException as exc:
                    user_exc = exc
                    raise
                finally:
                    with trio.CancelScope(shield=True):
                        await client._shutdown()
                    services.cancel()
                    client._nursery = None
                    left = client.undelivered()
                    if left:
                        log.error("%d claim(s) undelivered when the client closed", len(left))
                        if user_exc is not None and not isinstance(user_exc, trio.Cancelled):
                            user_exc.add_note(
                                f"backbeat_trio: {len(left)} status claim(s) were not delivered "
                                f"before the client closed"
                            )
            left = client.undelivered()
            if left:
                raise UndeliveredClaims(left)
    except BaseExceptionGroup as group:
        chosen = _exception_to_raise(group, user_exc)
        if chosen is None:
            raise
        _reraise(chosen)


def _exception_to_raise(
    group: BaseExceptionGroup[Any], user_exc: BaseException | None
) -> BaseException | None:
    """What leaves ``open_client`` when its nursery raised ``group`` (None: the whole group).

    The user's own exception wins over internal cancellation and over internal failures (those
    are logged); otherwise a single internal failure is raised on its own, not wrapped.
    """
    internal = _leaves(group, skip=user_exc)
    real = [e for e in internal if not isinstance(e, trio.Cancelled)]
    if user_exc is not None and not _only_cancelled(user_exc):
        for exc in real:
            log.error("client task failed while the block raised", exc_info=exc)
        return user_exc
    if len(real) == 1:
        return real[0]
    if not real:
        return user_exc if user_exc is not None else (internal[0] if internal else None)
    return None


def _takes_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` accepts the keyword argument ``name`` (or any, through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _only_cancelled(exc: BaseException) -> bool:
    # A nursery inside the block, cancelled because a client task failed, raises a group of
    # Cancelled: that is our cancellation echoing back, not the user's own exception.
    if isinstance(exc, BaseExceptionGroup):
        return all(isinstance(e, trio.Cancelled) for e in _leaves(exc))
    return isinstance(exc, trio.Cancelled)


def _reraise(exc: BaseException) -> NoReturn:
    # Raising inside `except` would set exc.__context__ to the group that wrapped it; keep the
    # user's own context (trio does the same when it unwraps).
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc


def _leaves(
    group: BaseExceptionGroup[Any], skip: BaseException | None = None
) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if exc is skip:
            continue
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc, skip))
        else:
            out.append(exc)
    return out
