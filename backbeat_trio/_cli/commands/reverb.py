"""``backbeat-trio reverb``: verify claims, publish one bar report per bar."""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import re
from typing import TYPE_CHECKING, Final

import trio

from ..._core.beats import bar_subject, status_subject
from ..._services.storage import BAR_MAX_AGE, BAR_MAX_BYTES, STATUS_MAX_AGE, STATUS_MAX_BYTES
from ..admin import add_http_arguments, bound_http, load_dashboard, start_admin
from ..common import UsageError, add_command, env, env_int, eprint, load_keyring, out, seconds
from ..connection import conn_parent, connection_kwargs
from ..formatting import report_lines

if TYPE_CHECKING:
    from ..common import Subparsers

__all__ = ["add_arguments", "register", "run"]


def register(subparsers: Subparsers) -> None:
    """Add ``reverb`` and its options."""
    p = add_command(
        subparsers,
        "reverb",
        run,
        "run the reverb: verify claims, publish one bar report per bar",
        [conn_parent()],
    )
    add_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``reverb``."""
    p.add_argument(
        "--keyring",
        metavar="FILE",
        default=env("BACKBEAT_KEYRING"),
        help="TOML keyring of the agents' public keys (env BACKBEAT_KEYRING)",
    )
    p.add_argument("--allow-unsigned", action="store_true", help="accept unsigned claims")
    p.add_argument(
        "--beats-per-bar",
        type=int,
        default=env_int("BACKBEAT_BEATS_PER_BAR", 4),
        metavar="N",
        help="bar length, as the pulse's (env BACKBEAT_BEATS_PER_BAR)",
    )
    p.add_argument("--reverb-id", default="reverb-1", metavar="ID", help="this reverb's id")
    p.add_argument(
        "--no-stream", action="store_true", help="don't create the JetStream status stream"
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="replicas of the streams it creates (3 on a NATS cluster; 1 where not placeable)",
    )
    p.add_argument(
        "--ha",
        action="store_true",
        help="one of several reverbs: only the holder of the reverb lease publishes",
    )
    p.add_argument(
        "--lease-ttl",
        type=seconds,
        default=2.0,
        metavar="SECONDS",
        help="with --ha: lease TTL; the longest a report is delayed by a crash (default 2)",
    )
    add_storage_arguments(p)
    p.add_argument("--json", action="store_true", help="print each report as one JSON line")
    add_http_arguments(p)


_SIZE_UNITS: Final = {"": 0, "k": 10, "kib": 10, "m": 20, "mib": 20, "g": 30, "gib": 30}
_AGE_UNITS: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_QUANTITY: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-z]*)\s*")


def byte_size(text: str) -> int:
    """Bytes: an integer with an optional binary unit (``512MiB``, ``1G``), or ``none`` (-1)."""
    if text.strip().lower() in ("none", "-1"):
        return -1
    found = _QUANTITY.fullmatch(text.lower())
    shift = _SIZE_UNITS.get(found.group(2)) if found else None
    if found is None or shift is None or "." in found.group(1):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 1048576, 256MiB, none)")
    return int(found.group(1)) << shift


def age(text: str) -> float | None:
    """Seconds, with an optional unit (``90s``, ``30m``, ``24h``, ``30d``), or ``none``."""
    if text.strip().lower() == "none":
        return None
    found = _QUANTITY.fullmatch(text.lower())
    unit = _AGE_UNITS.get(found.group(2)) if found else None
    if found is None or unit is None or float(found.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age (e.g. 3600, 24h, 30d, none)")
    return float(found.group(1)) * unit


def add_storage_arguments(p: argparse.ArgumentParser) -> None:
    """The bounds of the streams the reverb creates (and brings up to date)."""
    p.add_argument(
        "--status-max-age",
        type=age,
        default=STATUS_MAX_AGE,
        metavar="AGE",
        help="claims older than this leave the status stream (default 24h; none: kept)",
    )
    p.add_argument(
        "--status-max-bytes",
        type=byte_size,
        default=STATUS_MAX_BYTES,
        metavar="SIZE",
        help="the status stream discards its oldest claims past this size (default 256MiB)",
    )
    p.add_argument(
        "--bar-max-age",
        type=age,
        default=BAR_MAX_AGE,
        metavar="AGE",
        help="reports older than this leave the bar history (default 30d; none: kept)",
    )
    p.add_argument(
        "--bar-max-bytes",
        type=byte_size,
        default=BAR_MAX_BYTES,
        metavar="SIZE",
        help="the bar history discards its oldest reports past this size (default 256MiB)",
    )


async def run(args: argparse.Namespace) -> int:
    """Run the reverb until cancelled, printing every bar report."""
    from ..._bridge.nats import open_nats_transport
    from ..._services.reverb import ReverbConfig, run_reverb

    keyring = load_keyring(args.keyring) if args.keyring else None
    if keyring is None and not args.allow_unsigned:
        raise UsageError(
            "the reverb would reject every claim: give it the agents' public keys with "
            "--keyring FILE (or BACKBEAT_KEYRING), or pass --allow-unsigned"
        )
    cfg = ReverbConfig(
        cluster_id=args.cluster,
        keyring=keyring,
        allow_unsigned=args.allow_unsigned,
        beats_per_bar=args.beats_per_bar,
        reverb_id=args.reverb_id,
        create_stream=not args.no_stream,
        replicas=args.replicas,
        status_max_age=args.status_max_age,
        status_max_bytes=args.status_max_bytes,
        bar_max_age=args.bar_max_age,
        bar_max_bytes=args.bar_max_bytes,
        ha=args.ha,
        lease_ttl=args.lease_ttl,
        **connection_kwargs(args),
    )
    # the command owns the connection: the reverb, the admin server and its dashboard share it
    # --http is bound before the reverb creates a stream or publishes a report
    async with contextlib.AsyncExitStack() as stack:
        listener = stack.enter_context(bound_http(args))
        transport = await stack.enter_async_context(open_nats_transport(cfg))
        nursery = await stack.enter_async_context(trio.open_nursery())
        status = await nursery.start(functools.partial(run_reverb, cfg, transport=transport))
        trusted = f"{len(keyring)} trusted key(s)" if keyring is not None else "no keyring"
        ha = f"; HA, lease TTL {cfg.lease_ttl:g} s" if cfg.ha else ""
        eprint(
            f"reverb {cfg.reverb_id}: cluster {cfg.cluster_id!r}, {trusted}"
            f"{', unsigned claims accepted' if cfg.allow_unsigned else ''}; claims from "
            f"{status.stream or status_subject(cfg.cluster_id)}; reports on "
            f"{bar_subject(cfg.cluster_id)}{ha}"
        )
        if args.http:
            dashboard = load_dashboard(cfg.cluster_id, args)
            if dashboard is not None:
                await nursery.start(functools.partial(dashboard.run, transport, reverb=status))
            await start_admin(
                nursery,
                args,
                f"reverb {cfg.reverb_id}",
                listener,
                reverb=status,
                transport=transport,
                fallback=dashboard,
            )
        handled = 0
        shown: tuple[str, str | None] = ("", None)
        while True:
            lease = status.lease
            if lease is not None and lease.holder and (lease.role, lease.holder) != shown:
                shown = (lease.role, lease.holder)
                eprint(
                    f"reverb {cfg.reverb_id}: publishing (holds the reverb lease)"
                    if lease.leading
                    else f"reverb {cfg.reverb_id}: standby (reports are aggregated, not published;"
                    f" holder {lease.holder})"
                )
            if status.reports == handled:
                with trio.move_on_after(0.5 if status.lease is not None else math.inf):
                    await status.wait_for_report()
                continue
            fresh = min(status.reports - handled, len(status.history))
            handled = status.reports
            for report in list(status.history)[-fresh:] if fresh else []:
                for line in report_lines(report, args.json):
                    out(line)
    raise AssertionError("unreachable")  # pragma: no cover
