"""The trio-asyncio loop a connection runs on, and who owns it.

Ownership follows scope: a connection reuses a trio-asyncio loop only when the *user* opened it
around the run (``async with trio_asyncio.open_loop(): ...``), so everything in the process can
share one loop. A loop that the SDK opened for one of its own objects is never adopted, even
though trio-asyncio's ``current_loop`` context variable says it is there: a task started inside
a client's block inherits that variable, not the client's lifetime, and would die (``Event loop
is closed``) when the client closes first. Such a task opens a loop of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator

import trio_asyncio

from .._util.groups import unwrapped

log = logging.getLogger("backbeat_trio.transport")

# Loops opened by the SDK (weakly: a closed loop that nobody holds may go).
_SDK_LOOPS: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def sdk_loops() -> list[asyncio.AbstractEventLoop]:
    """The trio-asyncio loops the SDK opened that are still referenced somewhere."""
    return list(_SDK_LOOPS)


def _user_loop() -> asyncio.AbstractEventLoop | None:
    """The loop the user opened around this task, if any (never one the SDK opened)."""
    loop: asyncio.AbstractEventLoop | None = trio_asyncio.current_loop.get()
    if loop is None or loop in _SDK_LOOPS or loop.is_closed():
        return None
    return loop


@contextlib.asynccontextmanager
async def asyncio_loop() -> AsyncIterator[asyncio.AbstractEventLoop]:
    """Yield the user's trio-asyncio loop, else open one owned by this block alone."""
    loop = _user_loop()
    if loop is not None:
        yield loop
        return
    # the loop's nurseries wrap what is raised inside them (a refused connect, too) in groups
    async with unwrapped(), trio_asyncio.open_loop() as own:
        _SDK_LOOPS.add(own)
        try:
            yield own
        finally:
            # the owner closed what it opened on this loop; anything still running is a leak
            # (trio-asyncio cancels it with the loop): say so, it points at a bug
            left = [t for t in asyncio.all_tasks(own) if not t.done()]
            if left:
                log.warning("asyncio tasks left at loop close (cancelled): %r", left)
