"""Benchmark 8: what the admin server costs a pulse at 1200 BPM.

One real ``run_pulse`` with its admin server (worker ``_w_admin``) publishes for the whole run;
the orchestrator alternates blocks without and with a scraper that GETs ``/metrics`` every
100 ms (a new connection each time, as a prober without keep-alive does). Each published beat is
assigned, by the wall-clock time of its publish call, to the block it fell in, so both conditions
are measured in the same run, on the same pulse, under the same background load.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import h11
import trio

from backbeat_trio._embedded import open_embedded_nats_process
from benchmarks._stats import median, percentile

if TYPE_CHECKING:
    from benchmarks._runner import Outcome, Params

TEMPO = 1200
SCRAPE_PERIOD_S = 0.1
SETTLE_S = 0.2  # beats this close after a switch are left out of both conditions


async def _scrape(address: str) -> float:
    """One GET /metrics on a new connection; its duration in seconds."""
    host, _, port = address.rpartition(":")
    t0 = time.perf_counter()
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        await stream.send_all(
            conn.send(
                h11.Request(
                    method="GET",
                    target="/metrics",
                    headers=[("host", address), ("connection", "close")],
                )
            )
            + conn.send(h11.EndOfMessage())
        )
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                if event.status_code != 200:
                    raise RuntimeError(f"/metrics answered {event.status_code}")
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    return time.perf_counter() - t0


async def _scraper(address: str, took: list[float]) -> None:
    deadline = trio.current_time()
    while True:
        took.append(await _scrape(address))
        deadline += SCRAPE_PERIOD_S
        await trio.sleep_until(max(deadline, trio.current_time()))


async def bench_admin(p: Params, out: Outcome, logdir: Path) -> None:
    from benchmarks._runner import info_row, open_worker, solo_row

    ms = 1e3
    p50s: dict[str, list[float]] = {"idle": [], "scraped": []}
    p99s: dict[str, list[float]] = {"idle": [], "scraped": []}
    scrape_p50: list[float] = []
    scrape_p99: list[float] = []
    extras: list[str] = []
    beats = int((p.admin_blocks * p.admin_block_s + 2.0) * TEMPO / 60)
    async with (
        open_embedded_nats_process(jetstream=True) as server,
        open_worker("admin-pulse", "benchmarks._w_admin", {"url": server.url}, logdir) as pulse,
    ):
        for rep in range(p.admin_reps):
            await pulse.send({"cmd": "run", "cluster": f"adm{rep}", "tempo": TEMPO, "beats": beats})
            address = (await pulse.expect("started", 30.0))["address"]
            await trio.sleep(0.5)  # past start-up
            blocks: list[tuple[float, float, str]] = []
            took: list[float] = []
            for b in range(p.admin_blocks):
                # alternate, and start every other repetition with the scraper
                cond = "scraped" if (b + rep) % 2 else "idle"
                start = time.time()
                async with trio.open_nursery() as nursery:
                    if cond == "scraped":
                        nursery.start_soon(_scraper, address, took)
                    await trio.sleep(p.admin_block_s)
                    nursery.cancel_scope.cancel()
                blocks.append((start, time.time(), cond))
            res = await pulse.expect("result", 60.0)
            errors: dict[str, list[float]] = {"idle": [], "scraped": []}
            for wall, err in zip(res["wall_times"], res["errors"], strict=True):
                for start, end, cond in blocks:
                    if start + SETTLE_S <= wall < end:
                        errors[cond].append(abs(err))
                        break
            for cond in ("idle", "scraped"):
                p50s[cond].append(percentile(errors[cond], 50) * ms)
                p99s[cond].append(percentile(errors[cond], 99) * ms)
            scrape_p50.append(percentile(took, 50) * ms)
            scrape_p99.append(percentile(took, 99) * ms)
            extras.append(
                f"rep {rep}: {len(errors['idle'])} beats unscraped, {len(errors['scraped'])} "
                f"scraped ({len(took)} scrapes); published {res['published']}, skipped late "
                f"{res['skipped_late']}"
            )
    label = "same pulse, no scraper (alternating blocks)"
    bench = "8 Admin server"
    out.rows.append(
        info_row(
            bench,
            f"publish error p50 @ {TEMPO} BPM, /metrics scraped every 100 ms",
            "ms",
            p50s["scraped"],
            p50s["idle"],
            label,
        )
    )
    out.rows.append(
        info_row(
            bench,
            f"publish error p99 @ {TEMPO} BPM, /metrics scraped every 100 ms",
            "ms",
            p99s["scraped"],
            p99s["idle"],
            label,
        )
    )
    out.rows.append(solo_row(bench, "GET /metrics p50 (new connection each)", "ms", scrape_p50))
    out.rows.append(solo_row(bench, "GET /metrics p99", "ms", scrape_p99))
    out.notes.append(
        f"Admin server: {p.admin_reps} run(s) of {p.admin_blocks} alternating "
        f"{p.admin_block_s:g} s blocks; beats within {SETTLE_S:g} s of a switch left out. "
        + "; ".join(extras)
        + f". Median p99 without/with scraper: {median(p99s['idle']):.3f} / "
        f"{median(p99s['scraped']):.3f} ms."
    )
