"""Operations rough edges, over a real nats-server: what an HTTP caller is told about a refused
tempo step, ``publishing`` in ``GET /tempo`` while NATS is down, rejection reasons with a
series from the first scrape, process/GC/build-info metrics, a reverb without a pulse going
unready, ``/favicon.ico``; and the commands: a refused ``--http`` publishes no beat, ``server``
on a taken port says so in one line, ``emit`` says what JetStream's acknowledgement means."""

from __future__ import annotations

import functools
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import backbeat_trio as bb3
from backbeat_trio._bridge.nats import open_nats_transport
from backbeat_trio._core import signing
from backbeat_trio._core.beats import beat_subject, tempo_subject
from backbeat_trio._core.edge import decode_json
from backbeat_trio._core.wire import encode
from backbeat_trio._embedded import NatsServerProcess
from backbeat_trio._ops.dashboard import Dashboard
from backbeat_trio._ops.metrics import CLAIM_REJECTION_REASONS, REVERB_QUIET_BEATS
from backbeat_trio._version import __version__
from tests._ha_harness import wait_until
from tests._http import get, request
from tests.test_admin import TOKEN, scrape, value
from tests.test_cli import CLI, cli_env, keygen, new_cluster, run_cli

pytestmark = pytest.mark.nats

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


# --- the tempo API --------------------------------------------------------------------------------
async def test_a_refused_step_over_nats_gets_the_same_advice(nats_url: str) -> None:
    # a TempoChange on the tempo subject (what `backbeat-trio tempo` sends) is no Python call
    cluster = "edge-step-nats"
    cfg = bb3.PulseConfig(cluster_id=cluster, nats_url=nats_url, tempo_bpm=600)
    async with trio.open_nursery() as nursery, open_nats_transport(cfg) as conn:
        status = await nursery.start(bb3.run_pulse, cfg)
        change = bb3.TempoChange(cluster_id=cluster, tempo_bpm=900, reason="go")
        with trio.fail_after(10):
            reply = decode_json(await conn.request(tempo_subject(cluster), encode(change)))
        nursery.cancel_scope.cancel()
    assert reply["accepted"] is False
    assert "force=True" not in reply["reason"]
    assert "660 BPM first" in reply["reason"]
    assert status.tempo_refusals[-1] == reply["reason"]


@pytest.mark.parametrize("forced", [False, True])
async def test_a_refused_step_tells_an_http_caller_what_it_can_do(
    nats_url: str, forced: bool
) -> None:
    cluster = f"edge-step-{forced}"
    cfg = bb3.PulseConfig(
        cluster_id=cluster, nats_url=nats_url, tempo_bpm=600, allow_forced_tempo=forced
    )
    async with trio.open_nursery() as nursery:
        status = await nursery.start(bb3.run_pulse, cfg)
        address = await nursery.start(
            functools.partial(bb3.serve_admin, "127.0.0.1:0", pulse=status, token=TOKEN)
        )
        body = b'{"tempo_bpm": 900, "reason": "go"}'
        refused = await request(address, "POST", "/tempo", body=body, headers=AUTH)
        assert refused.status == 422
        reason = refused.json()["reason"]
        assert "force=True" not in reason  # a Python keyword an HTTP caller cannot pass
        assert reason.startswith("step from 600 to 900 BPM is +50.0%")
        if forced:
            assert "start the request's reason with 'force'" in reason
            body = b'{"tempo_bpm": 900, "reason": "force: load test"}'
            taken = await request(address, "POST", "/tempo", body=body, headers=AUTH)
            assert taken.status == 200, taken.json()
        else:
            assert "660 BPM first" in reason
            assert "--allow-forced-tempo" in reason
            body = b'{"tempo_bpm": 660, "reason": "first step"}'
            taken = await request(address, "POST", "/tempo", body=body, headers=AUTH)
            assert taken.status == 200, taken.json()
        nursery.cancel_scope.cancel()


