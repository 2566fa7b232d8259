"""End to end over a real nats-server: the pulse, the reverb and several signed clients.

Bar reports arrive once per window with the right counts; a deadlock, a failure and forged or
unsigned claims show up in them; a tempo change lands on a downbeat and the clients' budgets
follow it; and ``examples/agent.py`` runs as a subprocess against the server and a pulse.
"""

from __future__ import annotations

import base64
import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
import trio
import trio_asyncio
from nacl.signing import SigningKey, VerifyKey

import backbeat_trio as bb3
from backbeat_trio._core.wire import encode, encode_claim

pytestmark = pytest.mark.nats

AGENTS = ("agent-1", "agent-2", "agent-3")
TEMPO = 300  # BPM: 200 ms beats, 800 ms windows
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "agent.py"


@dataclass
class Fleet:
    url: str
    cluster: str
    nc: Any  # a plain nats-py connection, for what the SDK must not be used to check
    pulse: bb3.PulseStatus
    reverb: bb3.ReverbStatus
    keys: dict[str, SigningKey]
    clients: dict[str, bb3.Client] = field(default_factory=dict)

    async def report_for(self, from_beat: int) -> bb3.BarReport:
        """The reverb's report of the window starting at ``from_beat`` (waits for it)."""
        with trio.fail_after(15):
            while True:
                for report in self.reverb.history:
                    if report.from_beat == from_beat:
                        return report
                await self.reverb.wait_for_report()


@contextlib.asynccontextmanager
async def open_fleet(url: str, cluster: str) -> AsyncIterator[Fleet]:
    keys = {agent: bb3.generate_signing_key() for agent in AGENTS}
    ring = bb3.Keyring({agent: key.verify_key for agent, key in keys.items()})
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        nc = await trio_asyncio.aio_as_trio(nats.connect)(url)
        try:
            pulse = await nursery.start(
                bb3.run_pulse,
                bb3.PulseConfig(
                    cluster_id=cluster, nats_url=url, tempo_bpm=TEMPO, max_tempo_step=None
                ),
            )
            reverb = await nursery.start(
                bb3.run_reverb, bb3.ReverbConfig(cluster_id=cluster, nats_url=url, keyring=ring)
            )
            fleet = Fleet(url, cluster, nc, pulse, reverb, keys)
            async with contextlib.AsyncExitStack() as stack:
                for agent in AGENTS:
                    cfg = bb3.Config(
                        cluster_id=cluster,
                        agent_id=agent,
                        nats_url=url,
                        signing_key=keys[agent],
                        jetstream=True,  # the reverb made the stream: claims are acked
                        jitter_tolerance=0.1,
                    )
                    fleet.clients[agent] = await stack.enter_async_context(bb3.open_client(cfg))
                yield fleet
            nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await trio_asyncio.aio_as_trio(nc.close)()


STATE_OF_PHASE = {"plan": "planning", "execute": "executing", "review": "review"}


