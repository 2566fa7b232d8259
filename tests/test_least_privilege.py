"""Least privilege: the nats-server configuration of docs/security.md, role by role, over a real
server started with exactly that text.

Each role (pulse, reverb, agent, operator) has its own user, permissions and reply-inbox prefix.
Under them the pulse, two HA pulses, the reverb (its status stream, bar history and lease), a
signed agent with JetStream delivery and the CLI (``tempo`` and ``tail`` as the operator,
``emit`` and ``tail`` as an agent) work without one permission violation in the server's log;
an agent's credentials cannot publish a beat, a bar report or a tempo change, cannot touch the
streams or the lease, and cannot read what is not its own. What they still can do is measured
too, as docs/security.md says it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
import trio
import trio_asyncio
from _auth_servers import least_privilege_server
from _least_privilege import (
    BAR,
    BEAT,
    CLUSTER,
    LEASE_SUBJECT,
    ROLES,
    STATUS,
    TEMPO,
    TEMPO_SUBJECT,
    Server,
    Watcher,
    documented_config,
    inbox_prefix,
    least_privilege_config,
    open_nc,
    password_variable,
    run_cli,
    wait_until,
)

import backbeat_trio as bb3
from backbeat_trio._core.beats import status_stream_name
from backbeat_trio._core.lease import lease_bucket_name
from backbeat_trio._core.wire import encode, encode_claim
from backbeat_trio._services.history import bar_stream_name

pytestmark = pytest.mark.nats


def test_the_documented_configuration_is_the_one_tested() -> None:
    assert documented_config() == least_privilege_config()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    # a letter first: nats-server reads a value that looks like a number as one
    passwords = {role: f"pw{secrets.token_hex(16)}" for role in ROLES}
    process = least_privilege_server(
        least_privilege_config(), {password_variable(r): pw for r, pw in passwords.items()}
    )
    with process:
        yield Server(process, passwords)


@pytest.fixture
def lp(server: Server) -> Server:
    server.mark()
    return server


# --- every role does its work ------------------------------------------------------------------
async def test_pulse_reverb_agent_and_cli_work_under_their_permissions(
    lp: Server, tmp_path: Path
) -> None:
    key = bb3.generate_signing_key()
    key_file = tmp_path / "agent-1.key"
    bb3.save_signing_key(key, key_file)
    ring = bb3.Keyring({"agent-1": key.verify_key})
    async with trio.open_nursery() as services:
        pulse = await services.start(
            bb3.run_pulse,
            bb3.PulseConfig(cluster_id=CLUSTER, tempo_bpm=TEMPO, **lp.options("pulse")),
        )
        reverb = await services.start(
            bb3.run_reverb,
            bb3.ReverbConfig(cluster_id=CLUSTER, keyring=ring, **lp.options("reverb")),
        )
        assert reverb.stream == status_stream_name(CLUSTER)  # it made (or found) its stream
        agent_cfg = bb3.Config(
            cluster_id=CLUSTER,
            agent_id="agent-1",
            signing_key=key,
            jetstream=True,
            jitter_tolerance=0.2,
            **lp.options("agent"),
        )
        async with bb3.open_client(agent_cfg) as agent:
            assert agent.delivery_mode == "jetstream"
            with trio.fail_after(10):
                for _ in range(8):
                    await agent.wait_for_beat()
                    await agent.emit_status(
                        bb3.StatusClaim(task_id="t1", state="executing", beats_left=4)
                    )
                await agent.flush_claims()
            assert agent.health().metrics["claims_acked"] >= 8  # flushed: every PubAck came back
        await wait_until(lambda: reverb.claims_counted >= 8, "the reverb to count the claims")
        await wait_until(lambda: reverb.reports_published >= 1, "a bar report")
        assert reverb.rejected == 0

        # the CLI: the operator steers the tempo and replays the bar history; an agent emits
        # a signed claim (acknowledged by JetStream) and follows the beats
        tempo, bars, emitted, beats = await _run_all(
            run_cli(lp, "operator", "tempo", str(TEMPO + 30), "--json"),
            run_cli(lp, "operator", "tail", "--bars", "--since", "0", "-n", "1", "--json"),
            run_cli(
                lp,
                "agent",
                "emit",
                "-a",
                "agent-1",
                "--key",
                str(key_file),
                "--state",
                "review",
                "--beat-timeout",
                "5",
            ),
            run_cli(lp, "agent", "tail", "--beats", "-n", "3", "--json", "--timeout", "20"),
        )
        assert tempo[0] == 0, tempo
        assert json.loads(tempo[1])["accepted"] is True
        assert pulse.tempo_changes == 1
        assert bars[0] == 0, bars
        assert "1 stored bar report(s)" in bars[2]
        assert json.loads(bars[1].splitlines()[0])["cluster_id"] == CLUSTER
        assert emitted[0] == 0, emitted
        assert "acknowledged by JetStream" in emitted[1]
        assert beats[0] == 0, beats
        assert len(beats[1].splitlines()) == 3
        await wait_until(lambda: reverb.claims_counted >= 9, "the CLI's claim to be counted")
        services.cancel_scope.cancel()
    assert lp.violations() == []


async def _run_all(*calls: Any) -> list[Any]:
    results: list[Any] = [None] * len(calls)

    async def one(i: int, call: Any) -> None:
        results[i] = await call

    async with trio.open_nursery() as nursery:
        for i, call in enumerate(calls):
            nursery.start_soon(one, i, call)
    return results


async def _serve(run: Any, cfg: Any, scope: trio.CancelScope, *, task_status: Any) -> None:
    with scope:
        await run(cfg, task_status=task_status)


async def test_ha_pulses_and_ha_reverb_work_under_their_permissions(lp: Server) -> None:
    scopes = {pid: trio.CancelScope() for pid in ("p1", "p2")}
    async with trio.open_nursery() as services:
        pulses = {
            pid: await services.start(
                _serve,
                bb3.run_ha_pulse,
                bb3.HAPulseConfig(
                    cluster_id=CLUSTER,
                    pulse_id=pid,
                    tempo_bpm=TEMPO,
                    start_index=100_000,  # past what the other tests' pulses reached
                    lease_ttl=1.0,
                    **lp.options("pulse"),
                ),
                scope,
            )
            for pid, scope in scopes.items()
        }
        reverb = await services.start(
            bb3.run_reverb,
            bb3.ReverbConfig(
                cluster_id=CLUSTER, allow_unsigned=True, ha=True, **lp.options("reverb")
            ),
        )
        cfg = bb3.Config(
            cluster_id=CLUSTER, agent_id="agent-9", jitter_tolerance=0.2, **lp.options("agent")
        )
        async with bb3.open_client(cfg) as agent:
            with trio.fail_after(10):
                before = [(await agent.wait_for_beat()).beat_index for _ in range(6)]
            leader = next(pid for pid, st in pulses.items() if st.role == "leader")
            follower = next(pid for pid in pulses if pid != leader)
            scopes[leader].cancel()  # it releases the lease; the other one takes over
            with trio.fail_after(10):
                await pulses[follower].wait_for_role("leader")
                after = [(await agent.wait_for_beat()).beat_index for _ in range(6)]
        assert before == sorted(before)
        assert before[0] >= 100_000
        assert after[0] > before[-1]
        assert after == sorted(after)
        await wait_until(lambda: reverb.reports_published >= 1, "the HA reverb to report")
        assert reverb.lease is not None
        assert reverb.lease.role == "leader"
        services.cancel_scope.cancel()
    assert lp.violations() == []


# --- what an agent's credentials cannot do ------------------------------------------------------


async def _ensure_streams(lp: Server) -> None:
    """The status stream and the lease bucket exist (made with the roles that own them)."""
    reverb = bb3.ConnectionOptions(**lp.options("reverb"))
    async with bb3.open_nats_transport(reverb) as transport:
        await transport.jetstream.ensure_stream(status_stream_name(CLUSTER), [STATUS])
    pulse = bb3.ConnectionOptions(**lp.options("pulse"))
    async with bb3.open_nats_transport(pulse) as transport:
        await transport.jetstream.ensure_kv(lease_bucket_name(CLUSTER))


async def _status_stream_messages(lp: Server) -> int:
    reverb = bb3.ConnectionOptions(**lp.options("reverb"))
    async with bb3.open_nats_transport(reverb) as transport:
        summary = await transport.jetstream.stream_summary(status_stream_name(CLUSTER))
    assert summary is not None, "the status stream is gone"
    return summary.messages


async def _stored_pubacks_in_bar_history(lp: Server) -> int:
    operator = bb3.ConnectionOptions(**lp.options("operator"))
    async with bb3.open_nats_transport(operator) as transport:
        stored = await transport.jetstream.stream_read(
            bar_stream_name(CLUSTER), BAR, 1, max_msgs=10_000
        )
    return sum(1 for msg in stored if msg.data.startswith(b'{"stream":'))


def _frame_bytes() -> bytes:
    frame = {
        "type": "backbeat.beatframe.v1",
        "cluster_id": CLUSTER,
        "beat_index": 7,
        "downbeat": False,
        "phase": "execute",
        "hlc": "0190a0b0c0d0:0000:0001",
        "deadline_at": "2030-01-01T00:00:00Z",
        "tempo_bpm": 60,
        "window_id": "0" * 32,
    }
    return msgspec.json.encode(frame)


async def test_an_agent_cannot_publish_beats_reports_or_tempo_nor_touch_streams_and_lease(
    lp: Server,
) -> None:
    await _ensure_streams(lp)
    stored = await _status_stream_messages(lp)
    watcher = Watcher()
    tempo = encode(
        bb3.TempoChange(cluster_id=CLUSTER, tempo_bpm=1200, requested_by="agent-1", hlc="1:0:1")
    )
    report = msgspec.json.encode({"type": "backbeat.barreport.v1", "cluster_id": CLUSTER})
    async with (
        trio_asyncio.open_loop(),
        open_nc(lp, "operator") as (operator, _),
        open_nc(lp, "pulse") as (pulse, _),
        open_nc(lp, "agent") as (agent, errors),
    ):
        aio = trio_asyncio.aio_as_trio
        for nc, subject in ((operator, BEAT), (operator, BAR), (pulse, TEMPO_SUBJECT)):
            await aio(nc.subscribe)(subject, cb=watcher.on_message)
        await aio(operator.flush)()
        await aio(pulse.flush)()

        # publishing where only the pulse, the reverb or the operator may
        for subject, body in ((BEAT, _frame_bytes()), (BAR, report), (TEMPO_SUBJECT, tempo)):
            await aio(agent.publish)(subject, body)
        await aio(agent.publish)(LEASE_SUBJECT, b'{"holder":"agent-1"}')
        # managing or reading the streams through the JetStream API
        claims = status_stream_name(CLUSTER)
        for api in (
            f"$JS.API.STREAM.DELETE.{claims}",
            f"$JS.API.STREAM.PURGE.{claims}",
            f"$JS.API.STREAM.CREATE.BACKBEAT_STATUS_{CLUSTER}_COPY",
            f"$JS.API.CONSUMER.CREATE.{claims}",
            f"$JS.API.STREAM.MSG.GET.{claims}",
        ):
            with pytest.raises(nats.errors.TimeoutError):  # refused: nobody ever answers
                await aio(agent.request)(api, b"{}", timeout=0.5)
        # reading what is not its own: claims, reports, tempo requests, other roles' replies
        for subject in (STATUS, BAR, TEMPO_SUBJECT, f"{inbox_prefix('reverb')}.>", ">"):
            await aio(agent.subscribe)(subject, cb=watcher.on_message)
        await aio(agent.flush)()
        await trio.sleep(0.5)  # time for anything that got through to arrive

    assert watcher.got == []
    refused = [e for e in errors if "permissions violation" in e.lower()]
    assert len(refused) == 4 + 5 + 5, errors
    assert await _status_stream_messages(lp) == stored  # not deleted, not purged
    logged = "\n".join(lp.violations())
    for subject in (BEAT, BAR, TEMPO_SUBJECT, LEASE_SUBJECT, f"$JS.API.STREAM.DELETE.{claims}"):
        assert f'"$G/user:agent" - Publish Violation - Subject "{subject}"' in logged
    assert f'"$G/user:agent" - Subscription Violation - Subject "{STATUS}"' in logged


async def test_a_role_without_its_inbox_prefix_gets_no_replies(lp: Server) -> None:
    await _ensure_streams(lp)
    options = lp.options("agent") | {"inbox_prefix": None}
    async with bb3.open_nats_transport(bb3.ConnectionOptions(**options)) as transport:
        found = await transport.jetstream.with_op_timeout(0.5).find_stream(STATUS)
    assert found is None  # the answer went to _INBOX.…, which the agent may not read
    assert any(
        '"$G/user:agent" - Subscription Violation - Subject "_INBOX.' in line
        for line in lp.violations()
    )


# --- what an agent's credentials can still do ---------------------------------------------------
async def test_what_an_agent_can_still_do(lp: Server) -> None:
    await _ensure_streams(lp)
    honest_key, other_key = bb3.generate_signing_key(), bb3.generate_signing_key()
    ring = bb3.Keyring({"agent-1": honest_key.verify_key, "agent-2": other_key.verify_key})
    watcher = Watcher()
    async with trio.open_nursery() as services:
        pulse_status = await services.start(
            bb3.run_pulse,
            bb3.PulseConfig(cluster_id=CLUSTER, tempo_bpm=TEMPO, **lp.options("pulse")),
        )
        reverb = await services.start(
            bb3.run_reverb,
            bb3.ReverbConfig(cluster_id=CLUSTER, keyring=ring, **lp.options("reverb")),
        )
        # 1. claims under another agent's id: stored and acknowledged, but the reverb refuses
        #    them (the signature does not match the keyring's key for that id)
        before = await _status_stream_messages(lp)
        impostor = bb3.Config(
            cluster_id=CLUSTER,
            agent_id="agent-2",
            signing_key=honest_key,  # agent-1's key, claiming to be agent-2
            jetstream=True,
            **lp.options("agent"),
        )
        async with bb3.open_client(impostor) as client:
            with trio.fail_after(10):
                await client.wait_for_beat()
                for _ in range(3):
                    await client.emit_status(bb3.StatusClaim(task_id="x", state="failed"))
                await client.flush_claims()
            assert client.health().metrics["claims_acked"] >= 3
        await wait_until(lambda: reverb.rejected >= 3, "the reverb to refuse the claims")
        assert reverb.claims_counted == 0
        assert reverb.rejected_by_reason.get("wrong_key") == 3
        assert "agent-2" not in reverb.latest_claims
        assert await _status_stream_messages(lp) == before + 3

        # 2. JetStream answers where the publisher says: a claim (or any JetStream request)
        #    whose reply subject is the beat subject or the pulse lease's key makes the server
        #    publish the PubAck there, in the agent's stead
        async with (
            trio_asyncio.open_loop(),
            open_nc(lp, "operator") as (operator, _),
            open_nc(lp, "pulse") as (pulse, _),
            open_nc(lp, "agent") as (agent, errors),
        ):
            aio = trio_asyncio.aio_as_trio
            await aio(operator.subscribe)(BEAT, cb=watcher.on_message)
            await aio(operator.flush)()
            pubacks = await _stored_pubacks_in_bar_history(lp)
            listener = bb3.Config(
                cluster_id=CLUSTER, agent_id="agent-1", jitter_tolerance=0.2, **lp.options("agent")
            )
            async with bb3.open_client(listener) as client:
                with trio.fail_after(10):
                    await client.wait_for_beat()
                claim = encode_claim(
                    bb3.StatusClaim(agent_id="agent-9", task_id="x", hlc="1:0:1", state="done")
                )
                await aio(agent.publish)(STATUS, claim, reply=BEAT)
                await aio(agent.publish)("$JS.API.STREAM.NAMES", b"", reply=BEAT)
                await aio(agent.publish)(STATUS, claim + b" ", reply=LEASE_SUBJECT)
                await aio(agent.publish)(STATUS, claim + b"   ", reply=TEMPO_SUBJECT)
                await aio(agent.publish)(STATUS, claim + b"    ", reply=BAR)
                # an API subject as the reply is not obeyed: the stream is neither deleted
                # nor purged
                claims = status_stream_name(CLUSTER)
                for api in (f"$JS.API.STREAM.DELETE.{claims}", f"$JS.API.STREAM.PURGE.{claims}"):
                    await aio(agent.publish)(STATUS, claim + b"  ", reply=api)
                await aio(agent.flush)()
                await wait_until(
                    lambda: client.health().metrics["malformed"] >= 2,
                    "the client to count the reflected answers",
                )
                await wait_until(lambda: pulse_status.bad_tempo_messages >= 1, "a bad tempo")
                published = pulse_status.published
                await wait_until(
                    lambda: pulse_status.published >= published + 3, "the pulse to go on"
                )
            entry = await aio(pulse.jetstream().get_msg)(
                f"KV_{lease_bucket_name(CLUSTER)}", subject=LEASE_SUBJECT, direct=False
            )
        assert errors == []  # nothing above broke a permission
        reflected = [json.loads(d) for d in watcher.on(BEAT) if not d.startswith(b'{"type":"back')]
        assert len(reflected) == 2
        assert {"stream": status_stream_name(CLUSTER), "seq": before + 4} in reflected
        names = next(r for r in reflected if r.get("type", "").endswith("stream_names_response"))
        assert status_stream_name(CLUSTER) in names["streams"]
        assert await _stored_pubacks_in_bar_history(lp) == pubacks + 1
        assert json.loads(bytes(entry.data))["stream"] == status_stream_name(CLUSTER)
        # stored: the impostor's 3 claims, then the 6 raw ones (the stream is still there)
        assert await _status_stream_messages(lp) == before + 3 + 6
        services.cancel_scope.cancel()
    assert lp.violations() == []


async def test_agents_sharing_the_agent_user_read_each_others_pubacks(lp: Server) -> None:
    await _ensure_streams(lp)
    watcher = Watcher()
    async with trio_asyncio.open_loop(), open_nc(lp, "agent") as (other, errors):
        aio = trio_asyncio.aio_as_trio
        await aio(other.subscribe)(f"{inbox_prefix('agent')}.>", cb=watcher.on_message)
        await aio(other.flush)()
        cfg = bb3.Config(
            cluster_id=CLUSTER, agent_id="agent-3", jetstream=True, **lp.options("agent")
        )
        async with bb3.open_client(cfg) as client:
            await client.emit_status(bb3.StatusClaim(task_id="t", state="planning"))
            with trio.fail_after(10):
                await client.flush_claims()
            await wait_until(
                lambda: any(b'"seq":' in data for _, data in watcher.got),
                "the other agent to see the PubAck",
            )
    assert errors == []
    # it sees the client's JetStream answers: the stream lookup, then the PubAck
    pubacks = [json.loads(data) for _, data in watcher.got if b'"seq":' in data]
    assert pubacks[0]["stream"] == status_stream_name(CLUSTER)
    assert all(subject.startswith(f"{inbox_prefix('agent')}.") for subject, _ in watcher.got)


async def test_a_reflected_puback_on_the_lease_key_does_not_cost_the_ha_pulses_their_leader(
    lp: Server,
) -> None:
    await _ensure_streams(lp)
    async with trio.open_nursery() as services:
        pulses = [
            await services.start(
                bb3.run_ha_pulse,
                bb3.HAPulseConfig(
                    cluster_id=CLUSTER,
                    pulse_id=pid,
                    tempo_bpm=TEMPO,
                    start_index=200_000,
                    lease_ttl=1.0,
                    **lp.options("pulse"),
                ),
            )
            for pid in ("p1", "p2")
        ]
        await wait_until(lambda: any(p.role == "leader" for p in pulses), "a leader")
        leader = next(p for p in pulses if p.role == "leader")
        async with trio_asyncio.open_loop(), open_nc(lp, "agent") as (agent, _):
            claim = b'{"agent_id":"agent-9"}'
            await trio_asyncio.aio_as_trio(agent.publish)(STATUS, claim, reply=LEASE_SUBJECT)
            await trio_asyncio.aio_as_trio(agent.flush)()
        await trio.sleep(2.0)  # two lease TTLs: a lost lease would have shown by now
        stepped_down = [c for c in leader.changes if c.role == "follower"]
        services.cancel_scope.cancel()
    assert stepped_down == []
    assert leader.kv_overwrites >= 1  # the PubAck did land on the key; the leader wrote over it


# --- the inbox prefix option ---------------------------------------------------------------------
def test_inbox_prefix_reaches_nats_py_and_comes_from_the_environment() -> None:
    from backbeat_trio._bridge.options import nats_options
    from backbeat_trio._transport.options import connection_kwargs_from_env

    assert "inbox_prefix" not in nats_options(bb3.ConnectionOptions())
    opts = nats_options(bb3.ConnectionOptions(inbox_prefix="_INBOX_agent"))
    assert opts["inbox_prefix"] == "_INBOX_agent"
    env = {"BACKBEAT_NATS_INBOX_PREFIX": "_INBOX_operator.eu"}
    assert connection_kwargs_from_env(env)["inbox_prefix"] == "_INBOX_operator.eu"
    cfg = bb3.Config.from_env(env, cluster_id=CLUSTER, agent_id="agent-1")
    assert cfg.inbox_prefix == "_INBOX_operator.eu"


@pytest.mark.parametrize("bad", ["", "_INBOX.*", "_INBOX.>", "a..b", "a.", ".a", "a b", 7])
def test_inbox_prefix_must_be_a_subject_prefix_without_wildcards(bad: object) -> None:
    with pytest.raises(bb3.ConfigError, match="inbox_prefix"):
        bb3.ConnectionOptions(inbox_prefix=bad)  # type: ignore[arg-type]
