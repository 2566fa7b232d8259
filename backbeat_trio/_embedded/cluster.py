"""A local cluster of embedded nats-servers, routed to each other."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Self

from .._errors import ConfigError, EmbeddedServerError
from .process import AUTO_PORT, HOST, POLL_INTERVAL_S, NatsServerProcess, http_get_json


class NatsCluster:
    """``size`` nats-servers on 127.0.0.1 routed into one cluster (JetStream clustered by default).

    Each member gets its own client port, route port, store directory and server name
    (``<name>-n1``...); nats-server chooses the ports at the first :meth:`start` and members keep
    them across restarts. :meth:`start` returns once every member routes to every other one and
    (with JetStream) each reports healthy, which requires an elected meta leader.

    Args:
        size: number of servers (>= 1).
        jetstream: enable clustered JetStream.
        name: the cluster name (also the server-name prefix).
        token: client token required by every member.
        startup_timeout: seconds :meth:`start` waits for the cluster to form.

    Raises:
        ConfigError: ``size`` < 1.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        jetstream: bool = True,
        name: str = "backbeat",
        token: str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        if size < 1:
            raise ConfigError("size", f"a cluster needs at least one server, got {size}")
        self.size = size
        self.name = name
        self.startup_timeout = startup_timeout
        self.jetstream = jetstream
        self.servers: list[NatsServerProcess] = [
            NatsServerProcess(
                jetstream=jetstream,
                token=token,
                # one server is a cluster of one: clustered JetStream would refuse to start
                # without routes, so it runs plain
                cluster_name=name if size > 1 else None,
                cluster_port=AUTO_PORT if size > 1 else None,
                server_name=f"{name}-n{i + 1}",
                startup_timeout=startup_timeout,
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        """Every member's client URL."""
        return [s.url for s in self.servers]

    @property
    def url(self) -> str:
        """Every member's client URL, comma separated (what ``Config.nats_url`` accepts)."""
        return ",".join(self.urls)

    def __repr__(self) -> str:
        members = ", ".join(repr(s) for s in self.servers)
        return f"<NatsCluster {self.name} size={self.size} [{members}]>"

    def start(self) -> Self:
        """Start every member and wait until the cluster has formed.

        The first time, the members' route ports are not known yet, so they come up one after
        the other: each one's ports are learnt before the next is launched with routes to all
        earlier members. Clustered JetStream refuses to start without configured routes, which
        the first member cannot have yet, so with JetStream it first runs without and is then
        restarted on its learnt ports, with routes to all the others and JetStream. Later starts
        launch every stopped member at once on its known ports.

        Returns:
            self.

        Raises:
            EmbeddedServerError: a member failed or the cluster did not form in time; every
                member is stopped.
        """
        deadline = time.monotonic() + self.startup_timeout
        try:
            if any(s.cluster_port == AUTO_PORT for s in self.servers):
                self._launch_one_by_one(deadline)
            else:
                # Launch all first: a clustered JetStream member is not healthy until a quorum
                # is up.
                for server in self.servers:
                    if not server.running:
                        server.routes = self._routes_for(server)
                        server._launch()
            self.wait_formed(timeout=max(0.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def _routes_for(self, server: NatsServerProcess) -> tuple[str, ...]:
        return tuple(
            f"nats-route://{HOST}:{other.cluster_port}"
            for other in self.servers
            if other is not server and other.cluster_port not in (None, AUTO_PORT)
        )

    def _launch_one_by_one(self, deadline: float) -> None:
        first = self.servers[0]
        for server in self.servers:
            if server.running:
                raise EmbeddedServerError(f"{self!r}: a first start needs every member stopped")
            # routes to the members launched before this one (their ports are known by now)
            server.routes = self._routes_for(server)
            server._launch(jetstream=self.jetstream and server is not first)
            server._await_ports(timeout=max(0.0, deadline - time.monotonic()))
        for server in self.servers:
            server.routes = self._routes_for(server)  # all the others, as every restart uses
        if self.jetstream:
            # re-binds the ports it just let go of (retried if one is briefly taken)
            first.restart()

    def wait_formed(self, timeout: float | None = None) -> None:
        """Block until every running member routes to all others and reports healthy.

        Raises:
            EmbeddedServerError: not formed within ``timeout`` (default ``startup_timeout``).
        """
        limit = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        for server in self.servers:
            server.wait_ready(health=False, timeout=max(0.0, deadline - time.monotonic()))
        expected = len([s for s in self.servers if s.running]) - 1
        while True:
            pending = [s for s in self.servers if s.running and not self._formed(s, expected)]
            if not pending:
                return
            if time.monotonic() >= deadline:
                tails = "\n".join(f"--- {s!r} ---\n{s.log_tail(15)}" for s in pending)
                raise EmbeddedServerError(
                    f"cluster {self.name} did not form within {limit:g}s\n{tails}"
                )
            time.sleep(POLL_INTERVAL_S * 5)

    @staticmethod
    def _formed(server: NatsServerProcess, expected_peers: int) -> bool:
        try:
            status, routez = http_get_json(server.monitor_port, "routez")
            if status != 200:
                return False
            # Route pooling opens several connections per peer: count distinct peers.
            peers = {r.get("remote_id") for r in routez.get("routes") or [] if r.get("remote_id")}
            if len(peers) < expected_peers:
                return False
            status, _ = http_get_json(server.monitor_port, "healthz")
        except OSError:
            return False
        return status == 200

    def stop(self) -> None:
        """Stop every member (SIGTERM, bounded, then SIGKILL)."""
        for server in self.servers:
            server.stop()

    def close(self) -> None:
        """Stop every member and delete their directories."""
        for server in self.servers:
            server.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
