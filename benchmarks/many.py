"""Benchmark 6c, many agents in one process on one connection (``open_client(cfg,
transport=conn)``: one beat subscription, each frame decoded once, fanned out to every client).

Three workers per N, one after the other against one nats-server and one real ``run_pulse``:

* ``shared``: N full ``open_client`` agents on one connection, each one task that consumes
  ``beats()`` (as each agent of baseline A is one subscription with its callback);
* ``shared-frozen``: the same, with ``gc.freeze()`` once the agents are connected (the goals
  at N=1000 were set for it; the 2,000-agent goal is without it);
* ``join``: the same N agents joining one process while the pulse already beats (the join
  storm of a big agent host starting): no beat may be made up, no real frame discarded, and the
  library may log one warning at most;
* ``plain-one``: plain asyncio nats-py, one connection with one subscription (and callback
  decoding the frame) per agent — the baseline of the goals;
* ``plain``: plain asyncio nats-py, one connection and subscription per agent (info);
* ``floor``: no client at all: one subscription, each frame screened once and put in each
  agent's ``DropOldestChannel``, read by a consumer task per agent as in ``shared`` — what a trio
  task per agent costs before any client work, the lower bound of ``shared`` (info).

CPU per agent-beat is the worker process's CPU time over the agent-beats it delivered in a window;
latency is arrival minus the beat's scheduled start; "synthesised" counts beats a client delivered
from its own metronome because the pulse's frame was late; RSS per agent is the growth of the
worker's RSS from before its agents connected to the end, over N.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import trio

from benchmarks._report import Row
from benchmarks._runner import (
    Outcome,
    Params,
    info_row,
    open_embedded_nats_process,
    open_worker,
    scale_args,
    solo_row,
    start_pulse,
    start_workers,
)
from benchmarks._stats import median

BENCH = "6c Many agents, one connection"
IMPLS = (
    ("shared", "benchmarks._w_client", {"shared": True}),
    ("shared-frozen", "benchmarks._w_client", {"shared": True, "gc_freeze": True}),
    ("plain-one", "benchmarks._w_plain", {"one_connection": True}),
    ("plain", "benchmarks._w_plain", {}),
    ("floor", "benchmarks._w_client", {"floor": True}),
    ("join", "benchmarks._w_client", {"shared": True}),
)
GOAL_N = 1000  # the size the goals are set for; larger sizes report where it breaks


async def bench_many(p: Params, out: Outcome, logdir: Path) -> None:
    d = 60.0 / p.scale_tempo
    async with (
        open_embedded_nats_process(jetstream=True) as server,
        open_worker("pulse-many", "benchmarks._w_pulse", {"url": server.url}, logdir) as pulse,
    ):
        for n in p.many_ns:
            results: dict[str, dict[str, Any]] = {}
            for impl, module, extra in IMPLS:
                if impl == "join" and n != GOAL_N:
                    continue
                cluster = f"many{n}{impl.replace('-', '')}"
                wargs = scale_args(p, server.url, cluster, n, **extra)
                async with contextlib.AsyncExitStack() as stack:
                    workers = await start_workers(
                        stack, {impl: (f"many-{n}-{impl}", module, wargs)}, logdir
                    )
                    w = workers[impl]
                    beats = 10 + p.scale_windows * p.scale_window_beats + 40
                    if impl == "join":  # the pulse beats before the agents join
                        await start_pulse(pulse, cluster, p.scale_tempo, beats + 100)
                        await trio.sleep(10 * d)
                    await w.send({"cmd": "go"})
                    ready = await w.expect("ready", 600.0)
                    if impl != "join":
                        await start_pulse(pulse, cluster, p.scale_tempo, beats)
                    results[impl] = await w.expect("result", beats * d + 300.0)
                    results[impl]["connect_s"] = ready["connect_s"]
                    await pulse.send({"cmd": "stop"})
                    await pulse.expect("result", 30.0)
                    await w.close()
            _rows(p, out, n, results)


def _goal_row(
    figure: str, unit: str, ours: list[float], base: list[float], goal: str, limit: float
) -> Row:
    met = median(ours) <= limit * median(base)
    return Row(
        BENCH,
        figure,
        unit,
        ours,
        base,
        "plain nats-py, one subscription per agent on one connection",
        goal,
        met,
    )


def _join_rows(out: Outcome, n: int, res: dict[str, Any]) -> None:
    """The join storm: ``n`` agents joined while the pulse beat (then the measured windows)."""
    figure = f"N={n} joining while beats flow"
    for what, value, goal, met in (
        ("beats made up locally", res["degraded_beats"], "0", res["degraded_beats"] == 0),
        ("real frames discarded", res["discarded"], "0", res["discarded"] == 0),
        ("warnings logged", res["warnings"], "≤ 1", res["warnings"] <= 1),
    ):
        out.rows.append(solo_row(BENCH, f"{figure}: {what}", "", [float(value)], goal, met))
    if res["warning_texts"]:
        out.notes.append(f"Join storm N={n}: warnings {res['warning_texts']}")


def _synthesised(res: dict[str, Any]) -> list[float]:
    """Per window, the share of agent-beats the clients synthesised locally (%)."""
    return [
        100.0 * lb / max(1, ab)
        for lb, ab in zip(res["local_beats"], res["agent_beats"], strict=True)
    ]


def _rows(p: Params, out: Outcome, n: int, results: dict[str, dict[str, Any]]) -> None:
    ours, one, per = results["shared"], results["plain-one"], results["plain"]
    goals = n == GOAL_N
    cpu = ours["cpu_us_per_agent_beat"]
    lat = [v * 1e3 for v in ours["latency_p99"]]
    one_lat = [v * 1e3 for v in one["latency_p99"]]
    label = "plain nats-py, one subscription per agent on one connection"
    if goals:  # the documented way for a thousand agents: gc.freeze() after connecting
        frozen = results["shared-frozen"]
        how = f"N={n}, gc.freeze() after connecting"
        out.rows.append(
            _goal_row(
                f"{how}: CPU per agent-beat",
                "µs",
                frozen["cpu_us_per_agent_beat"],
                one["cpu_us_per_agent_beat"],
                "≤ 1.0× baseline",
                1.0,
            )
        )
        out.rows.append(
            _goal_row(
                f"{how}: beat latency p99",
                "ms",
                [v * 1e3 for v in frozen["latency_p99"]],
                one_lat,
                "≤ 1.0× baseline",
                1.0,
            )
        )
        out.rows.append(
            _goal_row(
                f"{how}: RSS per agent",
                "KiB",
                [frozen["rss_per_client_running"] / 1024],
                [one["rss_per_client_running"] / 1024],
                "≤ 2× baseline",
                2.0,
            )
        )
        _join_rows(out, n, results["join"])
    if n == 2 * GOAL_N:  # twice as many, and no gc.freeze()
        out.rows.append(
            _goal_row(f"N={n}: beat latency p99", "ms", lat, one_lat, "≤ 2× baseline", 2.0)
        )
    out.rows.append(
        info_row(
            BENCH, f"N={n}: CPU per agent-beat", "µs", cpu, one["cpu_us_per_agent_beat"], label
        )
    )
    if n != 2 * GOAL_N:
        out.rows.append(info_row(BENCH, f"N={n}: beat latency p99", "ms", lat, one_lat, label))
    label = "plain nats-py, one connection per agent"
    out.rows.append(
        info_row(
            BENCH,
            f"N={n}: CPU per agent-beat, vs a connection per agent",
            "µs",
            cpu,
            per["cpu_us_per_agent_beat"],
            label,
        )
    )
    out.rows.append(
        info_row(
            BENCH,
            f"N={n}: beat latency p99, vs a connection per agent",
            "ms",
            lat,
            [v * 1e3 for v in per["latency_p99"]],
            label,
        )
    )
    synth = _synthesised(ours)
    out.rows.append(
        solo_row(
            BENCH,
            f"N={n}: beats synthesised locally",
            "%",
            synth,
            "0 %" if n == 2 * GOAL_N else "(info)",
            (max(synth) == 0.0) if n == 2 * GOAL_N else None,
        )
    )
    window_s = p.scale_window_beats * 60.0 / p.scale_tempo
    out.rows.append(
        solo_row(
            BENCH,
            f"N={n}: CPU busy (share of one core)",
            "%",
            [100.0 * c / window_s for c in ours["cpu_s"]],
        )
    )
    for impl, res in (
        ("one connection, one subscription per agent", one),
        ("a connection per agent", per),
    ):
        out.rows.append(
            info_row(
                BENCH,
                f"N={n}: RSS per agent, vs plain nats-py with {impl}",
                "KiB",
                [ours["rss_per_client_running"] / 1024],
                [res["rss_per_client_running"] / 1024],
                f"plain nats-py, {impl}",
            )
        )
    for res, how in ((ours, ""), (results["shared-frozen"], ", gc.freeze() after connecting")):
        out.rows.append(
            solo_row(
                BENCH,
                f"N={n}{how}: longest garbage-collector pause per window",
                "ms",
                [v * 1e3 for v in res["gc_max_s"]],
            )
        )
    floor = results["floor"]
    label = "plain nats-py, one subscription per agent on one connection"
    out.rows.append(
        info_row(
            BENCH,
            f"N={n}: CPU per agent-beat of the trio floor (a channel put and a consumer's wake)",
            "µs",
            floor["cpu_us_per_agent_beat"],
            one["cpu_us_per_agent_beat"],
            label,
        )
    )
    out.rows.append(
        info_row(
            BENCH,
            f"N={n}: CPU per agent-beat, vs the trio floor",
            "µs",
            cpu,
            floor["cpu_us_per_agent_beat"],
            "the trio floor: one decode, then per agent a channel put and its consumer's wake",
        )
    )
    frozen = results["shared-frozen"]
    label = "the same agents without gc.freeze()"
    for figure, unit, scale, key in (
        ("CPU per agent-beat", "µs", 1.0, "cpu_us_per_agent_beat"),
        ("beat latency p99", "ms", 1e3, "latency_p99"),
    ):
        out.rows.append(
            info_row(
                BENCH,
                f"N={n}, gc.freeze() after connecting: {figure}, vs without it",
                unit,
                [v * scale for v in frozen[key]],
                [v * scale for v in ours[key]],
                label,
            )
        )
    frozen_synth = _synthesised(frozen)
    out.rows.append(
        solo_row(
            BENCH,
            f"N={n}, gc.freeze() after connecting: beats synthesised locally",
            "%",
            frozen_synth,
        )
    )
    want = n * p.scale_window_beats
    out.rows.append(
        info_row(
            BENCH,
            f"N={n}: agent-beats delivered per window",
            "% of N × beats",
            [100.0 * v / want for v in ours["agent_beats"]],
            [100.0 * v / want for v in one["agent_beats"]],
            "plain nats-py, one subscription per agent on one connection",
        )
    )
    out.notes.append(
        f"Many agents N={n}: connect {ours['connect_s']:.2f} s (plain one connection "
        f"{one['connect_s']:.2f} s, a connection each {per['connect_s']:.2f} s); latency p50 "
        f"{median(ours['latency_p50']) * 1e3:.2f} ms (plain one connection "
        f"{median(one['latency_p50']) * 1e3:.2f} ms, a connection each "
        f"{median(per['latency_p50']) * 1e3:.2f} ms); stale {ours['stale']}, dropped "
        f"{ours['dropped']}, degraded beats {ours['degraded_beats']}; baseline CPU busy "
        + ", ".join(f"{100 * c / window_s:.0f}" for c in one.get("cpu_s", []))
        + " % of a core (one connection)."
    )
