"""Worker: the two sides of benchmark 9 (c), the reverb's ingest over a real nats-server.

Roles (argv JSON ``role``):

* ``reverb`` (trio): for each ``run`` command (cluster, n, expect), a real ``run_reverb`` that
  trusts agents ``0..n-1`` (``benchmarks/_signed.py``); ``subscribed`` once it reads the status
  stream, ``listening`` once it has taken in a beat (it reads no claim before); on ``go`` it
  notes the time and the process's CPU time, and answers ``result`` once it has taken in
  ``expect`` claims (counted, late, rejected or dropped), or after ``TIMEOUT_S``.
* ``publish`` (plain asyncio nats-py): ``prepare`` (n, beats, first_beat) signs the claims once;
  ``connect`` (cluster) connects for one run; ``go`` publishes them all to the cluster's status
  subject, each with a reply inbox for its PubAck, and answers ``result`` once all are
  acknowledged.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from typing import Any

from benchmarks import _signed
from benchmarks._proto import args, log, read_command, send

TIMEOUT_S = 120.0
POLL_S = 0.002


# -------------------------------------------------------------------------------------- reverb
async def _reverb_run(url: str, cmd: dict[str, Any], cmds: Any) -> bool:
    """One reverb run; False when ``exit`` arrived meanwhile."""
    import trio

    from backbeat_trio import ReverbConfig, run_reverb

    n, expect = int(cmd["n"]), int(cmd["expect"])
    cfg = ReverbConfig(
        cluster_id=str(cmd["cluster"]),
        nats_url=url,
        keyring=_signed.keyring(n),
        reverb_id="bench-reverb",
    )
    async with trio.open_nursery() as nursery:
        status = await nursery.start(functools.partial(run_reverb, cfg))
        send({"event": "subscribed"})
        await status.first_beat.wait()
        send({"event": "listening"})
        nxt = await cmds.receive()
        if nxt["cmd"] != "go":
            nursery.cancel_scope.cancel()
            return nxt["cmd"] != "exit"

        def taken() -> int:
            return int(
                status.claims_counted + status.claims_late + status.rejected + status.claims_dropped
            )

        c0, t0 = time.process_time(), time.perf_counter()
        with trio.move_on_after(TIMEOUT_S):
            # polled: watch_claims() would add a hand-out to every claim the reverb takes in
            while taken() < expect:  # noqa: ASYNC110
                await trio.sleep(POLL_S)
        t1, c1 = time.perf_counter(), time.process_time()
        send(
            {
                "event": "result",
                "claims": taken(),
                "counted": status.claims_counted,
                "late": status.claims_late,
                "rejected": status.rejected,
                "rejected_by_reason": dict(status.rejected_by_reason),
                "dropped": status.claims_dropped,
                "wall_s": t1 - t0,
                "cpu_s": c1 - c0,
            }
        )
        nursery.cancel_scope.cancel()
    return True


async def _reverb_main(url: str) -> None:
    import trio

    from benchmarks._proto import read_commands

    send({"event": "hello"})
    cmd_send, cmds = trio.open_memory_channel[dict[str, Any]](math.inf)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_commands, cmd_send)
        async for cmd in cmds:
            if cmd["cmd"] == "exit":
                break
            if cmd["cmd"] == "run" and not await _reverb_run(url, cmd, cmds):
                break
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------- publish
async def _publish_main(url: str) -> None:
    import nats

    loop = asyncio.get_running_loop()
    send({"event": "hello"})
    claims: list[_signed.SignedClaim] = []
    nc: Any = None
    subject = ""
    inbox = ""
    acks = 0
    target = 0
    all_acked = asyncio.Event()

    async def on_ack(msg: Any) -> None:
        nonlocal acks
        if msg.data and b'"error"' not in msg.data:
            acks += 1
            if acks >= target:
                all_acked.set()

    while True:
        cmd = await loop.run_in_executor(None, read_command)
        if cmd["cmd"] == "exit":
            break
        if cmd["cmd"] == "prepare":
            claims = _signed.make_claims(int(cmd["n"]), int(cmd["beats"]), int(cmd["first_beat"]))
            send({"event": "prepared", "claims": len(claims)})
        elif cmd["cmd"] == "connect":
            if nc is not None:
                await nc.close()
            nc = await nats.connect(servers=[url], name="bench-ingest-pub", ping_interval=5)
            subject = f"backbeat.status.{cmd['cluster']}"
            inbox = nc.new_inbox() + ".ack"
            acks = 0
            await nc.subscribe(inbox + ".*", cb=on_ack, pending_msgs_limit=1 << 20)
            await nc.flush()
            send({"event": "connected"})
        elif cmd["cmd"] == "go":
            target = len(claims)
            all_acked.clear()
            t0 = time.perf_counter()
            for seq, c in enumerate(claims):
                await nc.publish(subject, c.body, reply=f"{inbox}.{seq}", headers=c.headers)
            await nc.flush()
            try:
                await asyncio.wait_for(all_acked.wait(), TIMEOUT_S)
            except TimeoutError:
                log(f"ingest publisher: only {acks}/{target} acknowledged")
            took = time.perf_counter() - t0
            send({"event": "result", "acked": acks, "rate": len(claims) / took})
    if nc is not None:
        await nc.close()


def main() -> None:
    a = args()
    url = str(a["url"])
    if a["role"] == "reverb":
        import trio

        trio.run(_reverb_main, url)
    elif a["role"] == "publish":
        asyncio.run(_publish_main(url))
    else:
        raise SystemExit(f"unknown role {a['role']!r}")


if __name__ == "__main__":
    main()
