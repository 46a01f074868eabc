"""The maildir's per-user index: pending messages in arrival order, their count and bytes, and
an expiry heap, so quota, fetch and expiry cost about the same for 10 or 100,000 messages.

The index lives in memory only and is built from one listing of the user's `new/` folder
(message names carry arrival, received, expiry and size: no body is read) and one read of
the user's message log (maildir_log). It is never the truth, only a cache of it:

- every change to a user's `new/` folder, by any process (relay, `msgrelay-admin expire`,
  `fsck`, `user delete`), and every acknowledgement or compaction of the log appends one
  byte to the user's `generation` file (O_APPEND, so concurrent appends never overwrite each
  other). A message appended to the log does not: only the relay process appends, and any
  other process reads the log afresh when it builds its own index, so the byte would tell
  nobody anything (it cost 18% of the store's CPU per delivery);
- before using an index, its owner compares the file's (inode, size) with the ones it last
  accounted for; any change it did not make itself means "rebuild from the folder".

So a crash loses nothing (the index is rebuilt from the files at the next use), and an fsck
finding wins over a stale index. The generation file needs no fsync for the same reason.
"""

from __future__ import annotations

import heapq
import os
import threading
from pathlib import Path
from typing import Iterable, Optional

from .maildir_layout import MessageName, list_dir
from .maildir_log import Location, LogSync, load

GENERATION = "generation"
#: Past this size the generation file is replaced by an empty one (a new inode: a change too).
GENERATION_RESET_BYTES = 65536

Key = Optional[tuple[int, int]]  # (st_ino, st_size) of the generation file; None if absent
#: A logged message's dedup key is remembered by the first 16 bytes of its SHA-256: two keys
#: of one mailbox sharing them is a 1 in 2**128 chance per pair, and each byte kept costs
#: memory for every record in the log (100,000 messages: the relay's RSS went 101 -> 137 MiB
#: before keys, places and names were made compact).
DEDUP_PREFIX = 16


def pack(location: Location) -> int:
    """A log location as one int (segment, offset and length each below 2**32): a tuple of
    three would take three times the memory, for every pending message."""
    return (location[0] << 64) | (location[1] << 32) | location[2]


def unpack(packed: int) -> Location:
    return packed >> 64, (packed >> 32) & 0xFFFFFFFF, packed & 0xFFFFFFFF


def generation_key(udir: Path) -> Key:
    try:
        st = os.stat(udir / GENERATION)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_ino, st.st_size


