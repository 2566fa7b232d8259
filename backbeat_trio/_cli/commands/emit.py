"""``backbeat-trio emit``: send one status claim and wait until it is delivered."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from ..._client.client import open_client
from ..._core.signing import public_key_b64
from ..._core.wire import CLAIM_STATES, StatusClaim, encode_claim
from ..common import (
    EXIT_FAILURE,
    EXIT_OK,
    PROG,
    UsageError,
    add_command,
    env,
    eprint,
    load_key,
    load_keyring,
    out,
    positive_float,
    require_agent,
)
from ..connection import agent_parent, client_config, conn_parent

if TYPE_CHECKING:
    from ..common import Subparsers

__all__ = ["add_arguments", "register", "run"]


def register(subparsers: Subparsers) -> None:
    """Add ``emit`` and its options."""
    p = add_command(
        subparsers,
        "emit",
        run,
        "send one status claim (signed with --key) and wait until it is delivered",
        [conn_parent(), agent_parent()],
    )
    add_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``emit``."""
    p.add_argument("--state", choices=CLAIM_STATES, default="executing", help="the task's state")
    p.add_argument("--progress", type=float, default=0.0, help="progress, 0..1")
    p.add_argument("--beats-left", type=int, default=0, metavar="N", help="beats left (>= 0)")
    p.add_argument("--notes", default="", help="free text (up to 4096 characters)")
    p.add_argument(
        "--wait-for",
        action="append",
        metavar="REF",
        help="what it waits for, e.g. agent://agent-2 (repeatable)",
    )
    p.add_argument("--task-id", metavar="ID", help="task id (default: task:<8 hex>)")
    p.add_argument(
        "--key",
        metavar="FILE",
        default=env("BACKBEAT_SIGNING_KEY"),
        help="sign with this key file (env BACKBEAT_SIGNING_KEY)",
    )
    p.add_argument(
        "--keyring",
        metavar="FILE",
        default=env("BACKBEAT_KEYRING"),
        help="the reverb's keyring (env BACKBEAT_KEYRING): warn when it would not trust the "
        "claim (JetStream stores any claim; the reverb judges it)",
    )
    p.add_argument(
        "--beat-timeout",
        type=positive_float,
        default=65.0,
        metavar="SECONDS",
        help="wait this long for a beat, so the claim names the current beat (0: don't wait)",
    )
    p.add_argument(
        "--flush-timeout",
        type=positive_float,
        default=10.0,
        metavar="SECONDS",
        help="give up (exit 1) when the claim is not delivered within this long",
    )
    p.add_argument("--json", action="store_true", help="print the claim as sent, as JSON")


async def run(args: argparse.Namespace) -> int:
    """Send the claim; exit 1 when it was not delivered within ``--flush-timeout``."""
    agent = require_agent(args)
    key = load_key(args.key) if args.key else None
    claim = StatusClaim(
        task_id=args.task_id or "",
        state=args.state,
        progress=args.progress,
        beats_left=args.beats_left,
        notes=args.notes,
        wait_for=list(args.wait_for or []),
    )
    # validate before connecting (the SDK fills these in for real)
    encode_claim(
        msgspec.structs.replace(claim, agent_id=agent, hlc="0:0:0", task_id=claim.task_id or "t")
    )
    trust = _keyring_verdict(args.keyring, agent, key) if args.keyring else None
    if trust is not None and not trust[0]:
        eprint(f"warning: {trust[1]}")
    cfg = client_config(args, agent, signing_key=key)
    async with open_client(cfg) as client:
        if args.beat_timeout > 0:
            with trio.move_on_after(args.beat_timeout) as waited:
                await client.wait_for_beat()
            if waited.cancelled_caught:
                eprint(
                    f"warning: no beat within {args.beat_timeout:g} s (is a pulse running for "
                    f"cluster {cfg.cluster_id!r}?); the claim carries beat_index 0"
                )
        sent = await client.emit_status(claim)
        with trio.move_on_after(args.flush_timeout) as flushing:
            await client.flush_claims()
        if flushing.cancelled_caught:
            eprint(
                f"{PROG} emit: the claim was not delivered within {args.flush_timeout:g} s "
                f"({client.delivery_mode} mode)"
            )
            return EXIT_FAILURE
        mode = client.delivery_mode
    if args.json:
        out(encode_claim(sent).decode())
    else:
        how = (
            "acknowledged by JetStream: stored in the status stream, not accepted by anyone yet"
            if mode == "jetstream"
            else "published (core NATS): sent, not accepted by anyone yet"
        )
        signed = "signed" if key is not None else "unsigned"
        out(
            f"sent {signed} claim {sent.task_id} for {sent.agent_id} at beat {sent.beat_index}: "
            f"{sent.state} {sent.progress * 100:.0f}%, {sent.beats_left} beats left; {how}"
        )
        if trust is not None:
            out(trust[1])
        else:
            needs = (
                "only if its keyring holds this agent's public key"
                if key is not None
                else "only if it runs with --allow-unsigned"
            )
            out(
                f"the reverb counts it {needs} (--keyring FILE here checks that; the bar "
                "report's claims and rejected counts show what it did)"
            )
    return EXIT_OK


def _keyring_verdict(path: str, agent: str, key: Any) -> tuple[bool, str]:
    """Whether a reverb with the keyring at ``path`` would trust this claim's signature, and
    what to say about it (a signed claim still has to pass the reverb's other checks)."""
    try:
        keyring = load_keyring(path)
    except UsageError as exc:
        # only a check: the claim can go out all the same (the keyring may be the reverb's)
        return False, f"cannot check the claim against the keyring: {exc}"
    on_ring = keyring.public_key_b64(agent)
    if key is None:
        return False, (
            f"the claim is unsigned: a reverb with the keyring {path} rejects it (unsigned) "
            "unless it runs with --allow-unsigned"
        )
    if on_ring is None:
        return False, (
            f"{agent} is not on the keyring {path}: a reverb using it rejects this claim "
            f"(unknown_agent); add it with `{PROG} keygen --keyring`"
        )
    if on_ring != public_key_b64(key):
        return False, (
            f"the keyring {path} holds another key for {agent}: a reverb using it rejects "
            "this claim (wrong_key)"
        )
    return True, f"the keyring {path} trusts this key for {agent}"
