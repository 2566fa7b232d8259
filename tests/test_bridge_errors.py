"""The one edge where nats-py's, asyncio's and the socket's exceptions become BackbeatErrors
(``_bridge/errors.py``): the table, what is ignored (and logged), the connect refusal's
explanation, and the same mappings coming out of a real nats-server."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from typing import Any

import nats.aio.client
import nats.aio.subscription
import nats.errors
import nats.js.errors
import pytest
import trio
from _guards import closed_port, fail_on_bare_cancel

from backbeat_trio._bridge.errors import (
    backbeat_error,
    connect_refusal,
    ignore_nats_errors,
    map_nats_errors,
    nats_failures,
)
from backbeat_trio._bridge.nats import open_nats_transport
from backbeat_trio._embedded import NatsServerProcess
from backbeat_trio._errors import BackbeatError, JetStreamError, NotConnected, WireError
from backbeat_trio._transport.options import ConnectionOptions

DOWN: list[BaseException] = [
    nats.errors.ConnectionClosedError(),
    nats.errors.ConnectionDrainingError(),
    nats.errors.ConnectionReconnectingError(),
    nats.errors.NoServersError(),
    nats.errors.StaleConnectionError(),
    nats.errors.UnexpectedEOF(),
    nats.errors.OutboundBufferLimitError(),
]
UNPARSED: list[BaseException] = [
    nats.errors.JsonParseError(),
    nats.errors.NotJSMessageError(),
    json.JSONDecodeError("Expecting value", "not json", 0),
    UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
]
NO_ANSWER: list[BaseException] = [
    nats.errors.NoRespondersError(),
    nats.js.errors.ServiceUnavailableError(),
    nats.js.errors.NoStreamResponseError(),
]
TIMEOUTS: list[BaseException] = [
    nats.errors.TimeoutError(),
    nats.errors.FlushTimeoutError(),
    nats.js.errors.FetchTimeoutError(),
    TimeoutError("timed out"),  # asyncio's and the socket's are this one
]
REFUSALS: list[BaseException] = [
    nats.js.errors.APIError(code=400, err_code=10058, description="stream name already in use"),
    nats.js.errors.NotFoundError(code=404, err_code=10059, description="stream not found"),
    nats.js.errors.BadRequestError(code=400, err_code=10003),
    nats.js.errors.ServerError(code=500, err_code=10052),
]
OTHERS: list[BaseException] = [
    nats.errors.BadSubjectError(),
    nats.errors.MaxPayloadError(),
    nats.errors.InvalidCallbackTypeError(),
    ConnectionResetError(104, "Connection reset by peer"),
    RuntimeError("boom"),
]


def _cases() -> list[Any]:
    """(what was raised, a JetStream request?, the error expected)."""
    rows: list[tuple[list[BaseException], type[BackbeatError], type[BackbeatError]]] = [
        (DOWN, NotConnected, NotConnected),
        (UNPARSED, WireError, WireError),
        (NO_ANSWER, JetStreamError, NotConnected),
        (TIMEOUTS, JetStreamError, NotConnected),
        (REFUSALS, JetStreamError, JetStreamError),
        (OTHERS, JetStreamError, NotConnected),
    ]
    return [
        pytest.param(exc, jetstream, js if jetstream else core, id=f"{type(exc).__name__}-{kind}")
        for excs, js, core in rows
        for exc in excs
        for jetstream, kind in ((True, "jetstream"), (False, "core"))
    ]


@pytest.mark.parametrize(("raised", "jetstream", "expected"), _cases())
def test_every_mapped_error_becomes_its_backbeat_error_from_the_cause(
    raised: BaseException, jetstream: bool, expected: type[BackbeatError]
) -> None:
    with pytest.raises(BackbeatError) as info, map_nats_errors("doing x", jetstream=jetstream):
        raise raised
    assert type(info.value) is expected
    assert info.value.__cause__ is raised
    assert str(info.value).startswith("doing x")


@pytest.mark.parametrize("refusal", REFUSALS, ids=lambda e: type(e).__name__)
def test_a_jetstream_refusal_keeps_its_code_and_description(
    refusal: BaseException,
) -> None:
    assert isinstance(refusal, nats.js.errors.APIError)
    mapped = backbeat_error("create S", refusal)
    assert isinstance(mapped, JetStreamError)
    assert mapped.code == refusal.err_code
    assert f"(code {refusal.err_code})" in str(mapped)
    if refusal.description:
        assert refusal.description in str(mapped)


@pytest.mark.parametrize("raised", [*UNPARSED], ids=lambda e: type(e).__name__)
def test_what_nats_py_could_not_parse_is_a_malformed_wire_error(raised: BaseException) -> None:
    mapped = backbeat_error("stream info of 'S'", raised, jetstream=True)
    assert isinstance(mapped, WireError)
    assert mapped.reason == "malformed"


def test_a_backbeat_error_and_cancellation_pass_unchanged() -> None:
    mine = NotConnected("already ours")
    with pytest.raises(NotConnected) as info, map_nats_errors("x"):
        raise mine
    assert info.value is mine
    assert info.value.__cause__ is None
    # asyncio's CancelledError is not an Exception: mapping it would swallow a cancellation
    with pytest.raises(asyncio.CancelledError), map_nats_errors("x", jetstream=True):
        raise asyncio.CancelledError


def test_every_nats_py_error_is_a_listed_failure() -> None:
    for exc in [*DOWN, *UNPARSED, *NO_ANSWER, *TIMEOUTS, *REFUSALS, *OTHERS[:-1]]:
        assert isinstance(exc, nats_failures()), exc


# --- what the bridge ignores --------------------------------------------------------------------
def test_an_ignored_failure_is_logged_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="backbeat_trio.transport")
    with ignore_nats_errors("unsubscribe 'a.b'", "the connection is going away anyway"):
        raise nats.errors.ConnectionClosedError
    (record,) = [r for r in caplog.records if "unsubscribe 'a.b'" in r.getMessage()]
    assert "ConnectionClosedError" in record.getMessage()
    assert "ignored: the connection is going away anyway" in record.getMessage()
    with ignore_nats_errors("close", "a known slip", also=(AttributeError,)):
        raise AttributeError("'NoneType' object has no attribute 'close'")


def test_what_is_not_a_known_failure_is_not_ignored_but_mapped() -> None:
    boom = asyncio.InvalidStateError("invalid state")
    with pytest.raises(NotConnected) as info, ignore_nats_errors("unsubscribe 'a'", "whatever"):
        raise boom
    assert info.value.__cause__ is boom


# --- the first connect's explanation ------------------------------------------------------------
URL = "nats://127.0.0.1:4222"


@pytest.mark.parametrize(
    ("raised", "seen"),
    [
        (nats.errors.AuthorizationError(), None),
        (nats.errors.InvalidUserCredentialsError(), None),
        (nats.errors.Error("nats: 'Authorization Violation'"), None),  # the server's -ERR
        (nats.errors.NoServersError(), nats.errors.Error("nats: 'Authentication Timeout'")),
    ],
    ids=["typed", "credentials-file", "server-err", "seen-by-the-callback"],
)
def test_refused_credentials_are_named(raised: BaseException, seen: BaseException | None) -> None:
    refusal = connect_refusal([URL], raised, seen)
    assert str(refusal).startswith(
        f"NATS at {URL} refused the credentials (authorization violation): "
    )


@pytest.mark.parametrize(
    ("raised", "seen"),
    [
        (ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] certificate required"), None),
        (nats.errors.NoServersError(), ssl.SSLCertVerificationError(1, "verify failed")),
        # nats-py's own types, whose text names neither SSL nor TLS
        (nats.errors.SecureConnFailedError(), None),
        (nats.errors.SecureConnRequiredError(), None),
        (nats.errors.SecureConnWantedError(), None),
        (nats.errors.Error("nats: no ssl context provided"), None),
    ],
    ids=["alert", "seen-by-the-callback", "failed", "required", "wanted", "no-context"],
)
def test_a_failed_tls_handshake_is_named(raised: BaseException, seen: BaseException | None) -> None:
    assert str(connect_refusal([URL], raised, seen)).startswith(f"TLS handshake with {URL} failed")


def test_any_other_failure_says_what_the_callback_saw() -> None:
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 4222)")
    refusal = connect_refusal([URL, "nats://b:4222"], nats.errors.NoServersError(), refused)
    assert str(refusal) == (
        f"could not connect to NATS at {URL}, nats://b:4222: "
        "ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 4222) "
        "(NoServersError: nats: no servers available for connection)"
    )
    # what the callback saw is not repeated when nats-py raised that very error
    reset = ConnectionResetError(104, "reset")
    assert str(connect_refusal([URL], reset, reset)).count("reset") == 1


# --- over a real nats-server ----------------------------------------------------------------------
@fail_on_bare_cancel
async def test_a_refused_connection_comes_out_mapped() -> None:
    url = f"nats://127.0.0.1:{closed_port()}"
    with trio.fail_after(10), pytest.raises(NotConnected) as info:
        async with open_nats_transport(ConnectionOptions(nats_url=url)):
            pass  # pragma: no cover
    assert str(info.value).startswith(f"could not connect to NATS at {url}: ")
    assert "ConnectionRefusedError" in str(info.value)
    assert isinstance(info.value.__cause__, nats.errors.NoServersError)


@fail_on_bare_cancel
async def test_what_nats_py_raises_unexpectedly_while_connecting_is_mapped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    boom = RuntimeError("nats-py broke")

    async def connect(self: Any, **kwargs: Any) -> None:
        raise boom

    monkeypatch.setattr(nats.aio.client.Client, "connect", connect)
    with trio.fail_after(10), pytest.raises(NotConnected) as info:
        async with open_nats_transport(ConnectionOptions(nats_url=URL)):
            pass  # pragma: no cover
    assert info.value.__cause__ is boom
    assert str(info.value) == f"connect to NATS at {URL} failed: RuntimeError: nats-py broke"


@pytest.mark.nats
@fail_on_bare_cancel
async def test_jetstream_failures_come_out_mapped(nats_url: str) -> None:
    async with open_nats_transport(ConnectionOptions(nats_url=nats_url)) as t:
        with trio.fail_after(10), pytest.raises(JetStreamError) as refused:
            await t.jetstream.stream_subscribe("no.such.subject", "NO_SUCH_STREAM")
        assert refused.value.code == 10059  # stream not found
        assert isinstance(refused.value.__cause__, nats.js.errors.NotFoundError)
        # a publish that no stream captures gets no PubAck: the outcome is unknown
        with trio.fail_after(10), pytest.raises(JetStreamError) as unanswered:
            await t.jetstream.kv_write("no_such_bucket", "k", b"v", last=0)
        assert unanswered.value.code is None
        assert isinstance(unanswered.value.__cause__, nats.js.errors.NoStreamResponseError)
        with trio.fail_after(10), pytest.raises(NotConnected) as bad:
            await t.subscribe("not a subject")
        assert isinstance(bad.value.__cause__, nats.errors.BadSubjectError)


@pytest.mark.nats
@fail_on_bare_cancel
async def test_a_reply_nats_py_cannot_parse_is_a_wire_error() -> None:
    # JetStream is off, so its API subjects are free: a peer answers them with garbage
    with NatsServerProcess(jetstream=False) as server:
        cfg = ConnectionOptions(nats_url=server.url)
        async with open_nats_transport(cfg) as t, open_nats_transport(cfg) as peer:
            api = await peer.subscribe("$JS.API.>", buffer=4)
            await peer.flush()

            async def answer_with_garbage() -> None:
                request = await api.messages.receive()
                peer.publish(request.reply, b"{not json")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer_with_garbage)
                with trio.fail_after(10), pytest.raises(WireError) as info:
                    await t.jetstream.stream_summary("ANY")
            assert info.value.reason == "malformed"
            assert isinstance(info.value.__cause__, json.JSONDecodeError)


@pytest.mark.nats
@fail_on_bare_cancel
async def test_an_unsubscribe_nats_py_fails_unexpectedly_is_mapped(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    boom = asyncio.InvalidStateError("nats-py broke")
    async with open_nats_transport(ConnectionOptions(nats_url=nats_url)) as t:
        sub = await t.subscribe("bridge.errors.unsub")

        async def unsubscribe(self: Any, limit: int = 0) -> None:
            raise boom

        with monkeypatch.context() as patch:
            patch.setattr(nats.aio.subscription.Subscription, "unsubscribe", unsubscribe)
            with trio.fail_after(10), pytest.raises(NotConnected) as info:
                await sub.unsubscribe()
        assert info.value.__cause__ is boom
