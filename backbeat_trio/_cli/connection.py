"""The cluster and connection options, and the one place the CLI builds connection settings.

Every command that talks to NATS takes ``-s/--nats-url`` and ``-c/--cluster`` (:func:`conn_parent`);
a command with a cluster of its own (``demo``, ``cluster``) spells it the same way
(:func:`add_cluster_option`), and ``--cluster-id`` is accepted everywhere as a hidden alias (the
``cluster`` command's old spelling). NATS credentials and TLS files come from the ``BACKBEAT_*``
variables that :meth:`backbeat_trio.Config.from_env` reads. :func:`connection_kwargs` turns
both into keyword arguments named as :class:`~backbeat_trio.Config`'s fields; :func:`client_config`
and :func:`connection_kwargs` (for ``PulseConfig``/``HAPulseConfig``/``ReverbConfig``) both start
from it.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any, Final

from .._client.config import Config
from .._transport.options import connection_kwargs_from_env
from .common import env

if TYPE_CHECKING:
    # what add_argument is called on: a parser or one of its option groups (typeshed's name)
    OptionContainer = argparse.ArgumentParser | argparse._ArgumentGroup

__all__ = [
    "DEFAULT_CLUSTER",
    "DEFAULT_NATS_URL",
    "add_cluster_option",
    "agent_parent",
    "client_config",
    "conn_parent",
    "connection_kwargs",
]

DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"
DEFAULT_CLUSTER: Final = "default"


def add_cluster_option(parser: OptionContainer, default: str | None, help_: str) -> None:
    """Add the cluster id option, ``-c/--cluster ID`` (``args.cluster``), to ``parser``.

    ``--cluster-id`` is accepted too but left out of ``--help``, so the help shows one spelling
    and a command line written for the ``cluster`` command's old option keeps working.
    """
    parser.add_argument(
        "-c", "--cluster", dest="cluster", metavar="ID", default=default, help=help_
    )
    # SUPPRESS as default: the alias never overwrites the default the visible option set
    parser.add_argument(
        "--cluster-id", dest="cluster", default=argparse.SUPPRESS, help=argparse.SUPPRESS
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
    add_cluster_option(
        group, env("BACKBEAT_CLUSTER_ID", DEFAULT_CLUSTER), "cluster id (env BACKBEAT_CLUSTER_ID)"
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
    """NATS connection settings as keyword arguments for any config (``Config``,
    ``PulseConfig``, ``HAPulseConfig``, ``ReverbConfig``: they share every connection field):
    the ``BACKBEAT_*`` connection variables that are set, with ``--nats-url`` over them."""
    return connection_kwargs_from_env() | {"nats_url": args.nats_url}


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
