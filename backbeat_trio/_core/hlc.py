"""Hybrid logical clock (Kulkarni et al. 2014), sans-IO.

String form ``{l:012x}:{c:04x}:{node:04x}``: wall milliseconds, logical counter, node id. Compare
parsed tuples, never strings: other implementations write other widths.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from typing import Final, NamedTuple

from .._errors import WireError
from . import rules as R

__all__ = ["HLC", "HLCStamp", "node_id_for"]

_MAX_COUNTER: Final = 0xFFFF
_HLC_RE: Final = re.compile(R.HLC_GROUPS)


def node_id_for(name: str) -> int:
    """The 16-bit node id of an agent or pulse: the first 2 bytes of ``sha256(name)``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:2], "big")


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class HLCStamp(NamedTuple):
    """One HLC timestamp; tuple order is the clock order."""

    l: int  # noqa: E741 - the paper's name
    c: int
    node: int

    def __str__(self) -> str:
        return f"{self.l:012x}:{self.c:04x}:{self.node:04x}"

    @classmethod
    def parse(cls, text: str) -> HLCStamp:
        """Parse any ``hex:hex:hex`` form (any width).

        Raises:
            WireError: ``text`` is not three colon-separated hex fields.
        """
        m = _HLC_RE.fullmatch(text) if isinstance(text, str) else None
        if m is None:
            raise WireError(f"invalid HLC {text!r}: expected 'hex:hex:hex' (wall ms:counter:node)")
        return cls(int(m[1], 16), int(m[2], 16), int(m[3], 16))


class HLC:
    """A hybrid logical clock owned by one node.

    Args:
        node: the agent or pulse id (hashed to a 16-bit node id) or the node id itself.
        wall_ms: the physical clock in milliseconds (injectable for tests).
        max_forward_ms: a remote stamp further than this ahead of our wall clock is not adopted
            (Kulkarni's bound on clock error): the receive is handled as a local event and counted
            in :attr:`rejected_remote`, so one peer with a broken clock cannot drag us into the
            future.
    """

    __slots__ = (
        "_c",
        "_head",
        "_head_l",
        "_l",
        "_wall_ms",
        "max_forward_ms",
        "node",
        "rejected_remote",
    )

    def __init__(
        self,
        node: str | int,
        *,
        wall_ms: Callable[[], int] = _wall_ms,
        max_forward_ms: int = 60_000,
    ) -> None:
        self.node = node if isinstance(node, int) else node_id_for(node)
        self._wall_ms = wall_ms
        self.max_forward_ms = max_forward_ms
        self._l = 0
        self._c = 0
        self.rejected_remote = 0
        self._head_l = -1  # the wall part ``_head`` was formatted for (see now_text)
        self._head = ""

    def __repr__(self) -> str:
        return f"<HLC node={self.node:04x} last={self.last}>"

    @property
    def last(self) -> HLCStamp:
        """The latest stamp issued or merged."""
        return HLCStamp(self._l, self._c, self.node)

    def _set(self, l_new: int, c_new: int) -> None:
        if c_new > _MAX_COUNTER:
            l_new, c_new = l_new + 1, 0
        self._l, self._c = l_new, c_new

    def _bump(self, l_new: int, c_new: int) -> HLCStamp:
        self._set(l_new, c_new)
        return HLCStamp(self._l, self._c, self.node)

    def now(self) -> HLCStamp:
        """A send or local event: ``l = max(l, pt)``; ``c`` bumps when ``l`` did not move."""
        pt = self._wall_ms()
        if pt > self._l:
            return self._bump(pt, 0)
        return self._bump(self._l, self._c + 1)

    def now_text(self) -> str:
        """``str(self.now())``, without building the stamp: an agent stamps every claim.

        The wall part is formatted once per millisecond it changes, not once per call.
        """
        pt = self._wall_ms()
        if pt > self._l:
            self._l, self._c = pt, 0
        else:
            self._set(self._l, self._c + 1)
        if self._l != self._head_l:
            self._head_l = self._l
            self._head = f"{self._l:012x}:"
        return f"{self._head}{self._c:04x}:{self.node:04x}"

    def is_at(self, stamp: HLCStamp | None) -> bool:
        """Whether the clock still reads ``stamp`` (issued or merged nothing since): cheaper
        than comparing with :attr:`last`, which builds a stamp."""
        return (
            stamp is not None
            and stamp.c == self._c
            and stamp.l == self._l
            and stamp.node == self.node
        )

    def update(self, remote: HLCStamp | str) -> HLCStamp:
        """A receive event: merge a remote ``(l, c)``; returns the clock's new stamp.

        Raises:
            WireError: ``remote`` is a string that does not parse.
        """
        if isinstance(remote, str):
            remote = HLCStamp.parse(remote)
        self.merge(remote)
        return HLCStamp(self._l, self._c, self.node)

    def merge(self, remote: HLCStamp) -> None:
        """:meth:`update` with a parsed stamp, building no result (every client of a process
        merges every beat frame's stamp)."""
        pt = self._wall_ms()
        if remote.l > pt + self.max_forward_ms:
            self.rejected_remote += 1
            self.now()
            return
        l_old = self._l
        l_new = max(l_old, remote.l, pt)
        if l_new == l_old == remote.l:
            c_new = max(self._c, remote.c) + 1
        elif l_new == l_old:
            c_new = self._c + 1
        elif l_new == remote.l:
            c_new = remote.c + 1
        else:
            c_new = 0
        self._set(l_new, c_new)
