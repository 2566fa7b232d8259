"""Test your agents with virtual beats: a fake cluster on an in-memory bus and trio's MockClock.

The tests need pytest-trio (``pip install pytest-trio``, and ``trio_mode = true`` under
``[tool.pytest.ini_options]``): its ``autojump_clock`` fixture makes sleeping free, so 100 beats
take no real time. Example::

    from backbeat_trio.testing import open_fake_cluster

    async def test_my_agent_finishes_within_its_budget(autojump_clock):
        async with open_fake_cluster(tempo_bpm=60) as cluster:
            async with cluster.open_client("agent-1") as bb:
                with bb.fail_after_beats(8):
                    await my_agent(bb)            # your code, unchanged
            assert cluster.claims[-1].state == "done"

The fake pulse is the real :func:`run_pulse` publishing on a :class:`MemoryBroker`; frames carry
``deadline_at`` from a virtual wall clock (:func:`virtual_wall_clock`) so staleness and
degradation behave exactly as on a real cluster, just deterministically. Everything proven here is
also proven over a real nats-server in this project's own test-suite. The documentation's
tutorial tests an agent this way, its bar reports included.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Any, TypeVar

import trio

from .._client.client import Client, open_client
from .._client.config import Config
from .._core.beats import (
    bar_subject,
    beat_subject,
    status_stream_name,
    status_subject,
    tempo_subject,
)
from .._core.signing import Keyring
from .._core.wire import BarReport, StatusClaim, TempoChange, decode, encode
from .._services.pulse import PulseConfig, PulseStatus, run_pulse
from .._services.reverb import ReverbConfig, ReverbStatus, run_reverb
from .._transport.base import ConnEvent, EventListener, Message, Subscription
from .._transport.jetstream import JetStream
from .._transport.shared import Prepare, SharedSubscription, SharedSubscriptions
from ..testing.memory import MemoryBroker, MemoryTransport

T = TypeVar("T")

__all__ = [
    "VIRTUAL_EPOCH",
    "FakeCluster",
    "MemoryBroker",
    "MemoryTransport",
    "open_fake_cluster",
    "virtual_wall_clock",
]

VIRTUAL_EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def virtual_wall_clock() -> float:
    """A wall clock that runs on trio's clock (so MockClock moves it): epoch + current_time()."""
    return VIRTUAL_EPOCH + trio.current_time()


class _OwnConnection:
    """One client's own connection, as ``open_client(cfg)`` opens one: a memory transport whose
    shared subscriptions are its own, so the client is its judge's only member, as a lone agent
    is."""

    def __init__(self, inner: MemoryTransport) -> None:
        self._inner = inner
        self._shared = SharedSubscriptions(inner._subscribe_handing_to, inline=False)

    async def subscribe_shared(
        self,
        subject: str,
        *,
        key: Hashable,
        prepare: Callable[[], Prepare[T]],
        handler: Callable[[T], None] | None = None,
        buffer: int = 1024,
    ) -> SharedSubscription[T]:
        return await self._shared.join(
            subject, key=key, prepare=prepare, handler=handler, buffer=buffer
        )

    def __repr__(self) -> str:
        return f"<own connection {self._inner!r}>"

    @property
    def connected(self) -> bool:
        return self._inner.connected

    @property
    def events(self) -> trio.MemoryReceiveChannel[ConnEvent]:
        return self._inner.events

    def listen(self, listener: EventListener) -> Callable[[], None]:
        return self._inner.listen(listener)

    def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: dict[str, str] | None = None,
        reply: str = "",
    ) -> None:
        self._inner.publish(subject, payload, headers=headers, reply=reply)

    async def flush(self) -> None:
        await self._inner.flush()

    async def subscribe(
        self,
        subject: str,
        *,
        buffer: int = 1024,
        handler: Callable[[Message], None] | None = None,
    ) -> Subscription:
        return await self._inner.subscribe(subject, buffer=buffer, handler=handler)

    async def request(self, subject: str, payload: bytes) -> bytes:
        return await self._inner.request(subject, payload)

    def new_inbox(self) -> str:
        return self._inner.new_inbox()

    @property
    def jetstream(self) -> JetStream:
        return self._inner.jetstream

    async def aclose(self) -> None:
        self._shared.close()
        await self._inner.aclose()


