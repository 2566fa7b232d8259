"""Hostile frames on the beat subject: the client survives, counts every bad frame, and keeps
delivering the real beats on time.

The bulk (10,000 hypothesis-generated payloads in CI) runs on the in-memory bus under MockClock:
each example is a fake cluster whose real pulse beats while a batch of hostile payloads is
injected between (and at) its beats. A real-nats variant pushes ~2,000 generated payloads and a few
1 MB bodies through nats-server.

A payload is *bad* when no honest pulse could have sent it: undecodable, schema-breaking, for
another cluster, bigger than ``max_frame_bytes``, not after the last delivered beat, or with a
deadline an hour or more away from the pulse's clock. (A well-formed frame for the next index with a
plausible deadline is indistinguishable from the pulse: beats are not authenticated — see
docs/guarantees.md — so the generator never makes one.)
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import itertools
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import pytest
import trio
import trio.testing
import trio_asyncio
from _guards import fail_on_bare_cancel
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import backbeat_trio as bb3
from backbeat_trio._bridge.nats import open_nats_transport
from backbeat_trio._core.beats import beat_subject, phase_for, tempo_subject, window_id
from backbeat_trio._core.hlc import HLCStamp, node_id_for
from backbeat_trio._embedded import NatsServerProcess
from backbeat_trio.testing import FakeCluster, open_fake_cluster, virtual_wall_clock

CLUSTER = "hostile"
TEMPO = 120  # the fake pulse's tempo: 0.5 s beats
TAG = "backbeat.beatframe.v1"
MAX_FRAME = bb3.Config(cluster_id="x", agent_id="y").max_frame_bytes
# Where a client counts a frame it refuses.
FRAME_REJECTIONS = (
    "malformed",
    "oversized",
    "wrong_cluster",
    "stale",
    "duplicate_or_old",
    "implausible",
)
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
_HLC_RE = re.compile(r"^[0-9a-fA-F]{1,16}:[0-9a-fA-F]{1,16}:[0-9a-fA-F]{1,16}\Z")
_WID_RE = re.compile(r"^[0-9a-f]{32}\Z")
_MIN_TS = _dt.datetime(1, 1, 1, tzinfo=_dt.UTC).timestamp()
_MAX_TS = _dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=_dt.UTC).timestamp()
_SPLICE_MARK = "\x00splice\x00"


def rfc3339(ts: float) -> str:
    ts = min(max(ts, _MIN_TS), _MAX_TS)
    moment = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC) + _dt.timedelta(seconds=ts)
    return moment.isoformat().replace("+00:00", "Z")


def rejected_frames(metrics: dict[str, int]) -> int:
    return sum(metrics[name] for name in FRAME_REJECTIONS)


# --- hostile payload recipes ---------------------------------------------------------------------
@dataclass(frozen=True)
class Hostile:
    """One hostile payload, rendered at injection time against the client's last beat.

    ``expect`` is where the client must count it: ``malformed``, ``oversized``, ``wrong_cluster``
    or ``old`` (``stale``, ``implausible`` or ``duplicate_or_old``).
    """

    kind: str
    expect: str
    raw: bytes | None = None
    fields: tuple[tuple[str, Any], ...] = ()
    drop: str | None = None
    splice: tuple[str, bytes] | None = None  # (field, raw JSON text of its value)
    index_delta: int = 1
    deadline: str = "fresh"  # fresh | replay | shift
    shift: float = 0.0
    tempo: int = TEMPO
    pad: int = 0

    def render(self, cluster: str, last: bb3.BeatFrame, wall: float, tempo: int) -> bytes:
        if self.raw is not None:
            return self.raw
        duration = 60.0 / tempo
        index = max(0, last.beat_index + self.index_delta)
        if self.deadline == "replay":  # the deadline the pulse gave (or will give) that index
            deadline = last.deadline_at.timestamp() + (index - last.beat_index) * duration
        elif self.deadline == "shift":
            deadline = wall + duration + self.shift
        else:
            deadline = wall + duration
        frame: dict[str, Any] = {
            "type": TAG,
            "cluster_id": cluster,
            "beat_index": index,
            "downbeat": index % 4 == 0,
            "phase": phase_for(index, 4),
            "hlc": "18c0a1b2c3d:0001:beef",
            "deadline_at": rfc3339(deadline),
            "tempo_bpm": self.tempo,
            "window_id": window_id(cluster, index, 4),
        }
        frame.update(self.fields)
        if self.drop is not None:
            del frame[self.drop]
        if self.splice is not None:
            frame[self.splice[0]] = _SPLICE_MARK
        data = json.dumps(frame).encode()
        if self.splice is not None:
            data = data.replace(json.dumps(_SPLICE_MARK).encode(), self.splice[1])
        if self.pad:  # an unknown field, ignored by decoders: only the size makes it bad
            data = data[:-1] + b', "pad": "' + b"p" * self.pad + b'"}'
        return data


FIELDS = (
    "type",
    "cluster_id",
    "beat_index",
    "downbeat",
    "phase",
    "hlc",
    "deadline_at",
    "tempo_bpm",
    "window_id",
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
not_a_string = json_values.filter(lambda v: not isinstance(v, str))
not_an_int = st.one_of(
    st.floats(), st.booleans(), st.none(), st.text(max_size=8), st.lists(st.integers(), max_size=2)
)


_aware_time = msgspec.json.Decoder(Annotated[_dt.datetime, msgspec.Meta(tz=True)])


def _not_rfc3339(text: str) -> bool:
    """True when the wire decoder refuses ``text`` as a deadline (msgspec is the oracle)."""
    try:
        _aware_time.decode(json.dumps(text).encode())
    except msgspec.ValidationError:
        return True
    return False


def _spoiled(forbidden: str) -> st.SearchStrategy[str]:
    """Short text with a character the field's pattern forbids (invalid by construction)."""
    return st.tuples(st.text(max_size=12), st.text(max_size=4)).map(
        lambda ab: ab[0] + forbidden + ab[1]
    )


