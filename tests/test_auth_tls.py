"""Authentication and TLS against real nats-servers: the right credentials work (a pulse and a
client beat together), wrong ones fail fast with a clear ``NotConnected`` and leak nothing.

Certificates (a CA, a server certificate for 127.0.0.1, and an unrelated CA) are made inside the
test session by ``_auth_servers.make_pki`` (with the ``cryptography`` package, or the ``openssl``
CLI when it is missing). NKEY, JWT (creds file) and mutual-TLS modes are in test_auth_modes.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio
from _auth_servers import FAIL_FAST_S, Pki, make_pki, refused
from _guards import fail_on_bare_cancel

import backbeat_trio as bb3
from backbeat_trio._embedded import NatsServerProcess

pytestmark = pytest.mark.nats

TOKEN = "s3cret-token"
USER, PASSWORD = "agent", "pa55word"


# --- certificates --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- servers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_server() -> Iterator[NatsServerProcess]:
    with NatsServerProcess(jetstream=False, token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def userpass_server() -> Iterator[NatsServerProcess]:
    with NatsServerProcess(jetstream=False, user=USER, password=PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[NatsServerProcess]:
    with NatsServerProcess(
        jetstream=False, tls_cert=pki.server_cert, tls_key=pki.server_key
    ) as server:
        yield server


# --- helpers -------------------------------------------------------------------------------------
async def beat_together(url: str, cluster: str, **credentials: Any) -> bb3.HealthStatus:
    """A pulse and a client with the same credentials: the client gets beats."""
    cfg = bb3.Config(cluster_id=cluster, agent_id="agent-1", nats_url=url, **credentials)
    pulse = bb3.PulseConfig(cluster_id=cluster, nats_url=url, tempo_bpm=600, **credentials)
    async with trio.open_nursery() as nursery:
        await nursery.start(bb3.run_pulse, pulse)
        async with bb3.open_client(cfg) as bb:
            with trio.fail_after(10):
                for _ in range(3):
                    await bb.wait_for_beat()
            health = bb.health()
        nursery.cancel_scope.cancel()
    return health


# --- token and user/password ---------------------------------------------------------------------
@fail_on_bare_cancel
async def test_the_right_token_connects(token_server: NatsServerProcess) -> None:
    health = await beat_together(token_server.url, "auth-token", token=TOKEN)
    assert health.connected
    assert health.last_beat >= 2


@fail_on_bare_cancel
async def test_the_right_user_and_password_connect(userpass_server: NatsServerProcess) -> None:
    health = await beat_together(userpass_server.url, "auth-user", user=USER, password=PASSWORD)
    assert health.connected
    assert health.last_beat >= 2


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param({"token": "wrong-token"}, id="wrong-token"),
        pytest.param({}, id="no-token"),
        pytest.param({"user": USER, "password": "nope"}, id="user-instead-of-token"),
    ],
)
@fail_on_bare_cancel
async def test_a_wrong_token_is_refused_fast_and_clearly(
    token_server: NatsServerProcess, credentials: dict[str, str]
) -> None:
    error, took = await refused(token_server.url, **credentials)
    assert "refused the credentials" in str(error)
    assert token_server.url in str(error)
    assert took < FAIL_FAST_S
    if "token" in credentials:
        assert credentials["token"] not in str(error)  # no secret in the message


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param({"user": USER, "password": "wrong"}, id="wrong-password"),
        pytest.param({"user": "mallory", "password": PASSWORD}, id="unknown-user"),
        pytest.param({}, id="no-credentials"),
        pytest.param({"token": TOKEN}, id="token-instead-of-user"),
    ],
)
@fail_on_bare_cancel
async def test_a_wrong_user_or_password_is_refused_fast_and_clearly(
    userpass_server: NatsServerProcess, credentials: dict[str, str]
) -> None:
    error, took = await refused(userpass_server.url, **credentials)
    assert "refused the credentials" in str(error)
    assert took < FAIL_FAST_S
    assert "password" not in credentials or credentials["password"] not in str(error)


# --- TLS -----------------------------------------------------------------------------------------
@fail_on_bare_cancel
async def test_tls_with_the_right_ca_connects(tls_server: NatsServerProcess, pki: Pki) -> None:
    assert tls_server.url.startswith("tls://")
    health = await beat_together(tls_server.url, "auth-tls", tls_ca_file=str(pki.ca))
    assert health.connected
    assert health.last_beat >= 2


@pytest.mark.parametrize(
    ("scheme", "use_wrong_ca"),
    [
        pytest.param("tls", True, id="wrong-ca"),
        pytest.param("tls", False, id="system-cas"),
        pytest.param("nats", False, id="plain-url-to-a-tls-server"),
    ],
)
@fail_on_bare_cancel
async def test_tls_with_an_untrusted_certificate_fails_fast_and_clearly(
    tls_server: NatsServerProcess, pki: Pki, scheme: str, use_wrong_ca: bool
) -> None:
    url = tls_server.url.replace("tls://", f"{scheme}://")
    options = {"tls_ca_file": str(pki.wrong_ca)} if use_wrong_ca else {}
    error, took = await refused(url, **options)
    assert "TLS handshake" in str(error)
    assert "certificate" in str(error).lower()
    assert took < FAIL_FAST_S