async def test_tempo_says_publishing_only_while_beats_go_out(
    nats_server: NatsServerProcess, nats_url: str
) -> None:
    cluster = "edge-publishing"
    cfg = bb3.PulseConfig(cluster_id=cluster, nats_url=nats_url, tempo_bpm=600, reconnect_delay=0.1)
    async with open_nats_transport(cfg) as transport, trio.open_nursery() as nursery:
        status = await nursery.start(functools.partial(bb3.run_pulse, cfg, transport=transport))
        address = await nursery.start(
            functools.partial(bb3.serve_admin, "127.0.0.1:0", pulse=status, transport=transport)
        )
        await wait_until(lambda: status.published >= 2)
        assert (await get(address, "/tempo")).json()["publishing"] is True
        nats_server.kill()
        try:
            await wait_until(lambda: status.skipped_disconnected >= 2, bound=10)
            tempo = (await get(address, "/tempo")).json()
            assert tempo["publishing"] is False, tempo
        finally:
            nats_server.start()
        await wait_until(lambda: transport.connected, bound=15)
        published = status.published
        await wait_until(lambda: status.published > published + 1, bound=10)
        assert (await get(address, "/tempo")).json()["publishing"] is True
        nursery.cancel_scope.cancel()


# --- metrics --------------------------------------------------------------------------------------
async def test_every_rejection_reason_and_the_process_families_are_there_from_the_start(
    nats_url: str,
) -> None:
    cluster = "edge-reasons"
    rcfg = bb3.ReverbConfig(cluster_id=cluster, nats_url=nats_url, allow_unsigned=True)
    async with open_nats_transport(rcfg) as transport, trio.open_nursery() as nursery:
        reverb = await nursery.start(functools.partial(bb3.run_reverb, rcfg, transport=transport))
        # two admin servers in one process, one over a pulse and a reverb: no family twice
        address = await nursery.start(
            functools.partial(bb3.serve_admin, "127.0.0.1:0", reverb=reverb, transport=transport)
        )
        other = await nursery.start(
            functools.partial(bb3.serve_admin, "127.0.0.1:0", reverb=reverb, cluster_id=cluster)
        )
        for where in (address, other):
            scraped = await scrape(where)
            for reason in CLAIM_REJECTION_REASONS:
                name = "backbeat_reverb_claims_rejected_total"
                assert value(scraped, name, reason=reason) == 0
            assert value(scraped, "backbeat_build_info", version=__version__) == 1
            assert value(scraped, "process_cpu_seconds_total") > 0
            assert value(scraped, "process_resident_memory_bytes") > 0
            assert value(scraped, "python_gc_objects_collected_total", generation="0") >= 0
            assert value(scraped, "python_info", implementation="CPython") == 1
        nursery.cancel_scope.cancel()


def test_the_rejection_reasons_are_the_codes_and_the_guides_one_list() -> None:
    # the code's reasons: the claim checks in signing, the reverb's own, the aggregator's
    import inspect

    from backbeat_trio._core import aggregate
    from backbeat_trio._services import reverb

    source = inspect.getsource(signing._check_signature) + inspect.getsource(signing.verify_claim)
    coded = set(re.findall(r'reason="([a-z_0-9]+)"', source))
    coded |= set(re.findall(r'reject\("([a-z_0-9]+)"\)', inspect.getsource(reverb)))
    coded |= {aggregate.TOO_FAR_AHEAD, aggregate.OUT_OF_RANGE}
    assert coded == set(CLAIM_REJECTION_REASONS)
    guide = (ROOT / "docs" / "operations.md").read_text()
    row = next(
        line
        for line in guide.splitlines()
        if line.startswith("| `backbeat_reverb_claims_rejected_total`")
    )
    documented = re.findall(r"`([^`]+)`", row.split("|")[3])
    assert documented[0] == "reason"
    assert documented[1:] == list(CLAIM_REJECTION_REASONS)
    assert "`backbeat_build_info`" in guide
    assert f"{REVERB_QUIET_BEATS} beat lengths" in guide


