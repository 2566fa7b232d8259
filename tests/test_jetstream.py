"""The JetStream interface: one contract, run on the memory broker and on a real nats-server."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import trio

from backbeat_trio._bridge.errors import backbeat_error
from backbeat_trio._bridge.nats import open_nats_transport
from backbeat_trio._client.config import Config
from backbeat_trio._errors import JetStreamError, NotConnected
from backbeat_trio._transport.base import Transport
from backbeat_trio._transport.jetstream import KV_OPERATION_HEADER, KVEntry, StreamSummary
from backbeat_trio.testing.memory import MemoryBroker

KINDS = ["memory", pytest.param("nats", marks=pytest.mark.nats)]


@contextlib.asynccontextmanager
async def open_transport(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    if kind == "memory":
        transport = MemoryBroker().connect()
        try:
            yield transport
        finally:
            await transport.aclose()
        return
    url: str = request.getfixturevalue("nats_url")
    cfg = Config(cluster_id="js", agent_id="js-contract", nats_url=url, connect_attempts=3)
    async with open_nats_transport(cfg) as nats:
        yield nats


async def wait_summary(transport: Transport, name: str, last_seq: int) -> StreamSummary:
    summary = None
    for _ in range(200):
        summary = await transport.jetstream.stream_summary(name)
        if summary is not None and summary.last_seq >= last_seq:
            return summary
        await trio.sleep(0.02)
    raise AssertionError(f"{name} never reached sequence {last_seq}: {summary}")


@pytest.mark.parametrize("kind", KINDS)
async def test_kv_compare_and_set_and_watch(kind: str, request: pytest.FixtureRequest) -> None:
    bucket = f"contract_{kind}"
    async with open_transport(kind, request) as transport:
        js = transport.jetstream.with_op_timeout(2.0)
        assert await js.ensure_kv(bucket, replicas=3) == 1  # one server: one replica
        assert await js.ensure_kv(bucket, replicas=3) == 1  # idempotent
        assert await js.kv_read(bucket, "k") is None
        rev1 = await js.kv_write(bucket, "k", b"a", last=0)
        assert rev1 is not None
        assert await js.kv_write(bucket, "k", b"x", last=0) is None  # create on a key: lost
        assert await js.kv_write(bucket, "k", b"x", last=rev1 + 5) is None  # wrong revision
        other = await js.kv_write(bucket, "other", b"o", last=0)  # another key, same bucket
        assert other is not None
        assert other > rev1
        watch = await js.kv_watch(bucket, "k")
        with trio.fail_after(5):
            assert await watch.entries.receive() == KVEntry(rev1, b"a")  # the latest first
        rev2 = await js.kv_write(bucket, "k", b"b", last=rev1)
        assert rev2 is not None
        assert rev2 > other
        assert await js.kv_read(bucket, "k") == KVEntry(rev2, b"b")
        with trio.fail_after(5):
            assert await watch.entries.receive() == KVEntry(rev2, b"b")  # then each new one
        await js.kv_write(bucket, "other", b"o2", last=other)  # not this key: not watched
        await watch.aclose()
        with pytest.raises(trio.EndOfChannel):
            await watch.entries.receive()
        assert watch.dropped == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_reads(kind: str, request: pytest.FixtureRequest) -> None:
    name, base = f"CONTRACT_{kind}", f"contract.{kind}"
    async with open_transport(kind, request) as transport:
        js = transport.jetstream
        assert await js.stream_summary(name) is None
        assert await js.stream_read(name, f"{base}.>", 1, max_msgs=10) == []
        assert await js.stream_last(name, f"{base}.a") is None
        assert await js.ensure_stream(name, [f"{base}.>"], max_msgs=4) == 1
        assert await js.find_stream(f"{base}.a") == name
        assert await js.find_stream("contract.nowhere") is None
        for i in range(6):
            subject = f"{base}.{'ab'[i % 2]}"
            transport.publish(subject, b"%d" % i, headers={"Nats-Msg-Id": f"m{i}"})
        transport.publish(f"{base}.a", b"dup", headers={"Nats-Msg-Id": "m4"})  # dropped
        await transport.flush()
        summary = await wait_summary(transport, name, 6)
        # six stored, the oldest two dropped by max_msgs, the duplicate never stored
        assert summary[1:4] == (3, 6, 4)
        assert summary.max_msgs == 4
        assert summary.subjects == (f"{base}.>",)
        everything = await js.stream_read(name, f"{base}.>", 1, max_msgs=100)
        assert [(m.seq, m.data) for m in everything] == [(3, b"2"), (4, b"3"), (5, b"4"), (6, b"5")]
        assert (everything[0].headers or {}).get("Nats-Msg-Id") == "m2"
        only_a = await js.stream_read(name, f"{base}.a", 1, max_msgs=100)
        assert [m.data for m in only_a] == [b"2", b"4"]
        bounded = await js.stream_read(name, f"{base}.>", 4, max_msgs=100, stop_seq=5)
        assert [m.seq for m in bounded] == [4, 5]
        assert [m.seq for m in await js.stream_read(name, f"{base}.>", 1, max_msgs=2)] == [3, 4]
        found = await js.stream_find(name, f"{base}.b", 4)
        assert found is not None
        assert (found.seq, found.data) == (4, b"3")
        assert await js.stream_find(name, f"{base}.b", 7) is None
        last = await js.stream_last(name, f"{base}.a")
        assert last is not None
        assert (last.seq, last.subject, last.data) == (5, f"{base}.a", b"4")


@pytest.mark.parametrize("kind", KINDS)
async def test_a_delete_marker_reads_as_no_value(kind: str, request: pytest.FixtureRequest) -> None:
    bucket = f"contract_del_{kind}"
    async with open_transport(kind, request) as transport:
        js = transport.jetstream
        await js.ensure_kv(bucket)
        rev = await js.kv_write(bucket, "k", b"a", last=0)
        assert rev is not None
        transport.publish(f"$KV.{bucket}.k", b"", headers={KV_OPERATION_HEADER: "DEL"})
        await transport.flush()
        for _ in range(100):
            got = await js.kv_read(bucket, "k")
            if got is not None and got.revision > rev:
                break
            await trio.sleep(0.02)
        assert got == KVEntry(rev + 1, None)


@pytest.mark.parametrize("kind", KINDS)
async def test_refusals_are_jetstream_errors(kind: str, request: pytest.FixtureRequest) -> None:
    async with open_transport(kind, request) as transport:
        js = transport.jetstream.with_op_timeout(1.0)
        with pytest.raises(JetStreamError):
            await js.kv_write(f"missing_{kind}", "k", b"v", last=0)  # no such bucket


@pytest.mark.nats
async def test_overlapping_subjects_are_refused_with_a_code(nats_url: str) -> None:
    cfg = Config(cluster_id="js", agent_id="js-overlap", nats_url=nats_url, connect_attempts=3)
    async with open_nats_transport(cfg) as transport:
        await transport.jetstream.ensure_stream("OVERLAP_A", ["overlap.>"])
        with pytest.raises(JetStreamError, match="OVERLAP_B") as info:
            await transport.jetstream.ensure_stream("OVERLAP_B", ["overlap.x"])
        assert info.value.code is not None
        view = transport.view()
        await view.aclose()
        with pytest.raises(NotConnected):
            await view.jetstream.stream_summary("OVERLAP_A")  # a closed view reaches nothing


async def test_memory_jetstream_outages_are_errors() -> None:
    broker = MemoryBroker()
    transport = broker.connect()
    js = transport.jetstream
    await js.ensure_kv("b")
    broker.jetstream_available = False
    with pytest.raises(JetStreamError):
        await js.kv_read("b", "k")
    broker.jetstream_available = True
    broker.set_down()
    with pytest.raises(NotConnected):
        await js.kv_write("b", "k", b"v", last=0)
    broker.set_up()
    assert await js.kv_write("b", "k", b"v", last=0) == 1
    await transport.aclose()
    with pytest.raises(NotConnected):
        await js.kv_read("b", "k")


def test_nats_errors_map_to_backbeat_errors() -> None:
    import nats.errors
    import nats.js.errors

    closed = backbeat_error("x", nats.errors.ConnectionClosedError(), jetstream=True)
    assert isinstance(closed, NotConnected)
    no_answer = backbeat_error("x", nats.errors.NoRespondersError(), jetstream=True)
    assert isinstance(no_answer, JetStreamError)
    timeout = backbeat_error("write b/k", nats.errors.TimeoutError(), jetstream=True)
    assert isinstance(timeout, JetStreamError)
    assert "write b/k" in str(timeout)
    assert timeout.code is None
    refused = backbeat_error("x", nats.js.errors.APIError(code=400, err_code=10058), jetstream=True)
    assert isinstance(refused, JetStreamError)
    assert refused.code == 10058
    odd = backbeat_error("x", RuntimeError("boom"), jetstream=True)
    assert isinstance(odd, JetStreamError)
    assert "boom" in str(odd)