class FakeCluster:
    """A pulse, a bus, optionally a reverb, and helpers; build it with :func:`open_fake_cluster`.

    Attributes:
        broker: the in-memory bus.
        cluster_id: the cluster's id.
        claims: every status claim published on the cluster (decoded), in order.
        reports: every bar report published on the cluster (decoded), in order.
        pulse: the running pulse's status (None while stopped).
        reverb: the status of the reverb :meth:`start_reverb` started last (None before).
    """

    def __init__(self, nursery: trio.Nursery, broker: MemoryBroker, pulse_cfg: PulseConfig) -> None:
        self._nursery = nursery
        self.broker = broker
        self.cluster_id = pulse_cfg.cluster_id
        self._pulse_cfg = pulse_cfg
        self._pulse_scope: trio.CancelScope | None = None
        self.pulse: PulseStatus | None = None
        self.claims: list[StatusClaim] = []
        self.reports: list[BarReport] = []
        self._report_arrived = trio.Event()
        self._reverb_scope: trio.CancelScope | None = None
        self.reverb: ReverbStatus | None = None
        self._bus = broker.connect()

    def __repr__(self) -> str:
        return (
            f"<FakeCluster {self.cluster_id} pulse={self.pulse!r} reverb={self.reverb!r} "
            f"claims={len(self.claims)} reports={len(self.reports)}>"
        )

    def config(self, agent_id: str = "agent-1", **overrides: Any) -> Config:
        """A client Config for this cluster (the URL is never used: the bus is in memory)."""
        return Config(cluster_id=self.cluster_id, agent_id=agent_id, **overrides)

    def open_client(
        self,
        agent_id: str = "agent-1",
        *,
        connection: MemoryTransport | None = None,
        **overrides: Any,
    ) -> contextlib.AbstractAsyncContextManager[Client]:
        """``open_client`` on the in-memory bus with the virtual wall clock.

        Args:
            agent_id: the client's ``agent_id``.
            connection: a connection from :meth:`connect` that several clients share, as many
                agents in one process share one NATS connection (one beat subscription for
                all of them). By default the client opens a connection of its own, as
                ``open_client(cfg)`` does.
            **overrides: other :class:`~backbeat_trio.Config` fields.
        """
        return self._open_client(self.config(agent_id, **overrides), connection)

    def connect(self) -> MemoryTransport:
        """A connection to the bus for several clients to share (``open_client(...,
        connection=...)``, or ``backbeat_trio.open_client(cfg, transport=...)``); close it with
        ``aclose`` after its clients."""
        return self.broker.connect()

    @contextlib.asynccontextmanager
    async def _open_client(
        self, cfg: Config, connection: MemoryTransport | None
    ) -> AsyncIterator[Client]:
        if connection is not None:
            async with open_client(cfg, transport=connection, wall_clock=virtual_wall_clock) as c:
                yield c
            return
        own = _OwnConnection(self.broker.connect())
        try:
            async with open_client(cfg, transport=own, wall_clock=virtual_wall_clock) as c:
                yield c
        finally:
            await own.aclose()

    async def start_reverb(
        self,
        *,
        keyring: Keyring | None = None,
        allow_unsigned: bool | None = None,
        **changes: Any,
    ) -> ReverbStatus:
        """Start the real reverb (:func:`~backbeat_trio.run_reverb`) on the bus and the virtual
        wall clock: it publishes one :class:`~backbeat_trio.BarReport` per bar, collected in
        :attr:`reports` (see :meth:`next_report`). It creates the cluster's status stream, so
        clients opened afterwards deliver their claims with acknowledgements, as on a real
        cluster.

        Args:
            keyring: the agents' public keys (claims signed with another key are rejected).
            allow_unsigned: accept unsigned claims; by default only without a ``keyring``.
            **changes: other :class:`~backbeat_trio.ReverbConfig` fields.

        Raises:
            RuntimeError: a reverb is already running.
        """
        if self._reverb_scope is not None:
            raise RuntimeError("the reverb is already running")
        cfg = ReverbConfig(
            **{
                "cluster_id": self.cluster_id,
                "beats_per_bar": self._pulse_cfg.beats_per_bar,
                "reverb_id": "fake-reverb",
                "keyring": keyring,
                "allow_unsigned": keyring is None if allow_unsigned is None else allow_unsigned,
                **changes,
            }
        )
        transport = self.broker.connect()
        scope = trio.CancelScope()

        async def reverb(task_status: trio.TaskStatus[ReverbStatus]) -> None:
            with scope:
                try:
                    await run_reverb(
                        cfg,
                        transport=transport,
                        wall_clock=virtual_wall_clock,
                        task_status=task_status,
                    )
                finally:
                    await transport.aclose()

        self._reverb_scope = scope
        self.reverb = await self._nursery.start(reverb)
        return self.reverb

    def stop_reverb(self) -> None:
        """Stop the reverb (no more bar reports)."""
        if self._reverb_scope is not None:
            self._reverb_scope.cancel()
        self._reverb_scope = None

    async def next_report(self) -> BarReport:
        """The report of the current window, once it is over (its next window's first beat).

        The current window is the one holding the last beat the pulse published (without a
        pulse: the window after the last report). So a test that awaits this right after a
        downbeat gets that new window's report, never the one the same beat closed, whichever
        task trio runs first. The reports come from :meth:`start_reverb`'s reverb (or
        ``open_fake_cluster(reverb=True)``).
        """
        beat = self.pulse.last_beat if self.pulse is not None else None
        if beat is None or self._pulse_scope is None:
            beat = self.reports[-1].to_beat + 1 if self.reports else self._pulse_cfg.start_index
        return await self.report_for(beat)

    async def report_for(self, beat_index: int) -> BarReport:
        """The report of the window that holds ``beat_index``, waiting for it if need be.

        Raises:
            LookupError: a later window was reported and this one never was (the reverb was
                not running then).
        """
        while True:
            for report in reversed(self.reports):
                if report.from_beat <= beat_index <= report.to_beat:
                    return report
            if self.reports and self.reports[-1].from_beat > beat_index:
                raise LookupError(f"no bar report holds beat {beat_index}")
            await self._report_arrived.wait()

    async def start_pulse(self, **changes: Any) -> PulseStatus:
        """(Re)start the pulse; keyword arguments change its :class:`PulseConfig`.

        A restarted pulse resumes its old schedule, as a pulse with state hand-over does: its first
        beat is the one due next on the old timeline (same index, same time, tempo in force).
        Pass ``start_index`` to start elsewhere instead (e.g. a forward jump, or a pulse that lost
        its state and starts again from 0).
        """
        if self._pulse_scope is not None:
            raise RuntimeError("the pulse is already running")
        lead = 0.0
        previous = self.pulse.schedule if self.pulse is not None else None
        if previous is not None and "start_index" not in changes:
            now = trio.current_time()
            previous.skip_to(now)
            while previous.next_due < now:
                previous.next_beat()
            tempo = previous.tempo_bpm
            if previous.pending_tempo is not None and previous.next_index == previous.next_downbeat:
                tempo = previous.pending_tempo
            changes = {"start_index": previous.next_index, "tempo_bpm": tempo, **changes}
            lead = previous.next_due - now
        if changes:
            fields = {k: getattr(self._pulse_cfg, k) for k in self._pulse_cfg.__dataclass_fields__}
            fields.update(changes)
            self._pulse_cfg = PulseConfig(**fields)
        transport = self.broker.connect()
        scope = trio.CancelScope()

        async def pulse(task_status: trio.TaskStatus[PulseStatus]) -> None:
            with scope:
                try:
                    await run_pulse(
                        self._pulse_cfg,
                        transport=transport,
                        wall_clock=virtual_wall_clock,
                        lead=lead,
                        task_status=task_status,
                    )
                finally:
                    await transport.aclose()

        self._pulse_scope = scope
        self.pulse = await self._nursery.start(pulse)
        return self.pulse

    def stop_pulse(self) -> None:
        """Silence the pulse (clients degrade to local beats)."""
        if self._pulse_scope is not None:
            self._pulse_scope.cancel()
        self._pulse_scope = None

    def publish_raw(self, payload: bytes, subject: str | None = None) -> None:
        """Inject raw bytes on the beat subject (or ``subject``): hostile-input tests."""
        self._bus.publish(subject or beat_subject(self.cluster_id), payload)

    def request_tempo(
        self, tempo_bpm: int, *, requested_by: str = "test", reason: str = ""
    ) -> None:
        """Publish a TempoChange for the pulse."""
        change = TempoChange(
            cluster_id=self.cluster_id,
            tempo_bpm=tempo_bpm,
            requested_by=requested_by,
            reason=reason,
        )
        self._bus.publish(tempo_subject(self.cluster_id), encode(change))

    def enable_jetstream(self) -> None:
        """Create the status stream, so clients opened afterwards deliver claims with acks."""
        self.broker.add_stream(
            status_stream_name(self.cluster_id), [status_subject(self.cluster_id)]
        )

    async def _collect_claims(self, task_status: trio.TaskStatus[None]) -> None:
        sub = await self._bus.subscribe(status_subject(self.cluster_id), buffer=1_000_000)
        task_status.started()
        async for msg in sub.messages:
            self.claims.append(decode(msg.data, StatusClaim))

    async def _collect_reports(self, task_status: trio.TaskStatus[None]) -> None:
        sub = await self._bus.subscribe(bar_subject(self.cluster_id), buffer=1_000_000)
        task_status.started()
        async for msg in sub.messages:
            self.reports.append(decode(msg.data, BarReport))
            arrived, self._report_arrived = self._report_arrived, trio.Event()
            arrived.set()


