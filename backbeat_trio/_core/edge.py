"""The one decoding edge: bytes from outside (NATS, disk, HTTP) become values here or a refusal.

Every decoder of untrusted input in the package goes through this module:
:func:`~backbeat_trio._core.wire.decode` (the wire's Structs and any other msgspec type),
:func:`decode_json` (free-form JSON: PubAcks, admin request bodies, replies) and
:func:`decode_toml` (keyrings and other files). Whatever goes wrong while decoding — invalid
JSON or UTF-8, a broken contract, a nesting deep enough to exhaust the interpreter's recursion
limit (``RecursionError``), a payload too large to hold (``MemoryError``), or anything else the
decoder raises — comes out as one :class:`~backbeat_trio._errors.WireError` whose ``reason`` says
which, so each caller counts and skips it; nothing else escapes.

Nesting deeper than :data:`MAX_NESTING` is refused before a decoder sees it
(:func:`check_nesting`): no message of the contract nests more than a few levels, and msgspec
and tomllib both recurse once per level.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from itertools import accumulate
from typing import Any, Final, TypeVar

import msgspec

from .._errors import WireError

__all__ = [
    "MALFORMED",
    "MAX_NESTING",
    "SCAN_ABOVE",
    "TOO_DEEP",
    "TOO_LARGE",
    "check_nesting",
    "decode_json",
    "decode_toml",
    "guarded",
    "refusal",
]

MAX_NESTING: Final = 256
"""Arrays, objects or tables nested deeper than this are refused unread. The contract's messages
nest three levels; a decoder's recursion is safe far beyond this bound."""

#: ``WireError.reason`` values, the keys refusals are counted under.
MALFORMED: Final = "malformed"
TOO_DEEP: Final = "too_deep"
TOO_LARGE: Final = "too_large"

SCAN_ABOVE: Final = 2 * MAX_NESTING
"""A payload of n bytes (or characters) nests at most n // 2 deep, so one no longer than this
needs no scan: the hot path (a beat frame, a short claim) pays one length comparison."""

# A JSON string, from its opening quote to its closing one or the end of the input. The
# possessive quantifiers make the scan linear on any input, terminated or not.
_JSON_STRING: Final = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\Z)', re.DOTALL)
# '[' and '{' step in (+1), ']' and '}' step out (-1 as a signed byte): a running sum is the depth.
_STEPS: Final = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS: Final = bytes(set(range(256)) - set(b"[]{}"))

# TOML: strings (basic, literal, multi-line) and comments hold brackets that do not nest.
_TOML_SKIP: Final = re.compile(
    r'"""(?:[^"\\]++|\\.|"(?!""))*+(?:"""|\Z)'
    r"|'''(?:[^']++|'(?!''))*+(?:'''|\Z)"
    r'|"(?:[^"\\\n]++|\\.)*+(?:"|$|\Z)'
    r"|'[^'\n]*+(?:'|$|\Z)"
    r"|#[^\n]*+",
    re.DOTALL | re.MULTILINE,
)

T = TypeVar("T")


def _depth(brackets: bytes) -> int:
    """The deepest nesting of a string of ``[]{}`` (unbalanced input gives its deepest point)."""
    if not brackets:
        return 0
    steps = memoryview(brackets.translate(_STEPS)).cast("b")
    return max(accumulate(steps))


def check_nesting(data: bytes | bytearray | memoryview | str, what: str = "message") -> None:
    """Refuse ``data`` when its arrays and objects nest deeper than :data:`MAX_NESTING`.

    Brackets inside JSON strings do not count. Linear in the size of ``data``, and a comparison
    only for payloads too short to nest that deep.

    Raises:
        WireError: ``reason`` ``"too_deep"``.
    """
    if len(data) <= SCAN_ABOVE:
        return
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") <= MAX_NESTING:
        return
    depth = _depth(_JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS))
    if depth > MAX_NESTING:
        raise WireError(f"{what} nests deeper than {MAX_NESTING} levels", reason=TOO_DEEP)


def refusal(what: str, exc: BaseException) -> WireError:
    """The :class:`WireError` that stands for ``exc``, raised while decoding ``what``."""
    if isinstance(exc, WireError):
        return exc
    if isinstance(exc, RecursionError):
        return WireError(f"invalid {what}: nested too deeply to decode", reason=TOO_DEEP)
    if isinstance(exc, MemoryError):
        return WireError(f"invalid {what}: too large to decode", reason=TOO_LARGE)
    return WireError(f"invalid {what}: {exc}", reason=MALFORMED)


def guarded(decoder: Callable[[Any], T], data: Any, what: str) -> T:
    """``decoder(data)`` behind the edge: nesting checked first, every failure a WireError.

    Raises:
        WireError: ``data`` was refused; ``reason`` says why.
    """
    check_nesting(data, what)
    try:
        return decoder(data)
    except Exception as exc:  # the edge: every decoder failure is a refusal, counted by reason
        raise refusal(what, exc) from exc


_json_decode: Final = msgspec.json.Decoder().decode


def decode_json(data: bytes | bytearray | memoryview | str, what: str = "JSON") -> Any:
    """Decode free-form JSON from outside (no schema: the caller checks what it reads).

    Raises:
        WireError: ``data`` is not valid JSON, or nests too deeply, or is too large.
    """
    return guarded(_json_decode, data, what)


def _check_toml_nesting(text: str, what: str) -> None:
    if len(text) <= SCAN_ABOVE or text.count("[") + text.count("{") <= MAX_NESTING:
        return
    brackets = _TOML_SKIP.sub("", text).encode("utf-8", "surrogatepass")
    if _depth(brackets.translate(None, _NOT_BRACKETS)) > MAX_NESTING:
        raise WireError(f"{what} nests deeper than {MAX_NESTING} levels", reason=TOO_DEEP)


def decode_toml(data: bytes | str, what: str = "TOML") -> dict[str, Any]:
    """Parse a TOML document read from outside (a keyring, a config file).

    Raises:
        WireError: ``data`` is not UTF-8 or not valid TOML, nests too deeply, or is too large.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        _check_toml_nesting(text, what)
        return tomllib.loads(text)
    except Exception as exc:  # the edge, as in `guarded`
        raise refusal(what, exc) from exc