async def test_bar_reports_count_claims_and_flag_deadlock_failure_and_forgeries(
    nats_url: str,
) -> None:
    cluster = "e2e-bars"
    bar_subject = f"backbeat.bar.{cluster}"
    async with open_fleet(nats_url, cluster) as fleet:
        bars = await trio_asyncio.aio_as_trio(fleet.nc.subscribe)(bar_subject)
        first = fleet.clients["agent-1"]
        with trio.fail_after(10):
            now = (await first.wait_for_beat()).beat_index
        w = bb3.bar_start(now) + 8  # two bars ahead: every agent is listening by then

        async def agent(name: str, chan: bb3.DropOldestChannel[bb3.BeatFrame]) -> None:
            bb = fleet.clients[name]
            async for frame in chan:
                i = frame.beat_index
                if i < w:
                    continue
                if i >= w + 8:
                    return
                if i < w + 4:  # a normal bar: plan, execute, execute, review
                    claim = bb3.StatusClaim(
                        task_id=f"{name}-t1",
                        state=STATE_OF_PHASE[frame.phase],  # type: ignore[arg-type]
                        progress=(i - w + 1) / 4,
                        beats_left=w + 4 - i,
                    )
                elif name == "agent-3":  # fails once, executes otherwise
                    state = "failed" if i == w + 5 else "executing"
                    claim = bb3.StatusClaim(
                        task_id=f"{name}-t2", state=state, beats_left=2, notes="disk full"
                    )
                else:  # agent-1 and agent-2 wait on each other: a deadlock
                    other = "agent-2" if name == "agent-1" else "agent-1"
                    claim = bb3.StatusClaim(
                        task_id=f"{name}-t2",
                        state="waiting",
                        wait_for=[f"agent://{other}"],
                        beats_left=2,
                    )
                await bb.emit_status(claim)

        async def forger() -> None:
            # once window w is reported, four bad claims go out during window w + 4
            await fleet.report_for(w)
            unsigned = encode_claim(
                bb3.StatusClaim(agent_id="agent-1", task_id="x", hlc="1:0:1", state="done")
            )
            forged = encode_claim(
                bb3.StatusClaim(agent_id="agent-2", task_id="x", hlc="1:0:2", state="done")
            )
            mallory = bb3.generate_signing_key()
            headers = bb3.sign_headers(mallory, "agent-2", forged)
            stranger = encode_claim(
                bb3.StatusClaim(agent_id="mallory", task_id="x", hlc="1:0:3", state="done")
            )
            subject = f"backbeat.status.{cluster}"
            publish = trio_asyncio.aio_as_trio(fleet.nc.publish)
            await publish(subject, unsigned)
            await publish(subject, forged, headers=headers)
            await publish(subject, stranger, headers=bb3.sign_headers(mallory, "mallory", stranger))
            await publish(subject, unsigned.replace(b'"x"', b'"\xff"'))  # not even UTF-8
            await trio_asyncio.aio_as_trio(fleet.nc.flush)()

        async with trio.open_nursery() as nursery:
            for name in AGENTS:
                nursery.start_soon(agent, name, fleet.clients[name].beats(buffer=64))
            nursery.start_soon(forger)
        normal = await fleet.report_for(w)
        trouble = await fleet.report_for(w + 4)
        for client in fleet.clients.values():
            with trio.fail_after(10):
                await client.flush_claims()
        published = []
        with trio.fail_after(10):
            while True:
                msg = await trio_asyncio.aio_as_trio(bars.next_msg)(timeout=10)
                published.append(msgspec.json.decode(msg.data, type=bb3.BarReport))
                if published[-1].from_beat >= w + 4:
                    break

    # window w: every agent, every beat, counted once
    assert normal.window_id == bb3.window_id(cluster, w)
    assert (normal.from_beat, normal.to_beat) == (w, w + 3)
    assert normal.agents_reporting == 3
    assert normal.claims == 12
    assert normal.by_state == {"planning": 3, "executing": 6, "review": 3}
    assert normal.on_time_reviews == 3
    assert normal.rejected == 0
    assert normal.late == 0
    assert normal.mean_progress == pytest.approx(1.0)
    assert normal.issues == []
    assert normal.blocked == []
    # window w + 4: the deadlock, the failure and the four bad claims
    assert trouble.claims == 12
    assert trouble.by_state == {"executing": 3, "waiting": 8, "failed": 1}
    assert trouble.blocked == ["agent-1", "agent-2"]
    kinds = {(issue.kind, issue.agent_id) for issue in trouble.issues}
    assert ("failed", "agent-3") in kinds
    deadlocks = [issue for issue in trouble.issues if issue.kind == "deadlock"]
    assert len(deadlocks) == 1
    assert "agent-1" in deadlocks[0].detail
    assert "agent-2" in deadlocks[0].detail
    assert trouble.rejected == 4
    assert fleet.reverb.rejection_reasons.get("unsigned") == 1
    assert fleet.reverb.rejection_reasons.get("schema") == 1
    assert sum(fleet.reverb.rejection_reasons.values()) == 4
    # published once per window, windows in order, each the one the reverb closed
    starts = [r.from_beat for r in published]
    assert starts == list(range(starts[0], starts[-1] + 1, 4))
    assert [r.window_id for r in published] == [bb3.window_id(cluster, s) for s in starts]
    by_start = {r.from_beat: r for r in published}
    assert by_start[w] == normal
    assert by_start[w + 4] == trouble


