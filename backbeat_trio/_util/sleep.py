"""Waking on time: trio's sleeps wake up late by up to a timer tick (epoll timeouts are whole
milliseconds, rounded up). Beats are scheduled to well under that, so the last stretch before a
beat is spent yielding in a loop instead of sleeping.
"""

from __future__ import annotations

import sys
from typing import Final

import trio

__all__ = ["SPIN_S", "precise_clock", "sleep_until_precise"]

#: How long before a deadline we stop sleeping and start yielding.
SPIN_S: Final = 0.0015


def precise_clock() -> bool:
    """False under trio's MockClock, where virtual time only moves when every task sleeps (a
    yielding loop would spin forever) and wake-ups are exact anyway.

    ``trio.testing`` is looked up, not imported: importing it imports pytest wherever pytest is
    installed, and a MockClock can only exist once something else has imported it."""
    testing = sys.modules.get("trio.testing")
    return testing is None or not isinstance(trio.lowlevel.current_clock(), testing.MockClock)


async def sleep_until_precise(deadline: float) -> None:
    """``trio.sleep_until(deadline)``, but waking within microseconds of it on a real clock.

    Costs a little CPU in the last :data:`SPIN_S` before the deadline (about 1.5 % of a core
    at 1200 BPM); other tasks keep running, since each loop round is a checkpoint.
    """
    if not precise_clock():
        await trio.sleep_until(deadline)
        return
    await trio.sleep_until(deadline - SPIN_S)
    while trio.current_time() < deadline:
        await trio.lowlevel.checkpoint()
