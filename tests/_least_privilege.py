"""Test support (no tests here): the least-privilege nats-server configuration of
docs/security.md, rendered for a cluster, and what tests/test_least_privilege.py runs it with
(a started server's roles, plain nats-py connections, the CLI).

Imported as ``from _least_privilege import ...`` (the tests directory is on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import trio
import trio_asyncio

import backbeat_trio as bb3
from backbeat_trio._core.beats import status_stream_name
from backbeat_trio._core.lease import lease_bucket_name
from backbeat_trio._services.history import bar_stream_name
from backbeat_trio._services.lease import LEASE_KEY, REVERB_LEASE_KEY

CLUSTER = "main"  # the cluster the configuration in docs/security.md is written for
ROLES = ("pulse", "reverb", "agent", "operator")
TEMPO = 600  # BPM: 100 ms beats, 400 ms bars
SECURITY_MD = Path(__file__).resolve().parent.parent / "docs" / "security.md"
CLI = [sys.executable, "-m", "backbeat_trio"]


# --- the configuration ------------------------------------------------------------------------
def inbox_prefix(role: str) -> str:
    """The reply-inbox prefix a role connects with (``inbox_prefix=`` /
    ``BACKBEAT_NATS_INBOX_PREFIX``); its permissions let it read only its own."""
    return f"_INBOX_{role}"


def password_variable(role: str) -> str:
    """The variable the configuration reads a role's password from."""
    return f"BACKBEAT_{role.upper()}_PASSWORD"


def _api(verb: str, stream: str) -> str:
    return f"$JS.API.{verb}.{stream}"


def _ordered_consumer(stream: str) -> list[str]:
    # a push consumer read in order: create it (with or without a name/filter in the subject)
    # and answer its flow-control requests
    create = _api("CONSUMER.CREATE", stream)
    return [create, f"{create}.>", f"$JS.FC.{stream}.>"]


def _history_reader(stream: str) -> list[str]:
    # single-message reads and a short-lived pull consumer (replay_bars)
    return [
        _api("STREAM.INFO", stream),
        _api("STREAM.MSG.GET", stream),
        _api("CONSUMER.CREATE", stream),
        _api("CONSUMER.CREATE", stream) + ".>",
        _api("CONSUMER.MSG.NEXT", stream) + ".>",
        _api("CONSUMER.INFO", stream) + ".>",
        _api("CONSUMER.DELETE", stream) + ".>",
    ]


def _lease_holder(cluster_id: str, key: str) -> list[str]:
    bucket = lease_bucket_name(cluster_id)
    stream = f"KV_{bucket}"
    return [
        _api("STREAM.CREATE", stream),
        _api("STREAM.INFO", stream),
        _api("STREAM.MSG.GET", stream),
        *_ordered_consumer(stream),
        f"$KV.{bucket}.{key}",
    ]


@dataclass(frozen=True)
class Role:
    comment: str
    publish: list[str]
    subscribe: list[str]
    allow_responses: bool = False


def role_permissions(cluster_id: str) -> dict[str, Role]:
    """What each role may publish and subscribe to, for one cluster."""
    c = cluster_id
    beat, status, bar, tempo = (
        f"backbeat.{kind}.{c}" for kind in ("beat", "status", "bar", "tempo")
    )
    claims, bars = status_stream_name(c), bar_stream_name(c)
    return {
        "pulse": Role(
            "pulse and HA pulse: beats out (and watched); tempo requests in, answered; its lease",
            [beat, *_lease_holder(c, LEASE_KEY)],
            [beat, tempo, f"{inbox_prefix('pulse')}.>"],
            allow_responses=True,
        ),
        "reverb": Role(
            "reverb and HA reverb: claims in, bar reports out; its two streams; its lease",
            [
                bar,
                "$JS.API.STREAM.NAMES",
                _api("STREAM.CREATE", claims),
                _api("STREAM.UPDATE", claims),
                _api("STREAM.INFO", claims),
                *_ordered_consumer(claims),
                _api("STREAM.CREATE", bars),
                _api("STREAM.UPDATE", bars),
                *_history_reader(bars),
                *_lease_holder(c, REVERB_LEASE_KEY),
            ],
            [beat, status, bar, f"{inbox_prefix('reverb')}.>"],
        ),
        "agent": Role(
            "agent: beats in; claims out (JetStream publishes: the PubAcks come to its inbox)",
            [status, "$JS.API.STREAM.NAMES"],
            [beat, f"{inbox_prefix('agent')}.>"],
        ),
        "operator": Role(
            "operator: tempo requests (the pulse answers); watches beats, claims and reports",
            [tempo, *_history_reader(bars)],
            [beat, status, bar, f"{inbox_prefix('operator')}.>"],
        ),
    }


