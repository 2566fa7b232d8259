"""Authentication and TLS against real nats-servers: the right credentials work (a pulse and a
client beat together), wrong ones fail fast with a clear ``NotConnected`` and leak nothing.

Certificates (a CA, a server certificate for 127.0.0.1, and an unrelated CA) are made inside the
test session with the ``cryptography`` package, or with the ``openssl`` CLI when it is missing.
"""

from __future__ import annotations

import datetime as _dt
import gc
import ipaddress
import shutil
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from _guards import fail_on_bare_cancel

import backbeat_trio as bb3
from backbeat_trio._embedded import NatsServerProcess

pytestmark = pytest.mark.nats

TOKEN = "s3cret-token"
USER, PASSWORD = "agent", "pa55word"
FAIL_FAST_S = 3.0  # a refused connect must be reported within this (one attempt)
HANG_S = 5.0  # past this the connect is considered hung


# --- certificates --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA that signed the server certificate
    wrong_ca: Path  # an unrelated CA
    server_cert: Path
    server_key: Path


def _pki_with_cryptography(where: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = _dt.datetime.now(_dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def make_ca(cn: str) -> tuple[Any, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return key, cert

    ca_key, ca_cert = make_ca("backbeat test CA")
    _, wrong_cert = make_ca("some other CA")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_path = where / "server.key"
    key_path.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return Pki(
        ca=write_cert(ca_cert, where / "ca.pem"),
        wrong_ca=write_cert(wrong_cert, where / "wrong-ca.pem"),
        server_cert=write_cert(server_cert, where / "server.pem"),
        server_key=key_path,
    )


def _pki_with_openssl(where: Path) -> Pki:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("neither the cryptography package nor the openssl CLI is available")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=where, timeout=30)

    for ca in ("ca", "wrong-ca"):
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", f"/CN={ca}", "-keyout", f"{ca}.key",
            "-out", f"{ca}.pem")  # fmt: skip
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    (where / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    )
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.pem")  # fmt: skip
    return Pki(where / "ca.pem", where / "wrong-ca.pem", where / "server.pem", where / "server.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    where = tmp_path_factory.mktemp("pki")
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return _pki_with_openssl(where)
    return _pki_with_cryptography(where)


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


async def _connect_once(cfg: bb3.Config) -> None:
    async with bb3.open_client(cfg):
        pass  # pragma: no cover - the connect must fail


async def refused(url: str, **options: Any) -> tuple[bb3.NotConnected, float]:
    """Connect with ``options``; return the NotConnected raised and how long it took."""
    cfg = bb3.Config(cluster_id="auth", agent_id="agent-1", nats_url=url, **options)
    started = time.monotonic()
    with trio.fail_after(HANG_S), pytest.raises(bb3.NotConnected) as excinfo:
        await _connect_once(cfg)
    took = time.monotonic() - started
    # nothing of the refused connection is left behind: no unclosed socket or transport
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    leaks = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, [str(w.message) for w in leaks]
    return excinfo.value, took


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
