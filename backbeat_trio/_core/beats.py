"""Beat arithmetic: window ids, phases, downbeats, subjects and ids.

Everything here is pure and synchronous; it is the part of SPEC.md's time model that anyone who
knows the cluster, the beat index and the bar length can compute on their own.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from typing import Final

from .._errors import ConfigError
from . import rules as R

__all__ = [
    "ID_PATTERN",
    "bar_start",
    "bar_subject",
    "beat_duration",
    "beat_subject",
    "is_downbeat",
    "phase_for",
    "status_stream_name",
    "status_subject",
    "tempo_subject",
    "validate_id",
    "window_id",
]

ID_PATTERN: Final = R.ID_PATTERN
_ID_RE: Final = re.compile(ID_PATTERN)

MIN_TEMPO_BPM: Final = R.MIN_TEMPO_BPM
MAX_TEMPO_BPM: Final = R.MAX_TEMPO_BPM


def validate_id(field: str, value: object) -> str:
    """Check a cluster or agent id against SPEC's subject-token rule.

    Raises:
        ConfigError: naming ``field`` when ``value`` breaks the id rule (``rules.ID_PATTERN``).
    """
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ConfigError(
            field,
            f"must be {R.ID_RULE_TEXT} (it becomes a NATS subject token), got {value!r}",
        )
    return value


def validate_beats_per_bar(value: object, field: str = "beats_per_bar") -> int:
    """Check a bar length (a positive int)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(field, f"must be an int >= 1, got {value!r}")
    return value


def validate_tempo(value: object, field: str = "tempo_bpm") -> int:
    """Check a tempo against SPEC's [1, 1200] BPM range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            field, f"must be an int in [{MIN_TEMPO_BPM}, {MAX_TEMPO_BPM}], got {value!r}"
        )
    if not MIN_TEMPO_BPM <= value <= MAX_TEMPO_BPM:
        raise ConfigError(field, f"must be in [{MIN_TEMPO_BPM}, {MAX_TEMPO_BPM}] BPM, got {value}")
    return value


def beat_duration(tempo_bpm: float) -> float:
    """Seconds per beat at ``tempo_bpm``."""
    return 60.0 / tempo_bpm


def bar_start(beat_index: int, beats_per_bar: int = 4) -> int:
    """Index of the first beat (the downbeat) of the bar holding ``beat_index``."""
    return beat_index - beat_index % beats_per_bar


def is_downbeat(beat_index: int, beats_per_bar: int = 4) -> bool:
    """True when ``beat_index`` opens a bar."""
    return beat_index % beats_per_bar == 0


# A process asks for the ids of the few bars around now, again and again (every beat of a bar,
# every claim of a window): a small cache holds them. A large one only fills, bar by bar, for a
# long while after start-up, and reads as a slow leak in a soak.
@lru_cache(maxsize=256)
def _window_id(cluster_id: str, start: int) -> str:
    return hashlib.sha256(f"{cluster_id}:{start}".encode()).hexdigest()[:32]


def window_id(cluster_id: str, beat_index: int, beats_per_bar: int = 4) -> str:
    """The window (bar) id every beat of a bar carries (SPEC: first 32 hex of a sha256).

    Args:
        cluster_id: the cluster the beat belongs to.
        beat_index: any beat of the bar.
        beats_per_bar: the bar length.

    Returns:
        32 lower-case hex characters, the same for every beat of the bar.
    """
    return _window_id(cluster_id, bar_start(beat_index, beats_per_bar))


def phase_for(beat_index: int, beats_per_bar: int = 4) -> str:
    """The phase of a beat: first ``plan``, last ``review``, the rest ``execute``.

    A one-beat bar is ``execute``; a two-beat bar is ``plan, review``.
    """
    if beats_per_bar == 1:
        return "execute"
    pos = beat_index % beats_per_bar
    if pos == 0:
        return "plan"
    if pos == beats_per_bar - 1:
        return "review"
    return "execute"


def beat_subject(cluster_id: str) -> str:
    """``backbeat.beat.<cluster_id>``"""
    return f"backbeat.beat.{cluster_id}"


def status_subject(cluster_id: str) -> str:
    """``backbeat.status.<cluster_id>``"""
    return f"backbeat.status.{cluster_id}"


def bar_subject(cluster_id: str) -> str:
    """``backbeat.bar.<cluster_id>``"""
    return f"backbeat.bar.{cluster_id}"


def tempo_subject(cluster_id: str) -> str:
    """``backbeat.tempo.<cluster_id>``"""
    return f"backbeat.tempo.{cluster_id}"


def status_stream_name(cluster_id: str) -> str:
    """The JetStream stream that captures a cluster's claims: ``BACKBEAT_STATUS_<cluster_id>``."""
    return f"BACKBEAT_STATUS_{cluster_id}"
