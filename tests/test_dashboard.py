"""The live dashboard: its sans-IO state, its ASGI app over a real nats-server, and the page in a
real headless Chromium during ``backbeat-trio demo --web``."""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from _browser import CLI, Demo, DevTools, artifacts_dir, chromium
from hypothesis import given
from hypothesis import strategies as st

from backbeat_trio import BarReport, BeatFrame, ConfigError, StatusClaim, generate_signing_key
from backbeat_trio._bridge.nats import open_nats_transport
from backbeat_trio._core.beats import bar_subject, beat_subject, status_subject, window_id
from backbeat_trio._core.dashboard import DashboardState, deadlock_cycle
from backbeat_trio._core.hlc import HLC
from backbeat_trio._core.signing import public_key_b64
from backbeat_trio._core.wire import BarIssue, encode, encode_claim
from backbeat_trio._ops.dashboard import Dashboard
from backbeat_trio._services.reverb import AcceptedClaim, ReverbStatus
from backbeat_trio._transport.options import ConnectionOptions

CLUSTER = "dash"


# --- building messages ---------------------------------------------------------------------------
def frame(index: int, *, pulse: str = "pulse-1", tempo: int = 120, cluster: str = CLUSTER) -> bytes:
    phase = ("plan", "execute", "execute", "review")[index % 4]
    return encode(
        BeatFrame(
            cluster_id=cluster,
            beat_index=index,
            downbeat=index % 4 == 0,
            phase=phase,
            hlc=str(HLC(pulse).now()),
            deadline_at=dt.datetime.now(dt.UTC),
            tempo_bpm=tempo,
            window_id=window_id(cluster, index),
        )
    )


def accepted(
    agent: str, state: str = "executing", *, hlc: HLC | None = None, **fields: Any
) -> StatusClaim:
    stamp = str((hlc or HLC(agent)).now())
    return StatusClaim(agent_id=agent, task_id=f"t-{agent}", hlc=stamp, state=state, **fields)  # type: ignore[arg-type]


def claim(agent: str, state: str = "executing", *, hlc: HLC | None = None, **fields: Any) -> bytes:
    return encode_claim(accepted(agent, state, hlc=hlc, **fields))


def report(first: int, *, reverb: str = "reverb-1", issues: list[BarIssue] | None = None) -> bytes:
    return encode(
        BarReport(
            cluster_id=CLUSTER,
            window_id=window_id(CLUSTER, first),
            from_beat=first,
            to_beat=first + 3,
            hlc=str(HLC(reverb).now()),
            agents_reporting=2,
            claims=5,
            blocked=["a", "b"],
            issues=issues or [],
        )
    )


DEADLOCK = BarIssue(agent_id="a", kind="deadlock", detail="a -> b -> a")


# --- DashboardState (sans-IO) ---------------------------------------------------------------
def test_state_keeps_the_beat_position_and_measured_tempo() -> None:
    state = DashboardState(CLUSTER)
    for i in range(6):
        deltas = state.on_beat(frame(i), arrival=i * 0.5, wall=1e9 + i * 0.5)
        assert [d["type"] for d in deltas] == ["beat"]
    beat = state.snapshot()["beat"]
    assert (beat["beat_index"], beat["phase"], beat["position"], beat["bar"]) == (
        5,
        "execute",
        1,
        2,
    )
    assert beat["tempo_bpm"] == 120
    assert beat["measured_bpm"] == pytest.approx(120.0)
    assert state.counters["beats"] == 6
    assert state.seq == 6


def test_state_counts_and_skips_malformed_messages_on_every_subject() -> None:
    state = DashboardState(CLUSTER)
    assert state.on_beat(b"{not json", arrival=0.0, wall=0.0)[0]["type"] == "malformed"
    assert state.on_beat(frame(1, cluster="other"), arrival=0.0, wall=0.0)[0]["type"] == "malformed"
    assert state.on_report(b"\xff\xfe", wall=0.0)[0]["type"] == "malformed"
    assert state.malformed == {"beat": 2, "bar": 1}
    assert "bar:" in state.last_error
    snap = state.snapshot()
    assert snap["beat"] is None
    assert snap["agents"] == []
    assert snap["reports"] == []
    assert state.on_beat(frame(0), arrival=0.0, wall=0.0)[0]["type"] == "beat"  # still working


