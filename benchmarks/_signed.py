"""Pre-signed claims for the reverb-ingest benchmark (9): N agents with fixed keys, M beats each.

Every process of the benchmark builds the same agents from their index (the key is derived from
it), so the reverb worker's keyring trusts exactly the keys the publisher worker signs with. Each
claim is made as an agent's outbox makes it: stamped by the agent's own HLC, encoded with
``encode_claim``, signed by a ``Signer`` over the exact body, with its ``Nats-Msg-Id``.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from nacl.signing import SigningKey

from backbeat_trio._core.hlc import HLC
from backbeat_trio._core.outbox import claim_msg_id
from backbeat_trio._core.signing import HEADER_SIG, Keyring, Signer
from backbeat_trio._core.wire import StatusClaim, encode_claim


@dataclass(frozen=True, slots=True)
class SignedClaim:
    """One claim as published: its body and headers, and what a bare verify loop needs."""

    body: bytes
    headers: dict[str, str]
    public: bytes  # the signer's 32-byte public key
    signed_message: bytes  # signature + body, what ``crypto_sign_open`` takes


def agent_id(i: int) -> str:
    """The id of agent ``i``."""
    return f"ingest-{i:05d}"


def signing_key(i: int) -> SigningKey:
    """Agent ``i``'s key (derived from ``i``: a benchmark fixture, not a secret)."""
    return SigningKey(hashlib.sha256(f"backbeat-bench-ingest-{i}".encode()).digest())


def keyring(n: int) -> Keyring:
    """The keyring a reverb trusts agents ``0..n-1`` with."""
    return Keyring({agent_id(i): signing_key(i).verify_key for i in range(n)})


def make_claims(n: int, beats: int, first_beat: int) -> list[SignedClaim]:
    """``n`` agents' claims for beats ``first_beat .. first_beat + beats - 1``, beat by beat
    (the order they would arrive in), every agent one claim per beat."""
    ids = [agent_id(i) for i in range(n)]
    agents = [(aid, Signer(signing_key(i), aid), HLC(aid)) for i, aid in enumerate(ids)]
    publics = [bytes(signing_key(i).verify_key) for i in range(n)]
    out: list[SignedClaim] = []
    for m in range(beats):
        last = m == beats - 1
        for (aid, signer, hlc), public in zip(agents, publics, strict=True):
            stamp = str(hlc.now())
            claim = StatusClaim(
                agent_id=aid,
                task_id=f"task:{aid}",
                beat_index=first_beat + m,
                hlc=stamp,
                state="review" if last else "executing",
                beats_left=beats - 1 - m,
                progress=round(m / beats, 3),
                notes="",
            )
            body = encode_claim(claim)
            headers = signer.headers(body)
            headers["Nats-Msg-Id"] = claim_msg_id(aid, stamp, body, headers[HEADER_SIG])
            signature = base64.b64decode(headers[HEADER_SIG])
            out.append(SignedClaim(body, headers, public, signature + body))
    return out
