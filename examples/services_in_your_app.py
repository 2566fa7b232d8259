"""The pulse, a reverb and the admin HTTP server inside your own trio application.

Run it against a nats-server (no pulse for the cluster yet: this program is the pulse)::

    backbeat-trio server &
    python examples/services_in_your_app.py --cluster app --http 127.0.0.1:8080
    curl http://127.0.0.1:8080/healthz        # while it runs; also /readyz /metrics /tempo /bars

One ``trio.run``, one nursery: the application starts :func:`backbeat_trio.serve_admin`,
:func:`backbeat_trio.run_pulse` and :func:`backbeat_trio.run_reverb` with ``nursery.start`` (each
returns once it is ready, or raises why it could not start), next to its own tasks: here one
agent that signs its claims and a loop that prints each bar report. The reverb trusts the keys on
its :class:`backbeat_trio.Keyring` only: this program makes the agent's key on the spot; a real
one loads both (``load_signing_key("agent.key")``, ``Keyring.load("keys.toml")``, as written by
``backbeat-trio keygen``). After ``--bars`` reports (0: until Ctrl-C) it cancels the nursery and
every service stops cleanly.

``serve_admin`` needs the ``ops`` extra (``pip install 'backbeat_trio[ops]'``).
``-s/--nats-url`` and ``-c/--cluster`` default to ``BACKBEAT_NATS_URL`` and
``BACKBEAT_CLUSTER_ID``; ``--http`` defaults to any free loopback port (the URL is printed).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import trio

import backbeat_trio as bb3

AGENT_ID = "app-agent"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "-s",
        "--nats-url",
        default=env("BACKBEAT_NATS_URL", "nats://127.0.0.1:4222"),
        help="NATS URL(s), comma separated",
    )
    p.add_argument("-c", "--cluster", default=env("BACKBEAT_CLUSTER_ID", "app"))
    p.add_argument("--tempo", type=int, default=240, help="the pulse's tempo, BPM")
    p.add_argument("--http", default="127.0.0.1:0", metavar="HOST:PORT", help="admin server")
    p.add_argument("--bars", type=int, default=4, help="bar reports to wait for (0: no end)")
    return p.parse_args(argv)


async def agent(cfg: bb3.Config, conn: bb3.NatsTransport) -> None:
    """The application's own work: a task a bar, two beats long, reported as it goes."""
    async with bb3.open_client(cfg, transport=conn) as bb:
        n = 0
        while True:
            await bb.wait_for_downbeat()
            n += 1
            task_id = f"job-{n}"
            await bb.emit_status(bb3.StatusClaim(task_id=task_id, state="executing", beats_left=2))
            with bb.fail_after_beats(3):  # BeatBudgetExceeded past three beats
                await bb.wait_for_beat()
                await bb.wait_for_beat()
            await bb.emit_status(bb3.StatusClaim(task_id=task_id, state="done", progress=1.0))


async def main(args: argparse.Namespace) -> int:
    key = bb3.generate_signing_key()
    keyring = bb3.Keyring({AGENT_ID: key.verify_key})
    pulse_cfg = bb3.PulseConfig(
        cluster_id=args.cluster, nats_url=args.nats_url, tempo_bpm=args.tempo
    )
    reverb_cfg = bb3.ReverbConfig(cluster_id=args.cluster, nats_url=args.nats_url, keyring=keyring)
    agent_cfg = bb3.Config.from_env(
        cluster_id=args.cluster, agent_id=AGENT_ID, nats_url=args.nats_url, signing_key=key
    )
    # one connection for the reverb, the admin server (/readyz checks it, /bars reads through
    # it) and the agent; the pulse opens its own, named after it on the server
    async with bb3.open_nats_transport(reverb_cfg) as conn, trio.open_nursery() as nursery:
        # the admin server first, given live mappings it reads on each request: an address it
        # cannot listen on stops the program before the pulse publishes a single beat
        pulses: dict[str, bb3.PulseStatus] = {}
        reverbs: dict[str, bb3.ReverbStatus] = {}
        address = await nursery.start(
            functools.partial(
                bb3.serve_admin,
                args.http,
                pulse=pulses,
                reverb=reverbs,
                transport=conn,
                cluster_id=args.cluster,
            )
        )
        print(f"admin API on http://{address}/", flush=True)
        # the reverb before the agent: it creates the status stream the agent's claims go to
        reverb = await nursery.start(functools.partial(bb3.run_reverb, reverb_cfg, transport=conn))
        reverbs[reverb_cfg.reverb_id] = reverb
        pulse = await nursery.start(bb3.run_pulse, pulse_cfg)
        pulses[pulse_cfg.pulse_id] = pulse
        print(
            f"pulse {pulse_cfg.pulse_id} at {args.tempo} BPM on cluster {args.cluster}", flush=True
        )
        nursery.start_soon(agent, agent_cfg, conn)

        bars = 0
        while args.bars == 0 or bars < args.bars:
            report = await reverb.wait_for_report()
            bars += 1
            issues = [f"{i.kind} {i.agent_id}: {i.detail}" for i in report.issues]
            print(
                f"bar {report.window_id} (beats {report.from_beat}-{report.to_beat}): "
                f"{report.claims} claim(s) {dict(report.by_state)}, "
                f"{report.rejected} rejected, issues: {issues or 'none'}",
                flush=True,
            )
        nursery.cancel_scope.cancel()  # the services stop; the connection closes after them
    print(f"stopped after {bars} bar report(s)", flush=True)
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
    except bb3.PulseConflict as exc:  # another pulse already beats for this cluster
        print(f"pulse stopped: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
