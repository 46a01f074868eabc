"""The maildir's replay cache: used signature digests in memory, made durable in an
append-only journal whose fsyncs concurrent requests share (group commit).

Every signed request records its digest before it is answered. As one file per entry
(the first layout) that cost a file creation, two fsyncs and about a dozen system calls
per request, each of which hands the GIL over; on a fetch that was a third of the work.
Here a request costs a dictionary lookup under a lock, and one `write` and one
`fdatasync` cover every request that arrived while the previous one ran.

The journal is a series of segment files `replay/<started>-<random>.journal`, each a run
of lines `<first 16 bytes of the digest, hex> <until>\\n`. A new segment starts at every
open and every `ROTATE_SECONDS`; a segment whose entries have all expired is removed by
the expiry sweep. At open every segment is read back: a line cut short by a crash was
never answered (the answer waits for its fdatasync), so it is skipped. Entries of the
first layout (one file per digest in 256 shard folders) are read too, and swept by
`maildir_expiry` as before.

One relay process owns the journal: the outbox lock of its state directory keeps a
second relay from starting on it (msgrelay/service.py), and `msgrelay-admin` never
records signatures. Two `MaildirFiles` in one process must not share a directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path
from typing import Optional

from twisted.logger import Logger

from ..durable import fsync_dir, unlink_quietly
from . import maildir_records as records
from .dirsync import GroupCommit
from .maildir_layout import list_dir

log = Logger(namespace="msgrelay.store.maildir")

#: A segment takes new entries for this long (seconds of the callers' clock), then the next one starts.
ROTATE_SECONDS = 60
#: Bytes of the key kept: a false match needs a 128-bit collision (and would only refuse, errno 112).
KEY_BYTES = 16


def replay_key(digest: bytes) -> bytes:
    """The in-memory key of a signature digest: the start of its SHA-256, as the first
    layout named its files (`maildir_records.hash_name`), so both layouts' entries match."""
    return hashlib.sha256(digest).digest()[:KEY_BYTES]
SEGMENT = re.compile(r"[0-9]{1,12}-[0-9a-f]{8}\.journal")
_LINE = re.compile(rb"([0-9a-f]{32}) ([0-9]{1,12})")


class _Segment:
    __slots__ = ("path", "started", "max_until", "keys")

    def __init__(self, path: Optional[Path], started: int):
        self.path = path  # None: the entries of the first layout (their files are swept elsewhere)
        self.started = started
        self.max_until = 0
        self.keys: list[bytes] = []


