"""Test support (no tests here): credentials and nats-server configs for every auth mode.

Everything is made inside a directory the caller gives (a pytest tmp dir):

* NKEY auth: a user nkey pair made with the ``nkeys`` package, its seed in a 0600 file, and the
  server's ``authorization { users = [ { nkey: "U..." } ] }`` block.
* JWT auth (operator mode): operator, system-account, account and user nkeys; the operator JWT
  (self-signed), the account JWTs (signed by the operator; the application account has
  JetStream limits) and the user JWT (signed by its account), in NATS JWT v2 form; the server's
  ``operator`` / ``resolver: MEMORY`` / ``resolver_preload`` / ``system_account`` settings; and
  the user's ``.creds`` file.
* TLS: a CA, a server certificate for 127.0.0.1, a client certificate signed by the CA, and an
  unrelated CA with its own client certificate (made with ``cryptography``, or the ``openssl``
  CLI when it is missing). :func:`mtls_server_options` gives the
  :class:`~backbeat_trio._embedded.NatsServerProcess` options for a server that requires and
  verifies client certificates (``tls { cert_file, key_file, ca_file, verify: true }``).

Imported as ``from _auth_servers import ...`` (the tests directory is on ``sys.path``).
"""

from __future__ import annotations

import base64
import datetime as _dt
import gc
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
import pytest
import trio

import backbeat_trio as bb3

FAIL_FAST_S = 3.0  # a refused connect must be reported within this (one attempt)
HANG_S = 5.0  # past this the connect is considered hung


# --- files -------------------------------------------------------------------------------------
def write_secret(path: Path, text: str) -> Path:
    """Write ``text`` to a new file that only its owner can read (mode 0600 from the start)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


# --- nkeys -------------------------------------------------------------------------------------
def new_keypair(prefix: int) -> nkeys.KeyPair:
    """A fresh nkey pair of one role (``nkeys.PREFIX_BYTE_USER``, ``_ACCOUNT``, ``_OPERATOR``)."""
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def public_key(kp: nkeys.KeyPair) -> str:
    """The ``U…``/``A…``/``O…`` public key as text."""
    return bytes(kp.public_key).decode()


def seed_text(kp: nkeys.KeyPair) -> str:
    """The ``SU…``/``SA…``/``SO…`` seed as text."""
    return bytes(kp.seed).decode()


@dataclass(frozen=True)
class NkeyUser:
    public_key: str
    seed_file: Path  # what ``Config(nkeys_seed=...)`` takes: a file holding the seed


def make_nkey_user(where: Path, name: str = "user") -> NkeyUser:
    """A user nkey pair; the seed goes to ``<where>/<name>.nk`` (0600)."""
    kp = new_keypair(nkeys.PREFIX_BYTE_USER)
    return NkeyUser(public_key(kp), write_secret(where / f"{name}.nk", seed_text(kp) + "\n"))


def nkey_server_config(*users: NkeyUser) -> str:
    """The ``authorization`` block admitting these nkey users (and nobody else)."""
    entries = ", ".join(f"{{ nkey: {json.dumps(u.public_key)} }}" for u in users)
    return f"authorization {{ users = [ {entries} ] }}"


# --- NATS JWT v2 -------------------------------------------------------------------------------
_JWT_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _compact(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def encode_jwt(
    *, issuer: nkeys.KeyPair, subject: str, name: str, nats: dict[str, Any], iat: int | None = None
) -> str:
    """Sign a NATS v2 JWT: ``b64url(header).b64url(claims).b64url(ed25519 signature)``.

    As nats-io/jwt v2 does: ``jti`` is the unpadded base32 of SHA-512/256 over the standard
    claims (with ``jti`` empty), and the signature covers ``header.claims`` as sent.
    """
    std: dict[str, Any] = {
        "jti": "",
        "iat": int(time.time()) if iat is None else iat,
        "iss": public_key(issuer),
        "name": name,
        "sub": subject,
    }
    digest = hashlib.new("sha512_256", _compact({k: v for k, v in std.items() if v})).digest()
    std["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    claims = {**std, "nats": nats}
    signing_input = f"{_b64url(_compact(_JWT_HEADER))}.{_b64url(_compact(claims))}"
    signature = issuer.sign(signing_input.encode())
    return f"{signing_input}.{_b64url(signature)}"


def decode_jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT (unverified), for assertions."""
    body = token.split(".")[1]
    result: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return result


