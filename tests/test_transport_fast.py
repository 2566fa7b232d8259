"""The transport's fast paths through nats-py internals, over a real nats-server.

On the nats-py versions they were checked against, a core subscription skips nats-py's
per-subscription task, a publish with nothing queued is written at once and the publishes after
it in the same trio batch go out with one write when the batch ends. These
tests pin that the fast paths are really taken there (a nats-py upgrade that turns them off must
be noticed) and that they keep every guarantee of the general path: order, counted overflow, and
bytes nats-py queued first (SUB) still going first.
"""

from __future__ import annotations

import os
from typing import Any

import nats.aio.client
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from backbeat_trio._bridge._natspy_private import (
    _DIRECT_NATS_VERSIONS,
    FAST_ENV,
    DirectPending,
    fast_path_enabled,
)
from backbeat_trio._bridge.nats import NatsTransport, open_nats_transport
from backbeat_trio._client.config import Config

pytestmark = pytest.mark.nats

PINNED = str(nats.aio.client.__version__).startswith(_DIRECT_NATS_VERSIONS)
# the fast paths are taken: the pinned nats-py, unless BACKBEAT_TRIO_NATS_FAST=0 forces the
# public path (tests/test_public_path.py covers that path on its own)
FAST = fast_path_enabled()


def conn(name: str, url: str) -> Config:
    return Config(cluster_id="fast", agent_id=name, nats_url=url)


def direct_subscriptions(transport: NatsTransport) -> int:
    return sum(isinstance(s._pending_queue, DirectPending) for s in transport._nc._subs.values())


def test_the_fast_paths_are_on_for_the_pinned_nats_py() -> None:
    if not PINNED:
        pytest.skip(
            f"nats-py {nats.aio.client.__version__} is not one the fast paths were checked "
            f"against ({_DIRECT_NATS_VERSIONS}); the general path is used"
        )
    if os.environ.get(FAST_ENV) == "0":
        pytest.skip(f"{FAST_ENV}=0 forces the public path")
    assert fast_path_enabled()


async def test_mixed_publishes_arrive_in_order(nats_url: str) -> None:
    # most messages may be written at once (or join their batch's write); one whose header value
    # nats-py would rewrite (it strips the trailing space) goes through the drainer's queue, and
    # the messages behind it with it: whichever path each takes, the receiver sees the order
    # they were sent in
    n = 3000
    async with (
        open_nats_transport(conn("rx", nats_url)) as rx,
        open_nats_transport(conn("tx", nats_url)) as tx,
    ):
        sub = await rx.subscribe("fast.order", buffer=n)
        assert direct_subscriptions(rx) == (1 if FAST else 0)
        await rx.flush()
        for i in range(n):
            headers = {"Seq": f"{i} "} if i % 7 == 0 else {"Seq": str(i)} if i % 7 == 1 else None
            tx.publish("fast.order", str(i).encode(), headers=headers)
            if i % 500 == 0:
                await trio.sleep(0.001)  # let the drainer go idle now and then
        await tx.flush()
        got: list[int] = []
        with trio.fail_after(10):
            while len(got) < n:
                msg = await sub.messages.receive()
                got.append(int(msg.data))
        assert got == list(range(n))
        assert sub.dropped == 0
        assert tx.published == n
        if FAST:  # every path was taken
            assert 0 < tx.joined_writes < tx.direct_writes < n - n // 7


async def test_a_subscription_then_a_publish_on_one_connection(nats_url: str) -> None:
    # the SUB nats-py queued must reach the server before a PUB written at once
    async with open_nats_transport(conn("self", nats_url)) as transport:
        for i in range(20):
            sub = await transport.subscribe(f"fast.self.{i}", buffer=4)
            transport.publish(f"fast.self.{i}", b"x")
            with trio.fail_after(5):
                assert (await sub.messages.receive()).data == b"x"
            await sub.unsubscribe()


class WriteLog:
    """Records what reaches nats-py's socket transport, and in how many writes."""

    def __init__(self, transport: NatsTransport) -> None:
        self.writes = 0
        self.data = bytearray()
        io: Any = transport._nc._transport
        write, writelines = io.write, io.writelines

        def logged_write(payload: bytes) -> None:
            self.writes += 1
            self.data += payload
            write(payload)

        def logged_writelines(payload: list[bytes]) -> None:
            self.writes += 1
            self.data += b"".join(payload)
            writelines(payload)

        io.write, io.writelines = logged_write, logged_writelines


