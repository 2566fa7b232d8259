"""Claim dedup ids a peer cannot predict (SPEC: ``Nats-Msg-Id: <agent_id>:<hlc>:<digest>``).

The id against a golden vector computed here with hashlib; a duplicate PubAck on a claim's first
publish is a suspected collision (counted, logged, reported undelivered, never delivered); over a
real nats-server a re-publish after a reconnect keeps its id (the stream holds the claim once),
and a peer publishing ``{}`` under the ids an agent will use next takes none of its claims.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
import trio_asyncio

import backbeat_trio as bb3
import backbeat_trio._core.outbox as outbox_module
import backbeat_trio.testing as bbt
from backbeat_trio._core.hlc import HLC, node_id_for
from backbeat_trio._core.metrics import ClientMetrics, ErrorLog
from backbeat_trio._core.outbox import Outbox, Outgoing, claim_msg_id
from backbeat_trio._core.signing import Signer, generate_signing_key
from backbeat_trio._core.wire import StatusClaim
from backbeat_trio._embedded import NatsServerProcess
from backbeat_trio.testing.memory import MemoryMessage
from tests.test_client_nats import add_stream, plain_nats

CLAIM = StatusClaim(state="executing", beats_left=3, progress=0.5, notes="n")
ACK = b'{"stream":"BACKBEAT_STATUS_c","seq":7}'
DUP_ACK = b'{"stream":"BACKBEAT_STATUS_c","seq":7,"duplicate":true}'


def new_outbox(*, signer: Signer | None = None) -> Outbox:
    outbox = Outbox(
        agent_id="agent-1",
        status_subject="backbeat.status.c",
        outbox_size=100,
        ack_timeout=2.0,
        hlc=HLC("agent-1"),
        signer=signer,
        errors=ErrorLog(ClientMetrics()),
    )
    outbox.use_jetstream("_INBOX.test.ack")
    return outbox


def sent(outbox: Outbox) -> Outgoing:
    """One claim admitted and published once."""
    out, send_now = outbox.admit(CLAIM, 3, connected=True)
    assert send_now
    outbox.published(out, 0.0)
    return out


# --- the id ---------------------------------------------------------------------------------------
def test_the_id_matches_a_golden_vector() -> None:
    body = b'{"type":"backbeat.statusclaim.v1","agent_id":"agent-1"}'
    sig = "c2lnbmF0dXJl"
    # sha256(body + sig), worked out apart from the SDK (also: printf '%s' ... | sha256sum)
    digest = hashlib.sha256(
        b'{"type":"backbeat.statusclaim.v1","agent_id":"agent-1"}c2lnbmF0dXJl'
    ).hexdigest()
    assert digest[:16] == "1cff28271be06831"
    hlc = "0000018c2f3a:0001:00ab"
    assert claim_msg_id("agent-1", hlc, body, sig) == f"agent-1:{hlc}:1cff28271be06831"
    # unsigned: sig is empty
    plain = hashlib.sha256(body).hexdigest()[:16]
    assert claim_msg_id("agent-1", hlc, body, "") == f"agent-1:{hlc}:{plain}"


@pytest.mark.parametrize("signed", [False, True])
def test_admit_stamps_the_spec_id_on_the_exact_bytes(signed: bool) -> None:
    signer = Signer(generate_signing_key(), "agent-1") if signed else None
    outbox = new_outbox(signer=signer)
    out, _ = outbox.admit(CLAIM, 3, connected=True)
    sig = out.headers.get("Backbeat-Sig", "")
    assert bool(sig) == signed
    digest = hashlib.sha256(out.body + sig.encode("ascii")).hexdigest()[:16]
    assert out.headers["Nats-Msg-Id"] == f"agent-1:{out.claim.hlc}:{digest}"
    assert len(digest) == 16
    assert digest == digest.lower()
    # two claims in one HLC tick of another agent would not share it: the bytes differ
    other, _ = outbox.admit(CLAIM, 3, connected=True)
    assert other.headers["Nats-Msg-Id"] != out.headers["Nats-Msg-Id"]


# --- a duplicate PubAck on a first publish --------------------------------------------------------
def test_a_duplicate_ack_on_a_first_publish_is_a_suspected_collision(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outbox = new_outbox()
    first, second = sent(outbox), sent(outbox)
    with caplog.at_level(logging.WARNING, logger="backbeat_trio.client"):
        assert outbox.acked(str(first.seq), DUP_ACK) is not None
    metrics = outbox.metrics
    assert metrics.claims_suspected_collisions == 1
    assert metrics.claims_failed == 1
    assert (metrics.claims_acked, metrics.claims_ok) == (0, 0)  # never reported delivered
    msg_id = first.headers["Nats-Msg-Id"]
    assert msg_id in caplog.text
    assert "collision" in caplog.text
    assert any(msg_id in e and "collision" in e for e in outbox.errors.recent)
    # not waited for (flush returns), but listed as undelivered, in order with the rest
    assert list(outbox.pending) == [second.seq]
    assert [c.hlc for c in outbox.undelivered()] == [first.claim.hlc, second.claim.hlc]
    assert outbox.acked(str(second.seq), ACK) is not None
    assert not outbox.busy
    assert [c.hlc for c in outbox.undelivered()] == [first.claim.hlc]
    outbox.close()
    assert [c.hlc for c in outbox.undelivered()] == [first.claim.hlc]


def test_a_duplicate_ack_after_a_re_publish_is_the_first_publish_landing() -> None:
    outbox = new_outbox()
    out = sent(outbox)
    assert outbox.reconnected() == [out]  # its PubAck was lost with the connection
    outbox.published(out, 1.0)
    assert outbox.acked(str(out.seq), DUP_ACK) is not None
    assert outbox.metrics.claims_acked == 1
    assert outbox.metrics.claims_suspected_collisions == 0
    assert not outbox.undelivered()


def test_a_duplicate_ack_when_every_other_publish_was_refused_is_a_collision() -> None:
    outbox = new_outbox()
    out = sent(outbox)
    assert outbox.acked(str(out.seq), b"") is None  # a 503: that publish was not stored
    assert [o.seq for o in outbox.due_for_retry(0.0)] == [out.seq]
    outbox.published(out, 0.0)
    outbox.acked(str(out.seq), DUP_ACK)
    assert outbox.metrics.claims_suspected_collisions == 1
    assert outbox.metrics.claims_acked == 0
    assert [c.hlc for c in outbox.undelivered()] == [out.claim.hlc]


@contextlib.contextmanager
def ids_fixed_to(msg_id: Callable[[str, str, bytes, str], str]) -> Iterator[None]:
    """Give claims ids a peer can take (as v1's were), to see the SDK catch the collision."""
    real = outbox_module.claim_msg_id
    outbox_module.claim_msg_id = msg_id
    try:
        yield
    finally:
        outbox_module.claim_msg_id = real


async def test_a_client_reports_collided_claims_undelivered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cluster_id = "claim-ids"
    emitted: list[bb3.StatusClaim] = []
    metrics: list[ClientMetrics] = []
    with ids_fixed_to(lambda agent, hlc, body, sig: f"{agent}:taken"):
        async with bbt.open_fake_cluster(cluster_id, tempo_bpm=60, jetstream=True) as cluster:
            # the peer's message straight into the stream (the fake cluster's own claim
            # collector reads the core subject, and refuses `{}`)
            stream = cluster.broker.streams[f"BACKBEAT_STATUS_{cluster_id}"]
            subject = f"backbeat.status.{cluster_id}"
            stream.store(MemoryMessage(subject, b"{}", headers={"Nats-Msg-Id": "agent-1:taken"}))

            async def agent() -> None:
                async with cluster.open_client() as bb:
                    assert bb.delivery_mode == "jetstream"
                    for i in range(3):
                        emitted.append(await bb.emit_status(bb3.StatusClaim(notes=str(i))))
                    with trio.fail_after(30):
                        await bb.flush_claims()  # returns: nothing left it could deliver
                    metrics.append(bb.metrics)
                    assert [c.hlc for c in bb.undelivered()] == [c.hlc for c in emitted]
                    assert bb.health().metrics["claims_suspected_collisions"] == 3
                    exported = {
                        sample.name: sample.value
                        for family in bb3.client_collector([bb]).collect()
                        for sample in family.samples
                    }
                    name = "backbeat_client_claims_suspected_collisions_total"
                    assert exported[name] == 3

            with pytest.raises(bb3.UndeliveredClaims) as caught:
                await agent()
            assert [m.data for m in stream.messages] == [b"{}"]
    m = metrics[0]
    assert (m.claims_suspected_collisions, m.claims_acked, m.claims_ok) == (3, 0, 0)
    assert [c.hlc for c in caught.value.claims] == [c.hlc for c in emitted]


# --- over a real nats-server ----------------------------------------------------------------------


async def stored(nc: Any, stream: str) -> list[tuple[str, bytes]]:
    """Every stored message as (Nats-Msg-Id, body), in stream order."""

    async def read() -> list[tuple[str, bytes]]:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            out.append((msg.headers["Nats-Msg-Id"], msg.data))
        return out

    return await trio_asyncio.aio_as_trio(read)()


def client_config(url: str, cluster: str) -> bb3.Config:
    return bb3.Config(cluster_id=cluster, agent_id="agent-1", nats_url=url, reconnect_delay=0.05)


@pytest.mark.nats
async def test_a_re_publish_after_a_reconnect_keeps_the_id(
    nats_server: NatsServerProcess, nats_url: str
) -> None:
    cluster = "ids-reconnect"
    emitted: list[bb3.StatusClaim] = []
    ids_per_send: list[tuple[int, str]] = []
    async with trio_asyncio.open_loop():
        async with plain_nats(nats_url) as nc:
            stream = await add_stream(nc, cluster)
        async with bb3.open_client(client_config(nats_url, cluster)) as bb:
            assert bb.delivery_mode == "jetstream"
            delivery = bb._delivery
            real_send, real_on_ack = delivery.send, delivery.on_ack

            def send(out: Outgoing, now: float | None = None) -> None:
                ids_per_send.append((out.seq, out.headers["Nats-Msg-Id"]))
                real_send(out, now)

            delivery.send = send  # type: ignore[method-assign]
            delivery.on_ack = lambda token, data: None  # type: ignore[method-assign]
            for i in range(5):
                emitted.append(await bb.emit_status(bb3.StatusClaim(notes=str(i))))
            with trio.fail_after(10):
                async with plain_nats(nats_url) as nc:
                    # landed, their acks unheard: only the server's stream can say when
                    while len(await stored(nc, stream)) < 5:  # noqa: ASYNC110
                        await trio.sleep(0.02)
            assert bb.pending_claims == 5
            nats_server.kill()
            with trio.fail_after(15):
                await bb.wait_connected(False)
            await trio.to_thread.run_sync(nats_server.restart)
            delivery.on_ack = real_on_ack  # type: ignore[method-assign]
            with trio.fail_after(15):
                await bb.wait_connected(True)
            with trio.fail_after(20):
                await bb.flush_claims()
            health = bb.health()
        async with plain_nats(nats_url) as nc:
            in_stream = await stored(nc, stream)
    by_seq: dict[int, set[str]] = {}
    for seq, msg_id in ids_per_send:
        by_seq.setdefault(seq, set()).add(msg_id)
    assert all(len(ids) == 1 for ids in by_seq.values())  # every publish of a claim: one id
    assert len(ids_per_send) >= 10  # each of the 5 went again after the reconnect
    assert [msg_id for msg_id, _ in in_stream] == [by_seq[s].pop() for s in sorted(by_seq)]
    hlcs = [msgspec.json.decode(body)["hlc"] for _, body in in_stream]
    assert hlcs == [c.hlc for c in emitted]  # each claim once, in order
    assert health.metrics["claims_acked"] == 5
    assert health.metrics["claims_republished"] >= 5
    assert health.metrics["claims_suspected_collisions"] == 0


def guessed_ids(agent: str, start_ms: int, span_ms: int) -> list[str]:
    """The ids a peer can compute ahead for ``agent``'s claims in the next ``span_ms``: v1's
    ``<agent>:<hlc>`` and, under the new form, the same with digests it can think of."""
    node = node_id_for(agent)
    guesses = ("0" * 16, "f" * 16, hashlib.sha256(b"{}").hexdigest()[:16])
    ids = []
    for ms in range(start_ms, start_ms + span_ms):
        for counter in (0, 1):
            hlc = f"{ms:012x}:{counter:04x}:{node:04x}"
            ids.append(f"{agent}:{hlc}")
            if counter == 0:
                ids.extend(f"{agent}:{hlc}:{g}" for g in guesses)
    return ids


async def preempt(nc: Any, subject: str, ids: list[str]) -> None:
    """The peer: ``{}`` under every id, as plain core publishes the stream captures."""

    async def flood() -> None:
        for msg_id in ids:
            await nc.publish(subject, b"{}", headers={"Nats-Msg-Id": msg_id})
        await nc.flush()

    await trio_asyncio.aio_as_trio(flood)()


async def attacked_run(
    url: str, cluster: str
) -> tuple[list[bb3.StatusClaim], ClientMetrics, Any, list[tuple[str, bytes]]]:
    """A peer takes the ids agent-1 would use in the next 1.5 s; agent-1 emits 31 claims in them.

    Returns the claims, the client's metrics, its health (or the UndeliveredClaims it raised)
    and what the stream holds besides the peer's messages.
    """
    emitted: list[bb3.StatusClaim] = []
    metrics = ClientMetrics()
    outcome: Any = None
    async with plain_nats(url) as nc:
        stream = await add_stream(nc, cluster)
        start_ms = time.time_ns() // 1_000_000 + 300
        await preempt(nc, f"backbeat.status.{cluster}", guessed_ids("agent-1", start_ms, 1500))
    try:
        async with bb3.open_client(client_config(url, cluster)) as bb:
            assert bb.delivery_mode == "jetstream"
            metrics = bb.metrics
            await trio.sleep(max(0.0, start_ms / 1000 - time.time()))
            for i in range(31):
                emitted.append(await bb.emit_status(bb3.StatusClaim(notes=f"honest {i}")))
                await trio.sleep(0.045)
            with trio.fail_after(20):
                await bb.flush_claims()
            outcome = bb.health()
    except bb3.UndeliveredClaims as exc:
        outcome = exc
    async with plain_nats(url) as nc:
        in_stream = await stored(nc, stream)
    return emitted, metrics, outcome, [(i, body) for i, body in in_stream if body != b"{}"]


@pytest.mark.nats
async def test_a_peer_cannot_preempt_claims_by_guessing_their_ids(nats_url: str) -> None:
    async with trio_asyncio.open_loop():
        emitted, metrics, health, honest = await attacked_run(nats_url, "ids-attack")
    assert isinstance(health, bb3.HealthStatus), f"claims undelivered: {health!r}"
    # every honest claim is in the stream exactly once, with its own bytes
    hlcs = [msgspec.json.decode(body).get("hlc") for _, body in honest]
    assert hlcs == [c.hlc for c in emitted]
    assert metrics.claims_acked == 31
    assert metrics.claims_suspected_collisions == 0


@pytest.mark.nats
async def test_with_guessable_ids_no_claim_is_reported_delivered_that_was_not(
    nats_url: str,
) -> None:
    # v1's ids, which the peer can take: the collisions are counted and the claims they cost
    # are reported undelivered; what is reported delivered is what the stream holds
    with ids_fixed_to(lambda agent, hlc, body, sig: f"{agent}:{hlc}"):
        async with trio_asyncio.open_loop():
            emitted, metrics, outcome, honest = await attacked_run(nats_url, "ids-v1")
    in_stream = [msgspec.json.decode(body).get("hlc") for _, body in honest]
    assert isinstance(outcome, bb3.UndeliveredClaims)  # the peer took some: the SDK says so
    undelivered = [c.hlc for c in outcome.claims]
    assert undelivered
    assert sorted(undelivered + in_stream) == sorted(c.hlc for c in emitted)
    assert metrics.claims_suspected_collisions == len(undelivered)
    assert metrics.claims_acked == len(in_stream) == len(emitted) - len(undelivered)
