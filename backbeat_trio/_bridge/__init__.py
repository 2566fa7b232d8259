"""The one place that imports asyncio and nats-py: NATS bridged into trio.

Only this package's modules import asyncio, trio-asyncio and nats-py, and only when a NATS
transport is opened: :func:`open_nats_transport` here imports :mod:`.nats` on its first call, so
``import backbeat_trio`` leaves asyncio alone (trio-asyncio changes how asyncio runs in the whole
process once imported, and plain asyncio code beside us must not pay for a bridge it never uses).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from .._util.trio_only import require_trio

if TYPE_CHECKING:
    from .._transport.options import ConnectionOptions
    from .nats import NatsTransport

__all__ = ["open_nats_transport"]


@contextlib.asynccontextmanager
async def open_nats_transport(cfg: ConnectionOptions) -> AsyncIterator[NatsTransport]:
    """:func:`backbeat_trio._bridge.nats.open_nats_transport`, importing the bridge on first use.

    Raises:
        NotUnderTrio: called outside trio (from asyncio, say); nothing was opened.
        NotConnected: the first connect failed (see :func:`.nats.open_nats_transport`).
    """
    require_trio("open_nats_transport")
    from .nats import open_nats_transport as open_bridge

    async with open_bridge(cfg) as transport:
        yield transport
