"""NKEY, JWT (creds file) and mutual-TLS authentication against real nats-servers.

For each mode a server requiring it is started (the credentials and configs come from
``_auth_servers``); a client with the right credentials gets beats, JetStream works for the
authenticated user (a reverb makes its stream and counts an acked claim, an HA pulse makes its
lease bucket and leads), and wrong credentials fail fast with a clear ``NotConnected``.

Some tests run the pulse, reverb and HA pulse on a transport opened from a client-level
``Config`` (their ``transport=`` argument); the ``*_config_takes_the_credentials`` tests give the
credentials to ``PulseConfig``/``ReverbConfig``/``HAPulseConfig`` themselves, which take every
connection field ``Config`` has (issue 11, defect 2: they used to lack ``creds_file``,
``nkeys_seed``, ``tls_cert_file`` and ``tls_key_file``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nkeys
import pytest
import trio
from _auth_servers import (
    FAIL_FAST_S,
    NkeyUser,
    OperatorMode,
    Pki,
    decode_jwt_claims,
    make_creds,
    make_nkey_user,
    make_operator_mode,
    make_pki,
    mtls_server_options,
    new_keypair,
    nkey_server_config,
    refused,
)
from _guards import fail_on_bare_cancel

import backbeat_trio as bb3
from backbeat_trio._embedded import NatsServerProcess

pytestmark = pytest.mark.nats

MODES = ("nkey", "creds", "mtls")


@dataclass
class AuthMode:
    name: str
    server: NatsServerProcess
    credentials: dict[str, Any]  # Config keyword arguments that get in
    wrong: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> ones that do not

    @property
    def url(self) -> str:
        return self.server.url


# --- servers (one per mode, each with JetStream) -------------------------------------------------
@pytest.fixture(scope="module")
def auth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("auth")


@pytest.fixture(scope="module")
def nkey_user(auth_dir: Path) -> NkeyUser:
    return make_nkey_user(auth_dir, "agent")


@pytest.fixture(scope="module")
def operator_mode(auth_dir: Path) -> OperatorMode:
    return make_operator_mode(auth_dir)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def nkey_mode(auth_dir: Path, nkey_user: NkeyUser) -> Iterator[AuthMode]:
    stranger = make_nkey_user(auth_dir, "stranger")
    with NatsServerProcess(extra_config=nkey_server_config(nkey_user)) as server:
        yield AuthMode(
            "nkey",
            server,
            {"nkeys_seed": str(nkey_user.seed_file)},
            {
                "unknown-nkey": {"nkeys_seed": str(stranger.seed_file)},
                "no-credentials": {},
            },
        )


@pytest.fixture(scope="module")
def creds_mode(auth_dir: Path, operator_mode: OperatorMode) -> Iterator[AuthMode]:
    foreign_account = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    foreign = make_creds(auth_dir, foreign_account, "foreign-user")
    mismatched = make_creds(
        auth_dir,
        operator_mode.account_kp,
        "mismatched-user",
        seed_of=new_keypair(nkeys.PREFIX_BYTE_USER),
    )
    with NatsServerProcess(extra_config=operator_mode.server_config) as server:
        yield AuthMode(
            "creds",
            server,
            {"creds_file": str(operator_mode.creds_file)},
            {
                "user-of-an-unknown-account": {"creds_file": str(foreign)},
                "seed-not-matching-the-jwt": {"creds_file": str(mismatched)},
                "no-credentials": {},
            },
        )


@pytest.fixture(scope="module")
def mtls_mode(pki: Pki) -> Iterator[AuthMode]:
    with NatsServerProcess(**mtls_server_options(pki)) as server:
        yield AuthMode(
            "mtls",
            server,
            {
                "tls_ca_file": str(pki.ca),
                "tls_cert_file": str(pki.client_cert),
                "tls_key_file": str(pki.client_key),
            },
            {
                "no-client-certificate": {"tls_ca_file": str(pki.ca)},
                "client-certificate-of-another-ca": {
                    "tls_ca_file": str(pki.ca),
                    "tls_cert_file": str(pki.wrong_client_cert),
                    "tls_key_file": str(pki.wrong_client_key),
                },
            },
        )


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> AuthMode:
    result: AuthMode = request.getfixturevalue(f"{request.param}_mode")
    return result


# --- helpers -------------------------------------------------------------------------------------
def client_config(mode: AuthMode, cluster: str, agent: str = "agent-1", **kw: Any) -> bb3.Config:
    return bb3.Config(
        cluster_id=cluster, agent_id=agent, nats_url=mode.url, **mode.credentials, **kw
    )


@contextlib.asynccontextmanager
async def authed_transport(mode: AuthMode, cluster: str, agent: str) -> AsyncIterator[Any]:
    """A NATS transport opened with the mode's client-level credentials."""
    async with bb3.open_nats_transport(client_config(mode, cluster, agent)) as transport:
        yield transport


