"""The cluster and connection options, and the one place the CLI builds connection settings.

Every command that talks to NATS takes ``-s/--nats-url`` and ``-c/--cluster`` (:func:`conn_parent`);
NATS credentials and TLS files come from the ``BACKBEAT_*`` variables that
:meth:`backbeat_trio.Config.from_env` reads. :func:`connection_kwargs` turns both into keyword
arguments named as :class:`~backbeat_trio.Config`'s fields; :func:`client_config` and
:func:`service_connection_kwargs` (for ``PulseConfig``/``HAPulseConfig``/``ReverbConfig``) both
start from it.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Final

from .._client.config import Config
from .common import env

__all__ = [
    "CONNECTION_ENV",
    "DEFAULT_CLUSTER",
    "DEFAULT_NATS_URL",
    "SERVICE_CONNECTION_FIELDS",
    "agent_parent",
    "client_config",
    "conn_parent",
    "connection_kwargs",
    "service_connection_kwargs",
]

DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"
DEFAULT_CLUSTER: Final = "default"

#: Config's credential and TLS fields and the variables they are read from (as ``from_env``).
CONNECTION_ENV: Final = {
    "token": "BACKBEAT_NATS_TOKEN",
    "user": "BACKBEAT_NATS_USER",
    "password": "BACKBEAT_NATS_PASSWORD",
    "creds_file": "BACKBEAT_NATS_CREDS",
    "tls_ca_file": "BACKBEAT_TLS_CA",
    "tls_cert_file": "BACKBEAT_TLS_CERT",
    "tls_key_file": "BACKBEAT_TLS_KEY",
}

#: The connection fields the services' configs take today. When PulseConfig, HAPulseConfig and
#: ReverbConfig take every connection field of Config, :func:`service_connection_kwargs` returns
#: :func:`connection_kwargs` whole (drop this filter).
SERVICE_CONNECTION_FIELDS: Final = frozenset(
    {"nats_url", "token", "user", "password", "tls_ca_file"}
)


def conn_parent() -> argparse.ArgumentParser:
    """The ``cluster and connection`` options: ``-s/--nats-url`` and ``-c/--cluster``."""
    conn = argparse.ArgumentParser(add_help=False)
    group = conn.add_argument_group("cluster and connection")
    group.add_argument(
        "-s",
        "--nats-url",
        metavar="URL",
        default=env("BACKBEAT_NATS_URL", DEFAULT_NATS_URL),
        help="NATS server URL(s), comma separated (env BACKBEAT_NATS_URL)",
    )
    group.add_argument(
        "-c",
        "--cluster",
        metavar="ID",
        default=env("BACKBEAT_CLUSTER_ID", DEFAULT_CLUSTER),
        help="cluster id (env BACKBEAT_CLUSTER_ID)",
    )
    return conn


def agent_parent() -> argparse.ArgumentParser:
    """The ``-a/--agent`` option."""
    agent = argparse.ArgumentParser(add_help=False)
    agent.add_argument(
        "-a",
        "--agent",
        metavar="ID",
        default=env("BACKBEAT_AGENT_ID"),
        help="agent id (env BACKBEAT_AGENT_ID)",
    )
    return agent


def connection_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """NATS connection settings as Config's keyword arguments: ``--nats-url`` plus the
    credential and TLS variables that are set (blank counts as unset)."""
    kw: dict[str, Any] = {"nats_url": args.nats_url}
    for field, var in CONNECTION_ENV.items():
        value = env(var)
        if value is not None:
            kw[field] = value
    return kw


def service_connection_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`connection_kwargs` for ``PulseConfig``, ``HAPulseConfig`` and ``ReverbConfig``."""
    return {k: v for k, v in connection_kwargs(args).items() if k in SERVICE_CONNECTION_FIELDS}


def _env_without_key() -> dict[str, str]:
    # the CLI handles the key file itself (--key wins over BACKBEAT_SIGNING_KEY)
    return {k: v for k, v in os.environ.items() if k != "BACKBEAT_SIGNING_KEY"}


def client_config(args: argparse.Namespace, agent_id: str, **overrides: Any) -> Config:
    """A client Config: command-line values over ``BACKBEAT_*`` variables over defaults."""
    return Config.from_env(
        _env_without_key(),
        cluster_id=args.cluster,
        agent_id=agent_id,
        **(connection_kwargs(args) | overrides),
    )
