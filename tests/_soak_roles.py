"""One role of the process soak (tests/test_soak_hour.py) in a process of its own.

``python tests/_soak_roles.py ROLE URL CLUSTER AGENTS TEMPO``, ROLE one of ``pulse``, ``reverb``
or ``agents``. Each prints one JSON object per line on stdout: ``{"ready": ...}`` once it runs,
``{"stalled": ...}`` (the reverb) for every report that lists an agent ``stalled``, and
``{"result": ...}`` before it exits. It reads its commands from stdin: ``stop`` (the agents stop
claiming and wait until every claim is acknowledged; the pulse stops) or ``expect N`` (the
reverb waits until it has counted N claims, in windows or late, then reports its stream).

The agents' signing keys are derived from their index, so the reverb builds the same keyring
without a file between the processes.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import hashlib
import json
import math
import os
import sys
import time
from typing import Any

import nacl.signing
import trio

import backbeat_trio as bb3
from backbeat_trio._bridge.nats import open_nats_transport

RECONNECT_DELAY = 0.1
#: seconds a role waits for its last work (acknowledgements, counting) before giving up
FINAL_WAIT = 60.0


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def agent_key(index: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(hashlib.sha256(f"soak-agent-{index}".encode()).digest())


async def next_command() -> list[str]:
    line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
    return line.split() or ["stop"]  # stdin closed: the test is gone


#: a file to which the reverb appends what it saw around each report listing an agent
#: ``stalled`` (and the agents, in ``<file>.agents``, each beat agent-0 claimed over 0.1 s late:
#: index, wall time, seconds late taking it, seconds claiming, degraded)
TRACE = os.environ.get("BACKBEAT_SOAK_TRACE")


def append_line(path: str, line: str) -> None:
    # a diagnostic, rare: blocking the role's thread for a write is fine
    with open(path, "a") as f:
        f.write(line + "\n")


class ReverbTrace:
    """Rings of what the reverb read and did, dumped for each report listing a stalled agent."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.claims: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=40_000)
        self.beats: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=4_000)
        self.closes: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=4_000)
        self.events: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=2_000)
        self.reader: Any = None
        self._msg: tuple[float, int, float, int] | None = None
        # collections over 20 ms, and windows closed blind with no outage near
        self.gcs: collections.deque[tuple[float, int, float]] = collections.deque(maxlen=2_000)
        self.blind_closes: list[tuple[Any, ...]] = []
        self._gc_start = 0.0

    def install(self) -> None:
        from nats.js.client import JetStreamContext

        from backbeat_trio._core.aggregate import BarAggregator
        from backbeat_trio._services import reverb as reverb_mod
        from backbeat_trio._services import reverb_claims

        trace = self
        take, add, observe, close = (
            reverb_mod._take_claim,
            BarAggregator.add_claim,
            BarAggregator.observe_beat,
            BarAggregator.close_window,
        )

        def take_claim(msg: Any, *args: Any) -> None:
            tokens = msg.reply.split(".")
            try:
                trace._msg = (time.time(), int(tokens[5]), int(tokens[7]) / 1e9, int(tokens[8]))
            except (IndexError, ValueError):
                trace._msg = (time.time(), 0, 0.0, 0)
            take(msg, *args)

        def add_claim(self_: Any, claim: Any, *args: Any) -> Any:
            outcome = add(self_, claim, *args)
            m = trace._msg or (time.time(), 0, 0.0, 0)
            hlc_ms = int(claim.hlc.split(":")[0], 16)
            trace.claims.append((*m, claim.beat_index, claim.agent_id, hlc_ms / 1e3, outcome))
            return outcome

        def observe_beat(self_: Any, beat: Any, arrival: float, *args: Any) -> Any:
            left = observe(self_, beat, arrival, *args)
            idx = getattr(beat, "beat_index", beat)
            hlc = getattr(beat, "hlc", "0:0:0")
            due = getattr(beat, "started_at", None)
            trace.beats.append(
                (time.time(), arrival, idx, int(hlc.split(":")[0], 16) / 1e3,
                 due.timestamp() if due else 0.0, hlc.split(":")[2], left)
            )  # fmt: skip
            return left

        def close_window(self_: Any, start: int, hlc: str, **kw: Any) -> Any:
            r = trace.reader
            sub = r.sub if r is not None else None
            stats = sub.messages.statistics() if sub is not None else None
            now = trio.current_time()
            trace.closes.append(
                (time.time(), now, start, kw.get("blind"), kw.get("catching_up"),
                 r.last_seq if r else None, r._waiting is not None if r else None,
                 round(now - r._drained_at, 4) if r else None,
                 r._blind_since, r._blind_until,
                 stats.current_buffer_used if stats else None)
            )  # fmt: skip
            quiet = r is not None and not r._outage_within(now, now, 10.0)
            if kw.get("blind") and quiet and len(trace.closes) > 1:
                trace.blind_closes.append((trace.closes[-1], trace.closes[-2][1]))
            return close(self_, start, hlc, **kw)

        def on_gc(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                trace._gc_start = time.perf_counter()
            elif (took := time.perf_counter() - trace._gc_start) > 0.02:
                trace.gcs.append((time.time(), info["generation"], round(took, 3)))

        gc.callbacks.append(on_gc)
        reverb_mod._take_claim = take_claim  # type: ignore[assignment]
        BarAggregator.add_claim = add_claim  # type: ignore[method-assign]
        BarAggregator.observe_beat = observe_beat  # type: ignore[method-assign]
        BarAggregator.close_window = close_window  # type: ignore[method-assign]

        init, went_down, resume, caught = (
            reverb_claims.ClaimReader.__init__,
            reverb_claims.ClaimReader.went_down,
            reverb_claims.ClaimReader.resume,
            reverb_claims.ClaimReader._caught_up,
        )

        def r_init(self_: Any, *a: Any, **k: Any) -> None:
            init(self_, *a, **k)
            trace.reader = self_

        def r_down(self_: Any, now: float) -> None:
            trace.events.append((time.time(), "went_down", now))
            went_down(self_, now)

        async def r_resume(self_: Any) -> None:
            trace.events.append((time.time(), "resume_start", self_.last_seq))
            await resume(self_)
            trace.events.append((time.time(), "resumed", self_.last_seq, self_._catch_up_to))

        def r_caught(self_: Any) -> None:
            trace.events.append((time.time(), "caught_up", self_.last_seq))
            caught(self_)

        reverb_claims.ClaimReader.__init__ = r_init  # type: ignore[method-assign]
        reverb_claims.ClaimReader.went_down = r_down  # type: ignore[method-assign]
        reverb_claims.ClaimReader.resume = r_resume  # type: ignore[method-assign]
        reverb_claims.ClaimReader._caught_up = r_caught  # type: ignore[method-assign]

        jsi = JetStreamContext._JSI
        reset, recreate = jsi.reset_ordered_consumer, jsi.recreate_consumer

        async def j_reset(self_: Any, sseq: Any) -> Any:
            trace.events.append((time.time(), "nats_reset_ordered", sseq, self_._sub._id))
            return await reset(self_, sseq)

        async def j_recreate(self_: Any) -> None:
            await recreate(self_)
            trace.events.append((time.time(), "nats_recreated", self_._psub._consumer))

        jsi.reset_ordered_consumer = j_reset  # type: ignore[method-assign]
        jsi.recreate_consumer = j_recreate  # type: ignore[method-assign]

    def summary(self) -> None:
        """Each window closed blind with no outage near, and the collections near it."""
        for close, opened in self.blind_closes:
            gcs = [g for g in self.gcs if close[0] - 2 < g[0] <= close[0]]
            row = {"blind_close": close, "open_s": round(close[1] - opened, 3), "gcs": gcs}
            append_line(self.path, json.dumps(row))
        append_line(self.path, json.dumps({"gcs_over_20ms": len(self.gcs)}))

    async def dump(self, window: int, wall: float) -> None:
        await trio.sleep(3.0)  # the window's claims that came late have arrived by now
        beats = range(window, window + 4)
        mine = [c for c in self.claims if c[4] in beats]
        close = next((c for c in self.closes if c[2] == window), None)
        close_wall = close[0] if close else wall
        around = [c for c in self.claims if close_wall - 1.5 <= c[0] <= close_wall + 1.5]
        bins: dict[int, list[Any]] = {}
        for c in around:
            b = bins.setdefault(int((c[0] - close_wall) // 0.05), [0, set(), 0.0])
            b[0] += 1
            b[1].add(c[4])
            b[2] = max(b[2], c[0] - c[2])
        fields = {
            "window": window,
            "report_wall": wall,
            "close": close,
            "closes_near": [c for c in self.closes if abs(c[0] - close_wall) < 1.5],
            "beats_near": [b for b in self.beats if abs(b[0] - close_wall) < 1.5],
            "claims_of_window": {
                "n": len(mine),
                "outcomes": collections.Counter(c[7] for c in mine),
                "hlc_min_max": [
                    min((c[5] for c in mine), default=0),
                    max((c[5] for c in mine), default=0),
                ],
                "stored_min_max": [
                    min((c[2] for c in mine), default=0),
                    max((c[2] for c in mine), default=0),
                ],
                "read_min_max": [
                    min((c[0] for c in mine), default=0),
                    max((c[0] for c in mine), default=0),
                ],
                "sseq_min_max": [
                    min((c[1] for c in mine), default=0),
                    max((c[1] for c in mine), default=0),
                ],
            },
            "read_bins_50ms": {
                k: [v[0], [*sorted(v[1])[:3], "...", *sorted(v[1])[-2:]], round(v[2], 3)]
                for k, v in sorted(bins.items())
            },
            "events": [e for e in self.events if e[0] > wall - 90],
        }
        append_line(self.path, json.dumps(fields, default=str))


async def run_pulse_role(url: str, cluster: str, tempo: int) -> None:
    cfg = bb3.PulseConfig(
        cluster_id=cluster, nats_url=url, tempo_bpm=tempo, reconnect_delay=RECONNECT_DELAY
    )
    async with trio.open_nursery() as nursery:
        pulse: bb3.PulseStatus = await nursery.start(bb3.run_pulse, cfg)
        say(ready="pulse")
        await next_command()
        nursery.cancel_scope.cancel()
    say(
        result={
            "published": pulse.published,
            "skipped_late": pulse.skipped_late,
            "skipped_disconnected": pulse.skipped_disconnected,
        }
    )


async def watch_stalled(status: bb3.ReverbStatus, trace: ReverbTrace | None = None) -> None:
    seen = 0
    while True:
        await status.wait_for_report()
        new = min(status.reports - seen, len(status.history))
        seen = status.reports
        for report in list(status.history)[len(status.history) - new :]:
            stalled = sorted(i.agent_id for i in report.issues if i.kind == "stalled")
            if stalled:
                say(stalled=len(stalled), window=report.from_beat, wall=time.time())
                if trace is not None:
                    await trace.dump(report.from_beat, time.time())


async def run_reverb_role(url: str, cluster: str, n_agents: int) -> None:
    keyring = bb3.Keyring({f"agent-{i}": agent_key(i).verify_key for i in range(n_agents)})
    trace = ReverbTrace(TRACE) if TRACE else None
    if trace is not None:
        trace.install()
    cfg = bb3.ReverbConfig(
        cluster_id=cluster, nats_url=url, keyring=keyring, reconnect_delay=RECONNECT_DELAY
    )
    async with open_nats_transport(cfg) as transport, trio.open_nursery() as nursery:
        status: bb3.ReverbStatus = await nursery.start(
            lambda task_status: bb3.run_reverb(cfg, transport=transport, task_status=task_status)
        )
        nursery.start_soon(watch_stalled, status, trace)
        say(ready="reverb")
        command = await next_command()
        expected = int(command[1]) if command[0] == "expect" else 0
        watch = status.watch_claims(buffer=1)
        with trio.move_on_after(FINAL_WAIT):
            while status.claims_counted + status.claims_late < expected:
                await watch.receive()
        await trio.sleep(0.5)  # a claim counted twice would show by now
        stored = None
        if status.stream is not None:
            with trio.move_on_after(5):
                summary = await transport.jetstream.stream_summary(status.stream)
                stored = None if summary is None else summary.last_seq
        assert status._frame_counts is not None
        if trace is not None:
            trace.summary()
        say(
            result={
                "counted": status.claims_counted,
                "late": status.claims_late,
                "rejected": status.rejected,
                "dropped": status.claims_dropped,
                "reports": status.reports,
                "issues": status.issues_by_kind,
                "stored": stored,
                "degraded": status._frame_counts().degraded_episodes,
            }
        )
        nursery.cancel_scope.cancel()


async def claim_every_beat(
    bb: bb3.Client,
    stop: trio.Event,
    counts: dict[str, int],
    behind: dict[int, int],
    grid: list[float],
) -> None:
    """Claim on every beat; ``behind`` counts, per window, the agents whose first claim naming
    it went out only after the window had ended (their process did not run in time: the
    reverb is right to call them ``stalled`` there).

    When a window ends is read off the pulse's schedule on the monotonic clock every process
    shares (``grid[0]``: the earliest time, less its index's beats, at which any agent took a
    beat, so the time beat 0 would have started, plus the least delay): the frames' wall-clock
    deadlines will not do, since the pulse derives them from its monotonic clock and the wall
    clock of a machine can run apart from it.
    """
    traced = TRACE is not None and bb.config.agent_id == "agent-0"
    bar = bb.config.beats_per_bar
    last_window = -1
    async for frame in bb.beats(buffer=64):
        if stop.is_set():
            return
        got = time.monotonic()
        start = got - frame.beat_index * frame.beat_duration
        if start < grid[0]:
            grid[0] = start
        claim = bb3.StatusClaim(task_id="work", state="executing", beats_left=1_000_000)
        await bb.emit_status(claim)
        counts["emitted"] += 1
        window = frame.beat_index - frame.beat_index % bar
        if window != last_window:
            last_window = window
            if time.monotonic() > grid[0] + (window + bar) * frame.beat_duration:
                behind[window] = behind.get(window, 0) + 1
        if traced:
            # on the pulse's schedule (the grid), as above; the wall time to line it up with
            # the reverb's trace
            done, due = time.monotonic(), grid[0] + frame.beat_index * frame.beat_duration
            if done - due > 0.1:
                late = [frame.beat_index, time.time(), round(got - due, 3), round(done - got, 3)]
                append_line(f"{TRACE}.agents", json.dumps([*late, bb.degraded]))


async def run_agents_role(url: str, cluster: str, n_agents: int) -> None:
    counts = {"emitted": 0}
    behind: dict[int, int] = {}
    grid = [math.inf]
    stop = trio.Event()
    conn_cfg = bb3.Config(
        cluster_id=cluster, agent_id="agents-conn", nats_url=url, reconnect_delay=RECONNECT_DELAY
    )
    clients: list[bb3.Client] = []
    async with (
        open_nats_transport(conn_cfg) as conn,
        trio.open_nursery() as nursery,
        contextlib.AsyncExitStack() as stack,
    ):
        for i in range(n_agents):
            cfg = bb3.Config(
                cluster_id=cluster,
                agent_id=f"agent-{i}",
                nats_url=url,
                signing_key=agent_key(i),
                jetstream=True,
                jitter_tolerance=0.1,
            )
            bb = await stack.enter_async_context(bb3.open_client(cfg, transport=conn))
            clients.append(bb)
            nursery.start_soon(claim_every_beat, bb, stop, counts, behind, grid)
        say(ready="agents")
        await next_command()
        stop.set()
        flushed = False
        with trio.move_on_after(FINAL_WAIT):
            for bb in clients:
                await bb.flush_claims()
            flushed = True
        say(result={"emitted": counts["emitted"], "flushed": flushed, "behind": behind})
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> None:
    role, url, cluster, n_agents, tempo = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4])
    if role == "pulse":
        trio.run(run_pulse_role, url, cluster, tempo)
    elif role == "reverb":
        trio.run(run_reverb_role, url, cluster, n_agents)
    elif role == "agents":
        trio.run(run_agents_role, url, cluster, n_agents)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
