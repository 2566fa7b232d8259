"""``backbeat-trio demo`` end to end (subprocess), and the reusable agent simulation in-process."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import trio

from backbeat_trio import Config, ConfigError, PulseConfig, ReverbConfig, run_pulse, run_reverb
from backbeat_trio._cli.demo_agents import AgentLife, AgentView, demo_cast, simulate_agent

pytestmark = pytest.mark.nats

CLI = [sys.executable, "-m", "backbeat_trio"]


def cli_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BACKBEAT_") or k == "BACKBEAT_NATS_SERVER"
    }


def test_demo_plain_runs_four_bars_and_names_the_issues() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [*CLI, "demo", "--plain", "--bars", "4"],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 60
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    beats = [line for line in lines if line.startswith("beat ")]
    reports = [line for line in lines if re.match(r"bar \d+ report", line)]
    assert len(reports) == 4
    assert len(beats) >= 16
    indices = [int(line.split()[1]) for line in beats]
    assert indices == sorted(set(indices))  # one line per beat, in order

    summary = result.stdout[result.stdout.index("demo summary") :]
    assert summary.startswith("demo summary (completed): 4 bars")
    issue_lines = summary[summary.index("issues seen:") : summary.index("agents:")]
    assert re.search(r"deadlock\s+cyd\s+cyd -> dot -> cyd", issue_lines), issue_lines
    assert re.search(r"failed\s+bob\s+task failer-bob failed: upstream API", issue_lines)
    # eno's own estimate (its budget) ran out before it was done: SPEC's overrun
    assert re.search(
        r"overrun\s+eno\s+task overrunner-eno has 0 beats left but is executing"
        r".*it estimated \d+ beat",
        issue_lines,
    ), issue_lines
    assert "not seen" not in summary
    # the impostor's claim, signed with a key the reverb does not trust, is the one rejection
    assert "1 rejected (unknown_agent: 1)" in summary
    assert re.search(r"ada\s+finisher\s+done\s+100%", summary)
    assert re.search(r"eno\s+overrunner\s+done.*\[beat budget exceeded\]", summary)


def test_demo_ctrl_c_stops_cleanly_with_130() -> None:
    proc = subprocess.Popen(
        [*CLI, "demo", "--plain", "--forever"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("beat    2 "):
                break
        else:
            pytest.fail(f"the demo ended before beat 2: rc={proc.wait()}")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "demo summary (interrupted)" in out


def test_demo_live_view_renders_agents_and_issues() -> None:
    result = subprocess.run(
        [*CLI, "demo", "--live", "--bars", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**cli_env(), "COLUMNS": "120"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", result.stdout)  # drop ANSI sequences
    assert "BACKBEAT demo" in plain
    for header in ("agent", "state", "progress", "notes"):
        assert header in plain
    assert "issues in bar 1's report" in plain
    assert "deadlock" in plain
    assert "demo summary (completed): 1 bars" in plain


def test_demo_cast_needs_five_agents_and_pairs_the_waiters() -> None:
    cast = demo_cast(7)
    roles = [life.role for life in cast]
    assert roles == [
        "finisher", "failer", "waiter", "waiter", "overrunner", "staller", "finisher"
    ]  # fmt: skip
    assert cast[2].peer == cast[3].agent_id
    assert cast[3].peer == cast[2].agent_id
    with pytest.raises(ConfigError, match=r"5\.\.64 agents"):
        demo_cast(4)


async def test_simulated_agents_live_their_lives_over_nats(nats_url: str) -> None:
    cluster = "sim"
    lives = [
        AgentLife(agent_id="fin", role="finisher", work_beats=3),
        AgentLife(agent_id="fail", role="failer", fail_at=2),
        AgentLife(agent_id="over", role="overrunner", budget_beats=2, work_beats=4),
        AgentLife(agent_id="wait", role="waiter", peer="fin"),
    ]
    views: dict[str, AgentView] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as services:
            reverb = await services.start(
                run_reverb, ReverbConfig(cluster_id=cluster, nats_url=nats_url, allow_unsigned=True)
            )
            async with trio.open_nursery() as agents:
                for life in lives:
                    cfg = Config(cluster_id=cluster, agent_id=life.agent_id, nats_url=nats_url)
                    max_beats = 5 if life.role == "waiter" else None
                    views[life.agent_id] = await agents.start(
                        functools.partial(simulate_agent, cfg, life, max_beats=max_beats)
                    )
                await services.start(
                    run_pulse, PulseConfig(cluster_id=cluster, nats_url=nats_url, tempo_bpm=600)
                )
            # every life is over and its claims delivered; the reverb counts each exactly once
            sent = sum(v.claims_sent for v in views.values())
            while reverb.claims_counted + reverb.claims_late < sent:
                await reverb.wait_for_report()
            await reverb.wait_for_report()
            services.cancel_scope.cancel()

    fin, fail, over, wait = (views[name] for name in ("fin", "fail", "over", "wait"))
    assert (fin.state, fin.progress, fin.finished) == ("done", 1.0, True)
    assert fin.claims_sent == 3 + 2  # planning, 2 executing, review, done
    assert (fail.state, fail.beats_left, fail.finished) == ("failed", 0, True)
    assert "giving up" in fail.notes
    assert over.budget_exceeded
    assert (over.state, over.finished) == ("done", True)
    assert (wait.state, wait.claims_sent, wait.finished) == ("waiting", 5, True)
    assert reverb.claims_counted + reverb.claims_late == sent
    assert reverb.rejected == 0
    kinds = {(i.kind, i.agent_id) for report in reverb.history for i in report.issues}
    assert ("failed", "fail") in kinds
    assert ("overrun", "over") in kinds
    assert not any(kind == "deadlock" for kind, _ in kinds)  # "wait" waits on a finisher


def test_demo_web_stays_up_past_the_default_bars_until_ctrl_c() -> None:
    # the default run is 4 bars; with --web the dashboard must outlive them for the browser
    proc = subprocess.Popen(
        [*CLI, "demo", "--plain", "--tempo", "1200", "--web", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        assert proc.stdout is not None
        reports = 0
        for line in proc.stdout:
            if re.match(r"bar \d+ report", line):
                reports += 1
                if reports == 6:
                    break
        else:
            pytest.fail(f"the demo ended after {reports} bar reports: rc={proc.wait()}")
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "demo summary (interrupted)" in out
