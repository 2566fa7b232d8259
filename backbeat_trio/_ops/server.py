"""Serving an ASGI app on trio with hypercorn's trio worker, inside the caller's nursery.

Hypercorn does the HTTP; this module picks the address (loopback unless told otherwise), keeps
hypercorn's logs in Python logging (quiet: no access log, its notices at DEBUG level on
``backbeat_trio.admin.http``), answers ASGI lifespan events for apps that don't, and reports the
bound ``host:port`` through ``task_status``. Cancelling the task closes the listener and every
connection: no thread, nothing left running.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any, Final

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.logging import Logger as HypercornLogger
from hypercorn.trio import serve

from .._errors import ConfigError
from .asgi import ASGIApp, Receive, Scope, Send, answer_lifespan, decimal_digits

__all__ = ["DEFAULT_BIND", "bind_listener", "check_bind", "is_loopback", "parse_bind", "serve_asgi"]

DEFAULT_BIND: Final = "127.0.0.1:8080"

log = logging.getLogger("backbeat_trio.admin")
_http_log = logging.getLogger("backbeat_trio.admin.http")


class _QuietLogger(HypercornLogger):
    """Hypercorn's log, one level down: its start-up notices are not the user's news."""

    async def info(self, message: str, *args: Any, **kwargs: Any) -> None:
        await self.debug(message, *args, **kwargs)


def parse_bind(bind: str) -> tuple[str, int]:
    """Split ``"HOST:PORT"`` (``"[::1]:8080"`` for IPv6; port 0 picks a free one).

    Raises:
        ConfigError: not of that shape.
    """
    if not isinstance(bind, str):
        raise ConfigError("bind", f"must be 'HOST:PORT', got {bind!r}")
    host, sep, port_text = bind.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not decimal_digits(port_text) or not 0 <= int(port_text) <= 65535:
        raise ConfigError("bind", f"must be 'HOST:PORT' with a port in 0..65535, got {bind!r}")
    return host, int(port_text)


def bind_listener(bind: str) -> socket.socket:
    """A socket bound to ``bind`` for :func:`serve_asgi`'s ``listener``, bound now.

    For a command that starts a service before serving its admin API: a bad or taken address is
    refused before the service starts. The caller closes it if it never serves it.

    Raises:
        ConfigError: ``bind`` is malformed or cannot be listened on.
    """
    host, port = parse_bind(bind)
    return _bind_socket(host, port, bind)


def check_bind(bind: str) -> None:
    """Check that ``bind`` is ``"HOST:PORT"`` and can be listened on now (bound, then released).

    Raises:
        ConfigError: ``bind`` is malformed or cannot be listened on.
    """
    bind_listener(bind).close()


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _with_lifespan(app: ASGIApp) -> ASGIApp:
    # hypercorn opens with a lifespan scope; an app that does not know it would make it log an
    # error and carry on, so the lifespan is answered here and never reaches the app
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
        else:
            await app(scope, receive, send)

    return wrapped


async def serve_asgi(
    app: ASGIApp,
    bind: str = DEFAULT_BIND,
    *,
    listener: socket.socket | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` over HTTP/1.1 until cancelled.

    Args:
        app: an ASGI 3 application (it runs on trio).
        bind: ``"HOST:PORT"``; loopback by default. Any other address is used only because the
            caller gave it (a warning says the server is reachable from the network).
        listener: a socket :func:`bind_listener` bound to ``bind`` already (it is taken over).
        task_status: ``nursery.start`` gets the bound ``"host:port"`` (the real port when
            ``bind`` asked for port 0).

    Raises:
        ConfigError: ``bind`` is malformed or cannot be listened on.
    """
    host, port = parse_bind(bind)
    if not is_loopback(host):
        log.warning("admin server listens on %s: reachable beyond this host", bind)
    if listener is None:
        listener = _bind_socket(host, port, bind)
    config = HypercornConfig()
    # hypercorn takes over the bound socket (it closes it when it stops serving)
    config.bind = [f"fd://{listener.detach()}"]
    config.accesslog = None
    config.errorlog = _http_log
    config.logger_class = _QuietLogger
    config.graceful_timeout = 1.0

    async def run(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(_with_lifespan(app), config, mode="asgi", task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(run)
        bound = binds[0].removeprefix("http://") if binds else bind
        log.info("admin server on http://%s", bound)
        task_status.started(bound)


def _bind_socket(host: str, port: int, bind: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError("bind", f"cannot listen on {bind}: {exc}") from exc
    return sock
