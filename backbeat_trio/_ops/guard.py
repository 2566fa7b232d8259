"""What the admin server checks before a request reaches a route, and what it keeps of refusals.

* The ``Host`` a request was sent to must be one the server answers to (:class:`HostAllowlist`):
  a web page the operator visits could otherwise point a name it controls at 127.0.0.1 (DNS
  rebinding) and read every ``GET`` endpoint from the operator's browser. The page's name is
  what the browser sends as ``Host``, so refusing names not on the list closes that door.
* A bearer token is compared in constant time and a refusal is classified
  (:func:`authorization_failure`); the reason, never the token, is logged and counted.
* The token can come from a file (:func:`read_token_file`) refused when group or other can read
  it, as private key files are.

None of this imports hypercorn or prometheus-client.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import shlex
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

from .._errors import ConfigError

__all__ = [
    "AUTH_FAILURE_REASONS",
    "LOOPBACK_HOSTS",
    "AdminStatus",
    "EventStreams",
    "HostAllowlist",
    "RefusalLog",
    "authorization_failure",
    "check_token",
    "read_token_file",
    "request_host",
]

#: Why an ``Authorization`` header was refused: none sent, not ``Bearer <token>``, a wrong token.
AUTH_FAILURE_REASONS: Final = ("missing", "malformed", "wrong")
#: Names every admin server answers to: a browser sends them only for a page loaded from them.
LOOPBACK_HOSTS: Final = ("localhost", "127.0.0.1", "::1")
#: ``--http-allow-host '*'``: answer any Host (the check is off).
ANY_HOST: Final = "*"
#: A token file larger than this is not a token.
MAX_TOKEN_FILE_BYTES: Final = 4096
_WILDCARD_BINDS: Final = frozenset({"0.0.0.0", "::", ""})


@runtime_checkable
class EventStreams(Protocol):
    """A fallback app serving ``/events`` streams under a cap (the dashboard is one)."""

    streams_refused: int

    @property
    def streams(self) -> int:
        """Streams open now."""
        ...


@dataclass
class AdminStatus:
    """What one admin server refused, counted as it happens (its metrics read this).

    Attributes:
        auth_failures: refused ``Authorization`` headers by reason (every reason present from
            the start, so a metric exists at 0 before the first refusal).
        hosts_refused: requests refused for their ``Host``.
        events: the fallback app's ``/events`` streams, when it serves them under a cap.
    """

    auth_failures: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(AUTH_FAILURE_REASONS, 0)
    )
    hosts_refused: int = 0
    events: EventStreams | None = None


class HostAllowlist:
    """The ``Host`` names an admin server answers to.

    Always the loopback names (:data:`LOOPBACK_HOSTS`), the bound address unless it is a
    wildcard, and the ``extra`` names. Bound to a wildcard (``0.0.0.0``, ``::``), any IP
    address is also accepted as ``Host``: DNS rebinding needs a name, and probes and scrapers
    address a container by its IP. ``"*"`` among ``extra`` turns the check off.

    Args:
        bind_host: the host part of the address the server listens on.
        extra: more names (DNS names or IP addresses, without a port).
    """

    def __init__(self, bind_host: str, extra: Iterable[str] = ()) -> None:
        names = [*LOOPBACK_HOSTS, *extra]
        if bind_host not in _WILDCARD_BINDS:
            names.append(bind_host)
        self.any_host = ANY_HOST in names
        self.any_address = bind_host in _WILDCARD_BINDS
        self.names = frozenset(_normal(n) for n in names if n != ANY_HOST)

    def __repr__(self) -> str:
        if self.any_host:
            return "<HostAllowlist any>"
        extra = " or any IP address" if self.any_address else ""
        return f"<HostAllowlist {sorted(self.names)}{extra}>"

    def allows(self, host_header: str | None) -> bool:
        """Whether a request whose ``Host`` header is ``host_header`` is answered."""
        if self.any_host:
            return True
        host = request_host(host_header)
        if host is None:
            return False
        if host in self.names:
            return True
        return self.any_address and _is_ip(host)


def request_host(value: str | None) -> str | None:
    """The name in a ``Host`` header, lower-case, without its port; None if absent or malformed.

    ``"Example.org:8080"`` gives ``"example.org"``, ``"[::1]:8080"`` gives ``"::1"``.
    """
    if value is None:
        return None
    text = value.strip()
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not _port(rest)):
            return None
        return _normal(inside) if _is_ip(inside) else None
    name, colon, port = text.rpartition(":")
    if not colon:
        name = text
    elif not _port(colon + port):
        return None
    if not name or any(c.isspace() or c in ":/@[]" or not c.isprintable() for c in name):
        return None
    return _normal(name)


def authorization_failure(value: str | None, token: str) -> str | None:
    """Why ``value`` (an ``Authorization`` header) does not carry ``token``; None when it does.

    Returns:
        None, or one of :data:`AUTH_FAILURE_REASONS`.
    """
    if value is None:
        return "missing"
    scheme, _, given = value.partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        return "malformed"
    # header values reach us as latin-1 text of the bytes sent: compare those bytes with the
    # token's UTF-8 bytes (a token with non-ASCII characters is sent as its UTF-8 bytes)
    if hmac.compare_digest(given.encode("latin-1"), token.encode("utf-8")):
        return None
    return "wrong"


def check_token(token: str, field_name: str = "token") -> str:
    """``token`` if a client can present it in a header; else a :class:`ConfigError`.

    Surrounding whitespace is dropped by every HTTP parser and control characters cannot be
    sent, so a token holding either could never match: it is refused here, at start-up.
    """
    if not isinstance(token, str) or not token:
        raise ConfigError(field_name, "must be a non-empty string")
    if token != token.strip():
        raise ConfigError(field_name, "has leading or trailing whitespace, which no header keeps")
    if any(not c.isprintable() and c != " " for c in token):
        raise ConfigError(field_name, "holds control characters, which no header can carry")
    return token


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The admin token held in the file at ``path`` (one trailing newline is dropped).

    Raises:
        ConfigError: group or other can access the file (fix with ``chmod 600``), it cannot be
            read, it is larger than :data:`MAX_TOKEN_FILE_BYTES`, not UTF-8, or its token is
            empty or could never be presented (see :func:`check_token`).
    """
    name = os.fspath(path)
    where = "http_token_file"
    try:
        with open(path, "rb") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            if os.name == "posix" and mode & 0o077:
                raise ConfigError(
                    where,
                    f"{name!r} has mode {mode:04o}: group/other can access the admin token; it "
                    f"must be 0600 or 0400. Fix it with `chmod 600 {shlex.quote(name)}` (and "
                    "replace the token if others could read it)",
                )
            data = f.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(where, f"cannot read {name!r}: {exc.strerror or exc}") from exc
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise ConfigError(where, f"{name!r} is over {MAX_TOKEN_FILE_BYTES} bytes: not a token")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(where, f"{name!r} is not UTF-8 text") from exc
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ConfigError(where, f"{name!r} is empty")
    return check_token(text, where)