@contextlib.asynccontextmanager
async def open_fake_cluster(
    cluster_id: str = "test",
    *,
    tempo_bpm: int = 120,
    beats_per_bar: int = 4,
    start_index: int = 0,
    jetstream: bool = False,
    start: bool = True,
    max_tempo_step: float | None = 0.10,
    reverb: bool = False,
) -> AsyncIterator[FakeCluster]:
    """A fake cluster for tests: an in-memory bus with a real pulse on it.

    Use it under ``trio.testing.MockClock(autojump_threshold=0)`` (pytest-trio's
    ``autojump_clock`` fixture) to run hundreds of beats in no real time.

    Args:
        cluster_id: the cluster's id.
        tempo_bpm: the pulse's tempo.
        beats_per_bar: the bar (and report window) length.
        start_index: the pulse's first beat.
        jetstream: create the status stream (claims delivered with acknowledgements).
        start: start the pulse (else :meth:`FakeCluster.start_pulse` does).
        max_tempo_step: the pulse's largest tempo change at once.
        reverb: also run the real reverb, accepting unsigned claims, before the first beat;
            its bar reports land in :attr:`FakeCluster.reports` (:meth:`FakeCluster.next_report`,
            :meth:`FakeCluster.report_for`). :meth:`FakeCluster.start_reverb` starts one with
            a keyring instead.
    """
    broker = MemoryBroker()
    pulse_cfg = PulseConfig(
        cluster_id=cluster_id,
        tempo_bpm=tempo_bpm,
        beats_per_bar=beats_per_bar,
        start_index=start_index,
        pulse_id="fake-pulse",
        max_tempo_step=max_tempo_step,
        # tests publish frames of their own on the beat subject (hostile ones, a second pulse)
        share_beat_subject=True,
    )
    async with trio.open_nursery() as nursery:
        cluster = FakeCluster(nursery, broker, pulse_cfg)
        if jetstream:
            cluster.enable_jetstream()
        await nursery.start(cluster._collect_claims)
        await nursery.start(cluster._collect_reports)
        if reverb:
            await cluster.start_reverb()
        if start:
            await cluster.start_pulse()
        try:
            yield cluster
        finally:
            cluster.stop_pulse()
            cluster.stop_reverb()
            nursery.cancel_scope.cancel()
