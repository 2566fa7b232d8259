"""``backbeat-trio demo --web``: the demo cluster's live dashboard, served over HTTP on loopback.

The dashboard follows the demo's cluster over a connection of its own to the demo's embedded
nats-server (the demo's clients each own theirs) and is served at ``/`` by the admin server of the
demo's reverb and pulse (:func:`backbeat_trio.serve_admin`: ``/metrics``, ``/readyz``, ``/bars``…
answer beside it).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import trio

from .._bridge import open_nats_transport
from .._errors import ConfigError
from .._ops import load
from .._transport.options import ConnectionOptions

if TYPE_CHECKING:
    from .._services.pulse import PulseStatus
    from .._services.reverb import ReverbStatus

__all__ = ["DEFAULT_WEB_BIND", "check_web_bind", "serve_demo_dashboard"]

#: Where ``--web`` without an address listens (any free port when this one is taken).
DEFAULT_WEB_BIND: Final = "127.0.0.1:8080"


def check_web_bind(bind: str) -> None:
    """Check ``bind`` before anything starts.

    Raises:
        ConfigError: ``bind`` is not ``"HOST:PORT"`` with a loopback host, or the ``ops`` extra
            is not installed.
    """
    server = load("server", field="web", user="the dashboard")
    host, _ = server.parse_bind(bind)
    if not server.is_loopback(host):
        raise ConfigError("web", f"the demo serves its dashboard on loopback only, got {bind!r}")


async def serve_demo_dashboard(
    nats_url: str,
    cluster_id: str,
    beats_per_bar: int,
    bind: str = DEFAULT_WEB_BIND,
    *,
    reverb: ReverbStatus | None = None,
    pulses: Mapping[str, PulseStatus] | None = None,
    any_port_if_busy: bool = False,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Follow ``cluster_id`` on ``nats_url`` and serve its dashboard until cancelled.

    Args:
        nats_url: the demo's nats-server.
        cluster_id: the demo's cluster.
        beats_per_bar: the demo's bar length.
        bind: ``"HOST:PORT"``, a loopback address (port 0: any free port).
        reverb: the demo's reverb, for the admin API beside the page.
        pulses: the demo's pulse by id, filled in when it starts (a live mapping).
        any_port_if_busy: when ``bind``'s port is taken, listen on any free port instead.
        task_status: ``nursery.start`` gets the page's URL once it is served.

    Raises:
        ConfigError: ``bind`` is malformed, not loopback, or taken (without
            ``any_port_if_busy``); or the ``ops`` extra is not installed.
    """
    check_web_bind(bind)
    from .._ops.admin import serve_admin
    from .._ops.dashboard import Dashboard
    from .._ops.server import parse_bind

    host, _ = parse_bind(bind)
    dashboard = Dashboard(cluster_id, beats_per_bar=beats_per_bar)
    options = ConnectionOptions(nats_url=nats_url, name="backbeat-demo-dashboard")
    async with open_nats_transport(options) as transport, trio.open_nursery() as nursery:
        await nursery.start(functools.partial(dashboard.run, transport, reverb=reverb))

        async def serve(where: str, *, task_status: trio.TaskStatus[str]) -> None:
            await serve_admin(
                where,
                pulse=pulses,
                reverb=reverb,
                transport=transport,
                cluster_id=cluster_id,
                fallback=dashboard,
                task_status=task_status,
            )

        try:
            bound: str = await nursery.start(serve, bind)
        except ConfigError:
            if not any_port_if_busy:
                raise
            any_port = f"[{host}]:0" if ":" in host else f"{host}:0"
            bound = await nursery.start(serve, any_port)
        task_status.started(f"http://{bound}/")
