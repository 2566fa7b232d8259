"""The publish fast paths' encoder, ``wire_bytes``, against nats-py's own ``publish``.

Both direct writes and the drainer's batch encoder send what ``wire_bytes`` returns instead of
calling nats-py's ``publish``. For any subject, reply, payload and headers it must return exactly
the bytes nats-py would queue, or None (nats-py's path then takes the message): None for what
nats-py refuses or rewrites, and only for that. Its shortcuts (names and subjects checked once,
a reply searched for the characters nats-py's rule refuses) must let through nothing that
nats-py's checks refuse.
"""

from __future__ import annotations

import re
from typing import Any

import nats.aio.client
import nats.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backbeat_trio._bridge import _natspy_private as private

PINNED = str(nats.aio.client.__version__).startswith(private._DIRECT_NATS_VERSIONS)
pytestmark = pytest.mark.skipif(
    not PINNED, reason="the fast paths are used with the pinned nats-py only"
)


class Text(str):
    """A str subclass: nats-py calls its methods, the encoder must not stand in for them."""

    def strip(self, chars: str | None = None) -> str:
        return "rewritten"


def natspy_publish(subject: Any, payload: Any, headers: Any, reply: Any) -> bytes | None:
    """What nats-py's ``publish`` queues for the message, or None when it raises."""
    nc = nats.aio.client.Client()
    nc._status = nc.CONNECTED  # so publish reaches _send_publish; nothing is written
    nc._flush_queue = None
    coro = nc.publish(subject, payload, reply=reply, headers=headers)
    try:
        coro.send(None)
    except StopIteration:
        return b"".join(nc._pending)
    except (nats.errors.Error, AttributeError, TypeError, UnicodeError):
        return None
    finally:
        coro.close()
    raise AssertionError("nats-py's publish waited")  # pragma: no cover


def encoded(subject: Any, payload: Any, headers: Any, reply: Any) -> bytes | None:
    nc = nats.aio.client.Client()
    return private.wire_bytes(nc, subject, payload, headers, reply)


def plain(headers: dict[Any, Any] | None) -> bool:
    """Headers nats-py sends as they are: token names, values it neither strips nor rewrites."""
    return headers is None or all(
        type(k) is str
        and type(v) is str
        and nats.aio.client._HEADER_KEY_RE.fullmatch(k) is not None
        and v.strip() == v
        and "\r" not in v
        and "\n" not in v
        for k, v in headers.items()
    )


names = st.sampled_from(["Backbeat-Sig", "Nats-Msg-Id", "K"]) | st.sampled_from(
    ["X y", "", " K", "K:", "é", "K\r\n"]
)
plain_text = st.text(alphabet="aZ09-_:/+=.", max_size=6)
# ASCII and other blanks, line breaks, control and non-ASCII characters, anywhere in a value
odd_char = st.sampled_from(" \t\r\n\x0b\x0c\x1c\x1f\x00\x7f\x85\xa0é\u3000")
values = (
    plain_text
    | st.builds(lambda a, c, b: a + c + b, plain_text, odd_char, plain_text)
    | st.builds(Text, plain_text)
    | st.sampled_from([None, 5, b"v"])
)
subjects = st.sampled_from(["backbeat.status.c1", "a.b", "x", "a b", "a\r\nb", "", "a.\x1c", "é"])
replies = st.sampled_from(
    [
        "",
        "_INBOX.abc.ack.1",
        "_INBOX.abc.ack.12",
        "_INBOX.abc.ack.1 2",
        "_INBOX.abc.ack.\r\n1",
        "_INBOX.a b.7",
        "7",
        ".7",
        "_INBOX.abc.ack.٣",
        "_INBOX.abc.ack.x",
        "_INBOX\t.1",
    ]
)


def check(subject: Any, payload: Any, headers: Any, reply: Any) -> None:
    expected = natspy_publish(subject, payload, headers, reply)
    got = encoded(subject, payload, headers, reply)
    if got is not None:
        assert got == expected
    else:  # declined: nats-py refuses the message, or sends headers other than given
        assert expected is None or not plain(headers)


@settings(max_examples=1000, deadline=None)
@given(headers=st.dictionaries(names, values, max_size=5), payload=st.binary(max_size=8))
def test_the_encoder_writes_the_headers_nats_py_writes_or_declines(
    headers: dict[str, str], payload: bytes
) -> None:
    check("backbeat.status.c", payload, headers, "_INBOX.abc.ack.1")


@settings(max_examples=500, deadline=None)
@given(
    subject=subjects,
    reply=replies,
    headers=st.none() | st.just({"Nats-Msg-Id": "a:1"}),
    payload=st.binary(max_size=8),
)
def test_the_encoder_takes_the_subjects_and_replies_nats_py_takes(
    subject: str, reply: str, headers: dict[str, str] | None, payload: bytes
) -> None:
    check(subject, payload, headers, reply)


def test_a_claims_headers_take_the_encoder() -> None:
    # the headers of a signed JetStream claim, on its numbered ack inbox: never declined
    headers = {
        "Backbeat-Agent": "agent-1",
        "Backbeat-Key": "A" * 43 + "=",
        "Backbeat-Sig": "B+/" * 28 + "==",
        "Nats-Msg-Id": "agent-1:0192abcdef01:0001:1a2b:0123456789abcdef",
        "Empty": "",
    }
    for seq in range(1, 4):
        reply = f"_INBOX.abc.ack.{seq}"
        got = encoded("backbeat.status.c", b"{}", headers, reply)
        assert got is not None
        assert got == natspy_publish("backbeat.status.c", b"{}", headers, reply)


@pytest.mark.parametrize(
    "reply",
    [
        "_INBOX.abc.ack.1\r\nPUB x 1",
        "_INBOX.abc.ack.\r\n1",
        "_INBOX.abc.ack.1 2",
        "_INBOX.abc.ack\t.1",
        "_INBOX.abc .ack.1",
        "\n",
    ],
)
def test_a_reply_nats_py_refuses_is_declined(reply: str) -> None:
    assert encoded("a.b", b"x", None, "_INBOX.abc.ack.1") is not None
    assert natspy_publish("a.b", b"x", None, reply) is None
    assert encoded("a.b", b"x", None, reply) is None


def test_the_fast_paths_are_off_when_nats_py_refuses_other_subjects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # wire_bytes looks for the characters nats-py's rule refuses; another rule, other characters
    private._shape_supported.cache_clear()
    try:
        assert private._shape_supported()
        private._shape_supported.cache_clear()
        monkeypatch.setattr(nats.aio.client, "_SUBJECT_INVALID_RE", re.compile(r"[ \t\r\n*]"))
        assert not private._shape_supported()
    finally:
        private._shape_supported.cache_clear()


def test_a_str_subclass_name_equal_to_a_checked_one_is_declined() -> None:
    class Liar(str):
        def __eq__(self, other: object) -> bool:
            return True

        def __hash__(self) -> int:
            return hash("Nats-Msg-Id")

    assert encoded("a.b", b"x", {"Nats-Msg-Id": "v"}, "") is not None
    assert encoded("a.b", b"x", {Liar("X\r\nPUB evil 1"): "v"}, "") is None
