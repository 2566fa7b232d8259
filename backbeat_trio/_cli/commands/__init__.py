"""One module per ``backbeat-trio`` command; each has ``register(subparsers)`` and ``run(args)``.

:data:`COMMANDS` is the order ``--help`` lists them in.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Final, Protocol

from . import cluster, demo, emit, health, keygen, pulse, reverb, server, tail, tempo

if TYPE_CHECKING:
    from ..common import Subparsers

__all__ = ["COMMANDS", "Command"]


class Command(Protocol):
    """What a command module provides."""

    def register(self, subparsers: Subparsers) -> None:
        """Add the command, its options and its handler to the top-level parser."""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        """Add the command's own options to its parser."""

    async def run(self, args: argparse.Namespace) -> int:
        """Run the command; returns its exit code."""


COMMANDS: Final[tuple[Command, ...]] = (
    demo,
    cluster,
    server,
    pulse,
    reverb,
    tail,
    emit,
    keygen,
    tempo,
    health,
)
