"""One connection-options type: Config, PulseConfig, HAPulseConfig and ReverbConfig take every NATS
connection field with the same rules, the services' fields reach nats-py, and a pulse and a reverb
authenticate through their own config against a real nats-server."""

from __future__ import annotations

import datetime as _dt
import math
import ssl
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import backbeat_trio as bb3
from backbeat_trio._bridge.nats import _nats_options
from backbeat_trio._embedded import NatsServerProcess
from backbeat_trio._transport.options import ConnectionOptions, connection_kwargs_from_env

USER, PASSWORD = "svc", "pa55-w0rd"

# each config type with the fields it cannot do without
CONFIGS: dict[str, Callable[..., ConnectionOptions]] = {
    "Config": lambda **kw: bb3.Config(cluster_id="c", agent_id="a", **kw),
    "PulseConfig": lambda **kw: bb3.PulseConfig(cluster_id="c", **kw),
    "HAPulseConfig": lambda **kw: bb3.HAPulseConfig(cluster_id="c", **kw),
    "ReverbConfig": lambda **kw: bb3.ReverbConfig(cluster_id="c", **kw),
}


@pytest.fixture(params=sorted(CONFIGS))
def make(request: pytest.FixtureRequest) -> Callable[..., ConnectionOptions]:
    return CONFIGS[request.param]


# --- files ---------------------------------------------------------------------------------------
class Files:
    """A CA certificate, a client certificate and its key, another key, a seed and a creds file."""

    def __init__(self, where: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = _dt.datetime.now(_dt.UTC)

        def write_key(key: Any, path: Path) -> Path:
            path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            return path

        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "backbeat options test")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        self.cert = where / "client.pem"
        self.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.ca = self.cert  # self-signed: it is its own CA
        self.key = write_key(key, where / "client.key")
        self.other_key = write_key(ec.generate_private_key(ec.SECP256R1()), where / "other.key")
        self.seed = where / "user.nk"
        self.seed.write_text("SUAEXAMPLESEED\n")
        self.creds = where / "user.creds"
        self.creds.write_text("-----BEGIN NATS USER JWT-----\n")
        self.garbage = where / "garbage.pem"
        self.garbage.write_text("not a certificate\n")
        self.missing = where / "missing.pem"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("options"))


# --- validation: the same rule for every type ----------------------------------------------------
BAD: list[tuple[str, Callable[[Files], dict[str, Any]]]] = [
    ("nats_url", lambda f: {"nats_url": "http://127.0.0.1:4222"}),
    ("nats_url", lambda f: {"nats_url": " , "}),
    ("nats_url", lambda f: {"nats_url": ["nats://127.0.0.1:4222", "nats://h:99999"]}),
    ("nats_url", lambda f: {"nats_url": 4222}),
    ("user", lambda f: {"user": "u"}),
    ("user", lambda f: {"user": "", "password": "p"}),
    ("password", lambda f: {"password": "p"}),
    ("password", lambda f: {"user": "u", "password": 7}),
    ("token", lambda f: {"token": ""}),
    ("token", lambda f: {"token": "t", "user": "u", "password": "p"}),
    ("creds_file", lambda f: {"creds_file": str(f.missing)}),
    ("creds_file", lambda f: {"creds_file": 3}),
    ("nkeys_seed", lambda f: {"nkeys_seed": str(f.missing)}),
    ("nkeys_seed", lambda f: {"nkeys_seed": "SUAEXAMPLE-not-a-path"}),
    ("tls", lambda f: {"tls": True}),
    ("tls", lambda f: {"tls": "yes"}),
    ("tls_ca_file", lambda f: {"tls_ca_file": str(f.missing)}),
    ("tls_ca_file", lambda f: {"tls_ca_file": str(f.garbage)}),
    ("tls_cert_file", lambda f: {"tls_cert_file": str(f.cert)}),
    ("tls_cert_file", lambda f: {"tls_cert_file": str(f.missing), "tls_key_file": str(f.key)}),
    ("tls_cert_file", lambda f: {"tls_cert_file": str(f.cert), "tls_key_file": str(f.other_key)}),
    ("tls_key_file", lambda f: {"tls_key_file": str(f.key)}),
    ("tls_key_file", lambda f: {"tls_cert_file": str(f.cert), "tls_key_file": str(f.missing)}),
    ("name", lambda f: {"name": ""}),
    ("name", lambda f: {"name": 5}),
    ("reconnect_delay", lambda f: {"reconnect_delay": -0.5}),
    ("reconnect_delay", lambda f: {"reconnect_delay": math.nan}),
    ("reconnect_delay", lambda f: {"reconnect_delay": True}),
    ("reconnect_delay", lambda f: {"reconnect_delay": "1"}),
    ("max_reconnects", lambda f: {"max_reconnects": -2}),
    ("max_reconnects", lambda f: {"max_reconnects": 1.5}),
    ("connect_attempts", lambda f: {"connect_attempts": 0}),
    ("connect_attempts", lambda f: {"connect_attempts": True}),
]