BAD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "type": st.one_of(_spoiled("!"), st.just(""), not_a_string),
    "cluster_id": st.one_of(
        _spoiled("."), st.just(""), st.text("ab", min_size=65, max_size=70), not_a_string
    ),
    "beat_index": st.one_of(
        st.integers(max_value=-1, min_value=-(2**80)),
        st.integers(min_value=2**63, max_value=2**90),
        not_an_int,
    ),
    "downbeat": st.one_of(
        st.integers(),
        st.floats(),
        st.none(),
        st.text(max_size=5),
        st.lists(st.booleans(), max_size=2),
    ),
    "phase": st.one_of(st.just(""), st.text(min_size=65, max_size=70), not_a_string),
    "hlc": st.one_of(_spoiled("z"), _spoiled(":"), st.just(""), not_a_string),
    "deadline_at": st.one_of(
        st.text(max_size=32).filter(_not_rfc3339),
        st.datetimes().map(lambda d: d.isoformat()),  # naive
        not_a_string,
    ),
    "tempo_bpm": st.one_of(
        st.integers(max_value=0, min_value=-(2**70)),
        st.integers(min_value=1201, max_value=2**70),
        not_an_int,
    ),
    "window_id": st.one_of(_spoiled("g"), st.text("0123456789abcdef", max_size=31), not_a_string),
}

NUMBER_TEXTS = [
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e999",
    b"-1e999",
    b"1e400",
    b"123456789012345678901234567890",
    b"9223372036854775808",
    b"-9223372036854775809",
    b"1.5",
    b"0x10",
    b"+1",
    b".5",
    b"01",
    b"1e2",
]
INVALID_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf", b"\x80"]
STRING_FIELDS = ("type", "cluster_id", "phase", "hlc", "deadline_at", "window_id")

