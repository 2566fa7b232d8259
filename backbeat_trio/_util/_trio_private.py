"""trio's private wait protocol, in this one module.

A task waits in trio by yielding a message to the run loop from inside
:func:`trio.lowlevel.wait_task_rescheduled`, which allocates a coroutine, a generator and the
message on every wait. A consumer of every beat of a thousand clients waits once per beat each:
those objects live for a whole beat, so the garbage collector promotes them to its oldest
generation in thousands, and a process of many clients then runs a full collection of everything
it holds every second or two (``docs/scale.md`` §6). :func:`wait_message` takes the message the
public function yields, once, so that a channel can yield it again from an awaitable it reuses
(:class:`~backbeat_trio._util.channel.DropOldestChannel`).

That a task's coroutine may yield this message itself is trio's run-loop protocol, not its API.
It is taken only on the trio versions in :data:`_TRIO_VERSIONS` (read and tested against), only
when the message has the expected shape, and unless ``BACKBEAT_TRIO_WAIT_FAST=0``; otherwise
every wait goes through :func:`trio.lowlevel.wait_task_rescheduled` (``.ci/run`` runs the
channel's and the clients' tests that way too).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import trio

__all__ = ["FAST_ENV", "fast_wait_enabled", "wait_message"]

log = logging.getLogger("backbeat_trio.trio_private")

#: trio versions whose run loop the reused wait message was read and tested against
_TRIO_VERSIONS = ("0.35.",)

#: Set to ``0`` to wait through trio's public function whatever the version.
FAST_ENV = "BACKBEAT_TRIO_WAIT_FAST"


@functools.cache
def _version_supported() -> bool:
    return str(getattr(trio, "__version__", "")).startswith(_TRIO_VERSIONS)


def fast_wait_enabled() -> bool:
    """True when channels may reuse their wait message (a tested trio, and the environment does
    not say ``BACKBEAT_TRIO_WAIT_FAST=0``)."""
    if os.environ.get(FAST_ENV, "").strip() == "0":
        return False
    return _version_supported()


def wait_message(abort: Callable[[object], trio.lowlevel.Abort]) -> object | None:
    """The message :func:`trio.lowlevel.wait_task_rescheduled` yields to the run loop to wait
    with ``abort``, or None when the fast wait is off or the message is not what this module
    knows (the caller then waits through the public function).

    A coroutine that yields the returned object waits exactly as one inside
    ``trio.lowlevel.wait_task_rescheduled(abort)`` does; it is then resumed with the
    ``outcome`` the task was rescheduled with, which it must unwrap.
    """
    if not fast_wait_enabled():
        return None
    # stepped by hand, never awaited: its first step is the message, then it is closed
    coro = trio.lowlevel.wait_task_rescheduled(abort)  # noqa: ASYNC105
    try:
        msg: object = coro.send(None)
    except Exception as exc:  # it returned or raised at once: not the protocol known here
        log.debug("trio's wait does not yield its message first (%r): public waits only", exc)
        return None
    finally:
        coro.close()
    if type(msg).__name__ != "WaitTaskRescheduled" or getattr(msg, "abort_func", None) != abort:
        log.debug("trio's wait message is %r, not the one known here: public waits only", msg)
        return None
    return msg