def least_privilege_config(cluster_id: str = CLUSTER) -> str:
    """The ``authorization`` block of docs/security.md for ``cluster_id``."""
    lines = [
        f'# BACKBEAT cluster "{cluster_id}": one user per role, each with only what it needs.',
        "# nats-server reads the passwords from its environment: BACKBEAT_<ROLE>_PASSWORD.",
        "authorization {",
    ]
    for name, role in role_permissions(cluster_id).items():
        lines.append(f"  # {role.comment}")
        lines.append(f"  {name.upper()} = {{")
        for direction, subjects in (("publish", role.publish), ("subscribe", role.subscribe)):
            lines.append(f"    {direction} = {{ allow = [")
            lines += [f"      {json.dumps(s)}" for s in subjects]
            lines.append("    ] }")
        if role.allow_responses:
            lines.append("    allow_responses = true")
        lines.append("  }")
    lines.append("  users = [")
    for name in ROLES:
        lines.append(
            f"    {{ user: {name}, password: ${password_variable(name)}, "
            f"permissions: ${name.upper()} }}"
        )
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def documented_config() -> str:
    """The configuration docs/security.md shows (its first ``nats`` code block)."""
    text = SECURITY_MD.read_text()
    found = re.search(r"```nats\n(.*?)```", text, re.DOTALL)
    assert found is not None, "docs/security.md has no ```nats block"
    return found.group(1)


BEAT = f"backbeat.beat.{CLUSTER}"
STATUS = f"backbeat.status.{CLUSTER}"
BAR = f"backbeat.bar.{CLUSTER}"
TEMPO_SUBJECT = f"backbeat.tempo.{CLUSTER}"
LEASE_SUBJECT = f"$KV.{lease_bucket_name(CLUSTER)}.{LEASE_KEY}"


# --- a server running it ----------------------------------------------------------------------
@dataclass
class Server:
    process: bb3.NatsServerProcess
    passwords: dict[str, str]
    log_offset: int = 0

    @property
    def url(self) -> str:
        return self.process.url

    def options(self, role: str) -> dict[str, Any]:
        """The connection keywords of a role (any config type takes them)."""
        return {
            "nats_url": self.url,
            "user": role,
            "password": self.passwords[role],
            "inbox_prefix": inbox_prefix(role),
        }

    def cli_env(self, role: str) -> dict[str, str]:
        """The CLI's environment for a role (nothing else of the caller's BACKBEAT_* settings)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("BACKBEAT_") or k == "BACKBEAT_NATS_SERVER"
        }
        env.update(
            BACKBEAT_NATS_URL=self.url,
            BACKBEAT_CLUSTER_ID=CLUSTER,
            BACKBEAT_NATS_USER=role,
            BACKBEAT_NATS_PASSWORD=self.passwords[role],
            BACKBEAT_NATS_INBOX_PREFIX=inbox_prefix(role),
        )
        return env

    def mark(self) -> None:
        """From now on, :meth:`violations` reports only what follows."""
        self.log_offset = self.process.log_path.stat().st_size

    def violations(self) -> list[str]:
        """The permission violations the server logged since :meth:`mark`."""
        with self.process.log_path.open("rb") as log:
            log.seek(self.log_offset)
            text = log.read().decode(errors="replace")
        return [line for line in text.splitlines() if "Violation" in line]


@contextlib.asynccontextmanager
async def open_nc(lp: Server, role: str) -> AsyncIterator[tuple[Any, list[str]]]:
    """A plain nats-py connection as ``role`` (for what the SDK would never send) and the
    asynchronous errors the server sends it. Needs a trio-asyncio loop around it."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await trio_asyncio.aio_as_trio(nats.connect)(
        lp.url,
        user=role,
        password=lp.passwords[role],
        inbox_prefix=inbox_prefix(role),
        error_cb=on_error,
        allow_reconnect=False,
    )
    try:
        yield nc, errors
    finally:
        with trio.CancelScope(shield=True):
            await trio_asyncio.aio_as_trio(nc.close)()


@dataclass
class Watcher:
    """Messages received on some subjects by connections that may read them."""

    got: list[tuple[str, bytes]] = field(default_factory=list)

    async def on_message(self, msg: Any) -> None:
        self.got.append((msg.subject, bytes(msg.data)))

    def on(self, subject: str) -> list[bytes]:
        return [data for subj, data in self.got if subj == subject]


async def run_cli(lp: Server, role: str, *args: str) -> tuple[int, str, str]:
    """Run ``backbeat-trio <args>`` with ``role``'s credentials (bounded)."""
    with trio.fail_after(40):
        done = await trio.run_process(
            [*CLI, *args],
            capture_stdout=True,
            capture_stderr=True,
            env=lp.cli_env(role),
            check=False,
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def wait_until(predicate: Any, what: str, bound: float = 15.0) -> None:
    """Poll (bounded) a count that a service keeps without an event to await."""
    with trio.move_on_after(bound):
        while not predicate():  # noqa: ASYNC110 - the counters have no event
            await trio.sleep(0.05)
    assert predicate(), f"timed out waiting for {what}"