_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
)
_json_values = _scalars | st.lists(_scalars, max_size=3)
_FIELDS = [
    "type",
    "cluster_id",
    "beat_index",
    "hlc",
    "agent_id",
    "task_id",
    "state",
    "issues",
    "from_beat",
    "to_beat",
    "window_id",
    "tempo_bpm",
    "phase",
    "progress",
    "wait_for",
]


@given(
    raw=st.binary(max_size=64)
    | st.dictionaries(st.sampled_from(_FIELDS), _json_values).map(lambda d: json.dumps(d).encode())
)
def test_state_never_raises_on_any_bytes(raw: bytes) -> None:
    state = DashboardState(CLUSTER)
    for deltas in (
        state.on_beat(raw, arrival=0.0, wall=0.0),
        state.on_report(raw, wall=0.0),
    ):
        assert all(d["type"] in {"beat", "report", "malformed"} for d in deltas)
    assert sum(state.malformed.values()) + sum(state.counters.values()) >= 2
    json.dumps(state.snapshot())  # whatever arrived, the snapshot stays JSON


def test_state_keeps_each_agents_latest_claim_and_marks_signatures() -> None:
    state = DashboardState(CLUSTER)
    clock = HLC("ada")
    older = accepted("ada", "planning", hlc=clock)
    newer = accepted("ada", "executing", hlc=clock, progress=0.5, beats_left=2, notes="half")
    key = public_key_b64(generate_signing_key())
    [delta] = state.on_claim(newer, signed=True, key=key, wall=0.0)
    assert delta["agent"]["signed"] is True
    assert delta["agent"]["key"] == key[:12]
    # older by HLC: counted, not shown; the shown claim handed over again: neither
    assert state.on_claim(older, signed=False, wall=0.0) == []
    assert state.on_claim(newer, signed=True, key=key, wall=0.0) == []
    assert state.counters["claims"] == 2
    [row] = state.snapshot()["agents"]
    assert (row["state"], row["progress"], row["beats_left"], row["notes"]) == (
        "executing",
        0.5,
        2,
        "half",
    )
    assert row["claims"] == 2
    assert row["signed"] is True
    waiting = accepted("bob", "waiting", wait_for=["agent://ada", "ticket://9"])
    [delta] = state.on_claim(waiting, signed=False, key="ignored", wall=0.0)
    assert delta["agent"]["signed"] is False
    assert delta["agent"]["key"] == ""
    assert delta["agent"]["wait_for"] == ["ada", "ticket://9"]


def test_state_forgets_the_least_recent_agent_beyond_its_bound() -> None:
    state = DashboardState(CLUSTER, max_agents=3)
    for name in ("a1", "a2", "a3", "a4"):
        state.on_claim(accepted(name), signed=False, wall=0.0)
    assert [row["agent_id"] for row in state.snapshot()["agents"]] == ["a2", "a3", "a4"]


def test_state_keeps_the_last_reports_with_the_deadlock_cycle() -> None:
    state = DashboardState(CLUSTER, history=2)
    for first in (0, 4, 8):
        [delta] = state.on_report(report(first, issues=[DEADLOCK]), wall=0.0)
        assert delta["type"] == "report"
    reports = state.snapshot()["reports"]
    assert [r["from_beat"] for r in reports] == [4, 8]
    assert reports[-1]["bar"] == 3
    assert reports[-1]["issues"] == [
        {"kind": "deadlock", "agent_id": "a", "detail": "a -> b -> a", "cycle": ["a", "b", "a"]}
    ]
    state.on_report(report(8), wall=0.0)  # the same window again replaces, not appends
    assert [r["from_beat"] for r in state.snapshot()["reports"]] == [4, 8]


def test_deadlock_cycle_parses_the_reverbs_detail() -> None:
    group = BarIssue(
        agent_id="a", kind="deadlock", detail="a -> b -> a (deadlocked group: a, b, c)"
    )
    assert deadlock_cycle(group) == ["a", "b", "a"]
    assert deadlock_cycle(BarIssue(agent_id="a", kind="failed", detail="a -> a")) is None
    assert deadlock_cycle(BarIssue(agent_id="a", kind="deadlock", detail="odd")) is None


