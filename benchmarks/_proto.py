"""The worker side of the orchestrator protocol: JSON lines in on stdin, JSON lines out on stdout.

Only protocol lines go to stdout; anything else a worker wants to say goes to stderr (the
orchestrator keeps it in a log file).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import trio


def send(obj: dict[str, Any]) -> None:
    """Write one message to the orchestrator."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def read_command() -> dict[str, Any]:
    """Read one command (blocking; run it in a thread). EOF means ``exit``."""
    line = sys.stdin.readline()
    if not line:
        return {"cmd": "exit"}
    cmd: dict[str, Any] = json.loads(line)
    return cmd


async def read_commands(chan: trio.MemorySendChannel[dict[str, Any]]) -> None:
    """A trio worker's command pump: each command from stdin onto ``chan``, up to ``exit``."""
    async with chan:
        while True:
            cmd = await trio.to_thread.run_sync(read_command, abandon_on_cancel=True)
            await chan.send(cmd)
            if cmd["cmd"] == "exit":
                return


def args() -> dict[str, Any]:
    """The worker's start-up arguments (JSON in argv[1])."""
    parsed: dict[str, Any] = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    return parsed


def log(*parts: object) -> None:
    """A diagnostic line on stderr."""
    print(*parts, file=sys.stderr, flush=True)
