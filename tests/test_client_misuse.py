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
import logging
import math
import os
import subprocess
import sys
import textwrap
import time

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


# --- no beat after connecting: a wrong cluster id, or no pulse -----------------------------------
def no_beat_warnings(caplog: pytest.LogCaptureFixture, cluster: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "backbeat_trio.client"
        and r.levelno == logging.WARNING
        and f"no beat on backbeat.beat.{cluster} " in r.getMessage()
    ]


class _SetOnRecord(logging.Handler):
    """Sets ``event`` when a record containing ``text`` is logged (in the trio thread)."""

    def __init__(self, event: trio.Event, text: str) -> None:
        super().__init__(logging.WARNING)
        self.event, self.text = event, text

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def says_what_to_check(text: str, cluster: str) -> bool:
    return (
        f"backbeat.beat.{cluster}" in text
        and f"{cluster!r} is the cluster id" in text
        and "a pulse is running" in text
    )


async def test_no_first_beat_warns_once_on_virtual_time(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="backbeat_trio.client")
    async with (
        bbt.open_fake_cluster(CLUSTER, tempo_bpm=60, start=False) as cluster,
        cluster.open_client(first_beat_warning=5) as bb,
    ):
        t0 = trio.current_time()
        await trio.sleep(4.9)
        assert no_beat_warnings(caplog, CLUSTER) == []
        assert bb.health().errors == []
        await trio.sleep(0.2)
        [warning] = no_beat_warnings(caplog, CLUSTER)
        assert says_what_to_check(warning.getMessage(), CLUSTER)
        assert "in the 5 s since connecting" in warning.getMessage()
        [error] = bb.health().errors or []
        assert error == warning.getMessage()
        assert bb.metrics.errors == 1
        await trio.sleep(600)  # once: not again however long the silence
        assert len(no_beat_warnings(caplog, CLUSTER)) == 1
        await cluster.start_pulse()
        await bb.wait_for_beat()
        await trio.sleep(0.1)  # the sampler notes the first beat after the consumers have it
        firsts = [r for r in caplog.records if r.getMessage().startswith("first beat on")]
        assert len(firsts) == 1
        assert trio.current_time() - t0 > 600


async def test_no_warning_with_a_pulse_or_when_turned_off(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="backbeat_trio.client")
    async with bbt.open_fake_cluster(CLUSTER, tempo_bpm=60) as cluster:
        async with cluster.open_client(first_beat_warning=2) as bb:
            await trio.sleep(30)
            assert bb.health().errors == []
        async with cluster.open_client(first_beat_warning=None) as bb:
            cluster.stop_pulse()
            await trio.sleep(30)
    assert no_beat_warnings(caplog, CLUSTER) == []


@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf, "10", True])
def test_first_beat_warning_is_validated(value: object) -> None:
    with pytest.raises(bb3.ConfigError, match="first_beat_warning"):
        bb3.Config(cluster_id=CLUSTER, agent_id="a", first_beat_warning=value)  # type: ignore[arg-type]


def test_first_beat_warning_from_the_environment() -> None:
    env = {"BACKBEAT_CLUSTER_ID": CLUSTER, "BACKBEAT_AGENT_ID": "a"}
    assert bb3.Config.from_env(env).first_beat_warning == 10.0
    cfg = bb3.Config.from_env({**env, "BACKBEAT_FIRST_BEAT_WARNING": "0.5"})
    assert cfg.first_beat_warning == 0.5