async def test_a_reverb_whose_pulse_stops_is_not_ready_and_says_how_long(nats_url: str) -> None:
    cluster = "edge-quiet"
    pcfg = bb3.PulseConfig(cluster_id=cluster, nats_url=nats_url, tempo_bpm=600)
    rcfg = bb3.ReverbConfig(cluster_id=cluster, nats_url=nats_url, allow_unsigned=True)
    async with open_nats_transport(rcfg) as transport, trio.open_nursery() as nursery:
        reverb = await nursery.start(functools.partial(bb3.run_reverb, rcfg, transport=transport))
        address = await nursery.start(
            functools.partial(bb3.serve_admin, "127.0.0.1:0", reverb=reverb, transport=transport)
        )
        pulse_scope = trio.CancelScope()

        async def pulse() -> None:
            with pulse_scope:
                await bb3.run_pulse(pcfg)

        nursery.start_soon(pulse)
        await wait_until(lambda: reverb.reports >= 1, bound=10)
        ready = await get(address, "/readyz")
        assert ready.status == 200, ready.json()
        assert "last beat" in ready.json()["reason"]
        pulse_scope.cancel()
        # four beat lengths at 600 BPM and the slack: under a second and a half
        for _ in range(100):
            ready = await get(address, "/readyz")
            if ready.status == 503:
                break
            await trio.sleep(0.1)
        assert ready.status == 503, ready.json()
        reason = ready.json()["reason"]
        assert reason.startswith(f"{rcfg.reverb_id}: no beat from the pulse for "), reason
        quiet = value(await scrape(address), "backbeat_reverb_seconds_since_last_beat")
        assert quiet >= REVERB_QUIET_BEATS * 0.1
        nursery.cancel_scope.cancel()


# --- /favicon.ico ---------------------------------------------------------------------------------
async def test_favicon_is_no_content_on_the_admin_server_and_the_dashboard() -> None:
    async with trio.open_nursery() as nursery:
        dashboard = Dashboard("edge-icon")
        admin = await nursery.start(
            functools.partial(
                bb3.serve_admin, "127.0.0.1:0", cluster_id="edge-icon", fallback=dashboard
            )
        )
        from backbeat_trio._ops.server import serve_asgi

        alone = await nursery.start(serve_asgi, dashboard, "127.0.0.1:0")
        for address in (admin, alone):
            icon = await get(address, "/favicon.ico")
            assert icon.status == 204
            assert icon.body == b""
        assert (await get(admin, "/nothing-here")).status == 404
        nursery.cancel_scope.cancel()


# --- the commands ---------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["port alone", "taken port"])
@pytest.mark.parametrize("ha", [False, True])
async def test_a_pulse_refused_for_its_http_address_publishes_no_beat(
    nats_url: str, taken_port: int, how: str, ha: bool
) -> None:
    cluster = new_cluster()
    bind = "8080" if how == "port alone" else f"127.0.0.1:{taken_port}"
    cfg = bb3.PulseConfig(cluster_id=cluster, nats_url=nats_url)
    async with open_nats_transport(cfg) as transport:
        beats = await transport.subscribe(beat_subject(cluster), buffer=64)
        args = [*CLI, "pulse", "-s", nats_url, "-c", cluster, "--tempo", "1200", "--http", bind]
        done = await trio.run_process(
            [*args, *(["--ha", "--lease-ttl", "0.5"] if ha else [])],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=cli_env(),
        )
        stderr = done.stderr.decode()
        assert done.returncode == 2, stderr
        await trio.sleep(0.3)  # a frame published just before the exit has arrived by now
        seen = beats.messages.statistics().current_buffer_used
        assert seen == 0, f"{seen} beat frame(s) published before the exit: {stderr}"
        assert f"--http {bind}" in stderr
        assert "Traceback" not in stderr


