"""NATS connection options, declared and validated once for the client and every service.

:class:`ConnectionOptions` holds every setting a NATS connection is made with (servers,
authentication, TLS, the connection name, reconnect behaviour). :class:`~backbeat_trio.Config`,
:class:`~backbeat_trio.PulseConfig`, :class:`~backbeat_trio.HAPulseConfig` and
:class:`~backbeat_trio.ReverbConfig` inherit it, so each accepts the same keywords with the same
rules, and :func:`~backbeat_trio.open_nats_transport` connects with any of them. This module is
pure data: it checks values and builds an ``ssl.SSLContext``; nats-py itself is only imported by
the bridge.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any, Self
from urllib.parse import urlsplit

from .._errors import ConfigError

__all__ = [
    "ConnectionOptions",
    "connection_kwargs_from_env",
    "parse_servers",
]

_SCHEMES = ("nats", "tls", "ws", "wss")

#: What nats-py needs for NKEY and JWT (creds file) authentication.
NKEYS_INSTALL_HINT = "pip install 'nats-py[nkeys]'"


def parse_servers(value: str | Sequence[str], field_name: str = "nats_url") -> tuple[str, ...]:
    """Split and check one or several NATS URLs (comma separated, or a list).

    Raises:
        ConfigError: no URL, or a URL without a ``nats://``-style scheme and a host.
    """
    if isinstance(value, bytes) or not isinstance(value, str | Sequence):
        raise ConfigError(field_name, f"must be a URL string or a sequence of them, got {value!r}")
    items = value.split(",") if isinstance(value, str) else list(value)
    urls = tuple(u.strip() for u in items if isinstance(u, str) and u.strip())
    if not urls:
        raise ConfigError(field_name, f"needs at least one URL, got {value!r}")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in _SCHEMES or not parts.hostname:
            raise ConfigError(
                field_name, f"{url!r} is not a NATS URL (expected e.g. nats://127.0.0.1:4222)"
            )
        try:
            parts.port  # noqa: B018 - urlsplit validates the port lazily
        except ValueError as exc:
            raise ConfigError(field_name, f"{url!r} has an invalid port") from exc
    return urls


def check_number(name: str, value: object, *, allow_zero: bool = False) -> None:
    """Check that ``value`` is a finite number > 0 (or >= 0 with ``allow_zero``).

    Raises:
        ConfigError: it is not (named ``name``).
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        rule = ">= 0" if allow_zero else "> 0"
        raise ConfigError(name, f"must be {rule}, got {value!r}")


