"""The HA reverb's half of the reverb: who publishes, and catching up after a take-over.

All HA reverbs of a cluster aggregate; only the holder of the ``reverb-lease`` key (the same
election as the HA pulse's, :class:`~backbeat_trio._services.lease.LeaseKeeper`) publishes. A
reverb that takes over first publishes the windows it aggregated as a standby that nobody
published, so a failover delays a report but does not lose it.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from .._core.beats import bar_subject
from .._core.wire import BarReport, decode
from .._errors import BackbeatError, WireError
from .._transport.base import Transport
from .history import last_reported_window, resumed_duplicate
from .lease import LeaseKeeper

if TYPE_CHECKING:
    from .reverb import ReverbConfig, ReverbStatus

__all__ = ["HAReports", "hold_lease"]

log = logging.getLogger("backbeat_trio.reverb")

#: Windows an HA reverb remembers having seen published on the bar subject.
_PUBLISHED_KEPT = 256


async def hold_lease(keeper: LeaseKeeper, release_on_exit: bool) -> None:
    """Follow the reverb lease, lead while it is ours, release it on the way out if asked."""
    await keeper.open_watch()
    try:
        while True:
            await keeper.follow(lambda: None)
            await keeper.renew_while_leading()
    finally:
        if release_on_exit:
            with trio.move_on_after(keeper.t.op_timeout + 0.5, shield=True):
                await keeper.release(None)
        await keeper.close_watch()


class HAReports:
    """An HA reverb's reports: published while it holds the lease, else kept (the last 16).

    Every instance subscribes to the bar subject and remembers which windows were published (by
    anyone), so a reverb that takes over publishes exactly the kept windows nobody reported --
    the ones the dead publisher never sent -- and no window twice. The bar stream's history is a
    second source when it exists. Nothing is published while disconnected (nats-py would buffer
    it and send it after the lease may have passed to another reverb).
    """

    def __init__(
        self,
        cfg: ReverbConfig,
        transport: Transport,
        keeper: LeaseKeeper,
        status: ReverbStatus,
        publish: Callable[[BarReport], None],
    ) -> None:
        self.cfg = cfg
        self.transport = transport
        self.keeper = keeper
        self.status = status
        self.publish = publish
        self.published: set[str] = set()
        self._published_order: deque[str] = deque()
        # bound on reading the bar history while taking over: well inside the lease
        self.history_bound = min(1.0, cfg.lease_ttl / 4)

    def _may_publish(self) -> bool:
        return self.transport.connected and self.keeper.election.may_publish(trio.current_time())

    def _remember(self, window_id: str) -> None:
        if window_id in self.published:
            return
        self.published.add(window_id)
        self._published_order.append(window_id)
        if len(self._published_order) > _PUBLISHED_KEPT:
            self.published.discard(self._published_order.popleft())

    async def watch_published(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Remember the window of every report seen on the bar subject."""
        sub = await self.transport.subscribe(bar_subject(self.cfg.cluster_id), buffer=1024)
        task_status.started()
        async for msg in sub.messages:
            with contextlib.suppress(WireError):
                self._remember(decode(msg.data, BarReport).window_id)

    async def report(self, report: BarReport) -> None:
        """A window closed: publish it (after any kept ones) or keep it."""
        status = self.status
        status.standby.append(report)
        if not self._may_publish():
            status.reports_standby += 1
            return
        last: int | None = None
        if len(status.standby) > 1:  # windows kept while on standby: what does the stream hold?
            try:
                with trio.fail_after(self.history_bound):
                    last = await last_reported_window(self.transport, self.cfg.cluster_id)
            except (BackbeatError, trio.TooSlowError) as exc:
                log.warning("taking over: bar history unreadable (%s); using what was seen", exc)
        while status.standby:
            if not self._may_publish():  # the lease or the connection went while reading
                return
            kept = status.standby.popleft()
            if kept.window_id in self.published or resumed_duplicate(
                kept, last, self.cfg.beats_per_bar
            ):
                continue
            self.publish(kept)
            self._remember(kept.window_id)
            if kept is not report:
                status.reports_caught_up += 1
                log.info("took over: published window %s, missed on standby", kept.window_id)
