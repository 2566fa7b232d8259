"""``backbeat-trio keygen``: an agent's ed25519 signing key and its keyring line."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

import trio

from ..._core.beats import validate_id
from ..._core.edge import decode_toml
from ..._core.signing import Keyring, generate_signing_key, public_key_b64, save_signing_key
from ..._errors import WireError
from ..common import EXIT_OK, UsageError, add_command, eprint, load_keyring, out, require_agent
from ..connection import agent_parent

if TYPE_CHECKING:
    from ..common import Subparsers

__all__ = ["add_arguments", "register", "run"]


def register(subparsers: Subparsers) -> None:
    """Add ``keygen`` and its options."""
    p = add_command(
        subparsers,
        "keygen",
        run,
        "make an agent's ed25519 signing key (file mode 0600) and print its keyring line",
        [agent_parent()],
    )
    add_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``keygen``."""
    p.add_argument("-o", "--out", metavar="FILE", help="key file (default: <agent>.key)")
    p.add_argument("--force", action="store_true", help="replace an existing key file")
    p.add_argument(
        "--keyring", metavar="FILE", help="also add (or update) the agent in this keyring file"
    )


def _update_keyring_file(path: str, agent_id: str, public_b64: str) -> str:
    """Add or replace ``agent_id`` in the keyring file at ``path``; returns what was done."""
    existed = os.path.exists(path)
    if existed:
        try:
            with open(path, "rb") as f:
                data = decode_toml(f.read(), "keyring")
        except (OSError, WireError) as exc:
            raise UsageError(f"--keyring: cannot read {path!r}: {exc}") from exc
        others = sorted(k for k in data if k != "agents")
        if others:
            raise UsageError(
                f"--keyring: {path!r} holds more than an [agents] table ({', '.join(others)}); "
                f'add this line under [agents] by hand: {agent_id} = "{public_b64}"'
            )
        ring = load_keyring(path) if "agents" in data else Keyring()
    else:
        ring = Keyring()
    replaced = agent_id in ring
    ring.add(agent_id, public_b64)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(ring.to_toml())
    os.replace(tmp, path)
    if replaced:
        return f"updated {agent_id} in {path}"
    return f"added {agent_id} to {path}" if existed else f"created {path} with {agent_id}"


async def run(args: argparse.Namespace) -> int:
    """Write the key file (and the keyring entry) and print the keyring line."""
    agent = require_agent(args)
    validate_id("--agent", agent)  # before anything is written
    path = args.out or f"{agent}.key"
    key = generate_signing_key()
    try:
        save_signing_key(key, path, overwrite=args.force)
    except FileExistsError:
        raise UsageError(f"{path!r} exists; pass --force to replace it (or --out FILE)") from None
    except OSError as exc:
        raise UsageError(f"cannot write {path!r}: {exc}") from exc
    public = public_key_b64(key)
    out(f"# private key for {agent} written to {path} (mode 0600)")
    out(f"# public key: {public}")
    out("# keyring line, under [agents]:")
    out(f'{agent} = "{public}"')
    if args.keyring:
        eprint(_update_keyring_file(args.keyring, agent, public))
    await trio.lowlevel.checkpoint()
    return EXIT_OK