async def three_beats(mode: AuthMode, cluster: str) -> bb3.HealthStatus:
    async with bb3.open_client(client_config(mode, cluster)) as bb:
        with trio.fail_after(10):
            for _ in range(3):
                await bb.wait_for_beat()
        return bb.health()


def beat_service(
    kind: str, cluster: str, mode: AuthMode, **credentials: Any
) -> tuple[bb3.PulseConfig | bb3.HAPulseConfig, Callable[..., Awaitable[Any]]]:
    """The config (600 BPM, with ``credentials``) and the run function of a beat-making service:
    ``pulse``, or ``ha-pulse`` (its lease bucket is JetStream KV: it is made, the pulse leads)."""
    if kind == "pulse":
        pulse = bb3.PulseConfig(cluster_id=cluster, nats_url=mode.url, tempo_bpm=600, **credentials)
        return pulse, bb3.run_pulse
    ha = bb3.HAPulseConfig(
        cluster_id=cluster, nats_url=mode.url, tempo_bpm=600, lease_replicas=1, **credentials
    )
    return ha, bb3.run_ha_pulse


# --- the right credentials -----------------------------------------------------------------------
@pytest.mark.parametrize(("service", "prefix"), [("pulse", "auth"), ("ha-pulse", "auth-ha")])
@fail_on_bare_cancel
async def test_a_client_gets_beats_from_a_pulse_on_a_transport_with_the_same_credentials(
    mode: AuthMode, service: str, prefix: str
) -> None:
    cluster = f"{prefix}-{mode.name}"
    cfg, run = beat_service(service, cluster, mode)
    async with authed_transport(mode, cluster, "pulse-1") as t, trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: run(cfg, transport=t, task_status=task_status))
        health = await three_beats(mode, cluster)
        nursery.cancel_scope.cancel()
    assert health.connected
    assert health.last_beat >= 2


@fail_on_bare_cancel
async def test_jetstream_works_for_the_authenticated_user(mode: AuthMode) -> None:
    """A reverb makes its status stream, and a JetStream-mode client's claim is acked and
    counted (in operator mode this needs the account JWT's JetStream limits)."""
    cluster = f"auth-js-{mode.name}"
    async with (
        authed_transport(mode, cluster, "pulse-1") as pulse_t,
        authed_transport(mode, cluster, "reverb-1") as reverb_t,
        trio.open_nursery() as nursery,  # inside: the services stop before their transports
    ):
        pulse = bb3.PulseConfig(cluster_id=cluster, nats_url=mode.url, tempo_bpm=600)
        reverb = bb3.ReverbConfig(cluster_id=cluster, nats_url=mode.url, allow_unsigned=True)
        await nursery.start(
            lambda task_status: bb3.run_pulse(pulse, transport=pulse_t, task_status=task_status)
        )
        status = await nursery.start(
            lambda task_status: bb3.run_reverb(reverb, transport=reverb_t, task_status=task_status)
        )
        assert status.stream == f"BACKBEAT_STATUS_{cluster}"
        async with bb3.open_client(client_config(mode, cluster, jetstream=True)) as bb:
            with trio.fail_after(10):
                await bb.wait_for_beat()
                while status.claims_counted == 0:
                    await bb.emit_status(bb3.StatusClaim(state="executing", notes="auth"))
                    await bb.wait_for_beat()
        nursery.cancel_scope.cancel()
    assert status.claims_counted >= 1


# --- the service configs taking the credentials themselves (pending issue 11 defect 2) -----------
@pytest.mark.parametrize(("service", "prefix"), [("pulse", "auth-pc"), ("ha-pulse", "auth-hc")])
@fail_on_bare_cancel
async def test_a_pulse_config_takes_the_credentials(
    mode: AuthMode, service: str, prefix: str
) -> None:
    cluster = f"{prefix}-{mode.name}"
    cfg, run = beat_service(service, cluster, mode, **mode.credentials)
    async with trio.open_nursery() as nursery:
        await nursery.start(run, cfg)
        health = await three_beats(mode, cluster)
        nursery.cancel_scope.cancel()
    assert health.last_beat >= 2


