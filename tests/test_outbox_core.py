"""The claim outbox core (sans-IO): under any interleaving of emit, publish loss, disconnect,
reconnect, PING/PONG and PubAcks, every claim is delivered, still pending, or reported as
possibly lost (core mode, counted) -- never silently lost, never stored twice."""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, field

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backbeat_trio._core.hlc import HLC
from backbeat_trio._core.metrics import ClientMetrics, ErrorLog
from backbeat_trio._core.outbox import Outbox, Outgoing
from backbeat_trio._core.signing import Keyring, Signer, generate_signing_key, verify_claim
from backbeat_trio._core.wire import StatusClaim
from backbeat_trio._errors import InvalidStatusClaim, NotConnected

ACK_TIMEOUT = 2.0
ACK = b'{"stream":"BACKBEAT_STATUS_c","seq":1}'
DUP_ACK = b'{"stream":"BACKBEAT_STATUS_c","seq":1,"duplicate":true}'
CLAIM = StatusClaim(state="executing", beats_left=3, progress=0.5, notes="n")


def new_outbox(
    size: int = 1000, *, jetstream: bool = False, signer: Signer | None = None
) -> Outbox:
    outbox = Outbox(
        agent_id="agent-1",
        status_subject="backbeat.status.c",
        outbox_size=size,
        ack_timeout=ACK_TIMEOUT,
        hlc=HLC("agent-1"),
        signer=signer,
        errors=ErrorLog(ClientMetrics()),
    )
    if jetstream:
        outbox.use_jetstream("_INBOX.test.ack")
    return outbox


