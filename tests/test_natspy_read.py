"""The read fast path, ``PlainReader``, against nats-py's own parser.

On the fast path a connection's reads go to ``read_plain`` first: the header-less, reply-less
MSGs of directly routed subscriptions are handed on there, the rest goes to nats-py's parser.
For any stream of protocol, cut into reads anywhere, the subscriptions must get exactly what
nats-py's parser alone would give them, in the same order, and nats-py's counters must agree.
The last tests run it over a real nats-server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import nats.aio.client
import nats.aio.subscription
import nats.errors
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from backbeat_trio import Config
from backbeat_trio._bridge import _natspy_private as private
from backbeat_trio._bridge.nats import open_nats_transport

PINNED = str(nats.aio.client.__version__).startswith(private._DIRECT_NATS_VERSIONS)
pytestmark = pytest.mark.skipif(
    not PINNED, reason="the fast paths are used with the pinned nats-py only"
)

DIRECT = (1, 2)  # routed by deliver_directly's stand-in
QUEUED = 3  # a subscription with nats-py's own queue (a JetStream one, a sync one)
UNKNOWN = 9  # no subscription (unsubscribed meanwhile)

Got = tuple[int, str, bytes, str, Any]


def client(got: list[Got]) -> Any:
    """An unconnected nats-py client with subscriptions as a connection of ours has them."""
    nc = nats.aio.client.Client()
    for sid in (*DIRECT, QUEUED):
        sub = nats.aio.subscription.Subscription(nc, sid, f"s{sid}")
        nc._subs[sid] = sub
        if sid in DIRECT:

            def deliver(msg: Any, sid: int = sid) -> None:
                got.append((sid, msg.subject, msg.data, msg.reply, msg.headers))

            sub._pending_queue = private.DirectPending(sub, deliver)
    return nc


def feed(nc: Any, reads: Sequence[bytes]) -> None:
    """Run the connection's parser over ``reads`` as its read loop would."""
    for data in reads:
        coro = nc._ps.parse(data)
        try:
            coro.send(None)
        except StopIteration:
            continue
        finally:
            coro.close()
        raise AssertionError("the parser waited")  # pragma: no cover


def queued(nc: Any) -> list[Got]:
    sub = nc._subs[QUEUED]
    out = []
    while not sub._pending_queue.empty():
        m = sub._pending_queue.get_nowait()
        out.append((QUEUED, m.subject, m.data, m.reply, m.headers))
    return out


def outcome(stream: bytes, cuts: Sequence[int], fast: bool) -> tuple[Any, ...]:
    got: list[Got] = []
    nc = client(got)
    reader = private.read_directly(nc) if fast else None
    points = sorted({c % (len(stream) + 1) for c in cuts})
    reads = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    try:
        feed(nc, [r for r in reads if r])
        error = None
    except nats.errors.ProtocolError as exc:  # the same refusal, after the same deliveries
        error = str(exc)
    counts = {sid: sub._received for sid, sub in nc._subs.items()}
    taken = reader.taken if reader is not None else 0
    return got, queued(nc), dict(nc.stats), counts, error, taken


def msg(sid: int, payload: bytes, subject: str = "a.b") -> bytes:
    return b"MSG %s %d %d\r\n%s\r\n" % (subject.encode(), sid, len(payload), payload)


HDR = b"NATS/1.0\r\nK: v\r\n\r\n"
sids = st.sampled_from([*DIRECT, QUEUED, UNKNOWN])
payloads = st.binary(max_size=40) | st.sampled_from([b"MSG a 1 3\r\nabc\r\n", b"\r\n", b"PING"])
subjects = st.sampled_from(["a", "_INBOX.x.ack.17", "backbeat.beat.c", "é.x"])
records = st.one_of(
    st.builds(lambda s, p, j: msg(s, p, j), sids, payloads, subjects),
    st.builds(lambda s, p: b"MSG a %d _INBOX.r %d\r\n%s\r\n" % (s, len(p), p), sids, payloads),
    st.builds(
        lambda s, p: b"HMSG a %d %d %d\r\n%s%s\r\n" % (s, len(HDR), len(HDR) + len(p), HDR, p),
        sids,
        payloads,
    ),
    st.builds(lambda s, p: b"MSG  a %d %d\r\n%s\r\n" % (s, len(p), p), sids, payloads),
    st.just(b"+OK\r\n"),
    st.just(b"PONG\r\n"),
    st.just(b"BOGUS\r\n"),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(records, max_size=12), st.lists(st.integers(0, 10_000), max_size=8))
