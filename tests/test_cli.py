"""The ``backbeat-trio`` command line, run as real subprocesses against a real nats-server.

Every command gets its ``--help`` checked and at least one real run; exit codes are checked for
success (0), runtime failure (1), usage/config errors (2), an unreachable server (3) and Ctrl-C
(130). Long-running commands run in the background and are stopped with a signal.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO

import pytest
from _guards import closed_port

from backbeat_trio import Keyring, load_signing_key, public_key_b64
from backbeat_trio._cli.commands.health import GO_HEALTH_FIELDS
from backbeat_trio._embedded import NatsServerProcess

pytestmark = pytest.mark.nats

CLI = [sys.executable, "-m", "backbeat_trio"]
COMMANDS = (
    "demo",
    "cluster",
    "server",
    "pulse",
    "reverb",
    "tail",
    "emit",
    "keygen",
    "tempo",
    "health",
)
PULSE_TEMPO = 600  # 0.1 s beats: fast enough for quick tests, slow enough for a loaded box


def cli_env(**extra: str) -> dict[str, str]:
    """The environment without the caller's BACKBEAT_* settings (except the binary's path)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BACKBEAT_") or k == "BACKBEAT_NATS_SERVER"
    }
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 30.0, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion (bounded)."""
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(**env),
        check=False,
    )


def run_many(
    commands: list[list[str]], timeout: float = 30.0
) -> list[subprocess.CompletedProcess[str]]:
    """Run several CLI invocations at once (start-up dominates; this keeps the suite fast)."""
    procs = [
        subprocess.Popen(
            [*CLI, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        for args in commands
    ]
    results = []
    deadline = time.monotonic() + timeout
    try:
        for args, proc in zip(commands, procs, strict=True):
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


class Background:
    """A CLI process in the background; its output lines are collected by reader threads."""

    def __init__(self, *args: str, **env: str) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [*CLI, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(**env),
        )
        self.lines: dict[str, queue.Queue[str]] = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self.seen: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._readers = [
            threading.Thread(target=self._pump, args=(getattr(self.proc, name), name), daemon=True)
            for name in ("stdout", "stderr")
        ]
        for thread in self._readers:
            thread.start()

    def _pump(self, stream: IO[str], name: str) -> None:
        for line in stream:
            self.lines[name].put(line.rstrip("\n"))

    def wait_line(
        self, predicate: Callable[[str], bool], *, stream: str = "stderr", timeout: float = 15.0
    ) -> str:
        """The first new line on ``stream`` that matches (fails the test after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop(signal.SIGKILL)
                pytest.fail(
                    f"{' '.join(self.args)}: no matching line on {stream} within {timeout} s; "
                    f"rc={self.proc.returncode}, stdout={self.seen['stdout'][-5:]}, "
                    f"stderr={self.seen['stderr'][-5:]}"
                )
            try:
                line = self.lines[stream].get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            self.seen[stream].append(line)
            if predicate(line):
                return line

    def finish(self, timeout: float = 15.0) -> tuple[int, str, str]:
        """Wait for it to exit; returns (rc, the unread rest of stdout, of stderr)."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(signal.SIGKILL)
            pytest.fail(f"{' '.join(self.args)} did not exit within {timeout} s")
        for thread in self._readers:
            thread.join(timeout=5)  # they end at EOF, once the process is gone
        rest: dict[str, list[str]] = {}
        for name, lines in self.lines.items():
            rest[name] = []
            while not lines.empty():
                rest[name].append(lines.get_nowait())
        return rc, "\n".join(rest["stdout"]), "\n".join(rest["stderr"])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"{' '.join(self.args)} ignored signal {sig} for {timeout} s")

    def __enter__(self) -> Background:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for thread in self._readers:
            thread.join(timeout=5)  # EOF now; closing under a reading thread would race it
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def new_cluster() -> str:
    return f"cli-{secrets.token_hex(4)}"


def keygen(tmp_path: Path, agent: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("keygen", "--agent", agent, "--out", str(tmp_path / f"{agent}.key"), *extra)


@pytest.fixture(scope="module")
def pulse(nats_server: NatsServerProcess) -> Iterator[tuple[str, str]]:
    """A ``backbeat-trio pulse`` process at 600 BPM on its own cluster: yields (url, cluster)."""
    cluster = new_cluster()
    with Background(
        "pulse", "--nats-url", nats_server.url, "--cluster", cluster, "--tempo", str(PULSE_TEMPO)
    ) as proc:
        proc.wait_line(lambda line: line.startswith("pulse pulse-1:"))
        proc.wait_line(lambda line: line.startswith("beat "), stream="stdout")
        yield nats_server.url, cluster
        assert proc.stop(signal.SIGTERM) == 0


# --- help ---------------------------------------------------------------------------------------
def test_help_for_every_command() -> None:
    expected = {
        "demo": ["--bars", "--forever", "--plain", "--tempo", "--agents"],
        "cluster": [
            "--pulses",
            "--servers",
            "--cluster",
            "--tempo",
            "--bpb",
            "--lease-ttl",
            "--failover-every",
            "--restart-after",
            "--duration",
        ],
        "server": ["--port", "--no-jetstream"],
        "pulse": [
            "--tempo",
            "--beats-per-bar",
            "--max-tempo-step",
            "BACKBEAT_NATS_URL",
            "--ha",
            "--lease-ttl",
        ],
        "reverb": ["--keyring", "--allow-unsigned", "BACKBEAT_KEYRING"],
        "tail": ["--beats", "--claims", "--bars", "--json", "--count", "--since", "--limit"],
        "emit": ["--state", "--progress", "--beats-left", "--notes", "--wait-for", "--key"],
        "keygen": ["--agent", "--out", "--keyring", "--force"],
        "tempo": ["bpm", "--reason", "--timeout"],
        "health": ["--agent", "--beats", "--timeout", "BACKBEAT_AGENT_ID"],
    }
    results = run_many([["--help"]] + [[command, "--help"] for command in COMMANDS])
    top = results[0]
    assert top.returncode == 0, top.stderr
    for command in COMMANDS:
        assert command in top.stdout
    assert "exit codes" in top.stdout
    assert "130" in top.stdout
    for command, result in zip(COMMANDS, results[1:], strict=True):
        assert result.returncode == 0, (command, result.stderr)
        assert result.stdout.startswith(f"usage: backbeat-trio {command}"), command
        for option in expected[command]:
            assert option in result.stdout, (command, option)


# --- keygen -------------------------------------------------------------------------------------
def test_keygen_writes_a_0600_key_and_maintains_the_keyring(tmp_path: Path) -> None:
    ring = tmp_path / "keyring.toml"
    first = keygen(tmp_path, "agent-1", "--keyring", str(ring))
    assert first.returncode == 0, first.stderr
    key_file = tmp_path / "agent-1.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    public = public_key_b64(load_signing_key(key_file))
    assert f'agent-1 = "{public}"' in first.stdout.splitlines()
    assert f"public key: {public}" in first.stdout
    assert Keyring.load(ring).public_key_b64("agent-1") == public

    second = keygen(tmp_path, "agent-2", "--keyring", str(ring))
    assert second.returncode == 0, second.stderr
    assert set(Keyring.load(ring)) == {"agent-1", "agent-2"}

    refused = keygen(tmp_path, "agent-1", "--keyring", str(ring))
    assert refused.returncode == 2
    assert "exists" in refused.stderr
    assert "--force" in refused.stderr
    assert public_key_b64(load_signing_key(key_file)) == public  # untouched

    rotated = keygen(tmp_path, "agent-1", "--keyring", str(ring), "--force")
    assert rotated.returncode == 0, rotated.stderr
    new_public = public_key_b64(load_signing_key(key_file))
    assert new_public != public
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    loaded = Keyring.load(ring)
    assert loaded.public_key_b64("agent-1") == new_public
    assert loaded.public_key_b64("agent-2") is not None
    assert "updated agent-1" in rotated.stderr


# --- server -------------------------------------------------------------------------------------
def test_server_prints_its_url_and_stops_on_sigterm() -> None:
    with Background("server", "--port", "0") as proc:
        url = proc.wait_line(lambda line: line.startswith("nats://"), stream="stdout", timeout=20)
        assert url.startswith("nats://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            assert sock.recv(5) == b"INFO "
        assert proc.stop(signal.SIGTERM) == 0
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", port), timeout=2),
    ):
        pass


# --- pulse + tail -------------------------------------------------------------------------------
def test_tail_beats_json_from_a_running_pulse(pulse: tuple[str, str]) -> None:
    url, cluster = pulse
    result = run_cli("tail", "--beats", "--count", "3", "--json", "-s", url, "-c", cluster)
    assert result.returncode == 0, result.stderr
    frames = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(frames) == 3
    assert {f["type"] for f in frames} == {"backbeat.beatframe.v1"}
    assert {f["cluster_id"] for f in frames} == {cluster}
    indices = [f["beat_index"] for f in frames]
    assert indices == list(range(indices[0], indices[0] + 3))
    assert all(f["downbeat"] == (f["beat_index"] % 4 == 0) for f in frames)


def test_tail_that_received_nothing_before_its_timeout_fails(pulse: tuple[str, str]) -> None:
    url, _ = pulse
    silent = run_cli("tail", "--beats", "--timeout", "0.5", "-s", url, "-c", "no-such-cluster")
    assert silent.returncode == 1, silent.stderr
    assert "timed out after 0.5 s with 0 message(s)" in silent.stderr
    _, cluster = pulse
    heard = run_cli("tail", "--beats", "--timeout", "1", "-s", url, "-c", cluster)
    assert heard.returncode == 0, heard.stderr


def test_the_help_says_what_ctrl_c_and_sigterm_exit_with() -> None:
    text = " ".join(run_cli("--help").stdout.split())
    assert "stop cleanly on Ctrl-C (exit 130) or SIGTERM (exit 0)" in text


def test_tail_human_output_and_ctrl_c(pulse: tuple[str, str]) -> None:
    url, cluster = pulse
    with Background("tail", "-s", url, "-c", cluster) as proc:
        proc.wait_line(lambda line: line.startswith("listening on backbeat.beat."))
        line = proc.wait_line(lambda line: line.startswith("beat "), stream="stdout")
        assert "BPM" in line
        assert "window" in line
        assert proc.stop(signal.SIGINT) == 130
        _, _, err = proc.finish()
        assert "Traceback" not in err


# --- emit + tail --claims -----------------------------------------------------------------------
def test_emit_a_signed_claim_seen_by_tail(nats_url: str, tmp_path: Path) -> None:
    assert keygen(tmp_path, "agent-1").returncode == 0
    cluster = new_cluster()
    where = ("-s", nats_url, "-c", cluster)
    with (
        Background("tail", "--claims", "--count", "1", "--json", *where) as as_json,
        Background("tail", "--claims", "--count", "1", *where) as as_text,
    ):
        for proc in (as_json, as_text):
            proc.wait_line(lambda line: line.startswith("listening on backbeat.status."))
        emitted = run_cli(
            "emit", *where, "--agent", "agent-1", "--key", str(tmp_path / "agent-1.key"),
            "--state", "waiting", "--progress", "0.25", "--beats-left", "3", "--notes", "hello",
            "--wait-for", "agent://agent-2", "--task-id", "task-42", "--beat-timeout", "0",
        )  # fmt: skip
        assert emitted.returncode == 0, emitted.stderr
        assert emitted.stdout.startswith("sent signed claim task-42 for agent-1")
        claim = json.loads(as_json.wait_line(lambda line: True, stream="stdout"))
        text = as_text.wait_line(lambda line: True, stream="stdout")
        assert as_json.finish()[0] == 0
        assert as_text.finish()[0] == 0
    assert claim["type"] == "backbeat.statusclaim.v1"
    assert (claim["agent_id"], claim["task_id"], claim["state"]) == (
        "agent-1",
        "task-42",
        "waiting",
    )
    assert claim["wait_for"] == ["agent://agent-2"]
    assert (claim["progress"], claim["beats_left"], claim["notes"]) == (0.25, 3, "hello")
    assert "claim agent-1" in text
    assert "signed as agent-1" in text
    assert "waits for" in text


# --- reverb -------------------------------------------------------------------------------------
def test_reverb_counts_signed_claims_and_rejects_unsigned(
    pulse: tuple[str, str], tmp_path: Path
) -> None:
    url, cluster = pulse
    ring = tmp_path / "ring.toml"
    assert keygen(tmp_path, "agent-1", "--keyring", str(ring)).returncode == 0
    where = ("-s", url, "-c", cluster)
    with Background("reverb", "--keyring", str(ring), "--json", *where) as reverb:
        reverb.wait_line(lambda line: line.startswith("reverb reverb-1:"))
        signed = run_cli(
            "emit", *where, "--agent", "agent-1", "--key", str(tmp_path / "agent-1.key"),
            "--state", "failed", "--notes", "disk full",
        )  # fmt: skip
        unsigned = run_cli("emit", *where, "--agent", "mallory", "--state", "done")
        assert signed.returncode == 0, signed.stderr
        assert unsigned.returncode == 0, unsigned.stderr
        assert "unsigned claim" in unsigned.stdout
        counted = rejected = 0
        failed: list[dict[str, str]] = []
        deadline = time.monotonic() + 15
        while not (counted and rejected and failed):
            assert time.monotonic() < deadline, reverb.seen
            report = json.loads(
                reverb.wait_line(lambda line: line.startswith("{"), stream="stdout")
            )
            assert report["type"] == "backbeat.barreport.v1"
            counted += report["claims"]
            rejected += report["rejected"]
            failed += [i for i in report["issues"] if i["kind"] == "failed"]
        assert reverb.stop(signal.SIGTERM) == 0
    assert (counted, rejected) == (1, 1)
    assert failed[0]["agent_id"] == "agent-1"
    assert "disk full" in failed[0]["detail"]


def test_two_ha_reverbs_one_publishes_and_the_other_takes_over(pulse: tuple[str, str]) -> None:
    url, cluster = pulse
    common = ("reverb", "-s", url, "-c", cluster, "--allow-unsigned", "--ha", "--lease-ttl", "1")
    with Background(*common, "--reverb-id", "rv-1") as first:
        first.wait_line(lambda line: "publishing (holds the reverb lease)" in line)
        with Background(*common, "--reverb-id", "rv-2") as second:
            line = second.wait_line(lambda line: "standby" in line)
            assert "holder rv-1" in line
            assert first.stop(signal.SIGKILL) == -signal.SIGKILL  # a crash: no release
            second.wait_line(lambda line: "publishing (holds the reverb lease)" in line)
            assert second.stop(signal.SIGTERM) == 0


# --- tempo --------------------------------------------------------------------------------------
def test_tempo_gets_the_pulses_answer(pulse: tuple[str, str], nats_url: str) -> None:
    url, cluster = pulse
    accepted, refused, as_json, nobody = run_many(
        [
            ["tempo", "570", "-s", url, "-c", cluster, "--reason", "slow down a bit"],
            ["tempo", "1200", "-s", url, "-c", cluster],
            ["tempo", "590", "-s", url, "-c", cluster, "--json"],
            ["tempo", "100", "-s", nats_url, "-c", new_cluster(), "--timeout", "1"],
        ]
    )
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.startswith("tempo 570 BPM accepted, effective at beat ")
    assert refused.returncode == 1
    assert refused.stdout.startswith("tempo 1200 BPM refused")
    assert "--force" in refused.stderr
    answer = json.loads(as_json.stdout)
    assert set(answer) == {"accepted", "reason", "effective_beat"}
    assert as_json.returncode == (0 if answer["accepted"] else 1)
    assert nobody.returncode == 1
    assert "no pulse" in nobody.stderr or "no reply" in nobody.stderr


# --- health -------------------------------------------------------------------------------------
def test_health_prints_go_shaped_json(pulse: tuple[str, str], nats_url: str) -> None:
    url, cluster = pulse
    healthy, with_metrics, no_pulse = run_many(
        [
            ["health", "-s", url, "-c", cluster, "--agent", "checker", "--beats", "3"],
            ["health", "-s", url, "-c", cluster, "--beats", "1", "--metrics"],
            ["health", "-s", nats_url, "-c", new_cluster(), "--beats", "1", "--timeout", "0.5"],
        ]
    )
    assert healthy.returncode == 0, healthy.stderr
    snapshot = json.loads(healthy.stdout)
    assert tuple(snapshot) == GO_HEALTH_FIELDS
    assert snapshot["connected"] is True
    assert snapshot["local_degradation"] is False
    assert snapshot["last_beat"] > 0
    assert 500 <= snapshot["current_tempo"] <= PULSE_TEMPO  # the tempo test may slow it down
    assert isinstance(snapshot["time_drift"], int)
    assert isinstance(snapshot["tempo_drift"], int)
    assert snapshot["last_beat_time"].endswith("Z")

    assert with_metrics.returncode == 0, with_metrics.stderr
    extended = json.loads(with_metrics.stdout)
    assert tuple(extended)[: len(GO_HEALTH_FIELDS)] == GO_HEALTH_FIELDS
    assert extended["delivery"] == "core"
    assert extended["metrics"]["beats"] >= 1

    assert no_pulse.returncode == 1
    assert "unhealthy" in no_pulse.stderr
    assert "no beat" in no_pulse.stderr
    lonely = json.loads(no_pulse.stdout)
    assert lonely["connected"] is True
    assert lonely["last_beat"] == 0
    assert lonely["last_beat_time"] == "0001-01-01T00:00:00Z"


# --- exit codes for bad configuration and unreachable servers -----------------------------------
def test_bad_configuration_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    loose_key = tmp_path / "loose.key"
    assert keygen(tmp_path, "loose").returncode == 0
    loose_key.chmod(0o644)
    cases: list[tuple[list[str], str]] = [
        (["emit", "--cluster", "bad cluster", "--agent", "a"], "cluster_id"),
        (["emit", "--agent", "a", "--progress", "1.5"], "progress"),
        (["emit", "--cluster", "c"], "--agent"),
        (["emit", "--agent", "loose", "--key", str(loose_key)], "chmod 600"),
        (["pulse", "--tempo", "5000"], "tempo_bpm"),
        (["pulse", "--lease-ttl", "1"], "--ha"),
        (["pulse", "--ha", "--lease-ttl", "0"], "must be > 0"),
        (["cluster", "--pulses", "0"], "pulses"),
        (["cluster", "--tempo", "0", "--duration", "1"], "tempo_bpm"),
        (["cluster", "--restart-after", "1"], "--failover-every"),
        (["reverb"], "--allow-unsigned"),
        (["tail", "--nats-url", "http://example"], "not a NATS URL"),
        (["tail", "--since", "0"], "--bars"),
        (["tail", "--bars", "--limit", "3"], "--since"),
        (["tail", "--bars", "--since", "-1"], "must be >= 0"),
        (["tempo", "0"], "[1, 1200]"),
        (["demo", "--agents", "3"], "5..64 agents"),
        (["keygen", "--agent", "bad id", "--out", str(tmp_path / "bad.key")], "agent"),
    ]
    results = run_many([args for args, _ in cases])
    for (args, needle), result in zip(cases, results, strict=True):
        assert result.returncode == 2, (args, result.returncode, result.stderr)
        assert needle in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr, args
    assert not (tmp_path / "bad.key").exists()


def test_unreachable_server_exits_3() -> None:
    url = f"nats://127.0.0.1:{closed_port()}"
    commands = [
        ["health", "-s", url, "-c", "c"],
        ["emit", "-s", url, "-c", "c", "--agent", "a", "--beat-timeout", "0"],
        ["tempo", "60", "-s", url, "-c", "c"],
        ["pulse", "-s", url, "-c", "c"],
        ["pulse", "--ha", "-s", url, "-c", "c"],
    ]
    for args, result in zip(commands, run_many(commands), strict=True):
        assert result.returncode == 3, (args, result.returncode, result.stderr)
        assert "cannot connect" in result.stderr, (args, result.stderr)
        assert url in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr, args


# --- cluster (local NATS cluster + HA pulses) ---------------------------------------------------
def _ports_of(urls_line: str) -> list[int]:
    # "NATS cluster of 3 up: nats://127.0.0.1:1,nats://127.0.0.1:2,..."
    urls = urls_line.split(": ", 1)[1].split(",")
    return [int(url.rsplit(":", 1)[1]) for url in urls]


def test_cluster_runs_for_a_duration_and_survives_failovers() -> None:
    # Two clusters at once (start-up dominates): one for a fixed --duration, one crashing its
    # leader every second until a takeover is seen, then stopped with SIGTERM.
    with Background(
        "cluster", "--servers", "3", "--pulses", "3", "--tempo", "300",
        "--failover-every", "1", "--cluster-id", new_cluster(),
    ) as failing:  # fmt: skip
        timed = run_cli(
            "cluster", "--servers", "3", "--pulses", "2", "--tempo", "300", "--duration", "4",
            "--cluster-id", new_cluster(), timeout=25,
        )  # fmt: skip
        up = failing.wait_line(
            lambda line: line.startswith("NATS cluster of 3 up:"), stream="stdout"
        )
        failing.wait_line(lambda line: " leads" in line, stream="stdout", timeout=20)
        failing.wait_line(lambda line: line.startswith("crashing the leader"), stream="stdout")
        takeover = failing.wait_line(
            lambda line: line.startswith("beat ") and "took over" in line, stream="stdout"
        )
        assert failing.stop(signal.SIGTERM) == 0
        _, _, err = failing.finish()
        assert "Traceback" not in err
    assert timed.returncode == 0, timed.stderr
    lines = timed.stdout.splitlines()
    assert lines[0].startswith("NATS cluster of 3 up: nats://127.0.0.1:")
    assert "2 HA pulse(s), 300 BPM" in timed.stdout
    leads = [line for line in lines if line.startswith("beat ") and line.endswith(" leads")]
    assert leads, timed.stdout  # e.g. "beat 0: pulse-1 leads"
    assert "stopped after 4 s" in timed.stderr
    assert "Traceback" not in timed.stderr
    # "beat 9: pulse-2 took over after a 0.446 s gap (previous beat 7)": no beat index repeats
    words = takeover.split()
    new_beat, previous = int(words[1].rstrip(":")), int(words[-1].rstrip(")"))
    assert new_beat > previous
    for port in _ports_of(up):  # the servers are gone
        with (
            pytest.raises(ConnectionRefusedError),
            socket.create_connection(("127.0.0.1", port), timeout=2),
        ):
            pass


def test_cluster_ctrl_c_exits_130() -> None:
    with Background("cluster", "--servers", "2", "--pulses", "1", "--tempo", "300") as proc:
        proc.wait_line(lambda line: " leads" in line, stream="stdout", timeout=20)
        assert proc.stop(signal.SIGINT) == 130
        _, _, err = proc.finish()
        assert "Traceback" not in err


# --- pulse --ha ---------------------------------------------------------------------------------
def test_ha_pulses_hand_over_and_tail_sees_their_beats(nats_url: str) -> None:
    cluster = new_cluster()
    where = ("-s", nats_url, "-c", cluster)
    ha = ("pulse", "--ha", "--tempo", str(PULSE_TEMPO), "--lease-ttl", "1", *where)
    with Background(*ha, "--pulse-id", "ha-1") as first:
        first.wait_line(lambda line: line.startswith("pulse ha-1 (HA, lease TTL 1 s"))
        first.wait_line(
            lambda line: line.startswith("role leader: ha-1 leads from beat 0"), stream="stdout"
        )
        seen = run_cli("tail", "--beats", "--count", "3", "--json", *where, timeout=15)
        assert seen.returncode == 0, seen.stderr
        frames = [json.loads(line) for line in seen.stdout.splitlines()]
        indices = [f["beat_index"] for f in frames]
        assert indices == list(range(indices[0], indices[0] + 3))
        assert {f["cluster_id"] for f in frames} == {cluster}

        with Background(*ha, "--pulse-id", "ha-2", "--quiet") as second:
            second.wait_line(
                lambda line: line == "role follower: ha-2 waits for the lease", stream="stdout"
            )
            # the leader stops and releases the lease: the follower takes over without a TTL wait
            assert first.stop(signal.SIGTERM) == 0
            took = second.wait_line(
                lambda line: line.startswith("role leader: ha-2"), stream="stdout"
            )
            assert "leads from beat" in took
            after = run_cli("tail", "--beats", "--count", "3", "--json", *where, timeout=15)
            assert after.returncode == 0, after.stderr
            later = [json.loads(line)["beat_index"] for line in after.stdout.splitlines()]
            assert later == list(range(later[0], later[0] + 3))
            assert later[0] > indices[-1]  # the schedule continued, it did not restart at 0
            assert second.stop(signal.SIGINT) == 130
            assert not [line for line in second.seen["stdout"] if line.startswith("beat ")]


# --- tail --bars --since ------------------------------------------------------------------------
def test_tail_bars_since_replays_stored_reports_then_follows(nats_url: str) -> None:
    cluster = new_cluster()
    where = ("-s", nats_url, "-c", cluster)
    with (
        Background("pulse", "--tempo", str(PULSE_TEMPO), "--quiet", *where) as pulse_proc,
        Background("reverb", "--allow-unsigned", "--json", *where) as reverb,
    ):
        published = [
            json.loads(reverb.wait_line(lambda line: line.startswith("{"), stream="stdout"))
            for _ in range(3)
        ]
        second_ends = str(published[1]["to_beat"])
        replay, since, across = run_many(
            [
                ["tail", "--bars", "--since", "0", "--count", "2", "--json", *where],
                # the window that contains the second report's last beat, and the ones after it
                ["tail", "--bars", "--since", second_ends, "--count", "1", "--json", *where],
                # one stored report, then live ones: --count counts both
                ["tail", "--bars", "--since", "0", "--limit", "1", "--count", "2", *where],
            ],
            timeout=20,
        )
        assert pulse_proc.stop(signal.SIGTERM) == 0
        assert reverb.stop(signal.SIGTERM) == 0
    assert replay.returncode == 0, replay.stderr
    stored = [json.loads(line) for line in replay.stdout.splitlines()]
    assert len(stored) == 2
    assert "stored bar report(s) from BACKBEAT_BARS_" in replay.stderr
    # the earliest report the reverb published and stored comes first, then the next window
    assert stored[0]["window_id"] == published[0]["window_id"]
    assert stored[0]["from_beat"] == published[0]["from_beat"]
    assert stored[1]["from_beat"] == stored[0]["to_beat"] + 1
    assert {r["type"] for r in stored} == {"backbeat.barreport.v1"}

    assert since.returncode == 0, since.stderr
    assert json.loads(since.stdout)["window_id"] == published[1]["window_id"]

    assert across.returncode == 0, across.stderr
    assert "1 stored bar report(s)" in across.stderr
    assert "exiting after 1 more" in across.stderr
    reports = [line for line in across.stdout.splitlines() if line.startswith("bar report")]
    assert len(reports) == 2
    first_beats = [int(line.split()[3].split("-")[0]) for line in reports]
    assert first_beats[0] == published[0]["from_beat"]
    assert first_beats[1] > first_beats[0]  # a live report, not the replayed one again
