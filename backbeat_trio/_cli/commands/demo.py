"""``backbeat-trio demo``: a whole cluster in one process, shown live, then a summary.

The cluster and its agents are :mod:`backbeat_trio._cli.demo`; the views are
:mod:`backbeat_trio._cli.demo_views`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import TYPE_CHECKING

import trio

from ..common import EXIT_OK, add_command, count
from ..connection import add_cluster_option

if TYPE_CHECKING:
    from ..common import Subparsers

__all__ = ["add_arguments", "register", "run"]


def register(subparsers: Subparsers) -> None:
    """Add ``demo`` and its options (it stops by itself on Ctrl-C/SIGTERM, with a summary)."""
    p = add_command(
        subparsers,
        "demo",
        run,
        "run a whole cluster in one process: nats-server, pulse, reverb and five agents",
        [],
        "Zero set-up demo: an embedded nats-server, a pulse, a signature-checking reverb and "
        "simulated agents (one finishes, one fails, two deadlock waiting on each other, one "
        "overruns its beat budget), shown live; then a summary. Without a terminal (or with "
        "--plain) it prints a line per beat and per bar report.",
        graceful=True,
    )
    add_arguments(p)


_DEFAULT_BARS = 4


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``demo``."""
    p.add_argument(
        "--bars",
        type=count,
        default=None,
        help="stop after this many bar reports (default 4; with --web, run until Ctrl-C)",
    )
    p.add_argument("--forever", action="store_true", help="run until Ctrl-C")
    p.add_argument("--tempo", type=int, default=240, metavar="BPM", help="the pulse's tempo")
    p.add_argument("--agents", type=int, default=5, metavar="N", help="simulated agents (>= 5)")
    add_cluster_option(p, "demo", "cluster id")
    p.add_argument(
        "--web",
        nargs="?",
        const="",
        default=None,
        metavar="HOST:PORT",
        help="also serve the live dashboard in a browser, on loopback (default 127.0.0.1:8080, "
        "or any free port when that one is taken); prints the URL",
    )
    view = p.add_mutually_exclusive_group()
    view.add_argument("--plain", action="store_true", help="plain lines, no live view")
    view.add_argument(
        "--live", action="store_true", help="the live view even when stdout is not a terminal"
    )


async def run(args: argparse.Namespace) -> int:
    """Run the demo until its bars are done or it is asked to stop; print the summary."""
    from ..demo import DemoOptions, DemoState, run_demo
    from ..demo_views import LiveView, PlainView
    from ..demo_web import DEFAULT_WEB_BIND, check_web_bind

    # with --web the dashboard is the point: it stays up for the browser until Ctrl-C
    bars = args.bars if args.bars is not None else None if args.web is not None else _DEFAULT_BARS
    options = DemoOptions(
        bars=None if args.forever else bars,
        tempo_bpm=args.tempo,
        agents=args.agents,
        cluster_id=args.cluster,
    )
    web = None if args.web is None else args.web or DEFAULT_WEB_BIND
    if web is not None:
        check_web_bind(web)  # before anything starts: a bad address is a usage error
    state = DemoState(options)
    stop: trio.Event = args.stop_requested
    plain = args.plain or (not args.live and not sys.stdout.isatty())
    view: PlainView | LiveView
    if plain:
        view = PlainView(sys.stdout)
    else:
        from rich.console import Console

        if not args.verbose:
            # warnings on stderr would tear the live view; the summary says what went wrong
            logging.getLogger("backbeat_trio").setLevel(logging.ERROR)
        view = LiveView(Console(force_terminal=True if args.live else None))
    try:
        with view if isinstance(view, LiveView) else contextlib.nullcontext():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_quiet_when_stopping, stop, args.verbose)
                await run_demo(
                    options,
                    view=view,
                    state=state,
                    stop=stop,
                    web=web,
                    web_any_port_if_busy=args.web == "",
                )
                nursery.cancel_scope.cancel()
    finally:
        view.summary(state)
    return EXIT_OK


async def _quiet_when_stopping(stop: trio.Event, verbose: int) -> None:
    await stop.wait()
    if not verbose:
        # the server and the agents going away on Ctrl-C is expected, not worth a warning each
        logging.getLogger("backbeat_trio").setLevel(logging.CRITICAL)
