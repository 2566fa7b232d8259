"""Worker: a real :func:`backbeat_trio.run_pulse` in its own process.

The pulse runs unmodified on a real NATS transport; a thin wrapper around that transport notes
``trio.current_time()`` and ``time.time()`` the moment the pulse calls ``publish`` for a beat, which
is what the pulse-schedule benchmark compares with the ideal schedule.

Commands: ``run`` (cluster, tempo, beats, lead, start_index) → ``started`` … ``result``;
``stop`` ends a run early; ``exit``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import Any

import msgspec
import trio
import trio_asyncio

from backbeat_trio import BeatFrame, NotConnected, PulseConfig, run_pulse
from backbeat_trio._bridge.nats import NatsTransport, open_nats_transport
from backbeat_trio._core.beats import beat_subject
from benchmarks._proto import args, read_commands, send

PULSE_ID = "bench-pulse"


class RecordingTransport:
    """Delegates everything to the real transport; records when beat frames are published."""

    def __init__(self, inner: NatsTransport, subject: str, limit: int) -> None:
        self._inner = inner
        self._subject = subject
        self._limit = limit
        self.trio_times: list[float] = []
        self.wall_times: list[float] = []
        self.payloads: list[bytes] = []
        self.done = trio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: dict[str, str] | None = None,
        reply: str = "",
    ) -> None:
        now = trio.current_time()
        wall = time.time()
        self._inner.publish(subject, payload, headers=headers, reply=reply)
        if subject == self._subject:
            self.trio_times.append(now)
            self.wall_times.append(wall)
            self.payloads.append(payload)
            if len(self.payloads) >= self._limit:
                self.done.set()


def schedule_errors(
    status: Any, rec: RecordingTransport, duration: float
) -> tuple[list[int], list[float]]:
    """The recorded beats' indices and each one's publish time minus its ideal due time."""
    schedule = status.schedule
    assert schedule is not None
    decoder = msgspec.json.Decoder(BeatFrame)
    indices = [decoder.decode(p).beat_index for p in rec.payloads]
    # due(k) from the schedule's public state (constant tempo): next_due − (next_index − k)·d
    errors = [
        t - (schedule.next_due - (schedule.next_index - k) * duration)
        for t, k in zip(rec.trio_times, indices, strict=True)
    ]
    return indices, errors


async def _run_once(
    url: str,
    transport: NatsTransport,
    cmd: dict[str, Any],
    cmds: trio.MemoryReceiveChannel[dict[str, Any]],
) -> bool:
    """One pulse run; returns False when ``exit`` arrived meanwhile."""
    tempo = int(cmd["tempo"])
    beats = int(cmd["beats"])
    cluster = str(cmd["cluster"])
    duration = 60.0 / tempo
    rec = RecordingTransport(transport, beat_subject(cluster), beats)
    pcfg = PulseConfig(
        cluster_id=cluster,
        nats_url=url,
        tempo_bpm=tempo,
        pulse_id=PULSE_ID,
        start_index=int(cmd.get("start_index", 0)),
        max_tempo_step=None,
    )
    keep_going = True
    async with trio.open_nursery() as nursery:
        status = await nursery.start(
            functools.partial(run_pulse, pcfg, transport=rec, lead=float(cmd.get("lead", 0.2)))
        )
        send({"event": "started"})

        async def watch() -> None:
            nonlocal keep_going
            async for c in cmds:
                if c["cmd"] in ("stop", "exit"):
                    keep_going = c["cmd"] != "exit"
                    rec.done.set()
                    return

        nursery.start_soon(watch)
        with trio.move_on_after(beats * duration + float(cmd.get("lead", 0.2)) + 30.0):
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
            "skipped_disconnected": status.skipped_disconnected,
        }
    )
    return keep_going


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
                    if cmd["cmd"] == "run" and not await _run_once(url, transport, cmd, cmds):
                        break
                nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(_main)
