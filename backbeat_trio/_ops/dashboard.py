"""The live dashboard: a raw ASGI 3 app (the page, its script and style, a server-sent events
stream) fed by a task that follows a cluster's beat and bar subjects and the claims a reverb
accepted (never the status subject itself: what the page shows of an agent is what the reverb
verified).

What the page shows is kept by :class:`~backbeat_trio._core.dashboard.DashboardState` (sans-IO);
this module only moves messages in and events out. It imports no HTTP server: any ASGI server on
trio runs it (``serve_asgi`` runs it with hypercorn's trio worker).
"""

from __future__ import annotations

import importlib.resources
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio

from .._core.beats import bar_subject, beat_subject
from .._core.dashboard import DashboardState, Delta
from .._transport.base import Subscription, Transport
from .._util.channel import DropOldestChannel
from .asgi import Receive, Scope, Send, answer_lifespan, no_content, text_response

if TYPE_CHECKING:
    from .._services.reverb import ReverbStatus

__all__ = ["Dashboard"]

log = logging.getLogger("backbeat_trio.dashboard")

_STATIC_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# the page loads nothing from elsewhere and runs no inline script
_PAGE_HEADERS: Final = [
    ("content-security-policy", "default-src 'self'; img-src 'self' data:"),
    ("x-content-type-options", "nosniff"),
]  # (and cache-control: no-store, which every answer carries)
_json: Final = msgspec.json.Encoder()
#: How often the dashboard looks for a running reverb when it follows none.
_REVERB_POLL_S: Final = 0.25
#: Accepted claims buffered between a reverb and the dashboard (the oldest go first).
_CLAIM_BUFFER: Final = 1024


def _static_files() -> dict[str, tuple[bytes, str]]:
    folder = importlib.resources.files(__package__ or "backbeat_trio._ops") / "static"
    files: dict[str, tuple[bytes, str]] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _STATIC_TYPES:
            files[entry.name] = (entry.read_bytes(), _STATIC_TYPES[suffix])
    return files


