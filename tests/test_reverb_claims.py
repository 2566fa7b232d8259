"""Claims at the reverb, over a real nats-server: every bad claim is rejected and counted (by
reason, and in the published BarReports' ``rejected``), every valid claim is accepted.

Two reverbs judge the same traffic from the JetStream status stream: a strict one (unsigned
claims refused) and a lenient one (``allow_unsigned=True``). The traffic is a real signing agent
(``open_client``) plus an attacker publishing crafted claims with crafted headers.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import msgspec
import pytest
import trio
import trio_asyncio
from _guards import fail_on_bare_cancel
from nacl.signing import SigningKey

import backbeat_trio as bb3
from backbeat_trio._bridge.nats import NatsTransport, open_nats_transport
from backbeat_trio._core.beats import bar_subject, status_subject
from backbeat_trio._core.hlc import HLC, HLCStamp, node_id_for
from backbeat_trio._core.signing import HEADER_AGENT, HEADER_KEY, HEADER_SIG, sign_headers
from backbeat_trio._core.wire import encode_claim
from backbeat_trio._embedded import NatsServerProcess

pytestmark = pytest.mark.nats

STRICT = "reverb-strict"
LENIENT = "reverb-lenient"


@dataclass
class Crafted:
    """One claim the attacker publishes, and how each reverb must judge it."""

    what: str
    body: bytes
    headers: dict[str, str]
    strict: str  # "accepted" or the rejection reason
    lenient: str


@dataclass
class Keys:
    agent_1: SigningKey = field(default_factory=bb3.generate_signing_key)
    agent_2: SigningKey = field(default_factory=bb3.generate_signing_key)
    agent_3: SigningKey = field(default_factory=bb3.generate_signing_key)  # the real client
    stranger: SigningKey = field(default_factory=bb3.generate_signing_key)

    def keyring(self) -> bb3.Keyring:
        return bb3.Keyring(
            {
                "agent-1": self.agent_1.verify_key,
                "agent-2": self.agent_2.verify_key,
                "agent-3": self.agent_3.verify_key,
            }
        )


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def craft_all(keys: Keys, beat: int, copies: int) -> list[Crafted]:
    """``copies`` claims of every kind, each with a fresh HLC stamp."""
    clocks = {name: HLC(name) for name in ("agent-1", "agent-2", "stranger")}

    def body(agent: str = "agent-1", **changes: object) -> bytes:
        claim = bb3.StatusClaim(
            agent_id=agent,
            task_id="task:crafted",
            beat_index=beat,
            hlc=str(clocks.get(agent, clocks["agent-1"]).now()),
            state="executing",
            beats_left=3,
            progress=0.5,
            notes="crafted",
        )
        data = encode_claim(claim)
        if changes:
            raw = msgspec.json.decode(data)
            raw.update(changes)
            data = msgspec.json.encode(raw)
        return data

    def signed(data: bytes, key: SigningKey, agent: str = "agent-1") -> dict[str, str]:
        return sign_headers(key, agent, data)

    def altered(what: str, key: SigningKey, changes: dict[str, str], reason: str) -> Crafted:
        """A fresh agent-1 claim signed with ``key``, its headers then changed by ``changes``;
        both reverbs reject it for ``reason``."""
        data = body()
        return Crafted(what, data, {**signed(data, key), **changes}, reason, reason)

    out: list[Crafted] = []
    for _ in range(copies):
        ok1 = body()
        ok2 = body("agent-2")
        out.append(Crafted("valid agent-1", ok1, signed(ok1, keys.agent_1), "accepted", "accepted"))
        out.append(
            Crafted(
                "valid agent-2", ok2, signed(ok2, keys.agent_2, "agent-2"), "accepted", "accepted"
            )
        )
        # a replay of an accepted claim, under a new message id (the stream would drop the same
        # id as a duplicate: see test_a_replay_under_the_same_message_id_is_absorbed_by_the_stream)
        replay_headers = {
            **signed(ok1, keys.agent_1),
            "Nats-Msg-Id": f"replay:{os.urandom(6).hex()}",
        }
        out.append(Crafted("replay", ok1, replay_headers, "replay", "replay"))

        # forged signatures
        out.append(
            altered(
                "random signature", keys.agent_1, {HEADER_SIG: b64(os.urandom(64))}, "bad_signature"
            )
        )
        data = body()
        other = signed(body(), keys.agent_1)  # a genuine signature, of other bytes
        out.append(
            Crafted("signature of other bytes", data, other, "bad_signature", "bad_signature")
        )
        data = body()
        tampered = data.replace(b'"progress":0.5', b'"progress":1.0')
        assert tampered != data
        out.append(
            Crafted(
                "altered after signing",
                tampered,
                signed(data, keys.agent_1),
                "bad_signature",
                "bad_signature",
            )
        )
        # keys that are not the agent's
        data = body("stranger")
        out.append(
            Crafted(
                "unknown agent and key",
                data,
                signed(data, keys.stranger, "stranger"),
                "unknown_agent",
                "unknown_agent",
            )
        )
        out.append(
            altered(
                "agent-1 claim signed with agent-2's key",
                keys.agent_2,
                {HEADER_KEY: b64(bytes(keys.agent_2.verify_key))},
                "wrong_key",
            )
        )
        out.append(
            altered(
                "agent-2's signature under agent-1's key header",
                keys.agent_2,
                {HEADER_KEY: b64(bytes(keys.agent_1.verify_key))},
                "bad_signature",
            )
        )
        out.append(
            altered(
                "headers name another agent",
                keys.agent_1,
                {HEADER_AGENT: "agent-2"},
                "agent_mismatch",
            )
        )
        out.append(
            altered("signature not base64", keys.agent_1, {HEADER_SIG: "not base64!"}, "malformed")
        )
        data = body()
        headers = signed(data, keys.agent_1)
        del headers[HEADER_AGENT]
        out.append(Crafted("no agent header", data, headers, "malformed", "malformed"))
        # unsigned: refused by the strict reverb, accepted by the lenient one
        out.append(Crafted("unsigned", body(), {}, "unsigned", "accepted"))
        # schema-invalid, signed over the exact (bad) bytes, and unsigned
        for what, data in [
            ("unknown state", body(state="sleeping")),
            ("progress > 1", body(progress=2.0)),
            ("negative beats_left", body(beats_left=-1)),
            ("notes too long", body(notes="n" * 5000)),
            ("no hlc", body(hlc="")),
            ("bad agent id", body(agent_id="agent 1")),
            ("not JSON", b"{claim"),
            ("wrong type tag", body(type="backbeat.beatframe.v1")),
        ]:
            out.append(
                Crafted(f"schema: {what}", data, signed(data, keys.agent_1), "schema", "schema")
            )
            out.append(Crafted(f"schema unsigned: {what}", data, {}, "schema", "schema"))
        # a genuine claim naming a window far ahead would pin the aggregator's memory
        data = body(beat_index=beat + 10_000)
        far = "claim names a window too far ahead"
        out.append(Crafted("window far ahead", data, signed(data, keys.agent_1), far, far))
    return out


class ReportLog:
    """The BarReports published on the cluster's bar subject, by the HLC node of their reverb."""

    def __init__(self) -> None:
        self.by_node: dict[int, list[bb3.BarReport]] = collections.defaultdict(list)
        self.changed = trio.Event()

    async def collect(
        self, transport: NatsTransport, cluster: str, *, task_status: trio.TaskStatus[None]
    ) -> None:
        sub = await transport.subscribe(bar_subject(cluster), buffer=10_000)
        task_status.started()
        async for msg in sub.messages:
            report = msgspec.json.decode(msg.data, type=bb3.BarReport)
            self.by_node[HLCStamp.parse(report.hlc).node].append(report)
            self.changed.set()
            self.changed = trio.Event()

    def of(self, reverb_id: str) -> list[bb3.BarReport]:
        return self.by_node[node_id_for(reverb_id)]


