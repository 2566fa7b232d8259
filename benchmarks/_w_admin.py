"""Worker: a real :func:`backbeat_trio.run_pulse` with its admin server, in its own process.

Like ``_w_pulse`` it wraps the pulse's transport to note ``trio.current_time()`` and
``time.time()`` as the pulse calls ``publish`` for a beat; beside the pulse it serves
:func:`backbeat_trio.serve_admin` on a free loopback port (the orchestrator scrapes it).

Commands: ``run`` (cluster, tempo, beats) → ``started`` (address) … ``result``; ``exit``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import trio
import trio_asyncio

from backbeat_trio import NotConnected, PulseConfig, run_pulse, serve_admin
from backbeat_trio._bridge.nats import NatsTransport, open_nats_transport
from backbeat_trio._core.beats import beat_subject
from benchmarks._proto import args, read_commands, send
from benchmarks._w_pulse import RecordingTransport, schedule_errors

PULSE_ID = "bench-admin-pulse"


async def _run_once(url: str, transport: NatsTransport, cmd: dict[str, Any]) -> None:
    tempo = int(cmd["tempo"])
    beats = int(cmd["beats"])
    cluster = str(cmd["cluster"])
    duration = 60.0 / tempo
    lead = 0.2
    rec = RecordingTransport(transport, beat_subject(cluster), beats)
    pcfg = PulseConfig(
        cluster_id=cluster, nats_url=url, tempo_bpm=tempo, pulse_id=PULSE_ID, max_tempo_step=None
    )
    async with trio.open_nursery() as nursery:
        status = await nursery.start(functools.partial(run_pulse, pcfg, transport=rec, lead=lead))
        address = await nursery.start(
            functools.partial(serve_admin, "127.0.0.1:0", pulse=status, transport=transport)
        )
        send({"event": "started", "address": address})
        with trio.move_on_after(beats * duration + lead + 30.0):
            await rec.done.wait()
        with contextlib.suppress(NotConnected), trio.move_on_after(2.0):
            await transport.flush()
        nursery.cancel_scope.cancel()
    indices, errors = schedule_errors(status, rec, duration)
    send(
        {
            "event": "result",
            "indices": indices,
            "errors": errors,
            "wall_times": rec.wall_times,
            "published": status.published,
            "skipped_late": status.skipped_late,
            "histogram_count": status.publish_error.count,
        }
    )


async def _main() -> None:
    a = args()
    url = str(a["url"])
    async with trio_asyncio.open_loop():
        base = PulseConfig(cluster_id="bench", nats_url=url, pulse_id=PULSE_ID)
        async with open_nats_transport(base) as transport:
            send({"event": "hello"})
            cmd_send, cmds = trio.open_memory_channel[dict[str, Any]](math.inf)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_commands, cmd_send)
                async for cmd in cmds:
                    if cmd["cmd"] == "exit":
                        break
                    if cmd["cmd"] == "run":
                        await _run_once(url, transport, cmd)
                nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(_main)
