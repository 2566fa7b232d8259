"""Mistakes a newcomer makes, each named instead of silent or buried (issue 18):

* every form of beat budget is counted in the client's budget metrics, ``beat_budget()``'s
  ``with`` form (the README's) as much as ``fail_after_beats`` and ``with_beat_budget``;
* the SDK's entry points called outside trio (from asyncio) say so in one short error;
* a client that hears no beat after connecting (a wrong cluster id, no pulse) warns once, naming
  the subject and the cluster, and ``health()``, ``backbeat-trio health`` and
  ``backbeat-trio tail`` say the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import trio
import trio.testing
import trio_asyncio

import backbeat_trio as bb3
from backbeat_trio import testing as bbt
from backbeat_trio._errors import NotUnderTrio
from backbeat_trio._util.trio_only import require_trio

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


# --- outside trio: one short, clear error before anything opens ----------------------------------
# Each entry point that opens something, called from asyncio; the URL is a closed port, so an
# entry point that tried to connect would fail differently (and slowly).
UNDER_ASYNCIO = textwrap.dedent(
    """
    import asyncio, json, sys
    import backbeat_trio as bb3

    URL = "nats://127.0.0.1:9"
    ENTRIES = {
        "open_client": lambda: bb3.open_client(
            bb3.Config(cluster_id="c", agent_id="a", nats_url=URL)
        ),
        "open_nats_transport": lambda: bb3.open_nats_transport(
            bb3.Config(cluster_id="c", agent_id="a", nats_url=URL)
        ),
        "open_embedded_nats": lambda: bb3.open_embedded_nats(),
        "run_pulse": lambda: bb3.run_pulse(bb3.PulseConfig(cluster_id="c", nats_url=URL)),
        "run_ha_pulse": lambda: bb3.run_ha_pulse(bb3.HAPulseConfig(cluster_id="c", nats_url=URL)),
        "run_reverb": lambda: bb3.run_reverb(bb3.ReverbConfig(cluster_id="c", nats_url=URL)),
        "serve_admin": lambda: bb3.serve_admin("127.0.0.1:0"),
    }

    async def each() -> dict[str, list[str]]:
        seen = {}
        for name, make in ENTRIES.items():
            opened = make()
            try:
                if hasattr(opened, "__aenter__"):
                    async with opened:
                        pass
                else:
                    await opened
            except Exception as exc:
                seen[name] = [type(exc).__name__, str(exc), str(isinstance(exc, bb3.BackbeatError))]
        return seen

    async def readme() -> None:
        cfg = bb3.Config(cluster_id="c", agent_id="a", nats_url=URL)
        async with bb3.open_client(cfg) as bb:
            await bb.wait_for_beat()

    if sys.argv[1] == "each":
        print(json.dumps(asyncio.run(each())))
    else:
        asyncio.run(readme())
    """
)


def run_under_asyncio(what: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", UNDER_ASYNCIO, what],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_open_client_under_asyncio_says_to_use_trio_in_a_short_traceback() -> None:
    done = run_under_asyncio("readme")
    assert done.returncode == 1
    err = done.stderr
    assert "misnesting" not in err
    assert "please file a bug" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("backbeat_trio._errors.NotUnderTrio: backbeat_trio runs under trio")
    assert "open_client was called under asyncio" in last
    assert "trio.run(" in last
    assert "trio_as_aio" in last
    assert len(err.splitlines()) < 40, err


def test_every_entry_point_that_opens_something_names_the_mistake() -> None:
    done = run_under_asyncio("each")
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert sorted(seen) == sorted(
        [
            "open_client",
            "open_nats_transport",
            "open_embedded_nats",
            "run_pulse",
            "run_ha_pulse",
            "run_reverb",
            "serve_admin",
        ]
    )
    for name, (kind, message, is_backbeat_error) in seen.items():
        assert kind == "NotUnderTrio", (name, kind, message)
        assert message.startswith(f"backbeat_trio runs under trio, and {name} was called")
        assert is_backbeat_error == "True"


async def test_the_asyncio_side_of_trio_asyncio_is_named_too() -> None:
    cfg = bb3.Config(cluster_id=CLUSTER, agent_id="a", nats_url="nats://127.0.0.1:9")

    async def from_asyncio() -> None:
        async with bb3.open_client(cfg):
            pass  # pragma: no cover

    async with trio_asyncio.open_loop():
        with pytest.raises(NotUnderTrio, match="open_client was called under asyncio"):
            await trio_asyncio.aio_as_trio(from_asyncio)()


def test_outside_any_event_loop() -> None:
    with pytest.raises(NotUnderTrio, match="run_pulse was called outside any async event loop"):
        require_trio("run_pulse")
    assert issubclass(NotUnderTrio, bb3.BackbeatError)
    assert issubclass(NotUnderTrio, RuntimeError)


async def test_inside_trio_nothing_is_raised() -> None:
    require_trio("open_client")
