"""The maildir's message logs: a delivery is one append to its user's log, not a new file.

Why: on the virtual machines measured, each file created costs the guest kernel about half
a millisecond of CPU when it is written back, as much as half an RSA decryption; with a
message file and a dedup row each, maildir accept to 200 recipients ran at 0.26-0.40 of the
RSA ceiling, with one append holding both at 0.53-0.55 (bench/README.md).

Layout: ``users/<id>/log/<10 digits>.log``, segments numbered upwards; appends go to the
highest (the head), which is sealed past SEGMENT_BYTES (or when its tail is damaged) and a
new one started. A record is::

    "MRL1" | kind (1 byte) | body length (4 bytes, big-endian) | CRC-32 of kind and body | body

- kind 1, a message: name length (1 byte), the message name (its id, see maildir_layout),
  the SHA-256 of the packet's dedup key (32 bytes), then the message as JSON (as the
  one-file-per-message layout writes it);
- kind 2, an acknowledgement: the acknowledged names, one per line.

Rules that keep a crash from losing or resurrecting anything:

- a record is written with one `write` and is durable (fdatasync, shared by concurrent
  deliveries) before the delivery is answered; a new segment's folder entry is fsynced
  before the first record in it is;
- names are never reused, so an acknowledged name is dead whatever segment holds a copy of
  its record, and an acknowledgement only ever names records in its own or older segments;
- segments are removed oldest first (compaction copies the oldest one's live records to the
  head, durably, then removes it), so an acknowledgement never goes before the records it
  names; acknowledged records' dedup keys that have not expired move to the dedup table
  (maildir_dedup) before their segment goes;
- a scan skips what fails its CRC and finds the next record by its magic: a record cut short
  by a crash is the segment's torn tail, and anything else is damage that `fsck` reports.

Only the relay process appends and compacts; `msgrelay-admin` and `fsck` read.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from ..durable import fsync_dir, read_whole
from .dirsync import GroupCommit
from .maildir_layout import MessageName

LOG_DIR = "log"
MAGIC = b"MRL1"
HEADER = struct.Struct(">4sBII")
MESSAGE = 1
ACKNOWLEDGEMENT = 2
#: A segment takes appends until it holds this much; compaction copies at most one at a time.
SEGMENT_BYTES = 4 * 1024 * 1024
SEGMENT_NAME = re.compile(r"([0-9]{10})\.log")
DIGEST_BYTES = 32

#: (segment number, offset, record length) of a message record.
Location = tuple[int, int, int]


def segment_name(number: int) -> str:
    return f"{number:010d}.log"


def segment_path(udir: Path, number: int) -> Path:
    return udir / LOG_DIR / segment_name(number)


def _crc(kind: int, body: bytes) -> int:
    return zlib.crc32(body, zlib.crc32(bytes((kind,))))


def _record(kind: int, body: bytes) -> bytes:
    return HEADER.pack(MAGIC, kind, len(body), _crc(kind, body)) + body


def message_record(name: str, dedup_name: str, message_json: bytes) -> bytes:
    """A message record: `dedup_name` is the hex SHA-256 of the packet's dedup key."""
    raw = name.encode("ascii")
    return _record(MESSAGE, bytes((len(raw),)) + raw + bytes.fromhex(dedup_name) + message_json)


def acknowledgement_record(names: list[str]) -> bytes:
    return _record(ACKNOWLEDGEMENT, "\n".join(names).encode("ascii"))


@dataclass(frozen=True)
class MessageEntry:
    """A message record found by a scan."""

    name: MessageName
    dedup: bytes
    location: Location


@dataclass(frozen=True)
class Damage:
    """Bytes of a segment no record could be read from."""

    segment: int
    offset: int
    length: int
    #: True for the bytes after the last good record (a write a crash cut short).
    tail: bool


def _message_fields(body: bytes) -> Optional[tuple[MessageName, bytes, int]]:
    """(name, dedup digest, offset of the JSON) of a message body, or None if malformed."""
    size = body[0] if body else 0
    start = 1 + size + DIGEST_BYTES
    if size == 0 or len(body) < start:
        return None
    try:
        name = MessageName.parse(body[1:1 + size].decode("ascii"))
    except UnicodeDecodeError:
        return None
    if name is None:
        return None
    return name, body[1 + size:start], start


def _valid_at(data: bytes, pos: int) -> Optional[tuple[int, bytes]]:
    """(kind, body) of a whole record at `pos` whose CRC matches, else None."""
    if len(data) - pos < HEADER.size:
        return None
    magic, kind, length, crc = HEADER.unpack_from(data, pos)
    end = pos + HEADER.size + length
    if magic != MAGIC or kind not in (MESSAGE, ACKNOWLEDGEMENT) or end > len(data):
        return None
    body = data[pos + HEADER.size:end]
    if _crc(kind, body) != crc:
        return None
    return kind, body


@dataclass
class Scan:
    """What a segment's records say: messages, acknowledged names, and unreadable bytes."""

    messages: list[MessageEntry] = field(default_factory=list)
    acknowledged: set[str] = field(default_factory=set)
    damage: list[Damage] = field(default_factory=list)


