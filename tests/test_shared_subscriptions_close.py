"""Review 2: SharedSubscriptions.join against close() (no server). The Wire double is
tests/test_shared_subscriptions.py's."""

from __future__ import annotations

import trio
import trio.testing

from backbeat_trio import NotConnected
from backbeat_trio._transport.shared import SharedSubscription, SharedSubscriptions
from tests.test_shared_subscriptions import Prepare, Wire


async def test_review2_close_while_the_first_member_subscribes_leaves_no_live_member() -> None:
    # close() is "every member's messages ends" and join() after it raises NotConnected. A
    # member whose join was making the subscription when the connection closed must not come
    # back attached to that closed registry with a channel nothing will ever close (its owner's
    # ``async for sub.messages`` then waits forever) and a subscription still delivering.
    wire = Wire()
    shared = SharedSubscriptions(wire.subscribe, inline=False)
    out: list[object] = []

    async def first() -> None:
        try:
            out.append(await shared.join("s", key="k", prepare=Prepare))
        except NotConnected as exc:
            out.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()  # inside the transport's subscribe
        shared.close()
    assert len(out) == 1
    member = out[0]
    if isinstance(member, SharedSubscription):
        wire.send(b"a")  # the connection's subscription still feeds the member
        ended = False
        got: list[object] = []
        with trio.move_on_after(1):
            async for item in member.messages:
                got.append(item)
            ended = True
        assert ended, f"after close() the member's messages never end (it got {got!r})"
