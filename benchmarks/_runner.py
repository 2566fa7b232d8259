"""The orchestrator: starts embedded nats-servers, drives the workers, writes the report."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from backbeat_trio import NatsCluster, NatsServerProcess
from backbeat_trio._embedded import open_embedded_nats_process
from benchmarks import codec
from benchmarks._report import Row, machine_info, print_table, write_plot, write_results
from benchmarks._stats import median, percentile

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
ALL = (
    "codec",
    "beats",
    "claims",
    "scale",
    "scale-cluster",
    "many",
    "recovery",
    "admin",
    "ingest",
    "importcost",
    "bridgecost",
    "failover",
    "reverbrestart",
)


@dataclass(frozen=True)
class Params:
    quick: bool
    codec_reps: int
    codec_n: int
    beats_reps: int
    beats_real: int
    beats_degraded: int
    claims_reps: int
    claims_n: int
    claims_js_n: int
    scale_ns: tuple[int, ...]
    scale_tempo: int
    scale_windows: int
    scale_window_beats: int
    scale_cluster_ns: tuple[int, ...]
    many_ns: tuple[int, ...]
    recovery_reps: int
    recovery_outage: float
    recovery_post: float
    admin_reps: int
    admin_blocks: int
    admin_block_s: float
    ingest_reps: int = 5
    ingest_agents: int = 2000
    ingest_beats: int = 16
    ingest_e2e_reps: int = 3
    #: JetStream-mode claims repetitions: a repetition is short, and its ratio swings with this
    #: shared machine's load; more of them steady the median
    claims_js_reps: int = 15


FULL = Params(
    quick=False,
    codec_reps=5,
    codec_n=100_000,
    beats_reps=5,
    beats_real=1000,
    beats_degraded=1000,
    claims_reps=5,
    claims_n=20_000,
    claims_js_n=5_000,
    scale_ns=(50, 200, 500),
    scale_tempo=600,
    scale_windows=5,
    scale_window_beats=20,
    scale_cluster_ns=(30, 90, 150, 300),
    many_ns=(1000, 2000),
    recovery_reps=5,
    recovery_outage=0.5,
    recovery_post=4.0,
    admin_reps=3,
    admin_blocks=8,
    admin_block_s=4.0,
)
# the same repetitions, tempo and windows as FULL; smaller sizes
QUICK = dataclasses.replace(
    FULL,
    quick=True,
    codec_n=2_000,
    beats_real=20,
    beats_degraded=20,
    claims_n=1_000,
    claims_js_n=500,
    claims_js_reps=5,
    scale_ns=(10, 40),
    scale_window_beats=3,
    scale_cluster_ns=(30,),
    many_ns=(200,),
    recovery_reps=3,
    recovery_outage=0.3,
    recovery_post=1.5,
    admin_reps=1,
    admin_blocks=4,
    admin_block_s=1.5,
    ingest_agents=200,
    ingest_beats=8,
)
BEAT_TEMPO = 1200
SCALE_NODES = 3
RECOVERY_TEMPO = 1200
CLAIM_PERIOD = 0.005


class WorkerError(RuntimeError):
    pass


class Worker:
    """A worker process spoken to over JSON lines."""

    def __init__(self, name: str, proc: trio.Process, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self._buf = bytearray()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all((json.dumps(obj) + "\n").encode())

    async def recv(self, limit_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            with trio.fail_after(limit_s):
                while b"\n" not in self._buf:
                    chunk = await self.proc.stdout.receive_some(1 << 20)
                    if not chunk:
                        raise WorkerError(f"{self.name} exited:\n{self.log_tail()}")
                    self._buf += chunk
        except trio.TooSlowError:
            raise WorkerError(
                f"{self.name}: no answer within {limit_s:g} s:\n{self.log_tail()}"
            ) from None
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        msg: dict[str, Any] = json.loads(line)
        return msg

    async def expect(self, event: str, limit_s: float) -> dict[str, Any]:
        msg = await self.recv(limit_s)
        if msg.get("event") != event:
            raise WorkerError(f"{self.name}: expected {event!r}, got {str(msg)[:200]}")
        return msg

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.send({"cmd": "exit"})
        with trio.move_on_after(30.0):
            await self.proc.wait()
            return
        self.proc.kill()
        await self.proc.wait()


@contextlib.asynccontextmanager
async def open_worker(
    name: str, module: str, wargs: dict[str, Any], logdir: Path
) -> AsyncIterator[Worker]:
    log_path = logdir / f"{name}.log"
    with log_path.open("ab") as log:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", module, json.dumps(wargs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=str(ROOT),
        )
    worker = Worker(name, proc, log_path)
    try:
        await worker.expect("hello", 60.0)
        yield worker
    finally:
        with trio.CancelScope(shield=True):
            await worker.close()


async def start_workers(
    stack: contextlib.AsyncExitStack,
    specs: dict[str, tuple[str, str, dict[str, Any]]],
    logdir: Path,
) -> dict[str, Worker]:
    """Start several workers at once (their imports overlap); ``specs``: key → (name, module,
    args). They are closed when ``stack`` closes."""
    workers: dict[str, Worker] = {}

    async def start(key: str, name: str, module: str, wargs: dict[str, Any]) -> None:
        workers[key] = await stack.enter_async_context(open_worker(name, module, wargs, logdir))

    async with trio.open_nursery() as nursery:
        for key, (name, module, wargs) in specs.items():
            nursery.start_soon(start, key, name, module, wargs)
    return workers


WORKER_MODULES = {
    "pulse": "benchmarks._w_pulse",
    "bb": "benchmarks._w_client",
    "plain": "benchmarks._w_plain",
}


@contextlib.asynccontextmanager
async def open_server_with_workers(
    logdir: Path, role: str, names: dict[str, str]
) -> AsyncIterator[tuple[NatsServerProcess, dict[str, Worker]]]:
    """A JetStream server and, on it, a worker per ``names`` entry (key → worker name): key
    ``pulse`` runs the pulse worker, ``bb`` the backbeat_trio worker and ``plain`` the plain
    nats-py worker, both in ``role``. The workers close before the server."""
    async with (
        open_embedded_nats_process(jetstream=True) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        wargs = {"role": role, "url": server.url}
        specs = {
            key: (name, WORKER_MODULES[key], {"url": server.url} if key == "pulse" else wargs)
            for key, name in names.items()
        }
        yield server, await start_workers(stack, specs, logdir)


async def start_pulse(pulse: Worker, cluster: str, tempo: int, beats: int) -> None:
    """Have the pulse worker beat ``cluster`` (the first beat 0.1 s out); back once it started."""
    await pulse.send(
        {"cmd": "run", "cluster": cluster, "tempo": tempo, "beats": beats, "lead": 0.1}
    )
    await pulse.expect("started", 30.0)


@contextlib.asynccontextmanager
async def open_server_and_cluster(
    size: int,
) -> AsyncIterator[tuple[NatsServerProcess, NatsCluster]]:
    """One server and a ``size``-node cluster (all with JetStream), started side by side."""
    server = NatsServerProcess(jetstream=True)
    cluster = NatsCluster(size, jetstream=True, name="benchscale")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, server.start)
            nursery.start_soon(trio.to_thread.run_sync, cluster.start)
        yield server, cluster
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.close)
            await trio.to_thread.run_sync(cluster.close)


# ------------------------------------------------------------------------------------ benches
@dataclass
class Outcome:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    latency_samples: dict[str, list[float]] = field(default_factory=dict)


def solo_row(
    bench: str,
    figure: str,
    unit: str,
    ours: list[float],
    goal: str = "(info)",
    met: bool | None = None,
) -> Row:
    """A figure with no baseline to compare it with."""
    return Row(bench, figure, unit, ours, None, "", goal, met)


def info_row(
    bench: str, figure: str, unit: str, ours: list[float], base: list[float], base_label: str
) -> Row:
    """A figure compared with a baseline, with no goal to meet."""
    return Row(bench, figure, unit, ours, base, base_label, "(info)", None)


def bench_codec(p: Params, out: Outcome) -> None:
    res = codec.run(p.codec_reps, p.codec_n)
    for name, r in res.items():
        goal = name != "StatusClaim validate+encode (encode_claim)"
        ours, base = r["ours"], r["base"]
        ratio = median(ours) / median(base)
        out.rows.append(
            Row(
                "1 Codec",
                name,
                "kops/s",
                [v / 1e3 for v in ours],
                [v / 1e3 for v in base],
                "stdlib json + hand validation",
                "≥ 5× baseline" if goal else "(info)",
                (ratio >= 5.0) if goal else None,
                higher_better=True,
            )
        )
    ev = codec.evidence(p.codec_n)
    out.notes.append(
        "Codec cost of the id/HLC/window-id character rules (µs per call, best of 5): "
        + ", ".join(f"{k} {v:.2f}" for k, v in ev.items())
        + ". `_wire.decode` checks them after msgspec's decode as one joined regex per message "
        "(the per-field regexes only run to name a failure); the baseline runs one regex per "
        "field, as a hand-written validator would."
    )
    out.notes.append(
        f"Codec: {p.codec_n} calls per repetition, one sample message each (BeatFrame with a "
        "microsecond `deadline_at`; StatusClaim with two `wait_for` refs and a 70-char note)."
    )


async def bench_beats(p: Params, out: Outcome, logdir: Path) -> None:
    d = 60.0 / BEAT_TEMPO
    lat_ours: list[list[float]] = []
    lat_base: list[list[float]] = []
    sched_err: list[list[float]] = []
    deg_err: list[list[float]] = []
    transit_ours: list[list[float]] = []
    transit_base: list[list[float]] = []
    extras: list[str] = []
    async with open_server_with_workers(
        logdir, "beats", {"pulse": "pulse", "bb": "bb-beats", "plain": "plain-beats"}
    ) as (_, workers):
        pulse, bb, plain = workers["pulse"], workers["bb"], workers["plain"]
        for rep in range(p.beats_reps):
            cluster = f"lat{rep}"
            await bb.send(
                {
                    "cmd": "sub",
                    "cluster": cluster,
                    "n_real": p.beats_real,
                    "n_degraded": p.beats_degraded,
                    "tempo": BEAT_TEMPO,
                }
            )
            await plain.send({"cmd": "sub", "cluster": cluster})
            await bb.expect("ready", 30.0)
            await plain.expect("ready", 30.0)
            await start_pulse(pulse, cluster, BEAT_TEMPO, p.beats_real)
            pres = await pulse.expect("result", p.beats_real * d + 60.0)
            bres = await bb.expect("result", p.beats_degraded * d + 60.0)
            await plain.send({"cmd": "finish"})  # it has long had every pulse frame by now
            plres = await plain.expect("result", 30.0)
            published = dict(zip(pres["indices"], pres["wall_times"], strict=True))
            transit_ours.append(
                [
                    w - published[i]
                    for i, w in zip(bres["real_indices"], bres["real_walls"], strict=True)
                    if i in published
                ]
            )
            transit_base.append(
                [
                    w - published[i]
                    for i, w in zip(plres["indices"], plres["walls"], strict=True)
                    if i in published
                ]
            )
            lat_ours.append(bres["latencies"])
            lat_base.append(plres["latencies"])
            sched_err.append(pres["errors"])
            deg_err.append(bres["degraded_errors"])
            extras.append(
                f"rep {rep}: pulse published {pres['published']} (skipped late "
                f"{pres['skipped_late']}), backbeat_trio got {bres['real_frames']} pulse frames "
                f"(stale {bres['metrics']['stale']}, dropped {bres['metrics']['dropped']}) and "
                f"{len(bres['degraded_errors'])} local beats; plain got {plres['frames']}"
            )
    ms = 1e3
    pcts = [("p50", 50.0), ("p99", 99.0), ("max", 100.0)]
    for label, q in pcts:
        ours = [percentile(x, q) * ms for x in lat_ours]
        base = [percentile(x, q) * ms for x in lat_base]
        ratio = median(ours) / median(base)
        if label == "p50":
            goal, met = "≤ 1 ms and ≤ 2× plain", median(ours) <= 1.0 and ratio <= 2.0
        elif label == "p99":
            goal, met = "≤ 3 ms and ≤ 2× plain", median(ours) <= 3.0 and ratio <= 2.0
        else:
            goal, met = "(info)", None
        out.rows.append(
            Row(
                "2 Beat latency",
                f"{label} (pulse → beats() consumer)",
                "ms",
                ours,
                base,
                "plain asyncio nats-py subscriber",
                goal,
                met,
            )
        )
    for label, q in pcts[:2]:
        ours = [percentile(x, q) * ms for x in transit_ours]
        base = [percentile(x, q) * ms for x in transit_base]
        out.rows.append(
            info_row(
                "2 Beat latency",
                f"{label} transit: pulse's publish call → consumer",
                "ms",
                ours,
                base,
                "plain asyncio nats-py subscriber",
            )
        )
    out.latency_samples["backbeat_trio (beats() consumer)"] = [v for x in lat_ours for v in x]
    out.latency_samples["plain asyncio nats-py subscriber"] = [v for x in lat_base for v in x]
    n = p.beats_real
    p99 = [percentile([abs(e) for e in x], 99) * ms for x in sched_err]
    last = [x[-1] * ms if x else math.nan for x in sched_err]
    p50 = [percentile(x, 50) * ms for x in sched_err]
    out.rows.append(
        solo_row("3 Pulse schedule", f"publish error p50 ({n} beats @ {BEAT_TEMPO} BPM)", "ms", p50)
    )
    out.rows.append(
        solo_row("3 Pulse schedule", "publish error p99", "ms", p99, "≤ 2 ms", median(p99) <= 2.0)
    )
    out.rows.append(
        solo_row(
            "3 Pulse schedule",
            "error of the last beat (drift)",
            "ms",
            last,
            "|·| ≤ 1 ms",
            abs(median(last)) <= 1.0,
        )
    )
    nd = p.beats_degraded
    end = [x[-1] * ms if x else math.nan for x in deg_err]
    steady = [percentile(x[2:], 50) * ms for x in deg_err]
    k = min(50, max(1, (nd - 2) // 4))
    trend = [
        (median(x[-k:]) - median(x[2 : 2 + k])) * ms if len(x) > 2 + k else math.nan
        for x in deg_err
    ]
    out.rows.append(
        solo_row(
            "4 Degraded beats",
            f"error of the last local beat ({nd} @ {BEAT_TEMPO} BPM) vs ideal",
            "ms",
            end,
            "|·| ≤ 1 ms",
            abs(median(end)) <= 1.0,
        )
    )
    out.rows.append(solo_row("4 Degraded beats", "error p50 (local beats 3…end)", "ms", steady))
    out.rows.append(
        solo_row(
            "4 Degraded beats",
            f"accumulated drift: median(last {k}) − median(first {k} after beat 2)",
            "ms",
            trend,
        )
    )
    first = [x[0] * ms if x else math.nan for x in deg_err]
    min_lat = median([min(x) * ms for x in lat_ours if x])
    out.notes.append(
        "Beats: " + "; ".join(extras) + ". The first local beat is delivered "
        f"`jitter_tolerance` (50 ms) after it was due by design (median {median(first):.1f} ms). "
        f"Smallest pulse-beat latency the client saw (median over reps): {min_lat:.2f} ms — the "
        "client's tempo estimator takes this minimum as the clock offset to the pulse, so its "
        "local schedule continues from the pulse's schedule shifted by it."
    )


async def bench_claims(p: Params, out: Outcome, logdir: Path) -> None:
    # The two workers take turns, one repetition each (the first to go alternates), so that a
    # load from outside that comes and goes (this machine is shared) falls on both alike; they
    # used to run all their repetitions one after the other. Each repetition is a fresh client
    # or nats-py connection on the worker's stream (made once, outside the timed part).
    results: dict[tuple[str, str], dict[str, Any]] = {}
    async with open_server_with_workers(
        logdir, "claims", {"bb": "claims-bb", "plain": "claims-plain"}
    ) as (_, workers):
        for mode in ("signed", "unsigned", "js"):
            count = p.claims_js_n if mode == "js" else p.claims_n
            for rep in range(p.claims_js_reps if mode == "js" else p.claims_reps):
                for impl in ("bb", "plain") if rep % 2 == 0 else ("plain", "bb"):
                    await workers[impl].send(
                        {
                            "cmd": "run",
                            "mode": mode,
                            "count": count,
                            "reps": 1,
                            "cluster": f"claims{mode}{impl}",
                        }
                    )
                    got = await workers[impl].expect("result", 600.0)
                    into = results.setdefault((mode, impl), {"republished": 0})
                    for key, value in got.items():
                        if isinstance(value, list):
                            into.setdefault(key, []).extend(value)
                    into["republished"] += got.get("republished", 0)
    labels = {
        "signed": ("signed emit_status (core NATS)", "≥ 20,000/s and ≥ 0.7× plain"),
        "unsigned": ("unsigned emit_status (core NATS)", "(info)"),
        "js": ("signed, JetStream, until all acked", "≥ 1.0× plain"),
    }
    for mode, (label, goal) in labels.items():
        ours = [r / 1e3 for r in results[(mode, "bb")]["rates"]]
        base = [r / 1e3 for r in results[(mode, "plain")]["rates"]]
        ratio = median(ours) / median(base)
        met = {"signed": median(ours) >= 20.0 and ratio >= 0.7, "js": ratio >= 1.0}.get(mode)
        out.rows.append(
            Row(
                "5 Claims",
                label,
                "k claims/s",
                ours,
                base,
                "plain asyncio loop: sign + encode + publish",
                goal,
                met,
                higher_better=True,
            )
        )
    cpu = {k: median(v["cpu_per_claim"]) * 1e6 for k, v in results.items()}
    emit = median(results[("signed", "bb")]["emit_rates"]) / 1e3
    out.notes.append(
        f"Claims: {p.claims_n} claims per repetition, {p.claims_reps} repetitions "
        f"({p.claims_js_n} claims and {p.claims_js_reps} repetitions in JetStream mode), timed "
        "from the first emit until flushed to the server (core: PING/PONG after the last) or "
        "until every PubAck arrived (JetStream); the two workers take turns, one repetition "
        "each (a fresh client or connection, after an untimed warm-up of 200 claims); both send "
        "the same headers (SPEC's Nats-Msg-Id, its digest included). Signed "
        "emit loop alone (before the flush): "
        f"{emit:.1f} k/s. CPU per claim (µs, whole process): "
        + ", ".join(f"{m}/{i} {v:.1f}" for (m, i), v in sorted(cpu.items()))
        + f". JetStream re-publishes by the SDK: {results[('js', 'bb')]['republished']}."
    )


def scale_args(p: Params, url: str, cluster: str, n: int, **extra: Any) -> dict[str, Any]:
    """The arguments of a ``scale`` worker: ``n`` agents on ``cluster`` at ``url``."""
    return {
        "role": "scale",
        "url": url,
        "cluster": cluster,
        "n": n,
        "windows": p.scale_windows,
        "window_beats": p.scale_window_beats,
        "tempo": p.scale_tempo,
        **extra,
    }


async def bench_scale(p: Params, out: Outcome, logdir: Path) -> None:
    d = 60.0 / p.scale_tempo
    async with (
        open_embedded_nats_process(jetstream=True) as server,
        open_worker("pulse-scale", "benchmarks._w_pulse", {"url": server.url}, logdir) as pulse,
    ):
        for n in p.scale_ns:
            cluster = f"scale{n}"
            wargs = scale_args(p, server.url, cluster, n)
            results = {}
            async with contextlib.AsyncExitStack() as stack:
                impls = [("bb", "benchmarks._w_client"), ("plain", "benchmarks._w_plain")]
                if not p.quick or n == max(p.scale_ns):  # --quick: only the largest N
                    impls.insert(1, ("shared", "benchmarks._w_client"))  # all on one connection
                workers = await start_workers(
                    stack,
                    {
                        impl: (
                            f"scale-{n}-{impl}",
                            module,
                            {**wargs, "cluster": f"{cluster}{impl}", "shared": impl == "shared"},
                        )
                        for impl, module in impls
                    },
                    logdir,
                )
                for impl, _ in impls:
                    w = workers[impl]
                    wargs["cluster"] = f"{cluster}{impl}"
                    await w.send({"cmd": "go"})
                    ready = await w.expect("ready", 300.0)
                    beats = 10 + p.scale_windows * p.scale_window_beats + 40
                    await start_pulse(pulse, wargs["cluster"], p.scale_tempo, beats)
                    results[impl] = await w.expect("result", beats * d + 120.0)
                    results[impl]["connect_s"] = ready["connect_s"]
                    await pulse.send({"cmd": "stop"})
                    await pulse.expect("result", 30.0)
                    await w.close()
            res, base = results["bb"], results["plain"]
            bench = "6 Scale"
            label = "N plain nats-py subscribers, one asyncio process"
            out.rows.append(
                info_row(
                    bench,
                    f"N={n}: CPU per agent-beat",
                    "µs",
                    res["cpu_us_per_agent_beat"],
                    base["cpu_us_per_agent_beat"],
                    label,
                )
            )
            out.rows.append(
                info_row(
                    bench,
                    f"N={n}: RSS per client",
                    "KiB",
                    [res["rss_per_client_running"] / 1024],
                    [base["rss_per_client_running"] / 1024],
                    label,
                )
            )
            out.rows.append(
                info_row(
                    bench,
                    f"N={n}: beat latency p99",
                    "ms",
                    [v * 1e3 for v in res["latency_p99"]],
                    [v * 1e3 for v in base["latency_p99"]],
                    label,
                )
            )
            want_w = n * p.scale_window_beats
            out.rows.append(
                info_row(
                    bench,
                    f"N={n}: agent-beats delivered per window",
                    "% of N × beats",
                    [100.0 * v / want_w for v in res["agent_beats"]],
                    [100.0 * v / want_w for v in base["agent_beats"]],
                    label,
                )
            )
            out.rows.append(
                solo_row(
                    bench,
                    f"N={n}: beats synthesised locally (client fell behind the pulse)",
                    "%",
                    _synthesised_pct(res),
                )
            )
            shared = results.get("shared")
            if shared is not None:
                _shared_connection_rows(out, n, shared, base, label)
            got = sum(res["agent_beats"])
            want = res["expected_agent_beats"] * p.scale_windows
            out.notes.append(
                f"Scale N={n}: connect {res['connect_s']:.2f} s, agent-beats delivered "
                f"{got}/{want} in the windows, latency p50 "
                f"{median(res['latency_p50']) * 1e3:.2f} ms, RSS per client just after connect "
                f"{res['rss_per_client_connected'] / 1024:.0f} KiB, stale {res['stale']}, dropped "
                f"{res['dropped']}, degraded beats {res['degraded_beats']}."
            )


def _synthesised_pct(res: dict[str, Any]) -> list[float]:
    """Per window: the share of agent-beats a scale worker's clients delivered from their own
    metronome (their pulse frame came too late)."""
    return [
        100.0 * lb / max(1, ab)
        for lb, ab in zip(res["local_beats"], res["agent_beats"], strict=True)
    ]


def _shared_connection_rows(
    out: Outcome, n: int, shared: dict[str, Any], base: dict[str, Any], label: str
) -> None:
    """Benchmark 6's rows for N clients on one connection (``NatsTransport.view``)."""
    for figure, unit, ours, theirs in (
        (
            "CPU per agent-beat",
            "µs",
            shared["cpu_us_per_agent_beat"],
            base["cpu_us_per_agent_beat"],
        ),
        (
            "beat latency p99",
            "ms",
            [v * 1e3 for v in shared["latency_p99"]],
            [v * 1e3 for v in base["latency_p99"]],
        ),
    ):
        out.rows.append(
            info_row(
                "6 Scale", f"N={n}, one shared connection: {figure}", unit, ours, theirs, label
            )
        )
    synthesised = _synthesised_pct(shared)
    out.rows.append(
        solo_row(
            "6 Scale", f"N={n}, one shared connection: beats synthesised locally", "%", synthesised
        )
    )


