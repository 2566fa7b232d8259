"""The status-claim outbox, sans-IO: :class:`Outbox`.

Every claim a client emits is filled in (agent, beat, HLC, task id), encoded, signed, numbered and
given its JetStream dedup id (:func:`claim_msg_id`) here; the outbox then says whether to publish
it now and keeps each claim until it is delivered: acknowledged by JetStream (a PubAck on the
claim's own reply subject), or in core mode confirmed by a server PONG sent after it was written.
While the connection is down claims wait; after a reconnect they are re-published in order. A
claim the stream calls a duplicate although none of our own publishes of it can be stored is a
suspected id collision: never reported delivered, it is counted, logged and listed, with whatever
is still undelivered when the client closes, by :meth:`Outbox.undelivered`.

The caller does the publishing: it calls :meth:`Outbox.published` after a successful publish and
:meth:`Outbox.keep` after a failed one. Times are floats on the caller's monotonic clock.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import random
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

import msgspec

from .._errors import InvalidStatusClaim, NotConnected, WireError
from .edge import decode_json
from .hlc import HLC
from .metrics import ErrorLog
from .signing import HEADER_SIG
from .wire import StatusClaim, encode_claim

if TYPE_CHECKING:
    from .signing import Signer

__all__ = ["DeliveryMode", "Outbox", "Outgoing", "claim_msg_id"]

DeliveryMode = Literal["jetstream", "core"]

log = logging.getLogger("backbeat_trio.client")
#: Default task ids only need to differ, not to be secret: a PRNG seeded once from the OS saves
#: a system call per claim (``secrets.token_hex`` reads urandom every time).
_task_ids = random.Random(secrets.randbits(128))
#: copied per claim: a copy skips the lookup of the algorithm that each new hasher makes
_SHA256: Final = hashlib.sha256()


def claim_msg_id(agent_id: str, hlc: str, body: bytes, sig: str) -> str:
    """A claim's ``Nats-Msg-Id`` (SPEC): ``<agent_id>:<hlc>:<digest>``.

    ``digest`` is the first 16 lower-case hex characters of ``sha256(body + sig)``, so a peer
    cannot take the id of a claim it has not seen (an id made of agent and HLC alone can be
    guessed ahead and stored first, and the stream then drops the honest claim as a duplicate);
    a re-publish sends the same bytes and so the same id.

    Args:
        agent_id: the claim's agent.
        hlc: the claim's HLC stamp as written in the body.
        body: the exact published bytes.
        sig: the ASCII value of the ``Backbeat-Sig`` header, ``""`` when unsigned.
    """
    sha = _SHA256.copy()
    sha.update(body)
    sha.update(sig.encode("ascii"))
    return f"{agent_id}:{hlc}:{sha.hexdigest()[:16]}"


class Outgoing(msgspec.Struct):
    """One claim on its way: its outbox number, the claim as sent and its encoded form."""

    seq: int
    claim: StatusClaim
    body: bytes
    headers: dict[str, str]
    reply: str  # the PubAck inbox in JetStream mode, else ""
    sent_at: float | None = None  # local time of the last publish
    publishes: int = 0  # times handed to the connection
    refused: int = 0  # JetStream mode: replies saying a publish of it was not stored
    written: int = 0  # core mode: Outbox.written when it was last handed to the connection


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
        written: core mode: how many claims were handed to the connection so far; a PING sent
            when it is ``n`` confirms, with its PONG, only claims up to that count.
        collided: JetStream mode: claims the stream called duplicates while none of our own
            publishes of them can be stored (suspected id collisions), oldest first; undelivered.
        hold_new: JetStream mode: new claims wait until every re-published claim is acknowledged,
            so the stream stores claims in the order emitted.
        generation: counts disconnects; a confirmation started before one is void.
    """

    __slots__ = (
        "_resend_all",
        "ack_prefix",
        "ack_timeout",
        "agent_id",
        "collided",
        "default_task_id",
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
        "written",
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
        # the one task of this client's claims that name none: an estimate in one of them is
        # followed by the next (a task id of its own per claim would leave every estimate
        # unfinished, and the reverb would report each as overrun)
        self.default_task_id = f"task:{_task_ids.getrandbits(32):08x}"
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
        self.written = 0
        self.collided: list[Outgoing] = []
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
        """The claims not delivered (queued, unacknowledged or suspected collisions), oldest
        first."""
        if not self.collided:
            return [o.claim for o in self.pending.values()]
        outs = sorted([*self.pending.values(), *self.collided], key=lambda o: o.seq)
        return [o.claim for o in outs]

    # ------------------------------------------------------------------ claims in
    def admit(
        self, claim: StatusClaim, beat_index: int, *, connected: bool
    ) -> tuple[Outgoing, bool]:
        """Fill in, encode, sign and number one claim, and say whether to publish it now.

        It goes now when ``connected`` and nothing is held (:attr:`hold_new`); otherwise it
        waits here for the reconnect or the release.

        Args:
            claim: the user's claim (``type``, ``agent_id``, ``beat_index`` and ``hlc`` are
                filled in, and ``task_id`` when empty).
            beat_index: the current beat.
            connected: whether the connection is up (else the claim is queued).

        Returns:
            The claim as it will be sent, and whether to publish it now.

        Raises:
            InvalidStatusClaim: the claim breaks the contract; nothing was kept.
            NotConnected: the outbox is full.
        """
        if not isinstance(claim, StatusClaim):
            raise InvalidStatusClaim(
                f"emit_status needs a backbeat_trio.StatusClaim, got {type(claim).__name__}"
            )
        agent_id = self.agent_id
        hlc = self.hlc.now_text()
        filled = msgspec.structs.replace(
            claim,
            agent_id=agent_id,
            beat_index=beat_index,
            hlc=hlc,
            task_id=claim.task_id or self.default_task_id,
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
        headers["Nats-Msg-Id"] = claim_msg_id(agent_id, hlc, body, headers.get(HEADER_SIG, ""))
        self.seq = seq = self.seq + 1
        if self.mode == "jetstream":
            out = Outgoing(seq, filled, body, headers, f"{self.ack_prefix}.{seq}")
            pending[seq] = out
            self.metrics.claims_queued += 1
            return out, connected and not self.hold_new
        out = Outgoing(seq, filled, body, headers, "")
        if not connected:
            pending[seq] = out
            self.metrics.claims_queued += 1
        return out, connected

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
        out.publishes += 1
        if self.mode != "core":
            return False  # kept until its PubAck
        self.pending.pop(out.seq, None)
        self.written = out.written = self.written + 1
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
    def confirm(self, generation: int, written: int) -> bool:
        """Core mode: the server answered a PING sent when :attr:`written` was ``written``, during
        connection ``generation``.

        The PONG proves the server has what was written before the PING, nothing later: a claim
        written after it (past one the full queue wrote off) waits for the next PONG.

        Returns:
            Whether that confirms them (the connection did not drop meanwhile).
        """
        if generation != self.generation:
            return False
        unconfirmed = self.unconfirmed
        done = 0
        while unconfirmed and unconfirmed[0].written <= written:
            unconfirmed.popleft()
            done += 1
        self.metrics.claims_confirmed += done
        self.metrics.claims_ok += done
        return True

    def acked(self, token: str, data: bytes) -> Sequence[Outgoing] | None:
        """JetStream mode: a reply arrived on ``{ack_prefix}.{token}``.

        A duplicate ack for a claim none of whose other publishes can be in the stream (each was
        refused, or there was none) means another message holds its id: a suspected collision.
        The claim is not delivered: it leaves the queue for :attr:`collided`, is counted in
        ``claims_suspected_collisions`` and ``claims_failed``, noted and logged with its id.

        Returns:
            None when no claim was delivered by it (a refusal, a duplicate, a stray); else the
            claims to publish now (held ones released once every re-published one is in).
        """
        try:
            seq = int(token)
        except ValueError:
            self.errors.note(f"PubAck on an unexpected subject token {token!r}")
            return None
        # try/except, not contextlib.suppress: this runs once per claim
        try:
            ack: Any = decode_json(data, "PubAck") if data else None
        except WireError:
            ack = None  # not a PubAck: a refusal, as below
        pending = self.pending
        if not isinstance(ack, dict) or "error" in ack or "stream" not in ack:
            # a 503 (no JetStream responder: a stream still recovering or moving) or an error:
            # go back and re-publish every unacknowledged claim in order, holding new ones
            why = "no JetStream responder" if not data else repr(data[:120])
            self.errors.note(f"claim {seq} not acknowledged ({why}); re-publishing in order")
            refused = pending.get(seq)
            if refused is not None:
                refused.refused += 1
                self.hold_new = self._resend_all = True
            return None
        out = pending.pop(seq, None)
        if out is None:
            return None  # a duplicate ack (we re-published a claim the stream already had)
        if ack.get("duplicate") is True and out.publishes - out.refused <= 1:
            self._collided(out, ack)
        else:
            self.metrics.claims_acked += 1
            self.metrics.claims_ok += 1
        if self.hold_new and all(o.sent_at is None for o in pending.values()):
            # every re-published claim is in: release the held ones, in order
            self.hold_new = False
            return list(pending.values())
        return _NOTHING_TO_SEND

    def _collided(self, out: Outgoing, ack: dict[str, Any]) -> None:
        # Re-publishing the same bytes would meet the same id; a fresh HLC would send a claim
        # other than the one emit_status returned. So it fails loudly: undelivered, not retried.
        self.collided.append(out)
        self.metrics.claims_suspected_collisions += 1
        self.metrics.claims_failed += 1
        msg_id = out.headers["Nats-Msg-Id"]
        self.errors.note(
            f"claim {msg_id} refused as a duplicate on its first publish (stream seq "
            f"{ack.get('seq')!r}): suspected id collision; the claim is not delivered"
        )
        log.warning(
            "suspected Nats-Msg-Id collision: the stream already holds %s (seq %r), which this "
            "client never stored; the claim is reported undelivered",
            msg_id,
            ack.get("seq"),
        )

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