def test_state_sees_ha_hand_overs_as_a_new_hlc_node() -> None:
    state = DashboardState(CLUSTER)
    state.on_beat(frame(0, pulse="pulse-a"), arrival=0.0, wall=0.0)
    state.on_beat(frame(1, pulse="pulse-a"), arrival=0.5, wall=0.5)
    deltas = state.on_beat(frame(2, pulse="pulse-b"), arrival=1.0, wall=1.0)
    assert [d["type"] for d in deltas] == ["handover", "beat"]
    handover = deltas[0]["handover"]
    assert (handover["role"], handover["beat_index"]) == ("pulse", 2)
    assert handover["from_node"] != handover["to_node"]
    state.on_report(report(0, reverb="r-a"), wall=0.0)
    deltas = state.on_report(report(4, reverb="r-b"), wall=0.0)
    assert deltas[0]["handover"]["role"] == "reverb"
    assert [h["role"] for h in state.snapshot()["handovers"]] == ["pulse", "reverb"]


def test_state_takes_the_bar_length_from_the_reports() -> None:
    state = DashboardState(CLUSTER)
    state.on_report(report(0), wall=0.0)  # beats 0..3
    assert state.beats_per_bar == 4
    fixed = DashboardState(CLUSTER, beats_per_bar=8)
    fixed.on_report(report(0), wall=0.0)
    assert fixed.beats_per_bar == 8
    assert fixed.on_beat(frame(9), arrival=0.0, wall=0.0)[0]["beat"]["position"] == 1


# --- the ASGI app ----------------------------------------------------------------------------
class Exchange:
    """One request to an ASGI app, answered in memory."""

    def __init__(self, app: Dashboard, path: str, method: str = "GET") -> None:
        self.app = app
        self.scope = {"type": "http", "method": method, "path": path, "headers": []}
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.chunk = trio.Event()
        self.disconnect = trio.Event()
        self.block_send = False
        self.unblocked = trio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = dict(message["headers"])
        else:
            if self.block_send:
                await self.unblocked.wait()
            self.body += message.get("body", b"")
            self.chunk.set()
            self.chunk = trio.Event()

    async def run(self) -> Exchange:
        await self.app(self.scope, self.receive, self.send)
        return self

    async def wait_for(self, text: bytes) -> None:
        while text not in self.body:
            await self.chunk.wait()


