"""How the reverb judges a claim, and what it hands out for each one it accepted.

:class:`ClaimJudge` verifies a claim from the wire (signature against the keyring, unsigned
claims only when allowed, the clock-skew bound, replay); :class:`AcceptedClaim` is what
:meth:`~backbeat_trio._services.reverb.ReverbStatus.watch_claims` hands to a watcher (the
dashboard) for every claim that passed and that the aggregator took in (counted in a window,
or late): nothing the reverb refused ever reaches a watcher.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from .._core.hlc import HLC
from .._core.signing import HEADER_SIG, Keyring, ReplayCache, verify_claim
from .._core.wire import StatusClaim

__all__ = ["AcceptedClaim", "ClaimJudge"]

_SIG_HEADER: Final = HEADER_SIG.lower()


@dataclass(frozen=True, slots=True)
class AcceptedClaim:
    """A claim a reverb accepted (verified, counted or late), as ``watch_claims`` hands it out.

    Attributes:
        claim: the claim.
        signed: True only when its signature verified against the keyring's key for
            ``claim.agent_id`` (False: an unsigned claim, accepted with ``allow_unsigned``).
        key: that keyring key (std base64) when ``signed``, else ``""``.
        wall: the reverb's wall clock when it accepted the claim (POSIX seconds).
    """

    claim: StatusClaim
    signed: bool
    key: str
    wall: float


@dataclass(frozen=True, slots=True)
class ClaimJudge:
    """What a claim is verified against: the keyring, the replay memory and the clock."""

    keyring: Keyring
    allow_unsigned: bool
    replay: ReplayCache
    hlc: HLC
    wall_clock: Callable[[], float]

    def verify(self, data: bytes, headers: Mapping[str, str] | None) -> StatusClaim:
        # the skew bound is the reverb HLC's: a stamp it would not adopt is not accepted either;
        # stamps are in the agents' (real) wall clock, so this is too, whatever wall_clock is
        return verify_claim(
            data,
            headers,
            self.keyring,
            allow_unsigned=self.allow_unsigned,
            replay_cache=self.replay,
            max_wall_ms=time.time_ns() // 1_000_000 + self.hlc.max_forward_ms,
        )

    def accepted(self, claim: StatusClaim, headers: Mapping[str, str] | None) -> AcceptedClaim:
        # verify() passed: a signature header present means the signature verified
        signed = bool(headers) and any(name.lower() == _SIG_HEADER for name in headers or ())
        key = (self.keyring.public_key_b64(claim.agent_id) or "") if signed else ""
        return AcceptedClaim(claim=claim, signed=signed, key=key, wall=self.wall_clock())
