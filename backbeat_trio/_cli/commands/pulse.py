"""``backbeat-trio pulse``: publish the cluster's beats and answer tempo requests (``--ha``: one
of several instances, publishing only while it holds the lease)."""

from __future__ import annotations

import argparse
import contextlib
import functools
from typing import TYPE_CHECKING, Any

import trio

from ..._core.beats import beat_subject, tempo_subject
from ..admin import add_http_arguments, bound_http, start_admin
from ..common import (
    UsageError,
    add_command,
    env_int,
    eprint,
    out,
    positive_float,
    seconds,
)
from ..connection import conn_parent, connection_kwargs
from ..formatting import format_role_change, pulse_beat_line

if TYPE_CHECKING:
    from ..._services.lease import LeadershipChange
    from ..common import Subparsers

__all__ = ["add_arguments", "register", "run"]


def register(subparsers: Subparsers) -> None:
    """Add ``pulse`` and its options."""
    p = add_command(
        subparsers,
        "pulse",
        run,
        "run the pulse: publish the cluster's beats and answer tempo requests",
        [conn_parent()],
    )
    add_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pulse``."""
    p.add_argument(
        "--tempo",
        type=int,
        default=env_int("BACKBEAT_TEMPO_BPM", 60),
        metavar="BPM",
        help="starting tempo, 1..1200 (env BACKBEAT_TEMPO_BPM)",
    )
    p.add_argument(
        "--beats-per-bar",
        type=int,
        default=env_int("BACKBEAT_BEATS_PER_BAR", 4),
        metavar="N",
        help="bar length (env BACKBEAT_BEATS_PER_BAR)",
    )
    p.add_argument("--start-index", type=int, default=0, metavar="N", help="first beat index")
    p.add_argument("--pulse-id", default="pulse-1", metavar="ID", help="this pulse's id")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument(
        "--max-tempo-step",
        type=positive_float,
        default=0.10,
        metavar="FRACTION",
        help="largest relative tempo change accepted",
    )
    steps.add_argument("--any-tempo-step", action="store_true", help="accept any tempo change")
    p.add_argument(
        "--allow-forced-tempo",
        action="store_true",
        help="accept larger steps when the request's reason starts with 'force'",
    )
    p.add_argument(
        "--share",
        action="store_true",
        help="keep publishing when another publisher's beat frames appear on the beat subject "
        "(by default the pulse stops: two pulses on one cluster interleave their beats)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no line per beat")
    ha = p.add_argument_group("high availability")
    ha.add_argument(
        "--ha",
        action="store_true",
        help="run as one of several HA pulse instances (give each its own --pulse-id): only "
        "the holder of the lease in the JetStream KV bucket BACKBEAT_HA_<cluster> publishes; "
        "prints role changes",
    )
    ha.add_argument(
        "--lease-ttl",
        type=seconds,
        metavar="SECONDS",
        help="with --ha: lease TTL; a crashed leader is replaced within about this long "
        "(default: two beats plus 50 ms)",
    )
    add_http_arguments(p)


def _pulse_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The settings ``pulse`` and ``pulse --ha`` share (PulseConfig's fields)."""
    return dict(
        cluster_id=args.cluster,
        tempo_bpm=args.tempo,
        beats_per_bar=args.beats_per_bar,
        start_index=args.start_index,
        pulse_id=args.pulse_id,
        max_tempo_step=None if args.any_tempo_step else args.max_tempo_step,
        allow_forced_tempo=args.allow_forced_tempo,
        **connection_kwargs(args),
    )


async def run(args: argparse.Namespace) -> int:
    """Run the pulse until cancelled, printing a line per beat unless ``--quiet``."""
    from ..._bridge.nats import open_nats_transport
    from ..._services.pulse import PulseConfig, run_pulse

    if args.ha:
        return await _run_ha_pulse(args)
    if args.lease_ttl is not None:
        raise UsageError("--lease-ttl needs --ha")
    cfg = PulseConfig(**_pulse_kwargs(args), share_beat_subject=args.share)
    async with contextlib.AsyncExitStack() as stack:
        # --http is bound before the first beat: a pulse refused for it publishes nothing
        listener = stack.enter_context(bound_http(args))
        # with --http the command owns the connection, so the admin server can watch it too
        transport = await stack.enter_async_context(open_nats_transport(cfg)) if args.http else None
        nursery = await stack.enter_async_context(trio.open_nursery())
        status = await nursery.start(functools.partial(run_pulse, cfg, transport=transport))
        eprint(
            f"pulse {cfg.pulse_id}: cluster {cfg.cluster_id!r} at {cfg.tempo_bpm} BPM, "
            f"{cfg.beats_per_bar} beats per bar, on {beat_subject(cfg.cluster_id)}; "
            f"tempo requests on {tempo_subject(cfg.cluster_id)}"
        )
        await start_admin(
            nursery, args, f"pulse {cfg.pulse_id}", listener, pulse=status, transport=transport
        )
        printed: int | None = None
        while True:
            await trio.sleep(min(0.25, 30.0 / status.tempo_bpm))
            beat = status.last_beat
            if args.quiet or beat is None or beat == printed:
                continue
            printed = beat
            out(pulse_beat_line(status, cfg.beats_per_bar, beat))
    raise AssertionError("unreachable")  # pragma: no cover


async def _run_ha_pulse(args: argparse.Namespace) -> int:
    """``pulse --ha``: one instance of an HA pulse; it publishes only while it holds the lease."""
    from ..._core.lease import lease_bucket_name
    from ..._services.ha_pulse import HAPulseConfig, run_ha_pulse

    cfg = HAPulseConfig(**_pulse_kwargs(args), lease_ttl=args.lease_ttl)
    async with contextlib.AsyncExitStack() as stack:
        listener = stack.enter_context(bound_http(args))  # before it may lead (see run)
        nursery = await stack.enter_async_context(trio.open_nursery())
        status = await nursery.start(run_ha_pulse, cfg)
        eprint(
            f"pulse {cfg.pulse_id} (HA, lease TTL {status.timings.ttl:g} s in KV bucket "
            f"{lease_bucket_name(cfg.cluster_id)}): cluster {cfg.cluster_id!r}, "
            f"{cfg.tempo_bpm} BPM and {cfg.beats_per_bar} beats per bar unless the lease holds "
            f"a running schedule; beats on {beat_subject(cfg.cluster_id)} while it leads"
        )
        await start_admin(nursery, args, f"pulse {cfg.pulse_id}", listener, pulse=status)
        if not status.leading:
            holder = f" (held by {status.holder})" if status.holder else ""
            out(f"role follower: {cfg.pulse_id} waits for the lease{holder}")
        printed: int | None = None
        last_change: LeadershipChange | None = None
        while True:
            await trio.sleep(min(0.25, 30.0 / status.pulse.tempo_bpm))
            changes = list(status.changes)
            # the deque is bounded: what follows the last change printed is new (all, if evicted)
            fresh = next(
                (changes[i + 1 :] for i, c in enumerate(changes) if c is last_change), changes
            )
            for change in fresh:
                out(format_role_change(change))
            if changes:
                last_change = changes[-1]
            beat = status.pulse.last_beat
            if args.quiet or beat is None or beat == printed:
                continue
            printed = beat
            out(
                pulse_beat_line(
                    status.pulse, status.pulse.beats_per_bar, beat, status.skipped_no_lease
                )
            )
    raise AssertionError("unreachable")  # pragma: no cover
