"""``backbeat-trio cluster``: a local NATS cluster with HA pulses and reverbs, to watch failovers.

The cluster itself is :func:`backbeat_trio._cli.cluster.run_local_cluster`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..admin import add_http_arguments, check_http_bind, http_allowed_hosts, http_token
from ..common import EXIT_FAILURE, EXIT_OK, PROG, UsageError, add_command, eprint, out, seconds
from ..connection import add_cluster_option

if TYPE_CHECKING:
    from ..common import Subparsers

__all__ = ["add_arguments", "register", "run"]


def register(subparsers: Subparsers) -> None:
    """Add ``cluster`` and its options."""
    p = add_command(
        subparsers,
        "cluster",
        run,
        "run a local NATS cluster with HA pulses and reverbs; watch leadership (and failovers)",
        [],
        "Start a local NATS cluster (loopback only, clustered JetStream) with several HA pulses "
        "and HA reverbs that each elect one leader through a lease, and print one line per "
        "leadership change seen on the beat and bar subjects. With --failover-every it crashes "
        "the leading pulse and the publishing reverb that often (no lease release) and restarts "
        "them later, so you can watch the failovers. Runs until Ctrl-C or SIGTERM, or for "
        "--duration seconds (exit 1 if no beat was seen by then).",
    )
    add_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``cluster``."""
    p.add_argument("--pulses", type=int, default=3, metavar="N", help="HA pulses, 1..9")
    p.add_argument("--reverbs", type=int, default=2, metavar="N", help="HA reverbs, 0..5")
    p.add_argument("--servers", type=int, default=3, metavar="N", help="nats-servers, 1..5")
    add_cluster_option(p, "local", "BACKBEAT cluster id")
    p.add_argument("--tempo", type=int, default=60, metavar="BPM", help="tempo, 1..1200")
    p.add_argument(
        "--bpb",
        "--beats-per-bar",
        dest="beats_per_bar",
        type=int,
        default=4,
        metavar="N",
        help="beats per bar",
    )
    p.add_argument(
        "--lease-ttl",
        type=seconds,
        metavar="SECONDS",
        help="lease TTL (default: two beats plus 50 ms)",
    )
    p.add_argument(
        "--failover-every",
        type=seconds,
        metavar="SECONDS",
        help="crash the leading pulse this often (default: never)",
    )
    p.add_argument(
        "--restart-after",
        type=seconds,
        metavar="SECONDS",
        help="restart a crashed pulse after this long (default: the lease TTL)",
    )
    p.add_argument(
        "--duration",
        type=seconds,
        metavar="SECONDS",
        help="stop after this long (exit 0; 1 when no beat was seen)",
    )
    add_http_arguments(p)


async def run(args: argparse.Namespace) -> int:
    """Run the cluster until ``--duration`` or cancelled; exit 1 when no beat was seen."""
    from ..cluster import run_local_cluster

    leadership = 0

    def say(line: str) -> None:
        nonlocal leadership
        if line.startswith("beat "):  # "beat N: pulse-1 leads" / "... took over ..."
            leadership += 1
        out(line)

    if args.restart_after is not None and args.failover_every is None:
        raise UsageError("--restart-after needs --failover-every")
    # the admin server starts last, once beats flow: refuse its address before any server starts
    check_http_bind(args)
    # SIGINT/SIGTERM cancel it: the pulses stop first, then the servers (shielded clean-up)
    await run_local_cluster(
        pulses=args.pulses,
        servers=args.servers,
        reverbs=args.reverbs,
        cluster_id=args.cluster,
        tempo_bpm=args.tempo,
        beats_per_bar=args.beats_per_bar,
        lease_ttl=args.lease_ttl,
        failover_every=args.failover_every,
        restart_after=args.restart_after,
        duration=args.duration,
        out=say,
        http=args.http,
        http_token=http_token(args),
        http_allow_hosts=http_allowed_hosts(args),
        http_event_streams=args.http_event_streams,
    )
    if leadership == 0:
        eprint(f"{PROG} cluster: no beat was seen within --duration {args.duration:g} s")
        return EXIT_FAILURE
    eprint(f"{PROG} cluster: stopped after {args.duration:g} s")
    return EXIT_OK
