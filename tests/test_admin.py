"""The admin server (``backbeat_trio._ops``) over a real nats-server: probes, Prometheus metrics,
the tempo API and its guards, leader status across an HA failover, bar history, and shutdown."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable

import msgspec
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import backbeat_trio as bb3
from backbeat_trio._bridge.nats import open_nats_transport
from backbeat_trio._core.beats import beat_subject, status_subject, tempo_subject
from backbeat_trio._embedded import NatsServerProcess
from backbeat_trio._ops import DEFAULT_ADMIN_BIND
from backbeat_trio._ops.metrics import METRIC_NAMES
from backbeat_trio._services.ha_pulse import HAPulseConfig, HAPulseStatus, run_ha_pulse
from backbeat_trio._transport.base import Transport
from tests._ha_harness import wait_until
from tests._http import Response, get, request
from tests.test_cli import Background

pytestmark = pytest.mark.nats

TOKEN = "s3cret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, parsed with prometheus-client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


async def scrape(address: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = await get(address, "/metrics")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/plain")
    return samples(r.text)


def value(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str):
    """The one sample named ``name`` whose labels include ``labels``."""
    found = [v for (n, ls), v in scraped.items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, (name, labels, found)
    return found[0]


async def post_tempo(address: str, body: bytes, headers: dict[str, str] | None = None) -> Response:
    return await request(address, "POST", "/tempo", body=body, headers=headers)


async def tempo_requests_seen(transport: Transport, cluster: str, seen: list[bytes]) -> Callable:
    sub = await transport.subscribe(tempo_subject(cluster), buffer=64)

    async def drain(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for msg in sub.messages:
            seen.append(msg.data)

    return drain


async def test_pulse_metrics_tempo_api_and_every_bad_input(nats_url: str) -> None:
    cluster = "adm-pulse"
    cfg = bb3.PulseConfig(cluster_id=cluster, nats_url=nats_url, tempo_bpm=600, pulse_id="p-a")
    async with open_nats_transport(cfg) as transport, trio.open_nursery() as nursery:
        tempo_msgs: list[bytes] = []
        await nursery.start(await tempo_requests_seen(transport, cluster, tempo_msgs))
        frames: list[bb3.BeatFrame] = []
        beats = await transport.subscribe(beat_subject(cluster), buffer=4096)

        async def collect_beats() -> None:
            async for msg in beats.messages:
                frames.append(msgspec.json.decode(msg.data, type=bb3.BeatFrame))

        nursery.start_soon(collect_beats)
        status = await nursery.start(functools.partial(bb3.run_pulse, cfg, transport=transport))
        address = await nursery.start(
            functools.partial(
                bb3.serve_admin, "127.0.0.1:0", pulse=status, transport=transport, token=TOKEN
            )
        )
        # a second, read-only server on the same pulse: its own registry, no collision
        readonly = await nursery.start(
            functools.partial(bb3.serve_admin, "127.0.0.1:0", pulse=status, transport=transport)
        )
        assert (await get(address, "/healthz")).json() == {"status": "ok"}
        await wait_until(lambda: status.published >= 3)
        ready = await get(address, "/readyz")
        assert ready.status == 200, ready.json()
        assert ready.json()["ready"] is True

        first = await scrape(address)
        await wait_until(lambda: status.published >= 8)
        second = await scrape(readonly)
        lv = {"cluster_id": cluster, "pulse_id": "p-a"}
        published = "backbeat_pulse_beats_published_total"
        assert value(second, published, **lv) > value(first, published, **lv) >= 3
        assert value(second, "backbeat_pulse_tempo_bpm", **lv) == 600
        assert value(second, "backbeat_pulse_leader", **lv) == 1
        assert value(second, "backbeat_nats_connected", cluster_id=cluster) == 1
        count = value(second, "backbeat_pulse_publish_error_seconds_count", **lv)
        inf = value(second, "backbeat_pulse_publish_error_seconds_bucket", le="+Inf", **lv)
        assert count == inf >= 8
        assert value(second, "backbeat_pulse_beats_skipped_total", reason="no_lease", **lv) == 0

        tempo = (await get(address, "/tempo")).json()
        assert tempo["tempo_bpm"] == 600
        assert tempo["writable"] is True
        assert (await get(readonly, "/tempo")).json()["writable"] is False

        # bad input: each a 4xx with a JSON reason, the pulse untouched, nothing on NATS
        good = b'{"tempo_bpm": 660, "reason": "speed up"}'
        cases: list[tuple[Response, int, str]] = [
            (await post_tempo(readonly, good, AUTH), 403, "read-only"),
            (await post_tempo(address, good), 401, "Bearer"),
            (await post_tempo(address, good, {"authorization": "Bearer nope"}), 401, "Bearer"),
            (await post_tempo(address, good, {"authorization": f"Basic {TOKEN}"}), 401, "Bearer"),
            (await post_tempo(address, b'{"tempo_bpm": 66', AUTH), 400, "malformed JSON"),
            (await post_tempo(address, b"[660]", AUTH), 400, "JSON object"),
            (await post_tempo(address, b'{"tempo_bpm": "fast"}', AUTH), 400, "int"),
            (await post_tempo(address, b'{"tempo_bpm": 66.5}', AUTH), 400, "int"),
            (await post_tempo(address, b'{"tempo_bpm": 5000}', AUTH), 400, "1200"),
            (await post_tempo(address, b'{"tempo_bpm": 0}', AUTH), 400, "1"),
            (await post_tempo(address, b'{"reason": "x"}', AUTH), 400, "required"),
            (await post_tempo(address, b'{"tempo_bpm": 660, "x": 1}', AUTH), 400, "unknown"),
            (await post_tempo(address, b'{"tempo_bpm": 900}', AUTH), 422, "more than"),
            (await post_tempo(address, b" " * 5000, AUTH), 413, "larger"),
            (await request(address, "DELETE", "/tempo", headers=AUTH), 405, "GET, POST"),
            (await request(address, "POST", "/metrics"), 405, "GET"),
            (await get(address, "/nowhere"), 404, "/healthz"),
            (await get(address, "/bars?since=abc"), 400, "since"),
            (await get(address, "/bars?limit=0"), 400, "limit"),
            (await get(address, "/bars?limit=100000"), 400, "limit"),
        ]
        for response, code, needle in cases:
            assert response.status == code, (response.status, response.body)
            assert response.headers["content-type"] == "application/json"
            assert needle in response.json()["reason"], (code, response.json())
        assert status.tempo_changes == 0
        assert status.tempo_refused == 1  # only the step-guard case reached the schedule
        assert status.schedule is not None
        assert status.schedule.pending_tempo is None

        # the valid request, as the NATS path answers it; the pulse then publishes at 660 BPM
        accepted = await post_tempo(address, good, AUTH)
        assert accepted.status == 200, accepted.body
        answer = accepted.json()
        assert set(answer) == {"accepted", "reason", "effective_beat"}
        assert answer["accepted"] is True
        effective = answer["effective_beat"]
        assert effective % 4 == 0
        await wait_until(lambda: any(f.beat_index >= effective for f in frames), bound=10)
        at_new = [f for f in frames if f.beat_index >= effective]
        assert at_new
        assert all(f.tempo_bpm == 660 for f in at_new)
        assert all(f.tempo_bpm == 600 for f in frames if f.beat_index < effective)
        third = await scrape(address)
        assert value(third, "backbeat_pulse_tempo_bpm", **lv) == 660
        assert value(third, "backbeat_pulse_tempo_changes_total", **lv) == 1
        assert value(third, "backbeat_pulse_tempo_refusals_total", **lv) == 1
        assert tempo_msgs == []  # the admin API never published a tempo request on NATS
        nursery.cancel_scope.cancel()


async def test_readyz_follows_the_nats_server_through_a_kill_and_a_restart(
    nats_server: NatsServerProcess, nats_url: str
) -> None:
    cluster = "adm-ready"
    cfg = bb3.PulseConfig(cluster_id=cluster, nats_url=nats_url, tempo_bpm=600, reconnect_delay=0.1)
    async with open_nats_transport(cfg) as transport, trio.open_nursery() as nursery:
        status = await nursery.start(functools.partial(bb3.run_pulse, cfg, transport=transport))
        address = await nursery.start(
            functools.partial(bb3.serve_admin, "127.0.0.1:0", pulse=status, transport=transport)
        )
        last: list[Response] = []

        async def ready_is(code: int) -> bool:
            last[:] = [await get(address, "/readyz")]
            return last[0].status == code

        for _ in range(200):
            if await ready_is(200):
                break
            await trio.sleep(0.05)
        assert last[0].status == 200, last[0].body
        port = nats_server.port
        nats_server.kill()  # SIGKILL
        for _ in range(200):
            if await ready_is(503):
                break
            await trio.sleep(0.05)
        assert last[0].status == 503
        assert last[0].json() == {"ready": False, "reason": "not connected to NATS"}
        down = await scrape(address)
        assert value(down, "backbeat_nats_connected", cluster_id=cluster) == 0
        await trio.sleep(0.3)  # some beats come due while disconnected
        nats_server.start()
        assert nats_server.port == port
        for _ in range(400):
            if await ready_is(200):
                break
            await trio.sleep(0.05)
        assert last[0].status == 200, last[0].body
        up = await scrape(address)
        assert value(up, "backbeat_nats_connected", cluster_id=cluster) == 1
        skipped = value(
            up, "backbeat_pulse_beats_skipped_total", reason="disconnected", cluster_id=cluster
        )
        assert skipped >= 1
        nursery.cancel_scope.cancel()


async def test_reverb_and_client_metrics_move_as_claims_flow_and_bars_replay(
    nats_url: str,
) -> None:
    cluster = "adm-reverb"
    pcfg = bb3.PulseConfig(cluster_id=cluster, nats_url=nats_url, tempo_bpm=600)
    rcfg = bb3.ReverbConfig(
        cluster_id=cluster, nats_url=nats_url, allow_unsigned=True, reverb_id="rv-1"
    )
    ccfg = bb3.Config(cluster_id=cluster, agent_id="agent-1", nats_url=nats_url)
    async with (
        open_nats_transport(rcfg) as transport,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(bb3.run_pulse, pcfg)
        reverb = await nursery.start(functools.partial(bb3.run_reverb, rcfg, transport=transport))
        async with bb3.open_client(ccfg) as client:
            address = await nursery.start(
                functools.partial(
                    bb3.serve_admin,
                    "127.0.0.1:0",
                    reverb=reverb,
                    clients=[client],
                    transport=transport,
                )
            )
            transport.publish(status_subject(cluster), b"{not a claim")
            async with trio.open_nursery() as agents:

                async def agent() -> None:
                    async for frame in client.beats():
                        await client.emit_status(
                            bb3.StatusClaim(state="executing", beats_left=2, progress=0.5)
                        )
                        if frame.beat_index < 0:
                            return

                agents.start_soon(agent)
                await wait_until(lambda: reverb.claims_counted >= 4 and reverb.reports >= 2)
                first = await scrape(address)
                await wait_until(lambda: reverb.reports >= 4, bound=10)
                agents.cancel_scope.cancel()
            second = await scrape(address)
            rv = {"cluster_id": cluster, "reverb_id": "rv-1"}
            accepted = "backbeat_reverb_claims_accepted_total"
            assert value(second, accepted, **rv) > value(first, accepted, **rv) >= 4
            rejected = value(second, "backbeat_reverb_claims_rejected_total", reason="schema", **rv)
            assert rejected == 1
            reports = "backbeat_reverb_bar_reports_published_total"
            assert value(second, reports, **rv) > value(first, reports, **rv) >= 2
            assert value(second, "backbeat_reverb_agents_reporting", **rv) == 1
            assert value(second, "backbeat_reverb_publishing", **rv) == 1
            ag = {"cluster_id": cluster, "agent_id": "agent-1"}
            beats = "backbeat_client_beats_total"
            assert value(second, beats, **ag) > value(first, beats, **ag) > 0
            assert value(second, "backbeat_client_tempo_bpm", **ag) == 600
            measured = value(second, "backbeat_client_measured_bpm", **ag)
            assert measured == pytest.approx(600, rel=0.1)
            assert value(second, "backbeat_client_connected", **ag) == 1
            ok = value(second, "backbeat_client_claims_total", outcome="ok", **ag)
            assert ok >= 4
            assert value(second, "backbeat_client_reconnects_total", **ag) == 0
            # the readiness of a reverb: connected
            assert (await get(address, "/readyz")).status == 200
            bars = (await get(address, "/bars?since=0&limit=3")).json()
            assert bars["count"] == len(bars["reports"]) == 3
            assert all(r["cluster_id"] == cluster for r in bars["reports"])
            latest = reverb.latest
            assert latest is not None
            recent = (await get(address, f"/bars?since={latest.from_beat}")).json()
            assert latest.window_id in [r["window_id"] for r in recent["reports"]]
            assert (await get(address, "/leader")).status == 404  # not an HA reverb
            assert (await get(address, "/tempo")).status == 404  # no pulse behind this one
        nursery.cancel_scope.cancel()


async def test_ha_failover_shows_on_leader_and_in_the_metrics(nats_url: str) -> None:
    cluster = "adm-ha"
    pulses: dict[str, HAPulseStatus] = {}
    scopes: dict[str, trio.CancelScope] = {}

    def config(pulse_id: str) -> HAPulseConfig:
        return HAPulseConfig(
            cluster_id=cluster,
            pulse_id=pulse_id,
            nats_url=nats_url,
            tempo_bpm=600,
            lease_ttl=1.0,
            jitter_tolerance=0.1,
            lease_replicas=1,
            release_on_exit=False,
        )

    async with trio.open_nursery() as nursery:

        async def start(pulse_id: str) -> None:
            scope = scopes[pulse_id] = trio.CancelScope()

            async def scoped(task_status: trio.TaskStatus[HAPulseStatus]) -> None:
                with scope:
                    await run_ha_pulse(config(pulse_id), task_status=task_status)

            pulses[pulse_id] = await nursery.start(scoped)

        await start("ha-1")
        await wait_until(lambda: pulses["ha-1"].leading, bound=10)
        await start("ha-2")
        address = await nursery.start(
            functools.partial(bb3.serve_admin, "127.0.0.1:0", pulse=pulses, token=TOKEN)
        )
        await wait_until(lambda: pulses["ha-2"].holder == "ha-1", bound=10)
        leader = (await get(address, "/leader")).json()["pulse"]
        assert leader["holder"] == "ha-1"
        assert leader["instances"]["ha-1"]["role"] == "leader"
        assert leader["instances"]["ha-2"]["role"] == "follower"
        assert leader["expires_in_s"] is not None
        assert (await get(address, "/readyz")).status == 200
        before = await scrape(address)
        assert value(before, "backbeat_pulse_leader", pulse_id="ha-1") == 1
        assert value(before, "backbeat_pulse_leader", pulse_id="ha-2") == 0
        assert value(before, "backbeat_lease_terms_total", instance_id="ha-2") == 0

        scopes["ha-1"].cancel()  # a crash: no release
        await wait_until(lambda: pulses["ha-2"].leading, bound=15)
        await wait_until(lambda: pulses["ha-2"].pulse.published >= 2, bound=5)
        after = (await get(address, "/leader")).json()["pulse"]
        assert after["holder"] == "ha-2"
        assert after["revision"] > leader["revision"]
        assert after["instances"]["ha-2"]["terms"] == 1
        assert any(c["instance"] == "ha-2" and c["role"] == "leader" for c in after["changes"])
        metrics = await scrape(address)
        assert value(metrics, "backbeat_pulse_leader", pulse_id="ha-2") == 1
        assert value(metrics, "backbeat_lease_leader", lease="pulse", instance_id="ha-2") == 1
        assert value(metrics, "backbeat_lease_terms_total", instance_id="ha-2") == 1
        assert value(metrics, "backbeat_pulse_beats_published_total", pulse_id="ha-2") >= 2
        # the lease watch's health, as the status counts it
        for name, field in (
            ("backbeat_lease_watch_lags_total", "watch_fallbacks"),
            ("backbeat_lease_watch_reopens_total", "watch_reopens"),
        ):
            assert value(metrics, name, instance_id="ha-2") == getattr(pulses["ha-2"], field)
        # the tempo API follows the leader
        tempo = (await get(address, "/tempo")).json()
        assert tempo["pulse_id"] == "ha-2"
        assert tempo["publishing"] is True
        ok = await post_tempo(address, b'{"tempo_bpm": 630}', AUTH)
        assert ok.status == 200
        assert ok.json()["accepted"] is True
        nursery.cancel_scope.cancel()


def _all_tasks() -> set[trio.lowlevel.Task]:
    seen: set[trio.lowlevel.Task] = set()
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None or task in seen:
            continue
        seen.add(task)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return seen


async def test_closing_the_admin_server_closes_its_listener_and_leaves_no_task() -> None:
    before = _all_tasks()
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            functools.partial(bb3.serve_admin, "127.0.0.1:0", cluster_id="adm-close")
        )
        # an idle keep-alive connection must not hold the server open either
        host, port = address.rsplit(":", 1)
        idle = await trio.open_tcp_stream(host, int(port))
        assert (await get(address, "/healthz")).status == 200
        assert (await get(address, "/readyz")).json() == {"ready": True, "reason": "connected"}
        nursery.cancel_scope.cancel()
    assert _all_tasks() == before
    with pytest.raises(OSError, match="connect"):
        await trio.open_tcp_stream(host, int(port))
    await idle.aclose()


async def test_binding_is_loopback_by_default_and_checked() -> None:
    assert DEFAULT_ADMIN_BIND.startswith("127.0.0.1:")
    with pytest.raises(bb3.ConfigError, match="HOST:PORT"):
        await bb3.serve_admin("8080", cluster_id="x")
    with pytest.raises(bb3.ConfigError, match="HOST:PORT"):
        await bb3.serve_admin("127.0.0.1:99999", cluster_id="x")
    with pytest.raises(bb3.ConfigError, match="HOST:PORT"):  # a digit int() does not take
        await bb3.serve_admin("127.0.0.1:²", cluster_id="x")
    with pytest.raises(bb3.ConfigError, match="cluster_id"):
        await bb3.serve_admin("127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            functools.partial(bb3.serve_admin, "127.0.0.1:0", cluster_id="x")
        )
        with pytest.raises(bb3.ConfigError, match="cannot listen"):
            await bb3.serve_admin(address, cluster_id="x")
        nursery.cancel_scope.cancel()


def test_importing_the_package_does_not_load_the_ops_dependencies() -> None:
    code = (
        "import sys, backbeat_trio\n"
        "print(sorted(m for m in ('hypercorn', 'prometheus_client', 'h11') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_every_documented_metric_name_appears_in_the_operations_guide() -> None:
    from pathlib import Path

    guide = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    missing = [name for name in METRIC_NAMES if name not in guide]
    assert not missing
    # the sample Grafana dashboard is valid JSON with the two panels it promises
    import json
    import re

    (panel_json,) = re.findall(r"```json\n(.*?)```", guide, re.S)
    exprs = " ".join(
        t["expr"] for panel in json.loads(panel_json)["panels"] for t in panel["targets"]
    )
    assert "backbeat_pulse_publish_error_seconds_bucket" in exprs
    assert "backbeat_reverb_claims_rejected_total" in exprs


# --- the command line -----------------------------------------------------------------------------
def _http(url: str, *, data: bytes | None = None, token: str | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _admin_url(proc: Background, stream: str = "stderr") -> str:
    import re

    line = proc.wait_line(lambda line: "admin API on http://" in line, stream=stream, timeout=20)
    found = re.search(r"http://[^\s:]+:\d+", line)
    assert found, line
    return found.group(0)


def _wait_status(url: str, code: int, bound: float = 15.0) -> bytes:
    import time

    deadline = time.monotonic() + bound
    while True:
        status, body = _http(url)
        if status == code or time.monotonic() > deadline:
            assert status == code, body
            return body
        time.sleep(0.1)


def test_cli_pulse_and_reverb_serve_the_admin_api(nats_url: str) -> None:
    import signal

    where = ("-s", nats_url, "-c", "adm-cli")
    with (
        Background(
            "pulse", "--tempo", "600", "-q", "--http", "127.0.0.1:0", *where,
            BACKBEAT_ADMIN_TOKEN=TOKEN,
        ) as pulse,
        Background("reverb", "--allow-unsigned", "--http", "127.0.0.1:0", *where) as reverb,
    ):  # fmt: skip
        purl = _admin_url(pulse)
        rurl = _admin_url(reverb)
        assert purl.startswith("http://127.0.0.1:")
        _wait_status(f"{purl}/readyz", 200)
        status, body = _http(f"{purl}/tempo", data=b'{"tempo_bpm": 630}', token=TOKEN)
        assert status == 200, body
        assert msgspec.json.decode(body)["accepted"] is True
        _wait_status(f"{rurl}/readyz", 200)
        metrics = samples(_wait_status(f"{rurl}/metrics", 200).decode())
        assert value(metrics, "backbeat_reverb_publishing", reverb_id="reverb-1") == 1
        assert value(metrics, "backbeat_nats_connected", cluster_id="adm-cli") == 1
        status, body = _http(f"{rurl}/tempo", data=b'{"tempo_bpm": 630}', token=TOKEN)
        assert status == 404  # no pulse behind the reverb's server
        pulse_metrics = samples(_wait_status(f"{purl}/metrics", 200).decode())
        assert value(pulse_metrics, "backbeat_pulse_tempo_changes_total") == 1
        assert pulse.stop(signal.SIGTERM) == 0
        assert reverb.stop(signal.SIGTERM) == 0
    with pytest.raises(OSError, match="refused"):
        _http(f"{purl}/healthz")


def test_cli_cluster_serves_leader_and_metrics_of_every_instance() -> None:
    import signal

    with Background(
        "cluster", "--servers", "1", "--pulses", "2", "--reverbs", "1", "--tempo", "300",
        "--cluster-id", "adm-cl", "--http", "127.0.0.1:0",
    ) as proc:  # fmt: skip
        url = _admin_url(proc, stream="stdout")
        leader = msgspec.json.decode(_wait_status(f"{url}/leader", 200))
        assert leader["pulse"]["holder"] in ("pulse-1", "pulse-2")
        assert set(leader["pulse"]["instances"]) == {"pulse-1", "pulse-2"}
        _wait_status(f"{url}/readyz", 200)
        metrics = samples(_wait_status(f"{url}/metrics", 200).decode())
        leaders = [
            value(metrics, "backbeat_pulse_leader", pulse_id=p) for p in ("pulse-1", "pulse-2")
        ]
        assert sorted(leaders) == [0, 1]
        status, body = _http(f"{url}/tempo", data=b'{"tempo_bpm": 310}', token=TOKEN)
        assert status == 403  # no --http-token: read-only
        assert b"read-only" in body
        page = _wait_status(f"{url}/", 200)  # the dashboard, beside the admin API
        assert b'id="beat-index"' in page
        assert proc.stop(signal.SIGTERM) == 0
