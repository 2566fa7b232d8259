"""Many agents in one process, on one NATS connection.

Run it as ``examples/agent.py`` (a nats-server, a pulse and a reverb for the cluster)::

    backbeat-trio server &
    backbeat-trio pulse --cluster demo --tempo 120 &
    backbeat-trio reverb --cluster demo --allow-unsigned &
    python examples/many_agents.py --cluster demo --agents 50

The process opens one connection with ``open_nats_transport`` and hands it to every agent's
``open_client(cfg, transport=conn)``. The agents then share one subscription to the beat (the
server sends each beat once; it is decoded and judged once, clock offset and degradation
included, and handed to every agent, each keeping its own budgets and channels) and one writer
for their claims. Each agent still has
its own ``Config``: its id, and its signing key if it has one. The connection's settings
(servers, credentials, reconnects) are those of the config it was opened with. See
``docs/scale.md``, "When to share a connection".

Each agent does ``--tasks`` tasks, one a bar: ``executing`` on the downbeat, two beats of work
under a three-beat budget, then ``done``. An agent that is through leaves (its client closes
its own part only) while the others go on; the connection closes after the last. The last line
sums up what every agent saw and sent. ``-s/--nats-url`` and ``-c/--cluster`` default to
``BACKBEAT_NATS_URL`` and ``BACKBEAT_CLUSTER_ID``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import trio

import backbeat_trio as bb3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "-s",
        "--nats-url",
        default=env("BACKBEAT_NATS_URL", "nats://127.0.0.1:4222"),
        help="NATS URL(s), comma separated",
    )
    p.add_argument("-c", "--cluster", default=env("BACKBEAT_CLUSTER_ID", "demo"))
    p.add_argument("--agents", type=int, default=20, help="agents in this process")
    p.add_argument("--tasks", type=int, default=3, help="tasks each agent does, one a bar")
    return p.parse_args(argv)


@dataclasses.dataclass
class Tally:
    """What the agents did, summed as each one leaves."""

    agents_done: int = 0
    tasks_done: int = 0
    tasks_failed: int = 0
    claims_ok: int = 0
    claims_acked: int = 0
    fewest_beats: int | None = None


async def run_agent(cfg: bb3.Config, conn: bb3.NatsTransport, tasks: int, tally: Tally) -> None:
    """One agent: its own client, on the shared connection."""
    async with bb3.open_client(cfg, transport=conn) as bb:
        for n in range(1, tasks + 1):
            await bb.wait_for_downbeat()
            task_id = f"{cfg.agent_id}-task-{n}"
            await bb.emit_status(bb3.StatusClaim(task_id=task_id, state="executing", beats_left=2))
            with bb.beat_budget(3) as budget:  # a trio CancelScope counted in beats
                await bb.wait_for_beat()  # the work: two beats here
                await bb.wait_for_beat()
            if budget.cancelled_caught:
                tally.tasks_failed += 1
                await bb.emit_status(
                    bb3.StatusClaim(task_id=task_id, state="failed", notes="ran out of beats")
                )
            else:
                tally.tasks_done += 1
                await bb.emit_status(bb3.StatusClaim(task_id=task_id, state="done", progress=1.0))
        await bb.flush_claims()  # every claim acknowledged (or confirmed) before it leaves
        metrics = bb.metrics
    tally.agents_done += 1
    tally.claims_ok += metrics.claims_ok
    tally.claims_acked += metrics.claims_acked
    if tally.fewest_beats is None or metrics.beats < tally.fewest_beats:
        tally.fewest_beats = metrics.beats


async def main(args: argparse.Namespace) -> int:
    # the connection's own identity and settings (credentials, TLS: BACKBEAT_* variables)
    base = bb3.Config.from_env(
        cluster_id=args.cluster, agent_id="many-agents", nats_url=args.nats_url
    )
    tally = Tally()
    async with bb3.open_nats_transport(base) as conn:
        print(f"{args.agents} agents on one connection to {args.nats_url}", flush=True)
        async with trio.open_nursery() as nursery:
            for i in range(1, args.agents + 1):
                # each agent its own Config: its own id (and signing_key=..., if it signs)
                cfg = dataclasses.replace(base, agent_id=f"agent-{i}")
                nursery.start_soon(run_agent, cfg, conn, args.tasks, tally)
    print(
        f"{tally.agents_done} agents done: {tally.tasks_done} tasks done, "
        f"{tally.tasks_failed} failed; {tally.claims_ok} claims sent, {tally.claims_acked} "
        f"acknowledged by JetStream; every agent saw at least {tally.fewest_beats} beats",
        flush=True,
    )
    return 0 if tally.agents_done == args.agents else 1


if __name__ == "__main__":
    arguments = parse_args()
    try:
        sys.exit(trio.run(main, arguments))
    except bb3.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    except bb3.NotConnected as exc:
        print(f"cannot reach NATS: {exc}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        sys.exit(130)
