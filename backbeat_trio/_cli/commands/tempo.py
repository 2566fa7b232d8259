"""``backbeat-trio tempo``: ask the pulse for a new tempo and print its answer."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import trio

from ..._bridge import open_nats_transport
from ..._core.beats import tempo_subject, validate_tempo
from ..._core.edge import decode_json
from ..._core.hlc import HLC
from ..._core.wire import TempoChange, decode, encode
from ..._errors import WireError
from ..._transport.base import Message
from ..common import (
    EXIT_FAILURE,
    EXIT_OK,
    PROG,
    UsageError,
    add_command,
    eprint,
    out,
    positive_float,
)
from ..connection import agent_parent, client_config, conn_parent
from ..formatting import compact_json

if TYPE_CHECKING:
    from ..common import Subparsers

__all__ = ["add_arguments", "register", "run"]


def register(subparsers: Subparsers) -> None:
    """Add ``tempo`` and its options."""
    p = add_command(
        subparsers,
        "tempo",
        run,
        "ask the pulse for a new tempo and print its answer (exit 1 if refused)",
        [conn_parent(), agent_parent()],
    )
    add_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tempo``."""
    p.add_argument("bpm", type=int, help="the tempo wanted, 1..1200 BPM")
    p.add_argument("--reason", default="", help="why (the pulse logs it)")
    p.add_argument("--requested-by", metavar="NAME", help="who asks (default: the agent id)")
    p.add_argument(
        "--force",
        action="store_true",
        help="ask for a step larger than the pulse's limit (needs --allow-forced-tempo there)",
    )
    p.add_argument(
        "--timeout", type=positive_float, default=2.0, metavar="SECONDS", help="wait for a reply"
    )
    p.add_argument("--json", action="store_true", help="print the pulse's reply as JSON")


async def run(args: argparse.Namespace) -> int:
    """Send the request; exit 0 when the pulse accepts it, 1 otherwise."""
    validate_tempo(args.bpm, "bpm")
    requested_by = args.requested_by or args.agent or "backbeat-trio-cli"
    reason = args.reason
    if args.force and not reason.startswith("force"):
        reason = f"force: {reason}" if reason else "force"
    try:
        change = TempoChange(
            cluster_id=args.cluster,
            tempo_bpm=args.bpm,
            requested_by=requested_by,
            hlc=str(HLC(requested_by).now()),
            reason=reason,
        )
        body = encode(change)
        decode(body, TempoChange)  # the constraints, before anything is sent
    except WireError as exc:
        raise UsageError(str(exc)) from exc
    cfg = client_config(args, args.agent or "backbeat-tempo")
    subject = tempo_subject(args.cluster)
    async with open_nats_transport(cfg) as transport:
        inbox = transport.new_inbox()
        replies = await transport.subscribe(inbox, buffer=4)
        transport.publish(subject, body, reply=inbox)
        reply: Message | None = None
        with trio.move_on_after(args.timeout):
            reply = await replies.messages.receive()
    if reply is None:
        eprint(
            f"{PROG} tempo: no reply within {args.timeout:g} s: is a pulse running for cluster "
            f"{args.cluster!r}? (the request went out on {subject})"
        )
        return EXIT_FAILURE
    if not reply.data:  # a NATS "no responders" status: nobody subscribes to the subject
        eprint(f"{PROG} tempo: no pulse is listening on {subject}")
        return EXIT_FAILURE
    try:
        answer = decode_json(reply.data, "tempo reply")
        accepted = bool(answer["accepted"])
    except (WireError, KeyError, TypeError):
        eprint(f"{PROG} tempo: unreadable reply: {reply.data[:200]!r}")
        return EXIT_FAILURE
    if args.json:
        out(compact_json(reply.data))
    else:
        verdict = "accepted" if accepted else "refused"
        when = answer.get("effective_beat")
        at = f", effective at beat {when}" if accepted and when is not None else ""
        out(f"tempo {args.bpm} BPM {verdict}{at}: {answer.get('reason', '')}")
    if not accepted and not args.force:
        eprint(
            "(a larger step needs --force here and --allow-forced-tempo on the pulse, or "
            "several smaller steps)"
        )
    return EXIT_OK if accepted else EXIT_FAILURE
