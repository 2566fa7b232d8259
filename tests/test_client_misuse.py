"""Mistakes a newcomer makes, each named instead of silent or buried (issue 18):

* every form of beat budget is counted in the client's budget metrics, ``beat_budget()``'s
  ``with`` form (the README's) as much as ``fail_after_beats`` and ``with_beat_budget``;
* the SDK's entry points called outside trio (from asyncio) say so in one short error;
* a client that hears no beat after connecting (a wrong cluster id, no pulse) warns once, naming
  the subject and the cluster, and ``health()``, ``backbeat-trio health`` and
  ``backbeat-trio tail`` say the same.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

import backbeat_trio as bb3
from backbeat_trio import testing as bbt

CLUSTER = "misuse"


def budget_counts(bb: bb3.Client) -> tuple[int, int, int]:
    m = bb.metrics
    return (m.budgets_created, m.budgets_completed, m.budgets_timed_out)


# --- beat budgets are counted in every form ---------------------------------------------------
async def test_beat_budget_scopes_are_counted_like_the_other_forms(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        bbt.open_fake_cluster(CLUSTER, tempo_bpm=60) as cluster,
        cluster.open_client() as bb,
    ):
        await bb.wait_for_beat()
        with bb.beat_budget(2) as scope:  # the README's form: runs out
            await trio.sleep_forever()
        assert scope.cancelled_caught
        assert isinstance(scope, trio.CancelScope)
        assert budget_counts(bb) == (1, 0, 1)
        with bb.beat_budget(2) as scope:  # finishes in time
            await trio.sleep(0.5)
        assert not scope.cancelled_caught
        assert budget_counts(bb) == (2, 1, 1)
        # the budget kept and entered later, as a bare cancel scope was
        budget = bb.beat_budget(1)
        with budget:
            await trio.sleep_forever()
        assert budget.cancelled_caught
        assert budget_counts(bb) == (3, 1, 2)
        # the other two forms count the same way, into the same counters
        with pytest.raises(bb3.BeatBudgetExceeded), bb.fail_after_beats(1):
            await trio.sleep_forever()
        assert await bb.with_beat_budget(2, trio.sleep, 0.5) is None
        assert budget_counts(bb) == (5, 2, 3)
        # an exception out of the block still counts it (completed: the budget did not run out)
        with pytest.raises(KeyError), bb.beat_budget(2):
            raise KeyError("work failed")
        assert budget_counts(bb) == (6, 3, 3)


async def test_a_budget_cancelled_by_hand_counts_as_timed_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        bbt.open_fake_cluster(CLUSTER, tempo_bpm=60) as cluster,
        cluster.open_client() as bb,
    ):
        await bb.wait_for_beat()
        budget = bb.beat_budget(100)
        with budget:
            budget.cancel()
            await trio.sleep_forever()
        assert budget.cancel_called
        assert budget.cancelled_caught
        assert budget_counts(bb) == (1, 0, 1)


@pytest.mark.nats
async def test_beat_budget_scopes_are_counted_over_nats(nats_url: str) -> None:
    cluster = "misuse-budgets"
    async with trio.open_nursery() as nursery:
        await nursery.start(
            bb3.run_pulse, bb3.PulseConfig(cluster_id=cluster, nats_url=nats_url, tempo_bpm=600)
        )
        cfg = bb3.Config(cluster_id=cluster, agent_id="agent-1", nats_url=nats_url)
        async with bb3.open_client(cfg) as bb:
            with trio.fail_after(10):
                await bb.wait_for_beat()
            t0 = trio.current_time()
            with bb.beat_budget(2) as scope:
                await trio.sleep_forever()
            assert scope.cancelled_caught
            assert trio.current_time() - t0 == pytest.approx(0.2, abs=0.1)
            with bb.beat_budget(20):
                await trio.sleep(0.01)
            assert budget_counts(bb) == (2, 1, 1)
        nursery.cancel_scope.cancel()
