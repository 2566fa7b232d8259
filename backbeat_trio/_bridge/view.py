"""A handle on a shared :class:`~backbeat_trio._bridge.nats.NatsTransport` for one more user."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from .._errors import NotConnected
from .._transport.base import ConnEvent, Message, Subscription, _offer
from .jetstream import NatsJetStream

if TYPE_CHECKING:
    from .nats import NatsTransport


class NatsTransportView:
    """One user's handle on a shared :class:`NatsTransport` (made by :meth:`NatsTransport.view`).

    It is a :class:`Transport`: its own ``events`` channel (every connection event), everything
    else done by the shared transport. :meth:`aclose` detaches it; the connection stays open.

    Attributes:
        transport: the shared transport.
        events_dropped: events this view's full ``events`` channel could not take.
    """

    def __init__(self, transport: NatsTransport, event_buffer: int = 1024) -> None:
        self.transport = transport
        self._event_send, self._events = trio.open_memory_channel[ConnEvent](event_buffer)
        self.events_dropped = 0
        self._detached = False

    def __repr__(self) -> str:
        state = "detached " if self._detached else ""
        return f"<NatsTransportView {state}of {self.transport!r}>"

    def _shared_transport(self) -> NatsTransport:
        if self._detached:
            raise NotConnected("this view of the NATS connection was closed")
        return self.transport

    def _push(self, event: ConnEvent) -> None:
        if not _offer(self._event_send, event):
            self.events_dropped += 1

    @property
    def connected(self) -> bool:
        """True while the shared connection is up."""
        return not self._detached and self.transport.connected

    @property
    def events(self) -> trio.MemoryReceiveChannel[ConnEvent]:
        """This view's connection events (one consumer)."""
        return self._events

    def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: dict[str, str] | None = None,
        reply: str = "",
    ) -> None:
        """:meth:`NatsTransport.publish`."""
        self._shared_transport().publish(subject, payload, headers=headers, reply=reply)

    async def flush(self) -> None:
        """:meth:`NatsTransport.flush` (waits for everything queued on the connection)."""
        await self._shared_transport().flush()

    async def subscribe(
        self,
        subject: str,
        *,
        buffer: int = 1024,
        handler: Callable[[Message], None] | None = None,
    ) -> Subscription:
        """:meth:`NatsTransport.subscribe`."""
        return await self._shared_transport().subscribe(subject, buffer=buffer, handler=handler)

    async def request(self, subject: str, payload: bytes) -> bytes:
        """:meth:`NatsTransport.request`."""
        return await self._shared_transport().request(subject, payload)

    def new_inbox(self) -> str:
        """:meth:`NatsTransport.new_inbox`."""
        return self._shared_transport().new_inbox()

    @property
    def jetstream(self) -> NatsJetStream:
        """:attr:`NatsTransport.jetstream` (through this view while it is open)."""
        return NatsJetStream(self._shared_transport)

    async def __aenter__(self) -> NatsTransportView:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Detach this view (its ``events`` ends); the shared connection stays open."""
        self._detached = True
        with contextlib.suppress(ValueError):
            self.transport._views.remove(self)
        self._event_send.close()
        await trio.lowlevel.checkpoint()
