"""What leaves an SDK block when a nursery inside it raised an exception group.

A group holding one real error is not leaked to the user; the user's own exception wins over
internal cancellation and failures (as trio-websocket's ``open_websocket`` does). Used at the
edges the user sees: ``open_client`` and ``open_nats_transport`` (so ``run_pulse`` and
``run_reverb`` surface a refused connect as a plain ``NotConnected``, not wrapped in the groups
of the trio-asyncio loop's nurseries).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import trio

__all__ = ["exception_to_raise", "reraise", "unwrapped"]

log = logging.getLogger("backbeat_trio")


def exception_to_raise(
    group: BaseExceptionGroup[Any], user_exc: BaseException | None
) -> BaseException | None:
    """What leaves the block when its nursery raised ``group`` (None: the whole group).

    The user's own exception wins over internal cancellation and over internal failures (those
    are logged); otherwise a single internal failure is raised on its own, not wrapped.
    """
    internal = _leaves(group, skip=user_exc)
    real = [e for e in internal if not isinstance(e, trio.Cancelled)]
    if user_exc is not None and not _only_cancelled(user_exc):
        for exc in real:
            log.error("a task failed while the block raised", exc_info=exc)
        return user_exc
    if len(real) == 1:
        return real[0]
    if not real:
        return user_exc if user_exc is not None else (internal[0] if internal else None)
    return None


def reraise(exc: BaseException) -> NoReturn:
    """Raise ``exc`` (from inside an ``except`` block) keeping its own ``__context__``."""
    # Raising inside `except` would set exc.__context__ to the group that wrapped it; keep the
    # user's own context (trio does the same when it unwraps).
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc


def _only_cancelled(exc: BaseException) -> bool:
    # A nursery inside the block, cancelled because a client task failed, raises a group of
    # Cancelled: that is our cancellation echoing back, not the user's own exception.
    if isinstance(exc, BaseExceptionGroup):
        return all(isinstance(e, trio.Cancelled) for e in _leaves(exc))
    return isinstance(exc, trio.Cancelled)


def _leaves(
    group: BaseExceptionGroup[Any], skip: BaseException | None = None
) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if exc is skip:
            continue
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc, skip))
        else:
            out.append(exc)
    return out


@contextlib.asynccontextmanager
async def unwrapped() -> AsyncIterator[None]:
    """Let a group holding one real error (beside cancellations) out as that error alone."""
    try:
        yield
    except BaseExceptionGroup as group:
        chosen = exception_to_raise(group, None)
        if chosen is None:
            raise
        reraise(chosen)
