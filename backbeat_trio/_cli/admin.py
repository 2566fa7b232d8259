"""The admin server's options for the service commands (``--http HOST:PORT``, its token, the
``Host`` names it answers to, the dashboard's stream cap) and starting it beside a pulse, a
reverb or a local cluster (:func:`backbeat_trio.serve_admin`).

The token comes from a file (``--http-token-file``, refused when group or other can read it) or
the environment (``BACKBEAT_HTTP_TOKEN``, or its older name ``BACKBEAT_ADMIN_TOKEN``); it never
has to be on the command line, where every local user sees it in ``ps``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import socket
from collections.abc import Iterator
from typing import Any, Final

import trio

from .._errors import ConfigError
from .common import UsageError, count, env, eprint

__all__ = [
    "TOKEN_ENV",
    "add_http_arguments",
    "bind_http",
    "bound_http",
    "check_http_bind",
    "http_allowed_hosts",
    "http_token",
    "load_dashboard",
    "start_admin",
]

TOKEN_ENV: Final = "BACKBEAT_HTTP_TOKEN"
#: The variable's first name, still read when ``BACKBEAT_HTTP_TOKEN`` is unset.
OLD_TOKEN_ENV: Final = "BACKBEAT_ADMIN_TOKEN"
#: ``/events`` streams the dashboard serves at once unless told otherwise.
DEFAULT_EVENT_STREAMS: Final = 64


def _token_file(path: str) -> str:
    # read while parsing: a bad file is a usage error before anything starts
    from .._ops.guard import read_token_file

    try:
        return read_token_file(path)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_http_arguments(p: argparse.ArgumentParser) -> None:
    """The admin server's options."""
    g = p.add_argument_group("admin HTTP server")
    g.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve health, readiness, Prometheus /metrics and the tempo API here "
        "(e.g. 127.0.0.1:8080; another host than loopback only if you give it)",
    )
    tokens = g.add_mutually_exclusive_group()
    tokens.add_argument(
        "--http-token-file",
        dest="http_token_from_file",
        type=_token_file,
        metavar="PATH",
        help="file holding the bearer token that POST /tempo requires (mode 0600 or 0400; one "
        f"trailing newline is dropped); or set {TOKEN_ENV} (older name: {OLD_TOKEN_ENV}). "
        "Without a token the admin API is read-only",
    )
    tokens.add_argument(
        "--http-token",
        metavar="TOKEN",
        help="the bearer token itself: visible to every local user in `ps`; prefer "
        f"--http-token-file or {TOKEN_ENV}",
    )
    g.add_argument(
        "--http-allow-host",
        dest="http_allow_hosts",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name the admin server answers to besides localhost, 127.0.0.1, ::1 and "
        "the --http address (repeatable; '*': any). Requests for other names get a 421, so "
        "a web page cannot read the API through DNS rebinding",
    )
    g.add_argument(
        "--http-event-streams",
        type=count,
        default=DEFAULT_EVENT_STREAMS,
        metavar="N",
        help="live dashboard /events streams served at once (reverb, cluster); one more gets a 503",
    )


def http_token(args: argparse.Namespace) -> str | None:
    """The configured admin token: ``--http-token``, ``--http-token-file``, ``$BACKBEAT_HTTP_TOKEN``
    or ``$BACKBEAT_ADMIN_TOKEN``, the first given (an empty one counts as none)."""
    given: str | None = args.http_token
    if given:
        eprint(
            "warning: --http-token is visible to every local user in `ps`; "
            f"use --http-token-file or {TOKEN_ENV}"
        )
        return given
    from_file: str | None = args.http_token_from_file
    return from_file or env(TOKEN_ENV) or env(OLD_TOKEN_ENV)


def http_allowed_hosts(args: argparse.Namespace) -> list[str]:
    """The names given with ``--http-allow-host``."""
    names: list[str] = args.http_allow_hosts
    return list(names)


