"""One role of the process soak (tests/test_soak_hour.py) in a process of its own.

``python tests/_soak_roles.py ROLE URL CLUSTER AGENTS TEMPO``, ROLE one of ``pulse``, ``reverb``
or ``agents``. Each prints one JSON object per line on stdout: ``{"ready": ...}`` once it runs,
``{"stalled": ...}`` (the reverb) for every report that lists an agent ``stalled``, and
``{"result": ...}`` before it exits. It reads its commands from stdin: ``stop`` (the agents stop
claiming and wait until every claim is acknowledged; the pulse stops) or ``expect N`` (the
reverb waits until it has counted N claims, in windows or late, then reports its stream).

The agents' signing keys are derived from their index, so the reverb builds the same keyring
without a file between the processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from typing import Any

import nacl.signing
import trio

import backbeat_trio as bb3
from backbeat_trio._bridge.nats import open_nats_transport

RECONNECT_DELAY = 0.1
#: seconds a role waits for its last work (acknowledgements, counting) before giving up
FINAL_WAIT = 60.0


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def agent_key(index: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(hashlib.sha256(f"soak-agent-{index}".encode()).digest())


async def next_command() -> list[str]:
    line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
    return line.split() or ["stop"]  # stdin closed: the test is gone


async def run_pulse_role(url: str, cluster: str, tempo: int) -> None:
    cfg = bb3.PulseConfig(
        cluster_id=cluster, nats_url=url, tempo_bpm=tempo, reconnect_delay=RECONNECT_DELAY
    )
    async with trio.open_nursery() as nursery:
        pulse: bb3.PulseStatus = await nursery.start(bb3.run_pulse, cfg)
        say(ready="pulse")
        await next_command()
        nursery.cancel_scope.cancel()
    say(
        result={
            "published": pulse.published,
            "skipped_late": pulse.skipped_late,
            "skipped_disconnected": pulse.skipped_disconnected,
        }
    )


async def watch_stalled(status: bb3.ReverbStatus) -> None:
    seen = 0
    while True:
        await status.wait_for_report()
        new = min(status.reports - seen, len(status.history))
        seen = status.reports
        for report in list(status.history)[len(status.history) - new :]:
            stalled = sorted(i.agent_id for i in report.issues if i.kind == "stalled")
            if stalled:
                say(stalled=len(stalled), window=report.from_beat, wall=time.time())


async def run_reverb_role(url: str, cluster: str, n_agents: int) -> None:
    keyring = bb3.Keyring({f"agent-{i}": agent_key(i).verify_key for i in range(n_agents)})
    cfg = bb3.ReverbConfig(
        cluster_id=cluster, nats_url=url, keyring=keyring, reconnect_delay=RECONNECT_DELAY
    )
    async with open_nats_transport(cfg) as transport, trio.open_nursery() as nursery:
        status: bb3.ReverbStatus = await nursery.start(
            lambda task_status: bb3.run_reverb(cfg, transport=transport, task_status=task_status)
        )
        nursery.start_soon(watch_stalled, status)
        say(ready="reverb")
        command = await next_command()
        expected = int(command[1]) if command[0] == "expect" else 0
        watch = status.watch_claims(buffer=1)
        with trio.move_on_after(FINAL_WAIT):
            while status.claims_counted + status.claims_late < expected:
                await watch.receive()
        await trio.sleep(0.5)  # a claim counted twice would show by now
        stored = None
        if status.stream is not None:
            with trio.move_on_after(5):
                summary = await transport.jetstream.stream_summary(status.stream)
                stored = None if summary is None else summary.last_seq
        assert status._frame_counts is not None
        say(
            result={
                "counted": status.claims_counted,
                "late": status.claims_late,
                "rejected": status.rejected,
                "dropped": status.claims_dropped,
                "reports": status.reports,
                "issues": status.issues_by_kind,
                "stored": stored,
                "degraded": status._frame_counts().degraded_episodes,
            }
        )
        nursery.cancel_scope.cancel()


async def claim_every_beat(bb: bb3.Client, stop: trio.Event, counts: dict[str, int]) -> None:
    async for _frame in bb.beats(buffer=64):
        if stop.is_set():
            return
        claim = bb3.StatusClaim(task_id="work", state="executing", beats_left=1_000_000)
        await bb.emit_status(claim)
        counts["emitted"] += 1


async def run_agents_role(url: str, cluster: str, n_agents: int) -> None:
    counts = {"emitted": 0}
    stop = trio.Event()
    conn_cfg = bb3.Config(
        cluster_id=cluster, agent_id="agents-conn", nats_url=url, reconnect_delay=RECONNECT_DELAY
    )
    clients: list[bb3.Client] = []
    async with (
        open_nats_transport(conn_cfg) as conn,
        trio.open_nursery() as nursery,
        contextlib.AsyncExitStack() as stack,
    ):
        for i in range(n_agents):
            cfg = bb3.Config(
                cluster_id=cluster,
                agent_id=f"agent-{i}",
                nats_url=url,
                signing_key=agent_key(i),
                jetstream=True,
                jitter_tolerance=0.1,
            )
            bb = await stack.enter_async_context(bb3.open_client(cfg, transport=conn))
            clients.append(bb)
            nursery.start_soon(claim_every_beat, bb, stop, counts)
        say(ready="agents")
        await next_command()
        stop.set()
        flushed = False
        with trio.move_on_after(FINAL_WAIT):
            for bb in clients:
                await bb.flush_claims()
            flushed = True
        say(result={"emitted": counts["emitted"], "flushed": flushed})
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> None:
    role, url, cluster, n_agents, tempo = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4])
    if role == "pulse":
        trio.run(run_pulse_role, url, cluster, tempo)
    elif role == "reverb":
        trio.run(run_reverb_role, url, cluster, n_agents)
    elif role == "agents":
        trio.run(run_agents_role, url, cluster, n_agents)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