far_shift = st.floats(min_value=3600.0, max_value=1e12)
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
other_cluster = st.text(_ID_ALPHABET, min_size=1, max_size=64).filter(lambda s: s != CLUSTER)
valid_hlc = st.tuples(
    st.integers(0, 2**48 - 1), st.integers(0, 2**16 - 1), st.integers(0, 2**16 - 1)
).map(lambda t: f"{t[0]:012x}:{t[1]:04x}:{t[2]:04x}")
any_tempo = st.integers(min_value=1, max_value=1200)


def hostile_payloads(*, largest: int = 1 << 20) -> st.SearchStrategy[Hostile]:
    """Every kind of bad beat payload. Oversized ones are mostly just over ``max_frame_bytes``,
    sometimes about ``largest`` bytes."""
    oversize = st.one_of(st.integers(MAX_FRAME + 1, MAX_FRAME + 4096), st.just(largest - 1024))
    malformed = st.one_of(
        st.binary(max_size=300).map(lambda b: Hostile("garbage-bytes", "malformed", raw=b)),
        st.text(max_size=200).map(lambda t: Hostile("garbage-text", "malformed", raw=t.encode())),
        json_values.map(lambda v: Hostile("json-junk", "malformed", raw=json.dumps(v).encode())),
        st.sampled_from(FIELDS).flatmap(
            lambda f: BAD_VALUES[f].map(
                lambda v, f=f: Hostile(f"bad-{f}", "malformed", fields=((f, v),))
            )
        ),
        st.sampled_from(FIELDS[1:]).map(lambda f: Hostile(f"missing-{f}", "malformed", drop=f)),
        st.tuples(
            st.sampled_from(["beat_index", "tempo_bpm", "downbeat"]), st.sampled_from(NUMBER_TEXTS)
        ).map(lambda fv: Hostile(f"number-{fv[0]}", "malformed", splice=fv)),
        st.sampled_from([b"[", b"]", b"{}", b"[{}]", b"null", b'""', b"", b'{"type":']).map(
            lambda b: Hostile("truncated", "malformed", raw=b)
        ),
    )
    oversized = st.one_of(
        st.tuples(st.binary(min_size=1, max_size=8), oversize).map(
            lambda cs: Hostile(
                "oversized-bytes",
                "oversized",
                raw=(cs[0] * (cs[1] // len(cs[0]) + 1))[: cs[1]],
            )
        ),
        # a well-formed next beat, only too big: the size check comes before any parsing
        oversize.map(lambda n: Hostile("oversized-frame", "oversized", pad=n)),
    )
    wrong_cluster = st.tuples(other_cluster, st.integers(-5, 5)).map(
        lambda ci: Hostile(
            "wrong-cluster", "wrong_cluster", fields=(("cluster_id", ci[0]),), index_delta=ci[1]
        )
    )
    old = st.one_of(
        # replays and duplicates: at or below the last beat, whatever the rest says
        st.builds(
            lambda d, dl, shift, tempo, hlc: Hostile(
                "old-index",
                "old",
                index_delta=d,
                deadline=dl,
                shift=shift,
                tempo=tempo,
                fields=(("hlc", hlc),),
            ),
            st.integers(-40, 0),
            st.sampled_from(["fresh", "replay", "shift"]),
            st.one_of(far_shift, far_shift.map(lambda s: -s)),
            any_tempo,
            valid_hlc,
        ),
        # an hour or more in the past, at the pulse's tempo, not after the last beat
        st.tuples(st.integers(-40, 0), far_shift).map(
            lambda ds: Hostile(
                "past-deadline", "old", index_delta=ds[0], deadline="shift", shift=-ds[1]
            )
        ),
    )
    invalid_utf8 = st.tuples(
        st.sampled_from(STRING_FIELDS), st.text("abc", max_size=3), st.sampled_from(INVALID_UTF8)
    ).map(
        lambda fpb: Hostile(
            "invalid-utf8", "malformed", splice=(fpb[0], b'"' + fpb[1].encode() + fpb[2] + b'"')
        )
    )
    bad_timing = st.one_of(
        # after the last beat, but an hour or more (up to year 9999) ahead of the pulse's clock
        st.tuples(st.integers(1, 10_000), far_shift).map(
            lambda ds: Hostile(
                "future-deadline", "old", index_delta=ds[0], deadline="shift", shift=ds[1]
            )
        ),
        # after the last beat, an hour or more in the past, at the pulse's tempo or another
        st.tuples(st.integers(1, 40), far_shift, any_tempo).map(
            lambda dst: Hostile(
                "past-deadline-ahead",
                "old",
                index_delta=dst[0],
                deadline="shift",
                shift=-dst[1],
                tempo=dst[2],
            )
        ),
    )
    kinds = [malformed, invalid_utf8, oversized, wrong_cluster, old, bad_timing]
    return st.one_of(*kinds)


# fractions of a beat to wait before the next payload: bursts, mid-beat, and right at a beat
delays = st.sampled_from([0.0, 0.0, 0.0, 0.0, 0.01, 0.25, 0.5, 0.999, 1.0])


# --- the in-memory scenario ----------------------------------------------------------------------
async def _hostile_run(batch: list[tuple[Hostile, float]]) -> None:
    duration = 60.0 / TEMPO
    claim: bb3.StatusClaim | None = None
    async with (
        open_fake_cluster(CLUSTER, tempo_bpm=TEMPO) as cluster,
        cluster.open_client("agent-1") as bb,
    ):
        beats = bb.beats(buffer=100_000)
        deliveries: list[tuple[float, bb3.BeatFrame]] = []
        expected: collections.Counter[str] = collections.Counter()
        async with trio.open_nursery() as nursery:

            async def follow() -> None:
                async for frame in beats:
                    deliveries.append((virtual_wall_clock(), frame))

            nursery.start_soon(follow)
            await bb.wait_for_beat()
            for hostile, delay in batch:
                if delay:
                    await trio.sleep(delay * duration)
                assert bb.current_frame is not None
                payload = hostile.render(CLUSTER, bb.current_frame, virtual_wall_clock(), TEMPO)
                cluster.publish_raw(payload)
                expected[hostile.expect] += 1
            # the beat goes on after the last hostile payload
            last_real = bb.current_beat
            assert last_real is not None
            with trio.fail_after(10 * duration):
                while bb.current_beat < last_real + 2:
                    await bb.wait_for_beat()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        metrics = bb.health().metrics
        # and the client still works
        claim = await bb.emit_status(bb3.StatusClaim(notes="still alive"))

    kinds = collections.Counter(h.kind for h, _ in batch)
    # (an internal failure that is swallowed on the way out would end the block early)
    assert claim is not None, f"the client block ended early, without an error: {kinds}"
    assert rejected_frames(metrics) == len(batch), (metrics, kinds)
    assert metrics["malformed"] == expected["malformed"], (metrics, kinds)
    assert metrics["oversized"] == expected["oversized"], (metrics, kinds)
    assert metrics["wrong_cluster"] == expected["wrong_cluster"], (metrics, kinds)
    assert (
        metrics["stale"] + metrics["duplicate_or_old"] + metrics["implausible"] == expected["old"]
    ), (metrics, kinds)
    # every real beat, once, in order, on time, and nothing else
    assert metrics["degraded_beats"] == 0, (metrics, kinds)
    assert metrics["forward_jumps"] == 0, (metrics, kinds)
    assert metrics["transport_dropped"] == metrics["dropped"] == 0
    indices = [f.beat_index for _, f in deliveries]
    assert indices == list(range(indices[0], indices[0] + len(indices))), kinds
    first = deliveries[0][1]
    for arrived, frame in deliveries:
        assert frame.tempo_bpm == TEMPO
        assert frame.window_id == window_id(CLUSTER, frame.beat_index, 4)
        scheduled = first.deadline_at.timestamp() + (frame.beat_index - first.beat_index) * duration
        assert abs(frame.deadline_at.timestamp() - scheduled) < 1e-5, (frame, kinds)
        assert abs(arrived - frame.started_at.timestamp()) < 1e-3, (frame, kinds)
        assert HLCStamp.parse(frame.hlc).node == node_id_for("fake-pulse")


def _run_batch(batch: list[tuple[Hostile, float]]) -> None:
    trio.run(_hostile_run, batch, clock=trio.testing.MockClock(autojump_threshold=0))


BATCH = 50


@pytest.mark.chaos
def test_ten_thousand_hostile_frames_in_memory(soak: bool) -> None:
    examples = 2000 if soak else 200
    seen = collections.Counter[str]()

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(batch=st.lists(st.tuples(hostile_payloads(), delays), min_size=BATCH, max_size=BATCH))
    def run(batch: list[tuple[Hostile, float]]) -> None:
        seen.update(h.kind for h, _ in batch)
        _run_batch(batch)

    run()
    assert sum(seen.values()) >= examples * BATCH >= 10_000
    # every kind was exercised, not just the cheap ones
    assert {"garbage-bytes", "json-junk", "oversized-bytes", "oversized-frame"} <= set(seen)
    assert {"wrong-cluster", "old-index", "past-deadline", "truncated"} <= set(seen)
    assert {"invalid-utf8", "future-deadline", "past-deadline-ahead"} <= set(seen)
    families = collections.Counter(k.split("-")[0] for k in seen.elements())
    assert min(families[f] for f in ("bad", "missing", "number", "garbage", "oversized")) > 300
    assert {f"bad-{f}" for f in FIELDS} | {f"missing-{f}" for f in FIELDS[1:]} <= set(seen)
    print(f"\nhostile frames (in memory): {sum(seen.values())} payloads, {dict(seen)}")


# --- one hostile frame at a time: regression tests for what the client once mishandled --------
@pytest.mark.parametrize("field", STRING_FIELDS)
@fail_on_bare_cancel
async def test_invalid_utf8_in_a_string_field_is_counted_as_malformed(
    autojump_clock: trio.testing.MockClock, field: str
) -> None:
    hostile = Hostile("invalid-utf8", "malformed", splice=(field, b'"x\xff"'))
    await _one_hostile_frame_then_beats(hostile)


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param(
            Hostile("future-old-index", "old", index_delta=-3, deadline="shift", shift=3600.0),
            id="far-future-deadline-old-index",
        ),
        pytest.param(
            Hostile("future-next-index", "old", index_delta=1, deadline="shift", shift=3600.0),
            id="far-future-deadline-next-index",
        ),
        pytest.param(
            Hostile("future-far-index", "old", index_delta=1000, deadline="shift", shift=1e11),
            id="year-9999-deadline-far-index",
        ),
        pytest.param(
            Hostile(
                "past-other-tempo", "old", index_delta=1, deadline="shift", shift=-3600.0, tempo=60
            ),
            id="hour-old-deadline-other-tempo",
        ),
        pytest.param(
            Hostile("past-gap", "old", index_delta=3, deadline="shift", shift=-3600.0, tempo=60),
            id="hour-old-deadline-index-gap",
        ),
    ],
)
@fail_on_bare_cancel
async def test_a_frame_with_a_deadline_an_hour_away_is_refused(
    autojump_clock: trio.testing.MockClock, hostile: Hostile
) -> None:
    await _one_hostile_frame_then_beats(hostile)


