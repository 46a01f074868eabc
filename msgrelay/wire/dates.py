"""RFC 3339 UTC times (docs/protocol.md section 1)."""

from __future__ import annotations

import functools
import re
from datetime import datetime, timezone

from .errors import ProtocolError

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def parse_date(text: str, field: str = "date") -> float:
    """POSIX seconds of an RFC 3339 UTC time; `Z` or `+00:00`, fractions allowed (errno 105)."""
    match = _RFC3339.fullmatch(text)  # ASCII digits, no trailing newline
    if not match:
        raise ProtocolError(105, f"{field} is not an RFC 3339 time like 2026-11-22T10:15:00Z")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, offset = match.group(7), match.group(8)
    if offset.upper() != "Z" and offset != "+00:00":
        raise ProtocolError(105, f"{field} must be in UTC (Z or +00:00), not {offset}")
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc)
    except ValueError as e:
        raise ProtocolError(105, f"{field} is not a valid time: {e}")
    return moment.timestamp() + (float(fraction) if fraction else 0.0)


def format_date(seconds: float) -> str:
    """The `Z` form with whole seconds, as servers emit it."""
    return _format_second(int(seconds))


@functools.lru_cache(maxsize=256)
def _format_second(second: int) -> str:
    """Cached: every accepted message's answer formats an expiry a fixed time from now."""
    return datetime.fromtimestamp(second, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