def events(body: bytes) -> list[dict[str, Any]]:
    found = []
    for block in body.split(b"\n\n"):
        data = [line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")]
        if data:
            found.append(json.loads(b"".join(data)))
    return found


async def test_app_serves_the_page_its_files_and_404s() -> None:
    app = Dashboard(CLUSTER)
    page = await Exchange(app, "/").run()
    assert page.status == 200
    assert page.headers[b"content-type"].startswith(b"text/html")
    assert b'id="beat-index"' in page.body
    assert b"static/dashboard.js" in page.body
    assert b"default-src 'self'" in page.headers[b"content-security-policy"]
    script = await Exchange(app, "/static/dashboard.js").run()
    assert script.status == 200
    assert b"EventSource" in script.body
    style = await Exchange(app, "/static/dashboard.css").run()
    assert style.status == 200
    assert style.headers[b"content-type"].startswith(b"text/css")
    for path in ("/nope", "/static/../dashboard.py", "/static/", "/events/x"):
        missing = await Exchange(app, path).run()
        assert missing.status == 404, path
        assert json.loads(missing.body)["error"] == "Not Found"
    post = await Exchange(app, "/", method="POST").run()
    assert post.status == 405
    head = await Exchange(app, "/events", method="HEAD").run()
    assert head.status == 200
    assert head.body == b""
    assert app.streams == 0


@pytest.mark.nats
async def test_events_stream_the_beats_published_over_nats(nats_url: str) -> None:
    app = Dashboard(CLUSTER, heartbeat_s=0.2)
    reverb = ReverbStatus(CLUSTER)  # stands in for a running reverb: hands out what it accepts
    reverb.running = True
    with trio.fail_after(20):
        async with (
            open_nats_transport(ConnectionOptions(nats_url=nats_url)) as transport,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(functools.partial(app.run, transport, reverb=reverb))
            stream = Exchange(app, "/events")
            nursery.start_soon(stream.run)
            await stream.wait_for(b"event: snapshot")
            assert stream.status == 200
            assert stream.headers[b"content-type"].startswith(b"text/event-stream")
            assert app.streams == 1
            transport.publish(beat_subject(CLUSTER), frame(7))
            transport.publish(beat_subject(CLUSTER), b"garbage")
            # the status subject is not the dashboard's source: only what the reverb accepted is
            transport.publish(status_subject(CLUSTER), claim("mallory", "failed"))
            await trio.testing.wait_all_tasks_blocked()
            reverb._hand_out(
                AcceptedClaim(
                    claim=accepted("ada", "done", progress=1.0), signed=True, key="k" * 44, wall=0
                )
            )
            transport.publish(bar_subject(CLUSTER), report(4, issues=[DEADLOCK]))
            kinds = ["snapshot", "beat", "malformed", "agent", "report"]
            for kind in kinds[1:]:
                await stream.wait_for(b"event: " + kind.encode())
            sent = events(stream.body)
            assert sent[0]["type"] == "snapshot"  # the subjects' tasks may interleave the rest
            assert sorted(e["type"] for e in sent) == sorted(kinds)
            [beat] = [e["beat"] for e in sent if e["type"] == "beat"]
            assert beat["beat_index"] == 7
            await stream.wait_for(b": heartbeat")
            # a second browser starts from a snapshot of all that
            late = Exchange(app, "/events")
            nursery.start_soon(late.run)
            await late.wait_for(b"event: snapshot")
            snap = events(late.body)[0]
            assert snap["beat"]["beat_index"] == 7
            assert [(a["agent_id"], a["state"]) for a in snap["agents"]] == [("ada", "done")]
            assert snap["reports"][0]["issues"][0]["cycle"] == ["a", "b", "a"]
            assert snap["malformed"]["beat"] == 1
            # a browser going away ends its stream; the other keeps going
            late.disconnect.set()
            await trio.testing.wait_all_tasks_blocked()
            assert app.streams == 1
            nursery.cancel_scope.cancel()
    assert app.streams == 0


async def test_a_slow_browser_drops_its_own_oldest_updates_then_gets_a_snapshot() -> None:
    app = Dashboard(CLUSTER, client_buffer=1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            slow = Exchange(app, "/events")
            quick = Exchange(app, "/events")
            nursery.start_soon(slow.run)
            nursery.start_soon(quick.run)
            await slow.wait_for(b"event: snapshot")
            await quick.wait_for(b"event: snapshot")
            slow.block_send = True
            app._fan_out(app.state.on_beat(frame(0), arrival=0.0, wall=0.0))
            await trio.testing.wait_all_tasks_blocked()  # slow took beat 0 and hangs sending it
            for i in range(1, 4):
                app._fan_out(app.state.on_beat(frame(i), arrival=float(i), wall=0.0))
                await trio.testing.wait_all_tasks_blocked()
            assert app.updates_dropped == 2  # slow's beats 1 and 2; beat 3 waits in its buffer
            assert [e["beat"]["beat_index"] for e in events(quick.body)[1:]] == [0, 1, 2, 3]
            slow.body = b""
            slow.unblocked.set()
            await slow.wait_for(b"event: snapshot")
            await trio.testing.wait_all_tasks_blocked()
            sent = events(slow.body)
            assert [e["type"] for e in sent] == ["beat", "snapshot"]
            assert [sent[0]["beat"]["beat_index"], sent[1]["beat"]["beat_index"]] == [0, 3]
            nursery.cancel_scope.cancel()
    assert app.streams == 0


async def test_event_streams_beyond_the_limit_get_a_503_and_a_closed_one_frees_its_place() -> None:
    app = Dashboard(CLUSTER, max_streams=2)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            first, second = Exchange(app, "/events"), Exchange(app, "/events")
            nursery.start_soon(first.run)
            nursery.start_soon(second.run)
            await first.wait_for(b"event: snapshot")
            await second.wait_for(b"event: snapshot")
            third = await Exchange(app, "/events").run()
            assert third.status == 503
            assert "event streams are open" in json.loads(third.body)["reason"]
            assert app.streams_refused == 1
            first.disconnect.set()  # that browser went away
            await trio.testing.wait_all_tasks_blocked()
            assert app.streams == 1
            fourth = Exchange(app, "/events")
            nursery.start_soon(fourth.run)
            await fourth.wait_for(b"event: snapshot")
            assert fourth.status == 200
            nursery.cancel_scope.cancel()
    assert app.streams == 0


@pytest.mark.nats
async def test_served_over_http_and_nothing_lingers_after_shutdown(nats_url: str) -> None:
    from backbeat_trio._ops.server import serve_asgi

    app = Dashboard(CLUSTER, heartbeat_s=0.1)
    with trio.fail_after(20):
        async with (
            open_nats_transport(ConnectionOptions(nats_url=nats_url)) as transport,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(app.run, transport)
            bound = await nursery.start(serve_asgi, app, "127.0.0.1:0")
            host, _, port = bound.rpartition(":")
            conn = await trio.open_tcp_stream(host, int(port))
            await conn.send_all(f"GET /events HTTP/1.1\r\nHost: {bound}\r\n\r\n".encode())
            received = b""
            while b"event: snapshot" not in received:
                received += await conn.receive_some()
            transport.publish(beat_subject(CLUSTER), frame(42))
            while b'"beat_index":42' not in received:
                received += await conn.receive_some()
            assert received.startswith(b"HTTP/1.1 200")
            assert b"text/event-stream" in received
            nursery.cancel_scope.cancel()
        # the server's shutdown ended the stream: the connection is closed, not left hanging
        with trio.move_on_after(5) as timer:
            while await conn.receive_some():
                pass
        assert not timer.cancelled_caught
        await conn.aclose()
    assert app.streams == 0


# --- the page in a real browser during `backbeat-trio demo --web` ---------------------------------
@pytest.fixture
def browser(tmp_path: Path) -> Iterator[DevTools]:
    binary = chromium()
    if binary is None:
        reason = "Chromium is not installed (apt-get install -y chromium; .ci/run does it)"
        if os.environ.get("BACKBEAT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"BACKBEAT_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    tools = DevTools(binary, tmp_path / "chromium-profile")
    try:
        yield tools
    finally:
        tools.close()


@pytest.fixture
def demo() -> Iterator[Demo]:
    running = Demo()
    try:
        yield running
    finally:
        if running.proc.poll() is None:
            running.proc.kill()
        running.proc.wait()
        running.reader.join(timeout=5)
        for pipe in (running.proc.stdout, running.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.mark.nats
def test_the_page_shows_beats_advancing_and_the_deadlock_cycle(
    browser: DevTools, demo: Demo, tmp_path: Path
) -> None:
    url = demo.wait_line("dashboard: ").split()[1]
    assert url.startswith("http://127.0.0.1:")
    browser.open(url)
    beat_index = "document.getElementById('beat-index').textContent"
    first = int(browser.wait_until(f"(t => /^[0-9]+$/.test(t) && t)({beat_index})"))
    second = int(browser.wait_until(f"(n => n > {first} && n)(+{beat_index})"))
    assert second > first  # the page updated without a reload
    caption = browser.wait_until(
        "document.getElementById('deadlock').hidden === false && "
        "document.getElementById('deadlock-caption').textContent"
    )
    assert "cyd → dot → cyd" in caption
    issues = browser.evaluate("document.getElementById('issues').tBodies[0].textContent")
    assert "deadlock" in issues
    assert "cyd -> dot -> cyd" in issues
    labels = browser.evaluate(
        "[...document.querySelectorAll('#deadlock-cycle text')].map(t => t.textContent)"
    )
    assert sorted(labels) == ["cyd", "dot"]
    assert browser.evaluate("document.querySelectorAll('#deadlock-cycle path.edge').length") == 2
    agents = browser.evaluate(
        "[...document.querySelectorAll('#agents tbody tr')].map(r => r.dataset.agent)"
    )
    assert {"ada", "bob", "cyd", "dot", "eno"} <= set(agents)
    assert browser.evaluate("document.getElementById('connection').textContent") == "live"
    shot = artifacts_dir(tmp_path) / "dashboard.png"
    browser.screenshot(shot)
    assert shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"dashboard screenshot: {shot}")

    code, out, err = demo.stop()
    assert code == 130, err
    assert "Traceback" not in err
    assert "demo summary (interrupted)" in out


# --- `demo --web` options ----------------------------------------------------------------------
def test_demo_web_refuses_an_address_beyond_loopback() -> None:
    result = subprocess.run(
        [*CLI, "demo", "--plain", "--web", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "loopback only" in result.stderr
    assert "demo summary" not in result.stdout  # refused before anything started


@pytest.mark.nats
async def test_demo_dashboard_takes_any_free_port_when_its_own_is_busy(nats_url: str) -> None:
    from backbeat_trio._cli.demo_web import serve_demo_dashboard

    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                with pytest.raises(ConfigError, match="cannot listen"):
                    await nursery.start(serve_demo_dashboard, nats_url, CLUSTER, 4, busy)
                url = await nursery.start(
                    functools.partial(
                        serve_demo_dashboard, nats_url, CLUSTER, 4, busy, any_port_if_busy=True
                    )
                )
                assert url.startswith("http://127.0.0.1:")
                assert url != f"http://{busy}/"
                nursery.cancel_scope.cancel()