async def _one_hostile_frame_then_beats(hostile: Hostile) -> None:
    await _hostile_run([(hostile, 0.3)])


@fail_on_bare_cancel
async def test_two_stale_frames_in_a_row_are_both_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ahead_5 = Hostile("past-ahead-5", "old", index_delta=5, deadline="shift", shift=-3600.0)
    ahead_1 = Hostile("past-ahead-1", "old", index_delta=1, deadline="shift", shift=-3600.0)
    await _hostile_run([(ahead_5, 0.3), (ahead_1, 0.02)])


@contextlib.asynccontextmanager
async def open_client_after_a_beat() -> AsyncIterator[tuple[FakeCluster, bb3.Client]]:
    """The fake cluster at ``TEMPO`` and agent-1's client on it, once its first beat is in."""
    async with (
        open_fake_cluster(CLUSTER, tempo_bpm=TEMPO) as cluster,
        cluster.open_client("agent-1") as bb,
    ):
        await bb.wait_for_beat()
        yield cluster, bb


async def eight_more_beats(bb: bb3.Client) -> None:
    """Eight beats, each within four beat lengths."""
    for _ in range(8):
        with trio.fail_after(2.0):
            await bb.wait_for_beat()


@fail_on_bare_cancel
async def test_a_year_9999_frame_then_silence_does_not_kill_the_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    completed = False
    async with open_client_after_a_beat() as (cluster, bb):
        assert bb.current_frame is not None
        hostile = Hostile("year-9999", "old", index_delta=1, deadline="shift", shift=1e12)
        cluster.publish_raw(hostile.render(CLUSTER, bb.current_frame, virtual_wall_clock(), TEMPO))
        cluster.stop_pulse()
        await eight_more_beats(bb)  # the client keeps time alone
        assert bb.degraded
        assert rejected_frames(bb.health().metrics) == 1
        completed = True
    assert completed  # the cluster's scope would swallow a Cancelled from a dying client


