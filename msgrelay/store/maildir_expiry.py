"""When the maildir's small records expire (dedup records, tokens, replay entries), kept in
memory, so an expiry sweep reads only the records that are due instead of a stat() of every
record in every folder.

The index is a cache of the files and nothing else. It holds one (expiry hint, folder, name)
per record in a heap: the hint is the mtime the writer gave the file, never later than the
expiry recorded inside it. It is built by one walk of the record folders (a stat() of each
file) at the first sweep after the store is opened, so after a crash or restart it is
rebuilt exactly from what is on disk; from then on every write of a record adds its entry.
A sweep pops the entries that are due and, under the lock the writers and the old sweep
used, reads each file's recorded expiry: past, the file goes; later (the record was written
again meanwhile), the entry goes back with that expiry; the file gone (revoked, erased,
removed by fsck or by `msgrelay-admin expire`), the entry is simply dropped. Only the relay
process adds records (`msgrelay-admin` only removes them), so none is missed. Records that
never expire are not kept (where the filesystem clamps their far-future mtime, they are, and
are read once that clamped date comes). Memory: about 200 bytes per record.
"""

from __future__ import annotations

import heapq
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..durable import fsync_dir, unlink_quietly
from . import maildir_records as records
from .maildir_layout import list_dir, locked_directory

#: Folders of a user whose records carry `{"expires": ...}`; replay entries hold their `until`.
USER_RECORD_FOLDERS = ("dedup", "tokens")


def _recorded_expiry(folder: Path) -> Callable[[Path], Optional[int]]:
    if folder.name in USER_RECORD_FOLDERS:
        return lambda path: records.read_json_field(path, "expires")
    return records.read_until


def _lock_of(folder: Path) -> Path:
    """The directory whose flock writers and sweepers of `folder` hold: the user's folder
    for dedup records and tokens, the shard itself for replay entries."""
    return folder.parent if folder.name in USER_RECORD_FOLDERS else folder


class ExpiryIndex:
    """A heap of (hint, folder, name); thread-safe."""

    def __init__(self, never: int):
        self.never = never
        self.built = False
        self._heap: list[tuple[int, str, str]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, folder: Path, name: str, hint: Optional[int]) -> None:
        """A record was written with this expiry hint (None or `never`: it never expires)."""
        if hint is None or hint >= self.never:
            return
        entry = (int(hint), sys.intern(str(folder)), name)
        with self._lock:
            heapq.heappush(self._heap, entry)

    def build(self, folders: Iterator[Path]) -> int:
        """Add every record of `folders` by its mtime; returns how many were found. Writes
        meanwhile may add an entry twice, which costs one extra read when it comes due."""
        found = 0
        for folder in folders:
            for name in list_dir(folder):
                try:
                    hint = int(os.stat(folder / name).st_mtime)
                except FileNotFoundError:
                    continue
                self.add(folder, name, hint)
                found += 1
        self.built = True
        return found

    def due(self, now: int) -> dict[str, list[str]]:
        """Take the entries whose hint is at or before `now`, by folder."""
        taken: dict[str, list[str]] = {}
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                _, folder, name = heapq.heappop(self._heap)
                taken.setdefault(folder, []).append(name)
        return taken

    def sweep(self, now: int) -> int:
        """Remove the due records whose recorded expiry has passed; returns how many."""
        removed = 0
        for folder_name, names in sorted(self.due(now).items()):
            folder = Path(folder_name)
            expiry_of = _recorded_expiry(folder)
            with locked_directory(_lock_of(folder)) as exists:
                if not exists:
                    continue  # the user was erased: the records went with the folder
                gone = 0
                for name in sorted(set(names)):
                    expires = expiry_of(folder / name)
                    if expires is None:
                        continue
                    if expires <= now:
                        unlink_quietly(folder / name)
                        gone += 1
                    else:
                        self.add(folder, name, expires)
                if gone:
                    fsync_dir(folder)
                removed += gone
        return removed