_UNLIMITED_ACCOUNT = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}
# JetStream is off for an account unless its JWT gives it storage; -1 is "no limit"
_JETSTREAM_UNLIMITED = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def account_claims(*, jetstream: bool) -> dict[str, Any]:
    limits = {**_UNLIMITED_ACCOUNT, **(_JETSTREAM_UNLIMITED if jetstream else {})}
    return {
        "limits": limits,
        "default_permissions": {"pub": {}, "sub": {}},
        "type": "account",
        "version": 2,
    }


def user_claims() -> dict[str, Any]:
    return {
        "pub": {},
        "sub": {},
        "subs": -1,
        "data": -1,
        "payload": -1,
        "type": "user",
        "version": 2,
    }


def creds_text(user_jwt: str, user_seed: str) -> str:
    """The standard ``.creds`` file (as ``nsc generate creds`` writes it)."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n"
        "\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n"
        "\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user_seed}\n"
        "------END USER NKEY SEED------\n"
        "\n"
        "*************************************************************\n"
    )


def make_creds(
    where: Path,
    account: nkeys.KeyPair,
    name: str = "user",
    *,
    seed_of: nkeys.KeyPair | None = None,
) -> Path:
    """A user of ``account`` and its creds file ``<where>/<name>.creds`` (0600).

    ``seed_of`` puts another key's seed in the file (a creds file that cannot prove its JWT).
    """
    user = new_keypair(nkeys.PREFIX_BYTE_USER)
    token = encode_jwt(issuer=account, subject=public_key(user), name=name, nats=user_claims())
    seed = seed_text(user if seed_of is None else seed_of)
    return write_secret(where / f"{name}.creds", creds_text(token, seed))


@dataclass(frozen=True)
class OperatorMode:
    operator_jwt: str
    system_account: str
    account: str  # the application account's public key
    account_kp: nkeys.KeyPair  # signs more users
    account_jwt: str
    creds_file: Path  # a user of ``account``
    server_config: str  # for NatsServerProcess(extra_config=...)


def make_operator_mode(where: Path, *, jetstream: bool = True) -> OperatorMode:
    """Operator, system account, one application account (with JetStream) and one user."""
    operator = new_keypair(nkeys.PREFIX_BYTE_OPERATOR)
    system = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    account = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    op_pub, sys_pub, acc_pub = public_key(operator), public_key(system), public_key(account)
    operator_jwt = encode_jwt(
        issuer=operator,
        subject=op_pub,
        name="backbeat-test-operator",
        nats={"system_account": sys_pub, "type": "operator", "version": 2},
    )
    system_jwt = encode_jwt(
        issuer=operator, subject=sys_pub, name="SYS", nats=account_claims(jetstream=False)
    )
    account_jwt = encode_jwt(
        issuer=operator, subject=acc_pub, name="APP", nats=account_claims(jetstream=jetstream)
    )
    creds = make_creds(where, account, "app-user")
    config = "\n".join(
        [
            f"operator: {json.dumps(operator_jwt)}",
            f"system_account: {json.dumps(sys_pub)}",
            "resolver: MEMORY",
            "resolver_preload: {",
            f"  {sys_pub}: {json.dumps(system_jwt)}",
            f"  {acc_pub}: {json.dumps(account_jwt)}",
            "}",
        ]
    )
    return OperatorMode(
        operator_jwt=operator_jwt,
        system_account=sys_pub,
        account=acc_pub,
        account_kp=account,
        account_jwt=account_jwt,
        creds_file=creds,
        server_config=config,
    )


# --- certificates ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA that signed the server and client certificates
    wrong_ca: Path  # an unrelated CA
    server_cert: Path
    server_key: Path
    client_cert: Path  # signed by ``ca``
    client_key: Path
    wrong_client_cert: Path  # signed by ``wrong_ca``
    wrong_client_key: Path


def make_pki(where: Path) -> Pki:
    """CAs and certificates in ``where`` (cryptography, else the openssl CLI, else skip)."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return _pki_with_openssl(where)
    return _pki_with_cryptography(where)


