"""A handle on a shared :class:`~backbeat_trio._bridge.nats.NatsTransport` for one more user."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import trio

from .._errors import NotConnected
from .._transport.base import EventFeed, Transport
from .._transport.shared import Prepare, SharedSubscription
from .jetstream import NatsJetStream

if TYPE_CHECKING:
    from .nats import NatsTransport


P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def _forwarded(
    method: Callable[Concatenate[Transport, P], R],
) -> Callable[Concatenate[NatsTransportView, P], R]:
    """A view's ``method``: the shared transport's, while the view is open."""
    name = method.__name__

    if inspect.iscoroutinefunction(method):

        async def forward_async(view: NatsTransportView, /, *args: Any, **kwargs: Any) -> Any:
            return await getattr(view._shared_transport(), name)(*args, **kwargs)

        forward: Callable[..., Any] = forward_async
    else:

        def forward(view: NatsTransportView, /, *args: Any, **kwargs: Any) -> Any:
            return getattr(view._shared_transport(), name)(*args, **kwargs)

    forward.__name__ = forward.__qualname__ = name
    forward.__doc__ = f"The shared transport's :meth:`~NatsTransport.{name}`."
    return forward


class NatsTransportView(EventFeed):
    """One user's handle on a shared :class:`NatsTransport` (made by :meth:`NatsTransport.view`).

    It is a :class:`Transport`: its own ``events`` channel (every connection event), everything
    else done by the shared transport. :meth:`aclose` detaches it; the connection stays open.

    Attributes:
        transport: the shared transport.
        events_dropped: events this view's full ``events`` channel could not take.
    """

    def __init__(self, transport: NatsTransport, event_buffer: int = 1024) -> None:
        super().__init__(event_buffer)
        self.transport = transport
        self._detached = False

    def __repr__(self) -> str:
        state = "detached " if self._detached else ""
        return f"<NatsTransportView {state}of {self.transport!r}>"

    def _shared_transport(self) -> NatsTransport:
        if self._detached:
            raise NotConnected("this view of the NATS connection was closed")
        return self.transport

    @property
    def connected(self) -> bool:
        """True while the shared connection is up."""
        return not self._detached and self.transport.connected

    publish = _forwarded(Transport.publish)
    flush = _forwarded(Transport.flush)
    subscribe = _forwarded(Transport.subscribe)
    request = _forwarded(Transport.request)
    new_inbox = _forwarded(Transport.new_inbox)

    async def subscribe_shared(
        self,
        subject: str,
        *,
        key: Hashable,
        prepare: Callable[[], Prepare[T]],
        handler: Callable[[T], None] | None = None,
        buffer: int = 1024,
    ) -> SharedSubscription[T]:
        """The shared transport's :meth:`~NatsTransport.subscribe_shared`."""
        return await self._shared_transport().subscribe_shared(
            subject, key=key, prepare=prepare, handler=handler, buffer=buffer
        )

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
        self._end_events()
        await trio.lowlevel.checkpoint()