@pytest.mark.parametrize(
    ("field", "bad"), BAD, ids=[f"{field}-{i}" for i, (field, _) in enumerate(BAD)]
)
def test_every_config_type_refuses_a_bad_connection_field_by_name(
    make: Callable[..., ConnectionOptions],
    files: Files,
    field: str,
    bad: Callable[[Files], dict[str, Any]],
) -> None:
    with pytest.raises(bb3.ConfigError) as info:
        make(**bad(files))
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_every_config_type_accepts_every_connection_field(
    make: Callable[..., ConnectionOptions], files: Files
) -> None:
    context = ssl.create_default_context()
    given: dict[str, Any] = {
        "nats_url": "nats://127.0.0.1:4222, tls://127.0.0.1:4223",
        "user": "u",
        "password": "p",
        "creds_file": str(files.creds),
        "nkeys_seed": files.seed,  # a Path is taken and kept as str
        "tls": context,
        "tls_ca_file": str(files.ca),
        "tls_cert_file": str(files.cert),
        "tls_key_file": str(files.key),
        "name": "my-connection",
        "reconnect_delay": 0.5,
        "max_reconnects": 7,
        "connect_attempts": 2,
        "inbox_prefix": "_INBOX_agent",
    }
    cfg = make(**given)
    kwargs = cfg.connection_kwargs()
    assert set(kwargs) == set(given) | {"token"}
    assert kwargs["nats_url"] == ("nats://127.0.0.1:4222", "tls://127.0.0.1:4223")
    assert cfg.servers == kwargs["nats_url"]
    assert kwargs["nkeys_seed"] == str(files.seed)
    assert {k: v for k, v in kwargs.items() if k not in ("nats_url", "nkeys_seed", "token")} == {
        k: v for k, v in given.items() if k not in ("nats_url", "nkeys_seed")
    }
    assert cfg.connection_name == "my-connection"
    assert cfg.ssl_context() is context
    # the same fields build a bare ConnectionOptions equal to the config's own view
    assert cfg.connection_options() == ConnectionOptions(**kwargs)
    # and a token instead of user/password is fine too
    assert make(token="t").token == "t"


@pytest.mark.parametrize(
    ("kind", "reconnect_delay", "connect_attempts", "name"),
    [
        ("Config", 1.0, 1, "backbeat-trio:a"),
        ("PulseConfig", 0.25, 3, "backbeat-pulse:pulse-1"),
        ("HAPulseConfig", 0.25, 3, "backbeat-ha-pulse:pulse-1"),
        ("ReverbConfig", 0.25, 3, "backbeat-reverb:reverb-1"),
    ],
)
def test_each_type_keeps_its_connection_defaults(
    kind: str, reconnect_delay: float, connect_attempts: int, name: str
) -> None:
    cfg = CONFIGS[kind]()
    assert cfg.servers == ("nats://127.0.0.1:4222",)
    assert (cfg.reconnect_delay, cfg.connect_attempts, cfg.max_reconnects) == (
        reconnect_delay,
        connect_attempts,
        -1,
    )
    assert cfg.connection_name == name
    opts = _nats_options(cfg)
    assert opts["name"] == name
    assert opts["reconnect_time_wait"] == reconnect_delay
    assert not {"user", "password", "token", "user_credentials", "nkeys_seed", "tls"} & set(opts)


def test_repr_never_shows_a_secret(make: Callable[..., ConnectionOptions]) -> None:
    with_password = make(user="alice", password="hunter2-password")
    with_token = make(token="hunter2-token", tls=ssl.create_default_context())
    for cfg, secret in ((with_password, "hunter2-password"), (with_token, "hunter2-token")):
        text = repr(cfg)
        assert secret not in text
        assert text.startswith(f"{type(cfg).__name__}(cluster_id='c'")
    assert "password=<set>" in repr(with_password)
    assert "user='alice'" in repr(with_password)
    assert "token=<set>" in repr(with_token)
    assert "tls=<set>" in repr(with_token)