@dataclass
class Model:
    """Drives an Outbox the way ``ClaimDelivery`` does, over a lossy model of NATS.

    Core NATS: what is written reaches the server in order unless the connection drops first; a
    PONG proves everything written before its PING arrived. JetStream: the stream stores each
    ``Nats-Msg-Id`` once and answers every publish it receives with a PubAck (saying
    ``duplicate`` when it already held the id, as nats-server does).
    """

    outbox: Outbox
    connected: bool = True
    now: float = 0.0
    emitted: list[int] = field(default_factory=list)
    wire: list[Outgoing] = field(default_factory=list)  # written, not yet at the server
    received: list[int] = field(default_factory=list)  # core: every seq the server got
    stored: dict[str, int] = field(default_factory=dict)  # jetstream: msg id -> seq
    acks: list[tuple[int, bytes]] = field(default_factory=list)  # jetstream: (seq, reply)
    refusing: int = 0  # jetstream: the next arrivals the stream refuses (not stored, a 503)
    ping: tuple[int, int] | None = None  # (generation, written) of a PING awaiting its PONG
    delivered: set[int] = field(default_factory=set)  # confirmed or acked by the outbox
    written_off: set[int] = field(default_factory=set)  # reported as possibly lost

    @property
    def jetstream(self) -> bool:
        return self.outbox.mode == "jetstream"

    def send(self, out: Outgoing) -> None:
        if not self.connected:
            self.outbox.keep(out)
            return
        self.wire.append(out)
        self.outbox.published(out, self.now)

    def emit(self) -> None:
        try:
            out, send_now = self.outbox.admit(CLAIM, 7, connected=self.connected)
        except NotConnected:
            return
        self.emitted.append(out.seq)
        assert send_now == (self.connected and not self.outbox.hold_new)
        if send_now:
            self.send(out)

    def arrive(self, n: int) -> None:
        """The first ``n`` written messages reach the server, in order."""
        for out in self.wire[:n]:
            if self.jetstream:
                msg_id = out.headers["Nats-Msg-Id"]
                if self.refusing:
                    self.refusing -= 1
                    self.acks.append((out.seq, b""))
                else:
                    self.acks.append((out.seq, DUP_ACK if msg_id in self.stored else ACK))
                    self.stored.setdefault(msg_id, out.seq)
            else:
                self.received.append(out.seq)
        del self.wire[:n]

    def disconnect(self) -> None:
        if not self.connected:
            return
        self.connected = False
        self.wire.clear()  # what was still in the socket is gone
        self.acks.clear()
        self.outbox.disconnected()

    def reconnect(self) -> None:
        if self.connected:
            return
        self.connected = True
        for out in self.outbox.reconnected():
            self.send(out)
        # everything that waited is on its way again, in order (JetStream keeps it until acked)
        if self.jetstream:
            assert list(self.outbox.pending) == [o.seq for o in self.wire]
        else:
            assert not self.outbox.pending

    def start_ping(self) -> None:
        if not self.jetstream and self.connected and self.outbox.unconfirmed and not self.ping:
            self.ping = (self.outbox.generation, self.outbox.written)

    def pong(self) -> None:
        """The PING's answer: on a live connection everything written before it arrived."""
        if self.ping is None or not self.connected:
            return
        generation, written = self.ping
        self.ping = None
        self.arrive(len(self.wire))
        assert self.outbox.confirm(generation, written) == (generation == self.outbox.generation)

    def ack(self, k: int) -> None:
        if not self.acks:
            return
        seq, reply = self.acks.pop(k % len(self.acks))
        release = self.outbox.acked(str(seq), reply)
        for out in release or ():
            self.send(out)

    def tick(self, dt: float) -> None:
        self.now += dt
        if self.connected and self.jetstream:  # the ack-listener's periodic retry
            for out in self.outbox.due_for_retry(self.now):
                self.send(out)

    def step(self, action: str, arg: int) -> None:
        metrics = self.outbox.metrics
        before = self.open_seqs() | set()
        counts = (metrics.claims_confirmed, metrics.claims_acked, metrics.claims_unconfirmed)
        n_emitted = len(self.emitted)
        if action == "emit":
            for _ in range(arg % 4 + 1):
                self.emit()
        elif action == "arrive":
            self.arrive(arg)
        elif action == "ack":
            self.ack(arg)
        elif action == "refuse":
            self.refusing = arg % 3 + 1
        elif action == "tick":
            self.tick(arg * 0.5)
        else:
            getattr(self, action)()
        # what left the outbox in this step left it one way, and is counted that way
        gone = (before | set(self.emitted[n_emitted:])) - self.open_seqs()
        confirmed = metrics.claims_confirmed - counts[0]
        acked = metrics.claims_acked - counts[1]
        lost = metrics.claims_unconfirmed - counts[2]
        assert len(gone) == confirmed + acked + lost
        assert sum(1 for c in (confirmed, acked, lost) if c) <= 1
        if confirmed or acked:
            server = set(self.stored.values()) if self.jetstream else set(self.received)
            assert gone <= server, "delivered claims the server never got"
            self.delivered |= gone
        else:
            self.written_off |= gone
        self.check()

    def open_seqs(self) -> set[int]:
        return set(self.outbox.pending) | {o.seq for o in self.outbox.unconfirmed}

    def check(self) -> None:
        outbox, metrics = self.outbox, self.outbox.metrics
        pending = list(outbox.pending)
        unconfirmed = [o.seq for o in outbox.unconfirmed]
        # nothing is in two places, nothing counted twice, nothing vanished
        assert len(set(pending)) == len(pending)
        assert len(set(unconfirmed)) == len(unconfirmed)
        assert not set(pending) & set(unconfirmed)
        assert not self.delivered & self.written_off
        assert self.open_seqs() | self.delivered | self.written_off == set(self.emitted)
        assert len(self.emitted) == (
            len(pending)
            + len(unconfirmed)
            + metrics.claims_confirmed
            + metrics.claims_acked
            + metrics.claims_unconfirmed
        )
        assert metrics.claims_ok == metrics.claims_confirmed + metrics.claims_acked
        if self.jetstream:
            assert not unconfirmed
            assert metrics.claims_unconfirmed == 0
            assert not self.written_off
            # an honest run never looks like an id collision, duplicate acks or not
            assert metrics.claims_suspected_collisions == 0
            assert not outbox.collided
        else:
            # core NATS is at-most-once: a claim is written once, never re-published
            assert len(self.received) == len(set(self.received))
            assert metrics.claims_acked == 0