@contextlib.asynccontextmanager
async def open_attacker_and_pulse(
    nats_url: str, cluster: str
) -> AsyncIterator[tuple[trio.Nursery, NatsTransport]]:
    """In a trio-asyncio loop of its own: the attacker's connection and a 240 BPM pulse running in
    a nursery; the caller starts its reverbs there and cancels the nursery when done."""
    async with trio_asyncio.open_loop():
        attacker_cfg = bb3.Config(cluster_id=cluster, agent_id="attacker", nats_url=nats_url)
        async with trio.open_nursery() as nursery, open_nats_transport(attacker_cfg) as attacker:
            await nursery.start(
                bb3.run_pulse, bb3.PulseConfig(cluster_id=cluster, nats_url=nats_url, tempo_bpm=240)
            )
            yield nursery, attacker


def fresh_claim(agent: str, task_id: str, notes: str) -> bb3.StatusClaim:
    """A claim by ``agent`` stamped by a new HLC of its own."""
    return bb3.StatusClaim(agent_id=agent, task_id=task_id, hlc=str(HLC(agent).now()), notes=notes)


async def wait_for_reports(
    status: bb3.ReverbStatus, predicate: Callable[[], bool], what: str
) -> None:
    """Wait report by report (one per bar) until ``predicate`` holds; bounded."""
    with trio.move_on_after(30):
        while not predicate():
            await status.wait_for_report()
    assert predicate(), f"timed out waiting for {what}: {status!r}"


