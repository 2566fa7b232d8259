"""The reverb's own bounds: its live view of agents, and claims lost to a full buffer."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

import backbeat_trio as bb3
from backbeat_trio._core.beats import status_subject
from backbeat_trio._core.hlc import HLC
from backbeat_trio._core.wire import encode_claim
from backbeat_trio._services import reverb as _reverb
from backbeat_trio.testing import FakeCluster, open_fake_cluster, virtual_wall_clock


def _claim(agent: str, hlc: HLC) -> bytes:
    return encode_claim(
        bb3.StatusClaim(agent_id=agent, task_id="task:00000001", hlc=str(hlc.now()))
    )


@contextlib.asynccontextmanager
async def open_reverb(cluster_id: str) -> AsyncIterator[tuple[FakeCluster, bb3.ReverbStatus]]:
    """A fake cluster at 600 BPM with a reverb taking unsigned claims on its virtual wall clock;
    the reverb is stopped when the block ends."""
    async with open_fake_cluster(cluster_id, tempo_bpm=600) as cluster:
        cfg = bb3.ReverbConfig(cluster_id=cluster_id, allow_unsigned=True)
        transport = cluster.broker.connect()
        async with trio.open_nursery() as nursery:
            status = await nursery.start(
                lambda task_status: _reverb.run_reverb(
                    cfg,
                    transport=transport,
                    wall_clock=virtual_wall_clock,
                    task_status=task_status,
                )
            )
            await status.first_beat.wait()  # claims are read from the first beat on
            yield cluster, status
            nursery.cancel_scope.cancel()


async def test_latest_claims_keeps_the_most_recent_agents_only(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_reverb, "MAX_TRACKED_AGENTS", 50)
    async with open_reverb("limits") as (cluster, status):
        hlc = HLC("sender")
        for i in range(60):
            cluster.publish_raw(_claim(f"agent-{i}", hlc), status_subject("limits"))
        # one agent heard again moves to the newest end and survives the cut
        cluster.publish_raw(_claim("agent-3", hlc), status_subject("limits"))
        await trio.testing.wait_all_tasks_blocked()  # the reverb has read every claim
        assert status.claims_counted == 61
    kept = list(status.latest_claims)
    assert len(kept) == 50
    assert kept[-1] == "agent-3"
    assert "agent-0" not in kept
    assert "agent-59" in kept


async def test_claims_lost_to_a_full_buffer_are_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_reverb("flooded") as (cluster, status):
        hlc = HLC("flooder")
        body = _claim("flooder", hlc)
        sent = 65_536 + 100  # one more burst than the claim buffer holds, without yielding
        for _ in range(sent):
            cluster.publish_raw(body, status_subject("flooded"))
        cluster.publish_raw(_claim("flooder", hlc), status_subject("flooded"))
        await trio.testing.wait_all_tasks_blocked()  # the reverb has read what it kept
    # every claim is accounted for: counted once, refused as a replay of it, or dropped (the
    # buffer holds 65,536 plus the one handed straight to the waiting reader)
    assert status.claims_counted == 1
    assert status.claims_counted + status.rejected + status.claims_dropped == sent + 1
    assert status.claims_dropped >= 100
