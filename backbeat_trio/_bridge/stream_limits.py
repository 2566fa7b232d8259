"""A stream's limits in nats-py's terms, and the update that puts asked-for bounds in force.

:class:`~backbeat_trio._transport.jetstream.StreamLimits` decides (:meth:`StreamLimits.conform`);
this module only translates it to and from nats-py's ``StreamConfig`` and asks for the update.
It runs on the asyncio side, called from :func:`backbeat_trio._bridge.jetstream.stream_ensure`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from .._transport.jetstream import StreamLimits

__all__ = ["config_fields", "conform_stream", "limits_of"]

log = logging.getLogger("backbeat_trio.jetstream")


def config_fields(limits: StreamLimits) -> dict[str, Any]:
    """The ``StreamConfig`` keyword arguments that set ``limits``."""
    from nats.js.api import DiscardPolicy

    return {
        "max_msgs": limits.max_msgs,
        "max_bytes": limits.max_bytes,
        "max_age": limits.max_age,
        "discard": DiscardPolicy.NEW if limits.discard == "new" else DiscardPolicy.OLD,
        "duplicate_window": limits.duplicate_window,
    }


def _limit(value: Any) -> int:
    return -1 if value is None or int(value) <= 0 else int(value)


def limits_of(config: Any) -> StreamLimits:
    """The limits a nats-py ``StreamConfig`` (as read back from the server) sets."""
    from nats.js.api import DiscardPolicy

    max_age = float(config.max_age or 0.0)
    return StreamLimits(
        max_msgs=_limit(config.max_msgs),
        max_bytes=_limit(config.max_bytes),
        max_age=max_age if max_age > 0 else None,
        discard="new" if config.discard == DiscardPolicy.NEW else "old",
        duplicate_window=float(config.duplicate_window or 0.0),
    )


async def conform_stream(jsx: Any, name: str, limits: StreamLimits) -> None:
    """Update stream ``name`` so that every bound ``limits`` asks for is in force (a stream
    created without limits gets them); nothing else of its configuration changes.

    Raises:
        Exception: whatever nats-py raised (the caller translates it).
    """
    config = (await jsx.stream_info(name)).config
    existing = limits_of(config)
    updated = limits.conform(existing)
    if updated is None:
        return
    log.info("stream %s: limits %s -> %s", name, existing, updated)
    await jsx.update_stream(dataclasses.replace(config, **config_fields(updated)))