def check_int_at_least(name: str, value: object, minimum: int) -> None:
    """Check that ``value`` is an int (not a bool) >= ``minimum``.

    Raises:
        ConfigError: it is not (named ``name``).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, f"must be an int >= {minimum}, got {value!r}")


def _check_text(name: str, value: object) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(name, f"must be a non-empty string or None, got {value!r}")


#: A subject prefix: dot-separated tokens without whitespace or wildcards (``*``, ``>``).
_INBOX_PREFIX = re.compile(r"[^.*>\s]+(?:\.[^.*>\s]+)*")


def _check_inbox_prefix(value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not _INBOX_PREFIX.fullmatch(value):
        raise ConfigError(
            "inbox_prefix",
            f"must be a subject prefix without wildcards (e.g. '_INBOX_agents'), got {value!r}",
        )


def _check_nkeys_importable(name: str) -> None:
    # nats-py imports nkeys inside connect(), where a missing package would surface as a bare
    # ModuleNotFoundError from the connect attempt instead of a config error
    try:
        importlib.import_module("nkeys")
    except ImportError as exc:
        raise ConfigError(
            name, f"needs the nkeys package, which is not installed: {NKEYS_INSTALL_HINT}"
        ) from exc


@dataclass(frozen=True, kw_only=True, repr=False)
class ConnectionOptions:
    """How to reach and authenticate to NATS; every field is checked when the object is built.

    Subclasses (the client's and the services' configs) keep these names and rules and may change
    the defaults (a service retries its first connect, for instance).

    Args:
        nats_url: one URL, several comma separated, or a sequence of them (``nats://``,
            ``tls://``, ``ws://``, ``wss://``); kept as a tuple.
        user: user name; goes with ``password``.
        password: the user's password (never shown in the repr).
        token: an authentication token, instead of user/password (never shown in the repr).
        creds_file: path of a ``.creds`` file (JWT and NKEY seed); needs the ``nkeys`` package.
        nkeys_seed: path of an NKEY seed file; needs the ``nkeys`` package.
        tls: an ``ssl.SSLContext`` to connect with; otherwise one is built from ``tls_ca_file``
            (+ ``tls_cert_file``/``tls_key_file``), or the system default for ``tls://`` URLs.
        tls_ca_file: the CA certificate(s) to trust the server with.
        tls_cert_file: a client certificate (mutual TLS); goes with ``tls_key_file``.
        tls_key_file: the client certificate's key; goes with ``tls_cert_file``.
        name: the connection name the server shows (default: the config type's own).
        reconnect_delay: seconds between reconnect attempts (Go: 1 s).
        max_reconnects: reconnect attempts after a disconnect, -1 for unlimited (Go default).
        connect_attempts: attempts for the first connect before it fails with ``NotConnected``.
        inbox_prefix: the subject prefix of this connection's reply inboxes (PubAcks, JetStream
            API replies, consumer deliveries); nats-py's ``_INBOX`` when None. A per-role prefix
            lets the server's permissions keep each role's replies to itself (docs/security.md).

    Raises:
        ConfigError: a value breaks its field's rule (the error names the field).
    """

    nats_url: str | Sequence[str] = "nats://127.0.0.1:4222"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None
    nkeys_seed: str | None = None
    tls: ssl.SSLContext | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    name: str | None = None
    reconnect_delay: float = 1.0
    max_reconnects: int = -1
    connect_attempts: int = 1
    inbox_prefix: str | None = None

    # Fields the repr shows only as ``<set>``. Deliberately unannotated: a ClassVar would appear
    # in ``__dataclass_fields__``, which callers iterate to copy a config.
    _SECRET_FIELDS = frozenset({"password", "token", "nkeys_seed", "tls"})

    def __post_init__(self) -> None:
        self._validate_connection()

    def _validate_connection(self) -> None:
        object.__setattr__(self, "nats_url", parse_servers(self.nats_url))
        for name in ("user", "password", "token", "name"):
            _check_text(name, getattr(self, name))
        if self.user is not None and self.password is None:
            raise ConfigError("user", "user and password go together (no password given)")
        if self.password is not None and self.user is None:
            raise ConfigError("password", "user and password go together (no user given)")
        if self.token is not None and self.user is not None:
            raise ConfigError("token", "use either a token or user/password, not both")
        for name in ("creds_file", "nkeys_seed", "tls_ca_file", "tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            if path is None:
                continue
            if not isinstance(path, str | os.PathLike):
                raise ConfigError(name, f"must be a file path or None, got {path!r}")
            if not os.path.isfile(path):
                raise ConfigError(name, f"no such file: {path!r}")
            object.__setattr__(self, name, os.fspath(path))
        if self.tls is not None and not isinstance(self.tls, ssl.SSLContext):
            raise ConfigError("tls", f"must be an ssl.SSLContext or None, got {self.tls!r}")
        if self.tls_cert_file is not None and self.tls_key_file is None:
            raise ConfigError("tls_cert_file", "tls_cert_file and tls_key_file go together")
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise ConfigError("tls_key_file", "tls_cert_file and tls_key_file go together")
        check_number("reconnect_delay", self.reconnect_delay, allow_zero=True)
        check_int_at_least("max_reconnects", self.max_reconnects, -1)
        check_int_at_least("connect_attempts", self.connect_attempts, 1)
        _check_inbox_prefix(self.inbox_prefix)
        for name in ("creds_file", "nkeys_seed"):
            if getattr(self, name) is not None:
                _check_nkeys_importable(name)
        self._check_tls_files()

    def _check_tls_files(self) -> None:
        # load the PEM files once now, so an unreadable CA or a certificate that does not match
        # its key is a ConfigError here rather than an ssl.SSLError when connecting
        if self.tls is not None or (self.tls_ca_file is None and self.tls_cert_file is None):
            return
        try:
            ctx = ssl.create_default_context(cafile=self.tls_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError("tls_ca_file", f"cannot load {self.tls_ca_file!r}: {exc}") from exc
        if self.tls_cert_file is not None and self.tls_key_file is not None:
            try:
                ctx.load_cert_chain(self.tls_cert_file, self.tls_key_file)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(
                    "tls_cert_file",
                    f"cannot load {self.tls_cert_file!r} with key {self.tls_key_file!r}: {exc}",
                ) from exc

    @property
    def servers(self) -> tuple[str, ...]:
        """The NATS URLs, as a tuple."""
        assert isinstance(self.nats_url, tuple)
        return self.nats_url

    @property
    def connection_name(self) -> str:
        """The name the server shows for the connection: ``name``, or this type's default."""
        return self.name if self.name is not None else self._default_connection_name()

    def _default_connection_name(self) -> str:
        return "backbeat-trio"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context to connect with (built from the file options when no ``tls`` given)."""
        if self.tls is not None:
            return self.tls
        if self.tls_ca_file is None and self.tls_cert_file is None:
            if any(u.startswith("tls://") for u in self.servers):
                return ssl.create_default_context()
            return None
        ctx = ssl.create_default_context(cafile=self.tls_ca_file)
        if self.tls_cert_file and self.tls_key_file:
            ctx.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        return ctx

    def connection_kwargs(self) -> dict[str, Any]:
        """The connection fields as keywords, to build another config on the same connection."""
        return {f.name: getattr(self, f.name) for f in fields(ConnectionOptions)}

    def connection_options(self) -> ConnectionOptions:
        """Only the connection settings (with this config's connection name)."""
        return ConnectionOptions(**(self.connection_kwargs() | {"name": self.connection_name}))

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def __repr__(self) -> str:
        required: list[str] = []
        optional: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            has_default = f.default is not MISSING or f.default_factory is not MISSING
            if has_default and f.name != "nats_url" and (value is None or value == f.default):
                continue
            text = "<set>" if f.name in self._SECRET_FIELDS else repr(value)
            (optional if has_default else required).append(f"{f.name}={text}")
        return f"{type(self).__name__}({', '.join(required + optional)})"


def connection_kwargs_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The connection settings given in ``BACKBEAT_*`` environment variables, as keywords.

    Reads ``BACKBEAT_NATS_URL``, ``BACKBEAT_NATS_USER``/``_PASSWORD``/``_TOKEN``/``_CREDS``/
    ``_NKEYS_SEED`` (a seed file path)/``_INBOX_PREFIX``, ``BACKBEAT_TLS_CA``,
    ``BACKBEAT_TLS_CERT``, ``BACKBEAT_TLS_KEY``, ``BACKBEAT_RECONNECT_DELAY`` and
    ``BACKBEAT_MAX_RECONNECTS``; unset or empty variables are left out. Any config type takes
    the result: ``PulseConfig(cluster_id=..., **connection_kwargs_from_env())``.

    Raises:
        ConfigError: a numeric variable is malformed (named in the message).
    """
    env = os.environ if env is None else env
    kw: dict[str, Any] = {}
    text = {
        "nats_url": "BACKBEAT_NATS_URL",
        "user": "BACKBEAT_NATS_USER",
        "password": "BACKBEAT_NATS_PASSWORD",
        "token": "BACKBEAT_NATS_TOKEN",
        "creds_file": "BACKBEAT_NATS_CREDS",
        "nkeys_seed": "BACKBEAT_NATS_NKEYS_SEED",
        "tls_ca_file": "BACKBEAT_TLS_CA",
        "tls_cert_file": "BACKBEAT_TLS_CERT",
        "tls_key_file": "BACKBEAT_TLS_KEY",
        "inbox_prefix": "BACKBEAT_NATS_INBOX_PREFIX",
    }
    for key, var in text.items():
        if env.get(var):
            kw[key] = env[var]
    numbers: dict[str, tuple[str, type[int] | type[float]]] = {
        "reconnect_delay": ("BACKBEAT_RECONNECT_DELAY", float),
        "max_reconnects": ("BACKBEAT_MAX_RECONNECTS", int),
    }
    kw.update(env_numbers(env, numbers))
    return kw


def env_numbers(
    env: Mapping[str, str], numbers: Mapping[str, tuple[str, type[int] | type[float]]]
) -> dict[str, int | float]:
    """Parse the numeric variables ``numbers`` maps field names to (variable, type).

    Raises:
        ConfigError: a variable is not a number of its type (named by its field).
    """
    kw: dict[str, int | float] = {}
    for key, (var, conv) in numbers.items():
        if env.get(var):
            try:
                kw[key] = conv(env[var])
            except ValueError as exc:
                raise ConfigError(key, f"{var}={env[var]!r} is not a {conv.__name__}") from exc
    return kw
