"""Worker: the baselines — plain asyncio + nats-py, no backbeat_trio, in their own process.

Roles (argv JSON ``role``):

* ``beats``: a nats-py subscriber (callback) on the beat subject; in the callback it decodes the
  frame with stdlib ``json`` and then notes ``time.time()`` — what an application using plain
  nats-py would see, at the same point as the backbeat_trio consumer of ``beats()``.
* ``claims``: the same work as ``emit_status`` minus the SDK: build the claim, encode it with
  msgspec, sign it with libsodium (PyNaCl), ``await nc.publish(...)`` with the same headers
  (``Nats-Msg-Id`` in SPEC's ``<agent_id>:<hlc>:<digest>`` form, the digest over body and
  signature: the wire contract, so the baseline sends what a conforming publisher must; it used
  to send the v1 ``<agent_id>:<hlc>`` id, one hash per claim less than the SDK's);
  then ``nc.flush()`` (core) or wait for every PubAck (JetStream: acks on one wildcard inbox, as
  the SDK does; an ack is counted without decoding it, a shortcut kept in the baseline's favour).
  Each run starts with an untimed warm-up of ``WARMUP`` claims, as the SDK worker's does.
* ``scale``: N nats-py connections in this one process (with ``one_connection``: one connection
  with N subscriptions), each subscribed to the beats with a callback that decodes the frame and
  computes its scheduled start (what the backbeat_trio scale worker's consumers do).
* ``recovery``: publishes claims at the SDK workers' rate through a server restart and subscribes to
  the beats, with ``reconnect_time_wait`` equal to the SDK's ``reconnect_delay`` default (1 s).
"""

from __future__ import annotations

import array
import asyncio
import base64
import datetime as _dt
import gc
import hashlib
import json
import time
from typing import Any

import msgspec
import nacl.bindings
import nats
from nats.js.api import StreamConfig

from benchmarks._proto import args, log, read_command, send
from benchmarks._stats import percentile

AGENT = "bench-plain"
#: claims of the untimed warm-up before a claims run's timed repetitions (as the SDK worker's)
WARMUP = 200
NODE = int.from_bytes(hashlib.sha256(AGENT.encode()).digest()[:2], "big")


class ClaimWire(msgspec.Struct, kw_only=True, tag_field="type", tag="backbeat.statusclaim.v1"):
    agent_id: str
    task_id: str
    beat_index: int
    hlc: str
    state: str
    beats_left: int
    progress: float
    notes: str


class PlainHLC:
    """A minimal HLC (local events only), so the baseline stamps claims too."""

    def __init__(self) -> None:
        self.l = 0
        self.c = 0

    def now(self) -> str:
        pt = time.time_ns() // 1_000_000
        if pt > self.l:
            self.l, self.c = pt, 0
        else:
            self.c += 1
        return f"{self.l:012x}:{self.c:04x}:{NODE:04x}"


