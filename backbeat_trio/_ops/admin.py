"""The admin server: health, readiness, Prometheus metrics, the tempo API, leader and bar history.

One ASGI app (:class:`AdminApp`) over the live views the services already keep; it never
publishes on NATS. A tempo change goes through the pulse's own
:class:`~backbeat_trio._services.pulse.TempoControl`, the code path a ``TempoChange`` on NATS
takes, so both get the same checks and the same answer.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .._core.edge import decode_json
from .._core.wire import TempoChange, decode
from .._errors import BackbeatError, ConfigError, WireError
from .._services.history import replay_bars
from .._services.lease import LeaseStatus
from .._services.reverb import ReverbStatus
from .._transport.base import Transport
from .asgi import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    decimal_digits,
    error_response,
    header,
    json_response,
    no_content,
    query_params,
    read_body,
    text_response,
)
from .guard import (
    AdminStatus,
    EventStreams,
    HostAllowlist,
    RefusalLog,
    authorization_failure,
    check_token,
)
from .metrics import PulseLike, Sources, make_registry, pulse_parts
from .readiness import pulse_ready, readiness
from .server import DEFAULT_BIND, parse_bind, serve_asgi

if TYPE_CHECKING:
    from .._client.client import Client
    from .._services.pulse import PulseStatus

__all__ = ["AdminApp", "serve_admin"]

log = logging.getLogger("backbeat_trio.admin")

#: ``/bars`` returns at most this many reports.
MAX_BARS: Final = 1000
DEFAULT_BARS: Final = 100
#: How long ``/bars`` waits for the bar stream before answering 504.
BARS_TIMEOUT_S: Final = 10.0
_TEMPO_FIELDS: Final = frozenset({"tempo_bpm", "reason"})
#: ``requested_by`` of every tempo change made through the admin API (the server sets it).
REQUESTED_BY: Final = "admin-api"
_TEMPO_TAG: Final = "backbeat.tempochange.v1"
_ENDPOINTS: Final = "/healthz, /readyz, /metrics, /tempo, /leader, /bars"

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

_AUTH_FAILURE_WORDS: Final = {
    "missing": "no Authorization header",
    "malformed": "an Authorization header that is not 'Bearer <token>'",
    "wrong": "a wrong bearer token",
}


class AdminApp:
    """The admin API as a raw ASGI 3 app (serve it with :func:`serve_asgi`).

    Args:
        sources: the live views it reports on.
        token: the bearer token ``POST /tempo`` needs; None makes the API read-only.
        fallback: the app that gets every request no admin route matches (the dashboard).
        hosts: the ``Host`` names it answers to (None: any, for an app not served on a socket).

    Attributes:
        status: what it refused (bad ``Authorization`` headers, bad ``Host``), for its metrics.
    """

    def __init__(
        self,
        sources: Sources,
        *,
        token: str | None = None,
        fallback: ASGIApp | None = None,
        hosts: HostAllowlist | None = None,
    ) -> None:
        self.sources = sources
        self.token = token or None
        self.fallback = fallback
        self.hosts = hosts
        self.status = AdminStatus(events=fallback if isinstance(fallback, EventStreams) else None)
        self._refusals = RefusalLog(log)
        self.registry = make_registry(sources, admin=self.status)
        self._routes: dict[str, dict[str, Handler]] = {
            "/healthz": {"GET": self._healthz},
            "/readyz": {"GET": self._readyz},
            "/metrics": {"GET": self._metrics},
            "/tempo": {"GET": self._get_tempo, "POST": self._post_tempo},
            "/leader": {"GET": self._leader},
            "/bars": {"GET": self._bars},
            # browsers ask for it on every page load; no icon, and no 404 in their consoles
            "/favicon.ico": {"GET": self._no_content, "HEAD": self._no_content},
        }

    def __repr__(self) -> str:
        mode = "read-write" if self.token else "read-only"
        return f"<AdminApp {self.sources.cluster_id} {mode} fallback={self.fallback is not None}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route one request (ASGI 3)."""
        if scope["type"] in ("http", "websocket") and not self._host_allowed(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await error_response(
                    send,
                    421,
                    "this admin server does not answer to that Host name (a name it should "
                    "answer to goes in --http-allow-host)",
                )
            return
        if scope["type"] != "http":
            if self.fallback is not None:
                await self.fallback(scope, receive, send)
            elif scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        path = scope.get("path", "/")
        methods = self._routes.get(path.rstrip("/") or "/")
        if methods is None:
            if self.fallback is not None:
                await self.fallback(scope, receive, send)
                return
            await error_response(send, 404, f"no such endpoint: {path} (try {_ENDPOINTS})")
            return
        handler = methods.get(scope.get("method", "GET"))
        if handler is None:
            allow = ", ".join(methods)
            await error_response(
                send, 405, f"{path} answers {allow} only", extra_headers=[("allow", allow)]
            )
            return
        await handler(scope, receive, send)

    def _host_allowed(self, scope: Scope) -> bool:
        if self.hosts is None:
            return True
        given = header(scope, "host")
        if self.hosts.allows(given):
            return True
        self.status.hosts_refused += 1
        self._refusals.warning(
            "host",
            "admin API: refused a request for Host %s from %s (allowed: %s)",
            "(none)" if given is None else repr(given[:80]),
            _peer(scope),
            self.hosts,
        )
        return False

    # --- probes ----------------------------------------------------------------------------------
    async def _healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        await json_response(send, 200, {"status": "ok"})

    def readiness(self) -> tuple[bool, str]:
        """Whether the services here are ready, and why (or why not)."""
        return readiness(self.sources)

    async def _readyz(self, scope: Scope, receive: Receive, send: Send) -> None:
        ready, reason = self.readiness()
        await json_response(send, 200 if ready else 503, {"ready": ready, "reason": reason})

    async def _no_content(self, scope: Scope, receive: Receive, send: Send) -> None:
        await no_content(send)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await text_response(send, 200, generate_latest(self.registry), CONTENT_TYPE_LATEST)

    # --- tempo -----------------------------------------------------------------------------------
    def _tempo_pulse(self) -> tuple[str, PulseLike] | None:
        pulses = dict(self.sources.pulses)
        for pid, st in pulses.items():
            if pulse_parts(st)[0].tempo_control is not None:
                return pid, st
        return next(iter(pulses.items()), None)

    async def _get_tempo(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._tempo_pulse()
        if found is None:
            await error_response(send, 404, "no pulse runs behind this admin server")
            return
        pid, status = found
        st, ha = pulse_parts(status)
        schedule = st.schedule
        pending = schedule.pending_tempo if schedule is not None else None
        await json_response(
            send,
            200,
            {
                "cluster_id": st.cluster_id,
                "pulse_id": pid,
                "tempo_bpm": schedule.tempo_bpm if schedule is not None else st.tempo_bpm,
                "pending_tempo_bpm": pending,
                "effective_beat": schedule.next_downbeat if schedule and pending else None,
                "beats_per_bar": st.beats_per_bar,
                "max_tempo_step": schedule.max_tempo_step if schedule is not None else None,
                "last_beat": st.last_beat,
                "publishing": self._publishing(st),
                "leader": ha.holder if ha is not None else pid,
                "writable": self.token is not None,
            },
        )

    def _publishing(self, st: PulseStatus) -> bool:
        # beats actually go out: this pulse publishes (an HA follower does not), its connection
        # is up and its latest beat is recent; a pulse skipping beats while NATS is down is not
        transport = self.sources.transport
        if st.tempo_control is None or (transport is not None and not transport.connected):
            return False
        return pulse_ready(st)[0]

    async def _post_tempo(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._tempo_pulse()
        if found is None:
            await error_response(send, 404, "no pulse runs behind this admin server")
            return
        if self.token is None:
            await error_response(
                send,
                403,
                "the admin API is read-only: no admin token is configured "
                "(--http-token-file or BACKBEAT_HTTP_TOKEN)",
            )
            return
        failure = authorization_failure(header(scope, "authorization"), self.token)
        if failure is not None:
            self.status.auth_failures[failure] += 1
            self._refusals.warning(
                failure,
                "admin API: refused POST /tempo from %s: %s",
                _peer(scope),
                _AUTH_FAILURE_WORDS[failure],
            )
            await error_response(
                send,
                401,
                "POST /tempo needs 'Authorization: Bearer <admin token>'",
                extra_headers=[("www-authenticate", 'Bearer realm="backbeat"')],
            )
            return
        body = await read_body(scope, receive)
        if body is None:
            await error_response(send, 413, "the request body is larger than 4096 bytes")
            return
        change_or_reason = _tempo_change(body, self.sources.cluster_id)
        if isinstance(change_or_reason, str):
            await json_response(send, 400, _answer(False, change_or_reason, None))
            return
        pid, status = found
        st, ha = pulse_parts(status)
        control = st.tempo_control
        if control is None:
            leader = ha.holder if ha is not None else None
            where = f"; the lease holder is {leader}" if leader else ""
            await error_response(send, 409, f"{pid} is not publishing{where}")
            return
        try:
            decision = control.request(change_or_reason)
        except WireError as exc:
            await json_response(send, 400, _answer(False, str(exc), None))
            return
        answer = _answer(decision.accepted, decision.reason, decision.effective_beat)
        await json_response(send, 200 if decision.accepted else 422, answer)

    # --- HA and history --------------------------------------------------------------------------
    async def _leader(self, scope: Scope, receive: Receive, send: Send) -> None:
        out: dict[str, Any] = {}
        pulse_leases = {
            pid: ha for pid, st in dict(self.sources.pulses).items() if (ha := pulse_parts(st)[1])
        }
        if pulse_leases:
            out["pulse"] = _lease_view(pulse_leases)
        reverb_leases = {
            rid: st.lease for rid, st in dict(self.sources.reverbs).items() if st.lease is not None
        }
        if reverb_leases:
            out["reverb"] = _lease_view(reverb_leases)
        if not out:
            await error_response(send, 404, "no HA pulse or HA reverb runs behind this server")
            return
        await json_response(send, 200, out)

    async def _bars(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = self.sources.transport
        if transport is None:
            await error_response(send, 404, "no NATS connection here to read bar history from")
            return
        params = query_params(scope)
        limit = _int_param(params, "limit", DEFAULT_BARS)
        since = _int_param(params, "since", None)
        if isinstance(limit, str) or isinstance(since, str):
            await error_response(send, 400, limit if isinstance(limit, str) else str(since))
            return
        if limit is None or not 1 <= limit <= MAX_BARS:
            await error_response(send, 400, f"limit must be in 1..{MAX_BARS}, got {limit}")
            return
        if since is None:
            since = self._recent_start(limit)
        try:
            with trio.fail_after(BARS_TIMEOUT_S):
                reports = await replay_bars(
                    transport, self.sources.cluster_id, since_beat=since, limit=limit
                )
        except trio.TooSlowError:
            await error_response(send, 504, "the bar stream did not answer in time")
            return
        except BackbeatError as exc:
            await error_response(send, 503, f"bar history unavailable: {exc}")
            return
        await json_response(send, 200, {"since": since, "count": len(reports), "reports": reports})

    def _recent_start(self, limit: int) -> int:
        # without ?since: the latest ``limit`` windows a reverb here has seen (else from beat 0)
        latest = [st.latest for st in dict(self.sources.reverbs).values() if st.latest]
        if not latest:
            return 0
        newest = max(latest, key=lambda r: r.to_beat)
        span = newest.to_beat - newest.from_beat + 1
        return max(0, newest.from_beat - (limit - 1) * span)


# --- helpers --------------------------------------------------------------------------------------
def _answer(accepted: bool, reason: str, effective_beat: int | None) -> dict[str, Any]:
    # the body the pulse replies with on NATS
    return {"accepted": accepted, "reason": reason, "effective_beat": effective_beat}


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    if not client:
        return "an unknown peer"
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _tempo_change(body: bytes, cluster_id: str) -> TempoChange | str:
    """The request as a ``TempoChange`` decoded with the wire rules, or why it is refused."""
    try:
        fields = decode_json(body, "request body")
    except WireError as exc:
        return f"malformed JSON: {exc}"
    if not isinstance(fields, dict):
        return 'expected a JSON object like {"tempo_bpm": 66, "reason": "..."}'
    if "requested_by" in fields:
        # who asked is the server's to say, not the caller's: a change made here is "admin-api"
        return (
            f"requested_by is set by the server ({REQUESTED_BY!r}); say who asks and why in reason"
        )
    unknown = sorted(set(fields) - _TEMPO_FIELDS)
    if unknown:
        return f"unknown field(s) {unknown}; expected {sorted(_TEMPO_FIELDS)}"
    if "tempo_bpm" not in fields:
        return "tempo_bpm is required"
    message = {
        "type": _TEMPO_TAG,
        "cluster_id": cluster_id,
        **fields,
        "requested_by": REQUESTED_BY,
    }
    try:
        return decode(msgspec.json.encode(message), TempoChange)
    except WireError as exc:
        return str(exc)


def _int_param(params: dict[str, list[str]], name: str, default: int | None) -> int | str | None:
    values = params.get(name)
    if not values:
        return default
    text = values[-1]
    if not decimal_digits(text) or len(text) > 19:
        return f"{name} must be an int >= 0, got {text!r}"
    return int(text)


def _lease_view(leases: Mapping[str, LeaseStatus]) -> dict[str, Any]:
    # the freshest view among the instances here: the one that saw the latest revision
    newest = max(leases.values(), key=lambda st: st.lease_revision or 0)
    now_wall = time.time()
    expires_at = newest.expires_at
    changes = sorted(
        (c for st in leases.values() for c in st.changes), key=lambda c: (c.wall, c.at)
    )[-20:]
    return {
        "holder": newest.holder,
        "revision": newest.lease_revision,
        "released": newest.released,
        "expires_at": expires_at,
        "expires_in_s": None if expires_at is None else round(expires_at - now_wall, 3),
        "ttl_s": newest.timings.ttl,
        "instances": {
            iid: {
                "role": st.role,
                "terms": st.terms,
                "revision": st.lease_revision,
                "kv_errors": st.kv_errors,
            }
            for iid, st in leases.items()
        },
        "changes": [
            {
                "wall": c.wall,
                "instance": c.pulse_id,
                "role": c.role,
                "holder": c.holder,
                "next_beat": c.next_beat,
                "reason": c.reason,
            }
            for c in changes
        ],
    }


# --- the service ----------------------------------------------------------------------------------
def _keyed(value: Any, kind: Any, id_attr: str, default: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return value  # type: ignore[return-value]
    if not isinstance(value, kind):
        raise ConfigError(default, f"must be a status object or a mapping of them, got {value!r}")
    key = getattr(value, id_attr, "") or default
    return {key: value}


async def serve_admin(
    bind: str = DEFAULT_BIND,
    *,
    pulse: PulseLike | Mapping[str, PulseLike] | None = None,
    reverb: ReverbStatus | Mapping[str, ReverbStatus] | None = None,
    clients: Sequence[Client] | Callable[[], Sequence[Client]] = (),
    transport: Transport | None = None,
    cluster_id: str | None = None,
    token: str | None = None,
    fallback: ASGIApp | None = None,
    allowed_hosts: Sequence[str] = (),
    listener: socket.socket | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin API for the services given, until cancelled.

    See :func:`backbeat_trio.serve_admin`; ``listener`` is a socket
    :func:`~backbeat_trio._ops.server.bind_listener` bound to ``bind`` before the services
    started (the command line's order: a refused address stops it before they publish).
    """
    from .._services.ha_pulse import HAPulseStatus
    from .._services.pulse import PulseStatus

    pulses = _keyed(pulse, PulseStatus | HAPulseStatus, "pulse_id", "pulse")
    reverbs = _keyed(reverb, ReverbStatus, "reverb_id", "reverb")
    client_source: Callable[[], Sequence[Client]] = (
        clients if callable(clients) else (lambda: tuple(clients))
    )
    if cluster_id is None:
        known = [pulse_parts(st)[0].cluster_id for st in pulses.values()]
        known += [st.cluster_id for st in reverbs.values()]
        known += [c.config.cluster_id for c in client_source()]
        if not known:
            raise ConfigError("cluster_id", "give cluster_id, or a pulse, reverb or client")
        cluster_id = known[0]
    if token:
        check_token(token)
    elif token is not None and not isinstance(token, str):
        raise ConfigError("token", "must be a string")
    if isinstance(allowed_hosts, str):
        raise ConfigError("allowed_hosts", "must be a sequence of names, not one string")
    hosts = HostAllowlist(parse_bind(bind)[0], allowed_hosts)
    sources = Sources(
        cluster_id=cluster_id,
        pulses=pulses,
        reverbs=reverbs,
        clients=client_source,
        transport=transport,
    )
    app = AdminApp(sources, token=token, fallback=fallback, hosts=hosts)
    await serve_asgi(app, bind, listener=listener, task_status=task_status)
