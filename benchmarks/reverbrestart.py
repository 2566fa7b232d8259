"""Benchmark 13, the reverb after a nats-server restart: how long is it blind beyond the outage?

One nats-server with JetStream, a pulse and a reverb (with a keyring) in this process, and
signed JetStream agents on one shared connection, each claiming every beat. The server is
SIGKILLed, left down for several beats, and started again (3 times; 2 with ``--quick``). Per
restart: the time from the server's launch until the reverb counts a claim in a window again
(its "blind" time beyond the outage; the launch is an upper bound on when the server accepted
connections), how many reports listed an agent ``stalled`` (whose claims waited in its outbox:
falsely), and whether every claim emitted was counted exactly once in the end. Goal: blind
≤ 1 s.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio

import backbeat_trio as bb3
from backbeat_trio._embedded import open_embedded_nats_process
from benchmarks._runner import Outcome, Params, solo_row

BENCH = "13 Reverb after a restart"
TEMPO = 600
DOWN_S = 0.5  # five beats with no server


class _Agents:
    def __init__(self) -> None:
        self.emitted = 0
        self.clients: list[bb3.Client] = []
        self.stop = trio.Event()

    async def claim_every_beat(self, bb: bb3.Client) -> None:
        claim = bb3.StatusClaim(task_id="work", state="executing", beats_left=1_000, progress=0.5)
        async for _frame in bb.beats(buffer=64):
            if self.stop.is_set():
                return
            await bb.emit_status(claim)
            self.emitted += 1


@contextlib.asynccontextmanager
async def _agents(
    url: str, cluster: str, keys: dict[str, bb3.SigningKey]
) -> AsyncIterator[_Agents]:
    agents = _Agents()
    conn_cfg = bb3.Config(cluster_id=cluster, agent_id="conn", nats_url=url, reconnect_delay=0.1)
    async with (
        bb3.open_nats_transport(conn_cfg) as conn,
        trio.open_nursery() as nursery,
        contextlib.AsyncExitStack() as stack,
    ):
        for agent_id, key in keys.items():
            cfg = bb3.Config(
                cluster_id=cluster,
                agent_id=agent_id,
                nats_url=url,
                signing_key=key,
                jetstream=True,
                jitter_tolerance=0.1,
            )
            bb = await stack.enter_async_context(bb3.open_client(cfg, transport=conn))
            agents.clients.append(bb)
            nursery.start_soon(agents.claim_every_beat, bb)
        yield agents
        agents.stop.set()
        with trio.move_on_after(30):
            for bb in agents.clients:
                await bb.flush_claims()
        nursery.cancel_scope.cancel()


async def bench_reverbrestart(p: Params, out: Outcome, logdir: object) -> None:
    restarts = 2 if p.quick else 3
    n_agents = 10 if p.quick else 50
    cluster = "bench-reverb-restart"
    keys = {f"agent-{i}": bb3.generate_signing_key() for i in range(n_agents)}
    keyring = bb3.Keyring({agent: key.verify_key for agent, key in keys.items()})
    blind: list[float] = []
    stalled: list[float] = []
    async with open_embedded_nats_process(jetstream=True) as server:
        url = server.url
        pulse_cfg = bb3.PulseConfig(
            cluster_id=cluster, nats_url=url, tempo_bpm=TEMPO, reconnect_delay=0.1
        )
        reverb_cfg = bb3.ReverbConfig(
            cluster_id=cluster, nats_url=url, keyring=keyring, reconnect_delay=0.1
        )
        with trio.fail_after(60 + restarts * 30):
            async with trio.open_nursery() as nursery:
                await nursery.start(bb3.run_pulse, pulse_cfg)
                status: bb3.ReverbStatus = await nursery.start(bb3.run_reverb, reverb_cfg)
                watch = status.watch_claims(buffer=1_000_000)  # every accepted claim
                await status.first_beat.wait()
                async with _agents(url, cluster, keys) as agents:
                    while len(status.latest_claims) < n_agents:
                        await status.wait_for_report()
                    for _ in range(restarts):
                        await trio.sleep(2.0)
                        before = status.issues_by_kind.get("stalled", 0)
                        server.kill()
                        await trio.sleep(DOWN_S)
                        launched = trio.current_time()
                        await trio.to_thread.run_sync(server.start)
                        counted = status.claims_counted
                        while status.claims_counted <= counted:
                            await watch.receive()
                        blind.append(trio.current_time() - launched)
                        await trio.sleep(3.0)  # the windows of the outage are reported
                        stalled.append(float(status.issues_by_kind.get("stalled", 0) - before))
                emitted = agents.emitted  # every one acknowledged by the stream
                with trio.move_on_after(30):
                    while status.claims_counted + status.claims_late < emitted:
                        await watch.receive()
                await trio.sleep(0.5)
                once = status.claims_counted + status.claims_late == emitted
                nursery.cancel_scope.cancel()
    out.rows.append(
        solo_row(
            BENCH,
            f"blind beyond the outage ({n_agents} signed agents, {TEMPO} BPM, server down "
            f"{DOWN_S} s)",
            "s",
            blind,
            "≤ 1 s",
            max(blind) <= 1.0,
        )
    )
    out.rows.append(
        solo_row(BENCH, "agents reported stalled per restart", "", stalled, "0", max(stalled) == 0)
    )
    out.rows.append(
        solo_row(BENCH, "claims counted exactly once", "", [float(once)], "1 (yes)", once)
    )
