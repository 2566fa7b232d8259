"""Ed25519 claim signing and verification (SPEC.md, "Signing"; BACKBEAT-REQ-044).

A claim is signed over the exact bytes published and carries three headers: ``Backbeat-Agent``,
``Backbeat-Key`` (the std base64 public key) and ``Backbeat-Sig`` (the std base64 64-byte
signature). A verifier trusts a key only from its :class:`Keyring`, never from the header; the
header key only lets it say *which* key was used. Nothing here does I/O except the key-file and
keyring helpers.
"""

from __future__ import annotations

import base64
import binascii
import os
import shlex
import stat
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from typing import Final, TypeAlias

import nacl.bindings
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from .._core.beats import validate_id
from .._core.hlc import HLCStamp
from .._core.wire import StatusClaim, decode_claim
from .._errors import ConfigError, SignatureError, WireError
from .edge import decode_toml

__all__ = [
    "HEADER_AGENT",
    "HEADER_KEY",
    "HEADER_SIG",
    "Keyring",
    "ReplayCache",
    "Signer",
    "generate_signing_key",
    "load_signing_key",
    "public_key_b64",
    "save_signing_key",
    "sign_headers",
    "verify_claim",
]

HEADER_AGENT: Final = "Backbeat-Agent"
HEADER_KEY: Final = "Backbeat-Key"
HEADER_SIG: Final = "Backbeat-Sig"

_SEED_BYTES: Final = nacl.bindings.crypto_sign_SEEDBYTES  # 32
_PUBLIC_KEY_BYTES: Final = nacl.bindings.crypto_sign_PUBLICKEYBYTES  # 32
_SIGNATURE_BYTES: Final = nacl.bindings.crypto_sign_BYTES  # 64
# A key file is 45 bytes; anything far larger is not a key file, so don't read all of it.
_MAX_KEY_FILE_BYTES: Final = 4096
#: A keyring larger than this is refused unread (a line per agent: room for many thousands).
_MAX_KEYRING_BYTES: Final = 16 * 1024 * 1024

KeyLike: TypeAlias = VerifyKey | bytes | str
PathLike: TypeAlias = str | os.PathLike[str]


def _b64decode_exact(text: str | bytes, length: int) -> bytes | None:
    """Strict std base64 of exactly ``length`` bytes, else ``None``."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == length else None


def _b64encode(raw: bytes) -> str:
    return binascii.b2a_base64(raw, newline=False).decode("ascii")


def _sign_detached(body: bytes, secret: bytes) -> bytes:
    # the public binding only: PyNaCl's private cffi module saves a small fraction of a
    # signature (benchmarks/ANALYSIS.md), not worth depending on its layout in the signing path
    return nacl.bindings.crypto_sign(body, secret)[:_SIGNATURE_BYTES]


# --- key files -----------------------------------------------------------------------------------


def generate_signing_key() -> SigningKey:
    """A fresh random ed25519 signing key."""
    return SigningKey.generate()


def save_signing_key(key: SigningKey, path: PathLike, *, overwrite: bool = True) -> None:
    """Write ``key``'s 32-byte seed to ``path`` as std base64 plus a newline, mode 0600.

    The file's mode is set to 0600 before the secret is written, including when it already
    existed with a looser mode. A symlink at ``path`` is refused rather than followed.

    Args:
        key: the signing key to store.
        path: where to write it.
        overwrite: when false, refuse to replace an existing file.

    Raises:
        FileExistsError: ``overwrite`` is false and ``path`` exists.
        OSError: the file could not be written (or ``path`` is a symlink).
    """
    if not isinstance(key, SigningKey):
        raise TypeError(f"expected a nacl.signing.SigningKey, got {type(key).__name__}")
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= os.O_TRUNC if overwrite else os.O_EXCL
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        if hasattr(os, "fchmod"):
            # O_CREAT's mode only applies to a new file; an existing one keeps its old bits.
            os.fchmod(f.fileno(), 0o600)
        f.write(base64.b64encode(bytes(key)) + b"\n")


def load_signing_key(path: PathLike) -> SigningKey:
    """Read a signing key written by :func:`save_signing_key`.

    Args:
        path: the key file: std base64 of a 32-byte ed25519 seed, surrounding whitespace allowed.

    Returns:
        The signing key.

    Raises:
        SignatureError: the file is readable or writable by group/other (``reason`` is
            ``"insecure_key_file"``; fix with ``chmod 600``), or it does not hold the base64 of
            exactly 32 bytes (``reason`` is ``"malformed"``).
        OSError: the file cannot be opened.
    """
    name = os.fspath(path)
    with open(path, "rb") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if os.name == "posix" and mode & 0o077:
            raise SignatureError(
                f"signing key file {name!r} has mode {mode:04o}: group/other can access the "
                f"private key; it must be 0600. Fix it with `chmod 600 {shlex.quote(name)}` "
                f"(and consider the key leaked if others could read it)",
                reason="insecure_key_file",
            )
        data = f.read(_MAX_KEY_FILE_BYTES + 1)
    seed = None if len(data) > _MAX_KEY_FILE_BYTES else _b64decode_exact(data.strip(), _SEED_BYTES)
    if seed is None:
        raise SignatureError(
            f"signing key file {name!r} does not hold a key: expected the std base64 of a "
            f"{_SEED_BYTES}-byte ed25519 seed (as written by save_signing_key)",
            reason="malformed",
        )
    return SigningKey(seed)


def public_key_b64(key: SigningKey | VerifyKey) -> str:
    """The std base64 of a key's 32-byte public key (what ``Backbeat-Key`` carries)."""
    verify_key = key.verify_key if isinstance(key, SigningKey) else key
    return _b64encode(bytes(verify_key))


