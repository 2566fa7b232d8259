"""The little the admin server needs on top of raw ASGI 3: the request's path and query, a body
read with a size cap, and JSON/text answers.

Hypercorn parses HTTP; these helpers only read the ASGI scope and speak ASGI events.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import parse_qs

import msgspec

__all__ = [
    "ASGIApp",
    "Receive",
    "Scope",
    "Send",
    "answer_lifespan",
    "decimal_digits",
    "error_response",
    "header",
    "json_response",
    "no_content",
    "query_params",
    "read_body",
    "text_response",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The largest request body the admin API reads (a tempo request is well under 1 KiB).
MAX_BODY_BYTES: Final = 4096

_json: Final = msgspec.json.Encoder()


def decimal_digits(text: str) -> bool:
    """True when ``text`` is ASCII digits only (``str.isdigit`` also takes '²' and '٣', which
    ``int()`` then refuses)."""
    return text.isascii() and text.isdigit()


def header(scope: Scope, name: str) -> str | None:
    """The value of request header ``name`` (case-insensitive; the first one), or None."""
    wanted = name.lower().encode("latin-1")
    for key, value in scope.get("headers", ()):
        if bytes(key).lower() == wanted:
            return bytes(value).decode("latin-1")
    return None


def query_params(scope: Scope) -> dict[str, list[str]]:
    """The query string's parameters (``?since=4&since=8`` gives ``{"since": ["4", "8"]}``)."""
    raw = bytes(scope.get("query_string", b"")).decode("latin-1")
    return parse_qs(raw, keep_blank_values=True)


async def read_body(scope: Scope, receive: Receive, limit: int = MAX_BODY_BYTES) -> bytes | None:
    """The request body, or None when it is longer than ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before anything is read; a body
    without one is read only up to the limit.
    """
    declared = header(scope, "content-length")
    if declared is not None and decimal_digits(declared.strip()) and int(declared) > limit:
        return None
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body", False):
            break
    return bytes(body)


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """Answer an ASGI ``lifespan`` scope: nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def text_response(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    extra_headers: Iterable[tuple[str, str]] = (),
    *,
    head: bool = False,
) -> None:
    """Answer with ``body`` as it is (``head``: its headers only, for a HEAD request)."""
    headers = [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode("latin-1")),
        (b"cache-control", b"no-store"),
    ]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def no_content(send: Send) -> None:
    """Answer ``204 No Content`` (no body, so no ``Content-Length`` either)."""
    await send(
        {"type": "http.response.start", "status": 204, "headers": [(b"cache-control", b"no-store")]}
    )
    await send({"type": "http.response.body", "body": b""})


async def json_response(
    send: Send, status: int, obj: object, extra_headers: Iterable[tuple[str, str]] = ()
) -> None:
    """Answer with ``obj`` as JSON (msgspec's encoding: Structs, datetimes, dicts...)."""
    await text_response(send, status, _json.encode(obj), "application/json", extra_headers)


async def error_response(
    send: Send, status: int, reason: str, extra_headers: Iterable[tuple[str, str]] = ()
) -> None:
    """Answer a refused request: ``{"error": <status phrase>, "reason": reason}``."""
    await json_response(
        send, status, {"error": HTTPStatus(status).phrase, "reason": reason}, extra_headers
    )