def test_replace_validates_again(make: Callable[..., ConnectionOptions]) -> None:
    cfg = make(user="u", password="p")
    assert cfg.replace(password="q").password == "q"
    assert type(cfg.replace(password="q")) is type(cfg)
    with pytest.raises(bb3.ConfigError, match=r"^token: "):
        cfg.replace(token="t")


def test_a_config_copied_field_by_field_is_equal(make: Callable[..., ConnectionOptions]) -> None:
    # the CLI copies configs through __dataclass_fields__: it must hold only the init fields
    cfg = make(token="t", reconnect_delay=0.5)
    copy = type(cfg)(**{name: getattr(cfg, name) for name in cfg.__dataclass_fields__})
    assert copy == cfg


# --- the services' fields reach nats-py ----------------------------------------------------------
def test_a_pulse_nkeys_seed_reaches_nats_py(files: Files) -> None:
    opts = _nats_options(bb3.PulseConfig(cluster_id="c", nkeys_seed=str(files.seed)))
    assert opts["nkeys_seed"] == str(files.seed)
    assert opts["name"] == "backbeat-pulse:pulse-1"


def test_a_reverb_creds_file_reaches_nats_py(files: Files) -> None:
    cfg = bb3.ReverbConfig(cluster_id="c", creds_file=str(files.creds), max_reconnects=4)
    opts = _nats_options(cfg)
    assert opts["user_credentials"] == str(files.creds)
    assert opts["max_reconnect_attempts"] == 4
    # the client the reverb follows the beat with is on the same connection settings
    client_cfg = cfg.connection_config()
    assert client_cfg.creds_file == str(files.creds)
    assert client_cfg.connection_kwargs() == cfg.connection_options().connection_kwargs()
    assert _nats_options(client_cfg) == opts


