"""Appending to and compacting a user's message log (maildir_log), under its index mutex.

The relay process alone calls these: the index's `head` and segment sizes are this
process's own account of the log, which no other process appends to.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..durable import fsync_dir
from .maildir_dedup import DedupTable
from .maildir_index import DEDUP_PREFIX, UserIndex
from .maildir_log import (
    LOG_DIR, SEGMENT_BYTES, Location, append, create_segment, read_segment, scan, segment_path, sync_file,
)


def append_record(udir: Path, index: UserIndex, record: bytes) -> Location:
    """Under index.mutex: write one record at the end of the head segment (a new one when
    the head is sealed or full). Not durable yet: the caller syncs the segment."""
    head = index.segments.get(index.head)
    if head is None or not index.head_open or (head[0] and head[0] + len(record) > SEGMENT_BYTES):
        number = max(index.segments, default=0) + 1
        create_segment(udir, number)
        index.segments[number] = head = [0, 0]
        index.head, index.head_open = number, True
    end = head[0]
    try:
        append(segment_path(udir, index.head), record, end)
    except BaseException:
        index.head_open = False  # whatever is left at its end, the next record goes elsewhere
        raise
    head[0] += len(record)
    return index.head, end, len(record)


def worth_compacting(index: UserIndex) -> bool:
    """The oldest segment holds nothing pending, or the log is over twice what is pending
    plus one segment (so at most that much disk goes to acknowledged and expired records)."""
    if len(index.segments) < 2:
        return False
    oldest = min(index.segments)
    if oldest == index.head:
        return False
    live = index.segments[oldest][1]
    total = sum(size for size, _ in index.segments.values())
    pending = sum(used for _, used in index.segments.values())
    return live == 0 or total > 2 * pending + SEGMENT_BYTES


def compact_oldest(udir: Path, index: UserIndex, user_id: str, now: int, dedup: DedupTable) -> bool:
    """Under index.mutex: copy the oldest segment's pending records to the head (durably),
    keep its acknowledged records' unexpired dedup keys in the dedup table, remove it.
    False when it cannot go yet (a delivery into it is still in flight)."""
    oldest = min(index.segments)
    if any((index.where(name) or (None,))[0] == oldest for name in index.in_flight):
        return False
    data = read_segment(udir, oldest) or b""  # gone: nothing in it to keep
    found = scan(data, oldest)
    moved: dict[str, Location] = {}
    written: set[int] = set()
    for entry in found.messages:
        name = str(entry.name)
        if index.where(name) == entry.location and name in index.pending:
            _, offset, length = entry.location
            moved[name] = append_record(udir, index, data[offset:offset + length])
            written.add(moved[name][0])
    for number in sorted(written):
        sync_file(segment_path(udir, number))
    gone = [entry for entry in found.messages if str(entry.name) not in index.pending
            and index.logged.get(entry.dedup[:DEDUP_PREFIX]) == str(entry.name)]
    if gone:
        index.earlier_keys = True
    dedup.add_many(user_id, [(entry.dedup.hex(), str(entry.name), entry.name.expires)
                             for entry in gone if entry.name.expires > now])
    try:
        os.unlink(segment_path(udir, oldest))
    except FileNotFoundError:
        pass
    fsync_dir(udir / LOG_DIR)
    for name, location in moved.items():
        index.place(name, location)
    for entry in gone:
        index.logged.pop(entry.dedup[:DEDUP_PREFIX], None)
    del index.segments[oldest]
    return True
