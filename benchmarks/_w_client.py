"""Worker: backbeat_trio clients (``open_client``) in their own process.

Roles (argv JSON ``role``):

* ``beats``: for each ``sub`` command, a fresh client on the given cluster; the consumer of
  ``beats()`` notes ``time.time()`` as each frame comes out of the channel. Frames from the pulse
  give the beat latency; after the pulse stops, the locally synthesised frames give the degraded
  schedule error.
* ``claims``: signed/unsigned/JetStream ``emit_status`` throughput from one client.
* ``scale``: N clients in this one process; CPU per agent-beat, RSS per client, latency
  (with ``raw_latencies``, every window's latencies too, for the orchestrator to merge
  several processes' windows).
* ``recovery``: a JetStream-mode client (that also consumes beats) and a core-mode client emitting
  claims while the orchestrator kills and restarts nats-server.
"""

from __future__ import annotations

import array
import contextlib
import functools
import gc
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import trio_asyncio

from backbeat_trio import (
    BeatFrame,
    Config,
    DropOldestChannel,
    StatusClaim,
    UndeliveredClaims,
    generate_signing_key,
    open_client,
)
from backbeat_trio._bridge.nats import open_nats_transport
from backbeat_trio._core.beats import beat_subject, status_stream_name, status_subject
from backbeat_trio._core.hlc import node_id_for
from backbeat_trio._core.intake import FrameScreen
from backbeat_trio._transport.base import Message
from benchmarks._proto import args, log, read_commands, send
from benchmarks._stats import percentile

PULSE_NODE = node_id_for("bench-pulse")

CLAIM = StatusClaim(
    task_id="task:bench", state="executing", beats_left=3, progress=0.5, notes="benchmark"
)


def _is_pulse_frame(hlc: str) -> bool:
    return int(hlc.rsplit(":", 1)[-1], 16) == PULSE_NODE


# --------------------------------------------------------------------------------------- beats
async def _beats_once(url: str, cmd: dict[str, Any]) -> None:
    cluster = str(cmd["cluster"])
    n_real = int(cmd["n_real"])
    n_degraded = int(cmd["n_degraded"])
    tempo = int(cmd["tempo"])
    duration = 60.0 / tempo
    last_index = n_real + n_degraded - 1
    cfg = Config(cluster_id=cluster, agent_id="bench-bb", nats_url=url, jetstream=False)
    recs: list[tuple[float, int, float, bool]] = []
    async with open_client(cfg) as bb:
        chan = bb.beats(buffer=256)
        await trio.sleep(0.05)  # let the SUB reach the server before the pulse is told to go
        send({"event": "ready"})
        with trio.move_on_after((n_real + n_degraded) * duration + 20.0):
            async for frame in chan:
                wall = time.time()
                deadline = frame.deadline_at.timestamp()
                recs.append((wall, frame.beat_index, deadline, _is_pulse_frame(frame.hlc)))
                if frame.beat_index >= last_index:
                    break
        metrics = bb.metrics
    real = [r for r in recs if r[3]]
    latencies = [wall - (deadline - duration) for wall, _, deadline, _ in real]
    degraded_errors: list[float] = []
    degraded_indices: list[int] = []
    if real:
        _, idx_last, deadline_last, _ = real[-1]
        start_last = deadline_last - duration
        for wall, idx, _, is_real in recs:
            if not is_real and idx > idx_last:
                degraded_indices.append(idx)
                degraded_errors.append(wall - (start_last + (idx - idx_last) * duration))
    send(
        {
            "event": "result",
            "latencies": latencies,
            "degraded_errors": degraded_errors,
            "degraded_indices": degraded_indices,
            "real_frames": len(real),
            "real_indices": [idx for _, idx, _, _ in real],
            "real_walls": [wall for wall, _, _, _ in real],
            "metrics": {
                "stale": metrics.stale,
                "dropped": metrics.dropped,
                "degraded_beats": metrics.degraded_beats,
                "transport_dropped": metrics.transport_dropped,
            },
        }
    )