def test_subscriptions_get_what_nats_py_alone_gives_them(
    parts: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(parts)
    ours = outcome(stream, cuts, fast=True)
    theirs = outcome(stream, cuts, fast=False)
    assert ours[:5] == theirs[:5]
    assert theirs[4] is None or b"BOGUS" in stream


def test_plain_messages_of_direct_subscriptions_are_read_before_nats_py() -> None:
    got: list[Got] = []
    nc = client(got)
    reader = private.read_directly(nc)
    feed(nc, [msg(1, b"x") + msg(2, b"yz", "s.t") + b"MSG r 1 _INBOX.r 1\r\nq\r\n" + msg(1, b"w")])
    assert got == [
        (1, "a.b", b"x", "", None),
        (2, "s.t", b"yz", "", None),
        (1, "r", b"q", "_INBOX.r", None),
        (1, "a.b", b"w", "", None),
    ]
    # the two before the reply were read here; nats-py's parser read the rest of that read
    assert reader.taken == 2
    assert nc.stats["in_msgs"] == 4


def test_a_message_cut_off_by_the_end_of_a_read_is_delivered_once_whole() -> None:
    got: list[Got] = []
    nc = client(got)
    reader = private.read_directly(nc)
    whole = msg(1, b"0123456789") + msg(2, b"ab")
    for cut in range(1, len(whole)):
        got.clear()
        feed(nc, [whole[:cut], whole[cut:]])
        assert got == [(1, "a.b", b"0123456789", "", None), (2, "a.b", b"ab", "", None)], cut
        assert not nc._ps.buf
    assert reader.taken == 2 * (len(whole) - 1)


def test_a_large_message_cut_off_is_left_to_nats_py_and_arrives_once() -> None:
    got: list[Got] = []
    nc = client(got)
    reader = private.read_directly(nc)
    big = bytes(range(256)) * 1024  # larger than what the reader keeps between reads
    whole = msg(1, b"a") + msg(2, big) + msg(1, b"z")
    reads = [whole[i : i + 5000] for i in range(0, len(whole), 5000)]
    feed(nc, reads)
    assert got == [
        (1, "a.b", b"a", "", None),
        (2, "a.b", big, "", None),
        (1, "a.b", b"z", "", None),
    ]
    assert reader.taken == 1  # the first; nats-py's parser read the big one and what followed
    assert not nc._ps.buf


def test_a_new_connection_drops_what_was_kept_from_the_old_one() -> None:
    got: list[Got] = []
    nc = client(got)
    private.read_directly(nc)
    feed(nc, [msg(1, b"0123456789")[:15]])  # the old connection died mid-message
    nc._ps.reset()  # what nats-py does before it reads from a new connection
    feed(nc, [msg(2, b"new")])
    assert got == [(2, "a.b", b"new", "", None)]


def test_what_nats_py_refuses_it_still_refuses() -> None:
    got: list[Got] = []
    nc = client(got)
    private.read_directly(nc)
    with pytest.raises(nats.errors.ProtocolError):
        feed(nc, [msg(1, b"ok") + b"BOGUS\r\n"])
    assert got == [(1, "a.b", b"ok", "", None)]


def test_an_auto_unsubscribing_subscription_is_left_to_nats_py() -> None:
    got: list[Got] = []
    nc = client(got)
    reader = private.read_directly(nc)
    nc._subs[1]._max_msgs = 2  # nats-py drops the subscription after its second message
    feed(nc, [msg(1, b"a") + msg(1, b"b") + msg(1, b"c")])
    assert [g[2] for g in got] == [b"a", b"b"]
    assert 1 not in nc._subs
    assert reader.taken == 0


# ------------------------------------------------------------------ over a real nats-server
@pytest.mark.nats
async def test_messages_over_nats_arrive_whole_in_order(nats_url: str) -> None:
    """On the fast path they are read here (those cut off by the end of a read wait for the
    next one); with ``BACKBEAT_TRIO_NATS_FAST=0`` nats-py's own parser reads them all."""
    cfg = Config(cluster_id="rd", agent_id="rd", nats_url=nats_url)
    sizes = [0, 1, 7, 100, 1000, 9000, 60_000, 3]
    async with open_nats_transport(cfg) as rx, open_nats_transport(cfg) as tx:
        assert rx.fast == private.fast_path_enabled()
        sub = await rx.subscribe("rd.x", buffer=4096)
        await rx.flush()
        sent = [bytes([i % 251]) * sizes[i % len(sizes)] for i in range(2000)]
        for i, payload in enumerate(sent):
            tx.publish("rd.x", payload)
            if i % 100 == 0:
                await trio.lowlevel.checkpoint()
        await tx.flush()
        got = []
        with trio.fail_after(10):
            while len(got) < len(sent):
                got.append((await sub.messages.receive()).data)
        assert got == sent
        reader = getattr(rx._nc._ps.parse, "__self__", None)
        if rx.fast:
            assert isinstance(reader, private.PlainReader)
            assert reader.taken >= len(sent)
        else:
            assert not isinstance(reader, private.PlainReader)


def test_the_stand_in_queue_is_the_only_route() -> None:
    """``read_plain`` hands on only to ``DirectPending``: an asyncio queue keeps nats-py's path."""
    nc = client([])
    assert isinstance(nc._subs[QUEUED]._pending_queue, asyncio.Queue)
    assert private.read_plain(nc, msg(QUEUED, b"x")) == (0, False)
    assert private.read_plain(nc, msg(1, b"x")[:-3]) == (0, True)