@pytest.mark.skipif(not FAST, reason="the direct writes are a fast path of the pinned nats-py")
async def test_claims_of_one_trio_batch_go_out_in_one_write(nats_url: str) -> None:
    # many clients claiming on one beat, on one connection: the first claim is written at once,
    # the others join the write that ends the trio batch, with no asyncio callback (each costs a
    # pass of trio's scheduler under trio-asyncio) and no socket write of their own
    n = 200
    async with (
        open_nats_transport(conn("rx", nats_url)) as rx,
        open_nats_transport(conn("tx", nats_url)) as tx,
    ):
        sub = await rx.subscribe("fast.batch", buffer=2 * n)
        await rx.flush()
        await tx.flush()
        log = WriteLog(tx)
        batches0 = tx.drain_batches
        for burst in range(2):
            for i in range(n):
                tx.publish("fast.batch", b"%d" % (burst * n + i), headers={"Nats-Msg-Id": str(i)})
            await trio.sleep(0.01)  # the batch ends
        assert log.writes == 4  # per burst: the first claim, then the rest together
        assert tx.direct_writes == 2 * n
        assert tx.joined_writes == 2 * (n - 1)
        assert tx.drain_batches == batches0  # the drainer never woke
        got: list[int] = []
        with trio.fail_after(10):
            while len(got) < 2 * n:
                got.append(int((await sub.messages.receive()).data))
        assert got == list(range(2 * n))
    # the task that ends the batches ended with the connection
    assert tx._batches is not None
    assert tx._batches.ended.is_set()


@pytest.mark.skipif(not FAST, reason="the direct writes are a fast path of the pinned nats-py")
async def test_a_flush_pings_after_what_waits_for_its_batch_to_end(nats_url: str) -> None:
    # nats-py writes its PING straight to the socket; messages that joined their trio batch's
    # write are still in nats-py's buffer when a flush in the same batch sends it: the PONG
    # proves that the server has them only if they went first
    async with open_nats_transport(conn("tx", nats_url)) as tx:
        await tx.flush()
        log = WriteLog(tx)
        for round_ in range(20):
            for i in range(5):
                tx.publish("fast.ping", b"r%di%d" % (round_, i), headers={"K": "v"})
            with trio.fail_after(10):
                await tx.flush()
            last = log.data.rindex(b"r%di4" % round_)
            assert log.data.find(b"PING", last) > last, round_
            del log.data[:]


async def test_overflow_of_a_direct_subscription_is_counted(nats_url: str) -> None:
    async with (
        open_nats_transport(conn("rx", nats_url)) as rx,
        open_nats_transport(conn("tx", nats_url)) as tx,
    ):
        sub = await rx.subscribe("fast.full", buffer=4)
        await rx.flush()
        for i in range(100):
            tx.publish("fast.full", b"%d" % i)
        await tx.flush()
        await rx.flush()  # our PING's PONG comes after every message the server sent us
        assert sub.delivered + sub.dropped == 100
        assert sub.delivered == 4
        kept = [int((await sub.messages.receive()).data) for _ in range(4)]
        assert kept == [0, 1, 2, 3]  # the channel keeps the first ones, counts the rest


# --- the drainer's batch encoder ------------------------------------------------------------------
Queued = tuple[str, bytes, dict[str, str] | None, str]


def nats_py_bytes(
    subject: str, payload: bytes, headers: dict[str, str] | None, reply: str
) -> bytes:
    """What nats-py itself queues for one publish (an unconnected client appends and returns)."""
    nc = nats.aio.client.Client()
    coro = nc._send_publish(subject, reply, payload, len(payload), headers)
    with pytest.raises(StopIteration):
        coro.send(None)
    return b"".join(nc._pending)


def queued_bytes(messages: list[Queued]) -> tuple[int, bytes]:
    transport = NatsTransport(loop=None)  # type: ignore[arg-type]  # the encoder needs no loop
    nc = nats.aio.client.Client()
    transport._outq.extend(messages)
    moved = transport._encode_queued(nc, 4096)
    assert nc._pending_data_size == sum(map(len, nc._pending))
    assert nc.stats["out_msgs"] == transport.published == moved
    return moved, b"".join(nc._pending)


header_text = st.text(alphabet=st.sampled_from("aZ09-_:/+= \t\r\n."), min_size=0, max_size=12)


@pytest.mark.skipif(not PINNED, reason="the batch encoder is used with the pinned nats-py only")
@settings(max_examples=300, deadline=None)
@given(
    subject=st.sampled_from(["backbeat.status.c1", "a.b", "x"]),
    payload=st.binary(max_size=40),
    reply=st.sampled_from(["", "_INBOX.abc.1"]),
    headers=st.none()
    | st.dictionaries(
        st.sampled_from(["Backbeat-Sig", "Nats-Msg-Id", "X y", "", "K:"]), header_text, max_size=4
    ),
)
def test_batch_encoder_writes_what_nats_py_writes_or_leaves_it_to_nats_py(
    subject: str, payload: bytes, reply: str, headers: dict[str, str] | None
) -> None:
    moved, got = queued_bytes([(subject, payload, headers, reply)])
    if moved:
        assert got == nats_py_bytes(subject, payload, headers, reply)
    else:  # declined: only for headers nats-py would rewrite, skip or refuse
        assert headers is not None
        assert any(
            k.strip() != k
            or not k
            or ":" in k
            or " " in k
            or v != v.strip()
            or "\r" in v
            or "\n" in v
            for k, v in headers.items()
        )