ACTIONS = ["emit", "arrive", "disconnect", "reconnect", "start_ping", "pong", "tick"]
JS_ACTIONS = ["emit", "arrive", "disconnect", "reconnect", "ack", "refuse", "tick"]
SIZES = st.integers(1, 12)


def runs_of(actions: list[str]) -> st.SearchStrategy[list[tuple[str, int]]]:
    """Up to 60 steps drawn from ``actions``, each with a small argument."""
    return st.lists(st.tuples(st.sampled_from(actions), st.integers(0, 6)), max_size=60)


def model_after(steps: list[tuple[str, int]], size: int, *, jetstream: bool = False) -> Model:
    """A model of an outbox holding ``size`` claims, after ``steps`` (each checked on the way)."""
    model = Model(new_outbox(size, jetstream=jetstream))
    for action, arg in steps:
        model.step(action, arg)
    return model


@settings(max_examples=300, deadline=None)
@given(steps=runs_of(ACTIONS), size=SIZES)
def test_core_mode_every_claim_is_confirmed_pending_or_reported(
    steps: list[tuple[str, int]], size: int
) -> None:
    model = model_after(steps, size)
    # then the connection is back and PONGs come: nothing stays queued or unconfirmed
    model.step("reconnect", 0)
    model.step("pong", 0)
    model.step("start_ping", 0)
    model.step("pong", 0)
    assert not model.outbox.busy
    assert model.delivered | model.written_off == set(model.emitted)
    model.step("emit", 0)
    # closing lists every claim not confirmed, oldest first (written-off ones were reported)
    still_open = sorted(model.open_seqs())
    model.outbox.close()
    assert [c.hlc for c in model.outbox.undelivered()] == [
        model.outbox.pending[s].claim.hlc for s in still_open
    ]
    assert list(model.outbox.pending) == still_open
    assert not model.outbox.unconfirmed


@settings(max_examples=300, deadline=None)
@given(steps=runs_of(JS_ACTIONS), size=SIZES)
def test_jetstream_every_claim_is_acked_once_or_still_pending(
    steps: list[tuple[str, int]], size: int
) -> None:
    model = model_after(steps, size, jetstream=True)
    # then the network heals: every claim ends up stored once and acknowledged
    for _ in range(size + 4):
        for action in ("reconnect", "arrive", "tick"):
            model.step(action, 99 if action == "arrive" else 5)
        while model.acks:
            model.step("ack", 0)
    assert not model.outbox.pending
    assert not model.outbox.hold_new
    assert model.delivered == set(model.emitted)
    assert sorted(model.stored.values()) == sorted(model.emitted)


def test_a_full_outbox_refuses_and_counts() -> None:
    outbox = new_outbox(2)
    for _ in range(2):
        assert not outbox.admit(CLAIM, 0, connected=False)[1]
    with pytest.raises(NotConnected, match="outbox full"):
        outbox.admit(CLAIM, 0, connected=False)
    assert outbox.metrics.claims_failed == 1
    assert list(outbox.pending) == [1, 2]  # the refused one took no number


def test_admit_fills_in_the_claim_and_its_dedup_id() -> None:
    key = generate_signing_key()
    outbox = new_outbox(jetstream=True, signer=Signer(key, "agent-1"))
    out, send_now = outbox.admit(StatusClaim(state="done"), 42, connected=True)
    assert send_now
    claim = out.claim
    assert (claim.agent_id, claim.beat_index) == ("agent-1", 42)
    assert claim.task_id.startswith("task:")
    assert len(claim.task_id) == len("task:") + 8
    sig = out.headers["Backbeat-Sig"].encode()
    digest = hashlib.sha256(out.body + sig).hexdigest()[:16]
    assert out.headers["Nats-Msg-Id"] == f"agent-1:{claim.hlc}:{digest}"
    assert out.reply == "_INBOX.test.ack.1"
    assert msgspec.json.decode(out.body)["hlc"] == claim.hlc
    verify_claim(out.body, out.headers, Keyring({"agent-1": key.verify_key}))
    with pytest.raises(InvalidStatusClaim):
        outbox.admit("not a claim", 0, connected=True)  # type: ignore[arg-type]
    assert outbox.seq == 1


