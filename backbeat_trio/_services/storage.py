"""What the reverb's streams keep: the default bounds of the status stream and the bar history.

Both streams are bounded by age and by bytes and discard their oldest messages, so a flood on
``backbeat.status.<cluster_id>`` or ``backbeat.bar.<cluster_id>`` (anyone allowed to publish
there can send one) costs the server at most the bound, never its disk. The reverb puts the
bounds in force on streams that exist already (``JetStream.ensure_stream`` updates them).

Why these numbers: production clusters run at 1 to 24 BPM, so a window is 10 s to 4 min long
and the reverb reads a claim within a window of its arrival.

* The status stream must hold what an outage's re-publishes need: every client re-publishes its
  unacknowledged claims (up to ``Config.outbox_size``) after a reconnect, and the stream's
  duplicate window must still see the originals, so ``max_age`` is at least the duplicate window.
  A day keeps a day of claims for audits.
* A bar stream keeps history for ``tail --bars --since``: a month of reports, and the report
  count limit on top (``DEFAULT_BAR_HISTORY``).
* JetStream reserves a stream's ``max_bytes`` on the server when it creates the stream (creation
  fails when the server's store cannot hold it), so the byte bounds stay modest.
"""

from __future__ import annotations

from typing import Final

from .._errors import ConfigError

__all__ = [
    "BAR_MAX_AGE",
    "BAR_MAX_BYTES",
    "MIN_STREAM_BYTES",
    "STATUS_MAX_AGE",
    "STATUS_MAX_BYTES",
    "check_stream_bounds",
]

_MIB: Final = 1024 * 1024
#: Seconds a claim stays in the status stream by default (a day).
STATUS_MAX_AGE: Final = 24 * 3600.0
#: Bytes the status stream keeps by default; the oldest claims are discarded past it.
STATUS_MAX_BYTES: Final = 256 * _MIB
#: Seconds a bar report stays in the bar stream by default (30 days).
BAR_MAX_AGE: Final = 30 * 24 * 3600.0
#: Bytes the bar stream keeps by default; the oldest reports are discarded past it.
BAR_MAX_BYTES: Final = 256 * _MIB
#: The longest age accepted (JetStream stores ages as int64 nanoseconds).
_MAX_SECONDS: Final = 1e9
#: The smallest byte bound accepted: one message of nats-server's default ``max_payload`` fits.
MIN_STREAM_BYTES: Final = _MIB


def check_stream_bounds(
    prefix: str, max_age: float | None, max_bytes: int, duplicate_window: float
) -> None:
    """Check a stream's bounds: ``<prefix>max_age`` None (no age limit) or at least
    ``duplicate_window`` seconds, ``<prefix>max_bytes`` -1 (no byte limit) or at least
    :data:`MIN_STREAM_BYTES`.

    Raises:
        ConfigError: a bound is out of range (before anything connects).
    """
    window = duplicate_window
    if (
        isinstance(window, bool)
        or not isinstance(window, int | float)
        or not 0 < window <= _MAX_SECONDS
    ):
        raise ConfigError("duplicate_window", f"must be > 0 seconds, got {window!r}")
    if max_age is not None and (
        isinstance(max_age, bool)
        or not isinstance(max_age, int | float)
        or not window <= max_age <= _MAX_SECONDS
    ):
        raise ConfigError(
            f"{prefix}max_age",
            f"must be None (no limit) or from the stream's duplicate window ({window:g} s) to "
            f"{_MAX_SECONDS:g} s, got {max_age!r}",
        )
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise ConfigError(f"{prefix}max_bytes", f"must be an int, got {max_bytes!r}")
    if max_bytes != -1 and max_bytes < MIN_STREAM_BYTES:
        raise ConfigError(
            f"{prefix}max_bytes",
            f"must be -1 (no limit) or at least {MIN_STREAM_BYTES} (1 MiB), got {max_bytes!r}",
        )