@pytest.mark.nats
async def test_a_wrong_cluster_id_warns_once_over_nats(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="backbeat_trio.client")
    right, wrong = "misuse-right", "misuse-wrong"
    async with trio.open_nursery() as nursery:
        await nursery.start(
            bb3.run_pulse, bb3.PulseConfig(cluster_id=right, nats_url=nats_url, tempo_bpm=600)
        )
        lost = bb3.Config(
            cluster_id=wrong, agent_id="lost", nats_url=nats_url, first_beat_warning=0.5
        )
        fine = bb3.Config(
            cluster_id=right, agent_id="fine", nats_url=nats_url, first_beat_warning=0.5
        )
        warned = trio.Event()
        handler = _SetOnRecord(warned, f"no beat on backbeat.beat.{wrong} ")
        logging.getLogger("backbeat_trio.client").addHandler(handler)
        started = time.time()
        try:
            async with bb3.open_client(lost) as bb_lost, bb3.open_client(fine) as bb_fine:
                with trio.fail_after(10):
                    await warned.wait()
                # within the bound (counted from the subscription, a little after connecting;
                # the upper end leaves room for a loaded machine)
                assert 0.5 <= time.time() - started < 3.0
                await trio.sleep(1.0)  # and once
                [warning] = no_beat_warnings(caplog, wrong)
                assert says_what_to_check(warning.getMessage(), wrong)
                health = bb_lost.health()
                assert health.connected
                assert health.errors == [warning.getMessage()]
                # the client on the right cluster has its beats and says nothing
                assert bb_fine.current_beat is not None
                assert bb_fine.health().errors == []
        finally:
            logging.getLogger("backbeat_trio.client").removeHandler(handler)
        nursery.cancel_scope.cancel()
    assert no_beat_warnings(caplog, right) == []


@pytest.mark.nats
async def test_clients_sharing_a_connection_warn_once_for_all(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="backbeat_trio.client")
    cluster = "misuse-shared"
    cfg = bb3.Config(cluster_id=cluster, agent_id="a", nats_url=nats_url, first_beat_warning=0.3)
    async with (
        bb3.open_nats_transport(cfg) as transport,
        bb3.open_client(cfg, transport=transport) as a,
        bb3.open_client(cfg, transport=transport) as b,
        bb3.open_client(cfg, transport=transport) as c,
    ):
        await trio.sleep(1.0)
    assert len(no_beat_warnings(caplog, cluster)) == 1
    for bb in (a, b, c):
        [error] = bb.health().errors or []
        assert says_what_to_check(error, cluster)


# --- the CLI says the same ------------------------------------------------------------------
def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BACKBEAT_") or k == "BACKBEAT_NATS_SERVER"
    }
    return subprocess.run(
        [sys.executable, "-m", "backbeat_trio", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean | env,
        check=False,
    )


@pytest.mark.nats
def test_tail_and_health_say_what_to_check_when_nothing_arrives(nats_url: str) -> None:
    cluster = "misuse-cli"
    quick = {"BACKBEAT_FIRST_BEAT_WARNING": "0.3"}
    tail = run_cli("tail", "--beats", "--timeout", "1.5", "-s", nats_url, "-c", cluster, **quick)
    assert tail.returncode == 1, tail.stderr
    assert says_what_to_check(tail.stderr, cluster), tail.stderr
    assert tail.stderr.count("no beat on") == 1
    assert "timed out after 1.5 s with 0 message(s)" in tail.stderr
    claims = run_cli("tail", "--claims", "--timeout", "1", "-s", nats_url, "-c", cluster, **quick)
    assert f"nothing on backbeat.status.{cluster} in the 0.3 s" in claims.stderr, claims.stderr
    assert "an agent is emitting claims" in claims.stderr
    health = run_cli("health", "--timeout", "1", "-s", nats_url, "-c", cluster, **quick)
    assert health.returncode == 1, health.stderr
    assert says_what_to_check(health.stderr, cluster), health.stderr
    # the client's own warning is in the snapshot's errors too
    assert says_what_to_check(" ".join(json.loads(health.stdout)["errors"]), cluster)


@pytest.mark.nats
async def test_tail_with_a_pulse_gives_no_hint(nats_url: str) -> None:
    cluster = "misuse-cli-pulse"
    async with trio.open_nursery() as nursery:
        await nursery.start(
            bb3.run_pulse, bb3.PulseConfig(cluster_id=cluster, nats_url=nats_url, tempo_bpm=600)
        )
        tail = await trio.to_thread.run_sync(
            lambda: run_cli(
                "tail",
                "--beats",
                "--timeout",
                "1",
                "-s",
                nats_url,
                "-c",
                cluster,
                BACKBEAT_FIRST_BEAT_WARNING="0.3",
            )
        )
        nursery.cancel_scope.cancel()
    assert tail.returncode == 0, tail.stderr
    assert "no beat on" not in tail.stderr
    assert tail.stdout.count("beat ") >= 3
