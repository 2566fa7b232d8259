"""The admin port's defences (issue 17, item 7) over a real nats-server and the real hypercorn
server: the token from a file or the environment, the Host allowlist against DNS rebinding,
refused authorisations logged without the token and counted, the cap on ``/events`` streams,
and a ``requested_by`` the caller cannot write."""

from __future__ import annotations

import functools
import logging
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import trio

import backbeat_trio as bb3
from backbeat_trio._bridge.nats import open_nats_transport
from backbeat_trio._errors import ConfigError
from backbeat_trio._ops.dashboard import Dashboard
from backbeat_trio._ops.guard import HostAllowlist, read_token_file, request_host
from tests._ha_harness import wait_until
from tests.test_admin import samples, value
from tests.test_cli import Background, run_cli

TOKEN = "hardening-Token-7f3a"


# --- a raw HTTP/1.1 client: the Host header is the test's to choose -------------------------------
@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        decoded: dict[str, object] = msgspec.json.decode(self.body)
        return decoded


def _parse(data: bytes) -> Raw:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, val = line.partition(":")
        headers[name.strip().lower()] = val.strip()
    return Raw(status, headers, body)


def _request_bytes(
    method: str, path: str, host: str | None, headers: dict[str, str], body: bytes, version: str
) -> bytes:
    lines = [f"{method} {path} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def raw(
    address: str,
    method: str,
    path: str,
    *,
    host: str | None,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    version: str = "1.1",
) -> Raw:
    """One request with exactly the ``Host`` given (None: no Host header); reads to EOF."""
    where, _, port = address.rpartition(":")
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(where, int(port))
        async with stream:
            await stream.send_all(_request_bytes(method, path, host, headers or {}, body, version))
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
    return _parse(bytes(data))


@asynccontextmanager
async def event_stream(address: str, host: str) -> AsyncIterator[Raw]:
    """``GET /events``: yields once the snapshot arrived (a 200) or the answer ended (a refusal);
    the stream stays open until the block ends."""
    where, _, port = address.rpartition(":")
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(where, int(port))
    async with stream:
        await stream.send_all(_request_bytes("GET", "/events", host, {}, b"", "1.1"))
        data = bytearray()
        with trio.fail_after(10):
            while b"event: snapshot" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
        yield _parse(bytes(data))


# --- an admin server over a real pulse and dashboard ----------------------------------------------
@dataclass
class Served:
    address: str
    pulse: bb3.PulseStatus
    dashboard: Dashboard

    @property
    def port(self) -> str:
        return self.address.rpartition(":")[2]


@asynccontextmanager
async def served(
    nats_url: str, cluster: str, *, max_streams: int = 64, **admin: object
) -> AsyncIterator[Served]:
    cfg = bb3.PulseConfig(cluster_id=cluster, nats_url=nats_url, tempo_bpm=600, pulse_id="p-h")
    async with open_nats_transport(cfg) as transport, trio.open_nursery() as nursery:
        pulse = await nursery.start(functools.partial(bb3.run_pulse, cfg, transport=transport))
        dashboard = Dashboard(cluster, max_streams=max_streams, heartbeat_s=0.2)
        await nursery.start(dashboard.run, transport)
        address = await nursery.start(
            functools.partial(
                bb3.serve_admin,
                "127.0.0.1:0",
                pulse=pulse,
                transport=transport,
                fallback=dashboard,
                **admin,
            )
        )
        yield Served(address, pulse, dashboard)
        nursery.cancel_scope.cancel()


async def metrics(s: Served) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = await raw(s.address, "GET", "/metrics", host=f"127.0.0.1:{s.port}")
    assert r.status == 200, r.body
    return samples(r.body.decode())