# --- hostile tempo requests do not stop the pulse -------------------------------------------------
TEMPO_GARBAGE = [
    b"",
    b"{",
    b"null",
    b"[1, 2]",
    b'{"type": "backbeat.tempochange.v1"}',
    b'{"type": "backbeat.tempochange.v1", "cluster_id": "hostile", "tempo_bpm": 1e999}',
    b'{"type": "backbeat.tempochange.v1", "cluster_id": "hostile", "tempo_bpm": NaN}',
    b'{"type": "backbeat.tempochange.v1", "cluster_id": "hostile", "tempo_bpm": 0}',
    b'{"type": "backbeat.tempochange.v1", "cluster_id": "other", "tempo_bpm": 121}',
    b'{"type": "backbeat.tempochange.v1", "cluster_id": "hostile", "tempo_bpm": 121, "hlc": "x"}',
    b"\xff\xfe\x00",
    b"t" * (1 << 20),
]
TEMPO_INVALID_UTF8 = [
    b'{"type": "backbeat.tempochange.v1", "cluster_id": "hostile", "tempo_bpm": 121, '
    b'"reason": "\xff"}',
    b'{"type": "\xc3"}',
]


@pytest.mark.parametrize(
    "payloads",
    [
        pytest.param(TEMPO_GARBAGE, id="garbage"),
        pytest.param(
            TEMPO_INVALID_UTF8,
            id="invalid-utf8",
        ),
    ],
)
@fail_on_bare_cancel
async def test_hostile_tempo_requests_do_not_stop_the_pulse(
    autojump_clock: trio.testing.MockClock, payloads: list[bytes]
) -> None:
    completed = False
    async with open_client_after_a_beat() as (cluster, bb):
        for payload in payloads:
            cluster.publish_raw(payload, subject=tempo_subject(CLUSTER))
        first = bb.current_beat
        assert first is not None
        await eight_more_beats(bb)
        assert cluster.pulse is not None
        assert cluster.pulse.bad_tempo_messages == len(payloads)
        assert cluster.pulse.tempo_changes == 0
        assert cluster.pulse.tempo_bpm == TEMPO
        assert bb.current_beat == first + 8
        assert bb.metrics.degraded_beats == 0  # every beat came from the pulse
        completed = True
    assert completed


