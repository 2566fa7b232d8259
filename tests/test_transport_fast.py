"""The transport's fast paths through nats-py internals, over a real nats-server.

On the nats-py versions they were checked against, a core subscription skips nats-py's
per-subscription task and a header-less publish with nothing queued is written at once. These
tests pin that the fast paths are really taken there (a nats-py upgrade that turns them off must
be noticed) and that they keep every guarantee of the general path: order, counted overflow, and
bytes nats-py queued first (SUB) still going first.
"""

from __future__ import annotations

import nats.aio.client
import pytest
import trio

from backbeat_trio._config import Config
from backbeat_trio._transport import (
    _DIRECT_NATS_VERSIONS,
    NatsTransport,
    _direct_nats_supported,
    _DirectPending,
    open_nats_transport,
)

pytestmark = pytest.mark.nats

PINNED = str(nats.aio.client.__version__).startswith(_DIRECT_NATS_VERSIONS)


def conn(name: str, url: str) -> Config:
    return Config(cluster_id="fast", agent_id=name, nats_url=url)


def direct_subscriptions(transport: NatsTransport) -> int:
    return sum(isinstance(s._pending_queue, _DirectPending) for s in transport._nc._subs.values())


def test_the_fast_paths_are_on_for_the_pinned_nats_py() -> None:
    if not PINNED:
        pytest.skip(
            f"nats-py {nats.aio.client.__version__} is not one the fast paths were checked "
            f"against ({_DIRECT_NATS_VERSIONS}); the general path is used"
        )
    assert _direct_nats_supported()


async def test_mixed_publishes_arrive_in_order(nats_url: str) -> None:
    # header-less messages may be written at once, messages with headers always go through the
    # drainer's queue: whichever path each takes, the receiver sees the order they were sent in
    n = 3000
    async with (
        open_nats_transport(conn("rx", nats_url)) as rx,
        open_nats_transport(conn("tx", nats_url)) as tx,
    ):
        sub = await rx.subscribe("fast.order", buffer=n)
        assert direct_subscriptions(rx) == (1 if PINNED else 0)
        await rx.flush()
        for i in range(n):
            headers = {"Seq": str(i)} if i % 7 in (0, 1) else None
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
        if PINNED:  # both paths were taken
            assert 0 < tx.direct_writes < n - n // 7


async def test_a_subscription_then_a_publish_on_one_connection(nats_url: str) -> None:
    # the SUB nats-py queued must reach the server before a PUB written at once
    async with open_nats_transport(conn("self", nats_url)) as transport:
        for i in range(20):
            sub = await transport.subscribe(f"fast.self.{i}", buffer=4)
            transport.publish(f"fast.self.{i}", b"x")
            with trio.fail_after(5):
                assert (await sub.messages.receive()).data == b"x"
            await sub.unsubscribe()


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
