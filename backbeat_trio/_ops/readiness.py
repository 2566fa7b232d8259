"""Readiness (``GET /readyz``): whether the services behind an admin server do their job now.

Connected to NATS and, for a pulse, publishing (or, HA, following a leader that renews its
lease); for a reverb, hearing beats from the pulse. With several pulses or reverbs one doing
its job is enough.
"""

from __future__ import annotations

from typing import Final

import trio

from .._services.reverb import ReverbStatus
from .metrics import REVERB_QUIET_BEATS, PulseLike, Sources, pulse_parts, reverb_quiet_for

__all__ = ["READY_SLACK_S", "pulse_ready", "readiness", "reverb_ready"]

#: A publishing pulse is "ready" while its latest beat is at most two beats plus this old (and
#: a reverb while its latest beat from the pulse is at most ``REVERB_QUIET_BEATS`` plus this).
READY_SLACK_S: Final = 0.5
#: The beat length a reverb that has seen no beat yet measures its wait in.
UNKNOWN_BEAT_S: Final = 1.0


def readiness(src: Sources) -> tuple[bool, str]:
    """Whether the services in ``src`` are ready, and why (or why not)."""
    if src.transport is not None and not src.transport.connected:
        return False, "not connected to NATS"
    reasons: list[str] = []
    if src.pulses:
        verdicts = {pid: pulse_ready(st) for pid, st in dict(src.pulses).items()}
        if not any(ok for ok, _ in verdicts.values()):
            return False, "; ".join(f"{pid}: {why}" for pid, (_, why) in verdicts.items())
        reasons += [f"{pid}: {why}" for pid, (ok, why) in verdicts.items() if ok]
    if src.reverbs:
        now = trio.current_time()
        verdicts = {rid: reverb_ready(st, now) for rid, st in dict(src.reverbs).items()}
        if not any(ok for ok, _ in verdicts.values()):
            return False, "; ".join(f"{rid}: {why}" for rid, (_, why) in verdicts.items())
        reasons += [f"{rid}: {why}" for rid, (ok, why) in verdicts.items() if ok]
    return True, "; ".join(reasons) or "connected"


def pulse_ready(status: PulseLike) -> tuple[bool, str]:
    """Whether a pulse is ready (publishing a beat within two beats, or an HA follower whose
    leader renews its lease), and why."""
    st, ha = pulse_parts(status)
    now = trio.current_time()
    if ha is not None and not ha.leading:
        holder = ha.holder
        if holder is None or ha.lease_revision is None:
            return False, "no pulse holds the lease"
        if ha.released:
            return False, f"{holder} released the lease; nobody leads yet"
        if now >= ha.takeover_at:
            return False, f"the leader {holder} stopped renewing its lease"
        return True, f"following {holder}"
    if st.last_published_at is None:
        return False, "no beat published yet"
    quiet = now - st.last_published_at
    if quiet > 2 * 60.0 / max(st.tempo_bpm, 1) + READY_SLACK_S:
        return False, f"no beat published for {quiet:.1f} s"
    return True, "publishing"


def reverb_ready(status: ReverbStatus, now: float) -> tuple[bool, str]:
    """Whether a reverb is ready (a beat from the pulse within :data:`REVERB_QUIET_BEATS`
    beats: without one its reports are empty), and why."""
    role = "publishing" if status.publishing else "standby"
    quiet = reverb_quiet_for(status, now)
    if quiet is None:
        return True, role
    beat = status.beat_seconds or UNKNOWN_BEAT_S
    limit = REVERB_QUIET_BEATS * beat + READY_SLACK_S
    if status.last_beat_at is None:
        if quiet > limit:
            return False, f"no beat from the pulse since the reverb started {quiet:.1f} s ago"
        return True, f"{role}, waiting for the first beat"
    if quiet > limit:
        return False, (
            f"no beat from the pulse for {quiet:.1f} s ({quiet / beat:.0f} beats; not ready "
            f"after {REVERB_QUIET_BEATS}): its reports are empty"
        )
    return True, f"{role}, last beat {quiet:.1f} s ago"
