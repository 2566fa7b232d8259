"""``backbeat-trio demo --web``: the demo cluster's live dashboard, served over HTTP on loopback.

The dashboard follows the demo's cluster over a connection of its own to the demo's embedded
nats-server (the demo's clients each own theirs) and is served with
:func:`backbeat_trio._ops.server.serve_asgi` (hypercorn's trio worker).
"""

from __future__ import annotations

from typing import Final

import trio

from .._bridge.nats import open_nats_transport
from .._errors import ConfigError
from .._transport.options import ConnectionOptions

__all__ = ["DEFAULT_WEB_BIND", "check_web_bind", "serve_demo_dashboard"]

#: Where ``--web`` without an address listens (any free port when this one is taken).
DEFAULT_WEB_BIND: Final = "127.0.0.1:8080"
_INSTALL_HINT: Final = "pip install 'backbeat_trio[ops]'"


def check_web_bind(bind: str) -> None:
    """Check ``bind`` before anything starts.

    Raises:
        ConfigError: ``bind`` is not ``"HOST:PORT"`` with a loopback host, or the ``ops`` extra
            is not installed.
    """
    try:
        from .._ops.server import is_loopback, parse_bind
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.startswith("backbeat_trio"):
            raise
        raise ConfigError(
            "web", f"the dashboard needs {exc.name!r}, which is not installed: {_INSTALL_HINT}"
        ) from exc
    host, _ = parse_bind(bind)
    if not is_loopback(host):
        raise ConfigError("web", f"the demo serves its dashboard on loopback only, got {bind!r}")


async def serve_demo_dashboard(
    nats_url: str,
    cluster_id: str,
    beats_per_bar: int,
    bind: str = DEFAULT_WEB_BIND,
    *,
    any_port_if_busy: bool = False,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Follow ``cluster_id`` on ``nats_url`` and serve its dashboard until cancelled.

    Args:
        nats_url: the demo's nats-server.
        cluster_id: the demo's cluster.
        beats_per_bar: the demo's bar length.
        bind: ``"HOST:PORT"``, a loopback address (port 0: any free port).
        any_port_if_busy: when ``bind``'s port is taken, listen on any free port instead.
        task_status: ``nursery.start`` gets the page's URL once it is served.

    Raises:
        ConfigError: ``bind`` is malformed, not loopback, or taken (without
            ``any_port_if_busy``); or the ``ops`` extra is not installed.
    """
    check_web_bind(bind)
    from .._ops.dashboard import Dashboard
    from .._ops.server import parse_bind, serve_asgi

    host, _ = parse_bind(bind)
    dashboard = Dashboard(cluster_id, beats_per_bar=beats_per_bar)
    options = ConnectionOptions(nats_url=nats_url, name="backbeat-demo-dashboard")
    async with open_nats_transport(options) as transport, trio.open_nursery() as nursery:
        await nursery.start(dashboard.run, transport)
        try:
            bound: str = await nursery.start(serve_asgi, dashboard, bind)
        except ConfigError:
            if not any_port_if_busy:
                raise
            any_port = f"[{host}]:0" if ":" in host else f"{host}:0"
            bound = await nursery.start(serve_asgi, dashboard, any_port)
        task_status.started(f"http://{bound}/")
