"""The maildir's dedup records: one SQLite table beside the user folders.

Every accepted packet leaves a record (its dedup key's hash: the message id and expiry) that
outlives an acknowledgement until the packet expires, so a resent packet is answered with the
first copy's id (docs/protocol.md section 6). Kept as a file each, a record cost each message
a second inode, and on the virtual machines measured each inode written back cost the guest's
kernel half a millisecond of CPU, half an RSA decryption (bench/README.md). A row in SQLite's
write-ahead log costs an append to one file and its fsync.

- `<state>/dedup.sqlite` (with SQLite's `-wal` and `-shm` files beside it), WAL mode,
  `synchronous=FULL`: a committed insert survives a crash, and a torn one is rolled back.
- The store inserts a record only after its message's file and folder are durable, so a
  record never names a message a crash lost.
- Records of earlier versions, one file each in `users/<id>/dedup/`, are still read (and
  swept by `maildir_expiry`) until they expire.
- One connection per thread (a connection must stay in its thread); SQLite's locks serialise
  writers across threads and processes (`msgrelay-admin`); the file is created 0600 and its
  `-wal` and `-shm` files take its mode.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Optional

from .interface import StoreUnavailable
from .maildir_layout import describe_os_error

FILE_NAME = "dedup.sqlite"
#: How long a writer waits for another's lock before the call fails as StoreUnavailable.
BUSY_TIMEOUT_SECONDS = 30.0
#: Page cache of each connection, KiB. Every store thread has a connection (32 by default) and
#: SQLite's default is 2 MiB each; a lookup by key reads a few pages, which the kernel caches.
CACHE_KIB = 512

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS dedup (user_id TEXT NOT NULL, key TEXT NOT NULL, message_id TEXT NOT NULL,"
    " expires INTEGER NOT NULL, PRIMARY KEY (user_id, key)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS dedup_expires ON dedup (expires)",
)


class DedupTable:
    """The dedup records of one state directory; thread-safe. Nothing is opened before the
    first use, so read-only tools that never look up a record never create the file."""

    def __init__(self, root: Path):
        self.path = root / FILE_NAME
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._ready = False

    def _connection(self) -> sqlite3.Connection:
        connection: Optional[sqlite3.Connection] = getattr(self._local, "connection", None)
        if connection is not None:
            return connection
        with self._lock:
            if not self._ready:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None,
                                         check_same_thread=False)
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=FULL")
                connection.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
                if not self._ready:
                    for statement in _SCHEMA:
                        connection.execute(statement)
                    self._ready = True
            except BaseException:
                connection.close()
                raise
            self._connections.append(connection)
        self._local.connection = connection
        return connection

    def _execute(self, action: str, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        """One statement in its own transaction; a failure is StoreUnavailable naming `action`
        and the error, never a path (the message may reach a client)."""
        try:
            return self._connection().execute(sql, params)
        except OSError as e:
            raise StoreUnavailable(describe_os_error(action, e)) from e
        except sqlite3.Error as e:
            code = getattr(e, "sqlite_errorname", None)
            raise StoreUnavailable(f"maildir store cannot {action}: dedup table: {e}" + (f" ({code})" if code else "")) from e

    def find(self, user_id: str, key: str, now: int) -> Optional[tuple[str, int]]:
        """(message_id, expires) of the unexpired record for `key`, else None."""
        row = self._execute("read a dedup record", "SELECT message_id, expires FROM dedup WHERE user_id = ? AND key = ?",
                            (user_id, key)).fetchone()
        return (row[0], row[1]) if row is not None and now < row[1] else None

    def holds(self, user_id: str) -> bool:
        """Whether any record of this user is in the table (expired ones too)."""
        return self._execute("read a dedup record", "SELECT 1 FROM dedup WHERE user_id = ? LIMIT 1",
                             (user_id,)).fetchone() is not None

    def add(self, user_id: str, key: str, message_id: str, expires: int) -> None:
        """Record `key` durably (an expired record of the same key is replaced)."""
        self._execute("store a dedup record", "INSERT OR REPLACE INTO dedup VALUES (?, ?, ?, ?)",
                      (user_id, key, message_id, expires))

    def add_many(self, user_id: str, rows: list[tuple[str, str, int]]) -> None:
        """Record (key, message_id, expires) rows durably, all in one transaction."""
        if not rows:
            return
        action = "store dedup records"
        connection = self._connection()
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.executemany("INSERT OR REPLACE INTO dedup VALUES (?, ?, ?, ?)",
                                       [(user_id, *row) for row in rows])
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.rollback()
                raise
        except OSError as e:
            raise StoreUnavailable(describe_os_error(action, e)) from e
        except sqlite3.Error as e:
            raise StoreUnavailable(f"maildir store cannot {action}: dedup table: {e}") from e

    def remove(self, user_id: str, key: str) -> None:
        self._execute("remove a dedup record", "DELETE FROM dedup WHERE user_id = ? AND key = ?", (user_id, key))

    def forget_user(self, user_id: str) -> int:
        """Remove an erased user's records; returns how many."""
        return self._execute("erase dedup records", "DELETE FROM dedup WHERE user_id = ?", (user_id,)).rowcount

    def sweep(self, now: int) -> int:
        """Remove the records that have expired; returns how many."""
        return self._execute("reclaim dedup records", "DELETE FROM dedup WHERE expires <= ?", (now,)).rowcount

    def problem(self) -> Optional[str]:
        """What SQLite's quick check finds wrong with the table's file, or None (also when
        there is no file yet)."""
        if not self.path.exists():
            return None
        try:  # read-only: never checkpoints, so a dry run changes no byte
            connection = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_SECONDS)
            try:
                rows = connection.execute("PRAGMA quick_check").fetchall()
            finally:
                connection.close()
        except (sqlite3.Error, OSError) as e:
            return str(e)
        found = [str(row[0]) for row in rows]
        return None if found == ["ok"] else "; ".join(found)

    def close(self) -> None:
        """Close every thread's connection (a thread that uses the table again reopens it)."""
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        self._local = threading.local()