@fail_on_bare_cancel
async def test_a_reverb_config_takes_the_credentials(mode: AuthMode) -> None:
    cluster = f"auth-rc-{mode.name}"
    reverb = bb3.ReverbConfig(
        cluster_id=cluster, nats_url=mode.url, allow_unsigned=True, **mode.credentials
    )
    async with trio.open_nursery() as nursery:
        status = await nursery.start(bb3.run_reverb, reverb)
        nursery.cancel_scope.cancel()
    assert status.stream == f"BACKBEAT_STATUS_{cluster}"


# --- wrong credentials ---------------------------------------------------------------------------
def _wrong_cases() -> list[Any]:
    cases = {
        "nkey": ("unknown-nkey", "no-credentials"),
        "creds": ("user-of-an-unknown-account", "seed-not-matching-the-jwt", "no-credentials"),
        "mtls": ("no-client-certificate", "client-certificate-of-another-ca"),
    }
    return [
        pytest.param(m, case, id=f"{m}-{case}") for m, cases_ in cases.items() for case in cases_
    ]


MTLS_ALERTS = {
    "no-client-certificate": "certificate required",
    "client-certificate-of-another-ca": "unknown ca",
}


@pytest.mark.parametrize(("mode_name", "case"), _wrong_cases())
@fail_on_bare_cancel
async def test_wrong_credentials_are_refused_fast_and_clearly(
    request: pytest.FixtureRequest, mode_name: str, case: str
) -> None:
    mode: AuthMode = request.getfixturevalue(f"{mode_name}_mode")
    error, took = await refused(mode.url, **mode.wrong[case])
    text = str(error)
    assert took < FAIL_FAST_S
    assert mode.url in text
    if mode_name == "mtls":
        # The server refuses the client certificate with a TLS alert after TLS 1.3's handshake
        # has completed on the client's side, then closes. Usually nats-py reads the alert and
        # the message names it; sometimes its CONNECT write loses the race with the close and
        # all it sees is a reset or broken pipe (then the message cannot say "certificate").
        if "TLS handshake" in text:
            assert f"TLS handshake with {mode.url} failed" in text, text
            assert MTLS_ALERTS[case] in text.lower(), text
        else:
            assert f"could not connect to NATS at {mode.url}" in text, text
            assert any(e in text for e in ("BrokenPipeError", "ConnectionResetError")), text
    else:
        assert "refused the credentials (authorization violation)" in text, text


# --- the credentials files themselves ------------------------------------------------------------
def test_secret_files_are_private(nkey_user: NkeyUser, operator_mode: OperatorMode) -> None:
    for path in (nkey_user.seed_file, operator_mode.creds_file):
        assert path.stat().st_mode & 0o777 == 0o600


def test_the_jwt_chain_is_operator_account_user(operator_mode: OperatorMode) -> None:
    op = decode_jwt_claims(operator_mode.operator_jwt)
    acc = decode_jwt_claims(operator_mode.account_jwt)
    creds = operator_mode.creds_file.read_text()
    user_jwt = creds.split("-----BEGIN NATS USER JWT-----\n")[1].split("\n")[0]
    user = decode_jwt_claims(user_jwt)
    assert op["iss"] == op["sub"]
    assert op["sub"].startswith("O")
    assert acc["iss"] == op["sub"]
    assert acc["sub"] == operator_mode.account
    assert user["iss"] == operator_mode.account
    assert user["sub"].startswith("U")
    assert [c["nats"]["type"] for c in (op, acc, user)] == ["operator", "account", "user"]
    assert acc["nats"]["limits"]["disk_storage"] == -1  # JetStream enabled for the account


# --- nkeys not installed -------------------------------------------------------------------------
@pytest.mark.parametrize("field_name", ["nkeys_seed", "creds_file"])
def test_without_the_nkeys_package_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
    nkey_user: NkeyUser,
    operator_mode: OperatorMode,
    field_name: str,
) -> None:
    monkeypatch.setitem(sys.modules, "nkeys", None)  # makes `import nkeys` raise ImportError
    path = nkey_user.seed_file if field_name == "nkeys_seed" else operator_mode.creds_file
    with pytest.raises(bb3.ConfigError) as excinfo:
        bb3.Config(cluster_id="auth", agent_id="agent-1", **{field_name: str(path)})
    assert not isinstance(excinfo.value, ImportError)
    assert excinfo.value.field == field_name
    assert "pip install 'nats-py[nkeys]'" in str(excinfo.value)