# --- keyring -------------------------------------------------------------------------------------


def _to_verify_key(agent_id: str, value: object) -> VerifyKey:
    if isinstance(value, VerifyKey):
        return value
    if isinstance(value, SigningKey):
        raise SignatureError(
            f"the key for agent {agent_id!r} is a private SigningKey; a keyring holds public "
            f"keys only: pass key.verify_key",
            reason="malformed",
        )
    raw: bytes | None
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if len(raw) != _PUBLIC_KEY_BYTES:
            raw = None
    elif isinstance(value, str):
        raw = _b64decode_exact(value.strip(), _PUBLIC_KEY_BYTES)
    else:
        raise SignatureError(
            f"the key for agent {agent_id!r} must be a VerifyKey, 32 raw bytes or their std "
            f"base64, got {type(value).__name__}",
            reason="malformed",
        )
    if raw is None:
        raise SignatureError(
            f"the key for agent {agent_id!r} is not an ed25519 public key: expected 32 raw "
            f"bytes or their std base64, got {value!r}",
            reason="malformed",
        )
    return VerifyKey(raw)


class Keyring:
    """The public keys a verifier trusts: ``agent_id -> ed25519 public key``.

    Args:
        mapping: initial entries; a value may be a :class:`nacl.signing.VerifyKey`, the 32 raw
            public-key bytes or their std base64.

    Raises:
        ConfigError: an agent id breaks SPEC's id rule.
        SignatureError: a key is not an ed25519 public key (``reason`` is ``"malformed"``).
    """

    __slots__ = ("_b64", "_keys", "_owners")
    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __init__(self, mapping: Mapping[str, KeyLike] | None = None) -> None:
        self._keys: dict[str, VerifyKey] = {}
        self._b64: dict[str, str] = {}
        # public key bytes -> agent id, so a wrong-key error can say whose key it was
        self._owners: dict[bytes, str] = {}
        for agent_id, key in (mapping or {}).items():
            self.add(agent_id, key)

    @classmethod
    def load(cls, path: PathLike) -> Keyring:
        """Read a keyring from a TOML file with an ``[agents]`` table of base64 public keys.

        Raises:
            SignatureError: the file is not TOML, has no ``[agents]`` table, or an entry is not a
                base64 public key (``reason`` is ``"malformed"``).
            ConfigError: an agent id breaks SPEC's id rule.
            OSError: the file cannot be read.
        """
        name = os.fspath(path)
        with open(path, "rb") as f:
            raw = f.read(_MAX_KEYRING_BYTES + 1)
        if len(raw) > _MAX_KEYRING_BYTES:
            raise SignatureError(
                f"keyring {name!r} is larger than {_MAX_KEYRING_BYTES} bytes", reason="malformed"
            )
        try:
            data = decode_toml(raw, "keyring")
        except WireError as exc:
            raise SignatureError(
                f"keyring {name!r} is not valid TOML ({exc})", reason="malformed"
            ) from exc
        agents = data.get("agents")
        if not isinstance(agents, dict):
            raise SignatureError(
                f"keyring {name!r} has no [agents] table: expected lines like "
                f'`agent-7 = "<base64 public key>"` under `[agents]`',
                reason="malformed",
            )
        ring = cls()
        for agent_id, value in agents.items():
            if not isinstance(value, str):
                raise SignatureError(
                    f"keyring {name!r}: [agents] {agent_id!r} must be a base64 string, "
                    f"got {type(value).__name__}",
                    reason="malformed",
                )
            try:
                ring.add(agent_id, value)
            except ConfigError as exc:
                raise ConfigError(f"keyring {name!r} [agents]", str(exc)) from exc
            except SignatureError as exc:
                raise SignatureError(f"keyring {name!r}: {exc}", reason=exc.reason) from exc
        return ring

    def to_toml(self) -> str:
        """The keyring as TOML (agents sorted by id); :meth:`load` reads it back."""
        # ids are [A-Za-z0-9_-] (TOML bare keys) and base64 needs no escaping in a basic string
        lines = [f'{agent_id} = "{self._b64[agent_id]}"' for agent_id in sorted(self._b64)]
        return "[agents]\n" + "".join(line + "\n" for line in lines)

    def save(self, path: PathLike) -> None:
        """Write :meth:`to_toml` to ``path`` (public keys: no special file mode)."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_toml())

    def add(self, agent_id: str, key: KeyLike) -> None:
        """Trust ``key`` for ``agent_id``, replacing any key it had (key rotation).

        Raises:
            ConfigError: ``agent_id`` breaks SPEC's id rule.
            SignatureError: ``key`` is not an ed25519 public key (``reason`` is ``"malformed"``).
        """
        validate_id("agent_id", agent_id)
        verify_key = _to_verify_key(agent_id, key)
        old = self._keys.get(agent_id)
        if old is not None and self._owners.get(bytes(old)) == agent_id:
            del self._owners[bytes(old)]
        raw = bytes(verify_key)
        self._keys[agent_id] = verify_key
        self._b64[agent_id] = _b64encode(raw)
        self._owners[raw] = agent_id

    def get(self, agent_id: str) -> VerifyKey | None:
        """The key trusted for ``agent_id``, or ``None``."""
        return self._keys.get(agent_id)

    def public_key_b64(self, agent_id: str) -> str | None:
        """The std base64 of the key trusted for ``agent_id``, or ``None``."""
        return self._b64.get(agent_id)

    def owner_of(self, key: KeyLike) -> str | None:
        """The agent ``key`` belongs to on this keyring; ``None`` if none (or malformed)."""
        if isinstance(key, str):
            raw = _b64decode_exact(key.strip(), _PUBLIC_KEY_BYTES)
        else:
            raw = bytes(key)
        return None if raw is None else self._owners.get(raw)

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Keyring):
            return NotImplemented
        return self._b64 == other._b64

    def __repr__(self) -> str:
        n = len(self._keys)
        return f"<Keyring {n} agent{'' if n == 1 else 's'}>"


# --- signing -------------------------------------------------------------------------------------


class Signer:
    """Signs claim bodies for one agent; the public key's base64 is computed once.

    Args:
        key: the agent's signing key.
        agent_id: the agent the headers name.

    Raises:
        ConfigError: ``agent_id`` breaks SPEC's id rule.
    """

    __slots__ = ("_secret", "agent_id", "public_key_b64")

    def __init__(self, key: SigningKey, agent_id: str) -> None:
        if not isinstance(key, SigningKey):
            raise TypeError(f"expected a nacl.signing.SigningKey, got {type(key).__name__}")
        self.agent_id = validate_id("agent_id", agent_id)
        # libsodium's 64-byte secret key, so signing skips SigningKey.sign's extra copies
        public, self._secret = nacl.bindings.crypto_sign_seed_keypair(bytes(key))
        self.public_key_b64 = _b64encode(public)

    def __repr__(self) -> str:
        return f"<Signer agent_id={self.agent_id!r} key={self.public_key_b64}>"

    def sign(self, body: bytes) -> bytes:
        """The 64-byte detached ed25519 signature of ``body``."""
        return _sign_detached(body, self._secret)

    def headers(self, body: bytes) -> dict[str, str]:
        """The ``Backbeat-Agent``/``Backbeat-Key``/``Backbeat-Sig`` headers for ``body``."""
        return {
            HEADER_AGENT: self.agent_id,
            HEADER_KEY: self.public_key_b64,
            HEADER_SIG: _b64encode(_sign_detached(body, self._secret)),
        }


_signers: weakref.WeakKeyDictionary[SigningKey, Signer] = weakref.WeakKeyDictionary()


def sign_headers(key: SigningKey, agent_id: str, body: bytes) -> dict[str, str]:
    """Sign ``body`` (the exact bytes to publish) and return the three signature headers.

    Callers on a hot path can hold a :class:`Signer` instead; this keeps one per key.

    Raises:
        ConfigError: ``agent_id`` breaks SPEC's id rule.
    """
    signer = _signers.get(key)
    if signer is None or signer.agent_id != agent_id:
        signer = _signers[key] = Signer(key, agent_id)
    return signer.headers(body)


# --- verification --------------------------------------------------------------------------------


class ReplayCache:
    """Bounded memory of accepted ``(agent_id, hlc)`` pairs; the oldest entries are evicted.

    Stamps are compared parsed (other implementations write other widths). So that eviction does
    not reopen the door to replays, the cache keeps, per agent, the newest stamp it has evicted
    and treats anything at or below it as seen: an agent's HLC only moves forward, so a genuine
    new claim is never that old.

    Args:
        max_entries: how many pairs to remember (and how many agents' eviction floors).
    """

    __slots__ = ("_floors", "_order", "_seen", "max_entries")

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._seen: set[tuple[str, HLCStamp]] = set()
        self._order: deque[tuple[str, HLCStamp]] = deque()
        self._floors: OrderedDict[str, HLCStamp] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def __repr__(self) -> str:
        return f"<ReplayCache {len(self._seen)}/{self.max_entries}>"

    def seen(self, agent_id: str, hlc: str | HLCStamp) -> bool:
        """True when ``(agent_id, hlc)`` was accepted before (or is older than what was evicted).

        Raises:
            WireError: ``hlc`` is a string that does not parse.
        """
        stamp = hlc if isinstance(hlc, HLCStamp) else HLCStamp.parse(hlc)
        if (agent_id, stamp) in self._seen:
            return True
        floor = self._floors.get(agent_id)
        return floor is not None and stamp <= floor

    def add(self, agent_id: str, hlc: str | HLCStamp) -> None:
        """Remember ``(agent_id, hlc)`` as accepted.

        Raises:
            WireError: ``hlc`` is a string that does not parse.
        """
        stamp = hlc if isinstance(hlc, HLCStamp) else HLCStamp.parse(hlc)
        entry = (agent_id, stamp)
        if entry in self._seen:
            return
        self._seen.add(entry)
        self._order.append(entry)
        if len(self._order) > self.max_entries:
            old = self._order.popleft()
            self._seen.discard(old)
            old_agent, old_stamp = old
            floor = self._floors.get(old_agent)
            if floor is None or old_stamp > floor:
                self._floors[old_agent] = old_stamp
            self._floors.move_to_end(old_agent)
            if len(self._floors) > self.max_entries:
                self._floors.popitem(last=False)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # NATS keeps header case as written; a peer may write any case, so fall back to a scan
    value = headers.get(name)
    if value is not None:
        return value
    lname = name.lower()
    for key, value in headers.items():
        if key.lower() == lname:
            return value
    return None


def _check_signature(
    body: bytes, headers: Mapping[str, str], sig_b64: str, agent_id: str, keyring: Keyring
) -> None:
    header_agent = _header(headers, HEADER_AGENT)
    if header_agent is None:
        raise SignatureError(
            f"signed claim from agent {agent_id!r} has no {HEADER_AGENT} header",
            reason="malformed",
        )
    if header_agent != agent_id:
        raise SignatureError(
            f"{HEADER_AGENT} header {header_agent!r} does not match the claim's agent_id "
            f"{agent_id!r}",
            reason="agent_mismatch",
        )
    verify_key = keyring.get(agent_id)
    if verify_key is None:
        raise SignatureError(
            f"unknown agent {agent_id!r}: it is not on the keyring ({keyring!r})",
            reason="unknown_agent",
        )
    header_key = _header(headers, HEADER_KEY)
    # fast path: the canonical base64 of the trusted key; only a mismatch is decoded
    if header_key is not None and header_key != keyring.public_key_b64(agent_id):
        raw = _b64decode_exact(header_key, _PUBLIC_KEY_BYTES)
        if raw is None:
            raise SignatureError(
                f"{HEADER_KEY} header of agent {agent_id!r} is not the std base64 of a 32-byte "
                f"public key: {header_key!r}",
                reason="malformed",
            )
        if raw != bytes(verify_key):
            owner = keyring.owner_of(raw)
            whose = f" (it is the key of agent {owner!r})" if owner else ""
            raise SignatureError(
                f"claim from agent {agent_id!r} was signed with key {header_key}{whose}, which is "
                f"not the key on the keyring for agent {agent_id!r}",
                reason="wrong_key",
            )
    signature = _b64decode_exact(sig_b64, _SIGNATURE_BYTES)
    if signature is None:
        raise SignatureError(
            f"{HEADER_SIG} header of agent {agent_id!r} is not the std base64 of a 64-byte "
            f"signature: {sig_b64!r}",
            reason="malformed",
        )
    try:
        verify_key.verify(body, signature)
    except BadSignatureError as exc:
        raise SignatureError(
            f"bad signature: the claim from agent {agent_id!r} does not verify with its "
            f"keyring key (forged, altered in transit, or signed over different bytes)",
            reason="bad_signature",
        ) from exc


def verify_claim(
    body: bytes | bytearray | memoryview,
    headers: Mapping[str, str] | None,
    keyring: Keyring,
    *,
    allow_unsigned: bool = False,
    replay_cache: ReplayCache | None = None,
    max_wall_ms: int | None = None,
) -> StatusClaim:
    """Decode a received claim and check its signature (over the exact ``body``) and freshness.

    A claim without a ``Backbeat-Sig`` header is unsigned. A signed claim is always verified in
    full, even when ``allow_unsigned`` is set: a signature that is present but wrong is an attack
    or a misconfiguration, not an unsigned claim.

    Args:
        body: the message payload exactly as received.
        headers: the message headers (names matched in any case), or ``None``.
        keyring: the keys this verifier trusts.
        allow_unsigned: accept claims that carry no signature.
        replay_cache: when given, refuse an ``(agent_id, hlc)`` already accepted, and record
            this one once it is accepted.
        max_wall_ms: when given, refuse a claim whose HLC wall time (POSIX milliseconds) is
            past it: a verifier passes its own wall clock plus the clock skew it accepts, so
            that no claim can stand for "the latest" long after it was made.

    Returns:
        The decoded claim.

    Raises:
        WireError: ``body`` is not a valid StatusClaim.
        SignatureError: the claim is rejected; ``reason`` is one of ``"unsigned"``,
            ``"agent_mismatch"``, ``"unknown_agent"``, ``"wrong_key"``, ``"malformed"``,
            ``"bad_signature"``, ``"future"`` or ``"replay"``.
    """
    if not isinstance(body, bytes):
        body = bytes(body)
    claim = decode_claim(body)
    headers = headers if headers is not None else {}
    sig_b64 = _header(headers, HEADER_SIG)
    if sig_b64 is not None:
        _check_signature(body, headers, sig_b64, claim.agent_id, keyring)
    elif not allow_unsigned:
        raise SignatureError(
            f"unsigned claim from agent {claim.agent_id!r} (no {HEADER_SIG} header) and this "
            f"verifier does not accept unsigned claims",
            reason="unsigned",
        )
    if replay_cache is None and max_wall_ms is None:
        return claim
    stamp = HLCStamp.parse(claim.hlc)
    if max_wall_ms is not None and stamp.l > max_wall_ms:
        raise SignatureError(
            f"claim from agent {claim.agent_id!r} is stamped {stamp.l - max_wall_ms} ms past "
            f"the clock skew this verifier accepts (hlc {claim.hlc})",
            reason="future",
        )
    if replay_cache is not None:
        if replay_cache.seen(claim.agent_id, stamp):
            raise SignatureError(
                f"replay: a claim from agent {claim.agent_id!r} with hlc {claim.hlc} was already "
                f"accepted",
                reason="replay",
            )
        replay_cache.add(claim.agent_id, stamp)
    return claim
