"""The client over a real nats-server on 127.0.0.1: connect errors, beats in, signed claims out
(checked by a plain nats-py subscriber), a SIGKILLed server restarted on the same port (no claim
lost with JetStream, a counted bound without), degradation and resync, budgets and tempo.

Each test uses its own cluster id, so the module's server (and its streams) can be shared.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
import trio
import trio_asyncio
from _guards import closed_port
from nacl.signing import VerifyKey

import backbeat_trio as bb3
from backbeat_trio._bridge.nats import _nats_options, open_nats_transport
from backbeat_trio._core.hlc import node_id_for
from backbeat_trio._core.wire import encode
from backbeat_trio._embedded import NatsServerProcess

pytestmark = pytest.mark.nats

FAST = 600  # BPM: 100 ms beats


# --- helpers --------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def plain_nats(url: str) -> AsyncIterator[Any]:
    """A plain nats-py connection on the current trio-asyncio loop (no backbeat_trio code)."""
    nc = await trio_asyncio.aio_as_trio(nats.connect)(
        url, reconnect_time_wait=0.05, max_reconnect_attempts=-1
    )
    try:
        yield nc
    finally:
        with trio.CancelScope(shield=True):
            await trio_asyncio.aio_as_trio(nc.close)()


async def plain_subscribe(nc: Any, subject: str) -> Any:
    sub = await trio_asyncio.aio_as_trio(nc.subscribe)(subject)
    await trio_asyncio.aio_as_trio(nc.flush)()
    return sub


async def next_msg(sub: Any) -> Any:
    return await trio_asyncio.aio_as_trio(sub.next_msg)(timeout=10)


async def add_stream(nc: Any, cluster: str) -> str:
    name = f"BACKBEAT_STATUS_{cluster}"
    js = nc.jetstream()
    await trio_asyncio.aio_as_trio(js.add_stream)(
        name=name, subjects=[f"backbeat.status.{cluster}"], duplicate_window=120
    )
    return name


async def stream_ids(nc: Any, stream: str) -> list[str]:
    """Every stored message's Nats-Msg-Id without its digest (``<agent_id>:<hlc>``), in stream
    order (read back with plain nats-py)."""
    js = nc.jetstream()
    info = await trio_asyncio.aio_as_trio(js.stream_info)(stream)
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await trio_asyncio.aio_as_trio(js.get_msg)(stream, seq)
        ids.append(msg.headers["Nats-Msg-Id"].rsplit(":", 1)[0])
    return ids


def pulse_config(url: str, cluster: str, **kw: Any) -> bb3.PulseConfig:
    return bb3.PulseConfig(cluster_id=cluster, nats_url=url, **{"tempo_bpm": FAST, **kw})


def client_config(url: str, cluster: str, agent: str = "agent-1", **kw: Any) -> bb3.Config:
    kw = {"reconnect_delay": 0.05, "jitter_tolerance": 0.08, **kw}
    return bb3.Config(cluster_id=cluster, agent_id=agent, nats_url=url, **kw)


async def wait_connected(bb: bb3.Client, state: bool) -> None:
    with trio.fail_after(15):
        await bb.wait_connected(state)
    assert bb.health().connected is state


# --- connecting -----------------------------------------------------------------------------------
async def test_first_connect_failure_is_a_clear_error_from_aenter() -> None:
    url = f"nats://127.0.0.1:{closed_port()}"
    entered = False
    with trio.fail_after(10), pytest.raises(bb3.NotConnected, match="could not connect") as info:
        async with bb3.open_client(bb3.Config(cluster_id="c", agent_id="a", nats_url=url)):
            entered = True  # pragma: no cover
    assert not entered
    assert url in str(info.value)
    assert "Connect call failed" in str(info.value)  # the reason, not just "no servers"
    assert not isinstance(info.value, BaseExceptionGroup)


async def test_credentials_and_server_lists_pass_through() -> None:
    dead = f"nats://127.0.0.1:{closed_port()}"
    async with bb3.open_embedded_nats(jetstream=False, token="s3cret") as url:
        with trio.fail_after(10), pytest.raises(bb3.NotConnected, match="credentials"):
            async with bb3.open_client(bb3.Config(cluster_id="c", agent_id="a", nats_url=url)):
                pass  # pragma: no cover
        cfg = bb3.Config(cluster_id="c", agent_id="a", nats_url=[dead, url], token="s3cret")
        with trio.fail_after(10):
            async with bb3.open_client(cfg) as bb:
                assert bb.health().connected
                assert bb.delivery_mode == "core"  # no JetStream on this server
                assert bb.health().delivery == "core"


async def test_user_and_password_pass_through() -> None:
    async with bb3.open_embedded_nats(jetstream=False, user="alice", password="pw") as url:
        wrong = bb3.Config(cluster_id="c", agent_id="a", nats_url=url, user="alice", password="x")
        with trio.fail_after(10), pytest.raises(bb3.NotConnected, match="credentials"):
            async with bb3.open_client(wrong):
                pass  # pragma: no cover
        right = wrong.replace(password="pw")
        with trio.fail_after(10):
            async with bb3.open_client(right) as bb:
                assert bb.health().connected


def test_creds_nkeys_and_tls_options_reach_nats_py(tmp_path: Path) -> None:
    creds = tmp_path / "user.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\n")
    seed = tmp_path / "user.nk"  # nkeys_seed is the path of a seed file, as nats-py reads it
    seed.write_text("SUAEXAMPLE\n")
    tls = ssl.create_default_context()
    cfg = bb3.Config(
        cluster_id="c",
        agent_id="a",
        nats_url="tls://127.0.0.1:4222,tls://127.0.0.1:4223",
        creds_file=str(creds),
        nkeys_seed=str(seed),
        tls=tls,
        reconnect_delay=0.5,
        max_reconnects=7,
    )
    opts = _nats_options(cfg)
    assert opts["user_credentials"] == str(creds)
    assert opts["nkeys_seed"] == str(seed)
    assert opts["tls"] is tls
    assert opts["reconnect_time_wait"] == 0.5
    assert opts["max_reconnect_attempts"] == 7
    assert opts["name"] == "backbeat-trio:a"
    assert cfg.servers == ("tls://127.0.0.1:4222", "tls://127.0.0.1:4223")
    token = _nats_options(bb3.Config(cluster_id="c", agent_id="a", token="t"))
    assert token["token"] == "t"
    assert "tls" not in token


async def test_transport_reuses_the_callers_loop_batches_and_translates(nats_url: str) -> None:
    cfg = client_config(nats_url, "tr")
    async with trio_asyncio.open_loop() as loop, open_nats_transport(cfg) as transport:
        assert transport._loop is loop
        async with plain_nats(nats_url) as nc:
            sub = await plain_subscribe(nc, "backbeat.test.batch")
            for i in range(500):  # no await: the asyncio side drains them in batches
                transport.publish("backbeat.test.batch", str(i).encode())
            await transport.flush()
            got = [int((await next_msg(sub)).data) for _ in range(500)]
        assert got == list(range(500))
        assert transport.published == 500
        ours = await transport.subscribe("backbeat.test.echo", buffer=4)
        transport.publish("backbeat.test.echo", b"hi", headers={"X-Test": "1"})
        with trio.fail_after(5):
            msg = await ours.messages.receive()
        assert (msg.data, msg.headers) == (b"hi", {"X-Test": "1"})
        with trio.fail_after(5), pytest.raises(bb3.NotConnected, match="no responders"):
            await transport.request("backbeat.test.nobody", b"?")
        await ours.unsubscribe()


# --- beats in, claims out -------------------------------------------------------------------------
async def test_beats_in_and_signed_claims_out_checked_by_plain_nats_py(nats_url: str) -> None:
    cluster = "sig"
    key = bb3.generate_signing_key()
    async with trio_asyncio.open_loop(), plain_nats(nats_url) as nc, trio.open_nursery() as n:
        raw = await plain_subscribe(nc, f"backbeat.status.{cluster}")
        await n.start(bb3.run_pulse, pulse_config(nats_url, cluster))
        cfg = client_config(nats_url, cluster, "agent-7", signing_key=key)
        async with bb3.open_client(cfg) as bb:
            assert bb.delivery_mode == "core"
            frames = []
            sent = []
            with trio.fail_after(10):
                async for frame in bb.beats():
                    frames.append(frame)
                    sent.append(
                        await bb.emit_status(
                            bb3.StatusClaim(
                                state="waiting" if len(frames) == 3 else "executing",
                                wait_for=["agent://agent-8"] if len(frames) == 3 else [],
                                beats_left=8 - len(frames),
                                progress=len(frames) / 8,
                                notes=f"beat {frame.beat_index}",
                            )
                        )
                    )
                    if len(frames) == 6:
                        break
                await bb.flush_claims()
            health = bb.health()
        received = [await next_msg(raw) for _ in sent]
        n.cancel_scope.cancel()

    indices = [f.beat_index for f in frames]
    assert indices == list(range(indices[0], indices[0] + 6))
    assert all(f.tempo_bpm == FAST for f in frames)
    assert all(f.window_id == bb3.window_id(cluster, f.beat_index) for f in frames)
    assert health.connected
    assert health.current_tempo == FAST
    assert health.metrics["claims_confirmed"] == 6
    verify_key = VerifyKey(bytes(key.verify_key))
    for claim, msg in zip(sent, received, strict=True):
        assert msg.headers["Backbeat-Agent"] == "agent-7"
        assert msg.headers["Backbeat-Key"] == base64.b64encode(bytes(key.verify_key)).decode()
        sig = msg.headers["Backbeat-Sig"].encode()
        digest = hashlib.sha256(msg.data + sig).hexdigest()[:16]  # SPEC: sha256(body + sig)
        assert msg.headers["Nats-Msg-Id"] == f"agent-7:{claim.hlc}:{digest}"
        # PyNaCl over the exact bytes that crossed the wire
        verify_key.verify(msg.data, base64.b64decode(msg.headers["Backbeat-Sig"]))
        body = msgspec.json.decode(msg.data)
        assert body["type"] == "backbeat.statusclaim.v1"
        assert body["agent_id"] == "agent-7"
        assert body["hlc"] == claim.hlc
        assert body["beat_index"] in indices
        assert ("wait_for" in body) == bool(claim.wait_for)
    assert msgspec.json.decode(received[2].data)["wait_for"] == ["agent://agent-8"]


async def test_hostile_input_over_nats_is_counted_and_skipped(nats_url: str) -> None:
    cluster = "hostile"
    subject = f"backbeat.beat.{cluster}"
    async with trio_asyncio.open_loop(), plain_nats(nats_url) as nc, trio.open_nursery() as n:
        await n.start(bb3.run_pulse, pulse_config(nats_url, cluster, tempo_bpm=300))
        async with bb3.open_client(client_config(nats_url, cluster)) as bb:
            chan = bb.beats(buffer=64)
            with trio.fail_after(10):
                await chan.receive()
            good = bb3.BeatFrame(
                cluster_id="elsewhere",
                beat_index=10**9,
                downbeat=True,
                phase="plan",
                hlc="1:0:1",
                deadline_at=dt.datetime.now(dt.UTC),
                tempo_bpm=300,
                window_id="0" * 32,
            )
            for payload in (b"{not json", b'{"type":"nope"}', encode(good), b"x" * 100_000):
                await trio_asyncio.aio_as_trio(nc.publish)(subject, payload)
            await trio_asyncio.aio_as_trio(nc.flush)()
            with trio.fail_after(10):
                while bb.metrics.errors < 4:
                    await chan.receive()
                frames = [await chan.receive() for _ in range(3)]
            m = bb.metrics
        n.cancel_scope.cancel()
    assert (m.malformed, m.wrong_cluster, m.oversized) == (2, 1, 1)
    assert all(f.cluster_id == cluster for f in frames)
    assert frames[-1].beat_index < 10**9


# --- a SIGKILLed server ---------------------------------------------------------------------------
async def test_jetstream_mode_loses_no_claim_across_a_server_kill(
    nats_server: NatsServerProcess, nats_url: str
) -> None:
    cluster = "js-kill"
    emitted: list[bb3.StatusClaim] = []
    async with trio_asyncio.open_loop():
        async with plain_nats(nats_url) as nc:
            stream = await add_stream(nc, cluster)
        async with bb3.open_client(client_config(nats_url, cluster)) as bb:
            assert bb.health().delivery == "jetstream"

            async def emit(count: int) -> None:
                for _ in range(count):
                    emitted.append(await bb.emit_status(bb3.StatusClaim(notes=str(len(emitted)))))
                    await trio.sleep(0.005)

            await emit(40)
            nats_server.kill()  # SIGKILL: no goodbye, bytes in flight die with it
            await emit(20)  # some into the dying socket, the rest queued
            await wait_connected(bb, False)
            await emit(20)
            await trio.to_thread.run_sync(nats_server.restart)
            await emit(20)  # around the reconnect
            await wait_connected(bb, True)
            await emit(20)
            with trio.fail_after(20):
                await bb.flush_claims()
            health = bb.health()
        async with plain_nats(nats_url) as nc:
            ids = await stream_ids(nc, stream)
    expected = [f"agent-1:{c.hlc}" for c in emitted]
    assert ids == expected  # every claim exactly once, in the order emitted
    assert health.reconnect_count >= 1
    assert health.metrics["disconnects"] >= 1
    assert health.metrics["claims_acked"] == len(emitted)
    assert "disconnected from NATS" in health.errors


async def test_core_mode_loss_is_bounded_and_counted(
    nats_server: NatsServerProcess, nats_url: str
) -> None:
    cluster = "core-kill"
    async with trio_asyncio.open_loop():
        async with plain_nats(nats_url) as nc:
            # the stream only *observes* what reached the server; the client is told core mode
            stream = await add_stream(nc, cluster)
        async with bb3.open_client(client_config(nats_url, cluster, jetstream=False)) as bb:
            assert bb.health().delivery == "core"

            def emit(tag: str, count: int) -> list[bb3.StatusClaim]:
                return [bb.emit_status_nowait(bb3.StatusClaim(notes=tag)) for _ in range(count)]

            before = emit("before", 10)
            with trio.fail_after(10):
                await bb.flush_claims()  # confirmed by the server
            assert bb.metrics.claims_confirmed == 10
            nats_server.kill()
            blind = emit("blind", 10)  # the client cannot know yet: these may be lost
            await wait_connected(bb, False)
            queued = emit("queued", 10)  # known disconnected: these wait in the outbox
            assert bb.pending_claims == 10
            await trio.to_thread.run_sync(nats_server.restart)
            await wait_connected(bb, True)
            after = emit("after", 10)
            with trio.fail_after(20):
                await bb.flush_claims()
            health = bb.health()
        async with plain_nats(nats_url) as nc:
            ids = await stream_ids(nc, stream)

    def key(c: bb3.StatusClaim) -> str:
        return f"agent-1:{c.hlc}"

    assert len(ids) == len(set(ids))
    lost = {key(c) for c in before + blind + queued + after} - set(ids)
    # only claims sent blind into the dead connection can be lost, and they were counted
    assert lost <= {key(c) for c in blind}
    assert len(lost) <= health.metrics["claims_unconfirmed"] <= len(blind)
    assert [i for i in ids if i not in {key(c) for c in blind}] == [
        key(c) for c in before + queued + after
    ]
    if health.metrics["claims_unconfirmed"]:
        assert any("may be lost" in e for e in health.errors)
    assert health.delivery == "core"


# --- degradation, budgets, tempo ------------------------------------------------------------------
async def test_degradation_and_resync_over_nats(nats_url: str) -> None:
    cluster = "degrade"
    pulse_node = node_id_for("pulse-1")
    cfg = client_config(nats_url, cluster, jitter_tolerance=0.1)
    async with trio.open_nursery() as nursery, bb3.open_client(cfg) as bb:
        chan = bb.beats(buffer=256)
        pulse_scope = trio.CancelScope()

        async def pulse(start: int, *, task_status: trio.TaskStatus[None]) -> None:
            with pulse_scope:
                await bb3.run_pulse(
                    pulse_config(nats_url, cluster, tempo_bpm=300, start_index=start),
                    task_status=task_status,
                )

        await nursery.start(pulse, 0)
        frames = []
        with trio.fail_after(20):
            while len(frames) < 3:
                frames.append(await chan.receive())
            pulse_scope.cancel()
            while not bb.degraded:
                frames.append(await chan.receive())
            assert bb.health().local_degradation
            for _ in range(3):
                frames.append(await chan.receive())
            local = frames[-1]
            assert bb3.HLCStamp.parse(local.hlc).node != pulse_node
            # a pulse comes back a little ahead on the beat count
            pulse_scope = trio.CancelScope()
            await nursery.start(pulse, local.beat_index + 3)
            while True:
                frame = await chan.receive()
                frames.append(frame)
                if bb3.HLCStamp.parse(frame.hlc).node == pulse_node and not bb.degraded:
                    break
            frames.extend([await chan.receive() for _ in range(2)])
        metrics = bb.metrics
        pulse_scope.cancel()
    indices = [f.beat_index for f in frames]
    assert indices == sorted(set(indices))  # never twice, never backwards
    assert metrics.degraded_episodes >= 1
    assert metrics.degraded_beats >= 3
    assert metrics.resyncs >= 1


async def test_budget_follows_a_tempo_change_over_nats(nats_url: str) -> None:
    cluster = "budget"
    async with trio_asyncio.open_loop(), plain_nats(nats_url) as nc, trio.open_nursery() as n:
        await n.start(
            bb3.run_pulse, pulse_config(nats_url, cluster, tempo_bpm=300, max_tempo_step=None)
        )
        async with bb3.open_client(client_config(nats_url, cluster)) as bb:
            with trio.fail_after(10):
                await bb.wait_for_beat()
                start = await bb.wait_for_downbeat()
            t0 = trio.current_time()
            change = bb3.TempoChange(cluster_id=cluster, tempo_bpm=600, requested_by="test")
            answer = await trio_asyncio.aio_as_trio(nc.request)(
                f"backbeat.tempo.{cluster}", encode(change), timeout=5
            )
            assert msgspec.json.decode(answer.data)["effective_beat"] == start.beat_index + 4
            with bb.beat_budget(8) as scope:
                await trio.sleep_forever()
            elapsed = trio.current_time() - t0
            assert scope.cancelled_caught
            tempo = bb.current_tempo
        n.cancel_scope.cancel()
    # 4 beats at 200 ms then 4 at 100 ms = 1.2 s (1.6 s had it not followed the tempo)
    assert elapsed == pytest.approx(1.2, abs=0.15)
    assert tempo == 600
