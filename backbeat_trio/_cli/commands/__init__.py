"""One module per ``backbeat-trio`` command; each has ``register(subparsers)`` and ``run(args)``.

:data:`COMMANDS` is the order ``--help`` lists them in.
"""

from __future__ import annotations

from types import ModuleType
from typing import Final

from . import cluster, demo, emit, health, keygen, pulse, reverb, server, tail, tempo

__all__ = ["COMMANDS"]

COMMANDS: Final[tuple[ModuleType, ...]] = (
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