class ReplayJournal(GroupCommit):
    """Thread-safe; `remember` blocks its caller (a store thread) until its entry is durable."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder
        self._live: dict[bytes, int] = {}
        self._segments: list[_Segment] = []  # oldest first; the last one is written when _fd is set
        self._fd: Optional[int] = None
        self._pending: list[tuple[bytes, int]] = []
        self._now = 0  # the latest caller's clock, for rotation
        self._opened: Optional[tuple[_Segment, int]] = None  # a round's new segment, until settled
        self._load()

    def __len__(self) -> int:
        return len(self._live)

    # -- start-up ----------------------------------------------------------------------

    def _load(self) -> None:
        """Every entry of every segment, and of the first layout's shards; nothing expired is
        dropped here (that is the sweep's, with the callers' clock)."""
        legacy = _Segment(None, 0)
        skipped = 0
        for name in sorted(list_dir(self.folder)):
            path = self.folder / name
            if SEGMENT.fullmatch(name):
                segment = _Segment(path, int(name.split("-", 1)[0]))
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue
                for line in data.split(b"\n"):
                    match = _LINE.fullmatch(line)
                    if match is None:
                        skipped += bool(line)
                        continue
                    self._add(segment, bytes.fromhex(match.group(1).decode("ascii")), int(match.group(2)))
                self._segments.append(segment)
            elif len(name) == 2 and path.is_dir():  # a shard of the first layout
                for entry in list_dir(path):
                    try:
                        key = bytes.fromhex(entry)[:KEY_BYTES]
                        until = records.read_until(path / entry)
                    except (ValueError, OSError):
                        continue  # not an entry (fsck names it)
                    if until is not None and len(key) == KEY_BYTES:
                        self._add(legacy, key, until)
        if legacy.keys:
            self._segments.insert(0, legacy)
        if skipped:
            log.warn("replay journal: {count} damaged line(s) skipped (a write cut short by a crash is one)",
                     count=skipped)

    def _add(self, segment: _Segment, key: bytes, until: int) -> None:
        if until > self._live.get(key, 0):
            self._live[key] = until
        segment.keys.append(key)
        segment.max_until = max(segment.max_until, until)

    # -- recording ---------------------------------------------------------------------

    def remember(self, digest: bytes, until: int, now: int) -> bool:
        """Record a first use (True, once durable), or refuse a digest still live (False).

        Concurrent callers share one write and one fdatasync; if they fail, each of them
        gets the error and their entries are taken back, so a retry is not called a replay.
        """
        key = replay_key(digest)
        with self._cond:
            known = self._live.get(key)
            if known is not None and known > now:
                return False
            self._live[key] = until
            self._pending.append((key, until))
            self._now = now
            self._join_round()
        return True

    def _take(self) -> tuple[list[tuple[bytes, int]], bool]:
        batch, self._pending = self._pending, []
        current = self._segments[-1] if self._fd is not None else None
        rotate = current is None or not 0 <= self._now - current.started < ROTATE_SECONDS
        return batch, rotate

    def _round(self, taken: tuple[list[tuple[bytes, int]], bool]) -> None:
        """One write and one fdatasync for every entry taken (a new segment first if due)."""
        batch, rotate = taken
        data = b"".join(b"%s %d\n" % (key.hex().encode("ascii"), until) for key, until in batch)
        if rotate:
            self._opened = self._open_segment(self._now)
        fd = self._opened[1] if self._opened is not None else self._fd
        assert fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fdatasync(fd)

    def _settle(self, taken: tuple[list[tuple[bytes, int]], bool], error: Optional[BaseException]) -> None:
        batch, _ = taken
        if self._opened is not None:
            if self._fd is not None:
                os.close(self._fd)
            self._segments.append(self._opened[0])
            self._fd = self._opened[1]
            self._opened = None
        if error is not None:
            for key, until in batch:
                if self._live.get(key) == until:
                    del self._live[key]
            if self._fd is not None:  # its tail is unknown now: the next round starts a new segment
                os.close(self._fd)
                self._fd = None
            return
        for key, until in batch:
            self._add(self._segments[-1], key, until)

    def _open_segment(self, now: int) -> tuple[_Segment, int]:
        """A new, empty segment whose name is durable before any entry is written to it."""
        path = self.folder / f"{max(now, 0)}-{secrets.token_hex(4)}.journal"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fsync_dir(self.folder)
        except BaseException:
            os.close(fd)
            unlink_quietly(path)
            raise
        return _Segment(path, now), fd

    # -- upkeep ------------------------------------------------------------------------

    def sweep(self, now: int) -> int:
        """Forget the entries of every segment whose entries have all expired, and remove its
        file (the current one too: the next request starts a new one); returns how many."""
        with self._cond:
            self._idle()
            doomed = [s for s in self._segments if s.max_until <= now]
            if not doomed:
                return 0
            if self._fd is not None and self._segments[-1] in doomed:
                os.close(self._fd)
                self._fd = None
            self._segments = [s for s in self._segments if s.max_until > now]
            forgotten = 0
            for segment in doomed:
                for key in segment.keys:
                    until = self._live.get(key)
                    if until is not None and until <= now:
                        del self._live[key]
                        forgotten += 1
        removed = [s.path for s in doomed if s.path is not None]
        for path in removed:
            unlink_quietly(path)
        if removed:
            fsync_dir(self.folder)
        return forgotten

    def close(self) -> None:
        with self._cond:
            self._idle()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
