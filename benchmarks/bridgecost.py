"""Benchmark 11, what the bridge (nats-py under trio-asyncio, into trio) costs per beat and claim.

The same work in a fresh process per figure (``benchmarks/_w_bridge.py``), four ways:

* ``aio``: plain asyncio nats-py (the baseline);
* ``tio``: the same asyncio code inside ``trio_asyncio.open_loop()`` (what trio-asyncio's loop
  alone costs);
* ``bridge``: backbeat_trio's transport (``open_nats_transport``) from trio, on its fast path;
* ``bridge-public``: the same with ``BACKBEAT_TRIO_NATS_FAST=0`` (nats-py's public API only).

**Per beat**: one subscription, frames published by the orchestrator one at a time
``FRAME_INTERVAL`` apart (each arrives alone, as a beat does); CPU-µs of the subscribing process
per frame delivered (``aio``/``tio``: to nats-py's callback; ``bridge``: to the inline handler
the clients' shared beat subscription uses).

**Per claim**: beats ``CLAIM_INTERVAL`` apart, each with a burst of publishes (1: a lone claim;
``BURST``: one beat's claims of many clients on one connection), alternating with beats without
publishes so the pacing's own cost cancels out; CPU-µs per message (``aio``/``tio``:
``await nc.publish``; ``bridge``: ``publish`` from trio).

The modes take turns within each repetition, their order rotating.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks._runner import Outcome, Params, info_row
from benchmarks.importcost import open_publisher, run_worker

BENCH = "11 Bridge cost"
MODES: dict[str, tuple[str, dict[str, str]]] = {
    "aio": ("aio", {}),
    "tio": ("tio", {}),
    "bridge": ("bridge", {}),
    "bridge-public": ("bridge", {"BACKBEAT_TRIO_NATS_FAST": "0"}),
}
LABELS = {
    "tio": "(info) the same nats-py code inside trio_asyncio.open_loop()",
    "bridge": "backbeat_trio transport, fast path",
    "bridge-public": "(info) backbeat_trio transport, BACKBEAT_TRIO_NATS_FAST=0",
}
FRAME_INTERVAL = 0.002
CLAIM_INTERVAL = 0.004
BURST = 100
PAYLOAD = 300
SUBJECT = "backbeat.beat.bridgecost"
BASE_LABEL = "plain asyncio nats-py"


def _rotated(rep: int) -> list[str]:
    names = list(MODES)
    k = rep % len(names)
    return names[k:] + names[:k]


async def bench_bridgecost(p: Params, out: Outcome, logdir: Path) -> None:
    reps = 3 if p.quick else 5
    frames = 500 if p.quick else 2000
    beats = 150 if p.quick else 500
    per_beat: dict[str, list[float]] = {m: [] for m in MODES}
    per_claim: dict[int, dict[str, list[float]]] = {b: {m: [] for m in MODES} for b in (1, BURST)}
    lost: dict[str, int] = dict.fromkeys(MODES, 0)
    async with open_publisher() as (url, conn):
        for rep in range(reps):
            for name in _rotated(rep):
                mode, env = MODES[name]
                common: dict[str, Any] = {"url": url, "subject": SUBJECT, "mode": mode, "env": env}
                sub = {
                    **common,
                    "role": "sub",
                    "frames": frames,
                    "limit_s": frames * FRAME_INTERVAL + 30.0,
                }
                res = await run_worker(
                    logdir, f"bridgecost-sub-{name}-{rep}", sub, (conn, frames, FRAME_INTERVAL)
                )
                lost[name] += res["expected"] - res["delivered"]
                per_beat[name].append(res["cpu_s"] / max(1, res["delivered"]) * 1e6)
                for burst in (1, BURST):
                    pub = {
                        **common,
                        "role": "pub",
                        "subject": f"{SUBJECT}.claims",
                        "beats": beats,
                        "burst": burst,
                        "interval": CLAIM_INTERVAL,
                        "payload": PAYLOAD,
                        "limit_s": 2 * beats * CLAIM_INTERVAL + 30.0,
                    }
                    res = await run_worker(logdir, f"bridgecost-pub{burst}-{name}-{rep}", pub)
                    extra = res["with"] - res["without"]
                    per_claim[burst][name].append(extra / (beats * burst) * 1e6)
    for name, label in LABELS.items():
        out.rows.append(
            info_row(
                BENCH,
                f"per beat, one frame in: {label}",
                "CPU-µs/frame",
                per_beat[name],
                per_beat["aio"],
                BASE_LABEL,
            )
        )
    for burst in (1, BURST):
        what = "a lone claim" if burst == 1 else f"{burst} claims per beat"
        for name, label in LABELS.items():
            out.rows.append(
                info_row(
                    BENCH,
                    f"per claim ({what}): {label}",
                    "CPU-µs/claim",
                    per_claim[burst][name],
                    per_claim[burst]["aio"],
                    BASE_LABEL,
                )
            )
    out.notes.append(
        f"Bridge cost: per beat {frames} frames {FRAME_INTERVAL * 1e3:g} ms apart to one "
        f"subscription (frames not delivered: {lost}); per claim {beats} beats "
        f"{CLAIM_INTERVAL * 1e3:g} ms apart with {PAYLOAD}-byte publishes, less as many beats "
        f"without; {reps} repetitions, a fresh process each, modes alternating."
    )
