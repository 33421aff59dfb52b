"""Timestamps on the wire: RFC 3339, UTC, milliseconds (`2025-01-15T10:30:00.123Z`)."""

from __future__ import annotations

import calendar
import functools
import time


def format_timestamp(epoch_seconds: float) -> str:
    """`1736937000.123` -> `"2025-01-15T10:30:00.123Z"`."""
    global _last
    millis = int(epoch_seconds * 1000)
    seconds, ms = divmod(millis, 1000)
    last = _last  # one tuple, read and replaced whole: safe from any thread
    if last[0] != seconds:
        # strftime costs more than the rest together, and the events of a second (a worker makes
        # two or three per execution) share their whole-second part: made once per second.
        last = _last = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return f"{last[1]}.{ms:03d}Z"


_last: tuple[int | None, str] = (None, "")  # the whole second format_timestamp made last, as text


def parse_timestamp(text: str) -> float:
    """Inverse of format_timestamp, in epoch seconds."""
    whole, _, frac = text.rstrip("Z").partition(".")
    return _epoch_second(whole) + int(frac or 0) / 1000


@functools.lru_cache(maxsize=4096)
def _epoch_second(whole: str) -> int:
    # strptime is slow (a hot spot of the projection, which parses every event's time) and the
    # events of a second share their whole-second part: parsed once.
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))


def elapsed_ms(started_at: str | None, ended_at: str | None) -> int:
    """Milliseconds from one timestamp to another; 0 if it never started."""
    if not started_at or not ended_at:
        return 0
    return max(0, round((parse_timestamp(ended_at) - parse_timestamp(started_at)) * 1000))


def timestamp_or_none(text: str | None) -> float | None:
    """parse_timestamp, or None for text that is not one: readers survive whatever was stored."""
    try:
        return parse_timestamp(text) if text else None
    except (ValueError, OverflowError):
        return None
