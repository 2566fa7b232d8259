"""Bounded storage: the status stream and the bar history keep at most their bounds.

The reverb creates ``BACKBEAT_STATUS_<cluster>`` and ``BACKBEAT_BARS_<cluster>`` bounded by age
and bytes (discard old), brings streams that exist without those bounds up to date, and a flood
on either subject cannot grow them past the bound while honest claims and reports still land.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

import backbeat_trio as bb3
from backbeat_trio._bridge.nats import open_nats_transport
from backbeat_trio._cli.common import EXIT_USAGE
from backbeat_trio._cli.main import build_parser, main
from backbeat_trio._core.beats import bar_subject, status_stream_name, status_subject
from backbeat_trio._core.wire import BarReport, encode
from backbeat_trio._errors import ConfigError
from backbeat_trio._services.history import (
    DEFAULT_BAR_HISTORY,
    bar_report_headers,
    bar_stream_name,
    ensure_bar_stream,
)
from backbeat_trio._services.pulse import PulseConfig, run_pulse
from backbeat_trio._services.reverb import ReverbConfig, run_reverb
from backbeat_trio._services.storage import (
    BAR_MAX_AGE,
    BAR_MAX_BYTES,
    STATUS_MAX_AGE,
    STATUS_MAX_BYTES,
)
from backbeat_trio._transport.jetstream import StreamLimits
from backbeat_trio.testing.memory import MemoryBroker, stored_size

MIB = 1024 * 1024


# --- what an existing stream is updated to -------------------------------------------------------
def test_an_unbounded_stream_gets_every_bound_asked_for() -> None:
    asked = StreamLimits(max_bytes=MIB, max_age=3600.0, duplicate_window=120.0)
    updated = asked.conform(StreamLimits(duplicate_window=120.0))
    assert updated == StreamLimits(max_bytes=MIB, max_age=3600.0, duplicate_window=120.0)
    assert asked.conform(updated) is None  # already in force: no update


def test_other_bounds_are_replaced_and_unasked_ones_kept() -> None:
    existing = StreamLimits(max_msgs=50, max_bytes=8 * MIB, max_age=7200.0, discard="new")
    updated = StreamLimits(max_bytes=MIB).conform(existing)
    # the byte bound asked for wins; the message and age bounds nobody asked about stay
    assert updated == StreamLimits(max_msgs=50, max_bytes=MIB, max_age=7200.0, discard="old")
    # asking for no bound at all never loosens (or touches) a stream
    assert StreamLimits().conform(existing) is None


def test_a_duplicate_window_longer_than_the_new_age_is_shortened() -> None:
    existing = StreamLimits(duplicate_window=600.0)
    updated = StreamLimits(max_age=300.0, duplicate_window=120.0).conform(existing)
    assert updated is not None
    assert updated.max_age == 300.0
    assert updated.duplicate_window == 120.0
    kept = StreamLimits(max_age=3600.0, duplicate_window=120.0).conform(existing)
    assert kept is not None
    assert kept.duplicate_window == 600.0  # still inside the age: left alone


# --- configuration --------------------------------------------------------------------------------
def test_defaults_when_nothing_is_configured() -> None:
    cfg = ReverbConfig(cluster_id="c")
    assert (cfg.status_max_age, cfg.status_max_bytes) == (STATUS_MAX_AGE, STATUS_MAX_BYTES)
    assert (cfg.bar_max_age, cfg.bar_max_bytes) == (BAR_MAX_AGE, BAR_MAX_BYTES)
    assert cfg.bar_max_reports == DEFAULT_BAR_HISTORY
    # the status stream's duplicate window must stay inside its age
    assert cfg.status_max_age is not None
    assert cfg.status_max_age >= cfg.duplicate_window


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("status_max_bytes", 1000),
        ("status_max_bytes", 0),
        ("status_max_bytes", True),
        ("status_max_bytes", 1.5e6),
        ("status_max_age", 60.0),  # shorter than the duplicate window (120 s)
        ("status_max_age", 0.0),
        ("status_max_age", float("inf")),
        ("status_max_age", float("nan")),
        ("bar_max_age", 300.0),  # shorter than the bar stream's duplicate window (600 s)
        ("bar_max_bytes", MIB - 1),
        ("bar_max_reports", 0),
        ("bar_max_reports", -5),
        ("duplicate_window", 0.0),
    ],
)
def test_bad_bounds_are_config_errors_before_connecting(field: str, value: object) -> None:
    # nothing listens on port 1: a config that got as far as connecting would fail otherwise
    with pytest.raises(ConfigError, match=field):
        ReverbConfig(cluster_id="c", nats_url="nats://127.0.0.1:1", **{field: value})


def test_no_limit_is_a_choice() -> None:
    cfg = ReverbConfig(cluster_id="c", status_max_age=None, status_max_bytes=-1)
    assert (cfg.status_max_age, cfg.status_max_bytes) == (None, -1)


async def test_bar_history_bounds_are_checked() -> None:
    transport = MemoryBroker().connect()
    with pytest.raises(ConfigError, match="max_bytes"):
        await ensure_bar_stream(transport, "c", max_bytes=4096)
    with pytest.raises(ConfigError, match="max_age"):
        await ensure_bar_stream(transport, "c", max_age=60.0)


def test_the_cli_refuses_bad_bounds_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    where = ["-s", "nats://127.0.0.1:1", "-c", "c", "--allow-unsigned"]
    assert main(["reverb", *where, "--status-max-bytes", "1000"]) == EXIT_USAGE
    assert "status_max_bytes" in capsys.readouterr().err
    assert main(["reverb", *where, "--bar-max-age", "5m"]) == EXIT_USAGE
    assert "bar_max_age" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reverb", "--status-max-bytes", "lots"])


# --- the in-memory double -------------------------------------------------------------------------
async def test_a_memory_stream_keeps_its_byte_bound() -> None:
    broker = MemoryBroker()
    transport = broker.connect()
    broker.add_stream("S", ["s.>"])  # created without limits, as an old reverb did
    for i in range(200):
        transport.publish("s.x", b"%04d" % i + b"x" * 2000)
    stream = broker.streams["S"]
    assert len(stream.messages) == 200
    await transport.jetstream.ensure_stream("S", ["s.>"], max_bytes=100_000)
    # the update cuts at once, oldest first
    assert stream.stored_bytes == sum(map(stored_size, stream.messages)) <= 100_000
    assert stream.messages[-1].data.startswith(b"0199")
    for i in range(200, 1200):
        transport.publish("s.x", b"%04d" % i + b"x" * 2000)
    assert stream.stored_bytes == sum(map(stored_size, stream.messages)) <= 100_000
    assert stream.stored_bytes > 100_000 - 2100  # full up to the last message that fits
    assert stream.messages[-1].data.startswith(b"1199")
    assert stream.messages[0].seq == 1200 - len(stream.messages) + 1


# --- a real nats-server ---------------------------------------------------------------------------
class RawJS:
    """A plain nats-py client (a fresh asyncio loop in a worker thread per call), to read stream
    info and to flood a subject as a peer with publish rights would."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def _run(self, job: Callable[[Any], Awaitable[Any]]) -> Any:
        import nats

        async def go() -> Any:
            nc = await nats.connect(self.url, allow_reconnect=False, connect_timeout=5)
            try:
                return await job(nc)
            finally:
                await nc.close()

        return await trio.to_thread.run_sync(asyncio.run, go())

    async def info(self, name: str) -> Any:
        """The stream's info (config and state)."""
        return await self._run(lambda nc: nc.jetstream().stream_info(name))

    async def publish(self, subject: str, data: bytes, headers: dict[str, str]) -> int:
        """A JetStream publish; the stream sequence it was stored at."""

        async def job(nc: Any) -> int:
            ack = await nc.jetstream().publish(subject, data, headers=headers)
            return int(ack.seq)

        return int(await self._run(job))

    async def flood(self, subject: str, count: int, size: int) -> int:
        """``count`` publishes of ``size`` bytes on ``subject``: core publishes, and the last one
        a JetStream publish, whose ack comes once the stream has taken all of them (one
        connection's messages reach a stream in order). Returns the last one's sequence."""

        async def job(nc: Any) -> int:
            for i in range(count - 1):
                await nc.publish(subject, b"%06d" % i + b"\x00" * (size - 6))
            ack = await nc.jetstream().publish(subject, b"\x00" * size, timeout=10)
            return int(ack.seq)

        return int(await self._run(job))


