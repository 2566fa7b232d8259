"""``backbeat-trio tail``: print the cluster's beats, claims or bar reports as they come."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import msgspec
import trio

from ..._bridge import open_nats_transport
from ..._client.judge import no_beat_hint
from ..._core.beats import bar_subject, beat_subject, status_subject
from ..._core.wire import BarReport, BeatFrame, StatusClaim, decode
from ..._errors import WireError
from ..._transport.base import Message
from ..common import (
    EXIT_FAILURE,
    EXIT_OK,
    PROG,
    UsageError,
    add_command,
    beat_index,
    count,
    eprint,
    out,
    positive_float,
)
from ..connection import agent_parent, client_config, conn_parent
from ..formatting import compact_json, format_beat, format_claim, format_report, report_lines

if TYPE_CHECKING:
    from ..common import Subparsers

__all__ = ["add_arguments", "register", "run"]

#: ``tail --bars --since`` replays at most this many stored reports unless ``--limit`` says.
_REPLAY_LIMIT: Final = 10_000


def register(subparsers: Subparsers) -> None:
    """Add ``tail`` and its options."""
    p = add_command(
        subparsers,
        "tail",
        run,
        "print the cluster's beats, claims or bar reports as they come",
        [conn_parent(), agent_parent()],
        "Print the cluster's beats, claims or bar reports as they come, human-readable or as "
        "one JSON object per line. Claim signatures are shown, not verified (the reverb "
        "verifies them against its keyring). When nothing arrives for "
        "BACKBEAT_FIRST_BEAT_WARNING seconds (default 10), it says what to check.",
    )
    add_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tail``."""
    what = p.add_mutually_exclusive_group()
    what.add_argument("--beats", action="store_true", help="beat frames (the default)")
    what.add_argument("--claims", action="store_true", help="status claims")
    what.add_argument("--bars", action="store_true", help="bar reports")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("-n", "--count", type=count, metavar="N", help="exit 0 after N messages")
    p.add_argument(
        "--since",
        type=beat_index,
        metavar="BEAT",
        help="with --bars: first print the stored reports (stream BACKBEAT_BARS_<cluster>) of "
        "the windows ending at or after this beat, oldest first, then follow live",
    )
    p.add_argument(
        "--limit",
        type=count,
        metavar="N",
        help=f"with --since: replay at most N stored reports (default {_REPLAY_LIMIT})",
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        metavar="SECONDS",
        help="give up after this long (exit 1 when nothing arrived or --count was not reached)",
    )


def _tail_line(
    kind: str, msg: Message, as_json: bool, replayed_up_to: int = -1
) -> str | list[str] | None:
    """Decode one message for ``tail``; None for a bar report the replay printed already.

    Raises:
        WireError: the message breaks the contract.
    """
    if kind == "beats":
        frame = decode(msg.data, BeatFrame)
        return compact_json(msg.data) if as_json else format_beat(frame)
    if kind == "claims":
        claim = decode(msg.data, StatusClaim)
        return compact_json(msg.data) if as_json else format_claim(claim, msg.headers)
    report = decode(msg.data, BarReport)
    if report.from_beat <= replayed_up_to:
        return None
    return compact_json(msg.data) if as_json else format_report(report)


def _quiet_hint(kind: str, cluster_id: str, subject: str, seconds: float) -> str:
    """What ``tail`` says when nothing arrived in its first ``seconds`` (for beats, what a client
    says when it hears no beat)."""
    if kind == "beats":
        return no_beat_hint(cluster_id, seconds)
    publisher = {"claims": "an agent is emitting claims", "bars": "a reverb is running"}[kind]
    return (
        f"nothing on {subject} in the {seconds:g} s since connecting: check that "
        f"{cluster_id!r} is the cluster's id and that {publisher}"
    )


async def _hint_if_quiet(seconds: float, hint: str, received: Callable[[], int]) -> None:
    await trio.sleep(seconds)
    if not received():
        eprint(f"{PROG} tail: {hint}")


async def run(args: argparse.Namespace) -> int:
    """Print messages until ``--count`` or ``--timeout`` (or until cancelled)."""
    kind = "claims" if args.claims else "bars" if args.bars else "beats"
    if args.since is None and args.limit is not None:
        raise UsageError("--limit needs --since")
    if args.since is not None and kind != "bars":
        raise UsageError("--since replays stored bar reports: it needs --bars")
    subject = {"beats": beat_subject, "claims": status_subject, "bars": bar_subject}[kind](
        args.cluster
    )
    cfg = client_config(args, args.agent or "backbeat-tail")
    wanted = args.count
    received = bad = 0
    # a live report of a window the replay already printed is skipped (it may be in both)
    replayed_up_to = -1
    async with open_nats_transport(cfg) as transport, trio.open_nursery() as nursery:
        sub = await transport.subscribe(subject, buffer=4096)
        await transport.flush()  # the server has the subscription: nothing sent from now is missed
        quiet = cfg.first_beat_warning
        if quiet is not None:
            hint = _quiet_hint(kind, args.cluster, subject, quiet)
            nursery.start_soon(_hint_if_quiet, quiet, hint, lambda: received)
        with trio.move_on_after(args.timeout if args.timeout else math.inf) as scope:
            if args.since is not None:
                from ..._services.history import bar_stream_name, replay_bars

                stored = await replay_bars(
                    transport,
                    args.cluster,
                    since_beat=args.since,
                    limit=min(args.limit or _REPLAY_LIMIT, wanted or _REPLAY_LIMIT),
                )
                eprint(
                    f"{len(stored)} stored bar report(s) from {bar_stream_name(args.cluster)} "
                    f"for windows ending at or after beat {args.since}"
                )
                for report in stored:
                    for line in report_lines(report, args.json):
                        out(line)
                    received += 1
                    replayed_up_to = max(replayed_up_to, report.from_beat)
            if not (wanted and received >= wanted):
                more = " more" if received else ""
                until = f", exiting after {wanted - received}{more}" if wanted else ""
                eprint(f"listening on {subject}{until}")
                async for msg in sub.messages:
                    try:
                        text = _tail_line(kind, msg, args.json, replayed_up_to)
                    except (WireError, msgspec.DecodeError) as exc:
                        bad += 1
                        eprint(f"skipped a malformed message on {msg.subject}: {exc}")
                        continue
                    if text is None:
                        continue
                    for line in [text] if isinstance(text, str) else text:
                        out(line)
                    received += 1
                    if wanted and received >= wanted:
                        break
        nursery.cancel_scope.cancel()
    if scope.cancelled_caught:
        got = f"{received} of {wanted}" if wanted else f"{received}"
        eprint(f"{PROG} tail: timed out after {args.timeout:g} s with {got} message(s)")
        # nothing at all is a failure too: a wrong cluster id or server looks exactly like this
        return EXIT_FAILURE if wanted or not received else EXIT_OK
    return EXIT_OK