def test_hlc_stamps_and_sequence_numbers_only_grow() -> None:
    outbox = new_outbox()
    outs = [outbox.admit(CLAIM, 0, connected=False)[0] for _ in range(50)]
    assert [o.seq for o in outs] == list(range(1, 51))
    ids = [o.headers["Nats-Msg-Id"] for o in outs]
    assert len(set(ids)) == 50
    stamps = [tuple(int(p, 16) for p in o.claim.hlc.split(":")) for o in outs]
    assert stamps == sorted(stamps)


def test_a_refused_publish_holds_new_claims_until_the_resent_ones_are_in() -> None:
    model = Model(new_outbox(jetstream=True))
    for _ in range(3):
        model.emit()
    model.refusing = 1  # seq 1: no JetStream responder (not stored)
    model.arrive(3)
    assert model.acks == [(1, b""), (2, ACK), (3, ACK)]
    model.ack(0)
    assert model.outbox.hold_new
    model.emit()  # held: it must not overtake the claims being re-published
    assert [o.seq for o in model.wire] == []
    model.tick(0.0)  # the retry re-publishes every unacknowledged claim, in order
    assert [o.seq for o in model.wire] == [1, 2, 3]
    model.acks.clear()
    model.arrive(3)
    assert model.acks == [(1, ACK), (2, DUP_ACK), (3, DUP_ACK)]
    for _ in range(3):
        model.ack(0)
    assert not model.outbox.hold_new
    assert model.outbox.metrics.claims_acked == 3  # duplicates of a re-publish: delivered
    assert [o.seq for o in model.wire] == [4]  # released once the others were in
    counts = collections.Counter(model.stored.values())
    assert set(counts.values()) == {1}


def test_a_pong_confirms_only_claims_written_before_its_ping() -> None:
    outbox = new_outbox(1)
    first, _ = outbox.admit(CLAIM, 0, connected=True)
    outbox.published(first, 0.0)
    generation, written = outbox.generation, outbox.written  # the PING goes out
    second, _ = outbox.admit(CLAIM, 0, connected=True)
    outbox.published(second, 0.0)  # overflows: the first is written off as possibly lost
    assert outbox.metrics.claims_unconfirmed == 1
    assert outbox.confirm(generation, written)
    # the PONG proves only what was written before the PING: the second is not confirmed yet
    assert [o.seq for o in outbox.unconfirmed] == [second.seq]
    assert (outbox.metrics.claims_confirmed, outbox.metrics.claims_ok) == (0, 0)
    assert outbox.confirm(generation, outbox.written)  # the next PING's PONG does
    assert not outbox.unconfirmed
    assert outbox.metrics.claims_confirmed == 1


def test_after_a_reconnect_new_claims_wait_for_the_republished_ones() -> None:
    model = Model(new_outbox(jetstream=True))
    model.emit()
    model.emit()
    model.disconnect()  # both lost in the socket; kept for their PubAck
    model.reconnect()
    assert model.outbox.hold_new
    assert [o.seq for o in model.wire] == [1, 2]
    model.emit()  # must not be stored before 1 and 2
    assert [o.seq for o in model.wire] == [1, 2]
    model.arrive(2)
    model.ack(0)
    assert [o.seq for o in model.wire] == []
    model.ack(0)
    assert [o.seq for o in model.wire] == [3]
    assert model.outbox.metrics.claims_republished == 2


def test_claims_that_name_no_task_are_of_the_clients_one_default_task() -> None:
    outbox = new_outbox(jetstream=True)
    first, _ = outbox.admit(StatusClaim(state="executing", beats_left=3), 1, connected=True)
    second, _ = outbox.admit(StatusClaim(state="done"), 2, connected=True)
    named, _ = outbox.admit(StatusClaim(task_id="t-9", state="done"), 3, connected=True)
    assert first.claim.task_id == second.claim.task_id == outbox.default_task_id
    assert named.claim.task_id == "t-9"
    assert new_outbox().default_task_id != outbox.default_task_id
