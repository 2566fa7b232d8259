"""Client configuration, validated up front (a bad value raises before anything connects)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nacl.signing import SigningKey

from .._core.beats import validate_beats_per_bar, validate_id
from .._errors import ConfigError
from .._transport.options import (
    ConnectionOptions,
    check_int_at_least,
    check_number,
    connection_kwargs_from_env,
    env_numbers,
    parse_servers,
)

__all__ = ["Config", "parse_servers"]


@dataclass(frozen=True, kw_only=True, repr=False)
class Config(ConnectionOptions):
    """Everything a client needs; every field is checked when the Config is built.

    The NATS connection fields (``nats_url``, ``user``, ``password``, ``token``, ``creds_file``,
    ``nkeys_seed``, ``tls``, ``tls_ca_file``, ``tls_cert_file``, ``tls_key_file``, ``name``,
    ``reconnect_delay``, ``max_reconnects``, ``connect_attempts``) are
    :class:`ConnectionOptions`'s, with its rules; the connection name defaults to
    ``backbeat-trio:<agent_id>``.

    Args:
        cluster_id: the cluster to join (1-64 of ``[A-Za-z0-9_-]``).
        agent_id: this agent's id (same rule).
        signing_key: an ed25519 key to sign claims with, or None to send them unsigned.
        jitter_tolerance: seconds a beat may be late before it counts as missing/stale (Go: 50 ms).
        beats_per_bar: bar length assumed until the pulse's downbeats show it.
        beat_buffer: size of each ``beats()``/``downbeats()`` channel (when full, the oldest
            frame is dropped).
        outbox_size: claims held while disconnected or waiting for their ack; a full outbox makes
            ``emit_status`` raise :class:`NotConnected`.
        max_frame_bytes: larger beat-subject payloads are counted and skipped unread.
        close_grace: seconds ``open_client`` waits on exit to deliver queued claims.
        jetstream: True/False to force claim delivery mode; None detects the status stream.
        first_beat_warning: seconds a client may go without its first beat before it warns,
            once, that nothing beats on its subject (a wrong ``cluster_id``, or no pulse
            running); the warning is also in ``health().errors``. None: never warn. A pulse
            slower than ``60 / first_beat_warning`` BPM is this quiet too.
        **connection: the :class:`ConnectionOptions` fields.
    """

    cluster_id: str
    agent_id: str
    signing_key: SigningKey | None = None
    jitter_tolerance: float = 0.050
    beats_per_bar: int = 4
    beat_buffer: int = 16
    outbox_size: int = 10_000
    max_frame_bytes: int = 64 * 1024
    close_grace: float = 2.0
    jetstream: bool | None = None
    first_beat_warning: float | None = 10.0

    _SECRET_FIELDS = ConnectionOptions._SECRET_FIELDS | {"signing_key"}

    def __post_init__(self) -> None:
        validate_id("cluster_id", self.cluster_id)
        validate_id("agent_id", self.agent_id)
        super().__post_init__()
        if self.signing_key is not None and not isinstance(self.signing_key, SigningKey):
            raise ConfigError(
                "signing_key",
                f"must be a nacl.signing.SigningKey or None (see load_signing_key), "
                f"got {type(self.signing_key).__name__}",
            )
        check_number("jitter_tolerance", self.jitter_tolerance, allow_zero=True)
        check_number("close_grace", self.close_grace, allow_zero=True)
        validate_beats_per_bar(self.beats_per_bar)
        check_int_at_least("beat_buffer", self.beat_buffer, 1)
        check_int_at_least("outbox_size", self.outbox_size, 1)
        check_int_at_least("max_frame_bytes", self.max_frame_bytes, 256)
        if self.first_beat_warning is not None:
            check_number("first_beat_warning", self.first_beat_warning)
        if self.jetstream not in (None, True, False):
            raise ConfigError("jetstream", f"must be True, False or None, got {self.jetstream!r}")

    def _default_connection_name(self) -> str:
        return f"backbeat-trio:{self.agent_id}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Build a Config from ``BACKBEAT_*`` environment variables.

        Reads ``BACKBEAT_CLUSTER_ID``, ``BACKBEAT_AGENT_ID``, ``BACKBEAT_SIGNING_KEY`` (a key file
        path), ``BACKBEAT_JITTER_TOLERANCE``, ``BACKBEAT_BEATS_PER_BAR``,
        ``BACKBEAT_FIRST_BEAT_WARNING`` (seconds) and the connection
        variables :func:`connection_kwargs_from_env` reads (``BACKBEAT_NATS_URL``,
        ``BACKBEAT_NATS_USER``/``_PASSWORD``/``_TOKEN``/``_CREDS``/``_NKEYS_SEED``,
        ``BACKBEAT_TLS_CA``/``_CERT``/``_KEY``, ``BACKBEAT_RECONNECT_DELAY``,
        ``BACKBEAT_MAX_RECONNECTS``). Keyword overrides win.

        Raises:
            ConfigError: a variable is missing or malformed (named in the message).
        """
        env = os.environ if env is None else env
        kw: dict[str, Any] = connection_kwargs_from_env(env)
        for key, var in (("cluster_id", "BACKBEAT_CLUSTER_ID"), ("agent_id", "BACKBEAT_AGENT_ID")):
            if env.get(var):
                kw[key] = env[var]
        numbers: dict[str, tuple[str, type[int] | type[float]]] = {
            "jitter_tolerance": ("BACKBEAT_JITTER_TOLERANCE", float),
            "beats_per_bar": ("BACKBEAT_BEATS_PER_BAR", int),
            "first_beat_warning": ("BACKBEAT_FIRST_BEAT_WARNING", float),
        }
        kw.update(env_numbers(env, numbers))
        if env.get("BACKBEAT_SIGNING_KEY"):
            from .._core.signing import load_signing_key

            kw["signing_key"] = load_signing_key(env["BACKBEAT_SIGNING_KEY"])
        kw.update(overrides)
        required_vars = (("cluster_id", "BACKBEAT_CLUSTER_ID"), ("agent_id", "BACKBEAT_AGENT_ID"))
        for required, var in required_vars:
            if required not in kw:
                raise ConfigError(required, f"not given and {var} is not set")
        return cls(**kw)
