"""Names and crash-safe file primitives of the maildir store.

Everything here is synchronous and blocking; `maildir_files.MaildirFiles` uses it from a
worker thread (the relay) or directly (the admin command on a stopped relay).

Durability rule: a file appears under its final name only complete and fsynced (write to a
temporary name on the same filesystem, fsync, rename or link, then fsync the directory), so
a crash leaves either the old state or the new one, never a half file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

from .interface import StoreUnavailable

DIR_MODE = 0o700

#: User ids and token ids become path components: no dots (so never "." or ".."), no slashes.
SAFE_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")  # use fullmatch

#: A message file name, which is also its message id (docs/protocol.md section 6 allows
#: [A-Za-z0-9._-]{1,128}): arrival time in ns (fixed width, so ids sort in arrival order),
#: a random tie-breaker between processes, then received, expires and quota size, so that
#: expiry, quota and stats need only a directory listing, never the message body.
MESSAGE_NAME = re.compile(r"([0-9]{20})-([0-9a-f]{8})-r([0-9]{1,15})-e([0-9]{1,15})-s([0-9]{1,15})")


@dataclass(frozen=True)
class MessageName:
    arrival_ns: int
    nonce: str
    received: int
    expires: int
    size: int

    def __str__(self) -> str:
        return f"{self.arrival_ns:020d}-{self.nonce}-r{self.received}-e{self.expires}-s{self.size}"

    @classmethod
    def parse(cls, name: object) -> Optional["MessageName"]:
        """The decoded name, or None for anything that is not exactly a message name."""
        if not isinstance(name, str):
            return None
        match = MESSAGE_NAME.fullmatch(name)
        if match is None:
            return None
        ns, nonce, received, expires, size = match.groups()
        return cls(int(ns), nonce, int(received), int(expires), int(size))

    def is_live(self, now: int) -> bool:
        return now < self.expires


class ArrivalClock:
    """Strictly increasing nanosecond stamps for message ids, even if the wall clock steps back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def next(self, after: int = 0) -> int:
        """A stamp above every one issued by this process and above `after` (ids already on disk)."""
        with self._lock:
            self._last = max(time.time_ns(), self._last + 1, after + 1)
            return self._last

    def message_name(self, received: int, expires: int, size: int, after: int = 0) -> MessageName:
        return MessageName(self.next(after), secrets.token_hex(4), received, expires, size)


# -- OS errors ------------------------------------------------------------------------------

def describe_os_error(action: str, error: OSError) -> str:
    """A message naming the operation and the errno, without paths (it may reach clients)."""
    code = errno.errorcode.get(error.errno or 0, "EIO")
    reason = error.strerror or os.strerror(error.errno or errno.EIO)
    return f"maildir store cannot {action}: {reason} ({code})"


F = TypeVar("F", bound=Callable)


def disk_operation(action: str) -> Callable[[F], F]:
    """Decorate a blocking method so any OSError it lets escape becomes StoreUnavailable.

    Methods handle FileNotFoundError themselves where it only means "absent"; what reaches
    this point means the disk cannot be used (ENOSPC, EACCES, EROFS, EIO, EDQUOT, ...).
    """

    def decorate(method: F) -> F:
        def wrapper(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except OSError as e:
                raise StoreUnavailable(describe_os_error(action, e)) from e

        wrapper.__name__ = method.__name__
        wrapper.__qualname__ = method.__qualname__
        wrapper.__doc__ = method.__doc__
        wrapper.__wrapped__ = method  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


# -- durable writes -------------------------------------------------------------------------

def remove_tree(path: Path) -> None:
    """Remove a file or directory tree; entries that vanish meanwhile are fine."""

    def ignore_missing(function, failed_path, exc_info) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=ignore_missing)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# -- locks ----------------------------------------------------------------------------------

@contextmanager
def locked_directory(path: Path) -> Iterator[bool]:
    """Hold an exclusive flock(2) on a directory; yields False if it does not exist (anymore).

    flock excludes other open file descriptions, so it serialises threads of this process and
    other processes alike. If the directory was renamed away (user erased) or replaced while
    we waited, the lock we got is on the wrong inode: start over with the current one.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            held = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                yield True
                return
            if current is None:
                yield False
                return
        finally:
            os.close(fd)  # closing the last descriptor releases the flock


def is_older(path: Path, limit: float) -> bool:
    """Whether `path` was last modified before `limit` (False if it vanished)."""
    try:
        return os.lstat(path).st_mtime < limit
    except FileNotFoundError:
        return False


def list_dir(path: Path) -> list[str]:
    """Entry names of a directory; [] if it does not exist (user erased meanwhile)."""
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
