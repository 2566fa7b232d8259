"""``--http HOST:PORT`` and ``--http-token`` for the service commands: the admin server beside a
pulse, a reverb or a local cluster (:func:`backbeat_trio.serve_admin`)."""

from __future__ import annotations

import argparse
import functools
import importlib
from typing import Any

import trio

from .common import env, eprint

__all__ = ["add_http_arguments", "http_token", "load_dashboard", "start_admin"]

TOKEN_ENV = "BACKBEAT_ADMIN_TOKEN"


def add_http_arguments(p: argparse.ArgumentParser) -> None:
    """The admin server's options."""
    g = p.add_argument_group("admin HTTP server")
    g.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve health, readiness, Prometheus /metrics and the tempo API here "
        "(e.g. 127.0.0.1:8080; another host than loopback only if you give it)",
    )
    g.add_argument(
        "--http-token",
        metavar="TOKEN",
        default=env(TOKEN_ENV),
        help=f"bearer token that POST /tempo requires (env {TOKEN_ENV}); without one the "
        "admin API is read-only",
    )


def http_token(args: argparse.Namespace) -> str | None:
    """The configured admin token (an empty one counts as none)."""
    token: str | None = args.http_token
    return token or None


def load_dashboard(cluster_id: str) -> Any:
    """A ``Dashboard`` for the admin server's fallback, if this build ships one; else None."""
    try:
        module = importlib.import_module("backbeat_trio._ops.dashboard")
    except ModuleNotFoundError as exc:
        if exc.name != "backbeat_trio._ops.dashboard":
            raise
        return None
    return module.Dashboard(cluster_id)


async def start_admin(
    nursery: trio.Nursery, args: argparse.Namespace, what: str, **sources: Any
) -> str | None:
    """Start the admin server in ``nursery`` when ``--http`` was given; print its URL.

    Returns:
        The bound ``host:port``, or None without ``--http``.

    Raises:
        ConfigError: a bad address, or the ops extra is missing.
    """
    if not args.http:
        return None
    from .._ops import serve_admin

    token = http_token(args)
    bound: str = await nursery.start(
        functools.partial(serve_admin, args.http, token=token, **sources)
    )
    mode = "tempo changes need the token" if token else "read-only: no --http-token"
    extra = "; dashboard at /" if sources.get("fallback") is not None else ""
    eprint(
        f"{what} admin API on http://{bound}: /healthz /readyz /metrics /tempo /leader /bars "
        f"({mode}){extra}"
    )
    return bound