class RefusalLog:
    """Logs refusals at WARNING, at most one line per kind every ``every_s`` seconds.

    A flood of bad requests is counted in full by the metrics; the log says it once in a while,
    with how many lines like it were left out since.
    """

    def __init__(self, logger: logging.Logger, every_s: float = 10.0) -> None:
        self._log = logger
        self._every_s = every_s
        self._next_at: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<RefusalLog {self._log.name} left_out={sum(self._left_out.values())}>"

    def warning(self, kind: str, message: str, *args: object) -> None:
        """Log ``message % args`` unless a line of this ``kind`` was logged recently."""
        now = time.monotonic()
        if now < self._next_at.get(kind, -1.0):
            self._left_out[kind] = self._left_out.get(kind, 0) + 1
            return
        self._next_at[kind] = now + self._every_s
        left_out = self._left_out.pop(kind, 0)
        if left_out:
            message += " (%d more like it since the last such line)"
            args = (*args, left_out)
        self._log.warning(message, *args)


def _normal(name: str) -> str:
    # "LocalHost." names the same host as "localhost"
    return name.lower().removesuffix(".")


def _port(text: str) -> bool:
    digits = text.removeprefix(":")
    return text.startswith(":") and digits.isascii() and digits.isdigit() and len(digits) <= 5


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
