"""``backbeat-trio health``: follow a few beats as an agent and print a health snapshot."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Final

import msgspec
import trio

from ..._client.client import open_client
from ..._client.judge import no_beat_hint
from ..._core.wire import HealthStatus
from ..common import EXIT_FAILURE, EXIT_OK, PROG, add_command, count, eprint, out, positive_float
from ..connection import agent_parent, client_config, conn_parent

if TYPE_CHECKING:
    from ..common import Subparsers

__all__ = ["GO_HEALTH_FIELDS", "add_arguments", "register", "run"]

#: The Go SDK's ``HealthStatus`` JSON fields, in Go's order (what ``health`` prints by default).
GO_HEALTH_FIELDS: Final = (
    "connected",
    "last_beat",
    "last_beat_time",
    "time_drift",
    "reconnect_count",
    "local_degradation",
    "current_tempo",
    "tempo_drift",
    "measured_bpm",
    "errors",
)


def register(subparsers: Subparsers) -> None:
    """Add ``health`` and its options."""
    p = add_command(
        subparsers,
        "health",
        run,
        "connect as an agent, follow a few beats, print a health snapshot as JSON (Go's shape)",
        [conn_parent(), agent_parent()],
        "Connect as an agent, wait for up to --beats beats, and print the client's health "
        "snapshot as JSON with the Go SDK's field names (durations in nanoseconds). Exits 1 "
        "when unhealthy: no beat within --timeout, or degraded.",
    )
    add_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``health``."""
    p.add_argument("--beats", type=count, default=3, metavar="N", help="beats to wait for")
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=10.0,
        metavar="SECONDS",
        help="stop waiting for beats after this long",
    )
    p.add_argument(
        "--metrics", action="store_true", help="add our extra fields: delivery and metrics"
    )


def _health_json(health: HealthStatus, *, with_metrics: bool) -> str:
    data = msgspec.to_builtins(health)
    assert isinstance(data, dict)
    keys = list(GO_HEALTH_FIELDS) + (["delivery", "metrics"] if with_metrics else [])
    shaped = {k: data[k] for k in keys}
    return msgspec.json.format(msgspec.json.encode(shaped), indent=2).decode()


async def run(args: argparse.Namespace) -> int:
    """Print the snapshot; exit 1 when unhealthy."""
    cfg = client_config(args, args.agent or "backbeat-health", jetstream=False)
    seen = 0
    async with open_client(cfg) as client:
        beats = client.beats()
        with trio.move_on_after(args.timeout):
            async for _ in beats:
                seen += 1
                if seen >= args.beats:
                    break
        health = client.health()
    out(_health_json(health, with_metrics=args.metrics))
    problems = []
    if not health.connected:
        problems.append("not connected")
    if seen == 0:
        problems.append(no_beat_hint(cfg.cluster_id, args.timeout))
    elif seen < args.beats:
        problems.append(f"only {seen} of {args.beats} beats within {args.timeout:g} s")
    if health.local_degradation:
        problems.append("degraded: keeping time locally (the pulse went quiet)")
    if problems:
        eprint(f"{PROG} health: unhealthy: {'; '.join(problems)}")
        return EXIT_FAILURE
    return EXIT_OK