def scan(data: bytes, segment: int, into: Optional[Scan] = None) -> Scan:
    """Read every record of one segment's bytes (pure: no I/O)."""
    found = into if into is not None else Scan()
    pos = 0
    while pos < len(data):
        record = _valid_at(data, pos)
        if record is not None:
            kind, body = record
            length = HEADER.size + len(body)
            if kind == MESSAGE:
                fields = _message_fields(body)
                if fields is not None:
                    found.messages.append(MessageEntry(fields[0], fields[1], (segment, pos, length)))
                else:
                    found.damage.append(Damage(segment, pos, length, False))
            else:
                try:
                    found.acknowledged.update(body.decode("ascii").split("\n"))
                except UnicodeDecodeError:
                    found.damage.append(Damage(segment, pos, length, False))
            pos += length
            continue
        resume = data.find(MAGIC, pos + 1)
        while resume != -1 and _valid_at(data, resume) is None:
            resume = data.find(MAGIC, resume + 1)
        end = len(data) if resume == -1 else resume
        found.damage.append(Damage(segment, pos, end - pos, resume == -1))
        pos = end
    return found


def decode_message(data: bytes) -> Optional[tuple[MessageName, bytes]]:
    """(name, message JSON) of one whole message record read back, or None if it is not one."""
    record = _valid_at(data, 0)
    if record is None or record[0] != MESSAGE or HEADER.size + len(record[1]) != len(data):
        return None
    fields = _message_fields(record[1])
    if fields is None:
        return None
    return fields[0], record[1][fields[2]:]


# -- files -------------------------------------------------------------------------------

def segments(udir: Path) -> list[int]:
    """The user's segment numbers, oldest first (none without a log folder)."""
    try:
        names = os.listdir(udir / LOG_DIR)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(m.group(1)) for m in map(SEGMENT_NAME.fullmatch, names) if m is not None)


def read_segment(udir: Path, number: int) -> Optional[bytes]:
    """A segment's bytes, or None if it is gone."""
    try:
        return read_whole(segment_path(udir, number))
    except FileNotFoundError:
        return None


@dataclass
class Loaded:
    """A user's whole log as read back: messages not acknowledged, by name, and the rest."""

    live: dict[str, MessageEntry]
    #: Every message record still in a segment, acknowledged or not (its dedup key still
    #: holds): the first `prefix` bytes of its dedup key's digest -> its name.
    dedup: dict[bytes, str]
    sizes: dict[int, int]
    #: The highest segment may take appends: it exists and ends with a whole record.
    head_open: bool


def load(udir: Path, prefix: int = DIGEST_BYTES) -> Loaded:
    found = Scan()
    sizes: dict[int, int] = {}
    numbers = segments(udir)
    for number in numbers:
        data = read_segment(udir, number)
        if data is not None:
            sizes[number] = len(data)
            scan(data, number, found)
    live: dict[str, MessageEntry] = {}
    dedup: dict[bytes, str] = {}
    for entry in found.messages:  # a later copy (compaction) of the same name replaces it
        text = str(entry.name)
        dedup[entry.dedup[:prefix]] = text
        if text not in found.acknowledged:
            live[text] = entry
    head = max(sizes, default=None)
    head_open = head is not None and not any(d.segment == head for d in found.damage)
    return Loaded(live, dedup, sizes, head_open)


def read_records(udir: Path, wanted: list[tuple[str, Location]]) -> Iterator[tuple[str, Optional[bytes]]]:
    """(name, message JSON or None) for each wanted record: None when its segment is gone
    (compacted meanwhile: look the name up again) or the bytes there are not its record."""
    by_segment: dict[int, list[tuple[str, Location]]] = {}
    for item in wanted:
        by_segment.setdefault(item[1][0], []).append(item)
    for number, items in by_segment.items():
        try:
            fd = os.open(segment_path(udir, number), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            for name, _ in items:
                yield name, None
            continue
        try:
            for name, (_, offset, length) in items:
                decoded = decode_message(os.pread(fd, length, offset))
                yield name, decoded[1] if decoded is not None and str(decoded[0]) == name else None
        finally:
            os.close(fd)


def append(path: Path, record: bytes, end: int) -> None:
    """Write one record at the end of a segment (known to be `end` bytes long), in one call;
    on failure cut the segment back to `end`, so no half record stays."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        try:
            written = os.write(fd, record)
            if written != len(record):
                raise OSError(28, "No space left on device (short write)")  # ENOSPC
        except BaseException:
            os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)


def create_segment(udir: Path, number: int) -> Path:
    """A new empty segment whose folder entry is durable (the log folder made if needed)."""
    folder = udir / LOG_DIR
    if not folder.is_dir():
        os.mkdir(folder, 0o700)
        fsync_dir(udir)
    path = segment_path(udir, number)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    fsync_dir(folder)
    return path


def sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


class LogSync(GroupCommit):
    """Shared fdatasyncs of a user's segments: concurrent deliveries to one user cost about
    two, and nobody returns before its own record is durable."""

    def __init__(self) -> None:
        super().__init__()
        self._dirty: set[Path] = set()

    def _take(self) -> set[Path]:
        taken, self._dirty = self._dirty, set()
        return taken

    def _round(self, taken: set[Path]) -> None:
        for path in taken:
            sync_file(path)

    def sync(self, path: Path) -> None:
        """Return once an fdatasync of `path` that started after this call has succeeded."""
        with self._cond:
            self._dirty.add(path)
            self._join_round()
