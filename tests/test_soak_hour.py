"""Every process flat after warm-up while nats-server is killed and restarted (issue 19, item 6).

A pulse, a reverb and a process of signed agents on one connection (each claiming every beat)
run in three processes of their own (``tests/_soak_roles.py``) against a real nats-server that
is SIGKILLed, left down for half a second and restarted every ``between`` seconds. The test
samples each process's RSS, open fds and CPU time, and at the end checks that every claim the
agents had acknowledged is in the stream once and counted by the reverb once (in a window or
``late``), that no process grew after warm-up beyond a bound, and that no report called an agent
``stalled`` that had claimed in time: a report may name as many agents as sent their first
claim naming its window only after the window ended (the agents' process, on a machine it
shares, did not run in time; the agents count those windows themselves), no more.

CI runs a bounded form (under a minute); ``--soak`` runs the issue's shape for an hour (50
agents, 1 200 BPM, a restart a minute); ``BACKBEAT_SOAK_SECONDS`` sets another duration for the
soak shape, ``BACKBEAT_SOAK_BETWEEN`` another interval between restarts, and
``BACKBEAT_SOAK_TRACE`` a file where the reverb records what it saw around each report that
lists an agent ``stalled`` (``tests/_soak_roles.py``).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backbeat_trio._embedded import NatsServerProcess

ROLES = Path(__file__).with_name("_soak_roles.py")
MIB = 1024 * 1024
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Shape:
    agents: int
    tempo: int
    duration: float
    between: float  # seconds between restarts
    warmup: float  # seconds after which every process must stay flat
    sample_every: float
    rss_growth: int  # bytes any process may grow after warm-up
    fd_growth: int


CI = Shape(
    agents=10, tempo=600, duration=30.0, between=10.0, warmup=12.0, sample_every=1.0,
    rss_growth=8 * MIB, fd_growth=2,
)  # fmt: skip
SOAK = Shape(
    agents=50, tempo=1200, duration=3600.0, between=60.0, warmup=600.0, sample_every=10.0,
    rss_growth=4 * MIB, fd_growth=2,
)  # fmt: skip


@dataclass
class Role:
    """One role's process and what it printed."""

    name: str
    proc: subprocess.Popen[str]
    lines: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    stalled: list[dict[str, Any]] = field(default_factory=list)
    reader: threading.Thread | None = None

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if "stalled" in item:
                self.stalled.append(item)
            else:
                self.lines.put(item)

    def expect(self, key: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            item = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if key in item:
                return item[key]

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def sample(self) -> tuple[int, int, float]:
        """RSS in bytes, open fds, CPU seconds so far."""
        pid = self.proc.pid
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / _CLK_TCK
        return rss, fds, cpu


def start_role(name: str, url: str, cluster: str, shape: Shape) -> Role:
    proc = subprocess.Popen(
        [sys.executable, str(ROLES), name, url, cluster, str(shape.agents), str(shape.tempo)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    role = Role(name, proc)
    role.reader = threading.Thread(target=role.read, daemon=True)
    role.reader.start()
    role.expect("ready", 30)
    return role


def soak_shape(soak: bool) -> Shape:
    seconds = os.environ.get("BACKBEAT_SOAK_SECONDS")
    between = os.environ.get("BACKBEAT_SOAK_BETWEEN")
    shape = SOAK if soak or seconds else CI
    if seconds:
        shape = Shape(**{**shape.__dict__, "duration": float(seconds)})
    if between:
        shape = Shape(**{**shape.__dict__, "between": float(between)})
    return shape


def since_latest(kills: list[float], wall: float) -> float:
    return round(wall - max((k for k in kills if k <= wall), default=0.0), 2)


def mib(n: int) -> float:
    return round(n / MIB, 1)


@pytest.mark.chaos
@pytest.mark.nats
def test_every_process_is_flat_after_warm_up_across_restarts(soak: bool) -> None:
    shape = soak_shape(soak)
    cluster = "soak-hour"
    verbose = shape.duration > CI.duration
    samples: list[tuple[float, dict[str, tuple[int, int, float]]]] = []
    kills: list[float] = []
    ready_after: list[float] = []
    roles: dict[str, Role] = {}
    with NatsServerProcess(jetstream=True) as server:
        url = server.url
        try:
            for name in ("pulse", "reverb", "agents"):
                roles[name] = start_role(name, url, cluster, shape)
            t0 = time.monotonic()
            next_kill = t0 + shape.between / 2
            next_sample = t0
            end = t0 + shape.duration
            while (now := time.monotonic()) < end:
                if now >= next_sample:
                    samples.append((now - t0, {n: r.sample() for n, r in roles.items()}))
                    next_sample += shape.sample_every
                    if verbose and len(samples) % max(1, int(60 / shape.sample_every)) == 1:
                        print(json.dumps({"t": round(now - t0), "sample": samples[-1][1]}))
                        sys.stdout.flush()
                if now >= next_kill and end - now > shape.between / 2:
                    kills.append(time.time())
                    server.kill()
                    time.sleep(0.5)  # down for several beats
                    launched = time.monotonic()
                    server.start()
                    ready_after.append(time.monotonic() - launched)
                    next_kill += shape.between
                time.sleep(min(0.1, max(0.0, min(next_sample, next_kill) - time.monotonic())))
            samples.append((time.monotonic() - t0, {n: r.sample() for n, r in roles.items()}))
            stopped = time.time()  # agents silent from now on: stalled, truly
            roles["agents"].send("stop")
            agents = roles["agents"].expect("result", 90)
            roles["reverb"].send(f"expect {agents['emitted']}")
            reverb = roles["reverb"].expect("result", 90)
            roles["pulse"].send("stop")
            pulse = roles["pulse"].expect("result", 30)
            exits = {n: r.proc.wait(30) for n, r in roles.items()}
        finally:
            for r in roles.values():
                if r.proc.poll() is None:
                    r.proc.kill()
                    r.proc.wait()
                if r.reader is not None:
                    r.reader.join(5)
                for pipe in (r.proc.stdin, r.proc.stdout):
                    if pipe is not None:
                        pipe.close()
    warmup = min(shape.warmup, shape.duration / 3)  # a shorter run of the soak shape
    warm = next(s for t, s in samples if t >= warmup)
    last = samples[-1][1]
    # Memory rises and falls with each restart (the claims re-sent after it arrive in a
    # burst), so single samples compare a peak with a trough depending on where in the cycle
    # they fell. Flat means the highest sample of the last stretch is no higher than that of
    # the first stretch after warm-up (each ten restarts long, or half the time left).
    stretch = min(10 * shape.between, (samples[-1][0] - warmup) / 2)
    first = [s for t, s in samples if warmup <= t <= warmup + stretch]
    final = [s for t, s in samples if t >= samples[-1][0] - stretch]
    peaks = {n: (max(s[n][0] for s in first), max(s[n][0] for s in final)) for n in roles}
    figures = {
        n: {
            "rss_warm_mib": mib(warm[n][0]),
            "rss_end_mib": mib(last[n][0]),
            "rss_max_after_warm_mib": mib(max(s[n][0] for t, s in samples if t >= warmup)),
            "rss_max_first_stretch_mib": mib(peaks[n][0]),
            "rss_max_last_stretch_mib": mib(peaks[n][1]),
            "fds_warm": warm[n][1],
            "fds_end": last[n][1],
            "cpu_s": round(last[n][2], 1),
        }
        for n in roles
    }
    # each report listing an agent stalled (before the agents stopped: then they are silent for
    # good, and rightly stalled): how many, how long after the latest kill, and how many agents
    # sent their first claim naming that window only after it ended (their process did not run
    # in time, which the reverb is right to report)
    behind: dict[str, int] = agents.get("behind", {})
    stalled = [
        (item["stalled"], since_latest(kills, item["wall"]), behind.get(str(item["window"]), 0))
        for item in roles["reverb"].stalled
        if item["wall"] < stopped
    ]
    false_stalled = [s for s in stalled if s[0] > s[2]]
    print(
        json.dumps(
            {
                "shape": shape.__dict__,
                "restarts": len(kills),
                "ready_after_s": [round(s, 3) for s in ready_after],
                "processes": figures,
                "agents": agents,
                "reverb": reverb,
                "pulse": pulse,
                "stalled": stalled,
                "windows_behind": len(behind),
                "exits": exits,
            }
        )
    )
    assert exits == {"pulse": 0, "reverb": 0, "agents": 0}
    assert agents["flushed"]
    # every acknowledged claim stored once and counted once
    assert reverb["stored"] == agents["emitted"]
    assert reverb["counted"] + reverb["late"] == agents["emitted"]
    assert reverb["rejected"] == 0
    assert reverb["dropped"] == 0
    for n, fig in figures.items():
        assert peaks[n][1] - peaks[n][0] <= shape.rss_growth, (n, fig)
        assert last[n][1] <= warm[n][1] + shape.fd_growth, (n, fig)
    # no report calls more agents stalled than were behind in that window
    assert false_stalled == [], stalled