def _split(n: int, parts: int) -> list[int]:
    """``n`` agents over ``parts`` processes, as evenly as possible."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


async def _scale_split_run(
    p: Params,
    workers: list[Worker],
    pulse: Worker,
    cluster: str,
    server_pids: list[int],
) -> dict[str, Any]:
    """One measurement with N clients split over ``workers`` (already told their URL and share):
    connect, start the pulse, collect and merge the windows."""
    d = 60.0 / p.scale_tempo
    for w in workers:
        await w.send({"cmd": "go"})
    readies = [await w.expect("ready", 300.0) for w in workers]
    # the servers' CPU with every client connected and no beats: what a beat costs comes on top
    idle_s = 0.25 if p.quick else 2.0
    idle0 = _cpu_seconds(server_pids)
    await trio.sleep(idle_s)
    idle_rate = (_cpu_seconds(server_pids) - idle0) / idle_s
    beats = 10 + p.scale_windows * p.scale_window_beats + 40
    await start_pulse(pulse, cluster, p.scale_tempo, beats)
    wall0, cpu0 = time.time(), _cpu_seconds(server_pids)
    results = [await w.expect("result", beats * d + 120.0) for w in workers]
    wall1, cpu1 = time.time(), _cpu_seconds(server_pids)
    await pulse.send({"cmd": "stop"})
    pres = await pulse.expect("result", 30.0)
    async with trio.open_nursery() as nursery:
        for w in workers:
            nursery.start_soon(w.close)
    n = sum(r["expected_agent_beats"] for r in results) // p.scale_window_beats
    published = sum(1 for t in pres["wall_times"] if wall0 <= t <= wall1)
    merged: dict[str, Any] = {
        "n": n,
        "connect_s": max(r["connect_s"] for r in readies),
        "server_cpu_us_per_agent_beat": (cpu1 - cpu0) / max(1, n * published) * 1e6,
        "server_idle_cpu_pct": 100.0 * idle_rate,
        "rss_per_client": sum(
            r["rss_per_client_running"] * r["expected_agent_beats"] for r in results
        )
        / max(1, n * p.scale_window_beats),
        "stale": sum(r["stale"] for r in results),
        "dropped": sum(r["dropped"] for r in results),
        "cpu_us": [],
        "p50": [],
        "p99": [],
        "delivered": [],
        "local": [],
        # per process (= per node in the cluster run): median over windows of the window's p50
        "p50_by_worker": [
            median([percentile(lat, 50) for lat in r["window_latencies"]]) for r in results
        ],
    }
    for k in range(p.scale_windows):
        lat = [v for r in results for v in r["window_latencies"][k]]
        agent_beats = sum(r["agent_beats"][k] for r in results)
        merged["cpu_us"].append(sum(r["cpu_s"][k] for r in results) / max(1, agent_beats) * 1e6)
        merged["p50"].append(percentile(lat, 50))
        merged["p99"].append(percentile(lat, 99))
        merged["delivered"].append(agent_beats)
        merged["local"].append(sum(r["local_beats"][k] for r in results))
    return merged


async def bench_scale_cluster(p: Params, out: Outcome, logdir: Path) -> None:
    """N clients in SCALE_NODES processes, one per node of a local cluster (pulse on node 1),
    against the same N in SCALE_NODES processes on one server, measured in the same run."""
    async with (
        open_server_and_cluster(SCALE_NODES) as (server, nodes),
        contextlib.AsyncExitStack() as stack,
    ):
        topologies = {
            "single": ([server.url] * SCALE_NODES, [server.pid]),
            "cluster": (nodes.urls, [s.pid for s in nodes.servers]),
        }
        pulse_specs = {
            topo: (f"pulse-scale-{topo}", "benchmarks._w_pulse", {"url": urls[0]})
            for topo, (urls, _) in topologies.items()
        }
        pulses: dict[str, Worker] = {}
        for i, n in enumerate(p.scale_cluster_ns):
            load = os.getloadavg()
            parts = _split(n, SCALE_NODES)
            order = ("single", "cluster") if i % 2 == 0 else ("cluster", "single")
            res: dict[str, dict[str, Any]] = {}
            async with contextlib.AsyncExitStack() as wstack:
                # every process of both runs starts at once (their imports overlap); a process
                # connects nothing before its "go"
                specs = {
                    f"{topo}{j}": (
                        f"scalec-{n}-{topo}-{j}",
                        "benchmarks._w_client",
                        scale_args(p, urls[j], f"scalec{n}{topo}", parts[j], raw_latencies=True),
                    )
                    for topo, (urls, _) in topologies.items()
                    for j in range(SCALE_NODES)
                }
                workers: dict[str, Worker] = {}

                async def start(
                    stack: contextlib.AsyncExitStack,
                    specs: dict[str, tuple[str, str, dict[str, Any]]],
                    into: dict[str, Worker],
                ) -> None:
                    into.update(await start_workers(stack, specs, logdir))

                # the pulses start with the first size's processes (their imports overlap)
                async with trio.open_nursery() as nursery:
                    if not pulses:
                        nursery.start_soon(start, stack, pulse_specs, pulses)
                    nursery.start_soon(start, wstack, specs, workers)
                for topo in order:
                    pids = [pid for pid in topologies[topo][1] if pid is not None]
                    res[topo] = await _scale_split_run(
                        p,
                        [workers[f"{topo}{j}"] for j in range(SCALE_NODES)],
                        pulses[topo],
                        f"scalec{n}{topo}",
                        pids,
                    )
            _scale_cluster_rows(p, out, n, parts, res["cluster"], res["single"], load)


def _scale_cluster_rows(
    p: Params,
    out: Outcome,
    n: int,
    parts: list[int],
    res: dict[str, Any],
    base: dict[str, Any],
    load: tuple[float, float, float],
) -> None:
    bench = "6b Scale, 3-node cluster"
    label = f"same N in {SCALE_NODES} processes on one server (this run)"
    head = f"N={n} ({'+'.join(map(str, parts))} on {SCALE_NODES} nodes)"
    want_w = n * p.scale_window_beats

    def row(figure: str, unit: str, ours: list[float], theirs: list[float]) -> None:
        out.rows.append(info_row(bench, f"{head}: {figure}", unit, ours, theirs, label))

    def local_share(r: dict[str, Any]) -> list[float]:
        return [100.0 * lb / max(1, ab) for lb, ab in zip(r["local"], r["delivered"], strict=True)]

    row("client CPU per agent-beat", "µs", res["cpu_us"], base["cpu_us"])
    row(
        "nats-server CPU per agent-beat (all servers)",
        "µs",
        [res["server_cpu_us_per_agent_beat"]],
        [base["server_cpu_us_per_agent_beat"]],
    )
    row("RSS per client", "KiB", [res["rss_per_client"] / 1024], [base["rss_per_client"] / 1024])
    row("beat latency p50", "ms", [v * 1e3 for v in res["p50"]], [v * 1e3 for v in base["p50"]])
    row("beat latency p99", "ms", [v * 1e3 for v in res["p99"]], [v * 1e3 for v in base["p99"]])
    row(
        "agent-beats delivered per window",
        "% of N × beats",
        [100.0 * v / want_w for v in res["delivered"]],
        [100.0 * v / want_w for v in base["delivered"]],
    )
    row("beats synthesised locally", "%", local_share(res), local_share(base))
    ms = 1e3
    c_by, s_by = res["p50_by_worker"], base["p50_by_worker"]
    hop = (median(c_by[1:]) - c_by[0]) * ms
    same = (median(s_by[1:]) - s_by[0]) * ms
    out.notes.append(
        f"Scale on a {SCALE_NODES}-node cluster, N={n} agents per cluster "
        f"({', '.join(f'{k} on node {j + 1}' for j, k in enumerate(parts))}; the pulse on node 1; "
        f"one client process per node; load average at the start "
        f"{', '.join(f'{x:.2f}' for x in load)}): connect {res['connect_s']:.2f} s "
        f"(one server: {base['connect_s']:.2f} s); latency p50 per process "
        + "/".join(f"{v * ms:.2f}" for v in c_by)
        + " ms (one server: "
        + "/".join(f"{v * ms:.2f}" for v in s_by)
        + f" ms); route hop = p50 on nodes 2–3 − p50 on node 1: {hop:+.2f} ms "
        f"(same processes on one server: {same:+.2f} ms); nats-server CPU with the clients "
        f"connected and no beats {res['server_idle_cpu_pct']:.1f} % of a core for all "
        f"{SCALE_NODES} servers (one server: {base['server_idle_cpu_pct']:.1f} %); "
        f"stale {res['stale']}, dropped {res['dropped']} (one server: {base['stale']}, "
        f"{base['dropped']})."
    )


def _stream_counts(server: NatsServerProcess) -> dict[str, int]:
    data = server.monitor("jsz?accounts=true&streams=true")
    counts: dict[str, int] = {}
    for acct in data.get("account_details") or []:
        for st in acct.get("stream_detail") or []:
            counts[st["name"]] = int(st.get("state", {}).get("messages", 0))
    return counts


async def bench_recovery(p: Params, out: Outcome, logdir: Path) -> None:
    first_bb: list[float] = []
    first_plain: list[float] = []
    since_kill: list[float] = []
    restart_s: list[float] = []
    lost = {"js": [], "core": [], "plain": []}  # type: dict[str, list[float]]
    extras: list[str] = []
    async with open_server_with_workers(
        logdir,
        "recovery",
        {"pulse": "pulse-recovery", "bb": "bb-recovery", "plain": "plain-recovery"},
    ) as (server, workers):
        pulse, bbw, plain = workers["pulse"], workers["bb"], workers["plain"]
        for rep in range(p.recovery_reps):
            cj, cc, cp = f"rec{rep}js", f"rec{rep}core", f"rec{rep}plain"
            await bbw.send(
                {"cmd": "setup", "cluster_js": cj, "cluster_core": cc, "period": CLAIM_PERIOD}
            )
            await plain.send(
                {"cmd": "setup", "cluster": cp, "beat_cluster": cj, "period": CLAIM_PERIOD}
            )
            await bbw.expect("ready", 30.0)
            await plain.expect("ready", 30.0)
            await start_pulse(pulse, cj, RECOVERY_TEMPO, 100_000)
            await trio.sleep(0.3 if p.quick else 0.5)
            await bbw.send({"cmd": "start"})
            await plain.send({"cmd": "start"})
            await bbw.expect("emitting", 30.0)
            await plain.expect("emitting", 30.0)
            await trio.sleep(0.3 if p.quick else 0.5)
            t_kill = time.time()
            server.kill()
            await trio.sleep(p.recovery_outage)
            t0 = time.time()
            await trio.to_thread.run_sync(server.start)
            t_ready = time.time()
            restart_s.append(t_ready - t0)
            await trio.sleep(p.recovery_post)
            await bbw.send({"cmd": "stop"})
            await plain.send({"cmd": "stop"})
            bres = await bbw.expect("result", 60.0)
            plres = await plain.expect("result", 60.0)
            await pulse.send({"cmd": "stop"})
            await pulse.expect("result", 30.0)
            counts = await trio.to_thread.run_sync(_stream_counts, server)
            after = [w for w, _, real in bres["beats"] if real and w > t_kill]
            first_bb.append((after[0] - t_ready) if after else math.nan)
            since_kill.append((after[0] - t_kill) if after else math.nan)
            pafter = [w for w, _ in plres["beats"] if w > t_kill]
            first_plain.append((pafter[0] - t_ready) if pafter else math.nan)
            stored = {
                "js": counts.get(f"BACKBEAT_STATUS_{cj}", 0),
                "core": counts.get(f"BACKBEAT_STATUS_{cc}", 0),
                "plain": counts.get(f"BACKBEAT_STATUS_{cp}", 0),
            }
            emitted = {
                "js": bres["emitted"]["js"],
                "core": bres["emitted"]["core"],
                "plain": plres["emitted"],
            }
            for key in lost:
                lost[key].append(float(emitted[key] - stored[key]))
            extras.append(
                f"rep {rep}: emitted/stored js {emitted['js']}/{stored['js']}, core "
                f"{emitted['core']}/{stored['core']}, plain {emitted['plain']}/{stored['plain']}; "
                f"SDK undelivered {bres['undelivered']}, re-published {bres['republished']}, "
                f"local beats during the outage {bres['degraded_beats']}"
            )
    bench = "7 Recovery"
    out.rows.append(
        info_row(
            bench,
            "restart ready → first pulse beat delivered",
            "s",
            first_bb,
            first_plain,
            "plain nats-py subscriber (reconnect_time_wait=1 s)",
        )
    )
    out.rows.append(solo_row(bench, "kill → first pulse beat delivered", "s", since_kill))
    out.rows.append(
        Row(
            bench,
            "claims lost, JetStream mode",
            "claims",
            lost["js"],
            lost["plain"],
            "plain nats-py publisher",
            "0",
            median(lost["js"]) == 0 and max(lost["js"]) == 0,
        )
    )
    out.rows.append(
        info_row(
            bench,
            "claims lost, core mode",
            "claims",
            lost["core"],
            lost["plain"],
            "plain nats-py publisher",
        )
    )
    out.notes.append(
        f"Recovery: SIGKILL of nats-server, {p.recovery_outage:g} s outage, restart on the same "
        f"port and JetStream store (restart took {median(restart_s):.2f} s median until "
        "/healthz answered), claims every 5 ms from each publisher throughout. "
        + "; ".join(extras)
        + "."
    )


# --------------------------------------------------------------------------------------- main
async def _run(p: Params, only: tuple[str, ...], write: bool) -> int:
    started = time.perf_counter()
    info = machine_info()
    out = Outcome()
    failures: list[str] = []
    logdir = Path(tempfile.mkdtemp(prefix="backbeat-bench-"))
    for name in only:
        t0 = time.perf_counter()
        print(f"== {name} …", flush=True)
        try:
            if name == "codec":
                bench_codec(p, out)
            elif name == "beats":
                await bench_beats(p, out, logdir)
            elif name == "claims":
                await bench_claims(p, out, logdir)
            elif name == "scale":
                await bench_scale(p, out, logdir)
            elif name == "scale-cluster":
                await bench_scale_cluster(p, out, logdir)
            elif name == "many":
                from benchmarks.many import bench_many  # it builds on this module's helpers

                await bench_many(p, out, logdir)
            elif name == "recovery":
                await bench_recovery(p, out, logdir)
            elif name == "admin":
                from benchmarks._admin_bench import bench_admin

                await bench_admin(p, out, logdir)
            elif name == "ingest":
                from benchmarks.ingest import bench_ingest

                await bench_ingest(p, out, logdir)
            elif name == "importcost":
                from benchmarks.importcost import bench_importcost

                await bench_importcost(p, out, logdir)
            elif name == "bridgecost":
                from benchmarks.bridgecost import bench_bridgecost

                await bench_bridgecost(p, out, logdir)
            elif name == "failover":
                from benchmarks.failover import bench_failover

                await bench_failover(p, out, logdir)
            elif name == "reverbrestart":
                from benchmarks.reverbrestart import bench_reverbrestart

                await bench_reverbrestart(p, out, logdir)
        except Exception as exc:
            failures.append(f"{name}: {exc!r}")
            traceback.print_exc()
        print(f"   {name} took {time.perf_counter() - t0:.1f} s", flush=True)
    elapsed = time.perf_counter() - started
    info["load_after"] = os.getloadavg()
    info["elapsed_s"] = elapsed
    info["worker_logs"] = str(logdir)
    print_table(out.rows)
    for note in out.notes:
        print(f"* {note}")
    print(f"total {elapsed:.1f} s; worker logs in {logdir}")
    if failures:
        print("FAILED: " + "; ".join(failures))
    if write:
        write_results(BENCH_DIR / "RESULTS.md", out.rows, out.notes, info, p, failures)
        if out.latency_samples:
            try:
                write_plot(BENCH_DIR / "latency.png", out.latency_samples, p)
            except ImportError:  # the plot only: the results are written already
                print("latency.png not written: matplotlib is missing (pip install -e '.[bench]')")
        print(f"wrote {BENCH_DIR / 'RESULTS.md'}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes; under a minute")
    parser.add_argument("--only", nargs="+", choices=ALL, default=list(ALL))
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="SIZE=VALUE",
        help="override sizes, e.g. scale_ns=100,150 scale_tempo=60 (names: the sizes table)",
    )
    ns = parser.parse_args(argv)
    params = QUICK if ns.quick else FULL
    for item in ns.set:
        key, _, value = item.partition("=")
        current = getattr(params, key, None)
        if key == "quick" or current is None or not value:
            parser.error(f"--set {item!r}: expected SIZE=VALUE with SIZE from the sizes table")
        try:
            parsed: Any = (
                tuple(int(v) for v in value.split(","))
                if isinstance(current, tuple)
                else type(current)(value)
            )
        except ValueError:
            parser.error(f"--set {item!r}: not a {type(current).__name__}")
        params = dataclasses.replace(params, **{key: parsed})
    only = tuple(n for n in ALL if n in ns.only)
    sys.exit(trio.run(_run, params, only, not ns.no_write))
