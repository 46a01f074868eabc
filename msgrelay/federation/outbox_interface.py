"""What the federation code needs of an outbox, whichever backend holds the packets.

Two implementations: `FederationOutbox` (files under the state directory, one delivering
process under an flock) and `PostgresOutbox` (tables shared by every relay process on one
database, each destination leased to one process at a time). Both pass the one contract
suite, tests/outbox_contract.py. Every method blocks: callers run them in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

from .outbox import BackoffState, Entry, OutboxLock


class OutboxFull(Exception):
    """The destination's queue holds `max_queue` packets already."""


@dataclass(frozen=True)
class Claim:
    """The answer to `claim()`: whether this process may send to the destination now, the
    destination's shared backoff, and its queue as stored (arrival order)."""

    granted: bool
    backoff: BackoffState = BackoffState()
    entries: list[Entry] = field(default_factory=list)
    holder: Optional[str] = None  # denied: the process holding the lease, if one does


@dataclass(frozen=True)
class QueueSummary:
    """One destination as `msgrelay-admin queue list` shows it from the outbox itself."""

    destination: str
    queued: int
    expired: int
    oldest_received: Optional[int]
    backoff: BackoffState
    holder: Optional[str] = None  # the process sending to it now (shared outboxes)

    def to_json(self) -> dict[str, Any]:
        return {"destination": self.destination, "queued": self.queued, "expired": self.expired,
                "oldest_received": self.oldest_received, "failures": self.backoff.attempts,
                "next_attempt": self.backoff.next_attempt, "last_error": self.backoff.last_error,
                "holder": self.holder}


@runtime_checkable
class Outbox(Protocol):
    """Durable queues of packets for other relays; see the module docstring."""

    #: True when several processes deliver from it: queues then claim a destination before
    #: sending, and poll for work other processes accepted.
    shared: bool

    def lock(self) -> OutboxLock:
        """Exclusive use by this process (OutboxBusy if another has it); shared outboxes
        need none and return a lock that holds nothing."""

    def is_locked(self) -> bool:
        """True while a relay process holds `lock()`."""

    def close(self) -> None:
        """Let go of connections (nothing for files)."""

    def destinations(self) -> list[str]:
        """Destinations that have a queue (packets, or saved backoff)."""

    def entries(self, destination: str) -> list[Entry]:
        """The destination's queue in arrival order."""

    def load_all(self) -> dict[str, list[Entry]]:
        ...

    def read(self, entry: Entry) -> dict[str, Any]:
        """The stored packet object; KeyError if it is gone."""

    def add(self, destination: str, packet: dict[str, Any], received: int, expires: int,
            dedup_key: Optional[str] = None, max_queue: Optional[int] = None) -> tuple[Entry, bool]:
        """Queue durably: (entry, False); an unexpired duplicate: (its entry, True).
        OutboxFull if `max_queue` packets are queued (backends that count cheaply)."""

    def remove(self, entry: Entry) -> None:
        """Forget a delivered, refused or expired packet (no error if already gone)."""

    def sweep_dedup(self, now: int) -> int:
        """Remove expired idempotency records; the count removed."""

    def load_backoff(self, destination: str) -> BackoffState:
        ...

    def save_backoff(self, destination: str, state: BackoffState) -> None:
        ...

    def clear_backoff(self, destination: str) -> None:
        ...

    def remove_destination(self, destination: str) -> bool:
        """Forget an empty queue and its backoff; False if packets are in it."""

    def claim(self, destination: str, now: float) -> Claim:
        """Take the right to send to `destination` now: granted unless another process holds
        it or the shared backoff says not yet."""

    def renew(self, destination: str, now: float) -> bool:
        """Extend a granted claim before each attempt; False if it was lost meanwhile."""

    def release(self, destination: str, now: float) -> bool:
        """Give the claim up; True if packets that may be sent now are queued (so the caller
        claims again: another process may have queued them while we held the claim)."""

    def pending(self, now: float) -> dict[str, bool]:
        """Every destination with queued packets: whether it may be claimed now."""

    def summary(self, now: float) -> list[QueueSummary]:
        """Every destination with its counts and backoff, for `msgrelay-admin queue list`."""
