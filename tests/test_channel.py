"""DropOldestChannel's waiting: the first waiter's own slot, waiters queued behind it (oldest
woken first), cancellation of either kind of waiter, and the ends of the channel."""

from __future__ import annotations

import collections
import gc

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from backbeat_trio import DropOldestChannel
from backbeat_trio._util import _trio_private


async def test_a_full_channel_drops_its_oldest_item_and_counts_it() -> None:
    chan = DropOldestChannel[int](2)
    for i in range(5):
        assert chan.put(i)
    assert chan.dropped == 3
    assert [await chan.receive(), await chan.receive()] == [3, 4]
    assert chan.delivered == 2


async def test_waiters_are_woken_oldest_first() -> None:
    chan = DropOldestChannel[int](8)
    got: list[tuple[str, int]] = []

    async def reader(name: str) -> None:
        got.append((name, await chan.receive()))

    async with trio.open_nursery() as nursery:
        for name in ("a", "b", "c"):  # a takes the slot, b and c queue behind it
            nursery.start_soon(reader, name)
            await trio.testing.wait_all_tasks_blocked()
        for i in range(3):
            chan.put(i)
            await trio.testing.wait_all_tasks_blocked()
    assert got == [("a", 0), ("b", 1), ("c", 2)]


@pytest.mark.parametrize("cancelled", ["slot", "queued"])
async def test_a_cancelled_waiter_leaves_and_loses_no_item(cancelled: str) -> None:
    chan = DropOldestChannel[int](8)
    got: list[tuple[str, int]] = []
    scopes: dict[str, trio.CancelScope] = {}

    async def reader(name: str) -> None:
        with trio.CancelScope() as scopes[name]:
            got.append((name, await chan.receive()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, "slot")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(reader, "queued")
        await trio.testing.wait_all_tasks_blocked()
        scopes[cancelled].cancel()
        await trio.testing.wait_all_tasks_blocked()
        chan.put(7)
        await trio.testing.wait_all_tasks_blocked()
        # a newcomer waits behind nobody now: it gets the next item
        nursery.start_soon(reader, "late")
        await trio.testing.wait_all_tasks_blocked()
        chan.put(8)
    survivor = "queued" if cancelled == "slot" else "slot"
    assert got == [(survivor, 7), ("late", 8)]
    assert scopes[cancelled].cancelled_caught


async def test_the_end_of_the_channel_reaches_every_waiter() -> None:
    chan = DropOldestChannel[int](8)
    ended: list[str] = []

    async def iterate(name: str) -> None:
        async for _ in chan:
            pass
        ended.append(name)

    async def receive(name: str) -> None:
        with pytest.raises(trio.EndOfChannel):
            await chan.receive()
        ended.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(iterate, "iterating")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(receive, "receiving")
        await trio.testing.wait_all_tasks_blocked()
        chan.close_send()
    assert sorted(ended) == ["iterating", "receiving"]
    assert not chan.put(1)


async def test_items_left_are_read_before_the_end_and_a_closed_channel_refuses() -> None:
    chan = DropOldestChannel[int](8)
    chan.put(1)
    chan.put(2)
    chan.close_send()
    assert [i async for i in chan] == [1, 2]
    other = DropOldestChannel[int](8)

    async def wait() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await other.receive()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        await other.aclose()
    assert not other.put(1)


@given(
    maxlen=st.integers(1, 5),
    ops=st.lists(st.sampled_from(["put", "take"]), max_size=40),
)
def test_items_come_out_in_order_and_only_the_oldest_are_dropped(
    maxlen: int, ops: list[str]
) -> None:
    # against a model: the slot and the queue behind it behave as one bounded deque
    chan: DropOldestChannel[int] = DropOldestChannel(maxlen)
    model: collections.deque[int] = collections.deque()
    dropped = 0
    for n, op in enumerate(ops):
        if op == "put":
            if len(model) == maxlen:
                model.popleft()
                dropped += 1
            model.append(n)
            assert chan.put(n)
        elif model:
            assert chan.receive_nowait() == model.popleft()
        else:
            with pytest.raises(trio.WouldBlock):
                chan.receive_nowait()
        assert chan.pending == len(model)
    assert chan.dropped == dropped
    assert [chan.receive_nowait() for _ in range(chan.pending)] == list(model)


def test_a_channel_holds_at_least_one_item() -> None:
    with pytest.raises(ValueError, match="at least one"):
        DropOldestChannel[int](0)


@pytest.mark.parametrize("fast", [True, False])
async def test_consumers_waiting_in_their_slots_hold_no_object_per_wait(
    fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what a beat leaves alive while a thousand consumers wait for the next one is what the
    # garbage collector promotes in thousands (_util/_trio_private.py)
    if not fast:
        monkeypatch.setenv(_trio_private.FAST_ENV, "0")
    elif not _trio_private.fast_wait_enabled():
        pytest.skip("the reused wait is off here (BACKBEAT_TRIO_WAIT_FAST=0 or another trio)")
    chans = [DropOldestChannel[int](4) for _ in range(50)]
    got = [0]

    async def consume(chan: DropOldestChannel[int]) -> None:
        async for _ in chan:
            got[0] += 1

    async with trio.open_nursery() as nursery:
        for chan in chans:
            nursery.start_soon(consume, chan)
        await trio.testing.wait_all_tasks_blocked()
        kinds = ("coroutine", "generator", "WaitTaskRescheduled", "Value")
        for beat in range(3):
            gc.collect()
            for chan in chans:
                chan.put(beat)
            await trio.testing.wait_all_tasks_blocked()
            young = collections.Counter(type(o).__name__ for o in gc.get_objects(0))
            waiting = sum(young[k] for k in kinds)
            if fast:
                assert waiting < 10, young
            else:  # each waiter holds its coroutines and its message
                assert waiting >= 3 * len(chans), young
        nursery.cancel_scope.cancel()
    assert got[0] == 3 * len(chans)


def test_another_trio_waits_through_the_public_function(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_trio_private.FAST_ENV, raising=False)
    monkeypatch.setattr(trio, "__version__", "0.99.0")
    _trio_private._version_supported.cache_clear()
    try:
        assert not _trio_private.fast_wait_enabled()
        assert DropOldestChannel[int](1)._slot_wait is None
    finally:
        monkeypatch.undo()
        _trio_private._version_supported.cache_clear()
