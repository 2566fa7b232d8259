"""Benchmark 10, what ``import backbeat_trio`` costs a plain asyncio program in the same process.

trio-asyncio, once imported, replaces asyncio's ``get_running_loop`` and friends for the whole
process (asyncio's own queues, events and futures call them per message), so backbeat_trio
imports it only when a NATS transport opens. This checks that it stays so, measured: plain asyncio
nats-py, one connection with many subscriptions to a beat-like flow, each callback decoding the
frame with stdlib ``json`` (baseline A of the many-agents figures), in a fresh process
(``benchmarks/_w_bridge.py``, role ``import``) that first imports

* nothing (the baseline),
* ``backbeat_trio`` (the goal: at least 0.95× the baseline's speed),
* ``trio_asyncio`` (info: what the lazy import avoids).

The orchestrator publishes the frames over its own connection, one at a time and
``FRAME_INTERVAL`` apart, to a real embedded nats-server; the variants take turns within each
repetition (their order rotating). Speed = frames delivered to callbacks per CPU-second of the
subscribing process, from its subscriptions being ready until the last frame arrived.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from backbeat_trio import ConnectionOptions, open_nats_transport
from backbeat_trio._embedded import open_embedded_nats_process
from benchmarks._report import Row
from benchmarks._runner import Outcome, Params, WorkerError, open_worker

if TYPE_CHECKING:
    from backbeat_trio import NatsTransport

BENCH = "10 Import cost"
WORKER = "benchmarks._w_bridge"
VARIANTS = ("none", "backbeat_trio", "trio_asyncio")
SUBSCRIPTIONS = 100
FRAME_INTERVAL = 0.005
SUBJECT = "backbeat.beat.importcost"


def beat_frame(index: int) -> bytes:
    """A beat frame as the pulse publishes it (the JSON shape and size of SPEC's BeatFrame)."""
    deadline = _dt.datetime.now(_dt.UTC) + _dt.timedelta(milliseconds=100)
    return json.dumps(
        {
            "type": "backbeat.beatframe.v1",
            "cluster_id": "importcost",
            "beat_index": index,
            "downbeat": index % 4 == 0,
            "phase": index % 4,
            "hlc": f"{int(deadline.timestamp() * 1000):012x}:0000:1a2b",
            "deadline_at": deadline.isoformat(),
            "tempo_bpm": 600,
            "window_id": f"{index // 4:016x}",
        },
        separators=(",", ":"),
    ).encode()


@contextlib.asynccontextmanager
async def open_publisher() -> AsyncIterator[tuple[str, NatsTransport]]:
    """An embedded nats-server and the orchestrator's own connection to it."""
    async with (
        open_embedded_nats_process() as server,
        open_nats_transport(ConnectionOptions(nats_url=server.url)) as conn,
    ):
        yield server.url, conn


async def publish_paced(conn: NatsTransport, subject: str, frames: int, interval: float) -> None:
    """``frames`` beat frames on ``subject``, one every ``interval`` seconds."""
    start = trio.current_time()
    for i in range(frames):
        await trio.sleep_until(start + i * interval)
        conn.publish(subject, beat_frame(i))
    await conn.flush()


async def run_worker(
    logdir: Path,
    name: str,
    wargs: dict[str, Any],
    feed: tuple[NatsTransport, int, float] | None = None,
) -> dict[str, Any]:
    """One fresh worker process (:mod:`benchmarks._w_bridge`) and its result; ``feed``:
    publish that many frames that far apart on ``wargs["subject"]`` once it is ready."""
    async with open_worker(name, WORKER, wargs, logdir) as w:
        if feed is not None:
            await w.expect("ready", 60.0)
            conn, frames, interval = feed
            await publish_paced(conn, wargs["subject"], frames, interval)
        res = await w.recv(frames_limit(wargs))
        if res.get("event") != "result":
            raise WorkerError(f"{name}: expected a result, got {str(res)[:200]}")
        return res


def frames_limit(wargs: dict[str, Any]) -> float:
    """How long a worker may take for its result."""
    return float(wargs.get("limit_s", 120.0)) + 30.0


async def bench_importcost(p: Params, out: Outcome, logdir: Path) -> None:
    frames = 200 if p.quick else 1000
    reps = 3 if p.quick else 15
    speed: dict[str, list[float]] = {v: [] for v in VARIANTS}
    lost: dict[str, int] = dict.fromkeys(VARIANTS, 0)
    async with open_publisher() as (url, conn):
        for rep in range(reps):
            order = VARIANTS[rep % 3 :] + VARIANTS[: rep % 3]
            for variant in order:
                wargs = {
                    "role": "import",
                    "variant": variant,
                    "url": url,
                    "subject": SUBJECT,
                    "subs": SUBSCRIPTIONS,
                    "frames": frames,
                    "limit_s": frames * FRAME_INTERVAL + 30.0,
                }
                res = await run_worker(
                    logdir,
                    f"importcost-{variant}-{rep}",
                    wargs,
                    (conn, frames, FRAME_INTERVAL),
                )
                lost[variant] += res["expected"] - res["delivered"]
                speed[variant].append(res["delivered"] / res["cpu_s"] / 1e3)
    base = speed["none"]
    label = "the same, nothing imported first"
    what = f"{SUBSCRIPTIONS} subscriptions on one connection, json per frame"
    row = Row(
        BENCH,
        f"plain asyncio nats-py after `import backbeat_trio` ({what})",
        "k frames/CPU-s",
        speed["backbeat_trio"],
        base,
        label,
        "≥ 0.95× the same without the import",
        None,
        higher_better=True,
        paired=True,
    )
    row.met = row.ratio >= 0.95
    out.rows.append(row)
    out.rows.append(
        Row(
            BENCH,
            "(info) the same after `import trio_asyncio` (what the lazy import avoids)",
            "k frames/CPU-s",
            speed["trio_asyncio"],
            base,
            label,
            "(info)",
            None,
            higher_better=True,
            paired=True,
        )
    )
    out.notes.append(
        f"Import cost: {frames} frames {FRAME_INTERVAL * 1e3:g} ms apart to {SUBSCRIPTIONS} "
        f"nats-py subscriptions in a fresh process per variant, {reps} repetitions, variants "
        "alternating; the ratios are the medians of the repetitions' ratios (a fresh process "
        "now and then runs slower, whichever variant it is); frames not delivered: "
        f"{lost}."
    )