def test_an_ha_pulse_client_certificate_reaches_nats_py(
    files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[tuple[str, str | None]] = []
    load_cert_chain = ssl.SSLContext.load_cert_chain

    def recording(ctx: ssl.SSLContext, certfile: str, keyfile: str | None = None) -> None:
        loaded.append((certfile, keyfile))
        load_cert_chain(ctx, certfile, keyfile)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", recording)
    cfg = bb3.HAPulseConfig(
        cluster_id="c",
        nats_url="tls://127.0.0.1:4222",
        tls_ca_file=str(files.ca),
        tls_cert_file=str(files.cert),
        tls_key_file=str(files.key),
    )
    loaded.clear()  # validation loads the pair once; what matters is the connect's context
    opts = _nats_options(cfg)
    ctx = opts["tls"]
    assert isinstance(ctx, ssl.SSLContext)
    assert loaded == [(str(files.cert), str(files.key))]
    subjects = [dict(x[0] for x in ca["subject"]) for ca in ctx.get_ca_certs()]
    assert {"commonName": "backbeat options test"} in subjects
    assert opts["name"] == "backbeat-ha-pulse:pulse-1"
    # the single-pulse view of an HA pulse carries the same connection settings
    assert cfg.pulse_config().tls_cert_file == str(files.cert)


# --- nkeys must be importable for NKEY/JWT authentication ----------------------------------------
@pytest.mark.parametrize("field", ["nkeys_seed", "creds_file"])
def test_nkeys_missing_is_a_config_error_saying_what_to_install(
    make: Callable[..., ConnectionOptions],
    files: Files,
    field: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = str(files.seed if field == "nkeys_seed" else files.creds)
    make(**{field: path})  # fine while nkeys imports
    monkeypatch.setitem(sys.modules, "nkeys", None)  # makes `import nkeys` raise ImportError
    with pytest.raises(bb3.ConfigError) as info:
        make(**{field: path})
    assert info.value.field == field
    assert "pip install 'nats-py[nkeys]'" in str(info.value)
    make(user="u", password="p")  # other authentication does not need nkeys


# --- the environment -----------------------------------------------------------------------------
def test_connection_fields_from_the_environment(files: Files) -> None:
    env = {
        "BACKBEAT_NATS_URL": "nats://10.0.0.1:4222,nats://10.0.0.2:4222",
        "BACKBEAT_NATS_TOKEN": "tok",
        "BACKBEAT_NATS_CREDS": str(files.creds),
        "BACKBEAT_NATS_NKEYS_SEED": str(files.seed),
        "BACKBEAT_TLS_CA": str(files.ca),
        "BACKBEAT_TLS_CERT": str(files.cert),
        "BACKBEAT_TLS_KEY": str(files.key),
        "BACKBEAT_RECONNECT_DELAY": "0.75",
        "BACKBEAT_MAX_RECONNECTS": "9",
        "BACKBEAT_CLUSTER_ID": "prod",
        "BACKBEAT_AGENT_ID": "agent-7",
    }
    kwargs = connection_kwargs_from_env(env)
    assert "cluster_id" not in kwargs
    pulse = bb3.PulseConfig(cluster_id="prod", **kwargs)
    client = bb3.Config.from_env(env)
    # the same connection, apart from the first-connect retries each type defaults to
    assert client.connection_kwargs() == pulse.connection_kwargs() | {"connect_attempts": 1}
    assert client.nkeys_seed == str(files.seed)
    assert (client.reconnect_delay, client.max_reconnects) == (0.75, 9)
    with pytest.raises(bb3.ConfigError, match=r"^max_reconnects: "):
        connection_kwargs_from_env({"BACKBEAT_MAX_RECONNECTS": "lots"})


# --- a real server with user/password authorization ----------------------------------------------
@pytest.fixture(scope="module")
def userpass_server() -> Iterator[NatsServerProcess]:
    with NatsServerProcess(jetstream=True, user=USER, password=PASSWORD) as server:
        yield server


@pytest.mark.nats
async def test_a_pulse_and_a_reverb_authenticate_through_their_own_config(
    userpass_server: NatsServerProcess,
) -> None:
    url = userpass_server.url
    creds = {"user": USER, "password": PASSWORD}
    pulse_cfg = bb3.PulseConfig(cluster_id="opts-auth", nats_url=url, tempo_bpm=600, **creds)
    reverb_cfg = bb3.ReverbConfig(
        cluster_id="opts-auth", nats_url=url, allow_unsigned=True, **creds
    )
    agent_cfg = bb3.Config(cluster_id="opts-auth", agent_id="agent-1", nats_url=url, **creds)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            pulse = await nursery.start(bb3.run_pulse, pulse_cfg)
            reverb = await nursery.start(bb3.run_reverb, reverb_cfg)
            async with bb3.open_client(agent_cfg) as bb:
                frame = await bb.wait_for_downbeat()
                await bb.emit_status(bb3.StatusClaim(state="executing", beats_left=2))
                # the reverb got the claim (over its authenticated connection) and reported it
                while not any(
                    r.from_beat >= frame.beat_index and r.by_state.get("executing") == 1
                    for r in reverb.history
                ):
                    await reverb.wait_for_report()
            assert pulse.published >= 4
            nursery.cancel_scope.cancel()


@pytest.mark.nats
@pytest.mark.parametrize("service", ["pulse", "reverb", "ha_pulse"])
async def test_a_service_with_the_wrong_password_is_refused_clearly(
    userpass_server: NatsServerProcess, service: str
) -> None:
    url, wrong = userpass_server.url, {"user": USER, "password": "wrong", "connect_attempts": 1}
    cfg: bb3.PulseConfig | bb3.ReverbConfig | bb3.HAPulseConfig
    run: Callable[..., Any]
    if service == "pulse":
        cfg, run = bb3.PulseConfig(cluster_id="opts-wrong", nats_url=url, **wrong), bb3.run_pulse
    elif service == "reverb":
        cfg = bb3.ReverbConfig(cluster_id="opts-wrong", nats_url=url, allow_unsigned=True, **wrong)
        run = bb3.run_reverb
    else:
        cfg = bb3.HAPulseConfig(cluster_id="opts-wrong", nats_url=url, pulse_id="p1", **wrong)
        run = bb3.run_ha_pulse
    # awaited directly, the refusal is one plain NotConnected: the trio-asyncio loop's own
    # nurseries inside the service do not wrap it in exception groups
    with trio.fail_after(10), pytest.raises(bb3.NotConnected) as info:
        await run(cfg)
    assert "refused the credentials" in str(info.value)
    assert "wrong" not in str(info.value)
    # started in the user's nursery, it is that nursery's one exception
    with trio.fail_after(10), pytest.raises(BaseExceptionGroup) as group:
        async with trio.open_nursery() as nursery:
            await nursery.start(run, cfg)
    (refusal,) = group.value.exceptions
    assert isinstance(refusal, bb3.NotConnected)
