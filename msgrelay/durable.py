"""Durable file writes: a file appears under its name only complete and fsynced.

Write to a temporary name on the same filesystem, fsync it, rename (or link) it into place,
then fsync the directory so the new name itself survives a crash. Shared by the stores, the
federation outbox, the server key and the client's profile (pure file I/O, no server code).
`read_whole` reads such a file back in as few system calls as the language allows.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Optional

FILE_MODE = 0o600


def read_whole(path: Path) -> bytes:
    """The file's bytes: open, read to the end, close (four system calls for a small file).

    `Path.read_bytes` makes eight (two fstats, an ioctl, two lseeks), and every system call
    releases and takes back the GIL: with a busy pool, each hand-off wakes other threads,
    which made reading a fetch's message files cost more in futex calls than in reading.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while chunk := os.read(fd, 65536):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes, mode: int = FILE_MODE, mtime: Optional[int] = None) -> None:
    """Create `path` (FileExistsError if it exists), write all of `data`, set mtime, fsync.

    The directory is not fsynced: callers rename or link the file, or call fsync_dir.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def create_durably(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """A new file, durably; FileExistsError rather than overwriting anything.

    Written in place, so for a moment the name may show partial content: use it only where
    readers tolerate that (files nobody reads concurrently), else `write_durably`.
    """
    write_new_file(path, data, mode)
    fsync_dir(path.parent)


def write_durably(tmp_dir: Path, final: Path, data: bytes, mtime: Optional[int] = None,
                  tmp_name: Optional[str] = None, mode: int = FILE_MODE) -> None:
    """Atomically create or replace `final` with `data`, staged in `tmp_dir`.

    `mtime`, when given, is stored as the file's modification time: a cheap expiry hint
    that sweepers read with stat() instead of opening the file.
    """
    tmp = tmp_dir / (tmp_name or f"{secrets.token_hex(8)}.tmp")
    try:
        write_new_file(tmp, data, mode, mtime)
        os.rename(tmp, final)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(final.parent)


def replace_durably(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Atomically create or replace `path`, staged beside it under a hidden name."""
    write_durably(path.parent, path, data, tmp_name=f".{path.name}.{secrets.token_hex(4)}.tmp", mode=mode)


def remove_durably(path: Path) -> bool:
    """Unlink a file and make the removal durable. False if it was already absent."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True
