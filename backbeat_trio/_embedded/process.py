"""One embedded nats-server process: start on ports it picks itself, kill, restart."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypedDict

from .._core.edge import decode_json
from .._errors import ConfigError, EmbeddedServerError, WireError
from .binary import find_nats_server

HOST: Final = "127.0.0.1"
POLL_INTERVAL_S: Final = 0.02
_PROBE_TIMEOUT_S: Final = 0.5
_PORT_RETRIES: Final = 3
_PORT_RETRY_BACKOFF_S: Final = 0.25
# nats-server's "choose a free port" value (0 would mean its default port).
AUTO_PORT: Final = -1
_LOG_NAME: Final = "nats-server.log"
_CONF_NAME: Final = "nats-server.conf"
_PORTS_GLOB: Final = "*.ports"

# Loopback probes must never go through an $http_proxy.
_NO_PROXY_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Servers still running when the interpreter exits are killed, so a crashed test run does not
# leave orphans holding ports.
_live: weakref.WeakSet[NatsServerProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:  # pragma: no cover - exercised only by interpreter exit
    for server in list(_live):
        try:
            server.kill()
        except OSError as exc:  # already gone, or not ours to signal: nothing left to clean up
            sys.stderr.write(f"backbeat_trio: could not kill {server!r} at exit: {exc}\n")


class NatsServerOptions(TypedDict, total=False):
    """Keyword options of :class:`NatsServerProcess` (for ``**options`` forwarding)."""

    jetstream: bool
    store_dir: str | os.PathLike[str] | None
    token: str | None
    user: str | None
    password: str | None
    tls_cert: str | os.PathLike[str] | None
    tls_key: str | os.PathLike[str] | None
    tls_ca: str | os.PathLike[str] | None
    tls_verify: bool
    cluster_name: str | None
    cluster_port: int | None
    routes: Sequence[str]
    server_name: str | None
    extra_args: Sequence[str]
    extra_config: str
    startup_timeout: float


def _quote(value: str | os.PathLike[str]) -> str:
    # A JSON string literal is a valid double-quoted nats-server config string ("\"", "\\"
    # escapes), and quoting keeps "$" from being read as a variable reference.
    return json.dumps(os.fspath(value))


def _tcp_accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _url_port(urls: object) -> int | None:
    # The ports file lists URLs per listener, e.g. {"nats": ["nats://127.0.0.1:4222"], ...}.
    if not isinstance(urls, list) or not urls or not isinstance(urls[0], str):
        return None
    try:
        return urllib.parse.urlsplit(urls[0]).port
    except ValueError:
        return None


def http_get_json(port: int, endpoint: str) -> tuple[int, dict[str, Any]]:
    url = f"http://{HOST}:{port}/{endpoint.lstrip('/')}"
    try:
        with _NO_PROXY_OPENER.open(url, timeout=_PROBE_TIMEOUT_S) as resp:
            status, body = int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
        exc.close()
    try:
        data = decode_json(body, "monitoring reply") if body else {}
    except WireError:
        data = {}
    return status, data if isinstance(data, dict) else {}


class NatsServerProcess:
    """One nats-server subprocess bound to 127.0.0.1, reusable across kill/restart.

    Without an explicit ``port`` the first :meth:`start` lets nats-server choose (``-1``) and
    learns the port from the ports file it writes; that port is kept for the object's life, as
    is the JetStream store directory, so :meth:`restart` brings back the same server at the same
    address with its streams. The route port (``cluster_port=-1``) is learnt and kept the same
    way; the monitoring port is chosen afresh at every start. Everything the server writes lives
    in :attr:`workdir` (config file, log, ports file, and the store unless ``store_dir`` is
    given); :meth:`close` removes it.

    Args:
        port: client port; None lets nats-server choose one at the first start.
        jetstream: enable JetStream.
        store_dir: JetStream store directory; None uses ``<workdir>/jetstream``. A given directory
            is never deleted.
        token: require this client token.
        user: require this user name (with ``password``).
        password: the password for ``user``.
        tls_cert: server certificate (PEM); with ``tls_key`` the server speaks TLS and
            :attr:`url` is ``tls://``.
        tls_key: server private key (PEM).
        tls_ca: CA bundle for client certificates.
        tls_verify: require and verify client certificates against ``tls_ca``.
        cluster_name: the cluster's name; with ``cluster_port`` the server joins a cluster.
        cluster_port: the route listener's port on 127.0.0.1; ``-1`` lets nats-server choose
            one at the first start (then kept, like the client port).
        routes: route URLs of the other members (``nats-route://127.0.0.1:<port>``).
        server_name: the server's name (JetStream clusters need distinct names).
        extra_args: appended to the command line after ``-c <config>``.
        extra_config: appended verbatim to the generated config file (e.g. an nkey
            ``authorization`` block, or ``operator``/``resolver`` settings).
        startup_timeout: seconds :meth:`start` waits for readiness before giving up.

    Raises:
        ConfigError: inconsistent options (``user`` without ``password``, ``token`` with ``user``,
            half a TLS pair, a cluster port without a name...).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        jetstream: bool = True,
        store_dir: str | os.PathLike[str] | None = None,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_verify: bool = False,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        server_name: str | None = None,
        extra_args: Sequence[str] = (),
        extra_config: str = "",
        startup_timeout: float = 10.0,
    ) -> None:
        if port is not None and not 0 < port < 65536:
            raise ConfigError("port", f"must be in 1..65535, got {port}")
        if token is not None and user is not None:
            raise ConfigError("token", "use either token or user/password, not both")
        if (user is None) != (password is None):
            raise ConfigError("user", "user and password go together")
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("tls_cert", "tls_cert and tls_key go together")
        if tls_verify and tls_ca is None:
            raise ConfigError("tls_verify", "verifying client certificates needs tls_ca")
        if (tls_ca is not None or tls_verify) and tls_cert is None:
            raise ConfigError("tls_ca", "client certificate options need tls_cert and tls_key")
        if cluster_port is not None and cluster_port != AUTO_PORT and not 0 < cluster_port < 65536:
            raise ConfigError("cluster_port", f"must be -1 or in 1..65535, got {cluster_port}")
        if cluster_port is not None and not cluster_name:
            raise ConfigError("cluster_name", "a cluster port needs a cluster name")
        if routes and cluster_port is None:
            raise ConfigError("routes", "routes need a cluster_port")
        if startup_timeout <= 0:
            raise ConfigError("startup_timeout", f"must be > 0, got {startup_timeout}")

        self.binary: str = find_nats_server()
        # None until the server has told us (ports file); explicit ports are known up front.
        self._port: int | None = port
        self._monitor_port: int | None = None
        self.jetstream = jetstream
        self.token = token
        self.user = user
        self.password = password
        self.tls_cert = None if tls_cert is None else os.fspath(tls_cert)
        self.tls_key = None if tls_key is None else os.fspath(tls_key)
        self.tls_ca = None if tls_ca is None else os.fspath(tls_ca)
        self.tls_verify = tls_verify
        self.cluster_name = cluster_name
        # AUTO_PORT until the first start has learnt the port the server chose.
        self.cluster_port = cluster_port
        self.routes: tuple[str, ...] = tuple(routes)
        self.server_name = server_name
        self.extra_args: tuple[str, ...] = tuple(extra_args)
        self.extra_config = extra_config
        self.startup_timeout = startup_timeout

        self.workdir = Path(tempfile.mkdtemp(prefix="backbeat-nats-"))
        self._owns_store = store_dir is None
        self.store_dir = self.workdir / "jetstream" if store_dir is None else Path(store_dir)
        self.log_path = self.workdir / _LOG_NAME
        self.config_path = self.workdir / _CONF_NAME
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        # Set once a ports file was read: the ports are then ours, and re-binding them may retry.
        self._ports_learnt = False
        self._closed = False
        self.start_count = 0

    # --- introspection ---------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The client port on 127.0.0.1 (stable across restarts).

        Raises:
            EmbeddedServerError: no port was given and the server has not been started yet.
        """
        if self._port is None:
            raise EmbeddedServerError(f"{self!r}: the client port is known once it has started")
        return self._port

    @property
    def monitor_port(self) -> int:
        """The HTTP monitoring port on 127.0.0.1 (may change across restarts).

        Raises:
            EmbeddedServerError: the server has not been started yet.
        """
        if self._monitor_port is None:
            raise EmbeddedServerError(f"{self!r}: the monitoring port is known once it has started")
        return self._monitor_port

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>`` (``tls://`` when the server speaks TLS).

        Raises:
            EmbeddedServerError: no port was given and the server has not been started yet.
        """
        return self._url(self.port)

    def _url(self, port: int | str) -> str:
        scheme = "tls" if self.tls_cert else "nats"
        return f"{scheme}://{HOST}:{port}"

    @property
    def pid(self) -> int | None:
        """The running server's process id, or None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        state = f"running pid={self._proc.pid}" if self.running and self._proc else "stopped"
        if self._closed:
            state = "closed"
        extras = []
        if self.jetstream:
            extras.append(f"js store={self.store_dir}")
        if self.cluster_name:
            extras.append(f"cluster={self.cluster_name}:{self.cluster_port}")
        if self.server_name:
            extras.append(f"name={self.server_name}")
        url = self._url("?" if self._port is None else self._port)
        return f"<NatsServerProcess {url} {state} {' '.join(extras)} log={self.log_path}>"

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log (all starts), for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def monitor(self, endpoint: str) -> dict[str, Any]:
        """GET a monitoring endpoint (``varz``, ``jsz``, ``routez``...) as JSON.

        Raises:
            EmbeddedServerError: the endpoint did not answer 200.
        """
        try:
            status, data = http_get_json(self.monitor_port, endpoint)
        except OSError as exc:
            raise EmbeddedServerError(f"{self!r}: GET /{endpoint} failed: {exc}") from exc
        if status != 200:
            raise EmbeddedServerError(f"{self!r}: GET /{endpoint} answered {status}: {data}")
        return data

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Self:
        """Start the server and wait (bounded by ``startup_timeout``) until it is ready.

        A first start without explicit ports lets nats-server choose them and learns them from
        its ports file. Later starts bind the learnt client and route ports again; if one is
        still taken, the launch is retried a few times before giving up.

        Returns:
            self, for chaining.

        Raises:
            EmbeddedServerError: already running, closed, exited during start-up or not ready in
                time (the message carries the log tail). The process is not left running.
        """
        for attempt in range(_PORT_RETRIES):
            self._launch()
            try:
                self.wait_ready(health=True)
            except EmbeddedServerError:
                # Only a re-bind of ports this object already held is retried: a port the caller
                # gave for the first start that is taken is the caller's to resolve.
                retry = self._ports_learnt and self._address_in_use()
                if not (retry and attempt + 1 < _PORT_RETRIES):
                    raise
                time.sleep(_PORT_RETRY_BACKOFF_S)
            else:
                return self
        raise AssertionError("unreachable")  # pragma: no cover

    def _launch(self, *, jetstream: bool | None = None) -> None:
        """Spawn nats-server from a freshly written config; does not wait for anything.

        Args:
            jetstream: overrides :attr:`jetstream` for this launch (a new cluster's first member
                starts without it, see :meth:`NatsCluster.start`).
        """
        if self._closed:
            raise EmbeddedServerError(f"{self!r} is closed")
        if self.running:
            raise EmbeddedServerError(f"{self!r} is already running")
        self._reap()
        # A SIGKILLed server leaves its ports file behind; only the new one may be read.
        for stale in self.workdir.glob(_PORTS_GLOB):
            stale.unlink(missing_ok=True)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._monitor_port = None  # chosen afresh by every launch
        self.config_path.write_text(
            self._config_text(self.jetstream if jetstream is None else jetstream)
        )
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            log.write(f"---- backbeat: starting {self!r} ----\n".encode())
            log.flush()
            # The child keeps its own copy of the descriptor; ours closes with the block.
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_path), *self.extra_args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                # own session: a terminal's Ctrl-C reaches us, not the server, so we can shut
                # down in order (agents flush their claims before the server stops)
                start_new_session=True,
            )
        self.start_count += 1
        _live.add(self)

    def _read_ports_file(self) -> dict[str, Any] | None:
        for path in self.workdir.glob(_PORTS_GLOB):
            try:
                data = decode_json(path.read_bytes(), "ports file")
            except (OSError, WireError):
                continue  # not written completely yet
            if isinstance(data, dict):
                return data
        return None

    def _await_ports(self, timeout: float | None = None) -> None:
        """Block until the server's ports file names every listener, and adopt those ports.

        Args:
            timeout: seconds to wait; defaults to ``startup_timeout``.

        Raises:
            EmbeddedServerError: the process exited or no complete ports file appeared in time;
                the server is killed.
        """
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        while True:
            proc = self._proc
            if proc is None:
                raise EmbeddedServerError(f"{self!r} was never started")
            code = proc.poll()
            if code is not None:
                raise self._fail(f"nats-server exited with status {code} during start-up")
            data = self._read_ports_file()
            if data is not None:
                client = _url_port(data.get("nats"))
                monitor = _url_port(data.get("monitoring"))
                cluster = _url_port(data.get("cluster"))
                if (
                    client is not None
                    and monitor is not None
                    and (self.cluster_port is None or cluster is not None)
                ):
                    self._port, self._monitor_port = client, monitor
                    if self.cluster_port is not None:
                        self.cluster_port = cluster
                    self._ports_learnt = True
                    return
            if time.monotonic() >= deadline:
                raise self._fail("no ports file from nats-server within the start-up bound")
            time.sleep(POLL_INTERVAL_S)

    def _config_text(self, jetstream: bool) -> str:
        # -1: nats-server chooses (a first start; the monitoring port at every start).
        client = AUTO_PORT if self._port is None else self._port
        lines = [f"listen: {_quote(f'{HOST}:{client}')}"]
        lines.append(f"http: {_quote(f'{HOST}:{AUTO_PORT}')}")
        # nats-server writes <exe>_<pid>.ports here: the ports it actually bound.
        lines.append(f"ports_file_dir: {_quote(self.workdir)}")
        if self.server_name:
            lines.append(f"server_name: {_quote(self.server_name)}")
        if jetstream:
            lines.append(f"jetstream {{ store_dir: {_quote(self.store_dir)} }}")
        if self.token is not None:
            lines.append(f"authorization {{ token: {_quote(self.token)} }}")
        elif self.user is not None and self.password is not None:
            lines.append(
                f"authorization {{ user: {_quote(self.user)}, password: {_quote(self.password)} }}"
            )
        if self.tls_cert and self.tls_key:
            tls = [f"cert_file: {_quote(self.tls_cert)}", f"key_file: {_quote(self.tls_key)}"]
            if self.tls_ca:
                tls.append(f"ca_file: {_quote(self.tls_ca)}")
            if self.tls_verify:
                tls.append("verify: true")
            lines.append("tls { " + ", ".join(tls) + " }")
        if self.cluster_name:
            cluster = [f"name: {_quote(self.cluster_name)}"]
            if self.cluster_port is not None:
                cluster.append(f"listen: {_quote(f'{HOST}:{self.cluster_port}')}")
            if self.routes:
                cluster.append("routes: [" + ", ".join(_quote(r) for r in self.routes) + "]")
            lines.append("cluster { " + ", ".join(cluster) + " }")
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _address_in_use(self) -> bool:
        return "address already in use" in self._log_since(self._log_offset)

    def _fail(self, reason: str) -> EmbeddedServerError:
        self.kill()
        return EmbeddedServerError(f"{self!r}: {reason}\n--- log tail ---\n{self.log_tail()}")

    def wait_ready(self, *, health: bool = True, timeout: float | None = None) -> None:
        """Block until the client port accepts connections and, with ``health``, ``/healthz`` is OK.

        The ports of a new launch are learnt from its ports file first.

        Args:
            health: also require ``/healthz`` to answer 200 (JetStream recovered; in a cluster,
                a meta leader known).
            timeout: seconds to wait; defaults to ``startup_timeout``.

        Raises:
            EmbeddedServerError: the process exited or the time ran out; the server is killed.
        """
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        if self._monitor_port is None:
            self._await_ports(timeout=max(0.0, deadline - time.monotonic()))
        tcp_ok = False
        while True:
            proc = self._proc
            if proc is None:
                raise EmbeddedServerError(f"{self!r} was never started")
            code = proc.poll()
            if code is not None:
                raise self._fail(f"nats-server exited with status {code} during start-up")
            tcp_ok = tcp_ok or _tcp_accepts(self.port)
            if tcp_ok and (not health or self._healthy()):
                return
            if time.monotonic() >= deadline:
                what = "/healthz" if tcp_ok else "the client port"
                raise self._fail(f"not ready within the start-up bound (waiting for {what})")
            time.sleep(POLL_INTERVAL_S)

    def _healthy(self) -> bool:
        try:
            status, _ = http_get_json(self.monitor_port, "healthz")
        except OSError:
            return False
        return status == 200

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:  # pragma: no cover - callers check first
            proc.kill()
        if proc is not None:
            proc.wait(timeout=10)
        _live.discard(self)

    def kill(self) -> None:
        """SIGKILL the server (no shutdown, no flush) and wait for it; a no-op when stopped."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        self._reap()

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the server, wait up to ``grace`` seconds, then SIGKILL; a no-op when stopped."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        self.kill()

    def restart(self) -> Self:
        """Stop the server if it runs, then start it on the same ports with the same store.

        Returns:
            self.
        """
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and delete its working directory (and the store, if it is ours)."""
        self.stop()
        self._closed = True
        if self._owns_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
