"""The wire's field rules, written once.

Every number and character set of a SPEC constraint lives here and nowhere else. The msgspec
``Annotated`` aliases of :mod:`backbeat_trio._core.wire`, its regexes (the ones error messages
quote, and the joined fast rules the hot path runs), ``encode_claim``'s field checks, the id and
tempo validators of :mod:`backbeat_trio._core.beats` and the HLC parser are all derived from
these names. Pure data: no trio, no I/O.
"""

from __future__ import annotations

from typing import Final

# --- the rules -----------------------------------------------------------------------------------
#: Cluster, agent and pulse ids: a NATS subject token (SPEC "Identifiers").
ID_CHARS: Final = "A-Za-z0-9_-"
ID_MIN_LEN: Final = 1
ID_MAX_LEN: Final = 64
#: HLC stamps: three hex numbers joined by ``:`` (wall ms, counter, node).
HLC_PART_CHARS: Final = "0-9a-fA-F"
HLC_PART_MAX_LEN: Final = 16
HLC_PARTS: Final = 3
#: Window ids: the first 32 lower-case hex characters of a sha256.
WINDOW_ID_CHARS: Final = "0-9a-f"
WINDOW_ID_LEN: Final = 32

PHASE_MAX_LEN: Final = 64
TASK_ID_MAX_LEN: Final = 128
WAIT_REF_MAX_LEN: Final = 256
NOTES_MAX_LEN: Final = 4096
TEXT_MAX_LEN: Final = 4096
REQUESTED_BY_MAX_LEN: Final = 128
#: Beat indexes, beats left: Go's int64.
INT64_MAX: Final = 2**63 - 1
#: Beats a receiver keeps in hand below INT64_MAX: a frame whose index is closer to the end than
#: this is refused, so no bar, report or locally synthesised beat derived from it leaves int64.
BEAT_INDEX_HEADROOM: Final = 2**32
MAX_FRAME_BEAT_INDEX: Final = INT64_MAX - BEAT_INDEX_HEADROOM
MIN_TEMPO_BPM: Final = 1
MAX_TEMPO_BPM: Final = 1200
PROGRESS_MIN: Final = 0.0
PROGRESS_MAX: Final = 1.0

# --- derived -------------------------------------------------------------------------------------
HLC_MIN_LEN: Final = HLC_PARTS * 1 + (HLC_PARTS - 1)
HLC_MAX_LEN: Final = HLC_PARTS * HLC_PART_MAX_LEN + (HLC_PARTS - 1)


def _run(chars: str, low: int, high: int, *, possessive: bool = False) -> str:
    count = f"{{{low}}}" if low == high else f"{{{low},{high}}}"
    return f"[{chars}]{count}{'+' if possessive else ''}"


def _hlc(*, possessive: bool = False, groups: bool = False) -> str:
    part = _run(HLC_PART_CHARS, 1, HLC_PART_MAX_LEN, possessive=possessive)
    if groups:
        part = f"({part})"
    return ":".join([part] * HLC_PARTS)


ID_BODY: Final = _run(ID_CHARS, ID_MIN_LEN, ID_MAX_LEN)
HLC_BODY: Final = _hlc()
#: The HLC with each of its parts as a regex group (the parser's form).
HLC_GROUPS: Final = _hlc(groups=True)
WINDOW_ID_BODY: Final = _run(WINDOW_ID_CHARS, WINDOW_ID_LEN, WINDOW_ID_LEN)

# `\Z`, not `$`: msgspec applies patterns with re.search, where `$` also matches before a
# trailing newline, so "agent-1\n" would pass as an id (and break the subject token).
ID_PATTERN: Final = rf"^{ID_BODY}\Z"
HLC_PATTERN: Final = rf"^{HLC_BODY}\Z"
OPTIONAL_HLC_PATTERN: Final = rf"^(?:{HLC_BODY})?\Z"
WINDOW_ID_PATTERN: Final = rf"^{WINDOW_ID_BODY}\Z"

# The same rules with possessive quantifiers, for the joined one-regex-per-message checks of
# the wire's hot path (each character set excludes what follows it, so possessive matching
# loses no match and a failure does not backtrack).
ID_FAST: Final = _run(ID_CHARS, ID_MIN_LEN, ID_MAX_LEN, possessive=True)
HLC_FAST: Final = _hlc(possessive=True)
WINDOW_ID_FAST: Final = WINDOW_ID_BODY

#: How an id's rule reads in an error message.
ID_RULE_TEXT: Final = f"{ID_MIN_LEN}-{ID_MAX_LEN} characters of [{ID_CHARS}]"
