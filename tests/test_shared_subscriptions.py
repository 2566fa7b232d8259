"""SharedSubscriptions on their own (no server): one subscription per key however many members
join (also at once), one ``prepare`` per message, members isolated from each other's failures
and full channels, the last member's leaving ending the subscription, a close ending them all.
The same over a real nats-server: tests/test_many_agents.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from backbeat_trio import NotConnected
from backbeat_trio._transport.base import MemoryMessage, Message, Subscription
from backbeat_trio._transport.shared import SharedSubscriptions


class Wire:
    """A stand-in for a transport's own ``subscribe``: records subscriptions, delivers inline."""

    def __init__(self, fail: bool = False) -> None:
        self.subs: list[Subscription] = []
        self.unsubscribed = 0
        self.fail = fail

    async def subscribe(self, subject: str, handler: Callable[[Message], None]) -> Subscription:
        await trio.sleep(0.01)  # a round trip: other members arrive meanwhile
        if self.fail:
            raise NotConnected("refused")

        def unsubscribe() -> None:
            self.unsubscribed += 1

        sub = Subscription(subject, 1, unsubscribe, handler)
        self.subs.append(sub)
        return sub

    def send(self, data: bytes) -> None:
        for sub in self.subs:
            sub._deliver(MemoryMessage("s", data))


class Prepare:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, data: bytes) -> str | None:
        self.calls += 1
        return None if data == b"junk" else data.decode().upper()


async def test_members_joining_at_once_share_one_subscription_and_one_prepare() -> None:
    wire = Wire()
    shared = SharedSubscriptions(wire.subscribe)
    prepare = Prepare()
    made: list[Prepare] = []
    got: dict[int, list[str]] = {i: [] for i in range(5)}

    def factory() -> Prepare:
        made.append(prepare)
        return prepare

    members = []
    async with trio.open_nursery() as nursery:
        for i in range(5):

            async def join(i: int = i) -> None:
                members.append(
                    await shared.join("s", key="k", prepare=factory, handler=got[i].append)
                )

            nursery.start_soon(join)
    assert len(wire.subs) == 1
    assert made == [prepare]  # made by the first member only
    wire.send(b"a")
    wire.send(b"junk")
    wire.send(b"b")
    assert prepare.calls == 3  # once per message, not once per member
    assert all(g == ["A", "B"] for g in got.values())
    assert shared.subscriptions == [("s", prepare, 5)]
    for m in members[:4]:
        await m.unsubscribe()
    assert wire.unsubscribed == 0  # one member is left
    await members[4].unsubscribe()
    await members[4].unsubscribe()  # twice: harmless
    assert wire.unsubscribed == 1
    assert shared.subscriptions == []


async def test_a_raising_member_is_dropped_alone() -> None:
    wire = Wire()
    shared = SharedSubscriptions(wire.subscribe)
    good: list[str] = []

    def bad(item: str) -> None:
        raise ValueError("consumer bug")

    b = await shared.join("s", key="k", prepare=Prepare, handler=bad)
    g = await shared.join("s", key="k", prepare=Prepare, handler=good.append)
    wire.send(b"a")
    wire.send(b"b")
    assert good == ["A", "B"]
    assert isinstance(b.failure, ValueError)
    with pytest.raises(trio.EndOfChannel):
        await b.messages.receive()
    assert shared.subscriptions[0][2] == 1
    assert g.failure is None


async def test_members_without_inline_handlers_have_their_own_bounded_channels() -> None:
    wire = Wire()
    shared = SharedSubscriptions(wire.subscribe, inline=False)
    slow = await shared.join("s", key="k", prepare=Prepare, buffer=2)
    fast = await shared.join("s", key="k", prepare=Prepare, buffer=16)
    for data in (b"a", b"b", b"c", b"d"):
        wire.send(data)
    assert [fast.messages.receive_nowait() for _ in range(4)] == ["A", "B", "C", "D"]
    assert slow.dropped == 2  # its own overflow, nobody else's
    assert fast.dropped == 0
    assert [slow.messages.receive_nowait() for _ in range(2)] == ["A", "B"]


async def test_a_failed_subscribe_fails_every_waiting_member_and_is_not_kept() -> None:
    wire = Wire(fail=True)
    shared = SharedSubscriptions(wire.subscribe)
    errors: list[BaseException] = []

    async def join() -> None:
        try:
            await shared.join("s", key="k", prepare=Prepare)
        except NotConnected as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(join)
    assert len(errors) == 3
    assert shared.subscriptions == []
    wire.fail = False
    member = await shared.join("s", key="k", prepare=Prepare)  # a later join tries afresh
    assert shared.subscriptions[0][2] == 1
    await member.unsubscribe()


async def test_different_keys_do_not_share_and_close_ends_every_member() -> None:
    wire = Wire()
    shared = SharedSubscriptions(wire.subscribe)
    a = await shared.join("s", key="a", prepare=Prepare)
    b = await shared.join("s", key="b", prepare=Prepare)
    assert len(wire.subs) == 2
    shared.close()
    for m in (a, b):
        with pytest.raises(trio.EndOfChannel):
            await m.messages.receive()
    with pytest.raises(NotConnected):
        await shared.join("s", key="a", prepare=Prepare)