def note_change(udir: Path) -> Key:
    """Tell every index of this user that its folder changed; returns the key after our byte.

    Raises FileNotFoundError when the user folder is gone.
    """
    path = udir / GENERATION
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, b".")
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if st.st_size > GENERATION_RESET_BYTES:
        fresh = udir / "tmp" / f"{GENERATION}-{os.urandom(4).hex()}"
        os.close(os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        os.rename(fresh, path)
        st = os.stat(path)
    return st.st_ino, st.st_size


class UserIndex:
    """One user's pending messages; every field is guarded by `mutex` (see MaildirFiles)."""

    __slots__ = ("key", "pending", "heap", "count", "bytes", "latest", "in_flight", "dedup_waits",
                 "mutex", "changed", "new_sync", "located", "segments", "logged", "head", "head_open",
                 "log_sync", "earlier_keys", "__weakref__")

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        #: Signalled whenever an in-flight delivery ends (committed or rolled back).
        self.changed = threading.Condition(self.mutex)
        self.key: Key = None
        #: name -> (expires, size, received), in name (= arrival) order.
        self.pending: dict[str, tuple[int, int, int]] = {}
        #: (expires, name) for pending names; entries for removed names are skipped lazily.
        self.heap: list[tuple[int, str]] = []
        self.count = 0
        self.bytes = 0
        self.latest = 0  # highest arrival stamp seen: new ids sort after it
        #: Names reserved by deliveries not yet durable: counted by the quota, never fetched.
        self.in_flight: set[str] = set()
        #: dedup key hash (the record's key) -> name of the message being delivered under it.
        self.dedup_waits: dict[str, str] = {}
        self.new_sync: Optional[object] = None
        #: Pending names kept in the user's log (maildir_log), where (`pack`); the others are files.
        self.located: dict[str, int] = {}
        #: Log segment -> [bytes, bytes of its pending records], for compaction.
        self.segments: dict[int, list[int]] = {}
        #: Dedup key digest's DEDUP_PREFIX -> name, of every message record still in the log.
        self.logged: dict[bytes, str] = {}
        #: The segment appends go to, and whether it may take them (else a new one starts).
        self.head = 0
        self.head_open = False
        self.log_sync = LogSync()
        #: Whether dedup keys of this user may be kept outside the log (the dedup table, an
        #: earlier version's dedup folder); None until asked once after each rebuild.
        self.earlier_keys: Optional[bool] = None

    # -- building --------------------------------------------------------------------------

    def rebuild(self, udir: Path, key: Key) -> None:
        """Replace the committed entries by the folder's listing and the log's records; keep
        in-flight reservations."""
        log = load(udir, DEDUP_PREFIX)
        # One string per name, shared by every table here (a mailbox may hold 100,000).
        names = [(str(n), n) for n in map(MessageName.parse, list_dir(udir / "new")) if n is not None]
        names.extend((text, entry.name) for text, entry in log.live.items())
        names.sort(key=lambda item: item[0])
        keep = {name: self.pending[name] for name in self.in_flight if name in self.pending}
        kept_at = {name: self.located[name] for name in keep if name in self.located}
        pending: dict[str, tuple[int, int, int]] = {}
        for text, parsed in names:
            pending[text] = (parsed.expires, parsed.size, parsed.received)
            self.latest = max(self.latest, parsed.arrival_ns)
        if keep:
            pending.update(keep)
            pending = dict(sorted(pending.items()))
        self.pending = pending
        self.located = {name: pack(entry.location) for name, entry in log.live.items()}
        self.located.update(kept_at)
        self.segments = {number: [size, 0] for number, size in log.sizes.items()}
        for packed in self.located.values():
            number, _, length = unpack(packed)
            if number in self.segments:
                self.segments[number][1] += length
        self.logged = log.dedup
        self.head = max(log.sizes, default=0)
        self.head_open = log.head_open
        self.earlier_keys = None
        self.heap = [(value[0], name) for name, value in pending.items()]
        heapq.heapify(self.heap)
        self.count = len(pending)
        self.bytes = sum(value[1] for value in pending.values())
        self.key = key

    # -- changes ---------------------------------------------------------------------------

    def reserve(self, name: MessageName, location: Optional[Location] = None) -> str:
        """Add a name about to be written (at `location` in the log, or as a file); it sorts
        after every other (arrival order). Returns the name as kept (one string, shared)."""
        text = str(name)
        if location is not None:
            self.place(text, location)
        self.pending[text] = (name.expires, name.size, name.received)
        heapq.heappush(self.heap, (name.expires, text))
        self.count += 1
        self.bytes += name.size
        self.latest = max(self.latest, name.arrival_ns)
        self.in_flight.add(text)
        return text

    def place(self, name: str, location: Location) -> None:
        """Say where in the log a pending name's record is (now)."""
        before = self.located.get(name)
        if before is not None:
            self._unplaced(before)
        self.located[name] = pack(location)
        self.segments[location[0]][1] += location[2]

    def _unplaced(self, packed: int) -> None:
        number, _, length = unpack(packed)
        if number in self.segments:
            self.segments[number][1] -= length

    def where(self, name: str) -> Optional[Location]:
        packed = self.located.get(name)
        return None if packed is None else unpack(packed)

    def logged_earlier(self, digest: bytes, now: int) -> Optional[tuple[str, int]]:
        """(name, expires) of the unexpired record in the log for this dedup key digest."""
        name = self.logged.get(digest[:DEDUP_PREFIX])
        if name is None:
            return None
        parsed = MessageName.parse(name)
        return None if parsed is None or now >= parsed.expires else (name, parsed.expires)

    def commit(self, name: str) -> None:
        self.in_flight.discard(name)

    def remove(self, name: str) -> bool:
        value = self.pending.pop(name, None)
        if value is None:
            return False
        self.in_flight.discard(name)
        packed = self.located.pop(name, None)
        if packed is not None:
            self._unplaced(packed)
        self.count -= 1
        self.bytes -= value[1]
        if len(self.heap) > 2 * self.count + 64:  # drop entries of removed names
            self.heap = [(v[0], n) for n, v in self.pending.items()]
            heapq.heapify(self.heap)
        return True

    # -- questions -------------------------------------------------------------------------

    def _expired(self, now: int) -> Iterable[str]:
        """Pending names with expires <= now: walks only the heap nodes that have expired."""
        heap, pending = self.heap, self.pending
        stack = [0] if heap and heap[0][0] <= now else []
        while stack:
            i = stack.pop()
            expires, name = heap[i]
            if name in pending and pending[name][0] == expires:
                yield name
            for child in (2 * i + 1, 2 * i + 2):
                if child < len(heap) and heap[child][0] <= now:
                    stack.append(child)

    def expired(self, now: int) -> list[str]:
        return list(self._expired(now))

    def live(self, now: int) -> tuple[int, int]:
        """(count, bytes) of pending unexpired messages, in flight included (for the quota)."""
        count, size = self.count, self.bytes
        for name in self._expired(now):
            count -= 1
            size -= self.pending[name][1]
        return count, size

    def page(self, now: int, limit: int, max_bytes: Optional[int] = None) -> tuple[list[str], int]:
        """Up to `limit` visible live names, oldest first, and how many more live ones follow;
        with `max_bytes`, only as many as fit in it (but always the first).

        A message becomes visible once durable, and never before an older one: the page
        stops at the first delivery still in flight, so ids are seen in arrival order.
        """
        found: list[str] = []
        used = 0
        for name, (expires, size, _) in self.pending.items():
            if len(found) >= limit:
                break
            if expires <= now:
                continue
            if name in self.in_flight or (found and max_bytes is not None and used + size > max_bytes):
                break
            used += size
            found.append(name)
        total, _ = self.live(now)
        visible = total - sum(1 for n in self.in_flight if self.pending[n][0] > now)
        return found, max(0, visible - len(found))

    def oldest_live(self, now: int) -> Optional[int]:
        return min((v[2] for v in self.pending.values() if v[0] > now), default=None)
