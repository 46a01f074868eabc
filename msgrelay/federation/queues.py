"""Per-destination queue state and the backoff arithmetic of PROTOCOL.md section 7."""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Optional, Union

from .outbox import Entry

#: The longest `Retry-After` honoured (a day): a peer may slow its own queue, not freeze it.
MAX_RETRY_AFTER = 86400


def backoff_delay(failures: int, minimum: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: the n-th failure waits in [d/2, d], d = min * 2^(n-1) capped.

    Half the delay is random so peers that failed together do not retry together, and the
    other half keeps a failing peer from being retried at once.
    """
    ceiling = min(maximum, minimum * (2 ** min(max(failures - 1, 0), 62)))
    return ceiling / 2 + rng.random() * ceiling / 2


def parse_retry_after(value: Optional[Union[bytes, str]], now: float) -> Optional[float]:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), capped."""
    if not value:
        return None
    text = (value.decode("latin-1") if isinstance(value, bytes) else value).strip()
    try:
        seconds = float(int(text))
    except ValueError:
        try:
            seconds = parsedate_to_datetime(text).timestamp() - now
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


@dataclass
class DestinationQueue:
    """What the sender knows about one destination; the packets themselves stay on disk."""

    name: str
    entries: list[Entry] = field(default_factory=list)
    failures: int = 0
    backoff: float = 0.0
    next_attempt: Optional[float] = None
    timer: Any = None  # IDelayedCall of the next attempt
    running: bool = False
    pinned_ok: bool = True
    state: str = "idle"  # idle, delivering, backoff, pin-mismatch, blocked
    last_error: Optional[str] = None
    delivered: int = 0
    dropped: int = 0
    ids: set[str] = field(default_factory=set)

    def add(self, entry: Entry) -> None:
        """Insert in arrival order (writes finishing out of order still queue in order)."""
        if entry.id in self.ids:
            return
        self.ids.add(entry.id)
        keys = [(e.seq, e.nonce) for e in self.entries[-8:]]
        if not keys or (entry.seq, entry.nonce) > keys[-1]:
            self.entries.append(entry)
        else:
            bisect.insort(self.entries, entry, key=lambda e: (e.seq, e.nonce))

    def discard(self, entry: Entry) -> None:
        if entry.id in self.ids:
            self.ids.discard(entry.id)
            self.entries.remove(entry)

    def waiting(self) -> bool:
        return self.timer is not None and self.timer.active()

    def cancel_timer(self) -> None:
        if self.waiting():
            self.timer.cancel()
        self.timer = None
        self.next_attempt = None

    def oldest_age(self, now: float) -> float:
        return max(0.0, now - min(e.received for e in self.entries)) if self.entries else 0.0

    def status(self, now: float) -> dict[str, Any]:
        """The fields `queue_status()` promises (metrics read these)."""
        return {
            "destination": self.name,
            "queued": len(self.entries),
            "oldest_age_seconds": round(self.oldest_age(now), 3),
            "backoff_seconds": round(self.backoff, 3),
            "next_attempt": self.next_attempt if self.waiting() else None,
            "pinned_ok": self.pinned_ok,
        }

    def details(self) -> dict[str, Any]:
        """What an operator reads (the status file): nothing in it changes by itself with time."""
        return {
            "queued": len(self.entries),
            "oldest_received": min(e.received for e in self.entries) if self.entries else None,
            "backoff_seconds": round(self.backoff, 3),
            "next_attempt": round(self.next_attempt, 3) if self.waiting() and self.next_attempt else None,
            "pinned_ok": self.pinned_ok, "state": self.state, "failures": self.failures,
            "last_error": self.last_error, "delivered": self.delivered, "dropped": self.dropped,
        }