def _secure_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# --- the token ------------------------------------------------------------------------------------
def test_a_token_file_is_read_and_an_insecure_or_empty_one_is_refused(tmp_path: Path) -> None:
    good = _secure_file(tmp_path / "token", TOKEN + "\n")
    assert read_token_file(good) == TOKEN
    assert read_token_file(_secure_file(tmp_path / "ro", TOKEN, 0o400)) == TOKEN
    loose = _secure_file(tmp_path / "loose", TOKEN + "\n", 0o644)
    with pytest.raises(ConfigError, match=r"mode 0644.*chmod 600") as refused:
        read_token_file(loose)
    assert TOKEN not in str(refused.value)
    with pytest.raises(ConfigError, match="mode 0640"):
        read_token_file(_secure_file(tmp_path / "group", TOKEN, 0o640))
    with pytest.raises(ConfigError, match="empty"):
        read_token_file(_secure_file(tmp_path / "empty", "\n"))
    with pytest.raises(ConfigError, match="whitespace"):
        read_token_file(_secure_file(tmp_path / "spaced", f" {TOKEN}\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        read_token_file(tmp_path / "absent")

    # the command refuses the insecure file while parsing: nothing starts, exit 2
    done = run_cli(
        "pulse", "-c", "hard-cli", "--http", "127.0.0.1:0", "--http-token-file", str(loose)
    )
    assert done.returncode == 2, done.stderr
    assert "mode 0644" in done.stderr
    assert TOKEN not in done.stderr + done.stdout
    both = run_cli(
        "pulse", "--http", "127.0.0.1:0", "--http-token-file", str(good), "--http-token", TOKEN
    )
    assert both.returncode == 2
    assert "not allowed with" in both.stderr


async def test_serve_admin_refuses_a_token_no_header_can_carry() -> None:
    status = bb3.PulseStatus(cluster_id="hard-tok", tempo_bpm=600, beats_per_bar=4)
    for token in (f"{TOKEN}\n", f" {TOKEN}", "a\x00b"):
        with pytest.raises(ConfigError):
            await bb3.serve_admin("127.0.0.1:0", pulse=status, token=token)


async def test_cli_takes_the_token_from_a_file_or_the_environment_not_the_command_line(
    nats_url: str, tmp_path: Path
) -> None:
    token_file = _secure_file(tmp_path / "admin-token", TOKEN + "\n")
    where = ("-s", nats_url, "-q", "--tempo", "600", "--http", "127.0.0.1:0")
    with (
        Background("pulse", "-c", "hard-file", *where, "--http-token-file", str(token_file)) as a,
        Background("pulse", "-c", "hard-env", *where, BACKBEAT_HTTP_TOKEN=TOKEN) as b,
    ):
        for proc in (a, b):
            line = proc.wait_line(lambda line: "admin API on http://" in line, timeout=20)
            assert "tempo changes need the token" in line
            address = admin_address(line)
            cmdline = await trio.Path(f"/proc/{proc.proc.pid}/cmdline").read_bytes()
            assert TOKEN.encode() not in cmdline  # nothing for `ps` to show
            await wait_until_ready(address)
            body = b'{"tempo_bpm": 630}'
            refused = await raw(address, "POST", "/tempo", host=address, body=body)
            assert refused.status == 401
            auth = {"authorization": f"Bearer {TOKEN}"}
            ok = await raw(address, "POST", "/tempo", host=address, headers=auth, body=body)
            assert ok.status == 200, ok.body
            assert ok.json()["accepted"] is True
        assert a.stop(signal.SIGTERM) == 0
        assert b.stop(signal.SIGTERM) == 0


def admin_address(line: str) -> str:
    found = re.search(r"http://([^\s:]+:\d+)", line)
    assert found, line
    return found.group(1)


async def wait_until_ready(address: str) -> None:
    for _ in range(200):
        if (await raw(address, "GET", "/readyz", host=address)).status == 200:
            return
        await trio.sleep(0.1)
    pytest.fail(f"{address} did not turn ready")


# --- refused authorisations -----------------------------------------------------------------------
async def test_a_refused_authorization_is_401_logged_without_the_token_and_counted(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="backbeat_trio.admin")
    wrong_token = "Wrong-Guess-91c2"
    async with served(nats_url, "hard-auth", token=TOKEN) as s:
        await wait_until(lambda: s.pulse.last_beat is not None)
        before = await metrics(s)
        for reason in ("missing", "malformed", "wrong"):
            assert value(before, "backbeat_admin_auth_failures_total", reason=reason) == 0
        host = f"localhost:{s.port}"
        attempts = {
            "missing": {},
            "malformed": {"authorization": f"Basic {TOKEN}"},
            "wrong": {"authorization": f"Bearer {wrong_token}"},
        }
        for reason, headers in attempts.items():
            r = await raw(
                s.address, "POST", "/tempo", host=host, headers=headers, body=b'{"tempo_bpm": 630}'
            )
            assert r.status == 401, (reason, r.body)
            assert r.headers["www-authenticate"].startswith("Bearer")
        for _ in range(4):  # a burst: every one counted, the log says it once
            await raw(s.address, "POST", "/tempo", host=host, headers=attempts["wrong"])
        after = await metrics(s)
        assert value(after, "backbeat_admin_auth_failures_total", reason="missing") == 1
        assert value(after, "backbeat_admin_auth_failures_total", reason="malformed") == 1
        assert value(after, "backbeat_admin_auth_failures_total", reason="wrong") == 5
        ok = await raw(
            s.address,
            "POST",
            "/tempo",
            host=host,
            headers={"authorization": f"Bearer {TOKEN}"},
            body=b'{"tempo_bpm": 630}',
        )
        assert ok.status == 200, ok.body
        last = await metrics(s)
        assert value(last, "backbeat_admin_auth_failures_total", reason="wrong") == 5
    refusals = [r.getMessage() for r in caplog.records if "refused POST /tempo" in r.getMessage()]
    assert len(refusals) == 3, refusals  # one line per reason within the throttle's period
    assert any("no Authorization header" in m for m in refusals)
    assert any("not 'Bearer <token>'" in m for m in refusals)
    assert any("wrong bearer token" in m for m in refusals)
    assert all("127.0.0.1:" in m for m in refusals)  # the peer is named
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in logged
    assert wrong_token not in logged


# --- the Host allowlist ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("localhost:8080", "localhost"),
        ("LocalHost.", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("example.org:80", "example.org"),
        (None, None),
        ("", None),
        ("::1", None),
        ("[::1", None),
        ("[evil.example]:80", None),
        ("a b:80", None),
        ("evil.example@localhost", None),
        ("localhost:http", None),
    ],
)
def test_request_host_reads_the_name_or_refuses_a_malformed_header(
    header: str | None, host: str | None
) -> None:
    assert request_host(header) == host


def test_host_allowlist_defaults_by_bind_address() -> None:
    loopback = HostAllowlist("127.0.0.1")
    assert all(loopback.allows(h) for h in ("localhost:1", "127.0.0.1:1", "[::1]:1"))
    assert not loopback.allows("10.0.0.5:8080")
    assert not loopback.allows("attacker.example:8080")
    assert not loopback.allows(None)
    specific = HostAllowlist("10.0.0.5", ["pulse.internal"])
    assert specific.allows("10.0.0.5:8080")
    assert specific.allows("PULSE.internal:8080")
    assert not specific.allows("10.0.0.6:8080")
    wildcard = HostAllowlist("0.0.0.0")
    assert wildcard.allows("10.1.2.3:8080")  # a probe by the pod's IP
    assert wildcard.allows("[fd00::7]:8080")
    assert not wildcard.allows("rebound.attacker.example:8080")
    assert HostAllowlist("127.0.0.1", ["*"]).allows("anything.example")


async def test_a_host_not_on_the_allowlist_is_refused_on_every_path_and_counted(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="backbeat_trio.admin")
    async with served(nats_url, "hard-host", allowed_hosts=["pulse.internal"]) as s:
        port = s.port
        for good in (f"127.0.0.1:{port}", f"localhost:{port}", f"pulse.internal:{port}"):
            r = await raw(s.address, "GET", "/tempo", host=good)
            assert r.status == 200, (good, r.body)
        refused = 0
        for path in ("/tempo", "/metrics", "/healthz", "/", "/events", "/nowhere"):
            r = await raw(s.address, "GET", path, host=f"rebound.attacker.example:{port}")
            refused += 1
            assert r.status == 421, (path, r.status, r.body)
            assert r.headers["content-type"] == "application/json"
            assert "Host" in r.json()["reason"]
        no_host = await raw(s.address, "GET", "/tempo", host=None, version="1.0")
        refused += 1
        assert no_host.status == 421
        assert s.dashboard.streams_opened == 0  # the refused /events never reached it
        after = await metrics(s)
        assert value(after, "backbeat_admin_host_refused_total") == refused
    lines = [r.getMessage() for r in caplog.records if "for Host" in r.getMessage()]
    assert lines
    assert "rebound.attacker.example" in lines[0]


# --- /events --------------------------------------------------------------------------------------
async def test_event_streams_beyond_the_cap_get_a_503_and_are_counted(nats_url: str) -> None:
    async with served(nats_url, "hard-sse", max_streams=2) as s:
        host = f"127.0.0.1:{s.port}"
        async with event_stream(s.address, host) as first, event_stream(s.address, host) as second:
            assert (first.status, second.status) == (200, 200)
            async with event_stream(s.address, host) as third:
                assert third.status == 503
                assert "event streams are open" in third.json()["reason"]
            scraped = await metrics(s)
            assert value(scraped, "backbeat_admin_events_streams") == 2
            assert value(scraped, "backbeat_admin_events_refused_total") == 1
        await wait_until(lambda: s.dashboard.streams == 0)
        async with event_stream(s.address, host) as again:
            assert again.status == 200  # closed streams freed their places
        scraped = await metrics(s)
        assert value(scraped, "backbeat_admin_events_refused_total") == 1


async def test_cli_event_stream_cap_and_allowed_hosts_reach_the_reverbs_server(
    nats_url: str,
) -> None:
    with Background(
        "reverb", "-s", nats_url, "-c", "hard-rv", "--allow-unsigned", "--http", "127.0.0.1:0",
        "--http-event-streams", "1", "--http-allow-host", "reverb.internal",
    ) as reverb:  # fmt: skip
        line = reverb.wait_line(lambda line: "admin API on http://" in line, timeout=20)
        address = admin_address(line)
        port = address.rpartition(":")[2]
        assert (await raw(address, "GET", "/healthz", host=f"reverb.internal:{port}")).status == 200
        assert (await raw(address, "GET", "/healthz", host=f"other.example:{port}")).status == 421
        async with event_stream(address, address) as first:
            assert first.status == 200
            async with event_stream(address, address) as second:
                assert second.status == 503
        assert reverb.stop(signal.SIGTERM) == 0


# --- requested_by ---------------------------------------------------------------------------------
async def test_requested_by_is_the_servers_and_cannot_be_forged(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="backbeat_trio.pulse")
    auth = {"authorization": f"Bearer {TOKEN}"}
    async with served(nats_url, "hard-who", token=TOKEN) as s:
        await wait_until(lambda: s.pulse.last_beat is not None)
        host = f"127.0.0.1:{s.port}"
        forged = await raw(
            s.address,
            "POST",
            "/tempo",
            host=host,
            headers=auth,
            body=b'{"tempo_bpm": 630, "requested_by": "the-real-operator"}',
        )
        assert forged.status == 400, forged.body
        assert "requested_by is set by the server" in str(forged.json()["reason"])
        assert s.pulse.tempo_changes == 0
        ok = await raw(
            s.address,
            "POST",
            "/tempo",
            host=host,
            headers=auth,
            body=b'{"tempo_bpm": 630, "reason": "ops"}',
        )
        assert ok.status == 200, ok.body
        assert s.pulse.tempo_changes == 1
    accepted = [r.getMessage() for r in caplog.records if "requested by" in r.getMessage()]
    assert len(accepted) == 1
    assert "requested by admin-api" in accepted[0]
    assert not any("the-real-operator" in r.getMessage() for r in caplog.records)


def test_the_http_token_help_says_ps_shows_it() -> None:
    done = run_cli("pulse", "--help")
    assert done.returncode == 0
    help_text = " ".join(done.stdout.split())
    assert "--http-token-file" in help_text
    assert "visible to every local user in `ps`" in help_text
