"""Connecting nats-py: its options from a :class:`~backbeat_trio.ConnectionOptions` and the
bounded first connect (whose failures :mod:`.errors` explains)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio
import trio_asyncio

from .errors import connect_refusal, ignore_nats_errors, map_nats_errors, nats_failures

if TYPE_CHECKING:
    from .._transport.options import ConnectionOptions

log = logging.getLogger("backbeat_trio.transport")

_FAILED_CLOSE_BOUND = 0.25  # seconds to let nats-py close a connection whose handshake failed


@functools.cache
def connect_accepts(name: str) -> bool:
    """True when nats-py's ``nats.aio.client.Client.connect`` takes the keyword ``name`` (its
    public signature; ``lame_duck_mode_cb`` came with nats-py 2.15: older versions report no
    lame-duck event)."""
    import nats.aio.client

    return name in inspect.signature(nats.aio.client.Client.connect).parameters


def nats_options(cfg: ConnectionOptions) -> dict[str, Any]:
    """nats-py's ``connect`` keyword arguments for every connection option of ``cfg`` (servers
    and callbacks aside); nothing else is read from ``cfg``."""
    opts: dict[str, Any] = {
        "name": cfg.connection_name,
        "allow_reconnect": True,
        "reconnect_time_wait": cfg.reconnect_delay,
        "max_reconnect_attempts": cfg.max_reconnects,
        "connect_timeout": 2,
        "ping_interval": 5,
        "max_outstanding_pings": 2,
    }
    if cfg.user is not None:
        opts["user"] = cfg.user
        opts["password"] = cfg.password
    if cfg.token is not None:
        opts["token"] = cfg.token
    if cfg.creds_file is not None:
        opts["user_credentials"] = cfg.creds_file
    if cfg.nkeys_seed is not None:
        opts["nkeys_seed"] = cfg.nkeys_seed
    if cfg.inbox_prefix is not None:
        opts["inbox_prefix"] = cfg.inbox_prefix
    ctx = cfg.ssl_context()
    if ctx is not None:
        opts["tls"] = ctx
    return opts


async def connect_nats(
    loop: asyncio.AbstractEventLoop,
    servers: Sequence[str],
    options: dict[str, Any],
    attempts: int,
    delay: float,
    seen: Callable[[], BaseException | None],
) -> Any:
    """A connected nats-py client on ``loop``, after up to ``attempts`` tries ``delay`` apart.

    ``options`` are ``connect``'s keyword arguments (callbacks included); ``seen`` returns what
    the error callback last saw, for the message.

    Raises:
        NotConnected: every attempt failed (the message says why).
    """
    import nats.aio.client

    # nats-py retries a failing *first* connect forever when max_reconnect_attempts is -1
    # (and loops over the pool even with allow_reconnect=False), so a wrong port or a bad
    # token would hang open_client. The first connect therefore runs with reconnects off and
    # a bounded, immediate retry (nats-py tries each server max_reconnect_attempts + 1 times);
    # our own loop does the `attempts`, and the real reconnect policy is installed afterwards.
    first_connect = {
        **options,
        "allow_reconnect": False,
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0,
    }
    last: BaseException | None = None
    # what the list of connect failures does not name is no reason to try again: it is mapped
    with map_nats_errors(f"connect to NATS at {', '.join(servers)}"):
        for attempt in range(attempts):
            if attempt:
                await trio.sleep(delay)
            nc = nats.aio.client.Client()
            try:
                await trio_asyncio.aio_as_trio(nc.connect, loop=loop)(
                    servers=list(servers), **first_connect
                )
            except nats_failures() as exc:
                last = exc
                log.debug("connect attempt %d/%d failed: %r", attempt + 1, attempts, exc)
                await _close_failed(loop, nc)
                continue
            for key in ("allow_reconnect", "max_reconnect_attempts", "reconnect_time_wait"):
                nc.options[key] = options.get(key, nc.options[key])
            return nc
    assert last is not None
    raise connect_refusal(servers, last, seen()) from last


async def _close_failed(loop: asyncio.AbstractEventLoop, nc: Any) -> None:
    # A refused handshake (bad credentials) leaves nats-py's socket open: close it. Bounded:
    # after a failed TLS upgrade nats-py's close() closes the socket, then waits for ever on
    # the stream that start_tls replaced (nats-py 2.16).
    # AttributeError: nats-py < 2.15 cannot close a client whose socket never opened.
    with (
        trio.move_on_after(_FAILED_CLOSE_BOUND) as scope,
        ignore_nats_errors(
            "closing a failed connect attempt",
            "the attempt already failed and is reported; its close has nothing to add",
            also=(AttributeError,),
        ),
    ):
        await trio_asyncio.aio_as_trio(nc.close, loop=loop)()
    if scope.cancelled_caught:
        log.debug("closing a failed connect attempt did not finish in time; dropped")
