"""Review: races in SharedSubscriptions (no server). Each test shows one defect and fails
until it is fixed; the Wire double is tests/test_shared_subscriptions.py's."""

from __future__ import annotations

from collections.abc import Callable

import trio
import trio.testing

from backbeat_trio._transport.base import Message, Subscription
from backbeat_trio._transport.shared import SharedSubscription, SharedSubscriptions
from tests.test_shared_subscriptions import Prepare, Wire


class ClosingWire(Wire):
    """A Wire whose unsubscribed subscriptions stop delivering (as on a real connection)."""

    async def subscribe(self, subject: str, handler: Callable[[Message], None]) -> Subscription:
        await trio.sleep(0.01)
        holder: list[Subscription] = []

        def unsubscribe() -> None:
            self.unsubscribed += 1
            self.subs.remove(holder[0])

        sub = Subscription(subject, 1, unsubscribe, handler)
        holder.append(sub)
        self.subs.append(sub)
        return sub


async def test_review_a_member_joining_while_the_first_leaves_still_gets_messages() -> None:
    # The first member makes the subscription and leaves at once (its client closed right
    # after opening); a second member that was waiting for that subscription must not end up
    # attached to the entry the first one just ended.
    wire = ClosingWire()
    shared = SharedSubscriptions(wire.subscribe)
    got: list[str] = []
    second: list[SharedSubscription[str]] = []

    async def first() -> None:
        member = await shared.join("s", key="k", prepare=Prepare)
        await member.unsubscribe()

    async def late() -> None:
        second.append(await shared.join("s", key="k", prepare=Prepare, handler=got.append))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(late)
    assert second, "the second join did not return"
    wire.send(b"a")
    # the live member must be known to the registry and be delivered to
    assert got == ["A"], "the live member's subscription was ended by the member that left"
    assert shared.subscriptions != [], "a live member is attached to a forgotten entry"


async def test_review_first_member_cancelled_while_subscribing_does_not_fail_the_others() -> None:
    # One client closes (is cancelled) while its join is making the shared subscription; another
    # client joining the same key at that moment must still get a working subscription
    # ("a client that leaves never disturbs the others").
    wire = Wire()
    shared = SharedSubscriptions(wire.subscribe)
    outcome: list[object] = []

    async def first(scope_out: list[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            scope_out.append(scope)
            await shared.join("s", key="k", prepare=Prepare)

    async def other() -> None:
        try:
            outcome.append(await shared.join("s", key="k", prepare=Prepare))
        except Exception as exc:
            outcome.append(exc)

    scopes: list[trio.CancelScope] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(first, scopes)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(other)
        await trio.testing.wait_all_tasks_blocked()
        scopes[0].cancel()  # the first client closes while the subscribe is in flight
    assert len(outcome) == 1
    assert isinstance(outcome[0], SharedSubscription), f"the other client failed: {outcome[0]!r}"


async def test_review_a_stale_member_leaving_does_not_forget_the_newer_subscription() -> None:
    # Member ``bad`` fails in its handler (dropped from the entry, its owner unsubscribes
    # later); the last live member leaves, ending that entry; a new client makes a new entry for
    # the same key. When ``bad``'s owner then unsubscribes, the registry must keep the new entry:
    # else the next client makes a second subscription for the key (two decodes per frame) and
    # the orphaned one's last member later pops yet another entry.
    wire = Wire()
    shared = SharedSubscriptions(wire.subscribe)

    def raising(item: str) -> None:
        raise ValueError("consumer bug")

    bad = await shared.join("s", key="k", prepare=Prepare, handler=raising)
    good = await shared.join("s", key="k", prepare=Prepare, handler=lambda item: None)
    wire.send(b"a")
    assert bad.failure is not None
    await good.unsubscribe()  # the last live member: the first entry ends
    newer = await shared.join("s", key="k", prepare=Prepare, handler=lambda item: None)
    assert len(wire.subs) == 2
    await bad.unsubscribe()  # the stale member's owner cleans up
    another = await shared.join("s", key="k", prepare=Prepare, handler=lambda item: None)
    assert len(wire.subs) == 2, "a second live subscription was made for the same key"
    assert [n for _, _, n in shared.subscriptions] == [2]
    await newer.unsubscribe()
    await another.unsubscribe()
