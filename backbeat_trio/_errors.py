"""The exception tree. Everything the SDK raises on purpose is a :class:`BackbeatError`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._core.wire import StatusClaim

__all__ = [
    "BackbeatError",
    "BeatBudgetExceeded",
    "ConfigError",
    "EmbeddedServerError",
    "InvalidStatusClaim",
    "JetStreamError",
    "NotConnected",
    "NotUnderTrio",
    "PulseConflict",
    "SignatureError",
    "UndeliveredClaims",
    "WireError",
]


class BackbeatError(Exception):
    """Base class of every error backbeat_trio raises on purpose."""


class ConfigError(BackbeatError, ValueError):
    """A configuration value breaks a rule; raised before anything connects.

    Attributes:
        field: the name of the offending field.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class InvalidStatusClaim(BackbeatError, ValueError):
    """A status claim breaks the wire contract; raised before anything is sent."""


class WireError(BackbeatError, ValueError):
    """Bytes from outside (a message on the wire, a file, a request body) could not be decoded
    or broke the contract.

    Attributes:
        reason: what the refusal is counted under: ``"malformed"`` (invalid JSON, UTF-8 or
            TOML, or a broken contract), ``"too_deep"`` (nested deeper than any message needs)
            or ``"too_large"`` (too large to decode).
    """

    def __init__(self, message: str = "", *, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class BeatBudgetExceeded(BackbeatError, TimeoutError):
    """A :meth:`Client.fail_after_beats` budget ran out before the work finished."""

    def __init__(self, beats: float, message: str | None = None) -> None:
        super().__init__(message or f"beat budget of {beats:g} beat(s) exceeded")
        self.beats = beats


class JetStreamError(BackbeatError):
    """JetStream refused a request or did not answer it in time (the outcome is then unknown).

    Attributes:
        code: JetStream's error code when it refused (e.g. 10058: a stream name in use); None for
            a timeout or no answer at all.
    """

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class NotConnected(BackbeatError, ConnectionError):
    """The client is not connected (or could not connect), or its outbox is full."""


class NotUnderTrio(BackbeatError, RuntimeError):
    """An entry point of backbeat_trio (``open_client``, ``run_pulse``, ...) was called outside
    trio: from asyncio, or from no event loop at all. Raised before anything is opened."""


class PulseConflict(BackbeatError, RuntimeError):
    """A pulse saw beat frames it did not publish on its own beat subject: another pulse beats
    for the same cluster, and clients would discard the beats of whichever is behind.

    Attributes:
        frame: the first foreign frame (a :class:`~backbeat_trio.BeatFrame`).
    """

    def __init__(self, message: str, frame: object) -> None:
        super().__init__(message)
        self.frame = frame


class SignatureError(BackbeatError):
    """A signature or key is missing, malformed, unknown or does not verify.

    Attributes:
        reason: a short machine-readable cause, for counting rejections: ``"unsigned"``,
            ``"unknown_agent"``, ``"wrong_key"``, ``"agent_mismatch"``, ``"bad_signature"``,
            ``"replay"``, ``"malformed"``, ``"insecure_key_file"``; ``None`` when unclassified.
    """

    def __init__(self, message: str = "", *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class EmbeddedServerError(BackbeatError, RuntimeError):
    """An embedded nats-server failed to start, exited early or did not become ready in time.

    The message carries the tail of the server's log.
    """


class UndeliveredClaims(NotConnected):
    """Raised when a client closes with claims that never reached the server (or were never
    acknowledged in JetStream mode). ``claims`` holds their bodies, oldest first."""

    def __init__(self, claims: list[StatusClaim]) -> None:
        super().__init__(
            f"{len(claims)} status claim(s) were not delivered before the client closed"
        )
        self.claims = claims