@fail_on_bare_cancel
async def test_reverb_rejects_every_bad_claim_and_accepts_every_valid_one(
    nats_server: NatsServerProcess, nats_url: str
) -> None:
    cluster = "reverb-claims"
    keys = Keys()
    copies = 3
    valid_from_client = 20
    reports = ReportLog()

    def reverb_cfg(reverb_id: str, allow_unsigned: bool) -> bb3.ReverbConfig:
        return bb3.ReverbConfig(
            cluster_id=cluster,
            nats_url=nats_url,
            keyring=keys.keyring(),
            allow_unsigned=allow_unsigned,
            reverb_id=reverb_id,
        )

    agent_cfg = bb3.Config(
        cluster_id=cluster, agent_id="agent-3", nats_url=nats_url, signing_key=keys.agent_3
    )
    async with open_attacker_and_pulse(nats_url, cluster) as (nursery, attacker):
        await nursery.start(reports.collect, attacker, cluster)
        strict = await nursery.start(bb3.run_reverb, reverb_cfg(STRICT, False))
        lenient = await nursery.start(bb3.run_reverb, reverb_cfg(LENIENT, True))
        assert strict.stream == lenient.stream == f"BACKBEAT_STATUS_{cluster}"
        async with bb3.open_client(agent_cfg) as agent:
            assert agent.delivery_mode == "jetstream"
            with trio.fail_after(10):
                beat = (await agent.wait_for_beat()).beat_index
            crafted = craft_all(keys, beat, copies)
            for c in crafted:
                attacker.publish(status_subject(cluster), c.body, headers=c.headers)
            await attacker.flush()
            for i in range(valid_from_client):
                await agent.emit_status(bb3.StatusClaim(state="executing", notes=f"real {i}"))
            with trio.fail_after(20):
                await agent.flush_claims()

        def judged(status: bb3.ReverbStatus) -> int:
            return status.claims_counted + status.claims_late + status.rejected

        total = len(crafted) + valid_from_client
        for status in (strict, lenient):
            await wait_for_reports(status, lambda s=status: judged(s) >= total, "every claim")
            # two more windows close, so every claim and rejection is in a published report
            with trio.fail_after(10):
                await status.wait_for_report()
                await status.wait_for_report()
        with trio.fail_after(10):
            while any(
                len(reports.of(r)) < s.reports for r, s in ((STRICT, strict), (LENIENT, lenient))
            ):
                await reports.changed.wait()
        # (a reverb already woken by a beat may still publish one more report after this)
        reports_made = {STRICT: strict.reports, LENIENT: lenient.reports}
        nursery.cancel_scope.cancel()

    for reverb_id, status, verdict in ((STRICT, strict, "strict"), (LENIENT, lenient, "lenient")):
        expected = collections.Counter(getattr(c, verdict) for c in crafted)
        accepted = expected.pop("accepted") + valid_from_client
        rejected = sum(expected.values())
        where = f"{reverb_id}: {status!r}"
        assert judged(status) == len(crafted) + valid_from_client, where
        # 100 % of the valid claims accepted, 100 % of the bad ones rejected, for the right reason
        assert status.claims_counted + status.claims_late == accepted, where
        assert status.rejected == rejected, where
        assert status.rejection_reasons == dict(expected), where
        # and the published reports say so
        published = reports.of(reverb_id)
        assert len(published) >= reports_made[reverb_id] > 2
        assert sum(r.rejected for r in published) == rejected, where
        assert sum(r.claims + r.late for r in published) == accepted, where
        states = set().union(*(set(r.by_state) for r in published))
        assert "executing" in states
    # the lenient reverb took exactly the unsigned valid claims on top
    assert lenient.claims_counted + lenient.claims_late == (
        strict.claims_counted + strict.claims_late + copies
    )
    assert "agent-3" in strict.latest_claims
    assert strict.latest_claims["agent-3"].notes.startswith("real ")


