"""Worker of benchmarks 10 (import cost) and 11 (bridge cost): one measurement per process.

Started as ``python -m benchmarks._w_bridge '<json>'``; it imports only the standard library and
nats-py until its arguments say otherwise, so the process is exactly what the variant names.
Protocol (stdout JSON lines): ``hello``; ``ready`` once subscribed (sub roles); one ``result``;
then it exits. It never reads stdin.

Roles (argv JSON ``role``):

* ``import``: plain asyncio nats-py, one connection with ``subs`` subscriptions to ``subject``,
  each callback decoding the frame with stdlib ``json`` (baseline A of the many-agents figures),
  after ``import <variant>`` (``none``, ``backbeat_trio`` or ``trio_asyncio``). The result is the
  process's CPU time from ``ready`` until ``subs × frames`` frames were delivered.
* ``sub``: one subscription to ``subject`` (no decoding: the transport alone), in ``mode``
  ``aio`` (plain asyncio nats-py, a callback), ``tio`` (the same asyncio code inside
  ``trio_asyncio.open_loop()``) or ``bridge`` (backbeat_trio's transport, the inline handler the
  clients' shared beat subscription uses). CPU time from ``ready`` until ``frames`` arrived.
  ``env`` (a dict) is set first: ``BACKBEAT_TRIO_NATS_FAST=0`` measures the public path.
* ``pub``: ``beats`` beats ``interval`` apart; on each, ``burst`` publishes of ``payload`` bytes
  with a ``Nats-Msg-Id`` header (as a claim goes out) from ``mode``'s side (``aio``/``tio``:
  ``await nc.publish``; ``bridge``: the transport's ``publish`` from trio). Beats without
  publishes take turns with them, so the pacing's own cost cancels out: the result is the CPU
  time of the beats with publishes minus that of the beats without, per message.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any


def send(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


ARGS: dict[str, Any] = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
os.environ.update(ARGS.get("env", {}))
if ARGS.get("variant", "none") != "none":
    importlib.import_module(ARGS["variant"])

import asyncio  # noqa: E402  (after the variant's import: that order is what is measured)

import nats  # noqa: E402

LIMIT_S = float(ARGS.get("limit_s", 120.0))


# ------------------------------------------------------------------------------ asyncio side
async def subscribed(nc: Any) -> None:
    """Return once the server has this connection's subscriptions. nats-py's ``flush`` writes
    its PING straight to the socket, ahead of SUBs still in its buffer: the first PONG may come
    before the server has them, the second cannot (the SUBs were written by then)."""
    await nc.flush()
    await nc.flush()


async def aio_import_role(a: dict[str, Any]) -> dict[str, Any]:
    nc = await nats.connect(a["url"], name="bench-importcost")
    total = a["subs"] * a["frames"]
    got = 0
    done = asyncio.Event()

    counts: dict[int, int] = {}
    check = bool(a.get("check"))

    async def cb(msg: Any) -> None:
        nonlocal got
        frame = json.loads(msg.data)
        if check:
            counts[frame["beat_index"]] = counts.get(frame["beat_index"], 0) + 1
        got += 1
        if got >= total:
            done.set()

    for _ in range(a["subs"]):
        await nc.subscribe(a["subject"], cb=cb)
    await subscribed(nc)
    send({"event": "ready"})
    t0 = time.process_time()
    w0 = time.perf_counter()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), LIMIT_S)
    cpu = time.process_time() - t0
    wall = time.perf_counter() - w0
    await nc.close()
    short = [i for i in range(a["frames"]) if counts.get(i, 0) < a["subs"]] if check else []
    return {"cpu_s": cpu, "wall_s": wall, "delivered": got, "expected": total, "short": short[:20]}


async def aio_sub(a: dict[str, Any]) -> dict[str, Any]:
    nc = await nats.connect(a["url"], name="bench-bridge")
    got = 0
    done = asyncio.Event()

    async def cb(msg: Any) -> None:
        nonlocal got
        got += 1
        if got >= a["frames"]:
            done.set()

    await nc.subscribe(a["subject"], cb=cb)
    await subscribed(nc)
    send({"event": "ready"})
    t0 = time.process_time()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), LIMIT_S)
    cpu = time.process_time() - t0
    await nc.close()
    return {"cpu_s": cpu, "delivered": got, "expected": a["frames"]}


async def paced(
    a: dict[str, Any],
    sleep_until: Callable[[float], Awaitable[None]],
    publish: Callable[..., Awaitable[None] | None],
) -> dict[str, Any]:
    """Beats with and without publishes, alternating; CPU seconds of each kind. Each message
    carries a ``Nats-Msg-Id`` header, as a claim does."""
    payload = b"x" * a["payload"]
    sent = 0
    subject = a["subject"]
    interval = a["interval"]
    cpu = {"with": 0.0, "without": 0.0}
    start = time.monotonic() + 0.05
    for i in range(2 * a["beats"]):
        await sleep_until(start + i * interval)
        kind = "with" if i % 2 else "without"
        t0 = time.process_time()
        if kind == "with":
            for _ in range(a["burst"]):
                sent += 1
                pending = publish(subject, payload, headers={"Nats-Msg-Id": f"bench-{sent}"})
                if pending is not None:
                    await pending
        # half a beat: what the publishes set off (nats-py's flusher, the bridge's drainer, the
        # socket write) runs inside the span it is charged to
        await sleep_until(start + (i + 0.5) * interval)
        cpu[kind] += time.process_time() - t0
    return cpu


async def aio_pub(a: dict[str, Any]) -> dict[str, Any]:
    nc = await nats.connect(a["url"], name="bench-bridge")

    async def sleep_until(t: float) -> None:
        await asyncio.sleep(max(0.0, t - time.monotonic()))

    cpu = await paced(a, sleep_until, nc.publish)
    await nc.flush()
    await nc.close()
    return cpu


# --------------------------------------------------------------------------------- trio side
def run_tio(fn: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """``fn`` (asyncio code) inside ``trio_asyncio.open_loop()``."""
    import trio
    import trio_asyncio

    async def main() -> dict[str, Any]:
        async with trio_asyncio.open_loop():
            res: dict[str, Any] = await trio_asyncio.aio_as_trio(fn)(ARGS)
            return res

    out: dict[str, Any] = trio.run(main)
    return out


def run_bridge_sub() -> dict[str, Any]:
    import trio

    from backbeat_trio import ConnectionOptions, open_nats_transport

    a = ARGS

    async def main() -> dict[str, Any]:
        got = 0
        done = trio.Event()

        def handler(msg: Any) -> None:
            nonlocal got
            got += 1
            if got >= a["frames"]:
                done.set()

        async with open_nats_transport(ConnectionOptions(nats_url=a["url"])) as t:
            await t.subscribe(a["subject"], buffer=1, handler=handler)
            await t.flush()
            send({"event": "ready", "fast": t.fast})
            t0 = time.process_time()
            with trio.move_on_after(LIMIT_S):
                await done.wait()
            cpu = time.process_time() - t0
        return {"cpu_s": cpu, "delivered": got, "expected": a["frames"]}

    out: dict[str, Any] = trio.run(main)
    return out


def run_bridge_pub() -> dict[str, Any]:
    import trio

    from backbeat_trio import ConnectionOptions, open_nats_transport

    a = ARGS

    async def main() -> dict[str, Any]:
        async def sleep_until(t: float) -> None:
            await trio.sleep(max(0.0, t - time.monotonic()))

        async with open_nats_transport(ConnectionOptions(nats_url=a["url"])) as t:
            res = await paced(a, sleep_until, t.publish)
            await t.flush()
            res["direct_writes"] = t.direct_writes
            res["drain_batches"] = t.drain_batches
            res["fast"] = t.fast
        return res

    out: dict[str, Any] = trio.run(main)
    return out


def main() -> None:
    send({"event": "hello"})
    role, mode = ARGS["role"], ARGS.get("mode", "aio")
    if ARGS.get("profile"):
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    if role == "import":
        res = asyncio.run(aio_import_role(ARGS))
    elif role in ("sub", "pub"):
        aio = aio_sub if role == "sub" else aio_pub
        if mode == "aio":
            res = asyncio.run(aio(ARGS))
        elif mode == "tio":
            res = run_tio(aio)
        else:
            res = run_bridge_sub() if role == "sub" else run_bridge_pub()
    else:
        raise SystemExit(f"unknown role {role!r}")
    if ARGS.get("profile"):
        prof.disable()
        prof.dump_stats(ARGS["profile"])
    send({"event": "result", **res})


if __name__ == "__main__":
    main()
