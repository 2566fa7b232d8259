"""The status-claim outbox, sans-IO: :class:`Outbox`.

Every claim a client emits is filled in (agent, beat, HLC, task id), encoded, signed, numbered and
given its JetStream dedup id here; the outbox then says which claims to publish and keeps each one
until it is delivered: acknowledged by JetStream (a PubAck on the claim's own reply subject), or in
core mode confirmed by a server PONG after it was written. While the connection is down claims
wait; after a reconnect they are re-published in order. Whatever is still undelivered when the
client closes is listed by :meth:`Outbox.undelivered`.

The caller does the publishing: it calls :meth:`Outbox.published` after a successful publish and
:meth:`Outbox.keep` after a failed one. Times are floats on the caller's monotonic clock.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

import msgspec

from .._errors import InvalidStatusClaim, NotConnected, WireError
from .edge import decode_json
from .hlc import HLC
from .metrics import ErrorLog
from .wire import StatusClaim, encode_claim

if TYPE_CHECKING:
    from .signing import Signer

__all__ = ["DeliveryMode", "Outbox", "Outgoing"]

DeliveryMode = Literal["jetstream", "core"]

log = logging.getLogger("backbeat_trio.client")
#: Default task ids only need to differ, not to be secret: a PRNG seeded once from the OS saves
#: a system call per claim (``secrets.token_hex`` reads urandom every time).
_task_ids = random.Random(secrets.randbits(128))


@dataclass(slots=True)
class Outgoing:
    """One claim on its way: its outbox number, the claim as sent and its encoded form."""

    seq: int
    claim: StatusClaim
    body: bytes
    headers: dict[str, str]
    reply: str  # the PubAck inbox in JetStream mode, else ""
    sent_at: float | None = None  # local time of the last publish


_NOTHING_TO_SEND: Final[tuple[Outgoing, ...]] = ()


class Outbox:
    """The claims of one client that are not yet delivered.

    Args:
        agent_id: filled into every claim (and its dedup id).
        status_subject: the subject claims go to (named in loss reports).
        outbox_size: how many claims may wait; one more is refused.
        ack_timeout: seconds after which an unacknowledged JetStream claim is re-published.
        hlc: the client's clock, stamped on every claim.
        signer: signs each body, or None to send claims unsigned.
        errors: where delivery problems are counted and noted.

    Attributes:
        mode: ``core`` (at-most-once, confirmed by PING/PONG) until :meth:`use_jetstream`.
        pending: claims queued (waiting for the connection) or, in JetStream mode, awaiting their
            PubAck, by number, oldest first.
        unconfirmed: core mode: claims written to the connection but not yet confirmed.
        hold_new: JetStream mode: new claims wait until every re-published claim is acknowledged,
            so the stream stores claims in the order emitted.
        generation: counts disconnects; a confirmation started before one is void.
    """

    __slots__ = (
        "_resend_all",
        "ack_prefix",
        "ack_timeout",
        "agent_id",
        "errors",
        "generation",
        "hlc",
        "hold_new",
        "metrics",
        "mode",
        "outbox_size",
        "pending",
        "seq",
        "signer",
        "status_subject",
        "unconfirmed",
    )

    def __init__(
        self,
        *,
        agent_id: str,
        status_subject: str,
        outbox_size: int,
        ack_timeout: float,
        hlc: HLC,
        signer: Signer | None,
        errors: ErrorLog,
    ) -> None:
        self.agent_id = agent_id
        self.status_subject = status_subject
        self.outbox_size = outbox_size
        self.ack_timeout = ack_timeout
        self.hlc = hlc
        self.signer = signer
        self.errors = errors
        self.metrics = errors.metrics
        self.mode: DeliveryMode = "core"
        self.ack_prefix = ""
        self.pending: collections.OrderedDict[int, Outgoing] = collections.OrderedDict()
        self.unconfirmed: collections.deque[Outgoing] = collections.deque()
        self.seq = 0
        self.generation = 0
        self.hold_new = False
        self._resend_all = False  # after a refused publish: re-publish every unacked claim

    def __repr__(self) -> str:
        return (
            f"<Outbox {self.mode} pending={len(self.pending)} "
            f"unconfirmed={len(self.unconfirmed)} seq={self.seq}>"
        )

    def use_jetstream(self, ack_prefix: str) -> None:
        """Deliver at least once through JetStream; PubAcks come to ``{ack_prefix}.{seq}``."""
        self.mode = "jetstream"
        self.ack_prefix = ack_prefix

    @property
    def busy(self) -> bool:
        """Whether any claim is not yet delivered (queued, unacked or unconfirmed)."""
        return bool(self.pending or self.unconfirmed)

    def undelivered(self) -> list[StatusClaim]:
        """The claims not yet delivered (queued or unacknowledged), oldest first."""
        return [o.claim for o in self.pending.values()]

    # ------------------------------------------------------------------ claims in
    def admit(self, claim: StatusClaim, beat_index: int, *, connected: bool) -> Outgoing:
        """Fill in, encode, sign and number one claim; returns it as it will be sent.

        Send it now when ``connected`` and not :attr:`hold_new`; otherwise it waits here.

        Args:
            claim: the user's claim (``type``, ``agent_id``, ``beat_index`` and ``hlc`` are
                filled in, and ``task_id`` when empty).
            beat_index: the current beat.
            connected: whether the connection is up (else the claim is queued).

        Raises:
            InvalidStatusClaim: the claim breaks the contract; nothing was kept.
            NotConnected: the outbox is full.
        """
        if not isinstance(claim, StatusClaim):
            raise InvalidStatusClaim(
                f"emit_status needs a backbeat_trio.StatusClaim, got {type(claim).__name__}"
            )
        agent_id = self.agent_id
        # HLCStamp.__str__'s format applied to the stamp (a tuple) directly: half the cost of
        # str(), which a format() call would give back
        hlc = "%012x:%04x:%04x" % self.hlc.now()  # noqa: UP031
        filled = msgspec.structs.replace(
            claim,
            agent_id=agent_id,
            beat_index=beat_index,
            hlc=hlc,
            task_id=claim.task_id or f"task:{_task_ids.getrandbits(32):08x}",
        )
        body = encode_claim(filled)  # raises InvalidStatusClaim
        pending = self.pending
        if len(pending) >= self.outbox_size:
            self.metrics.claims_failed += 1
            raise NotConnected(
                f"claim outbox full ({self.outbox_size} claims waiting for "
                f"{'acknowledgement' if self.mode == 'jetstream' else 'the connection'})"
            )
        signer = self.signer
        headers = signer.headers(body) if signer is not None else {}
        headers["Nats-Msg-Id"] = f"{agent_id}:{hlc}"
        self.seq = seq = self.seq + 1
        if self.mode == "jetstream":
            out = Outgoing(seq, filled, body, headers, f"{self.ack_prefix}.{seq}")
            pending[seq] = out
            self.metrics.claims_queued += 1
        else:
            out = Outgoing(seq, filled, body, headers, "")
            if not connected:
                pending[seq] = out
                self.metrics.claims_queued += 1
        return out

    # ------------------------------------------------------------------ publishing
    def keep(self, out: Outgoing) -> None:
        """``out`` could not be published (the connection is down): keep it for the reconnect."""
        self.pending.setdefault(out.seq, out)

    def published(self, out: Outgoing, now: float) -> bool:
        """``out`` was handed to the connection at local time ``now``.

        Returns:
            True in core mode: ``out`` now awaits the server's confirmation (confirm it) and
            left the queue (the outbox changed).
        """
        out.sent_at = now
        if self.mode != "core":
            return False  # kept until its PubAck
        self.pending.pop(out.seq, None)
        unconfirmed = self.unconfirmed
        if len(unconfirmed) >= self.outbox_size:
            unconfirmed.popleft()
            self.metrics.claims_unconfirmed += 1
        unconfirmed.append(out)
        return True

    def reconnected(self) -> list[Outgoing]:
        """The connection is back: the claims to re-publish, in order."""
        if self.mode == "jetstream" and self.pending:
            self.hold_new = True
        resend = list(self.pending.values())
        for out in resend:
            if out.sent_at is not None:
                self.metrics.claims_republished += 1
        return resend

    def disconnected(self) -> bool:
        """The connection dropped: core-mode claims not yet confirmed are written off (counted in
        ``claims_unconfirmed``), and confirmations under way are void.

        Returns:
            Whether claims were written off (the outbox changed).
        """
        self.generation += 1
        unconfirmed = self.unconfirmed
        if not unconfirmed:
            return False
        n = len(unconfirmed)
        unconfirmed.clear()
        self.metrics.claims_unconfirmed += n
        why = "just before the connection dropped"
        self.errors.note(
            f"{n} claim(s) sent {why} were not confirmed by the server and may be lost "
            f"(core NATS is at-most-once; a JetStream stream on {self.status_subject} makes "
            f"claims at-least-once)"
        )
        log.warning("%d claim(s) possibly lost (%s)", n, why)
        return True

    # ------------------------------------------------------------------ delivery
    def confirm(self, generation: int, batch: int) -> bool:
        """Core mode: the server answered a PING sent when the first ``batch`` unconfirmed claims
        were written, during connection ``generation``.

        Returns:
            Whether that confirms them (the connection did not drop meanwhile).
        """
        if generation != self.generation:
            return False
        unconfirmed = self.unconfirmed
        done = min(batch, len(unconfirmed))
        for _ in range(done):
            unconfirmed.popleft()
        self.metrics.claims_confirmed += done
        self.metrics.claims_ok += done
        return True

    def acked(self, token: str, data: bytes) -> Sequence[Outgoing] | None:
        """JetStream mode: a reply arrived on ``{ack_prefix}.{token}``.

        Returns:
            None when no claim was delivered by it (a refusal, a duplicate, a stray); else the
            claims to publish now (held ones released once every re-published one is in).
        """
        try:
            seq = int(token)
        except ValueError:
            self.errors.note(f"PubAck on an unexpected subject token {token!r}")
            return None
        ack: Any = None
        if data:
            with contextlib.suppress(WireError):
                ack = decode_json(data, "PubAck")
        pending = self.pending
        if not isinstance(ack, dict) or "error" in ack or "stream" not in ack:
            # a 503 (no JetStream responder: a stream still recovering or moving) or an error:
            # go back and re-publish every unacknowledged claim in order, holding new ones
            why = "no JetStream responder" if not data else repr(data[:120])
            self.errors.note(f"claim {seq} not acknowledged ({why}); re-publishing in order")
            if seq in pending:
                self.hold_new = self._resend_all = True
            return None
        if pending.pop(seq, None) is None:
            return None  # a duplicate ack (we re-published a claim the stream already had)
        self.metrics.claims_acked += 1
        self.metrics.claims_ok += 1
        if self.hold_new and all(o.sent_at is None for o in pending.values()):
            # every re-published claim is in: release the held ones, in order
            self.hold_new = False
            return list(pending.values())
        return _NOTHING_TO_SEND

    def due_for_retry(self, now: float) -> list[Outgoing]:
        """JetStream mode, connected: the claims to publish (again) at local time ``now``.

        Unacknowledged claims older than ``ack_timeout`` (all of them after a refusal) go again;
        claims queued while the connection was down go once nothing is held.
        """
        pending = self.pending
        if not pending:
            return []
        if self.hold_new and all(o.sent_at is None for o in pending.values()):
            self.hold_new = False  # nothing in flight to wait for (its publish never went out)
        cutoff = math.inf if self._resend_all else now - self.ack_timeout
        self._resend_all = False
        due = []
        for out in pending.values():
            if out.sent_at is not None and out.sent_at <= cutoff:
                self.metrics.claims_republished += 1
                due.append(out)
            elif out.sent_at is None and not self.hold_new:
                due.append(out)  # queued while the transport was down
        return due

    def close(self) -> None:
        """The client closes: core-mode claims never confirmed go back to :attr:`pending` (so
        :meth:`undelivered` lists them, oldest first) instead of being written off quietly."""
        for out in self.unconfirmed:
            self.pending[out.seq] = out
        self.unconfirmed.clear()
        self.pending = collections.OrderedDict(sorted(self.pending.items()))