class Dashboard:
    """The live dashboard of one cluster: ``await nursery.start(dashboard.run, transport,
    reverb=status)`` to follow the cluster, and serve ``dashboard`` (an ASGI app) with any ASGI
    server on trio.

    Routes: ``GET /`` (the page), ``GET /static/<file>`` (its script and style),
    ``GET /events`` (``text/event-stream``: a ``snapshot`` event, then ``beat``, ``agent``,
    ``report``, ``handover`` and ``malformed`` deltas, a comment line as a heartbeat); anything
    else is a 404 (a 405 for another method than GET/HEAD).

    Each ``/events`` connection has its own buffer of ``client_buffer`` updates: a browser that
    reads too slowly loses its own oldest updates (counted in :attr:`updates_dropped`) and gets a
    fresh snapshot instead, never holding up the others.

    Args:
        cluster_id: the cluster to show.
        history: how many bar reports and HA hand-overs the page keeps.
        beats_per_bar: the bar length, if known (else taken from the bar reports).
        client_buffer: updates buffered per ``/events`` connection.
        heartbeat_s: seconds between heartbeat comments on an idle ``/events`` stream.
        max_streams: ``/events`` connections served at once; one more gets a 503 with a JSON
            reason (each stream costs a task and a buffer).

    Attributes:
        state: the :class:`DashboardState` the page shows.
        streams_opened: ``/events`` connections served so far.
        streams_refused: ``/events`` connections refused (``max_streams`` were open).
        updates_dropped: updates slow browsers lost (each then got a snapshot).
        subscription_dropped: messages each subscription's full buffer dropped, by subject.
        claims_dropped: accepted claims lost because the dashboard fell behind the reverb.
    """

    def __init__(
        self,
        cluster_id: str,
        *,
        history: int = 8,
        beats_per_bar: int | None = None,
        client_buffer: int = 256,
        heartbeat_s: float = 5.0,
        max_streams: int = 64,
    ) -> None:
        if client_buffer < 1:
            raise ValueError("client_buffer must be >= 1")
        if max_streams < 1:
            raise ValueError("max_streams must be >= 1")
        self._max_streams = max_streams
        self.state = DashboardState(cluster_id, history=history, beats_per_bar=beats_per_bar)
        self.cluster_id = cluster_id
        self._client_buffer = client_buffer
        self._heartbeat_s = heartbeat_s
        self._streams: set[DropOldestChannel[Delta]] = set()
        self._static: dict[str, tuple[bytes, str]] | None = None
        self.streams_opened = 0
        self.streams_refused = 0
        self.updates_dropped = 0
        self.subscription_dropped: dict[str, int] = {}
        self.claims_dropped = 0

    def __repr__(self) -> str:
        return (
            f"<Dashboard {self.cluster_id!r} streams={len(self._streams)} "
            f"dropped={self.updates_dropped} {self.state!r}>"
        )

    @property
    def streams(self) -> int:
        """``/events`` connections open now."""
        return len(self._streams)

    # --- following the cluster ------------------------------------------------------------------
    async def run(
        self,
        transport: Transport,
        *,
        reverb: ReverbStatus | Mapping[str, ReverbStatus] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow the cluster's beat and bar subjects and ``reverb``'s claims until cancelled.

        Args:
            transport: a connected transport; it is used, never closed.
            reverb: where agent rows come from: a reverb's status (what ``run_reverb`` hands to
                ``nursery.start``) or a live mapping of them by id (HA reverbs; a restarted one
                replaces its entry). The dashboard follows one that runs, preferring the one
                publishing, and another when it stops. Without one the page shows no agents:
                the status subject is never read directly, since anyone allowed to publish on
                it could write any row.
            task_status: ``nursery.start`` returns once both subscriptions exist.
        """
        cluster = self.cluster_id
        state = self.state
        handlers: list[tuple[str, Callable[[Any], list[Delta]]]] = [
            (
                beat_subject(cluster),
                lambda m: state.on_beat(m.data, arrival=trio.current_time(), wall=time.time()),
            ),
            (bar_subject(cluster), lambda m: state.on_report(m.data, wall=time.time())),
        ]
        subs: list[Subscription] = []
        try:
            for subject, _ in handlers:
                subs.append(await transport.subscribe(subject))
            async with trio.open_nursery() as nursery:
                for sub, (_, handle) in zip(subs, handlers, strict=True):
                    nursery.start_soon(self._follow, sub, handle)
                if reverb is not None:
                    nursery.start_soon(self._follow_claims, reverb)
                task_status.started()
        finally:
            with trio.move_on_after(1.0, shield=True):
                for sub in subs:
                    await sub.unsubscribe()

    async def _follow_claims(self, source: ReverbStatus | Mapping[str, ReverbStatus]) -> None:
        while True:
            reverb = _running_reverb(source)
            if reverb is not None:
                async with reverb.watch_claims(_CLAIM_BUFFER) as watch:
                    dropped = 0
                    async for accepted in watch:
                        self.claims_dropped += watch.dropped - dropped
                        dropped = watch.dropped
                        self._fan_out(
                            self.state.on_claim(
                                accepted.claim,
                                signed=accepted.signed,
                                key=accepted.key,
                                wall=accepted.wall,
                            )
                        )
            # none runs, or the one followed stopped: look again shortly
            await trio.sleep(_REVERB_POLL_S)

    async def _follow(self, sub: Subscription, handle: Callable[[Any], list[Delta]]) -> None:
        async for msg in sub.messages:
            self.subscription_dropped[sub.subject] = sub.dropped
            self._fan_out(handle(msg))
        if sub.failure is not None:
            raise sub.failure
        # the transport went away under us; the page keeps showing the last state
        log.warning("dashboard: the subscription to %s ended", sub.subject)

    def _fan_out(self, deltas: list[Delta]) -> None:
        for delta in deltas:
            for stream in self._streams:
                before = stream.dropped
                stream.put(delta)
                self.updates_dropped += stream.dropped - before

    # --- ASGI -------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI 3 application."""
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1000})
            return
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, b'{"error":"Method Not Allowed"}', "application/json")
            return
        head = method == "HEAD"
        if path == "/events":
            if head:
                await _respond(send, 200, b"", "text/event-stream; charset=utf-8", head=True)
            elif len(self._streams) >= self._max_streams:
                self.streams_refused += 1
                body = _json.encode(
                    {
                        "error": "Service Unavailable",
                        "reason": f"{len(self._streams)} event streams are open, the most served",
                    }
                )
                await _respond(send, 503, body, "application/json")
            else:
                await self._events(receive, send)
            return
        if path == "/favicon.ico":
            # browsers ask for it on every page load: no icon, and no 404 in their consoles
            await no_content(send)
            return
        static = self._static if self._static is not None else _static_files()
        self._static = static
        found: tuple[bytes, str] | None = None
        if path in ("/", "/index.html"):
            found = static.get("dashboard.html")
        elif path.startswith("/static/"):
            found = static.get(path.removeprefix("/static/"))
        if found is None:
            body = _json.encode({"error": "Not Found", "reason": f"no route for {path!r}"})
            await _respond(send, 404, body, "application/json")
            return
        await _respond(send, 200, found[0], found[1], head=head)

    async def _events(self, receive: Receive, send: Send) -> None:
        stream: DropOldestChannel[Delta] = DropOldestChannel(self._client_buffer, name="sse")
        self._streams.add(stream)
        self.streams_opened += 1
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"x-accel-buffering", b"no"),
                        (b"x-content-type-options", b"nosniff"),
                        (b"cache-control", b"no-store"),
                    ],
                }
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_end_on_disconnect, receive, nursery.cancel_scope)
                await self._stream(stream, send)
        finally:
            self._streams.discard(stream)
            stream.close()

    async def _stream(self, stream: DropOldestChannel[Delta], send: Send) -> None:
        async def emit(delta: Delta) -> None:
            await send({"type": "http.response.body", "body": _sse(delta), "more_body": True})

        # retry: the browser reconnects 2 s after the stream drops (EventSource does it itself)
        await send({"type": "http.response.body", "body": b"retry: 2000\n\n", "more_body": True})
        snapshot = self.state.snapshot()
        await emit(snapshot)
        floor = snapshot["seq"]
        drops_seen = 0
        while True:
            delta: Delta | None = None
            with trio.move_on_after(self._heartbeat_s):
                delta = await stream.receive()
            if delta is None:
                await send(
                    {"type": "http.response.body", "body": b": heartbeat\n\n", "more_body": True}
                )
                continue
            if stream.dropped != drops_seen:
                # this browser fell behind and lost updates: a snapshot says it all again
                drops_seen = stream.dropped
                snapshot = self.state.snapshot()
                await emit(snapshot)
                floor = snapshot["seq"]
                continue
            if delta["seq"] > floor:
                await emit(delta)


def _running_reverb(source: ReverbStatus | Mapping[str, ReverbStatus]) -> ReverbStatus | None:
    candidates = list(source.values()) if isinstance(source, Mapping) else [source]
    running = [status for status in candidates if status.running]
    return next((status for status in running if status.publishing), None) or next(
        iter(running), None
    )


def _sse(delta: Delta) -> bytes:
    # JSON has no raw newlines, so the data is one line
    return b"event: %s\nid: %d\ndata: %s\n\n" % (
        delta["type"].encode(),
        delta["seq"],
        _json.encode(delta),
    )


async def _end_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def _respond(
    send: Send, status: int, body: bytes, content_type: str, *, head: bool = False
) -> None:
    await text_response(send, status, body, content_type, _PAGE_HEADERS, head=head)