async def test_tempo_change_lands_on_a_downbeat_and_budgets_follow(nats_url: str) -> None:
    cluster = "e2e-tempo"
    async with open_fleet(nats_url, cluster) as fleet:
        chans = {name: bb.beats(buffer=128) for name, bb in fleet.clients.items()}
        elapsed: dict[str, float] = {}

        async def budgeted(name: str, *, task_status: trio.TaskStatus[None]) -> None:
            bb = fleet.clients[name]
            task_status.started()
            await bb.wait_for_downbeat()
            t0 = trio.current_time()
            with bb.beat_budget(8):
                await trio.sleep_forever()
            elapsed[name] = trio.current_time() - t0

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for name in AGENTS:
                    await nursery.start(budgeted, name)
                downbeat = await fleet.clients["agent-1"].wait_for_downbeat()
                change = bb3.TempoChange(
                    cluster_id=cluster, tempo_bpm=TEMPO * 2, requested_by="e2e", reason="faster"
                )
                answer = await trio_asyncio.aio_as_trio(fleet.nc.request)(
                    f"backbeat.tempo.{cluster}", encode(change), timeout=5
                )
            frames = {
                name: [chan.receive_nowait() for _ in range(chan.pending)]
                for name, chan in chans.items()
            }
    decision = msgspec.json.decode(answer.data)
    assert decision["accepted"] is True
    effective = decision["effective_beat"]
    assert effective == downbeat.beat_index + 4
    for name in AGENTS:
        seen = frames[name]
        faster = [f for f in seen if f.tempo_bpm == TEMPO * 2]
        slower = [f for f in seen if f.tempo_bpm == TEMPO]
        assert faster[0].beat_index == effective
        assert faster[0].downbeat  # the new tempo starts a bar, never mid-bar
        assert max(f.beat_index for f in slower) == effective - 1
        # 4 beats at 200 ms, then 4 at 100 ms: 1.2 s (1.6 s had the budget ignored the change)
        assert elapsed[name] == pytest.approx(1.2, abs=0.15), (name, elapsed)
    assert fleet.pulse.tempo_changes == 1


async def test_example_agent_runs_against_a_server_and_a_pulse(
    nats_url: str, tmp_path: Path
) -> None:
    cluster = "e2e-example"
    key = bb3.generate_signing_key()
    key_file = tmp_path / "ex-1.key"
    bb3.save_signing_key(key, key_file)
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        nc = await trio_asyncio.aio_as_trio(nats.connect)(nats_url)
        try:
            claims = await trio_asyncio.aio_as_trio(nc.subscribe)(f"backbeat.status.{cluster}")
            await trio_asyncio.aio_as_trio(nc.flush)()
            await nursery.start(
                bb3.run_pulse, bb3.PulseConfig(cluster_id=cluster, nats_url=nats_url, tempo_bpm=600)
            )
            argv = [sys.executable, str(EXAMPLE), "--nats-url", nats_url, "--cluster", cluster]
            argv += ["--agent", "ex-1", "--key", str(key_file), "--tasks", "3"]
            with trio.fail_after(30):
                done = await trio.run_process(
                    argv, capture_stdout=True, capture_stderr=True, check=False
                )
            out = done.stdout.decode()
            assert done.returncode == 0, (out, done.stderr.decode())
            health = msgspec.json.decode(out.strip().splitlines()[-1].removeprefix("health: "))
            # the agent flushed before it printed: every claim it sent is on its way to us
            received = [
                await trio_asyncio.aio_as_trio(claims.next_msg)(timeout=5)
                for _ in range(health["metrics"]["claims_ok"])
            ]
            assert claims.pending_msgs == 0
        finally:
            with trio.CancelScope(shield=True):
                await trio_asyncio.aio_as_trio(nc.close)()
        nursery.cancel_scope.cancel()

    assert "ex-1 joined e2e-example" in out
    assert "-- bar at beat" in out
    assert "ex-1-task-1 done" in out
    assert health["metrics"]["beats"] >= 11  # three tasks of three beats, one a bar
    assert health["metrics"]["claims_ok"] >= 8
    assert health["connected"] is True
    assert isinstance(health["time_drift"], int)
    states = [msgspec.json.decode(m.data)["state"] for m in received]
    assert "planning" in states
    assert "executing" in states
    assert "done" in states
    verify_key = VerifyKey(bytes(key.verify_key))
    for msg in received:
        verify_key.verify(msg.data, base64.b64decode(msg.headers["Backbeat-Sig"]))
        assert msg.headers["Backbeat-Agent"] == "ex-1"
