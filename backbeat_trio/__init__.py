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

from ._beats import bar_start as bar_start
from ._beats import beat_duration as beat_duration
from ._beats import from_legacy as from_legacy
from ._beats import is_downbeat as is_downbeat
from ._beats import phase_for as phase_for
from ._beats import to_legacy as to_legacy
from ._beats import window_id as window_id
from ._channel import DropOldestChannel as DropOldestChannel
from ._client import Client as Client
from ._client import ClientMetrics as ClientMetrics
from ._client import UndeliveredClaims as UndeliveredClaims
from ._client import open_client as open_client
from ._config import Config as Config
from ._embedded import NatsCluster as NatsCluster
from ._embedded import NatsServerProcess as NatsServerProcess
from ._embedded import open_embedded_nats as open_embedded_nats
from ._errors import BackbeatError as BackbeatError
from ._errors import BeatBudgetExceeded as BeatBudgetExceeded
from ._errors import ConfigError as ConfigError
from ._errors import InvalidStatusClaim as InvalidStatusClaim
from ._errors import NotConnected as NotConnected
from ._errors import SignatureError as SignatureError
from ._errors import WireError as WireError
from ._ha import HAPulseConfig as HAPulseConfig
from ._ha import HAPulseStatus as HAPulseStatus
from ._ha import LeaseStatus as LeaseStatus
from ._ha import run_ha_pulse as run_ha_pulse
from ._ha import run_local_cluster as run_local_cluster
from ._history import ensure_bar_stream as ensure_bar_stream
from ._history import last_reported_window as last_reported_window
from ._history import replay_bars as replay_bars
from ._hlc import HLC as HLC
from ._hlc import HLCStamp as HLCStamp
from ._pulse import PulseConfig as PulseConfig
from ._pulse import PulseStatus as PulseStatus
from ._pulse import run_pulse as run_pulse
from ._reverb import ReverbConfig as ReverbConfig
from ._reverb import ReverbStatus as ReverbStatus
from ._reverb import run_reverb as run_reverb
from ._signing import Keyring as Keyring
from ._signing import ReplayCache as ReplayCache
from ._signing import generate_signing_key as generate_signing_key
from ._signing import load_signing_key as load_signing_key
from ._signing import public_key_b64 as public_key_b64
from ._signing import save_signing_key as save_signing_key
from ._signing import sign_headers as sign_headers
from ._signing import verify_claim as verify_claim
from ._transport import NatsTransport as NatsTransport
from ._transport import NatsTransportView as NatsTransportView
from ._transport import open_nats_transport as open_nats_transport
from ._wire import BarIssue as BarIssue
from ._wire import BarReport as BarReport
from ._wire import BeatFrame as BeatFrame
from ._wire import HealthStatus as HealthStatus
from ._wire import LegacyBeatInfo as LegacyBeatInfo
from ._wire import StatusClaim as StatusClaim
from ._wire import TempoChange as TempoChange

__version__ = "0.1.0"

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
    "DropOldestChannel",
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
    "PulseConfig",
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
    "run_local_cluster",
    "run_pulse",
    "run_reverb",
    "save_signing_key",
    "sign_headers",
    "to_legacy",
    "verify_claim",
    "window_id",
]