def mtls_server_options(pki: Pki) -> dict[str, Any]:
    """NatsServerProcess options for a TLS server that requires a client certificate of ``ca``."""
    return {
        "tls_cert": pki.server_cert,
        "tls_key": pki.server_key,
        "tls_ca": pki.ca,
        "tls_verify": True,
    }


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

    def write_key(key: Any, path: Path) -> Path:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return write_secret(path, pem.decode())

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

    def make_leaf(
        cn: str, ca_key: Any, ca_cert: x509.Certificate, *, server: bool
    ) -> tuple[Any, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=2))
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = make_ca("backbeat test CA")
    wrong_key, wrong_cert = make_ca("some other CA")
    server_key, server_cert = make_leaf("127.0.0.1", ca_key, ca_cert, server=True)
    client_key, client_cert = make_leaf("backbeat-agent", ca_key, ca_cert, server=False)
    rogue_key, rogue_cert = make_leaf("backbeat-agent", wrong_key, wrong_cert, server=False)
    return Pki(
        ca=write_cert(ca_cert, where / "ca.pem"),
        wrong_ca=write_cert(wrong_cert, where / "wrong-ca.pem"),
        server_cert=write_cert(server_cert, where / "server.pem"),
        server_key=write_key(server_key, where / "server.key"),
        client_cert=write_cert(client_cert, where / "client.pem"),
        client_key=write_key(client_key, where / "client.key"),
        wrong_client_cert=write_cert(rogue_cert, where / "wrong-client.pem"),
        wrong_client_key=write_key(rogue_key, where / "wrong-client.key"),
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
    leaves = (
        ("server", "ca", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
         "extendedKeyUsage=serverAuth\n"),
        ("client", "ca", "/CN=backbeat-agent", "extendedKeyUsage=clientAuth\n"),
        ("wrong-client", "wrong-ca", "/CN=backbeat-agent", "extendedKeyUsage=clientAuth\n"),
    )  # fmt: skip
    for leaf, ca, subject, ext in leaves:
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-subj", subject, "-keyout", f"{leaf}.key", "-out", f"{leaf}.csr")  # fmt: skip
        (where / f"{leaf}.ext").write_text(ext)
        run("x509", "-req", "-in", f"{leaf}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{leaf}.ext",
            "-out", f"{leaf}.pem")  # fmt: skip
        (where / f"{leaf}.key").chmod(0o600)
    return Pki(
        ca=where / "ca.pem",
        wrong_ca=where / "wrong-ca.pem",
        server_cert=where / "server.pem",
        server_key=where / "server.key",
        client_cert=where / "client.pem",
        client_key=where / "client.key",
        wrong_client_cert=where / "wrong-client.pem",
        wrong_client_key=where / "wrong-client.key",
    )


# --- connecting --------------------------------------------------------------------------------
async def _connect_once(cfg: bb3.Config) -> None:
    async with bb3.open_client(cfg):
        pass  # pragma: no cover - the connect must fail


async def refused(url: str, **options: Any) -> tuple[bb3.NotConnected, float]:
    """Connect with ``options``; return the NotConnected raised and how long it took.

    Also checks that nothing of the refused connection is left behind (no unclosed socket or
    transport: a ResourceWarning fails the caller).
    """
    cfg = bb3.Config(cluster_id="auth", agent_id="agent-1", nats_url=url, **options)
    started = time.monotonic()
    with trio.fail_after(HANG_S), pytest.raises(bb3.NotConnected) as excinfo:
        await _connect_once(cfg)
    took = time.monotonic() - started
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    leaks = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, [str(w.message) for w in leaks]
    return excinfo.value, took


# --- least privilege (docs/security.md) --------------------------------------------------------
def least_privilege_server(config: str, passwords: dict[str, str]) -> bb3.NatsServerProcess:
    """A JetStream nats-server (not started) running ``config`` as docs/security.md shows it.

    ``passwords`` maps the variables the configuration reads (``BACKBEAT_<ROLE>_PASSWORD``) to
    their values; they are defined in the file ahead of ``config``, where an operator's server
    would find them in its environment, so the documented text itself runs unchanged.
    """
    defined = "\n".join(f"{name}: {json.dumps(value)}" for name, value in passwords.items())
    return bb3.NatsServerProcess(jetstream=True, extra_config=f"{defined}\n{config}")
