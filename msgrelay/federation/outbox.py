"""The durable outbox: packets accepted for other relays, one queue per destination.

Synchronous file operations; the federation service runs them in its own threads,
`msgrelay-admin` calls them directly on a stopped relay. Layout under `<state_dir>/outbox/`:

    .lock                 flock held by the process delivering this outbox
    .dedup/<sha256 hex>   idempotency records: "<message id>\\n<expires>" until expiry
    <destination>/        one queue; the server name with ":" written as "_"
        <seq>-<received>-<expires>-<random>.json   one packet record (mode 0600)
        .backoff          the queue's backoff: failures in a row, next attempt (after a failure)

A destination's folder is removed once its queue is empty (open federation would otherwise
keep one per made-up relay forever).

Every record is written to a temporary file, fsynced, renamed and its folder fsynced, so a
packet the relay answered `200` for survives a crash. File names sort in arrival order and
carry the times the queue needs, so loading a queue reads directory listings only.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..durable import fsync_dir, replace_durably

if TYPE_CHECKING:
    from .outbox_interface import Claim, QueueSummary

LOCK_NAME = ".lock"
DEDUP_DIR = ".dedup"
BACKOFF_NAME = ".backoff"
_ENTRY = re.compile(r"([0-9]{16})-([0-9]{1,12})-([0-9]{1,12})-([0-9a-f]{8})\.json")


class OutboxUnavailable(Exception):
    """The outbox cannot be read or written now (disk full, permissions)."""


class OutboxBusy(Exception):
    """Another process holds the outbox lock."""


@dataclass(frozen=True)
class Entry:
    """One queued packet, as its file name describes it."""

    destination: str
    seq: int
    received: int
    expires: int
    nonce: str

    @property
    def id(self) -> str:
        """The message id the sender was given: the file name without `.json`."""
        return f"{self.seq:016d}-{self.received}-{self.expires}-{self.nonce}"

    @property
    def file_name(self) -> str:
        return self.id + ".json"

    @classmethod
    def from_id(cls, destination: str, message_id: str) -> "Entry":
        """The entry behind an id this outbox gave out (ValueError if it is not one)."""
        seq, received, expires, nonce = message_id.split("-")
        return cls(destination, int(seq), int(received), int(expires), nonce)


def escape_destination(destination: str) -> str:
    """Server names are [a-z0-9.-] with an optional :port; ":" becomes "_" (never in a name)."""
    return destination.lower().replace(":", "_")


def unescape_destination(folder: str) -> str:
    return folder.replace("_", ":")


def _mkdir_durably(path: Path) -> None:
    if not path.is_dir():
        path.mkdir(mode=0o700, exist_ok=True)
        fsync_dir(path.parent)


def _unlink_durably(path: Path, what: str) -> None:
    """Remove `path` if it is there, and fsync its folder (OutboxUnavailable: cannot `what`)."""
    try:
        os.unlink(path)
        fsync_dir(path.parent)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise OutboxUnavailable(f"cannot {what}: {e.strerror}")


class OutboxLock:
    """An exclusive flock on `<outbox>/.lock`: one delivering process per outbox."""

    def __init__(self, fd: int):
        self._fd: Optional[int] = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class BackoffState:
    """What a queue remembers across restarts after failures: no peer is hammered at start."""

    attempts: int = 0
    next_attempt: Optional[float] = None
    last_error: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "next_attempt": self.next_attempt, "last_error": self.last_error}

    @classmethod
    def from_json(cls, obj: Any) -> "BackoffState":
        attempts, when, error = obj.get("attempts"), obj.get("next_attempt"), obj.get("last_error")
        return cls(attempts if isinstance(attempts, int) and attempts >= 0 else 0,
                   float(when) if isinstance(when, (int, float)) else None,
                   error if isinstance(error, str) else None)


class FederationOutbox:
    """The files of one outbox. Thread-safe: any thread may call any method.

    One process delivers from it (it holds `lock()`), so claims are always its own: `claim`
    only checks the backoff, and there is never work from another process to poll for.
    """

    shared = False

    def __init__(self, root: Path):
        self.root = Path(root)
        self._seq_lock = threading.Lock()
        self._last_seq = 0

    @classmethod
    def open(cls, root: Path) -> "FederationOutbox":
        """Create the folder if needed (raises OutboxUnavailable)."""
        outbox = cls(root)
        try:
            outbox.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            _mkdir_durably(outbox.root / DEDUP_DIR)
        except OSError as e:
            raise OutboxUnavailable(f"{root}: cannot create the outbox: {e.strerror}")
        return outbox

    def close(self) -> None:
        """Nothing to let go of: every call opens and closes its own files."""

    # -- locking ----------------------------------------------------------------

    def lock(self) -> OutboxLock:
        """Take the delivery lock, or raise OutboxBusy if a running relay holds it."""
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutboxBusy(f"{self.root} is in use by a running relay")
        return OutboxLock(fd)

    def is_locked(self) -> bool:
        """True while a relay process delivers from this outbox."""
        if not (self.root / LOCK_NAME).exists():  # never used: no relay has run here
            return False
        try:
            self.lock().release()
        except OutboxBusy:
            return True
        return False

    # -- reading ----------------------------------------------------------------

    def destinations(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(unescape_destination(n) for n in names if not n.startswith(".") and (self.root / n).is_dir())

    def entries(self, destination: str) -> list[Entry]:
        """The destination's queue in arrival order."""
        try:
            names = os.listdir(self.root / escape_destination(destination))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            match = _ENTRY.fullmatch(name)
            if match:
                seq, received, expires, nonce = match.groups()
                found.append(Entry(destination, int(seq), int(received), int(expires), nonce))
        found.sort(key=lambda e: (e.seq, e.nonce))
        if found:
            with self._seq_lock:
                self._last_seq = max(self._last_seq, found[-1].seq)
        return found

    def load_all(self) -> dict[str, list[Entry]]:
        return {d: self.entries(d) for d in self.destinations()}

    def read(self, entry: Entry) -> dict[str, Any]:
        """The stored packet object (as the sender sent it), or KeyError if gone."""
        path = self.root / escape_destination(entry.destination) / entry.file_name
        try:
            record = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise KeyError(entry.id)
        except OSError as e:
            raise OutboxUnavailable(f"cannot read {path}: {e.strerror}")
        return record["packet"]

    # -- writing ----------------------------------------------------------------

    def _next_seq(self) -> int:
        with self._seq_lock:
            self._last_seq = max(self._last_seq + 1, time.time_ns() // 1000)
            return self._last_seq

    def find_duplicate(self, dedup_key: str, now: int) -> Optional[tuple[str, int]]:
        """(message id, expires) of an earlier packet with this key, if still unexpired."""
        try:
            text = (self.root / DEDUP_DIR / dedup_key).read_text()
            message_id, expires = text.split("\n")[:2]
        except (OSError, ValueError):
            return None
        return (message_id, int(expires)) if int(expires) > now else None

    def add(self, destination: str, packet: dict[str, Any], received: int, expires: int,
            dedup_key: Optional[str] = None, max_queue: Optional[int] = None) -> tuple[Entry, bool]:
        """Queue a packet durably; (entry, False). An unexpired duplicate: (its entry, True).

        `max_queue` is not checked here (it would list the folder on every packet): the one
        delivering process holds the queue in memory and checks it there."""
        try:
            if dedup_key is not None:
                earlier = self.find_duplicate(dedup_key, received)
                if earlier is not None:
                    return Entry.from_id(destination, earlier[0]), True
            entry = Entry(destination, self._next_seq(), received, expires, secrets.token_hex(4))
            folder = self.root / escape_destination(destination)
            record = {"v": 1, "id": entry.id, "destination": destination,
                      "received": received, "expires": expires, "packet": packet}
            data = json.dumps(record, separators=(",", ":")).encode()
            for last_try in (False, False, True):
                _mkdir_durably(folder)
                try:
                    replace_durably(folder / entry.file_name, data)
                    break
                except FileNotFoundError:  # the emptied folder was reclaimed meanwhile: make it again
                    if last_try:
                        raise
            if dedup_key is not None:
                replace_durably(self.root / DEDUP_DIR / dedup_key, f"{entry.id}\n{expires}".encode())
            return entry, False
        except OSError as e:
            raise OutboxUnavailable(f"cannot queue a packet for {destination}: {e.strerror}")

    def remove(self, entry: Entry) -> None:
        """Forget a delivered, refused or expired packet (durably)."""
        _unlink_durably(self.root / escape_destination(entry.destination) / entry.file_name, f"remove {entry.id}")

    def sweep_dedup(self, now: int) -> int:
        """Remove expired idempotency records; the count removed."""
        removed = 0
        folder = self.root / DEDUP_DIR
        for name in os.listdir(folder):
            if name.startswith("."):
                continue
            try:
                expires = int((folder / name).read_text().split("\n")[1])
            except (OSError, ValueError, IndexError):
                continue
            if expires <= now:
                try:
                    os.unlink(folder / name)
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed

    # -- backoff state and reclaiming ---------------------------------------------

    def load_backoff(self, destination: str) -> BackoffState:
        try:
            text = (self.root / escape_destination(destination) / BACKOFF_NAME).read_text()
            return BackoffState.from_json(json.loads(text))
        except (OSError, ValueError, AttributeError):
            return BackoffState()

    def save_backoff(self, destination: str, state: BackoffState) -> None:
        """Durably, so the next process keeps waiting (OutboxUnavailable if it cannot)."""
        folder = self.root / escape_destination(destination)
        try:
            _mkdir_durably(folder)
            replace_durably(folder / BACKOFF_NAME, json.dumps(state.to_json()).encode())
        except OSError as e:
            raise OutboxUnavailable(f"cannot save the backoff of {destination}: {e.strerror}")

    def clear_backoff(self, destination: str) -> None:
        _unlink_durably(self.root / escape_destination(destination) / BACKOFF_NAME,
                        f"clear the backoff of {destination}")

    def remove_destination(self, destination: str) -> bool:
        """Remove an empty queue's folder (its backoff state too); False if packets are in it."""
        folder = self.root / escape_destination(destination)
        if self.entries(destination):
            return False
        try:
            if (folder / BACKOFF_NAME).exists():
                os.unlink(folder / BACKOFF_NAME)
            os.rmdir(folder)  # fails if a packet arrived meanwhile: then the queue stays
            fsync_dir(self.root)
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True

    # -- claims: one process, so only the backoff decides ------------------------------

    def claim(self, destination: str, now: float) -> "Claim":
        from .outbox_interface import Claim

        backoff = self.load_backoff(destination)
        return Claim(_due(backoff, now), backoff, self.entries(destination))

    def renew(self, destination: str, now: float) -> bool:
        return True

    def release(self, destination: str, now: float) -> bool:
        return bool(self.entries(destination)) and _due(self.load_backoff(destination), now)

    def pending(self, now: float) -> dict[str, bool]:
        return {d: _due(self.load_backoff(d), now) for d in self.destinations() if self.entries(d)}

    def summary(self, now: float) -> list["QueueSummary"]:
        from .outbox_interface import QueueSummary

        found = []
        for destination, entries in self.load_all().items():
            found.append(QueueSummary(destination, len(entries), sum(1 for e in entries if e.expires <= now),
                                      min((e.received for e in entries), default=None),
                                      self.load_backoff(destination)))
        return found


def _due(backoff: BackoffState, now: float) -> bool:
    """Whether the backoff allows an attempt at `now`."""
    return backoff.next_attempt is None or backoff.next_attempt <= now
