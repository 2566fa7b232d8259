"""Running one command: signals, exit codes for the errors that end it, logging set-up.

Exit codes:
    0   success (also: a long-running command stopped with SIGTERM)
    1   runtime failure (a refused tempo change, a claim not delivered, no beat seen, ...)
    2   usage or configuration error (bad option, bad id, unreadable key file, ...)
    3   cannot connect to NATS
    130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from typing import Final, TextIO

import trio

from .._errors import (
    BackbeatError,
    ConfigError,
    InvalidStatusClaim,
    NotConnected,
    UndeliveredClaims,
)
from .common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_NOT_CONNECTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    Handler,
    UsageError,
    eprint,
)

__all__ = ["exit_for", "leaves", "setup_logging", "silence_broken_stdout", "supervise"]

log = logging.getLogger("backbeat_trio.cli")

_STOP_GRACE_S: Final = 5.0


async def supervise(handler: Handler, args: argparse.Namespace) -> int:
    """Run ``handler`` until it returns or SIGINT/SIGTERM arrives.

    On a signal, a graceful command (``args.graceful``, see :func:`.common.add_command`) is asked
    to stop (``args.stop_requested`` is set) and gets :data:`_STOP_GRACE_S` seconds to wind down;
    any other is cancelled. Errors raised while a stopped command tears down are reported only
    with ``-v``: the user asked it to stop.
    """
    result: list[int] = []
    stopped_by: list[int] = []
    args.stop_requested = trio.Event()
    graceful = bool(getattr(args, "graceful", False))
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch_signals() -> None:
                    async for signum in signals:
                        stopped_by.append(signum)
                        # a second Ctrl-C during the (bounded) clean-up kills the process at once
                        signal.signal(signal.SIGINT, signal.SIG_DFL)
                        if graceful:
                            args.stop_requested.set()
                            nursery.cancel_scope.deadline = trio.current_time() + _STOP_GRACE_S
                        else:
                            nursery.cancel_scope.cancel()
                        return

                async def job() -> None:
                    result.append(await handler(args))
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_signals)
                nursery.start_soon(job)
    except BaseException as exc:
        if not stopped_by or isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        log.info("error while stopping: %r", exc, exc_info=exc)
    if stopped_by:
        if stopped_by[0] == signal.SIGINT:
            return EXIT_INTERRUPTED
        return result[0] if result else EXIT_OK
    return result[0]


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``, exception groups flattened."""
    if isinstance(exc, BaseExceptionGroup):
        found: list[BaseException] = []
        for inner in exc.exceptions:
            found.extend(leaves(inner))
        return found
    return [exc]


def exit_for(exc: BaseException, command: str) -> int:
    """Report an exception that ended a command and choose the exit code."""
    errors = [e for e in leaves(exc) if not isinstance(e, trio.Cancelled)] or [exc]
    if any(isinstance(e, KeyboardInterrupt) for e in errors):
        return EXIT_INTERRUPTED
    where = f"{PROG} {command}"
    for error in errors:
        if isinstance(error, UsageError | ConfigError | InvalidStatusClaim):
            eprint(f"{where}: error: {error}\n(see `{where} --help`)")
            return EXIT_USAGE
    for error in errors:
        if isinstance(error, UndeliveredClaims):
            eprint(f"{where}: error: {error}")
            return EXIT_FAILURE
        if isinstance(error, NotConnected):
            eprint(f"{where}: cannot connect: {error}")
            return EXIT_NOT_CONNECTED
    for error in errors:
        if isinstance(error, BrokenPipeError):
            return EXIT_OK  # e.g. `| head`: the reader has what it wanted
    for error in errors:
        if isinstance(error, BackbeatError):
            eprint(f"{where}: error: {error}")
            return EXIT_FAILURE
    eprint(f"{where}: unexpected error (a bug; please report it):")
    for error in errors:
        traceback.print_exception(error, file=sys.stderr)
    return EXIT_FAILURE


def setup_logging(verbosity: int, stream: TextIO) -> None:
    """Log warnings (``-v``: info, ``-vv``: debug, with asyncio's and nats-py's) to ``stream``."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, stream=stream, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if verbosity < 2:
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        logging.getLogger("nats").setLevel(logging.CRITICAL)


def silence_broken_stdout() -> None:
    """Point stdout at /dev/null after a BrokenPipeError."""
    # Python's own flush at exit would complain again
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
