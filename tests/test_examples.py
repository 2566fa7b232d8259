"""Every program in ``examples/`` runs, as a user would run it, against a real nats-server.

Each ``examples/*.py`` is found here by itself, so a new example is run without a line added:
``test_*.py`` files are pytest files (``python -m pytest <file>``), the others programs
(``python -W error <file>``). A program gets ``BACKBEAT_NATS_URL`` and a fresh
``BACKBEAT_CLUSTER_ID`` in its environment and must end by itself, with exit 0, within
:data:`BOUND_S`; unless :data:`PROGRAMS` says otherwise it runs beside a pulse and a reverb this
test starts for its cluster. The three examples below also have their output checked: what
they print, the bar reports the reverb made of their claims (clean: no issue, nothing
rejected), and the admin server's ``/healthz`` while the services example runs.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

import backbeat_trio as bb3
from tests._http import get

pytestmark = pytest.mark.nats

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ROOT = EXAMPLES.parent
#: The longest one example may take (they take a few seconds; the machine may be loaded).
BOUND_S = 90.0
TEMPO = 300  # the test pulse: 0.2 s beats, a beat of margin for a loaded machine


@dataclass(frozen=True)
class Program:
    """How to run one example program beyond the defaults."""

    args: tuple[str, ...] = ()
    #: run a pulse and a reverb for its cluster (no: it brings its own)
    services: bool = True


#: The programs that need more than the defaults.
PROGRAMS: dict[str, Program] = {
    "agent.py": Program(args=("--key", "{key}")),
    "many_agents.py": Program(args=("--agents", "10", "--tasks", "2")),
    "services_in_your_app.py": Program(args=("--tempo", str(TEMPO)), services=False),
}


def example_files() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("*.py"))


def example_env(url: str, cluster: str) -> dict[str, str]:
    """The environment without the caller's BACKBEAT_* settings, plus the server and cluster."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BACKBEAT_") or k == "BACKBEAT_NATS_SERVER"
    }
    return env | {"BACKBEAT_NATS_URL": url, "BACKBEAT_CLUSTER_ID": cluster}


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    lines: list[str] = field(default_factory=list)

    def explain(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


async def run_example(
    argv: list[str],
    env: dict[str, str],
    on_line: Callable[[str], Awaitable[None]] | None = None,
) -> Run:
    """Run ``argv`` from the repository's root, reading its output as it comes (``on_line`` is
    awaited with each stdout line); killed if it outlives :data:`BOUND_S`."""
    lines: list[str] = []
    err = bytearray()
    proc = await trio.lowlevel.open_process(
        argv,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    stdout, stderr = proc.stdout, proc.stderr

    async def read_out() -> None:
        pending = b""
        async for chunk in stdout:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                lines.append(line)
                if on_line is not None:
                    await on_line(line)
        if pending:
            lines.append(pending.decode(errors="replace"))

    async def read_err() -> None:
        async for chunk in stderr:
            err.extend(chunk)

    try:
        with trio.fail_after(BOUND_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_out)
                nursery.start_soon(read_err)
            returncode = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
    return Run(returncode, "\n".join(lines), err.decode(errors="replace"), lines)


@dataclass
class Services:
    """A pulse and a reverb for one cluster, run by the test beside an example, and every bar
    report the reverb made (its own ``history`` keeps the recent ones only)."""

    pulse: bb3.PulseStatus
    reverb: bb3.ReverbStatus
    reports: list[bb3.BarReport] = field(default_factory=list)
    _more: trio.Event = field(default_factory=trio.Event)

    async def keep_reports(self) -> None:
        while True:
            self.reports.append(await self.reverb.wait_for_report())
            self._more.set()
            self._more = trio.Event()

    async def wait_for_reports(self, count: int) -> None:
        """Until ``count`` more reports than now have been made."""
        target = len(self.reports) + count
        while len(self.reports) < target:
            await self._more.wait()


async def start_services(
    nursery: trio.Nursery, url: str, cluster: str, keyring: bb3.Keyring | None
) -> Services:
    reverb_cfg = bb3.ReverbConfig(
        cluster_id=cluster, nats_url=url, keyring=keyring, allow_unsigned=keyring is None
    )
    reverb = await nursery.start(bb3.run_reverb, reverb_cfg)
    pulse = await nursery.start(
        bb3.run_pulse, bb3.PulseConfig(cluster_id=cluster, nats_url=url, tempo_bpm=TEMPO)
    )
    services = Services(pulse, reverb)
    nursery.start_soon(services.keep_reports)
    return services


def assert_clean(reports: list[bb3.BarReport]) -> None:
    """The example's claims made at least one report, and no report shows an issue."""
    with_claims = [r for r in reports if r.claims]
    assert with_claims, reports
    assert any(r.by_state.get("done") for r in with_claims), with_claims
    for report in reports:
        assert report.rejected == 0, report
        assert report.late == 0, report
        assert list(report.issues) == [], report


def health_line(run: Run) -> dict[str, Any]:
    assert run.lines, run.explain()
    assert run.lines[-1].startswith("health: "), run.explain()
    health: dict[str, Any] = msgspec.json.decode(run.lines[-1].removeprefix("health: "))
    return health


# --- the checks of the examples we know -----------------------------------------------------
def check_agent(run: Run, services: Services | None, cluster: str) -> None:
    assert f"agent-1 joined {cluster}: claims are kept until acknowledged" in run.stdout
    assert "-- bar at beat" in run.stdout
    for n in range(1, 5):  # --tasks 4 by default, each fits its budget
        assert f"agent-1-task-{n} done" in run.stdout, run.explain()
    assert "budget exceeded" not in run.stdout
    health = health_line(run)
    metrics = health["metrics"]
    assert health["connected"] is True
    assert health["delivery"] == "jetstream"
    assert metrics["beats"] >= 12  # four tasks of three beats
    assert metrics["claims_ok"] == 16  # planning, two executing, done: four tasks
    assert metrics["claims_acked"] == metrics["claims_ok"]
    assert metrics["budgets_completed"] == 4
    assert metrics["budgets_timed_out"] == 0
    assert services is not None
    assert_clean(services.reports)
    # the reverb verified every signature (it has a keyring and takes no unsigned claim)
    assert services.reverb.claims_counted == 16
    assert services.reverb.rejected == 0


def check_many_agents(run: Run, services: Services | None, cluster: str) -> None:
    assert "10 agents on one connection" in run.stdout
    found = re.fullmatch(
        r"10 agents done: 20 tasks done, 0 failed; 40 claims sent, 40 acknowledged by "
        r"JetStream; every agent saw at least (\d+) beats",
        run.lines[-1],
    )
    assert found, run.explain()
    assert int(found.group(1)) >= 8  # two tasks, the first on a downbeat
    assert services is not None
    assert_clean(services.reports)
    agents_seen = {r.agents_reporting for r in services.reports if r.claims}
    assert max(agents_seen) == 10, agents_seen


def check_services_in_your_app(run: Run, services: Services | None, cluster: str) -> None:
    assert run.lines[0].startswith("admin API on http://127.0.0.1:"), run.explain()
    assert f"pulse pulse-1 at {TEMPO} BPM on cluster {cluster}" in run.stdout
    bars = [line for line in run.lines if line.startswith("bar ")]
    assert len(bars) == 4, run.explain()
    assert all("0 rejected, issues: none" in line for line in bars), run.explain()
    assert any("'done': 1" in line for line in bars), run.explain()
    assert run.lines[-1] == "stopped after 4 bar report(s)", run.explain()


CHECKS: dict[str, Callable[[Run, Services | None, str], None]] = {
    "agent.py": check_agent,
    "many_agents.py": check_many_agents,
    "services_in_your_app.py": check_services_in_your_app,
}


# --- the tests -----------------------------------------------------------------------------------
def test_the_examples_are_all_there() -> None:
    files = example_files()
    assert set(CHECKS) <= set(files), files
    assert set(PROGRAMS) <= set(files), files


@pytest.mark.parametrize("name", example_files())
def test_every_example_says_how_to_run_it_and_uses_only_the_public_api(name: str) -> None:
    tree = ast.parse((EXAMPLES / name).read_text())
    doc = ast.get_docstring(tree)
    assert doc, f"{name} has no docstring"
    how = f"pytest examples/{name}" if name.startswith("test_") else f"python examples/{name}"
    assert how in doc, f"{name}'s docstring does not say `{how}`"
    public = {"backbeat_trio", "backbeat_trio.testing"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
            if modules[0] in public:
                assert not any(a.name.startswith("_") for a in node.names), (name, node.lineno)
        else:
            if isinstance(node, ast.Attribute):
                private = re.fullmatch(r"_(?!_).*", node.attr)
                assert not private, f"{name}:{node.lineno} reads the private name {node.attr}"
            continue
        for module in modules:
            if module.split(".")[0] == "backbeat_trio":
                assert module in public, f"{name}:{node.lineno} imports {module}"


@pytest.mark.parametrize("name", example_files())
async def test_every_example_runs(name: str, nats_url: str, tmp_path: Path) -> None:
    cluster = "ex-" + re.sub(r"[^a-z0-9]+", "-", name.removesuffix(".py").lower())
    env = example_env(nats_url, cluster)
    if name.startswith("test_"):
        argv = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(EXAMPLES / name),
        ]
        run = await run_example(argv, env)
        assert run.returncode == 0, run.explain()
        assert re.search(r"\b\d+ passed\b", run.stdout), run.explain()
        return

    program = PROGRAMS.get(name, Program())
    key_file = tmp_path / "agent-1.key"
    key = bb3.generate_signing_key()
    bb3.save_signing_key(key, key_file)
    args = [arg.format(key=key_file) for arg in program.args]
    keyring = bb3.Keyring({"agent-1": key.verify_key}) if "{key}" in program.args else None
    healthz: list[int] = []

    async def on_line(line: str) -> None:
        found = re.match(r"admin API on http://([\d.]+:\d+)/", line)
        if found:  # the services example: its admin server answers while it runs
            healthz.append((await get(found.group(1), "/healthz")).status)

    services: Services | None = None
    async with trio.open_nursery() as nursery:
        if program.services:
            services = await start_services(nursery, nats_url, cluster, keyring)
        argv = [sys.executable, "-W", "error", str(EXAMPLES / name), *args]
        run = await run_example(argv, env, on_line)
        if services is not None:
            # the report of the window the example's last claims went to, and one after it
            # (where an agent that left mid-task would show as stalled)
            with trio.fail_after(10):
                await services.wait_for_reports(2)
        nursery.cancel_scope.cancel()
    assert run.returncode == 0, run.explain()
    if name == "services_in_your_app.py":
        assert healthz == [200], run.explain()
    check = CHECKS.get(name)
    if check is not None:
        check(run, services, cluster)