@pytest.mark.skipif(not PINNED, reason="the batch encoder is used with the pinned nats-py only")
def test_batch_encoder_stops_at_the_first_message_it_cannot_vouch_for() -> None:
    messages = [
        ("a.b", b"1", {"Nats-Msg-Id": "x:1"}, ""),
        ("a.b", b"2", None, "_INBOX.r"),
        ("a.b", b"3", {"Bad": " padded "}, ""),  # nats-py strips it: its path must take it
        ("a.b", b"4", None, ""),
    ]
    moved, got = queued_bytes(messages)
    assert moved == 2
    assert got == b"".join(nats_py_bytes(s, p, h, r) for s, p, h, r in messages[:2])


async def test_headers_the_encoder_declines_still_arrive_in_order(nats_url: str) -> None:
    n = 400
    async with (
        open_nats_transport(conn("rx", nats_url)) as rx,
        open_nats_transport(conn("tx", nats_url)) as tx,
    ):
        sub = await rx.subscribe("fast.hdr", buffer=n)
        await rx.flush()
        for i in range(n):
            value = f" v{i} " if i % 9 == 0 else f"v{i}"  # padded values take nats-py's path
            tx.publish("fast.hdr", b"%d" % i, headers={"Seq": value, "Nats-Msg-Id": f"m:{i}"})
        await tx.flush()
        got: list[tuple[int, str, str]] = []
        with trio.fail_after(10):
            while len(got) < n:
                msg = await sub.messages.receive()
                hdrs = msg.headers or {}
                got.append((int(msg.data), hdrs["Seq"].strip(), hdrs["Nats-Msg-Id"]))
        assert tx.published == n
    assert got == [(i, f"v{i}", f"m:{i}") for i in range(n)]


@pytest.mark.skipif(not PINNED, reason="the batch encoder is used with the pinned nats-py only")
def test_batch_encoder_declines_what_nats_py_would_refuse() -> None:
    bad: list[Any] = [
        ("a.b", "text, not bytes", None, ""),
        ("a.b", b"x", {"K": None}, ""),
        ("a.b", b"x", {b"K": "v"}, ""),
        ("a.\udcff", b"x", None, ""),  # does not encode
        ("a b", b"x", None, ""),  # nats-py: BadSubjectError
        ("", b"x", None, ""),
    ]
    for message in bad:
        moved, got = queued_bytes([message, ("a.b", b"ok", None, "")])
        assert (moved, got) == (0, b""), message
    # an empty subject is declined even where nats-py skips subject validation
    transport = NatsTransport(loop=None)  # type: ignore[arg-type]
    nc = nats.aio.client.Client()
    nc._skip_subject_validation = True
    transport._outq.append(("", b"x", None, ""))
    assert transport._encode_queued(nc, 10) == 0


@pytest.mark.skipif(not PINNED, reason="the batch encoder is used with the pinned nats-py only")
def test_batch_encoder_stops_where_nats_py_would_push_back() -> None:
    transport = NatsTransport(loop=None)  # type: ignore[arg-type]
    nc = nats.aio.client.Client()
    nc._max_pending_size = 64 * 1024
    transport._outq.extend([("a.b", b"x" * 1024, None, "")] * 4096)
    moved = transport._encode_queued(nc, 4096)
    assert 60 <= moved <= 66
    assert nc._pending_data_size <= 64 * 1024 + 1100
    assert len(transport._outq) == 4096 - moved


async def test_a_publish_nats_py_refuses_is_reported_and_the_rest_still_goes(
    nats_url: str,
) -> None:
    async with (
        open_nats_transport(conn("rx", nats_url)) as rx,
        open_nats_transport(conn("tx", nats_url)) as tx,
    ):
        sub = await rx.subscribe("fast.bad", buffer=16)
        await rx.flush()
        tx.publish("fast.bad", b"before", headers={"K": "v"})
        tx.publish("fast.bad", "text", headers={"K": "v"})  # type: ignore[arg-type]
        tx.publish("fast.bad", b"x", headers={"K": None})  # type: ignore[dict-item]
        tx.publish("fast.bad", b"after", headers={"K": "v"})
        with trio.fail_after(10):
            await tx.flush()
            got = [(await sub.messages.receive()).data for _ in range(2)]
        assert tx.publish_errors >= 1  # nats-py's own path took the bad ones and said why
        assert tx.last_error is not None
    assert got == [b"before", b"after"]
