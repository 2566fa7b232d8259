"""Benchmark 9, the reverb's ingest of signed claims, against its floor (a bare verify loop).

N agents × M beats of pre-signed claims (``benchmarks/_signed.py``: each agent's own HLC stamp,
``encode_claim``, a ``Signer``'s headers and ``Nats-Msg-Id``, as an agent's outbox makes them),
the same bodies in every part:

* **(a) the floor**: a bare PyNaCl loop, ``nacl.bindings.crypto_sign_open(signature + body,
  public_key)`` over the claims (the signed messages built beforehand); the loop through
  ``VerifyKey.verify(body, signature)`` (what ``verify_claim`` calls) is shown for information.
* **(b) the reverb's path without NATS**: per claim, the reverb's own per-claim function
  (``_take_claim`` in ``backbeat_trio/_services/reverb.py``) on the objects the reverb builds:
  ``ClaimJudge.verify`` (``verify_claim``: decode, headers, keyring, signature, skew bound,
  ``ReplayCache``), the reverb HLC's merge, ``BarAggregator.add_claim``, the ``AcceptedClaim``
  handed out and ``ReverbStatus``'s counters and latest claims; per beat
  ``BarAggregator.observe_beat``, and ``close_window`` when a window ends (its cost included).
  The claim loop's stream-sequence check (``ClaimReader.take``) reads the JetStream reply
  subject, so it is left to (c).
  (a) and (b) take turns in this process beat by beat (the order rotating), so the
  machine's load falls on both alike.
* **(c) end to end**: a real ``run_reverb`` in its own process (worker ``_w_ingest``, role
  ``reverb``) following a real ``run_pulse`` (worker ``_w_pulse``, 30 BPM, so no window the
  claims name closes during a run), and a plain asyncio nats-py publisher in a third process
  (role ``publish``) sending the pre-signed claims to the status stream as fast as JetStream
  acknowledges them (a reply inbox per claim, as the SDK does). Claims/s = claims ÷ the time from
  the start signal until the reverb has taken in the last one (counted, late or rejected: all
  must be counted); CPU per claim = the reverb process's CPU time over the same interval ÷
  claims, which includes nats-py's receive, the bridge into trio and the reverb's beat following.
  The publisher and nats-server run at the same time on the same cores.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nacl.bindings
from nacl.signing import VerifyKey

from backbeat_trio._core.aggregate import BarAggregator
from backbeat_trio._core.hlc import HLC
from backbeat_trio._core.signing import HEADER_SIG, Keyring, ReplayCache
from backbeat_trio._services.reverb import ReverbStatus, _take_claim
from backbeat_trio._services.reverb_claims import ClaimJudge
from backbeat_trio._transport.base import MemoryMessage
from benchmarks import _signed
from benchmarks._report import Row
from benchmarks._stats import median

if TYPE_CHECKING:
    from benchmarks._runner import Outcome, Params

BENCH = "9 Reverb ingest"
CLUSTER = "ingest"
BEATS_PER_BAR = 4
#: the pulse's tempo in (c): slow, so the windows the claims name stay open during a run
E2E_TEMPO = 30
#: (c): the claims name beats from here on (window 1: ahead of the pulse, which starts at 0)
E2E_FIRST_BEAT = BEATS_PER_BAR
FLOOR_LABEL = "bare PyNaCl loop: crypto_sign_open(sig + body, key)"
#: the share of one core a reverb may spend on claims in the capacity figures
HEADROOM = 0.5


class Floor:
    """(a): bare PyNaCl loops over the claims, timed a slice at a time."""

    def __init__(self, claims: list[_signed.SignedClaim]) -> None:
        self.opened = [(c.signed_message, c.public) for c in claims]
        keys = {c.public: VerifyKey(c.public) for c in claims}
        self.verified = [
            (keys[c.public], c.body, base64.b64decode(c.headers[HEADER_SIG])) for c in claims
        ]

    def sign_open(self, lo: int, hi: int) -> float:
        """CPU seconds for ``crypto_sign_open(signature + body, key)`` over claims ``lo:hi``."""
        sign_open = nacl.bindings.crypto_sign_open
        t0 = time.process_time()
        for signed_message, public in self.opened[lo:hi]:
            sign_open(signed_message, public)
        return time.process_time() - t0

    def verify_key(self, lo: int, hi: int) -> float:
        """CPU seconds for ``VerifyKey.verify(body, signature)`` (what ``verify_claim`` calls) over
        claims ``lo:hi``."""
        t0 = time.process_time()
        for key, body, signature in self.verified[lo:hi]:
            key.verify(body, signature)
        return time.process_time() - t0


class ReverbPath:
    """(b): the reverb's per-beat steps and its per-claim function on the objects the reverb
    builds, fed a beat at a time (``beat(m)``: beat ``m`` in, then its claims)."""

    def __init__(self, messages: list[MemoryMessage], keyring: Keyring, beats: int) -> None:
        self.messages = messages
        self.per_beat = len(messages) // beats
        self.hlc = HLC("bench-reverb")
        self.aggregator = BarAggregator(CLUSTER, beats_per_bar=BEATS_PER_BAR)
        self.status = ReverbStatus(CLUSTER, reverb_id="bench-reverb")
        self.judge = ClaimJudge(keyring, False, ReplayCache(), self.hlc, time.time)
        self.reports = 0
        self.close_s = 0.0  # CPU seconds in close_window (part of beat()'s time)

    def beat(self, m: int) -> float:
        """CPU seconds for beat ``m`` (a window closed when it ends one) and its claims, if any."""
        aggregator, status, judge = self.aggregator, self.status, self.judge
        t0 = time.process_time()
        left = aggregator.observe_beat(m, time.monotonic(), 600)
        if left is not None:
            c0 = time.process_time()
            aggregator.close_window(left, str(self.hlc.now()))
            self.close_s += time.process_time() - c0
            self.reports += 1
        for msg in self.messages[m * self.per_beat : (m + 1) * self.per_beat]:
            _take_claim(msg, aggregator, judge, status)
        return time.process_time() - t0


def run_in_process(p: Params) -> dict[str, Any]:
    """(a) and (b), ``p.ingest_reps`` repetitions; within one, the parts take turns beat by beat
    (the order rotating), so the machine's load falls on all of them alike. Claims per CPU
    second, per repetition."""
    n, beats = p.ingest_agents, p.ingest_beats
    claims = _signed.make_claims(n, beats, first_beat=0)
    ring = _signed.keyring(n)
    floor = Floor(claims)
    subject = f"backbeat.status.{CLUSTER}"
    messages = [MemoryMessage(subject, c.body, headers=c.headers) for c in claims]
    k = len(claims)
    rates: dict[str, list[float]] = {"floor": [], "verify_key": [], "reverb": []}
    counts: dict[str, int] = {}
    close_us: list[float] = []  # close_window's CPU time per window, per agent
    gc.collect()
    gc.freeze()  # the fixtures are not the reverb's: its collections need not walk them
    try:
        for _ in range(p.ingest_reps):
            gc.collect()
            path = ReverbPath(messages, ring, beats)
            took = dict.fromkeys(rates, 0.0)
            parts = list(rates)
            for m in range(beats + BEATS_PER_BAR):
                # the beats past the claims only close the last window (in the reverb's time)
                lo, hi = min(m, beats) * n, min(m + 1, beats) * n
                for part in parts[m % 3 :] + parts[: m % 3]:
                    if part == "floor":
                        took[part] += floor.sign_open(lo, hi)
                    elif part == "verify_key":
                        took[part] += floor.verify_key(lo, hi)
                    else:
                        took[part] += path.beat(m)
            status = path.status
            counts = {
                "counted": status.claims_counted,
                "late": status.claims_late,
                "rejected": status.rejected,
                "reports": path.reports,
            }
            if counts["counted"] != k:
                raise RuntimeError(f"the reverb path counted {counts} of {k} claims")
            for part, seconds in took.items():
                rates[part].append(k / seconds)
            close_us.append(path.close_s / max(1, path.reports) / n * 1e6)
    finally:
        gc.unfreeze()
    return {"rates": rates, "counts": counts, "claims": k, "close_us": median(close_us)}


async def run_end_to_end(p: Params, logdir: Path) -> dict[str, Any]:
    """(c): ``p.ingest_e2e_reps`` runs of a real reverb fed by a JetStream publisher."""
    from backbeat_trio._embedded import open_embedded_nats_process
    from benchmarks._runner import start_pulse, start_workers

    n, beats = p.ingest_agents, p.ingest_beats
    k = n * beats
    runs: list[dict[str, Any]] = []
    async with (
        open_embedded_nats_process(jetstream=True) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        url = server.url
        workers = await start_workers(
            stack,
            {
                "pulse": ("ingest-pulse", "benchmarks._w_pulse", {"url": url}),
                "reverb": ("ingest-reverb", "benchmarks._w_ingest", {"role": "reverb", "url": url}),
                "pub": ("ingest-pub", "benchmarks._w_ingest", {"role": "publish", "url": url}),
            },
            logdir,
        )
        pulse, reverb, pub = workers["pulse"], workers["reverb"], workers["pub"]
        await pub.send({"cmd": "prepare", "n": n, "beats": beats, "first_beat": E2E_FIRST_BEAT})
        await pub.expect("prepared", 300.0)
        for rep in range(p.ingest_e2e_reps):
            cluster = f"{CLUSTER}{rep}"
            await reverb.send({"cmd": "run", "cluster": cluster, "n": n, "expect": k})
            await reverb.expect("subscribed", 60.0)
            await start_pulse(pulse, cluster, E2E_TEMPO, 10_000)
            await reverb.expect("listening", 30.0)
            await pub.send({"cmd": "connect", "cluster": cluster})
            await pub.expect("connected", 30.0)
            load = os.getloadavg()
            await reverb.send({"cmd": "go"})
            await pub.send({"cmd": "go"})
            published = await pub.expect("result", 300.0)
            taken = await reverb.expect("result", 300.0)
            await pulse.send({"cmd": "stop"})
            await pulse.expect("result", 30.0)
            runs.append({**taken, "pub": published, "load": load})
    return {"runs": runs, "claims": k}


async def bench_ingest(p: Params, out: Outcome, logdir: Path) -> None:
    from benchmarks._runner import info_row, solo_row

    local = run_in_process(p)
    e2e = await run_end_to_end(p, logdir)
    k = local["claims"]
    # per CPU second (a, b); claims/s of wall time (c)
    rates = {part: [r / 1e3 for r in v] for part, v in local["rates"].items()}
    floor = rates["floor"]
    ratio = median(rates["reverb"]) / median(floor)
    size = f"{p.ingest_agents} agents × {p.ingest_beats} beats"
    out.rows.append(
        Row(
            BENCH,
            f"(b) reverb path without NATS: verify + aggregate ({size})",
            "k claims/CPU-s",
            rates["reverb"],
            floor,
            FLOOR_LABEL,
            "≥ 0.7× the bare verify loop",
            ratio >= 0.7,
            higher_better=True,
        )
    )
    out.rows.append(
        info_row(
            BENCH,
            "(a, info) VerifyKey.verify(body, sig) loop, as verify_claim calls it",
            "k claims/CPU-s",
            rates["verify_key"],
            floor,
            FLOOR_LABEL,
        )
    )
    runs = e2e["runs"]
    e2e_cpu = [r["claims"] / r["cpu_s"] / 1e3 for r in runs]
    out.rows.append(
        info_row(
            BENCH,
            "(c) end to end: a run_reverb process fed over JetStream, per CPU second of it",
            "k claims/CPU-s",
            e2e_cpu,
            floor,
            FLOOR_LABEL,
        )
    )
    out.rows.append(
        solo_row(
            BENCH,
            "(c) end to end: claims/s from the start until the reverb took in the last",
            "k claims/s",
            [r["claims"] / r["wall_s"] / 1e3 for r in runs],
        )
    )
    out.rows.append(
        solo_row(
            BENCH,
            "(c) the publisher alone: claims/s until all acknowledged",
            "k claims/s",
            [r["pub"]["rate"] / 1e3 for r in runs],
        )
    )
    floor_us = 1e3 / median(floor)
    b_us = 1e3 / median(rates["reverb"])
    c_us = median([r["cpu_s"] / r["claims"] * 1e6 for r in runs])
    capacity = ", ".join(
        f"{bpm} BPM {HEADROOM * 60.0 / bpm / (c_us * 1e-6):,.0f}" for bpm in (1, 24, 600)
    )
    counts = local["counts"]
    out.notes.append(
        f"Reverb ingest: {k} claims ({size}, one claim per agent per beat, "
        f"{BEATS_PER_BAR}-beat windows), the same bodies in (a), (b) and (c). CPU per claim "
        f"(medians): the floor {floor_us:.1f} µs, VerifyKey.verify "
        f"{1e3 / median(rates['verify_key']):.1f} µs, the reverb path without NATS {b_us:.1f} µs "
        f"({counts['reports']} windows closed per repetition, close_window "
        f"{local['close_us']:.2f} µs per agent each; all {counts['counted']} claims counted), "
        f"end to end {c_us:.1f} µs of the reverb process. (c) runs: "
        + "; ".join(
            f"{r['claims'] / r['wall_s']:,.0f}/s, {r['counted']} counted, {r['late']} late, "
            f"{r['rejected']} rejected, {r['dropped']} dropped, the reverb busy "
            f"{100 * r['cpu_s'] / r['wall_s']:.0f} % of a core, the publisher "
            f"{r['pub']['rate']:,.0f}/s (load average {r['load'][0]:.2f})"
            for r in runs
        )
        + f". Agents one reverb holds on {HEADROOM:.0%} of a core at (c)'s CPU per claim, one "
        f"claim per agent per beat: {capacity} (CPU only; see docs/scale.md §7 for the other "
        "bounds)."
    )
