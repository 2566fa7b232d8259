"""The operations surface: an admin HTTP server (health, readiness, Prometheus metrics, the
tempo API, leader and bar history) beside a pulse, a reverb or a user's clients.

It needs the ``ops`` extra (hypercorn, prometheus-client). Importing this package imports
neither: the entry points below load them when called, and say how to install them if missing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import trio

from .._errors import ConfigError
from .._util.trio_only import require_trio

if TYPE_CHECKING:
    from .._client.client import Client
    from .._services.ha_pulse import HAPulseStatus
    from .._services.pulse import PulseStatus
    from .._services.reverb import ReverbStatus
    from .._transport.base import Transport
    from .asgi import ASGIApp
    from .metrics import ClientCollector

__all__ = ["DEFAULT_ADMIN_BIND", "client_collector", "serve_admin"]

#: Where the admin server listens unless told otherwise: loopback only.
DEFAULT_ADMIN_BIND = "127.0.0.1:8080"
INSTALL_HINT = "pip install 'backbeat_trio[ops]'"


def load(module: str, *, field: str = "ops", user: str = "the admin server") -> ModuleType:
    """Import ``backbeat_trio._ops.<module>``, which needs the ``ops`` extra.

    Args:
        module: the module's name in this package.
        field: the :class:`ConfigError`'s field if the extra is missing.
        user: what needs the extra, as the error says it.

    Raises:
        ConfigError: hypercorn or prometheus-client is not installed (the message says how).
    """
    try:
        return importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.startswith("backbeat_trio"):
            raise
        raise ConfigError(
            field, f"{user} needs {exc.name!r}, which is not installed: {INSTALL_HINT}"
        ) from exc


async def serve_admin(
    bind: str = DEFAULT_ADMIN_BIND,
    *,
    pulse: PulseStatus | HAPulseStatus | Mapping[str, PulseStatus | HAPulseStatus] | None = None,
    reverb: ReverbStatus | Mapping[str, ReverbStatus] | None = None,
    clients: Sequence[Client] | Callable[[], Sequence[Client]] = (),
    transport: Transport | None = None,
    cluster_id: str | None = None,
    token: str | None = None,
    fallback: ASGIApp | None = None,
    allowed_hosts: Sequence[str] = (),
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin HTTP API beside a pulse, a reverb and/or clients, until cancelled.

    ``await nursery.start(bb3.serve_admin, "127.0.0.1:8080", pulse=status, transport=t)``
    returns the bound ``"host:port"`` once it listens; cancelling the task closes the listener
    and every connection. Endpoints: ``GET /healthz``, ``GET /readyz``, ``GET /metrics``,
    ``GET``/``POST /tempo``, ``GET /leader``, ``GET /bars?since=N&limit=M`` (see
    ``docs/operations.md``).

    Args:
        bind: ``"HOST:PORT"``; loopback unless another address is given (port 0: any free one).
        pulse: a running pulse's status (``run_pulse``/``run_ha_pulse``'s ``started`` value), or
            several by pulse id (a live mapping may change while serving).
        reverb: a running reverb's status, or several by reverb id.
        clients: clients to export metrics for, or a callable returning the current ones.
        transport: the connection the services use: ``/readyz`` checks it, ``/bars`` reads the
            bar history through it (it is not closed here).
        cluster_id: the cluster (by default that of the first service given).
        token: the bearer token ``POST /tempo`` requires; None: the tempo API is read-only.
        fallback: an ASGI app for every request the admin routes don't match (a dashboard).
        allowed_hosts: ``Host`` names to answer to besides the loopback names and the bound
            address (``"*"``: any); a request for another one gets a 421 (DNS rebinding).
        task_status: ``nursery.start`` gets the bound ``"host:port"``.

    Raises:
        ConfigError: a bad argument, an address it cannot listen on, or the ``ops`` extra is
            missing.
    """
    require_trio("serve_admin")
    admin = load("admin")
    await admin.serve_admin(
        bind,
        pulse=pulse,
        reverb=reverb,
        clients=clients,
        transport=transport,
        cluster_id=cluster_id,
        token=token,
        fallback=fallback,
        allowed_hosts=allowed_hosts,
        task_status=task_status,
    )


def client_collector(clients: Sequence[Client] | Callable[[], Sequence[Client]]) -> ClientCollector:
    """A prometheus-client collector exporting clients' metrics, labelled by ``agent_id``.

    Register it on your application's own registry::

        registry.register(bb3.client_collector([client]))

    Args:
        clients: the clients, or a callable returning the current ones (read at every scrape).

    Raises:
        ConfigError: prometheus-client is not installed.
    """
    collector: ClientCollector = load("metrics").ClientCollector(clients)
    return collector