async def _one_reverb(
    nats_url: str, cluster: str, keys: Keys, claims: list[tuple[bytes, dict[str, str]]]
) -> bb3.ReverbStatus:
    """Publish ``claims`` (then one valid claim) at a strict reverb; return its status once the
    valid claim is in."""
    rcfg = bb3.ReverbConfig(cluster_id=cluster, nats_url=nats_url, keyring=keys.keyring())
    async with open_attacker_and_pulse(nats_url, cluster) as (nursery, attacker):
        status = await nursery.start(bb3.run_reverb, rcfg)
        for body, headers in claims:
            attacker.publish(status_subject(cluster), body, headers=headers)
        last = fresh_claim("agent-2", "task:last", "last")
        last_body = encode_claim(last)
        attacker.publish(
            status_subject(cluster),
            last_body,
            headers=sign_headers(keys.agent_2, "agent-2", last_body),
        )
        await attacker.flush()
        await wait_for_reports(
            status, lambda: "agent-2" in status.latest_claims, "the last valid claim"
        )
        with trio.fail_after(10):  # rejection_reasons is refreshed with each report
            await status.wait_for_report()
        nursery.cancel_scope.cancel()
    return status


@fail_on_bare_cancel
async def test_a_replay_under_the_same_message_id_is_absorbed_by_the_stream(
    nats_server: NatsServerProcess, nats_url: str
) -> None:
    keys = Keys()
    claim = fresh_claim("agent-1", "task:once", "once")
    body = encode_claim(claim)
    headers = {**sign_headers(keys.agent_1, "agent-1", body), "Nats-Msg-Id": f"agent-1:{claim.hlc}"}
    status = await _one_reverb(nats_url, "reverb-dedupe", keys, [(body, headers)] * 3)
    # the stream kept one copy: counted once, and the copies are not even seen as replays
    assert status.claims_counted + status.claims_late == 2  # the claim, and the last one
    assert status.rejected == 0
    assert status.latest_claims["agent-1"].notes == "once"


@fail_on_bare_cancel
async def test_a_claim_with_invalid_utf8_is_rejected_and_the_reverb_goes_on(
    nats_server: NatsServerProcess, nats_url: str
) -> None:
    keys = Keys()
    claim = fresh_claim("agent-1", "task:utf8", "NOTE")
    body = encode_claim(claim).replace(b"NOTE", b"N\xffTE")
    status = await _one_reverb(
        nats_url, "reverb-utf8", keys, [(body, sign_headers(keys.agent_1, "agent-1", body))]
    )
    assert status.rejected == 1
    assert status.rejection_reasons == {"schema": 1}
