"""Beat budgets: trio cancel scopes whose deadlines are counted in beats.

A budget remembers the beat position it ends at; every beat and tempo change re-projects that
position onto trio's clock (:meth:`BeatBudgets.reproject`), so the scope ends when the beat
position gets there whatever the tempo does meanwhile.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from types import TracebackType

import trio

from .._core.intake import BeatTracker
from .._core.metrics import ClientMetrics

__all__ = ["BeatBudget", "BeatBudgets"]


@dataclass(slots=True)
class _Budget:
    beats: float  # the budget's length
    target: float | None  # fractional beat position at which it ends (None: before any beat)


class BeatBudget:
    """A beat budget: a context manager around a trio cancel scope whose deadline is counted in
    beats (what :meth:`~backbeat_trio.Client.beat_budget` returns).

    ``with bb.beat_budget(3) as scope:`` binds ``scope`` to the :class:`trio.CancelScope` itself;
    the budget also answers the cancel scope's questions directly (``cancelled_caught``,
    ``cancel_called``, ``deadline``, ``shield``, ``cancel()``), so code written for a bare cancel
    scope keeps working. Leaving the block counts it in the client's ``budgets_completed`` or
    ``budgets_timed_out``, as :meth:`~backbeat_trio.Client.fail_after_beats` is counted.

    Attributes:
        scope: the trio cancel scope (its deadline moves with every beat and tempo change).
    """

    __slots__ = ("_budgets", "scope")

    def __init__(self, budgets: BeatBudgets, scope: trio.CancelScope) -> None:
        self._budgets = budgets
        self.scope = scope

    def __repr__(self) -> str:
        return f"<BeatBudget {self.scope!r}>"

    def __enter__(self) -> trio.CancelScope:
        return self.scope.__enter__()

    def __exit__(
        self,
        etype: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            return self.scope.__exit__(etype, exc, tb)
        finally:
            self._budgets.count(self.scope)

    @property
    def cancelled_caught(self) -> bool:
        """The scope's ``cancelled_caught``: True when the budget ran out (or was cancelled)."""
        return self.scope.cancelled_caught

    @property
    def cancel_called(self) -> bool:
        """The scope's ``cancel_called``."""
        return self.scope.cancel_called

    @property
    def deadline(self) -> float:
        """The scope's deadline now (trio time; it moves with the beats)."""
        return self.scope.deadline

    @property
    def shield(self) -> bool:
        """The scope's ``shield``."""
        return self.scope.shield

    @shield.setter
    def shield(self, shield: bool) -> None:
        self.scope.shield = shield

    def cancel(self, reason: str | None = None) -> None:
        """Cancel the scope now (trio's ``CancelScope.cancel``)."""
        self.scope.cancel(reason)


class BeatBudgets:
    """The open beat budgets of one client.

    Args:
        tracker: the beat schedule the deadlines follow.
        metrics: where budgets are counted.
    """

    __slots__ = ("_metrics", "_scopes", "_tracker")

    def __init__(self, tracker: BeatTracker, metrics: ClientMetrics) -> None:
        self._tracker = tracker
        self._metrics = metrics
        # made by the first budget: most clients of a big process never open one, and every
        # beat asks whether there are any to move
        self._scopes: weakref.WeakKeyDictionary[trio.CancelScope, _Budget] | None = None

    def __repr__(self) -> str:
        return f"<BeatBudgets open={len(self)}>"

    def __len__(self) -> int:
        return 0 if self._scopes is None else len(self._scopes)

    def open(self, beats: float, *, cancelled: bool) -> trio.CancelScope:
        """A cancel scope that ends ``beats`` beats from now (cancelled at once if ``cancelled``).

        Raises:
            ValueError: ``beats`` is not a positive finite number.
        """
        if (
            isinstance(beats, bool)
            or not isinstance(beats, int | float)
            or not (0 < beats < math.inf)
        ):
            raise ValueError(f"a beat budget needs a positive number of beats, got {beats!r}")
        tracker = self._tracker
        pos = tracker.position(trio.current_time())
        target = None if pos is None else pos + beats
        deadline = math.inf if target is None else tracker.deadline_for(target)
        scope = trio.CancelScope(deadline=deadline)
        if self._scopes is None:
            self._scopes = weakref.WeakKeyDictionary()
        self._scopes[scope] = _Budget(beats, target)
        self._metrics.budgets_created += 1
        if cancelled:
            scope.cancel()
        return scope

    def count(self, scope: trio.CancelScope) -> None:
        """``scope`` is done: count it as completed or timed out."""
        if self._scopes is not None:
            self._scopes.pop(scope, None)
        if scope.cancelled_caught:
            self._metrics.budgets_timed_out += 1
        else:
            self._metrics.budgets_completed += 1

    def reproject(self) -> None:
        """The beat schedule moved: move every deadline to where its beat position now falls."""
        scopes = self._scopes
        if scopes is None or not scopes:
            return
        tracker = self._tracker
        for scope, budget in list(scopes.items()):
            if budget.target is None:  # made before the first beat: it starts counting now
                assert tracker.last_index is not None
                budget.target = tracker.last_index + budget.beats
            scope.deadline = tracker.deadline_for(budget.target)

    def cancel_all(self) -> None:
        """The client closes: end every open budget."""
        for scope in list(self._scopes or ()):
            scope.cancel()
