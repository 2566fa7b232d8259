"""An agent that follows the beat, works under beat budgets and reports status claims.

Run it against a nats-server with a pulse beating for its cluster (and a reverb, to see the
bar reports it earns)::

    backbeat-trio server &                                  # a nats-server on 127.0.0.1:4222
    backbeat-trio pulse --cluster demo --tempo 120 &
    backbeat-trio reverb --cluster demo --allow-unsigned &  # prints one bar report per bar
    python examples/agent.py --cluster demo --agent agent-7

``-s/--nats-url``, ``-c/--cluster`` and ``-a/--agent`` are spelled as in ``backbeat-trio`` and
default to ``BACKBEAT_NATS_URL``, ``BACKBEAT_CLUSTER_ID`` and ``BACKBEAT_AGENT_ID``; NATS
credentials and TLS files come from the variables :meth:`backbeat_trio.Config.from_env` reads.
With ``--key agent-7.key`` (``backbeat-trio keygen -a agent-7 --keyring keys.toml`` writes it;
then run the reverb with ``--keyring keys.toml``) its claims are signed.

It does ``--tasks`` tasks, one per bar (0: until Ctrl-C), and prints its health, in the Go
SDK's ``HealthStatus`` JSON shape, as its last line. Bar after bar:

* on the downbeat (the ``plan`` phase) it starts a task and claims ``planning`` with its
  estimate, ``beats_left``;
* it works one beat at a time, claiming ``executing`` with its progress and what is left, all
  inside ``with_beat_budget(--budget, ...)``: a budget counted in beats, so it stretches and
  shrinks with the tempo and keeps running (on the client's own metronome) if the pulse goes
  quiet;
* a task that fits its budget ends with ``done``: the bar report shows no issue. With
  ``--slow-every N`` every Nth task needs more beats than it estimated and than its budget: the
  report then shows it ``overrun`` (its estimate ran out) and ``failed`` (its budget did).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import msgspec
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
    p.add_argument("-a", "--agent", default=env("BACKBEAT_AGENT_ID", "agent-1"))
    p.add_argument("--key", help="ed25519 signing key file (optional)")
    p.add_argument("--tasks", type=int, default=4, help="tasks to do, one a bar (0: no end)")
    p.add_argument("--budget", type=int, default=4, help="beat budget of one task")
    p.add_argument("--task-beats", type=int, default=3, help="beats of work one task needs")
    p.add_argument("--slow-every", type=int, default=0, help="make every Nth task too slow")
    return p.parse_args(argv)


async def do_task(bb: bb3.Client, task_id: str, beats_needed: int, estimate: int) -> None:
    """The work itself: here one step per beat, each but the last reported as a claim."""
    for step in range(1, beats_needed + 1):
        await bb.wait_for_beat()  # real work would go here; the budget cancels it if too slow
        if step < beats_needed:
            await bb.emit_status(
                bb3.StatusClaim(
                    task_id=task_id,
                    state="executing",
                    progress=step / beats_needed,
                    # what is left of the estimate; 0 while still at work would be an overrun
                    beats_left=max(estimate - step, 0),
                    notes=f"step {step}/{beats_needed}",
                )
            )


async def work(bb: bb3.Client, args: argparse.Namespace) -> None:
    """Run tasks back to back, one per bar at most, each under its beat budget."""
    task_no = 0
    while args.tasks == 0 or task_no < args.tasks:
        start = await bb.wait_for_downbeat()  # start a task where a bar starts: its plan phase
        task_no += 1
        task_id = f"{args.agent}-task-{task_no}"
        slow = args.slow_every > 0 and task_no % args.slow_every == 0
        beats_needed = args.budget + 1 if slow else args.task_beats
        await bb.emit_status(
            bb3.StatusClaim(task_id=task_id, state="planning", beats_left=args.task_beats)
        )
        print(f"beat {start.beat_index}: {task_id} needs {beats_needed} beat(s)", flush=True)
        try:
            # Go's WithBeatBudget: cancel the work when `budget` beats have passed
            await bb.with_beat_budget(
                args.budget, do_task, bb, task_id, beats_needed, args.task_beats
            )
        except bb3.BeatBudgetExceeded:
            await bb.emit_status(
                bb3.StatusClaim(task_id=task_id, state="failed", notes="ran out of beats")
            )
            print(f"beat {bb.current_beat}: {task_id} failed (budget exceeded)", flush=True)
        else:
            await bb.emit_status(bb3.StatusClaim(task_id=task_id, state="done", progress=1.0))
            print(f"beat {bb.current_beat}: {task_id} done", flush=True)


async def main(args: argparse.Namespace) -> int:
    settings: dict[str, Any] = {
        "cluster_id": args.cluster,
        "agent_id": args.agent,
        "nats_url": args.nats_url,
    }
    if args.key:  # over BACKBEAT_SIGNING_KEY, which from_env reads; neither: unsigned claims
        settings["signing_key"] = bb3.load_signing_key(args.key)
    cfg = bb3.Config.from_env(**settings)
    async with bb3.open_client(cfg) as bb:
        # with a JetStream stream on the status subject (the reverb creates one) claims are
        # at-least-once; without, at-most-once: health().delivery says which
        how = "kept until acknowledged" if bb.delivery_mode == "jetstream" else "sent at most once"
        print(f"{args.agent} joined {args.cluster}: claims are {how}", flush=True)
        # a Go-style callback, next to the structured code: log each bar as it starts
        bb.on_downbeat(
            lambda f: print(f"-- bar at beat {f.beat_index} ({f.tempo_bpm} BPM)", flush=True)
        )
        await work(bb, args)
        # leaving open_client would wait (bounded) for the last claims; waiting here first
        # means the health below counts them all
        await bb.flush_claims()
        print("health:", msgspec.json.encode(bb.health()).decode(), flush=True)
    return 0


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
