"""nats-py connection options from a :class:`~backbeat_trio._client.config.Config`, and the one
edge where nats-py's connection errors are named."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._client.config import Config


def nats_failures() -> tuple[type[BaseException], ...]:
    """What nats-py raises for a failing connection or a refused operation (its own ``Error``
    tree, and the socket's ``OSError``/``TimeoutError``). Caught only where it is then mapped to
    the BackbeatError tree or logged with the reason it is ignored."""
    import nats.errors

    return (OSError, nats.errors.Error)


@functools.cache
def connect_accepts(name: str) -> bool:
    """True when nats-py's ``Client.connect`` takes the keyword ``name`` (its public signature;
    ``lame_duck_mode_cb`` came with nats-py 2.15: older versions report no lame-duck event)."""
    import nats.aio.client

    return name in inspect.signature(nats.aio.client.Client.connect).parameters


def explain_connect_error(
    servers: Sequence[str], exc: BaseException, cause: str | None = None
) -> str:
    """A ``NotConnected`` message saying why the first connect failed (refused, credentials,
    TLS), from nats-py's error and what its error callback saw (``cause``)."""
    text = f"{type(exc).__name__}: {exc}".strip()
    if cause and cause not in text:
        # nats-py reports "no servers available"; the error callback saw the reason
        text = f"{cause} ({text})"
    low = text.lower()
    where = ", ".join(servers)
    if "authorization" in low or "auth" in low:
        return f"NATS at {where} refused the credentials (authorization violation): {text}"
    if "ssl" in low or "certificate" in low or "tls" in low:
        return f"TLS handshake with {where} failed: {text}"
    return f"could not connect to NATS at {where}: {text}"


def nats_options(cfg: Config) -> dict[str, Any]:
    """nats-py's ``connect`` keyword arguments for ``cfg`` (servers and callbacks aside)."""
    opts: dict[str, Any] = {
        "name": cfg.name or f"backbeat-trio:{cfg.agent_id}",
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
    ctx = cfg.ssl_context()
    if ctx is not None:
        opts["tls"] = ctx
    return opts