# -------------------------------------------------------------------------------------- claims
async def _claims_once(url: str, cmd: dict[str, Any]) -> dict[str, Any]:
    mode = str(cmd["mode"])
    count = int(cmd["count"])
    reps = int(cmd["reps"])
    cluster = str(cmd["cluster"])
    jetstream = mode == "js"
    if jetstream:
        admin = Config(cluster_id=cluster, agent_id="bench-admin", nats_url=url)
        async with open_nats_transport(admin) as t:
            await t.jetstream.ensure_stream(status_stream_name(cluster), [status_subject(cluster)])
    cfg = Config(
        cluster_id=cluster,
        agent_id="bench-claims",
        nats_url=url,
        signing_key=None if mode == "unsigned" else generate_signing_key(),
        jetstream=jetstream,
        outbox_size=max(10_000, 2 * count),
    )
    rates: list[float] = []
    emit_rates: list[float] = []
    cpu_per_claim: list[float] = []
    async with open_client(cfg) as bb:
        emit = bb.emit_status
        # repetition 0 is an untimed warm-up of 200 claims (the baseline has one too): what a
        # fresh client or connection does once is not timed as if it were per claim
        for rep in range(reps + 1):
            n = count if rep else min(200, count)
            gc.collect()
            await trio.sleep(0.1)
            acked0 = bb.metrics.claims_ok
            c0 = time.process_time()
            t0 = time.perf_counter()
            for _ in range(n):
                await emit(CLAIM)
            t_emit = time.perf_counter()
            with trio.move_on_after(120.0):
                await bb.flush_claims()
            t1 = time.perf_counter()
            c1 = time.process_time()
            done = bb.metrics.claims_ok - acked0
            if done < n:
                log(f"claims {mode}: only {done}/{n} delivered")
            if rep:
                rates.append(done / (t1 - t0))
                emit_rates.append(n / (t_emit - t0))
                cpu_per_claim.append((c1 - c0) / n)
        metrics = bb.metrics
    return {
        "event": "result",
        "rates": rates,
        "emit_rates": emit_rates,
        "cpu_per_claim": cpu_per_claim,
        "republished": metrics.claims_republished,
        "mode": bb.delivery_mode,
    }


async def _claims_answered(url: str, cmd: dict[str, Any]) -> None:
    send(await _claims_once(url, cmd))


