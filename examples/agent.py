"""A small BACKBEAT agent: follows the beat, works under beat budgets, reports status claims.

Run it against any nats-server that has a pulse beating for the cluster, for example::

    backbeat-trio server --port 4222 &                        # an embedded nats-server
    backbeat-trio pulse --url nats://127.0.0.1:4222 --cluster demo --tempo 120 &
    python examples/agent.py --url nats://127.0.0.1:4222 --cluster demo --agent agent-7

With ``--key agent-7.key`` (written by ``backbeat-trio keygen``, mode 0600) its claims are signed,
which is what a reverb with a keyring wants. It stops after ``--beats`` beats (0: at Ctrl-C) and
prints its health, in the Go SDK's ``HealthStatus`` JSON shape, as its last line.

What it does, bar after bar:

* on each downbeat (the ``plan`` phase) it starts a task and claims ``planning``;
* it works one beat at a time, claiming ``executing`` with its progress, all of it inside
  ``with_beat_budget(--budget, ...)``: a budget counted in beats, so it stretches and shrinks
  with the tempo and keeps running (on the client's own metronome) if the pulse goes quiet;
* a task that fits its budget ends with a ``done`` claim, one that does not with ``failed``.
  Every third task needs one beat more than its budget, to show what that looks like.
"""

from __future__ import annotations

import argparse
import sys

import msgspec
import trio

import backbeat_trio as bb3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="nats://127.0.0.1:4222", help="NATS URL(s), comma separated")
    p.add_argument("--cluster", default="demo", help="the cluster id to join")
    p.add_argument("--agent", default="agent-1", help="this agent's id")
    p.add_argument("--key", default=None, help="ed25519 signing key file (optional)")
    p.add_argument("--beats", type=int, default=0, help="stop after this many beats (0: never)")
    p.add_argument("--budget", type=int, default=4, help="beat budget of one task")
    p.add_argument("--task-beats", type=int, default=3, help="beats of work one task needs")
    return p.parse_args(argv)


async def do_task(bb: bb3.Client, task_id: str, beats_needed: int, budget: int) -> None:
    """The work itself: here, one step per beat, each reported as a claim."""
    for step in range(1, beats_needed + 1):
        await bb.wait_for_beat()  # real work would go here; the budget cancels it if too slow
        await bb.emit_status(
            bb3.StatusClaim(
                task_id=task_id,
                state="executing",
                progress=step / beats_needed,
                beats_left=max(budget - step, 0),
                notes=f"step {step}/{beats_needed}",
            )
        )


async def work(bb: bb3.Client, args: argparse.Namespace) -> None:
    """Run tasks back to back, one per bar at most, each under its beat budget."""
    task_no = 0
    while True:
        start = await bb.wait_for_downbeat()  # start a task where a bar starts: its plan phase
        task_no += 1
        task_id = f"{args.agent}-task-{task_no}"
        beats_needed = args.budget + 1 if task_no % 3 == 0 else args.task_beats
        await bb.emit_status(
            bb3.StatusClaim(task_id=task_id, state="planning", beats_left=args.budget)
        )
        print(f"beat {start.beat_index}: {task_id} needs {beats_needed} beat(s)", flush=True)
        try:
            # Go's WithBeatBudget: cancel the work when `budget` beats have passed
            await bb.with_beat_budget(args.budget, do_task, bb, task_id, beats_needed, args.budget)
        except bb3.BeatBudgetExceeded:
            await bb.emit_status(
                bb3.StatusClaim(task_id=task_id, state="failed", notes="ran out of beats")
            )
            print(f"beat {bb.current_beat}: {task_id} failed (budget exceeded)", flush=True)
        else:
            await bb.emit_status(bb3.StatusClaim(task_id=task_id, state="done", progress=1.0))
            print(f"beat {bb.current_beat}: {task_id} done", flush=True)


async def stop_after(bb: bb3.Client, beats: int, scope: trio.CancelScope) -> None:
    """Count beats on a channel of our own and end the run after ``beats`` of them."""
    seen = 0
    async for _frame in bb.beats():
        seen += 1
        if seen >= beats:
            scope.cancel()
            return


async def main(args: argparse.Namespace) -> int:
    cfg = bb3.Config(
        cluster_id=args.cluster,
        agent_id=args.agent,
        nats_url=args.url,
        signing_key=bb3.load_signing_key(args.key) if args.key else None,
    )
    async with bb3.open_client(cfg) as bb:
        # with a JetStream stream on the status subject (the reverb creates one) claims are
        # at-least-once; without, at-most-once: health().delivery says which
        how = "kept until acknowledged" if bb.delivery_mode == "jetstream" else "sent at most once"
        print(f"{args.agent} joined {args.cluster}: claims are {how}", flush=True)
        # a Go-style callback, next to the structured code: log each bar as it starts
        bb.on_downbeat(
            lambda f: print(f"-- bar at beat {f.beat_index} ({f.tempo_bpm} BPM)", flush=True)
        )
        async with trio.open_nursery() as nursery:
            if args.beats > 0:
                nursery.start_soon(stop_after, bb, args.beats, nursery.cancel_scope)
            nursery.start_soon(work, bb, args)
        # leaving open_client waits (bounded) for the last claims to be delivered
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
