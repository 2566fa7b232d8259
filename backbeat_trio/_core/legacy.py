"""The deprecated 1-based ``{bar, beat}`` address (BACKBEAT-REQ-043), both ways.

Each conversion warns once per process (a ``DeprecationWarning``).
"""

from __future__ import annotations

import warnings

from .beats import validate_beats_per_bar
from .wire import LegacyBeatInfo

__all__ = ["from_legacy", "to_legacy"]

_legacy_warned = False


def _warn_legacy() -> None:
    global _legacy_warned
    if not _legacy_warned:
        _legacy_warned = True
        warnings.warn(
            "legacy {bar, beat} addressing (BACKBEAT-REQ-043) is deprecated; use beat_index",
            DeprecationWarning,
            stacklevel=3,
        )


def to_legacy(beat_index: int, beats_per_bar: int = 4) -> LegacyBeatInfo:
    """Convert a beat index to the 1-based legacy ``{bar, beat}`` form (warns once per process)."""
    if beat_index < 0:
        raise ValueError(f"beat_index must be >= 0, got {beat_index}")
    validate_beats_per_bar(beats_per_bar)
    _warn_legacy()
    return LegacyBeatInfo(bar=beat_index // beats_per_bar + 1, beat=beat_index % beats_per_bar + 1)


def from_legacy(info: LegacyBeatInfo, beats_per_bar: int = 4) -> int:
    """Convert a legacy 1-based ``{bar, beat}`` to a beat index (warns once per process)."""
    validate_beats_per_bar(beats_per_bar)
    if info.bar < 1 or not 1 <= info.beat <= beats_per_bar:
        raise ValueError(f"{info!r} is outside a {beats_per_bar}-beat bar")
    _warn_legacy()
    return (info.bar - 1) * beats_per_bar + (info.beat - 1)
