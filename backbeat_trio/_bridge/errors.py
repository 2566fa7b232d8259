"""The one edge where what nats-py, asyncio and the socket raise becomes a ``BackbeatError``.

Like httpcore's ``map_exceptions``, the mapping is one table applied in one place: every call
into nats-py that can fail runs inside :func:`map_nats_errors` (or, for the first connect,
ends in :func:`connect_refusal`), so nothing raw crosses the bridge. What the bridge lets pass
on purpose (a failed unsubscribe or close of a connection that is going away anyway) goes
through :func:`ignore_nats_errors`, which logs it with the reason it does not matter.

============================================  ====================  =======================
nats-py / asyncio / socket raised             JetStream request     anything else
============================================  ====================  =======================
a ``BackbeatError``                           itself                itself
the connection is closed, draining, gone      ``NotConnected``      ``NotConnected``
a reply nats-py could not parse               ``WireError``         ``WireError``
no responders, JetStream unavailable          ``JetStreamError``    ``NotConnected``
a timeout (nats-py's, asyncio's, socket's)    ``JetStreamError``    ``NotConnected``
JetStream refused it (``APIError``)           ``JetStreamError``    ``JetStreamError``
                                              with its ``code``     with its ``code``
any other exception                           ``JetStreamError``    ``NotConnected``
============================================  ====================  =======================

The mapped error is raised ``from`` what was raised, so ``__cause__`` keeps nats-py's own.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Iterator, Sequence

from .._core.edge import MALFORMED
from .._errors import BackbeatError, JetStreamError, NotConnected, WireError

__all__ = [
    "backbeat_error",
    "connect_refusal",
    "describe",
    "ignore_nats_errors",
    "is_slow_consumer",
    "map_nats_errors",
    "nats_failures",
    "not_found_errors",
    "refusal_code",
    "refusal_errors",
]

log = logging.getLogger("backbeat_trio.transport")

ErrorTypes = tuple[type[BaseException], ...]


@functools.cache
def nats_failures() -> ErrorTypes:
    """What nats-py raises for a failing connection or a refused operation: its own ``Error``
    tree (JetStream's included), the socket's ``OSError`` (TLS, timeouts: nats-py's, asyncio's
    and the socket's ``TimeoutError`` are all ``OSError``), and the decoder errors of a server
    reply nats-py could not parse (it lets them through unwrapped)."""
    import nats.errors

    return (OSError, nats.errors.Error, json.JSONDecodeError, UnicodeDecodeError)


@functools.cache
def not_found_errors() -> ErrorTypes:
    """What nats-py raises when a stream, consumer, key or message does not exist: an answer,
    which the bridge returns as ``None`` or ``[]``."""
    import nats.js.errors

    return (nats.js.errors.NotFoundError,)


@functools.cache
def refusal_errors() -> ErrorTypes:
    """What nats-py raises when JetStream refused a request (its error code:
    :func:`refusal_code`)."""
    import nats.js.errors

    return (nats.js.errors.APIError,)


def refusal_code(exc: BaseException) -> int | None:
    """JetStream's error code of a refusal (e.g. 10058: a stream name in use); None for others."""
    code = getattr(exc, "err_code", None)
    return code if isinstance(code, int) else None


def is_slow_consumer(exc: BaseException) -> bool:
    """True when nats-py reports a subscription that could not keep up (its error callback)."""
    import nats.errors

    return isinstance(exc, nats.errors.SlowConsumerError)


def describe(exc: BaseException) -> str:
    """``Type: text``: how a nats-py error is quoted in messages and ``last_error``."""
    return f"{type(exc).__name__}: {exc}".strip()


@functools.cache
def _rows() -> tuple[ErrorTypes, ErrorTypes, ErrorTypes]:
    import nats.errors
    import nats.js.errors

    down: ErrorTypes = (
        nats.errors.ConnectionClosedError,
        nats.errors.ConnectionDrainingError,
        nats.errors.ConnectionReconnectingError,
        nats.errors.NoServersError,
        nats.errors.StaleConnectionError,
        nats.errors.OutboundBufferLimitError,
    )
    unparsed: ErrorTypes = (
        nats.errors.JsonParseError,
        nats.errors.NotJSMessageError,
        json.JSONDecodeError,
        UnicodeDecodeError,
    )
    no_answer: ErrorTypes = (
        nats.errors.NoRespondersError,
        nats.js.errors.ServiceUnavailableError,
        nats.js.errors.NoStreamResponseError,
    )
    return down, unparsed, no_answer


def backbeat_error(what: str, exc: BaseException, *, jetstream: bool = False) -> BackbeatError:
    """The :class:`BackbeatError` for what was raised while doing ``what`` (the table above).

    Args:
        what: what the bridge was doing, the start of the message (``"read stream 'S'"``).
        exc: what nats-py, asyncio or the socket raised.
        jetstream: ``what`` was a JetStream API request: no answer and a timeout are then
            :class:`JetStreamError` (the outcome is unknown), not :class:`NotConnected`.
    """
    if isinstance(exc, BackbeatError):
        return exc
    down, unparsed, no_answer = _rows()
    if isinstance(exc, down):
        return NotConnected(f"{what}: the connection is down ({type(exc).__name__})")
    if isinstance(exc, unparsed):
        return WireError(
            f"{what}: nats-py could not parse what the server sent ({describe(exc)})",
            reason=MALFORMED,
        )
    if isinstance(exc, no_answer):
        if jetstream:
            return JetStreamError(f"{what}: JetStream did not answer (is it enabled?)")
        return NotConnected(f"{what}: no responders ({type(exc).__name__})")
    if isinstance(exc, TimeoutError):  # nats-py's and asyncio's TimeoutError are this one
        if jetstream:
            return JetStreamError(f"{what}: JetStream did not answer in time")
        return NotConnected(f"{what}: the server did not answer in time")
    if isinstance(exc, refusal_errors()):  # after no_answer: ServiceUnavailable is one too
        code = refusal_code(exc)
        description = getattr(exc, "description", None) or exc
        return JetStreamError(f"{what}: {description} (code {code})", code=code)
    if jetstream:
        return JetStreamError(f"{what} failed: {describe(exc)}")
    return NotConnected(f"{what} failed: {describe(exc)}")


@contextlib.contextmanager
def map_nats_errors(what: str, *, jetstream: bool = False) -> Iterator[None]:
    """Raise whatever the block raises as its :func:`backbeat_error`, ``from`` the original.

    Cancellation (trio's and asyncio's) is not an ``Exception`` and passes unchanged.

    Args:
        what: what the block does, the start of the message.
        jetstream: the block is a JetStream API request (see :func:`backbeat_error`).
    """
    try:
        yield
    except BackbeatError:
        raise
    except Exception as exc:  # the edge: nothing raw leaves the bridge
        raise backbeat_error(what, exc, jetstream=jetstream) from exc


@contextlib.contextmanager
def ignore_nats_errors(
    what: str,
    why: str,
    *,
    also: ErrorTypes = (),
    logger: logging.Logger = log,
) -> Iterator[None]:
    """Let a nats-py failure of the block pass, logged (debug) with the reason it does not
    matter; anything else the block raises is mapped as :func:`map_nats_errors` does.

    Args:
        what: what the block does.
        why: why its failure may be ignored (goes to the log line).
        also: further exception types to ignore there (e.g. a nats-py version's known slip).
        logger: the logger of the caller's module.
    """
    try:
        yield
    except (*nats_failures(), *also) as exc:
        logger.debug("%s: %s; ignored: %s", what, describe(exc), why)
    except BackbeatError:
        raise
    except Exception as exc:  # the edge: not a failure nats-py is known for, so not ignored
        raise backbeat_error(what, exc) from exc


# --- the first connect ----------------------------------------------------------------------------
def _credentials_refused(exc: BaseException | None) -> bool:
    import nats.errors

    if isinstance(exc, nats.errors.AuthorizationError | nats.errors.InvalidUserCredentialsError):
        return True
    # A server's -ERR during the handshake reaches us as nats-py's plain Error with the server's
    # text ('Authorization Violation', 'Authentication Timeout', 'User Authentication Expired'):
    # nats-py names none of them with a type, so the text is all there is.
    return isinstance(exc, nats.errors.Error) and "auth" in str(exc).lower()


def _tls_failed(exc: BaseException | None) -> bool:
    import ssl

    import nats.errors

    if isinstance(
        exc,
        ssl.SSLError
        | nats.errors.SecureConnFailedError
        | nats.errors.SecureConnRequiredError
        | nats.errors.SecureConnWantedError,
    ):
        return True
    # nats-py's own checks ("nats: no ssl context provided") and a server's 'Secure Connection
    # - TLS Required' come as its plain Error, known by their text only
    text = str(exc).lower()
    return isinstance(exc, nats.errors.Error) and ("ssl" in text or "tls" in text)


def connect_refusal(
    servers: Sequence[str], exc: BaseException, seen: BaseException | None = None
) -> NotConnected:
    """The :class:`NotConnected` for a first connect that failed, saying why (credentials
    refused, TLS, anything else), from what nats-py raised (``exc``) and what its error
    callback saw last (``seen``: with a pool, nats-py raises only "no servers available")."""
    text = describe(exc)
    if seen is not None and describe(seen) not in text:
        text = f"{describe(seen)} ({text})"
    where = ", ".join(servers)
    if _credentials_refused(exc) or _credentials_refused(seen):
        return NotConnected(
            f"NATS at {where} refused the credentials (authorization violation): {text}"
        )
    if _tls_failed(exc) or _tls_failed(seen):
        return NotConnected(f"TLS handshake with {where} failed: {text}")
    return NotConnected(f"could not connect to NATS at {where}: {text}")