# --- over a real nats-server ---------------------------------------------------------------------
def _generate(count: int) -> list[Hostile]:
    """``count`` hostile payload recipes drawn by hypothesis (generation only)."""
    out: list[Hostile] = []

    @settings(
        max_examples=count // 100 + 1,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    # nats-server refuses payloads over its max_payload (1 MiB): stay under it
    @given(st.lists(hostile_payloads(largest=1_000_000), min_size=100, max_size=100))
    def collect(batch: list[Hostile]) -> None:
        out.extend(batch)

    collect()
    return out[:count]


@pytest.mark.chaos
@pytest.mark.nats
def test_hostile_frames_over_nats(nats_server: NatsServerProcess, soak: bool) -> None:
    recipes = _generate(20_000 if soak else 2000)
    # a few 1 MB bodies (nats-server's default max_payload is 1 MiB)
    recipes += [Hostile("megabyte", "oversized", raw=b"{" + b" " * 999_999)] * 3
    recipes += [Hostile("megabyte-frame", "oversized", pad=999_000)] * 2
    trio.run(_hostile_over_nats, nats_server.url, recipes)


async def _hostile_over_nats(url: str, recipes: list[Hostile]) -> None:
    cluster = "hostile-nats"
    tempo = 300
    duration = 60.0 / tempo
    async with trio_asyncio.open_loop():
        cfg = bb3.Config(
            cluster_id=cluster,
            agent_id="agent-1",
            nats_url=url,
            jetstream=False,
            jitter_tolerance=0.5,  # a loaded CI box must not turn real beats stale
        )
        # the attacker's frames are other publishers' on the pulse's subject: it keeps beating
        pulse_cfg = bb3.PulseConfig(
            cluster_id=cluster, nats_url=url, tempo_bpm=tempo, share_beat_subject=True
        )
        attacker_cfg = bb3.Config(cluster_id=cluster, agent_id="attacker", nats_url=url)
        expected: collections.Counter[str] = collections.Counter()
        delivered: list[bb3.BeatFrame] = []
        async with (
            trio.open_nursery() as nursery,
            open_nats_transport(attacker_cfg) as attacker,
        ):
            pulse = await nursery.start(bb3.run_pulse, pulse_cfg)
            async with bb3.open_client(cfg) as bb:
                beats = bb.beats(buffer=100_000)

                async def follow() -> None:
                    async for frame in beats:
                        delivered.append(frame)

                nursery.start_soon(follow)
                with trio.fail_after(10):
                    await bb.wait_for_beat()
                beats_before = bb.metrics.beats
                for start in range(0, len(recipes), 100):
                    chunk = recipes[start : start + 100]
                    assert bb.current_frame is not None
                    for hostile in chunk:
                        payload = hostile.render(cluster, bb.current_frame, time.time(), tempo)
                        attacker.publish(beat_subject(cluster), payload)
                        expected[hostile.expect] += 1
                    await attacker.flush()
                    with trio.fail_after(10):
                        await bb.wait_for_beat()
                with trio.move_on_after(30):
                    while rejected_frames(bb.health().metrics) < len(recipes):
                        await bb.wait_for_beat()
                assert attacker.publish_errors == 0, attacker.last_error
                for _ in range(3):  # and the beat goes on
                    with trio.fail_after(10):
                        await bb.wait_for_beat()
                metrics = bb.health().metrics
            nursery.cancel_scope.cancel()

    kinds = collections.Counter(h.kind for h in recipes)
    print(f"\nhostile frames over nats: {len(recipes)} payloads, metrics {metrics}")
    assert rejected_frames(metrics) == len(recipes), (metrics, kinds)
    assert metrics["malformed"] == expected["malformed"]
    assert metrics["oversized"] == expected["oversized"] >= 5
    assert metrics["wrong_cluster"] == expected["wrong_cluster"]
    assert (
        metrics["stale"] + metrics["duplicate_or_old"] + metrics["implausible"] == expected["old"]
    )
    assert metrics["transport_dropped"] == 0
    # beats kept flowing: one per chunk at least, and only the pulse's frames were delivered
    assert metrics["beats"] - beats_before >= len(recipes) // 100
    indices = [f.beat_index for f in delivered]
    assert all(a < b for a, b in itertools.pairwise(indices))
    pulse_node = node_id_for(pulse_cfg.pulse_id)
    first = delivered[0]
    for frame in delivered:
        if HLCStamp.parse(frame.hlc).node != pulse_node:
            continue  # synthesised while the pulse was late on a loaded box
        scheduled = first.deadline_at.timestamp() + (frame.beat_index - first.beat_index) * duration
        assert abs(frame.deadline_at.timestamp() - scheduled) < 1e-5, frame
    assert pulse.published > 0
