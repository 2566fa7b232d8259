"""Signing: key files, keyrings, signature headers, replay memory and claim verification."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey, VerifyKey

from backbeat_trio._core.hlc import HLCStamp
from backbeat_trio._core.signing import (
    HEADER_AGENT,
    HEADER_KEY,
    HEADER_SIG,
    Keyring,
    ReplayCache,
    Signer,
    generate_signing_key,
    load_signing_key,
    public_key_b64,
    save_signing_key,
    sign_headers,
    verify_claim,
)
from backbeat_trio._core.wire import StatusClaim, encode_claim
from backbeat_trio._errors import ConfigError, SignatureError, WireError

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- key files -----------------------------------------------------------------------------------
@posix_only
def test_key_file_round_trip_and_mode(tmp_path: Path) -> None:
    key = generate_signing_key()
    path = tmp_path / "agent-7.key"
    save_signing_key(key, path)
    assert _mode(path) == 0o600
    text = path.read_text()
    assert text.endswith("\n")
    assert base64.b64decode(text.strip(), validate=True) == bytes(key)
    loaded = load_signing_key(path)
    assert bytes(loaded) == bytes(key)
    assert loaded.verify_key == key.verify_key


@posix_only
def test_save_tightens_an_existing_loose_file(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text("old contents that are much longer than a key file would be\n" * 3)
    path.chmod(0o644)
    key = generate_signing_key()
    save_signing_key(key, path)
    assert _mode(path) == 0o600
    assert bytes(load_signing_key(path)) == bytes(key)


def test_save_without_overwrite_refuses_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "k"
    save_signing_key(generate_signing_key(), path, overwrite=False)
    first = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_signing_key(generate_signing_key(), path, overwrite=False)
    assert path.read_bytes() == first


@posix_only
def test_save_refuses_to_follow_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    link = tmp_path / "k"
    link.symlink_to(target)
    with pytest.raises(OSError):  # noqa: PT011 - ELOOP has no subclass of its own
        save_signing_key(generate_signing_key(), link)
    assert target.read_text() == "precious\n"


@posix_only
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601, 0o610])
def test_load_refuses_a_key_file_others_can_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "agent-7.key"
    save_signing_key(generate_signing_key(), path)
    path.chmod(mode)
    with pytest.raises(SignatureError) as info:
        load_signing_key(path)
    message = str(info.value)
    assert info.value.reason == "insecure_key_file"
    assert str(path) in message
    assert f"{mode:04o}" in message
    assert "chmod 600" in message


@posix_only
def test_load_accepts_owner_only_modes(tmp_path: Path) -> None:
    path = tmp_path / "k"
    key = generate_signing_key()
    save_signing_key(key, path)
    path.chmod(0o400)
    assert bytes(load_signing_key(path)) == bytes(key)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\n",
        b"not base64 at all!\n",
        base64.b64encode(b"\x01" * 31) + b"\n",
        base64.b64encode(b"\x01" * 33) + b"\n",
        base64.b64encode(b"\x01" * 64) + b"\n",  # a libsodium secret key, not a seed
        base64.b64encode(b"\x01" * 32)[:-1] + b"\n",  # padding lost
        b"\x00" * 10_000,
        base64.b64encode(b"\x01" * 32) * 200,
    ],
    ids=["empty", "newline", "text", "31", "33", "64", "unpadded", "binary", "huge"],
)
def test_load_refuses_garbage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "k"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(SignatureError, match="32-byte") as info:
        load_signing_key(path)
    assert info.value.reason == "malformed"
    assert str(path) in str(info.value)


def test_load_tolerates_surrounding_whitespace(tmp_path: Path) -> None:
    key = generate_signing_key()
    path = tmp_path / "k"
    path.write_bytes(b"  " + base64.b64encode(bytes(key)) + b"\r\n\n")
    path.chmod(0o600)
    assert bytes(load_signing_key(path)) == bytes(key)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_signing_key(tmp_path / "nope")


def test_public_key_b64() -> None:
    key = generate_signing_key()
    b64 = public_key_b64(key)
    assert base64.b64decode(b64, validate=True) == bytes(key.verify_key)
    assert len(b64) == 44
    assert public_key_b64(key.verify_key) == b64


# --- keyring -------------------------------------------------------------------------------------
@pytest.fixture
def key_a() -> SigningKey:
    return SigningKey(b"\x0a" * 32)


@pytest.fixture
def key_b() -> SigningKey:
    return SigningKey(b"\x0b" * 32)


@pytest.fixture
def keyring(key_a: SigningKey, key_b: SigningKey) -> Keyring:
    return Keyring({"agent-a": key_a.verify_key, "agent-b": key_b.verify_key})


def test_keyring_accepts_verify_keys_raw_bytes_and_base64(key_a: SigningKey) -> None:
    vk = key_a.verify_key
    forms: list[VerifyKey | bytes | str] = [vk, bytes(vk), public_key_b64(vk)]
    for form in forms:
        ring = Keyring({"agent-a": form})
        assert ring.get("agent-a") == vk
        assert ring.public_key_b64("agent-a") == public_key_b64(vk)
    assert Keyring({"x": vk}) == Keyring({"x": public_key_b64(vk)})


def test_keyring_lookup(keyring: Keyring, key_a: SigningKey, key_b: SigningKey) -> None:
    assert len(keyring) == 2
    assert "agent-a" in keyring
    assert "agent-c" not in keyring
    assert keyring.get("agent-c") is None
    assert keyring.get("agent-b") == key_b.verify_key
    assert sorted(keyring) == ["agent-a", "agent-b"]
    assert keyring.owner_of(public_key_b64(key_a)) == "agent-a"
    assert keyring.owner_of(bytes(key_b.verify_key)) == "agent-b"
    assert keyring.owner_of("garbage") is None


def test_keyring_repr_counts_agents_and_shows_no_keys(keyring: Keyring, key_a: SigningKey) -> None:
    text = repr(keyring)
    assert "2 agents" in text
    assert public_key_b64(key_a) not in text
    assert "agent-a" not in text
    assert repr(Keyring()) == "<Keyring 0 agents>"
    assert repr(Keyring({"x": key_a.verify_key})) == "<Keyring 1 agent>"


def test_keyring_add_replaces_a_key(keyring: Keyring, key_a: SigningKey) -> None:
    new = generate_signing_key()
    keyring.add("agent-a", new.verify_key)
    assert keyring.get("agent-a") == new.verify_key
    assert len(keyring) == 2
    assert keyring.owner_of(public_key_b64(key_a)) is None
    keyring.add("agent-c", public_key_b64(new))
    assert len(keyring) == 3


@pytest.mark.parametrize("bad_id", ["", "a.b", "a b", "x" * 65, "a*", "a\n"])
def test_keyring_rejects_bad_ids(bad_id: str, key_a: SigningKey) -> None:
    with pytest.raises(ConfigError, match="agent_id"):
        Keyring({bad_id: key_a.verify_key})


@pytest.mark.parametrize(
    "bad_key",
    [
        b"\x01" * 31,
        b"\x01" * 33,
        "not base64!",
        base64.b64encode(b"\x01" * 31).decode(),
        base64.b64encode(b"\x01" * 64).decode(),
        12345,
        None,
    ],
    ids=["31-bytes", "33-bytes", "text", "b64-31", "b64-64", "int", "none"],
)
def test_keyring_rejects_bad_keys(bad_key: object) -> None:
    with pytest.raises(SignatureError, match="agent-a") as info:
        Keyring({"agent-a": bad_key})  # type: ignore[dict-item]
    assert info.value.reason == "malformed"


def test_keyring_refuses_a_private_key(key_a: SigningKey) -> None:
    with pytest.raises(SignatureError, match="verify_key"):
        Keyring({"agent-a": key_a})  # type: ignore[dict-item]


def test_keyring_toml_round_trip(tmp_path: Path, keyring: Keyring) -> None:
    path = tmp_path / "keys.toml"
    keyring.save(path)
    loaded = Keyring.load(path)
    assert loaded == keyring
    assert loaded is not keyring
    assert loaded.to_toml() == keyring.to_toml()
    assert path.read_text().startswith("[agents]\n")


def test_keyring_loads_hand_written_toml(
    tmp_path: Path, key_a: SigningKey, key_b: SigningKey
) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(
        "# trusted agents\n"
        "[meta]\nowner = 'ops'\n\n"
        "[agents]\n"
        f'agent-a = "{public_key_b64(key_a)}"\n'
        f"\"agent-b\" = '{public_key_b64(key_b)}'  # quoted key, literal string\n"
    )
    ring = Keyring.load(path)
    assert len(ring) == 2
    assert ring.get("agent-a") == key_a.verify_key
    assert ring.get("agent-b") == key_b.verify_key


def test_empty_keyring_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    Keyring().save(path)
    assert len(Keyring.load(path)) == 0


@pytest.mark.parametrize(
    ("content", "error", "match"),
    [
        ("agents = 1\n", SignatureError, r"no \[agents\] table"),
        ("[agent]\nx = 'y'\n", SignatureError, r"no \[agents\] table"),
        ("[agents\n", SignatureError, "not valid TOML"),
        ("[agents]\nagent-a = 5\n", SignatureError, "base64 string"),
        ("[agents]\nagent-a = 'bm9wZQ=='\n", SignatureError, "not an ed25519 public key"),
        ("[agents]\n\"a.b\" = 'x'\n", ConfigError, "1-64 characters"),
    ],
)
def test_keyring_load_errors_name_the_file(
    tmp_path: Path, content: str, error: type[Exception], match: str
) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(content)
    with pytest.raises(error, match=match) as info:
        Keyring.load(path)
    assert str(path) in str(info.value)


# --- signing -------------------------------------------------------------------------------------
def test_sign_headers(key_a: SigningKey) -> None:
    body = b'{"hello":"world"}'
    headers = sign_headers(key_a, "agent-a", body)
    assert set(headers) == {HEADER_AGENT, HEADER_KEY, HEADER_SIG}
    assert headers[HEADER_AGENT] == "agent-a"
    assert headers[HEADER_KEY] == public_key_b64(key_a)
    signature = base64.b64decode(headers[HEADER_SIG], validate=True)
    assert len(signature) == 64
    assert key_a.verify_key.verify(body, signature) == body
    assert signature == key_a.sign(body).signature  # ed25519 is deterministic


def test_sign_headers_follows_the_agent_id(key_a: SigningKey) -> None:
    assert sign_headers(key_a, "agent-a", b"x")[HEADER_AGENT] == "agent-a"
    assert sign_headers(key_a, "agent-z", b"x")[HEADER_AGENT] == "agent-z"
    with pytest.raises(ConfigError):
        sign_headers(key_a, "bad id", b"x")


def test_signer(key_a: SigningKey) -> None:
    signer = Signer(key_a, "agent-a")
    assert signer.public_key_b64 == public_key_b64(key_a)
    assert signer.sign(b"body") == key_a.sign(b"body").signature
    assert signer.headers(b"body") == sign_headers(key_a, "agent-a", b"body")
    # the repr may show the public key, never the seed
    assert base64.b64encode(bytes(key_a)).decode() not in repr(signer)
    assert "agent-a" in repr(signer)
    with pytest.raises(ConfigError):
        Signer(key_a, "a.b")
    with pytest.raises(TypeError):
        Signer(key_a.verify_key, "agent-a")  # type: ignore[arg-type]


@settings(max_examples=200)
@given(body=st.binary(max_size=5000), seed=st.binary(min_size=32, max_size=32))
def test_signer_signature_is_pynacls_over_the_exact_bytes(body: bytes, seed: bytes) -> None:
    key = SigningKey(seed)
    signer = Signer(key, "agent-a")
    expected = key.sign(body).signature
    assert signer.sign(body) == expected
    assert base64.b64decode(signer.headers(body)[HEADER_SIG], validate=True) == expected
    key.verify_key.verify(body, signer.sign(body))


# --- replay memory -------------------------------------------------------------------------------
def test_replay_cache_remembers_and_normalises_widths() -> None:
    cache = ReplayCache()
    assert not cache.seen("a", "000000000001:0002:0003")
    cache.add("a", "000000000001:0002:0003")
    assert cache.seen("a", "1:2:3")
    assert cache.seen("a", HLCStamp(1, 2, 3))
    assert not cache.seen("b", "1:2:3")
    assert not cache.seen("a", "1:2:4")
    cache.add("a", "1:2:3")
    assert len(cache) == 1


def test_replay_cache_is_bounded_and_evicts_the_oldest() -> None:
    cache = ReplayCache(max_entries=3)
    for i in range(1, 6):
        cache.add("a", HLCStamp(i, 0, 0))
        cache.add("b", HLCStamp(100 + i, 0, 0))
    assert len(cache) == 3
    # evicted entries stay refused: they are below their agent's floor
    assert cache.seen("a", HLCStamp(1, 0, 0))
    assert cache.seen("b", HLCStamp(101, 0, 0))
    # a newer stamp from the same agent is not
    assert not cache.seen("a", HLCStamp(6, 0, 0))
    assert not cache.seen("c", HLCStamp(1, 0, 0))


def test_replay_cache_floors_are_bounded_too() -> None:
    cache = ReplayCache(max_entries=2)
    for i in range(10):
        cache.add(f"agent-{i}", HLCStamp(1, 0, 0))
    assert len(cache) == 2
    assert len(cache._floors) <= 2


def test_replay_cache_rejects_garbage() -> None:
    with pytest.raises(WireError):
        ReplayCache().seen("a", "nope")
    with pytest.raises(ValueError, match="max_entries"):
        ReplayCache(0)


# --- verify_claim --------------------------------------------------------------------------------
def _claim(agent_id: str = "agent-a", hlc: str = "0192a3b4c5d6:0001:0a0a", **kw: object) -> bytes:
    claim = StatusClaim(agent_id=agent_id, task_id="task:0badf00d", beat_index=8, hlc=hlc)
    return encode_claim(msgspec.structs.replace(claim, **kw))


def _reason(exc: pytest.ExceptionInfo[SignatureError]) -> str | None:
    return exc.value.reason


def test_verify_accepts_a_valid_claim(keyring: Keyring, key_a: SigningKey) -> None:
    body = _claim(progress=0.25, notes="ok")
    cache = ReplayCache()
    claim = verify_claim(body, sign_headers(key_a, "agent-a", body), keyring, replay_cache=cache)
    assert claim.agent_id == "agent-a"
    assert claim.progress == 0.25
    assert cache.seen("agent-a", claim.hlc)


def test_verify_accepts_headers_in_any_case(keyring: Keyring, key_a: SigningKey) -> None:
    body = _claim()
    headers = {k.lower(): v for k, v in sign_headers(key_a, "agent-a", body).items()}
    assert verify_claim(body, headers, keyring).agent_id == "agent-a"
    headers = {k.upper(): v for k, v in sign_headers(key_a, "agent-a", body).items()}
    assert verify_claim(body, headers, keyring).agent_id == "agent-a"


def test_verify_without_key_header_uses_the_keyring(keyring: Keyring, key_a: SigningKey) -> None:
    body = _claim()
    headers = sign_headers(key_a, "agent-a", body)
    del headers[HEADER_KEY]
    assert verify_claim(body, headers, keyring).agent_id == "agent-a"


def test_verify_rejects_a_forged_signature(keyring: Keyring, key_a: SigningKey) -> None:
    body = _claim()
    forger = generate_signing_key()
    headers = sign_headers(forger, "agent-a", body)
    headers[HEADER_KEY] = public_key_b64(key_a)  # lie about the key used
    with pytest.raises(SignatureError, match="bad signature") as info:
        verify_claim(body, headers, keyring)
    assert _reason(info) == "bad_signature"


def test_verify_rejects_an_altered_body(keyring: Keyring, key_a: SigningKey) -> None:
    body = _claim(progress=0.25)
    headers = sign_headers(key_a, "agent-a", body)
    altered = body.replace(b'"progress":0.25', b'"progress":0.95')
    assert altered != body
    with pytest.raises(SignatureError) as info:
        verify_claim(altered, headers, keyring)
    assert _reason(info) == "bad_signature"


def test_verify_checks_the_exact_bytes_not_a_re_encoding(
    keyring: Keyring, key_a: SigningKey
) -> None:
    # same claim, different bytes (spacing, key order): each verifies only with its own signature
    body = _claim()
    respaced = body.replace(b",", b", ")
    headers = sign_headers(key_a, "agent-a", respaced)
    assert verify_claim(respaced, headers, keyring).agent_id == "agent-a"
    with pytest.raises(SignatureError) as info:
        verify_claim(body, headers, keyring)
    assert _reason(info) == "bad_signature"


def test_verify_rejects_an_unknown_agent(keyring: Keyring) -> None:
    stranger = generate_signing_key()
    body = _claim(agent_id="agent-c")
    with pytest.raises(SignatureError, match="unknown agent 'agent-c'") as info:
        verify_claim(body, sign_headers(stranger, "agent-c", body), keyring)
    assert _reason(info) == "unknown_agent"


def test_verify_rejects_the_key_of_another_agent(
    keyring: Keyring, key_a: SigningKey, key_b: SigningKey
) -> None:
    body = _claim(agent_id="agent-a")
    headers = sign_headers(key_b, "agent-a", body)  # agent-b signs as agent-a
    with pytest.raises(SignatureError, match="not the key on the keyring") as info:
        verify_claim(body, headers, keyring)
    assert _reason(info) == "wrong_key"
    assert "agent-b" in str(info.value)


def test_verify_rejects_a_replay(keyring: Keyring, key_a: SigningKey) -> None:
    body = _claim()
    headers = sign_headers(key_a, "agent-a", body)
    cache = ReplayCache()
    verify_claim(body, headers, keyring, replay_cache=cache)
    with pytest.raises(SignatureError, match="replay") as info:
        verify_claim(body, headers, keyring, replay_cache=cache)
    assert _reason(info) == "replay"
    # without a cache there is no replay memory
    assert verify_claim(body, headers, keyring).agent_id == "agent-a"
    # the next stamp is fresh
    later = _claim(hlc="0192a3b4c5d6:0002:0a0a")
    verify_claim(later, sign_headers(key_a, "agent-a", later), keyring, replay_cache=cache)


def test_a_rejected_claim_does_not_poison_the_replay_cache(
    keyring: Keyring, key_a: SigningKey
) -> None:
    body = _claim()
    cache = ReplayCache()
    with pytest.raises(SignatureError):
        verify_claim(
            body, sign_headers(generate_signing_key(), "agent-a", body), keyring, replay_cache=cache
        )
    assert len(cache) == 0
    verify_claim(body, sign_headers(key_a, "agent-a", body), keyring, replay_cache=cache)
    assert len(cache) == 1


@pytest.mark.parametrize("headers", [None, {}, {"Nats-Msg-Id": "agent-a:1:2:3"}])
def test_verify_unsigned(keyring: Keyring, headers: dict[str, str] | None) -> None:
    body = _claim()
    with pytest.raises(SignatureError, match="unsigned") as info:
        verify_claim(body, headers, keyring)
    assert _reason(info) == "unsigned"
    cache = ReplayCache()
    claim = verify_claim(body, headers, keyring, allow_unsigned=True, replay_cache=cache)
    assert claim.agent_id == "agent-a"
    # replay protection covers unsigned claims too
    with pytest.raises(SignatureError) as info:
        verify_claim(body, headers, keyring, allow_unsigned=True, replay_cache=cache)
    assert _reason(info) == "replay"


def test_allow_unsigned_still_verifies_signed_claims(keyring: Keyring) -> None:
    body = _claim()
    headers = sign_headers(generate_signing_key(), "agent-a", body)
    del headers[HEADER_KEY]
    with pytest.raises(SignatureError) as info:
        verify_claim(body, headers, keyring, allow_unsigned=True)
    assert _reason(info) == "bad_signature"


def test_verify_rejects_a_schema_invalid_claim(keyring: Keyring, key_a: SigningKey) -> None:
    body = _claim().replace(b'"progress":0.0', b'"progress":2.0')
    assert b'"progress":2.0' in body
    with pytest.raises(WireError, match="progress"):
        verify_claim(body, sign_headers(key_a, "agent-a", body), keyring)
    with pytest.raises(WireError):
        verify_claim(b"not json", None, keyring, allow_unsigned=True)


def test_verify_rejects_header_claim_agent_mismatch(
    keyring: Keyring, key_a: SigningKey, key_b: SigningKey
) -> None:
    body = _claim(agent_id="agent-a")
    headers = sign_headers(key_b, "agent-b", body)  # a valid agent-b signature, claiming to be a
    with pytest.raises(SignatureError, match="does not match") as info:
        verify_claim(body, headers, keyring)
    assert _reason(info) == "agent_mismatch"


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda h: h.pop(HEADER_AGENT), "no Backbeat-Agent"),
        (lambda h: h.__setitem__(HEADER_SIG, "not base64!"), "64-byte signature"),
        (lambda h: h.__setitem__(HEADER_SIG, base64.b64encode(b"x" * 63).decode()), "64-byte"),
        (lambda h: h.__setitem__(HEADER_KEY, "junk"), "32-byte public key"),
    ],
    ids=["no-agent", "sig-not-b64", "sig-63-bytes", "key-junk"],
)
def test_verify_rejects_malformed_headers(
    keyring: Keyring, key_a: SigningKey, mutate: object, match: str
) -> None:
    body = _claim()
    headers = sign_headers(key_a, "agent-a", body)
    mutate(headers)  # type: ignore[operator]
    with pytest.raises(SignatureError, match=match) as info:
        verify_claim(body, headers, keyring)
    assert _reason(info) == "malformed"


def test_verify_accepts_a_memoryview_body(keyring: Keyring, key_a: SigningKey) -> None:
    body = _claim()
    headers = sign_headers(key_a, "agent-a", body)
    assert verify_claim(memoryview(body), headers, keyring).agent_id == "agent-a"