async def _commands(queue: asyncio.Queue[dict[str, Any]]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        cmd = await loop.run_in_executor(None, read_command)
        await queue.put(cmd)
        if cmd["cmd"] == "exit":
            return


async def _connect(url: str, **kw: Any) -> Any:
    opts: dict[str, Any] = {"servers": [url], "name": "bench-plain", "ping_interval": 5}
    opts.update(kw)
    return await nats.connect(**opts)


# --------------------------------------------------------------------------------------- beats
async def _role_beats(nc: Any, queue: asyncio.Queue[dict[str, Any]]) -> None:
    while True:
        cmd = await queue.get()
        if cmd["cmd"] == "exit":
            return
        if cmd["cmd"] != "sub":
            continue
        recs: list[tuple[float, dict[str, Any]]] = []

        async def cb(msg: Any, recs: list[tuple[float, dict[str, Any]]] = recs) -> None:
            frame = json.loads(msg.data)
            recs.append((time.time(), frame))

        sub = await nc.subscribe(f"backbeat.beat.{cmd['cluster']}", cb=cb)
        await nc.flush()
        send({"event": "ready"})
        while True:
            nxt = await queue.get()
            if nxt["cmd"] in ("finish", "exit"):
                break
        await sub.unsubscribe()
        latencies = []
        for wall, frame in recs:
            deadline = _dt.datetime.fromisoformat(frame["deadline_at"]).timestamp()
            latencies.append(wall - (deadline - 60.0 / frame["tempo_bpm"]))
        send(
            {
                "event": "result",
                "latencies": latencies,
                "indices": [frame["beat_index"] for _, frame in recs],
                "walls": [wall for wall, _ in recs],
                "frames": len(recs),
            }
        )
        if nxt["cmd"] == "exit":
            return


# -------------------------------------------------------------------------------------- claims
async def _claims_once(nc: Any, a: dict[str, Any]) -> dict[str, Any]:
    mode = str(a["mode"])
    count = int(a["count"])
    reps = int(a["reps"])
    cluster = str(a["cluster"])
    subject = f"backbeat.status.{cluster}"
    signed = mode != "unsigned"
    seed = nacl.bindings.randombytes(32)
    public, secret = nacl.bindings.crypto_sign_seed_keypair(seed)
    public_b64 = base64.b64encode(public).decode()
    sign = nacl.bindings.crypto_sign
    b64 = base64.b64encode
    encode = msgspec.json.Encoder().encode
    sha256 = hashlib.sha256
    hlc = PlainHLC()
    acks = 0
    all_acked = asyncio.Event()
    target = 0
    inbox = ""
    if mode == "js":
        js = nc.jetstream()
        name = f"BACKBEAT_STATUS_{cluster}"
        await js.add_stream(StreamConfig(name=name, subjects=[subject], duplicate_window=120))
        inbox = nc.new_inbox() + ".ack"

        async def on_ack(msg: Any) -> None:
            nonlocal acks
            if msg.data and b'"error"' not in msg.data:
                acks += 1
                if acks >= target:
                    all_acked.set()

        await nc.subscribe(inbox + ".*", cb=on_ack, pending_msgs_limit=1 << 20)
    rates: list[float] = []
    cpu_per_claim: list[float] = []
    seq = 0
    # repetition 0: the untimed warm-up, as the SDK worker's
    for rep in range(reps + 1):
        n = count if rep else min(WARMUP, count)
        gc.collect()
        await asyncio.sleep(0.1)
        target = acks + n
        all_acked.clear()
        c0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(n):
            stamp = hlc.now()
            body = encode(
                ClaimWire(
                    agent_id=AGENT,
                    task_id="task:bench",
                    beat_index=0,
                    hlc=stamp,
                    state="executing",
                    beats_left=3,
                    progress=0.5,
                    notes="benchmark",
                )
            )
            headers = {}
            sig = ""
            if signed:
                sig = b64(sign(body, secret)[:64]).decode()
                headers["Backbeat-Agent"] = AGENT
                headers["Backbeat-Key"] = public_b64
                headers["Backbeat-Sig"] = sig
            # SPEC's id, as every conforming publisher must send it (not the guessable v1 form)
            digest = sha256(body + sig.encode()).hexdigest()[:16]
            headers["Nats-Msg-Id"] = f"{AGENT}:{stamp}:{digest}"
            if mode == "js":
                seq += 1
                await nc.publish(subject, body, reply=f"{inbox}.{seq}", headers=headers)
            else:
                await nc.publish(subject, body, headers=headers)
        if mode == "js":
            await nc.flush()
            try:
                await asyncio.wait_for(all_acked.wait(), 120)
            except TimeoutError:
                log(f"plain js: only {acks - (target - n)}/{n} acked")
        else:
            await nc.flush()
        t1 = time.perf_counter()
        c1 = time.process_time()
        if rep:
            rates.append(n / (t1 - t0))
            cpu_per_claim.append((c1 - c0) / n)
    return {"event": "result", "rates": rates, "cpu_per_claim": cpu_per_claim}


# --------------------------------------------------------------------------------------- scale
async def _role_scale(a: dict[str, Any], queue: asyncio.Queue[dict[str, Any]]) -> None:
    import psutil

    url = str(a["url"])
    n = int(a["n"])
    windows = int(a["windows"])
    window_beats = int(a["window_beats"])
    duration = 60.0 / int(a["tempo"])
    proc = psutil.Process()
    while (await queue.get())["cmd"] != "go":
        pass
    gc.collect()
    rss0 = proc.memory_info().rss
    # arrival minus scheduled start in an array, as the backbeat_trio worker records them
    recs = array.array("d")
    fromiso = _dt.datetime.fromisoformat
    loads = json.loads

    async def cb(msg: Any) -> None:
        frame = loads(msg.data)
        recs.append(
            time.time() - (fromiso(frame["deadline_at"]).timestamp() - 60.0 / frame["tempo_bpm"])
        )

    async def connect(i: int) -> Any:
        nc = await _connect(url, name=f"plain-{i}")
        await nc.subscribe(f"backbeat.beat.{a['cluster']}", cb=cb)
        await nc.flush()
        return nc

    t0 = time.perf_counter()
    if a.get("one_connection"):
        # one connection, one subscription (and its callback) per agent
        nc = await _connect(url, name="plain-shared")
        for _ in range(n):
            await nc.subscribe(f"backbeat.beat.{a['cluster']}", cb=cb)
        await nc.flush()
        ncs = [nc]
    else:
        ncs = await asyncio.gather(*(connect(i) for i in range(n)))
    send({"event": "ready", "connect_s": time.perf_counter() - t0})
    for _ in range(int(30.0 / duration)):  # settle on a few beats (bounded)
        if len(recs) >= 3 * n:
            break
        await asyncio.sleep(duration / 4)
    cpu_us: list[float] = []
    p99: list[float] = []
    p50: list[float] = []
    delivered: list[int] = []
    cpu_s: list[float] = []
    for _ in range(windows):
        start = len(recs)
        c0 = time.process_time()
        await asyncio.sleep(window_beats * duration)
        c1 = time.process_time()
        lat = list(recs[start:])
        delivered.append(len(lat))
        cpu_us.append((c1 - c0) / max(1, len(lat)) * 1e6)
        cpu_s.append(c1 - c0)
        p99.append(percentile(lat, 99))
        p50.append(percentile(lat, 50))
    gc.collect()
    rss2 = proc.memory_info().rss
    send(
        {
            "event": "result",
            "cpu_us_per_agent_beat": cpu_us,
            "latency_p99": p99,
            "latency_p50": p50,
            "agent_beats": delivered,
            "cpu_s": cpu_s,
            "rss_per_client_running": (rss2 - rss0) / n,
        }
    )
    while (await queue.get())["cmd"] != "exit":
        pass
    for nc in ncs:
        await nc.close()


# ------------------------------------------------------------------------------------ recovery
async def _role_recovery(url: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
    nc = await _connect(url, reconnect_time_wait=1.0, max_reconnect_attempts=-1)
    encode = msgspec.json.Encoder().encode
    hlc = PlainHLC()
    try:
        while True:
            cmd = await queue.get()
            if cmd["cmd"] == "exit":
                return
            if cmd["cmd"] != "setup":
                continue
            cluster = str(cmd["cluster"])
            subject = f"backbeat.status.{cluster}"
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name=f"BACKBEAT_STATUS_{cluster}", subjects=[subject]))
            beats: list[tuple[float, int]] = []

            async def on_beat(msg: Any, beats: list[tuple[float, int]] = beats) -> None:
                frame = json.loads(msg.data)
                beats.append((time.time(), frame["beat_index"]))

            sub = await nc.subscribe(f"backbeat.beat.{cmd['beat_cluster']}", cb=on_beat)
            await nc.flush()
            send({"event": "ready"})
            await queue.get()  # start
            stop = asyncio.Event()
            counts = {"emitted": 0, "failed": 0}

            async def emitter(
                stop: asyncio.Event = stop,
                counts: dict[str, int] = counts,
                subject: str = subject,
                period: float = float(cmd["period"]),
            ) -> None:
                while not stop.is_set():
                    stamp = hlc.now()
                    body = encode(
                        ClaimWire(
                            agent_id=AGENT,
                            task_id="task:bench",
                            beat_index=0,
                            hlc=stamp,
                            state="executing",
                            beats_left=3,
                            progress=0.5,
                            notes="benchmark",
                        )
                    )
                    try:
                        await nc.publish(subject, body, headers={"Nats-Msg-Id": f"{AGENT}:{stamp}"})
                        counts["emitted"] += 1
                    except Exception as exc:
                        counts["failed"] += 1
                        log(f"plain publish: {exc!r}")
                    await asyncio.sleep(period)

            task = asyncio.create_task(emitter())
            send({"event": "emitting"})
            await queue.get()  # stop
            stop.set()
            await task
            try:
                await nc.flush(timeout=5)
            except Exception as exc:
                log(f"plain flush: {exc!r}")
            await sub.unsubscribe()
            send({"event": "result", **counts, "beats": beats})
    finally:
        await nc.close()


async def _main() -> None:
    a = args()
    role = str(a["role"])
    url = str(a["url"])
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    reader = asyncio.create_task(_commands(queue))
    send({"event": "hello"})
    if role == "beats":
        nc = await _connect(url)
        try:
            await _role_beats(nc, queue)
        finally:
            await nc.close()
    elif role == "claims":
        while (cmd := await queue.get())["cmd"] != "exit":
            if cmd["cmd"] == "run":
                nc = await _connect(url)
                try:
                    send(await _claims_once(nc, cmd))
                finally:
                    await nc.close()
    elif role == "recovery":
        await _role_recovery(url, queue)
    elif role == "scale":
        await _role_scale(a, queue)
    else:
        raise SystemExit(f"unknown role {role!r}")
    reader.cancel()


if __name__ == "__main__":
    asyncio.run(_main())