def _config(cluster: str, url: str) -> bb3.Config:
    return bb3.Config(cluster_id=cluster, agent_id="bounds", nats_url=url, connect_attempts=3)


@pytest.mark.nats
async def test_the_reverb_creates_bounded_streams_by_default(nats_url: str) -> None:
    cluster = "sb-defaults"
    js = RawJS(nats_url)
    async with trio.open_nursery() as nursery:
        cfg = ReverbConfig(cluster_id=cluster, nats_url=nats_url, allow_unsigned=True)
        await nursery.start(run_reverb, cfg)
        status = (await js.info(status_stream_name(cluster))).config
        bars = (await js.info(bar_stream_name(cluster))).config
        nursery.cancel_scope.cancel()
    assert (status.max_bytes, status.max_age) == (STATUS_MAX_BYTES, STATUS_MAX_AGE)
    assert status.discard == "old"
    assert status.duplicate_window == cfg.duplicate_window
    assert (bars.max_bytes, bars.max_age, bars.max_msgs) == (
        BAR_MAX_BYTES,
        BAR_MAX_AGE,
        DEFAULT_BAR_HISTORY,
    )
    assert bars.discard == "old"


@pytest.mark.nats
async def test_existing_unbounded_streams_get_the_bounds(nats_url: str) -> None:
    cluster = "sb-existing"
    js = RawJS(nats_url)
    # created the way a reverb before bounded storage did: no limits at all
    async with open_nats_transport(_config(cluster, nats_url)) as transport:
        await transport.jetstream.ensure_stream(
            status_stream_name(cluster), [status_subject(cluster)]
        )
        await transport.jetstream.ensure_stream(
            bar_stream_name(cluster), [bar_subject(cluster)], duplicate_window=600.0
        )
    assert (await js.info(status_stream_name(cluster))).config.max_bytes in (None, -1)
    await js.flood(status_subject(cluster), 1500, 2048)
    await js.flood(bar_subject(cluster), 1500, 2048)
    before = await js.info(status_stream_name(cluster))
    assert before.state.bytes > 2 * MIB
    cfg = ReverbConfig(
        cluster_id=cluster,
        nats_url=nats_url,
        allow_unsigned=True,
        status_max_bytes=MIB,
        status_max_age=3600.0,
        bar_max_bytes=MIB,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(run_reverb, cfg)
        nursery.cancel_scope.cancel()
    for name in (status_stream_name(cluster), bar_stream_name(cluster)):
        info = await js.info(name)
        assert info.config.max_bytes == MIB, name
        assert 0 < info.state.bytes <= MIB, name
        assert info.state.first_seq > 1, name  # the oldest went
        assert info.state.last_seq == 1500, name  # the newest stayed
    assert (await js.info(status_stream_name(cluster))).config.max_age == 3600.0
    # the bar stream kept its own duplicate window; its age is the default
    bars = (await js.info(bar_stream_name(cluster))).config
    assert (bars.duplicate_window, bars.max_age) == (600.0, BAR_MAX_AGE)


@pytest.mark.nats
async def test_a_flood_cannot_grow_the_streams_past_their_bounds(nats_url: str) -> None:
    cluster = "sb-flood"
    flood, size = 3000, 2048  # about 6 MiB per subject against a 1 MiB bound
    cfg = ReverbConfig(
        cluster_id=cluster,
        nats_url=nats_url,
        allow_unsigned=True,
        status_max_bytes=MIB,
        bar_max_bytes=MIB,
    )
    js = RawJS(nats_url)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            run_pulse, PulseConfig(cluster_id=cluster, nats_url=nats_url, tempo_bpm=600)
        )
        reverb = await nursery.start(run_reverb, cfg)
        with trio.fail_after(30):
            await js.flood(status_subject(cluster), flood, size)
            await js.flood(bar_subject(cluster), flood, size)
        for name in (status_stream_name(cluster), bar_stream_name(cluster)):
            info = await js.info(name)
            assert 0 < info.state.bytes <= MIB, (name, info.state)
            assert info.state.messages < flood // 4, (name, info.state)
            assert info.state.last_seq >= flood, (name, info.state)  # everything was stored once
            assert info.state.first_seq > flood // 2, (name, info.state)  # the oldest went
        # an honest agent's claims still land: acknowledged by the stream, counted by the reverb
        async with bb3.open_client(_config(cluster, nats_url)) as client:
            assert client.delivery_mode == "jetstream"
            counted = reverb.claims_counted
            with trio.fail_after(15):
                await client.wait_for_beat()
                for _ in range(3):
                    await client.emit_status(bb3.StatusClaim(state="executing", progress=0.5))
                await client.flush_claims()
                while reverb.claims_counted < counted + 3:
                    await reverb.wait_for_report()  # a window's claims are counted before it
        assert client.undelivered() == []
        info = await js.info(status_stream_name(cluster))
        assert info.state.bytes <= MIB
        assert info.state.last_seq == flood + 3
        # and an honest report still lands in the bar history
        report = BarReport(
            cluster_id=cluster,
            window_id="0" * 32,
            from_beat=10**9,
            to_beat=10**9 + 3,
            hlc="000000000001:0000:0001",
        )
        before = (await js.info(bar_stream_name(cluster))).state.last_seq
        stored = await js.publish(bar_subject(cluster), encode(report), bar_report_headers(report))
        assert stored > before
        info = await js.info(bar_stream_name(cluster))
        assert info.state.bytes <= MIB
        assert info.state.last_seq == stored
        nursery.cancel_scope.cancel()


@pytest.mark.nats
async def test_the_cli_flags_reach_the_streams(nats_url: str) -> None:
    cluster = "sb-cli"
    args = build_parser().parse_args(
        [
            "reverb",
            "-s",
            nats_url,
            "-c",
            cluster,
            "--allow-unsigned",
            "--status-max-bytes",
            "2MiB",
            "--status-max-age",
            "2h",
            "--bar-max-bytes",
            "3MiB",
            "--bar-max-age",
            "7d",
        ]
    )
    js = RawJS(nats_url)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(args.handler, args)
        with trio.fail_after(15):
            while True:
                with contextlib.suppress(Exception):
                    bars = (await js.info(bar_stream_name(cluster))).config
                    break
                await trio.sleep(0.05)
        status = (await js.info(status_stream_name(cluster))).config
        nursery.cancel_scope.cancel()
    assert (status.max_bytes, status.max_age) == (2 * MIB, 7200.0)
    assert (bars.max_bytes, bars.max_age) == (3 * MIB, 7 * 86400.0)
