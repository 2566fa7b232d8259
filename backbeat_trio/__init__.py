"""backbeat_trio — trio-native SDK and services for BACKBEAT, beat synchronisation over NATS.

Quick start::

    import backbeat_trio as bb3

    cfg = bb3.Config(cluster_id="prod", agent_id="agent-7", nats_url="nats://127.0.0.1:4222")
    async with bb3.open_client(cfg) as bb:
        async for frame in bb.beats():
            ...

See ``README.md`` and ``docs/`` for the wire contract, guarantees and the services.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._bridge import open_nats_transport as open_nats_transport
from ._client.client import Client as Client
from ._client.client import ClientMetrics as ClientMetrics
from ._client.client import open_client as open_client
from ._client.config import Config as Config
from ._core.beats import bar_start as bar_start
from ._core.beats import beat_duration as beat_duration
from ._core.beats import is_downbeat as is_downbeat
from ._core.beats import phase_for as phase_for
from ._core.beats import window_id as window_id
from ._core.hlc import HLC as HLC
from ._core.hlc import HLCStamp as HLCStamp
from ._core.legacy import from_legacy as from_legacy
from ._core.legacy import to_legacy as to_legacy
from ._core.signing import Keyring as Keyring
from ._core.signing import ReplayCache as ReplayCache
from ._core.signing import generate_signing_key as generate_signing_key
from ._core.signing import load_signing_key as load_signing_key
from ._core.signing import public_key_b64 as public_key_b64
from ._core.signing import save_signing_key as save_signing_key
from ._core.signing import sign_headers as sign_headers
from ._core.signing import verify_claim as verify_claim
from ._core.wire import BarIssue as BarIssue
from ._core.wire import BarReport as BarReport
from ._core.wire import BeatFrame as BeatFrame
from ._core.wire import HealthStatus as HealthStatus
from ._core.wire import LegacyBeatInfo as LegacyBeatInfo
from ._core.wire import StatusClaim as StatusClaim
from ._core.wire import TempoChange as TempoChange
from ._embedded import NatsCluster as NatsCluster
from ._embedded import NatsServerProcess as NatsServerProcess
from ._embedded import open_embedded_nats as open_embedded_nats
from ._errors import BackbeatError as BackbeatError
from ._errors import BeatBudgetExceeded as BeatBudgetExceeded
from ._errors import ConfigError as ConfigError
from ._errors import EmbeddedServerError as EmbeddedServerError
from ._errors import InvalidStatusClaim as InvalidStatusClaim
from ._errors import NotConnected as NotConnected
from ._errors import NotUnderTrio as NotUnderTrio
from ._errors import PulseConflict as PulseConflict
from ._errors import SignatureError as SignatureError
from ._errors import UndeliveredClaims as UndeliveredClaims
from ._errors import WireError as WireError
from ._ops import client_collector as client_collector
from ._ops import serve_admin as serve_admin
from ._services.ha_pulse import HAPulseConfig as HAPulseConfig
from ._services.ha_pulse import HAPulseStatus as HAPulseStatus
from ._services.ha_pulse import run_ha_pulse as run_ha_pulse
from ._services.history import ensure_bar_stream as ensure_bar_stream
from ._services.history import last_reported_window as last_reported_window
from ._services.history import replay_bars as replay_bars
from ._services.lease import LeaseStatus as LeaseStatus
from ._services.pulse import PulseConfig as PulseConfig
from ._services.pulse import PulseStatus as PulseStatus
from ._services.pulse import run_pulse as run_pulse
from ._services.reverb import ReverbConfig as ReverbConfig
from ._services.reverb import ReverbStatus as ReverbStatus
from ._services.reverb import run_reverb as run_reverb
from ._transport.options import ConnectionOptions as ConnectionOptions
from ._util.channel import DropOldestChannel as DropOldestChannel
from ._version import __version__ as __version__

if TYPE_CHECKING:
    from ._bridge.nats import NatsTransport as NatsTransport
    from ._bridge.nats import NatsTransportView as NatsTransportView


def __getattr__(name: str) -> Any:
    # the bridge's classes load asyncio, trio-asyncio and nats-py: only when asked for
    if name in ("NatsTransport", "NatsTransportView"):
        from ._bridge import nats

        return getattr(nats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HLC",
    "BackbeatError",
    "BarIssue",
    "BarReport",
    "BeatBudgetExceeded",
    "BeatFrame",
    "Client",
    "ClientMetrics",
    "Config",
    "ConfigError",
    "ConnectionOptions",
    "DropOldestChannel",
    "EmbeddedServerError",
    "HAPulseConfig",
    "HAPulseStatus",
    "HLCStamp",
    "HealthStatus",
    "InvalidStatusClaim",
    "Keyring",
    "LeaseStatus",
    "LegacyBeatInfo",
    "NatsCluster",
    "NatsServerProcess",
    "NatsTransport",
    "NatsTransportView",
    "NotConnected",
    "NotUnderTrio",
    "PulseConfig",
    "PulseConflict",
    "PulseStatus",
    "ReplayCache",
    "ReverbConfig",
    "ReverbStatus",
    "SignatureError",
    "StatusClaim",
    "TempoChange",
    "UndeliveredClaims",
    "WireError",
    "bar_start",
    "beat_duration",
    "client_collector",
    "ensure_bar_stream",
    "from_legacy",
    "generate_signing_key",
    "is_downbeat",
    "last_reported_window",
    "load_signing_key",
    "open_client",
    "open_embedded_nats",
    "open_nats_transport",
    "phase_for",
    "public_key_b64",
    "replay_bars",
    "run_ha_pulse",
    "run_pulse",
    "run_reverb",
    "save_signing_key",
    "serve_admin",
    "sign_headers",
    "to_legacy",
    "verify_claim",
    "window_id",
]