def test_a_reverb_refused_for_its_http_address_exits_before_it_starts(
    nats_url: str, taken_port: int
) -> None:
    done = run_cli(
        "reverb", "-s", nats_url, "-c", new_cluster(), "--allow-unsigned",
        "--http", f"127.0.0.1:{taken_port}",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Address already in use" in done.stderr
    assert "reverb reverb-1:" not in done.stderr  # it never started


def test_a_cluster_refused_for_its_http_address_starts_no_server(taken_port: int) -> None:
    done = run_cli("cluster", "--servers", "1", "--http", f"127.0.0.1:{taken_port}")
    assert done.returncode == 2, done.stderr
    assert "Address already in use" in done.stderr
    assert "NATS cluster" not in done.stdout


def test_server_on_a_taken_port_says_so_in_one_line(nats_server: NatsServerProcess) -> None:
    done = run_cli("server", "--port", str(nats_server.port), timeout=30)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"127.0.0.1:{nats_server.port} is already in use" in lines[0]
    assert "--port" in lines[0]


def test_server_that_nats_server_refuses_says_its_fatal_line_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], taken_port: int
) -> None:
    # a port taken between the check and nats-server's own bind: its fatal line, not its log
    from backbeat_trio._cli import main
    from backbeat_trio._cli.commands import server

    monkeypatch.setattr(server, "_port_taken", lambda port: None)
    monkeypatch.setattr(sys, "argv", ["backbeat-trio"])
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code = main(["server", "--port", str(port), "--no-jetstream"])
    err = capsys.readouterr().err
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "nats-server could not start" in lines[0]
    assert "address already in use" in lines[0]


def test_emit_says_stored_is_not_accepted_and_checks_a_keyring(
    nats_url: str, tmp_path: Path
) -> None:
    cluster = new_cluster()
    ring = tmp_path / "ring.toml"
    assert keygen(tmp_path, "agent-1", "--keyring", str(ring)).returncode == 0
    assert keygen(tmp_path, "stranger").returncode == 0
    where = ("-s", nats_url, "-c", cluster, "--beat-timeout", "0")
    plain = run_cli("emit", *where, "--agent", "agent-1", "--key", str(tmp_path / "agent-1.key"))
    assert plain.returncode == 0, plain.stderr
    assert "not accepted by anyone yet" in plain.stdout
    assert "only if its keyring holds this agent's public key" in plain.stdout
    untrusted = run_cli(
        "emit", *where, "--agent", "stranger", "--key", str(tmp_path / "stranger.key"),
        "--keyring", str(ring),
    )  # fmt: skip
    assert untrusted.returncode == 0, untrusted.stderr
    assert "warning: stranger is not on the keyring" in untrusted.stderr
    assert "(unknown_agent)" in untrusted.stderr
    # agent-1's name with the stranger's key: a reverb would call it wrong_key
    wrong = run_cli(
        "emit", *where, "--agent", "agent-1", "--key", str(tmp_path / "stranger.key"),
        "--keyring", str(ring),
    )  # fmt: skip
    assert "(wrong_key)" in wrong.stderr
    trusted = run_cli(
        "emit", *where, "--agent", "agent-1", "--key", str(tmp_path / "agent-1.key"),
        "--keyring", str(ring),
    )  # fmt: skip
    assert "warning" not in trusted.stderr
    assert "trusts this key for agent-1" in trusted.stdout
    # a keyring it cannot read (the reverb's path, say) is a warning, not a failure
    elsewhere = run_cli(
        "emit", *where, "--agent", "agent-1", "--key", str(tmp_path / "agent-1.key"),
        BACKBEAT_KEYRING=str(tmp_path / "on-the-reverb-host.toml"),
    )  # fmt: skip
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert "warning: cannot check the claim against the keyring" in elsewhere.stderr
