"""Client configuration, validated up front (a bad value raises before anything connects)."""

from __future__ import annotations

import importlib
import math
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

from nacl.signing import SigningKey

from .._core.beats import validate_beats_per_bar, validate_id
from .._errors import ConfigError

__all__ = ["Config", "parse_servers"]

_SCHEMES = ("nats", "tls", "ws", "wss")


def parse_servers(value: str | Sequence[str], field_name: str = "nats_url") -> tuple[str, ...]:
    """Split and check one or several NATS URLs (comma separated, or a list).

    Raises:
        ConfigError: no URL, or a URL without a ``nats://``-style scheme and a host.
    """
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


def _require_nkeys(name: str) -> None:
    # nats-py imports `nkeys` only inside connect(); without it a creds file or an nkey seed would
    # fail there with a bare ModuleNotFoundError, so it is checked with the rest of the Config.
    try:
        importlib.import_module("nkeys")
    except ImportError as exc:
        raise ConfigError(
            name,
            "needs the nkeys package, which is not installed: pip install 'nats-py[nkeys]'",
        ) from exc


def _positive(name: str, value: object, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        rule = ">= 0" if allow_zero else "> 0"
        raise ConfigError(name, f"must be {rule}, got {value!r}")


def _int_at_least(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, f"must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True, kw_only=True, repr=False)
class Config:
    """Everything a client needs; every field is checked when the Config is built.

    Args:
        cluster_id: the cluster to join (1-64 of ``[A-Za-z0-9_-]``).
        agent_id: this agent's id (same rule).
        nats_url: one URL, several comma separated, or a list.
        signing_key: an ed25519 key to sign claims with, or None to send them unsigned.
        jitter_tolerance: seconds a beat may be late before it counts as missing/stale (Go: 50 ms).
        reconnect_delay: seconds between reconnect attempts (Go: 1 s).
        max_reconnects: reconnect attempts after a disconnect, -1 for unlimited (Go default).
        connect_attempts: attempts for the first connect before ``open_client`` fails.
        beats_per_bar: bar length assumed until the pulse's downbeats show it.
        beat_buffer: size of each ``beats()``/``downbeats()`` channel (when full, the oldest
            frame is dropped).
        outbox_size: claims held while disconnected or waiting for their ack; a full outbox makes
            ``emit_status`` raise :class:`NotConnected`.
        max_frame_bytes: larger beat-subject payloads are counted and skipped unread.
        close_grace: seconds ``open_client`` waits on exit to deliver queued claims.
        jetstream: True/False to force claim delivery mode; None detects the status stream.
        user, password, token, creds_file, nkeys_seed: NATS authentication, passed to nats-py.
        tls: an ``ssl.SSLContext``; or ``tls_ca_file`` (+ ``tls_cert_file``/``tls_key_file``).
        name: the connection name the server shows (default ``backbeat-trio:<agent_id>``).
    """

    cluster_id: str
    agent_id: str
    nats_url: str | Sequence[str] = "nats://127.0.0.1:4222"
    signing_key: SigningKey | None = None
    jitter_tolerance: float = 0.050
    reconnect_delay: float = 1.0
    max_reconnects: int = -1
    connect_attempts: int = 1
    beats_per_bar: int = 4
    beat_buffer: int = 16
    outbox_size: int = 10_000
    max_frame_bytes: int = 64 * 1024
    close_grace: float = 2.0
    jetstream: bool | None = None
    user: str | None = None
    password: str | None = field(default=None)
    token: str | None = field(default=None)
    creds_file: str | None = None
    nkeys_seed: str | None = None
    tls: ssl.SSLContext | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        validate_id("cluster_id", self.cluster_id)
        validate_id("agent_id", self.agent_id)
        object.__setattr__(self, "nats_url", parse_servers(self.nats_url))
        if self.signing_key is not None and not isinstance(self.signing_key, SigningKey):
            raise ConfigError(
                "signing_key",
                f"must be a nacl.signing.SigningKey or None (see load_signing_key), "
                f"got {type(self.signing_key).__name__}",
            )
        _positive("jitter_tolerance", self.jitter_tolerance, allow_zero=True)
        _positive("reconnect_delay", self.reconnect_delay, allow_zero=True)
        _positive("close_grace", self.close_grace, allow_zero=True)
        _int_at_least("max_reconnects", self.max_reconnects, -1)
        _int_at_least("connect_attempts", self.connect_attempts, 1)
        validate_beats_per_bar(self.beats_per_bar)
        _int_at_least("beat_buffer", self.beat_buffer, 1)
        _int_at_least("outbox_size", self.outbox_size, 1)
        _int_at_least("max_frame_bytes", self.max_frame_bytes, 256)
        if self.jetstream not in (None, True, False):
            raise ConfigError("jetstream", f"must be True, False or None, got {self.jetstream!r}")
        if (self.user is None) != (self.password is None):
            raise ConfigError("user", "user and password go together")
        if self.token is not None and self.user is not None:
            raise ConfigError("token", "use either a token or user/password, not both")
        for name in ("creds_file", "tls_ca_file", "tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(name, f"no such file: {path!r}")
        for name in ("creds_file", "nkeys_seed"):
            if getattr(self, name) is not None:
                _require_nkeys(name)
        if self.tls is not None and not isinstance(self.tls, ssl.SSLContext):
            raise ConfigError("tls", "must be an ssl.SSLContext")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("tls_cert_file", "tls_cert_file and tls_key_file go together")

    @property
    def servers(self) -> tuple[str, ...]:
        """The NATS URLs, as a tuple."""
        assert isinstance(self.nats_url, tuple)
        return self.nats_url

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

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def __repr__(self) -> str:
        secret = {"password", "token", "nkeys_seed", "signing_key", "tls"}
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            always = f.name in ("cluster_id", "agent_id", "nats_url")
            if (value is None or value == f.default) and not always:
                continue
            if f.name in secret:
                shown.append(f"{f.name}=<set>")
            else:
                shown.append(f"{f.name}={value!r}")
        return f"Config({', '.join(shown)})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Build a Config from ``BACKBEAT_*`` environment variables.

        Reads ``BACKBEAT_CLUSTER_ID``, ``BACKBEAT_AGENT_ID``, ``BACKBEAT_NATS_URL``,
        ``BACKBEAT_SIGNING_KEY`` (a key file path), ``BACKBEAT_JITTER_TOLERANCE``,
        ``BACKBEAT_RECONNECT_DELAY``, ``BACKBEAT_MAX_RECONNECTS``, ``BACKBEAT_BEATS_PER_BAR``,
        ``BACKBEAT_NATS_USER``/``_PASSWORD``/``_TOKEN``/``_CREDS``, ``BACKBEAT_TLS_CA``,
        ``BACKBEAT_TLS_CERT``, ``BACKBEAT_TLS_KEY``. Keyword overrides win.

        Raises:
            ConfigError: a variable is missing or malformed (named in the message).
        """
        env = os.environ if env is None else env
        kw: dict[str, Any] = {}
        text = {
            "cluster_id": "BACKBEAT_CLUSTER_ID",
            "agent_id": "BACKBEAT_AGENT_ID",
            "nats_url": "BACKBEAT_NATS_URL",
            "user": "BACKBEAT_NATS_USER",
            "password": "BACKBEAT_NATS_PASSWORD",
            "token": "BACKBEAT_NATS_TOKEN",
            "creds_file": "BACKBEAT_NATS_CREDS",
            "tls_ca_file": "BACKBEAT_TLS_CA",
            "tls_cert_file": "BACKBEAT_TLS_CERT",
            "tls_key_file": "BACKBEAT_TLS_KEY",
        }
        for key, var in text.items():
            if env.get(var):
                kw[key] = env[var]
        numbers: dict[str, tuple[str, type[int] | type[float]]] = {
            "jitter_tolerance": ("BACKBEAT_JITTER_TOLERANCE", float),
            "reconnect_delay": ("BACKBEAT_RECONNECT_DELAY", float),
            "max_reconnects": ("BACKBEAT_MAX_RECONNECTS", int),
            "beats_per_bar": ("BACKBEAT_BEATS_PER_BAR", int),
        }
        for key, (var, conv) in numbers.items():
            if env.get(var):
                try:
                    kw[key] = conv(env[var])
                except ValueError as exc:
                    raise ConfigError(key, f"{var}={env[var]!r} is not a {conv.__name__}") from exc
        if env.get("BACKBEAT_SIGNING_KEY"):
            from .._core.signing import load_signing_key

            kw["signing_key"] = load_signing_key(env["BACKBEAT_SIGNING_KEY"])
        kw.update(overrides)
        required_vars = (("cluster_id", "BACKBEAT_CLUSTER_ID"), ("agent_id", "BACKBEAT_AGENT_ID"))
        for required, var in required_vars:
            if required not in kw:
                raise ConfigError(required, f"not given and {var} is not set")
        return cls(**kw)
