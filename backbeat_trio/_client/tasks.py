"""A client's tasks: run in ``open_client``'s nursery, each behind a shield of its own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from .._errors import NotConnected

__all__ = ["ShieldedTasks"]


class ShieldedTasks:
    """Starts a client's tasks in its nursery, each in a shielded cancel scope of its own.

    Cancelling the block that holds the client must not end its tasks (the ack-listener, the
    confirmer, beat callbacks) before the shielded shutdown has had its chance to deliver queued
    claims: ``open_client`` calls :meth:`stop` after that shutdown. One nursery, no task to hold
    the others: a thousand clients of one process cost a thousand tasks fewer.

    Attributes:
        nursery: ``open_client``'s nursery while the client runs, else None.
    """

    __slots__ = ("_scopes", "nursery")

    def __init__(self) -> None:
        self.nursery: trio.Nursery | None = None
        self._scopes: tuple[trio.CancelScope, ...] = ()  # (few; none in most clients)

    def __repr__(self) -> str:
        return f"<ShieldedTasks running={len(self._scopes)} open={self.nursery is not None}>"

    def __len__(self) -> int:
        return len(self._scopes)

    async def start(self, fn: Callable[..., Awaitable[None]]) -> None:
        """``nursery.start(fn)`` (``fn`` takes ``task_status``), shielded once it has started:
        a cancellation while it starts still reaches it (trio would leave a shielded task that
        never started in ``start``'s own nursery, and ``start`` waiting on it for ever).

        Raises:
            NotConnected: the client is not running.
        """
        nursery = self._open()
        await nursery.start(self._started, fn, trio.CancelScope())

    async def _started(
        self,
        fn: Callable[..., Awaitable[None]],
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        self._scopes = (*self._scopes, scope)
        # handed on without a reference left here: ``task_status`` holds trio's start-up
        # nursery, which this frame would otherwise keep for the task's whole life
        status = _ShieldOnStart(task_status, scope)
        del task_status
        try:
            with scope:
                await fn(task_status=status)
        finally:
            self._scopes = tuple(s for s in self._scopes if s is not scope)

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> trio.CancelScope:
        """``nursery.start_soon(fn, *args)``, shielded; returns the task's scope.

        Raises:
            NotConnected: the client is not running.
        """
        nursery = self._open()
        scope = trio.CancelScope(shield=True)
        self._scopes = (*self._scopes, scope)

        async def shielded() -> None:
            try:
                with scope:
                    await fn(*args)
            finally:
                self._scopes = tuple(s for s in self._scopes if s is not scope)

        nursery.start_soon(shielded, name=getattr(fn, "__qualname__", repr(fn)))
        return scope

    def stop(self) -> None:
        """End every task (the client closed); no new one starts."""
        self.nursery = None
        for scope in self._scopes:
            scope.cancel()

    def _open(self) -> trio.Nursery:
        nursery = self.nursery
        if nursery is None:
            raise NotConnected("the client is not running")
        return nursery


class _ShieldOnStart:
    """A ``task_status`` that shields its task's scope as the task says it has started."""

    __slots__ = ("_scope", "_status")

    def __init__(self, status: trio.TaskStatus[None], scope: trio.CancelScope) -> None:
        self._status: trio.TaskStatus[None] | None = status
        self._scope = scope

    def started(self, value: None = None) -> None:
        status, self._status = self._status, None  # (trio's start-up nursery: let it go)
        if status is None:
            raise RuntimeError("started() called twice")
        self._scope.shield = True
        status.started(value)