def load_dashboard(cluster_id: str, args: argparse.Namespace | None = None) -> Any:
    """A ``Dashboard`` for the admin server's fallback, if this build ships one; else None.

    ``args`` sets its ``/events`` cap (``--http-event-streams``).
    """
    try:
        module = importlib.import_module("backbeat_trio._ops.dashboard")
    except ModuleNotFoundError as exc:
        if exc.name != "backbeat_trio._ops.dashboard":
            raise
        return None
    streams = DEFAULT_EVENT_STREAMS if args is None else args.http_event_streams
    return module.Dashboard(cluster_id, max_streams=streams)


def _http_refused(args: argparse.Namespace, exc: ConfigError) -> UsageError:
    reason = str(exc).removeprefix(f"{exc.field}: ")
    # a malformed address gets an example; a taken one needs another port, not another form
    example = "" if reason.startswith("cannot listen") else " (e.g. --http 127.0.0.1:8080)"
    return UsageError(f"--http {args.http}: {reason}{example}")


def check_http_bind(args: argparse.Namespace) -> None:
    """Refuse a ``--http`` address that is malformed or taken before anything starts (bound,
    then released: for a command that serves its admin API from elsewhere).

    Raises:
        UsageError: the address cannot be listened on (the message names ``--http``).
        ConfigError: the ops extra is missing.
    """
    if args.http:
        bind_http(args).close()


@contextlib.contextmanager
def bound_http(args: argparse.Namespace) -> Iterator[socket.socket | None]:
    """The ``--http`` address bound now, before the service starts (None without ``--http``);
    closed on the way out unless :func:`start_admin` took it over.

    A service command binds first and starts its service second, so a malformed or taken
    address stops it before it publishes anything.

    Raises:
        UsageError: the address cannot be listened on (the message names ``--http``).
        ConfigError: the ops extra is missing.
    """
    listener = bind_http(args) if args.http else None
    try:
        yield listener
    finally:
        if listener is not None:
            listener.close()  # (a no-op once the server has taken it over)


def bind_http(args: argparse.Namespace) -> socket.socket:
    """A socket bound to ``--http`` (see :func:`bound_http`).

    Raises:
        UsageError: the address cannot be listened on (the message names ``--http``).
        ConfigError: the ops extra is missing.
    """
    from .._ops import load

    try:
        listener: socket.socket = load("server").bind_listener(args.http)
    except ConfigError as exc:
        if exc.field != "bind":
            raise
        raise _http_refused(args, exc) from None
    return listener


async def start_admin(
    nursery: trio.Nursery,
    args: argparse.Namespace,
    what: str,
    listener: socket.socket | None = None,
    **sources: Any,
) -> str | None:
    """Start the admin server in ``nursery`` when ``--http`` was given; print its URL.

    Args:
        nursery: where it runs.
        args: the command's options (``--http`` and the token and ``Host`` options).
        what: the service, as the URL line names it.
        listener: the socket :func:`bound_http` bound before the service started (without
            one, the address is bound here).
        sources: :func:`backbeat_trio.serve_admin`'s service arguments.

    Returns:
        The bound ``host:port``, or None without ``--http``.

    Raises:
        UsageError: the ``--http`` address is malformed or cannot be listened on.
        ConfigError: a bad token, or the ops extra is missing.
    """
    if not args.http:
        return None
    from .._ops import load

    serve_admin = load("admin").serve_admin
    token = http_token(args)
    try:
        bound: str = await nursery.start(
            functools.partial(
                serve_admin,
                args.http,
                token=token,
                allowed_hosts=http_allowed_hosts(args),
                listener=listener,
                **sources,
            )
        )
    except ConfigError as exc:
        if exc.field != "bind":
            raise
        raise _http_refused(args, exc) from None
    mode = "tempo changes need the token" if token else f"read-only: no token, see {TOKEN_ENV}"
    extra = "; dashboard at /" if sources.get("fallback") is not None else ""
    eprint(
        f"{what} admin API on http://{bound}: /healthz /readyz /metrics /tempo /leader /bars "
        f"({mode}){extra}"
    )
    return bound