# --------------------------------------------------------------------------------------- scale
class _WarningCount(logging.Handler):
    """Counts the records at WARNING or above (and keeps the first texts)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.texts) < 5:
            self.texts.append(record.getMessage()[:200])


async def _role_scale(a: dict[str, Any], cmds: trio.MemoryReceiveChannel[dict[str, Any]]) -> None:
    import psutil

    url = str(a["url"])
    cluster = str(a["cluster"])
    n = int(a["n"])
    windows = int(a["windows"])
    window_beats = int(a["window_beats"])
    tempo = int(a["tempo"])
    raw = bool(a.get("raw_latencies", False))
    duration = 60.0 / tempo
    proc = psutil.Process()
    while (await cmds.receive())["cmd"] != "go":
        pass
    # "join_storm": the pulse already beats when the clients join; what the library logs at
    # WARNING or above meanwhile and after is counted (a busy process is not a silent pulse)
    warnings = _WarningCount()
    logging.getLogger("backbeat_trio").addHandler(warnings)
    gc.collect()
    rss0 = proc.memory_info().rss
    # arrival wall minus scheduled start, per agent-beat: numbers in an array, so recording
    # allocates nothing the garbage collector tracks (a list of tuples kept ~10k new objects a
    # second alive and drove full collections of the whole process)
    recs = array.array("d")
    clients: list[Any] = []
    all_ready = trio.Event()

    # "shared": every client on one connection (open_client(cfg, transport=conn)), else one
    # connection each
    conn: Any = None

    async def agent(i: int) -> None:
        cfg = Config(
            cluster_id=cluster,
            agent_id=f"agent-{i}",
            nats_url=url,
            jetstream=False,
            connect_attempts=3,
        )
        # one task per agent, the shape of the README's agent (as baseline A's agent is one
        # subscription with its callback); the nursery's cancellation at the end stops them all
        # shared: handed the connection, each client takes its own view of it and joins the
        # connection's one beat subscription
        async with open_client(cfg, transport=conn) as bb:
            clients.append(bb)
            if len(clients) == n:
                all_ready.set()
            async for frame in bb.beats(buffer=64):
                recs.append(time.time() - (frame.deadline_at.timestamp() - 60.0 / frame.tempo_bpm))

    # "floor": no client at all. One subscription; each frame decoded once and put in each
    # agent's DropOldestChannel, whose consumer records it as the agents' consumers do: what a
    # trio task per agent costs before any client work (the lower bound of "shared")
    floor = bool(a.get("floor"))
    chans: list[DropOldestChannel[BeatFrame]] = []

    async def floor_consumer(chan: DropOldestChannel[BeatFrame]) -> None:
        async for frame in chan:
            recs.append(time.time() - (frame.deadline_at.timestamp() - 60.0 / frame.tempo_bpm))

    screen = FrameScreen(cluster, Config(cluster_id=cluster, agent_id="floor").max_frame_bytes)

    def floor_fan_out(msg: Message) -> None:
        screened = screen(msg.data, 0.0, 0.0)  # decoded and screened once, as the clients' is
        if screened is not None:
            for chan in chans:
                chan.put(screened.frame)

    result: dict[str, Any] = {"event": "result"}
    async with contextlib.AsyncExitStack() as shared_stack, trio.open_nursery() as nursery:
        t_connect = time.perf_counter()
        if a.get("shared") or floor:
            conn = await shared_stack.enter_async_context(
                open_nats_transport(Config(cluster_id=cluster, agent_id="shared", nats_url=url))
            )
        if floor:
            chans.extend(DropOldestChannel[BeatFrame](64) for _ in range(n))
            for chan in chans:
                nursery.start_soon(floor_consumer, chan)
            await conn.subscribe(beat_subject(cluster), buffer=1, handler=floor_fan_out)
            await conn.flush()
        else:
            for i in range(n):
                nursery.start_soon(agent, i)
            with trio.fail_after(120.0):
                await all_ready.wait()
        t_connect = time.perf_counter() - t_connect
        await trio.sleep(0.2)
        gc.collect()
        if a.get("gc_freeze"):
            # what docs/scale.md §6 suggests for thousands of agents: the clients' long-lived
            # objects leave the collector's full passes
            gc.freeze()
        rss1 = proc.memory_info().rss
        send({"event": "ready", "connect_s": t_connect})

        def beats_now() -> int:
            return len(recs) if floor else sum(c.metrics.beats for c in clients)

        def local_now() -> int:
            return 0 if floor else sum(c.metrics.degraded_beats for c in clients)

        # the orchestrator starts the pulse now; settle on a few beats first
        with trio.fail_after(30.0):
            for _ in range(10_000):  # (bounded by the deadline; no event for a count)
                if beats_now() >= 3 * n:
                    break
                await trio.sleep(duration / 4)
        cpu_us: list[float] = []
        p99: list[float] = []
        p50: list[float] = []
        delivered: list[int] = []
        local: list[int] = []
        cpu_s: list[float] = []
        window_lat: list[list[float]] = []
        # the garbage collector's pauses: (started at, total, longest) of the current window
        pauses = [0.0, 0.0, 0.0]

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                pauses[0] = time.perf_counter()
            else:
                took = time.perf_counter() - pauses[0]
                pauses[1] += took
                pauses[2] = max(pauses[2], took)

        gc_s: list[float] = []
        gc_max_s: list[float] = []
        gc.callbacks.append(on_gc)
        for _ in range(windows):
            pauses[1] = pauses[2] = 0.0
            beats0 = beats_now()
            local0 = local_now()
            start = len(recs)
            c0 = time.process_time()
            await trio.sleep(window_beats * duration)
            c1 = time.process_time()
            beats1 = beats_now()
            local.append(local_now() - local0)
            lat = list(recs[start:])
            agent_beats = beats1 - beats0
            delivered.append(agent_beats)
            cpu_us.append((c1 - c0) / max(1, agent_beats) * 1e6)
            cpu_s.append(c1 - c0)
            gc_s.append(pauses[1])
            gc_max_s.append(pauses[2])
            if raw:
                window_lat.append([round(v, 6) for v in lat])
            p99.append(percentile(lat, 99))
            p50.append(percentile(lat, 50))
        gc.callbacks.remove(on_gc)
        gc.collect()
        rss2 = proc.memory_info().rss
        result.update(
            {
                "cpu_us_per_agent_beat": cpu_us,
                "latency_p99": p99,
                "latency_p50": p50,
                "agent_beats": delivered,
                "local_beats": local,
                "cpu_s": cpu_s,
                "gc_s": gc_s,
                "gc_max_s": gc_max_s,
                "window_latencies": window_lat,
                "expected_agent_beats": n * window_beats,
                "rss_per_client_connected": (rss1 - rss0) / n,
                "rss_per_client_running": (rss2 - rss0) / n,
                "rss0": rss0,
                "connect_s": t_connect,
                "stale": sum(c.metrics.stale for c in clients),
                "dropped": sum(c.metrics.dropped for c in clients) + sum(c.dropped for c in chans),
                "degraded_beats": sum(c.metrics.degraded_beats for c in clients),
                "discarded": sum(c.metrics.duplicate_or_old for c in clients),
                "warnings": warnings.count,
                "warning_texts": warnings.texts[:5],
            }
        )
        logging.getLogger("backbeat_trio").removeHandler(warnings)
        send(result)
        async for cmd in cmds:
            if cmd["cmd"] == "exit":
                break
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------ recovery
async def _recovery_rep(
    url: str, cmd: dict[str, Any], cmds: trio.MemoryReceiveChannel[dict[str, Any]]
) -> None:
    cj, cc = str(cmd["cluster_js"]), str(cmd["cluster_core"])
    period = float(cmd["period"])
    admin = Config(cluster_id=cj, agent_id="bench-admin", nats_url=url)
    async with open_nats_transport(admin) as t:
        for c in (cj, cc):
            await t.jetstream.ensure_stream(status_stream_name(c), [status_subject(c)])
    common: dict[str, Any] = {"nats_url": url, "close_grace": 15.0}
    cfg_js = Config(cluster_id=cj, agent_id="bench-js", jetstream=True, **common)
    cfg_core = Config(cluster_id=cc, agent_id="bench-core", jetstream=False, **common)
    beats: list[tuple[float, int, bool]] = []
    emitted = {"js": 0, "core": 0}
    failed = {"js": 0, "core": 0}
    result: dict[str, Any] = {"event": "result"}
    with contextlib.suppress(UndeliveredClaims):
        async with open_client(cfg_js) as bj, open_client(cfg_core) as bc:
            stop = trio.Event()

            async def consume() -> None:
                async for frame in bj.beats(buffer=256):
                    beats.append((time.time(), frame.beat_index, _is_pulse_frame(frame.hlc)))

            async def emitter(bb: Any, key: str) -> None:
                while not stop.is_set():
                    try:
                        await bb.emit_status(CLAIM)
                        emitted[key] += 1
                    except Exception as exc:
                        failed[key] += 1
                        log(f"emit {key}: {exc!r}")
                    await trio.sleep(period)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                send({"event": "ready"})
                await cmds.receive()  # start
                nursery.start_soon(emitter, bj, "js")
                nursery.start_soon(emitter, bc, "core")
                send({"event": "emitting"})
                await cmds.receive()  # stop
                stop.set()
                await trio.sleep(period * 2)
                with trio.move_on_after(20.0):
                    await bj.flush_claims()
                with trio.move_on_after(5.0):
                    await bc.flush_claims()
                nursery.cancel_scope.cancel()
            result.update(
                {
                    "emitted": emitted,
                    "failed": failed,
                    "undelivered": {"js": bj.pending_claims, "core": bc.pending_claims},
                    "republished": {
                        "js": bj.metrics.claims_republished,
                        "core": bc.metrics.claims_republished,
                    },
                    "modes": {"js": bj.delivery_mode, "core": bc.delivery_mode},
                    "beats": beats,
                    "reconnects": bj.metrics.reconnects,
                    "degraded_beats": bj.metrics.degraded_beats,
                }
            )
    send(result)


async def _serve(
    cmds: trio.MemoryReceiveChannel[dict[str, Any]],
    name: str,
    handle: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    """Hand each ``name`` command to ``handle`` until ``exit``; other commands are ignored."""
    async for cmd in cmds:
        if cmd["cmd"] == "exit":
            return
        if cmd["cmd"] == name:
            await handle(cmd)


async def _main() -> None:
    a = args()
    role = str(a["role"])
    url = str(a["url"])
    cmd_send, cmds = trio.open_memory_channel[dict[str, Any]](math.inf)
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        nursery.start_soon(read_commands, cmd_send)
        send({"event": "hello"})
        if role == "beats":
            await _serve(cmds, "sub", functools.partial(_beats_once, url))
        elif role == "claims":
            await _serve(cmds, "run", functools.partial(_claims_answered, url))
        elif role == "scale":
            await _role_scale(a, cmds)
        elif role == "recovery":
            await _serve(cmds, "setup", lambda cmd: _recovery_rep(url, cmd, cmds))
        else:
            raise SystemExit(f"unknown role {role!r}")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(_main)
