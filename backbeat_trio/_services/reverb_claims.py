"""How the reverb reads claims, judges each, and what it hands out for each one it accepted.

:class:`ClaimReader` keeps the reverb's subscription to the status stream alive across a
reconnect and knows when the reverb could not read (:meth:`ClaimReader.blind_during`).
:class:`ClaimJudge` verifies a claim from the wire (signature against the keyring, unsigned
claims only when allowed, the clock-skew bound, replay); :class:`AcceptedClaim` is what
:meth:`~backbeat_trio._services.reverb.ReverbStatus.watch_claims` hands to a watcher (the
dashboard) for every claim that passed and that the aggregator took in (counted in a window,
or late): nothing the reverb refused ever reaches a watcher.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import trio

from .._client.client import Client
from .._core.hlc import HLC
from .._core.signing import HEADER_SIG, Keyring, ReplayCache, verify_claim
from .._core.wire import StatusClaim
from .._errors import BackbeatError
from .._transport.base import Message, Subscription, Transport

__all__ = [
    "CATCH_UP_GRACE",
    "CLAIM_BATCH",
    "CLOSE_DRAIN",
    "OUTAGE_GRACE",
    "AcceptedClaim",
    "ClaimJudge",
    "ClaimReader",
    "follow_connection",
]

log = logging.getLogger("backbeat_trio.reverb")

_SIG_HEADER: Final = HEADER_SIG.lower()
#: Seconds after the reverb reads again during which a silent agent is not yet ``stalled``:
#: agents reconnect on their own schedule (a client retries every ``reconnect_delay``, 1 s by
#: default) and only then re-send the claims that waited in their outboxes.
OUTAGE_GRACE: Final = 2.0
#: Seconds after the reverb reads again during which an agent it has not counted in a window
#: since the outage is not ``stalled``: a client re-sends its outbox after its own reconnect
#: delay, and in JetStream mode holds its new claims until every re-sent one is acknowledged
#: (re-sending what was refused after its ack timeout), so its first current claim can come
#: several seconds after the others'.
CATCH_UP_GRACE: Final = 10.0
#: Seconds between attempts to re-create the stream subscription after a reconnect (doubling).
_RESUBSCRIBE_DELAY: Final = 0.05
_RESUBSCRIBE_DELAY_MAX: Final = 1.0
#: Seconds each JetStream request of a resubscription may take (a server that just restarted
#: either answers at once or is not there yet).
_RESUBSCRIBE_OP_TIMEOUT: Final = 1.0
#: Claims the reverb takes in one go before it yields to its other tasks (the beat above all).
CLAIM_BATCH: Final = 32
#: Claims already received that the reverb takes in before it closes a window; a buffer holding
#: more makes the window one it is behind on (blind).
CLOSE_DRAIN: Final = 4 * CLAIM_BATCH


class ClaimReader:
    """The reverb's claim subscription: the status stream from the sequence after the last
    claim it processed, re-created as soon as the connection is back (a restarted server has
    lost the old consumer, and nats-py would notice only after missed heartbeats).

    Without a stream it is a core subscription (nats-py renews it by itself). Either way it
    tracks the latest span during which the reverb could not read: from a disconnect until the
    subscription is back and has caught up with what the stream held then; and whether it is
    behind (it has not emptied its subscription's buffer for a while, e.g. taking in a burst of
    claims that waited in the agents' outboxes).

    Attributes:
        sub: the current subscription (replaced after a reconnect).
        last_seq: the stream sequence of the last message handed out (0: none).
        dropped: messages the subscriptions dropped while full, not yet collected by the owner.
        resubscribed: subscriptions re-created after a reconnect.
        resumed_at: when the reverb could read again after its latest outage (its subscription
            re-created and caught up; ``trio.current_time()``, None before any outage).
    """

    def __init__(self, transport: Transport, subject: str, stream: str | None) -> None:
        self.subject = subject
        self.stream = stream
        self._transport = transport
        self.sub: Subscription | None = None
        self.last_seq = 0
        self.resubscribed = 0
        self.resumed_at: float | None = None
        self._blind_since: float | None = None
        self._blind_until: float | None = None
        self._catch_up_to: int | None = None
        self._replaced = trio.Event()
        self.dropped = 0
        self._waiting: Subscription | None = None  # waited on, its buffer empty: not behind
        self._drained_at = trio.current_time()  # the buffer was last found empty
        self._left_behind = False  # the latest ready() stopped at its limit, claims still held

    def __repr__(self) -> str:
        return (
            f"<ClaimReader {self.stream or 'core'} last_seq={self.last_seq} "
            f"resubscribed={self.resubscribed}>"
        )

    async def subscribe(self) -> Subscription:
        """Subscribe to what is stored from now on (without a stream: core NATS)."""
        if self.stream is None:
            self.sub = await self._transport.subscribe(self.subject, buffer=65536)
            return self.sub
        js = self._transport.jetstream
        summary = await js.stream_summary(self.stream)
        self.last_seq = summary.last_seq if summary is not None else 0
        self.sub = await js.stream_subscribe(self.subject, self.stream, start_seq=self.last_seq + 1)
        return self.sub

    def went_down(self, now: float) -> None:
        """The connection is down: the reverb reads nothing from ``now`` on."""
        if self._blind_since is None or self._blind_until is not None:
            self._blind_since, self._blind_until = now, None

    async def resume(self) -> None:
        """The connection is back: re-create the stream subscription from the sequence after
        the last one handed out, retrying until JetStream answers (bound it by cancelling)."""
        if self.stream is None:
            self._caught_up()
            return
        js = self._transport.jetstream.with_op_timeout(_RESUBSCRIBE_OP_TIMEOUT)
        delay = _RESUBSCRIBE_DELAY
        while True:
            try:
                summary = await js.stream_summary(self.stream)
                sub = await js.stream_subscribe(
                    self.subject, self.stream, start_seq=self.last_seq + 1
                )
            except BackbeatError as exc:
                log.info("claim stream not back yet (%s); again in %.2f s", exc, delay)
                await trio.sleep(delay)
                delay = min(2 * delay, _RESUBSCRIBE_DELAY_MAX)
                continue
            break
        old, self.sub = self.sub, sub
        self.resubscribed += 1
        # the stream's last sequence is a claim's only in a stream of claims alone (the
        # reverb's own); in any other, the reader counts as caught up at once
        if summary is not None and summary.subjects == (self.subject,):
            self._catch_up_to = summary.last_seq
        else:
            self._catch_up_to = None
        if self._catch_up_to is None or self.last_seq >= self._catch_up_to:
            self._caught_up()
        event, self._replaced = self._replaced, trio.Event()
        event.set()
        if old is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await old.unsubscribe()
        log.info("claim stream resumed after sequence %d", self.last_seq)

    async def replaced(self, sub: Subscription) -> Subscription:
        """Wait until ``sub`` (whose channel ended) has a successor; return it."""
        while self.sub is sub:
            await self._replaced.wait()
        assert self.sub is not None
        return self.sub

    async def next_batch(self) -> list[Message]:
        """The next messages to take, at most :data:`CLAIM_BATCH`, without any handed out
        before; yields once first (so a burst is taken in batches, the beat between them),
        waits for one when none is ready, and moves on to a subscription's successor."""
        while True:
            # yield before taking: a message held across a checkpoint could be overtaken by
            # ready(), which would record later sequences and make this one look seen
            await trio.lowlevel.checkpoint()
            sub = self.sub
            assert sub is not None
            try:
                first = sub.messages.receive_nowait()
            except trio.WouldBlock:
                self._drained_at, self._waiting = trio.current_time(), sub
                try:
                    first = await sub.messages.receive()
                except trio.EndOfChannel:
                    await self.replaced(sub)
                    continue
                finally:
                    # empty all the while it waited
                    self._drained_at, self._waiting = trio.current_time(), None
            except trio.EndOfChannel:
                await self.replaced(sub)
                continue
            batch = [first]
            while len(batch) < CLAIM_BATCH:
                try:
                    batch.append(sub.messages.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if sub.dropped:
                self.dropped += sub.dropped
                sub.dropped = 0
            return [msg for msg in batch if self.take(msg)]

    def ready(self, limit: int) -> list[Message]:
        """The messages already in the subscription's buffer, at most ``limit``, without any
        handed out before and without waiting (taken before a window closes: a claim that
        reached the reverb before the beat that ends its window counts in it, whichever of the
        reverb's tasks runs first). A buffer found empty counts as drained; one still holding
        claims after ``limit`` makes the reader behind until the next call."""
        sub = self.sub
        batch: list[Message] = []
        self._left_behind = False
        if sub is None or self._handing_off():
            return batch  # the oldest is on its way to the waiting task: none overtakes it
        while len(batch) < limit:
            try:
                batch.append(sub.messages.receive_nowait())
            except trio.WouldBlock:
                self._drained_at = trio.current_time()
                break
            except trio.EndOfChannel:
                break
        else:
            # what is left may be the claims of the window about to close
            self._left_behind = _holds_more(sub)
        return [msg for msg in batch if self.take(msg)]

    def _handing_off(self) -> bool:
        # a message went straight to the task waiting on the current subscription, which has
        # not run yet (a memory channel hands it over, past the buffer)
        sub = self._waiting
        if sub is None or sub is not self.sub:
            return False
        stats = getattr(sub.messages, "statistics", None)
        return stats is not None and stats().tasks_waiting_receive == 0

    def take(self, msg: Message) -> bool:
        """Whether ``msg`` is new (not a message an earlier subscription handed out already);
        records its sequence."""
        seq = self._transport.jetstream.sequence_of(msg) if self.stream is not None else None
        if seq is None:
            return True
        if seq <= self.last_seq:
            return False
        self.last_seq = seq
        if self._catch_up_to is not None and seq >= self._catch_up_to:
            self._caught_up()
        return True

    def _caught_up(self) -> None:
        self._catch_up_to = None
        if self._blind_since is not None and self._blind_until is None:
            self._blind_until = trio.current_time()
            self.resumed_at = self._blind_until

    def blind_during(self, opened: float, closed: float) -> bool:
        """Whether the reverb could not read (or had read again for less than
        :data:`OUTAGE_GRACE`) at some time between ``opened`` and ``closed`` (now), or has
        been behind since ``opened`` (its buffer not once empty), or its latest :meth:`ready`
        left claims in the buffer, or a claim is on its way to its claims task."""
        if self._left_behind or self._handing_off():
            return True
        if self._waiting is None and self._drained_at < opened:
            return True
        return self._outage_within(opened, closed, OUTAGE_GRACE)

    def catching_up(self, opened: float, closed: float) -> bool:
        """Whether the reverb could not read, or had read again for less than
        :data:`CATCH_UP_GRACE`, at some time between ``opened`` and ``closed`` (now)."""
        return self._outage_within(opened, closed, CATCH_UP_GRACE)

    def _outage_within(self, opened: float, closed: float, grace: float) -> bool:
        since, until = self._blind_since, self._blind_until
        if since is None or since > closed:
            return False
        return until is None or until + grace >= opened


def _holds_more(sub: Subscription) -> bool:
    stats = getattr(sub.messages, "statistics", None)
    return stats is None or stats().current_buffer_used > 0


async def follow_connection(bb: Client, reader: ClaimReader) -> None:
    """Tell ``reader`` when the reverb's connection (as its client ``bb`` sees it) goes down
    and comes back; runs until cancelled."""
    while True:
        await bb.wait_connected(False)
        reader.went_down(trio.current_time())
        await bb.wait_connected(True)
        await reader.resume()


@dataclass(frozen=True, slots=True)
class AcceptedClaim:
    """A claim a reverb accepted (verified, counted or late), as ``watch_claims`` hands it out.

    Attributes:
        claim: the claim.
        signed: True only when its signature verified against the keyring's key for
            ``claim.agent_id`` (False: an unsigned claim, accepted with ``allow_unsigned``).
        key: that keyring key (std base64) when ``signed``, else ``""``.
        wall: the reverb's wall clock when it accepted the claim (POSIX seconds).
    """

    claim: StatusClaim
    signed: bool
    key: str
    wall: float


@dataclass(frozen=True, slots=True)
class ClaimJudge:
    """What a claim is verified against: the keyring, the replay memory and the clock."""

    keyring: Keyring
    allow_unsigned: bool
    replay: ReplayCache
    hlc: HLC
    wall_clock: Callable[[], float]

    def verify(self, data: bytes, headers: Mapping[str, str] | None) -> StatusClaim:
        # the skew bound is the reverb HLC's: a stamp it would not adopt is not accepted either;
        # stamps are in the agents' (real) wall clock, so this is too, whatever wall_clock is
        return verify_claim(
            data,
            headers,
            self.keyring,
            allow_unsigned=self.allow_unsigned,
            replay_cache=self.replay,
            max_wall_ms=time.time_ns() // 1_000_000 + self.hlc.max_forward_ms,
        )

    def accepted(self, claim: StatusClaim, headers: Mapping[str, str] | None) -> AcceptedClaim:
        # verify() passed: a signature header present means the signature verified
        signed = bool(headers) and any(name.lower() == _SIG_HEADER for name in headers or ())
        key = (self.keyring.public_key_b64(claim.agent_id) or "") if signed else ""
        return AcceptedClaim(claim=claim, signed=signed, key=key, wall=self.wall_clock())
