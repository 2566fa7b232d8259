"""What every ``backbeat-trio`` command shares: exit codes, output, option types, key files.

A command module registers itself with :func:`add_command` (the ``-v`` option, the epilog and
the help formatter come with it) and raises :class:`UsageError` for a value the parser could not
judge.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from .._core.signing import Keyring, load_signing_key
from .._errors import ConfigError, SignatureError

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = [
    "EPILOG",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_CONNECTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "PROG",
    "Handler",
    "HelpFormatter",
    "UsageError",
    "add_command",
    "beat_index",
    "count",
    "env",
    "env_int",
    "eprint",
    "load_key",
    "load_keyring",
    "out",
    "positive_float",
    "require_agent",
    "seconds",
]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_NOT_CONNECTED: Final = 3
EXIT_INTERRUPTED: Final = 130

PROG: Final = "backbeat-trio"

EPILOG: Final = """\
exit codes: 0 ok, 1 runtime failure, 2 usage/config error, 3 cannot connect to NATS,
130 interrupted (Ctrl-C). Long-running commands stop cleanly on Ctrl-C (exit 130) or SIGTERM
(exit 0).
"""

Handler = Callable[[argparse.Namespace], Awaitable[int]]


class UsageError(Exception):
    """An option value the parser could not judge is wrong (exit code 2)."""


# --- environment and output ----------------------------------------------------------------------
def env(name: str, default: str | None = None) -> str | None:
    """The variable's value; ``default`` when it is unset or blank."""
    value = os.environ.get(name, "")
    return value if value.strip() else default


def env_int(name: str, default: int) -> int:
    """An integer variable (a malformed one ends the program as a usage error would)."""
    value = env(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        # argparse reports this like a bad command-line value (exit 2)
        raise SystemExit(_usage_exit(f"{name}={value!r} is not an integer")) from None


def _usage_exit(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def eprint(*parts: object) -> None:
    """A line on stderr, flushed."""
    print(*parts, file=sys.stderr, flush=True)


def out(line: str) -> None:
    """A line on stdout, flushed."""
    print(line, flush=True)


# --- option types --------------------------------------------------------------------------------
def positive_float(text: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def seconds(text: str) -> float:
    """A finite number of seconds > 0."""
    value = positive_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


beat_index: Final = _int_at_least(0)
count: Final = _int_at_least(1)


# --- the parser ----------------------------------------------------------------------------------
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks; shows a default only where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default in (None, False, "", argparse.SUPPRESS)
            or action.dest == "verbose"
        ):
            return text
        return text + " (default: %(default)s)"


def _verbosity_parent() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-vv: debug) on stderr"
    )
    return common


def add_command(
    subparsers: Subparsers,
    name: str,
    run: Handler,
    help_: str,
    parents: list[argparse.ArgumentParser],
    description: str | None = None,
    *,
    graceful: bool = False,
) -> argparse.ArgumentParser:
    """Add the subcommand ``name`` that runs ``run``; returns its parser for its own options.

    Args:
        subparsers: the top-level parser's subparsers.
        name: the command's name.
        run: its handler (it returns the exit code).
        help_: one line for the command list (also the description unless one is given).
        parents: option groups it shares (see :mod:`._cli.connection`).
        description: the longer text of its ``--help``.
        graceful: on Ctrl-C/SIGTERM, ask it to stop (``args.stop_requested`` is set) instead of
            cancelling it.
    """
    p = subparsers.add_parser(
        name,
        help=help_,
        description=description or help_,
        parents=[_verbosity_parent(), *parents],
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    p.set_defaults(handler=run, graceful=graceful)
    return p


# --- keys ----------------------------------------------------------------------------------------
def load_key(path: str, what: str = "--key") -> Any:
    """Load a signing key file, turning every problem into a usage error."""
    try:
        return load_signing_key(path)
    except FileNotFoundError:
        raise UsageError(
            f"{what}: no such key file: {path!r} (make one with `{PROG} keygen`)"
        ) from None
    except (OSError, SignatureError) as exc:
        raise UsageError(f"{what}: {exc}") from exc


def load_keyring(path: str) -> Keyring:
    """Load a keyring file, turning every problem into a usage error."""
    try:
        return Keyring.load(path)
    except FileNotFoundError:
        raise UsageError(f"--keyring: no such file: {path!r}") from None
    except (OSError, SignatureError, ConfigError) as exc:
        raise UsageError(f"--keyring: {exc}") from exc


def require_agent(args: argparse.Namespace) -> str:
    """``--agent``, which this command cannot do without."""
    if not args.agent:
        raise UsageError("an agent id is needed: pass --agent ID or set BACKBEAT_AGENT_ID")
    return str(args.agent)
