"""The federation outbox in PostgreSQL, shared by every relay process and host on the database.

Tables (postgres_schema.py, version 2): `outbox_packets` (one row per queued packet, `seq`
in commit order per destination), `outbox_destinations` (one row per destination: the
backoff every process obeys, and the lease of the one process sending to it now) and
`outbox_dedup` (idempotency records until the packet's expiry; the key is unique).

Why leases rather than row locks: a queue is sent strictly in order, one request at a time,
and an attempt takes up to two request timeouts, far too long to hold a transaction open.
A process claims a destination with one UPDATE naming itself and a deadline, renews it
before every attempt and drops it when it waits or runs dry; a process that dies simply
stops renewing, and its queues go to whoever claims them after the deadline. Times are the
callers' (`now`), so the hosts' clocks must agree to well under a lease (NTP).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from typing import Any, Callable, Optional, TypeVar

import psycopg
from psycopg import errors as pgerrors

from ..store.interface import StoreUnavailable
from ..store.postgres import PostgresCore
from .outbox import BackoffState, Entry, OutboxLock, OutboxUnavailable
from .outbox_interface import Claim, OutboxFull, QueueSummary

T = TypeVar("T")

_FREE = "(lease_owner IS NULL OR lease_owner = %(me)s OR lease_until <= %(now)s)"
_DUE = "(next_attempt IS NULL OR next_attempt <= %(now)s)"


def process_id() -> str:
    """Who holds a lease, as operators see it: host, pid and a random part (pids recur)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class _NoLock(OutboxLock):
    """Several processes share this outbox: there is nothing to hold exclusively."""

    def __init__(self) -> None:
        self._fd = None


def _backoff(row: Any) -> BackoffState:
    return BackoffState(int(row[0]), None if row[1] is None else float(row[1]), row[2])


class PostgresOutbox:
    """Blocking; thread-safe (each call takes a pooled connection for one transaction)."""

    shared = True

    def __init__(self, core: PostgresCore, lease: float, owner: Optional[str] = None):
        self.core = core
        self.lease = lease
        self.owner = owner or process_id()

    @classmethod
    def open(cls, dsn: str, lease: float, schema: Optional[str] = None, connections: int = 4,
             owner: Optional[str] = None) -> "PostgresOutbox":
        """Connect (creating or migrating the tables); OutboxUnavailable with the reason."""
        core = PostgresCore(dsn, schema, min_size=1, max_size=connections)
        try:
            core.open()
        except StoreUnavailable as e:
            raise OutboxUnavailable(str(e)) from None
        return cls(core, lease, owner)

    def _run(self, operation: str, work: Callable[[psycopg.Connection], T]) -> T:
        try:
            return self.core.transact(f"outbox {operation}", work)
        except StoreUnavailable as e:
            raise OutboxUnavailable(str(e)) from None

    def close(self) -> None:
        """Give up every claim this process holds (others take over at once), then disconnect."""
        try:
            self._run("release_all", lambda conn: conn.execute(
                "UPDATE outbox_destinations SET lease_owner = NULL, lease_until = NULL"
                " WHERE lease_owner = %s", (self.owner,)))
        finally:
            self.core.close()

    def lock(self) -> OutboxLock:
        return _NoLock()

    def is_locked(self) -> bool:
        return False

    # -- reading ----------------------------------------------------------------

    @staticmethod
    def _entries(conn: psycopg.Connection, destination: str) -> list[Entry]:
        rows = conn.execute("SELECT seq, received, expires, nonce FROM outbox_packets"
                            " WHERE destination = %s ORDER BY seq", (destination,)).fetchall()
        return [Entry(destination, int(r[0]), int(r[1]), int(r[2]), r[3]) for r in rows]

    def destinations(self) -> list[str]:
        rows = self._run("destinations", lambda conn: conn.execute(
            "SELECT destination FROM outbox_destinations ORDER BY destination").fetchall())
        return [r[0] for r in rows]

    def entries(self, destination: str) -> list[Entry]:
        return self._run("entries", lambda conn: self._entries(conn, destination.lower()))

    def load_all(self) -> dict[str, list[Entry]]:
        def work(conn: psycopg.Connection) -> dict[str, list[Entry]]:
            found: dict[str, list[Entry]] = {r[0]: [] for r in conn.execute(
                "SELECT destination FROM outbox_destinations ORDER BY destination").fetchall()}
            for r in conn.execute("SELECT destination, seq, received, expires, nonce FROM outbox_packets"
                                  " ORDER BY destination, seq").fetchall():
                found.setdefault(r[0], []).append(Entry(r[0], int(r[1]), int(r[2]), int(r[3]), r[4]))
            return found

        return self._run("load_all", work)

    def read(self, entry: Entry) -> dict[str, Any]:
        row = self._run("read", lambda conn: conn.execute(
            "SELECT packet FROM outbox_packets WHERE seq = %s AND destination = %s AND nonce = %s",
            (entry.seq, entry.destination, entry.nonce)).fetchone())
        if row is None:
            raise KeyError(entry.id)
        packet: dict[str, Any] = json.loads(bytes(row[0]))
        return packet

    # -- writing ----------------------------------------------------------------

    @staticmethod
    def _lock_destination(conn: psycopg.Connection, destination: str) -> None:
        """Make the destination's row if needed and lock it to the end of the transaction:
        packets of one destination are then numbered in commit order, and duplicates
        (whose key names the destination) are checked one at a time."""
        for _ in range(3):  # the row may be reclaimed between the two statements
            conn.execute("INSERT INTO outbox_destinations (destination) VALUES (%s)"
                         " ON CONFLICT (destination) DO NOTHING", (destination,))
            if conn.execute("SELECT 1 FROM outbox_destinations WHERE destination = %s FOR NO KEY UPDATE",
                            (destination,)).fetchone():
                return
        raise OutboxUnavailable(f"cannot make the queue of {destination}: it keeps being removed")

    def add(self, destination: str, packet: dict[str, Any], received: int, expires: int,
            dedup_key: Optional[str] = None, max_queue: Optional[int] = None) -> tuple[Entry, bool]:
        """Queue durably (committed when this returns); see the Outbox protocol."""
        destination = destination.lower()
        data = json.dumps(packet, separators=(",", ":")).encode("utf-8", "surrogatepass")

        def work(conn: psycopg.Connection) -> tuple[Entry, bool]:
            self._lock_destination(conn, destination)
            if dedup_key is not None:
                seen = conn.execute("SELECT message_id FROM outbox_dedup WHERE dedup_key = %s AND expires > %s",
                                    (dedup_key, received)).fetchone()
                if seen is not None:
                    return Entry.from_id(destination, seen[0]), True
            if max_queue is not None:
                row = conn.execute("SELECT count(*) FROM (SELECT 1 FROM outbox_packets WHERE destination = %s"
                                   " LIMIT %s) AS queued", (destination, max_queue)).fetchone()
                if row is not None and int(row[0]) >= max_queue:
                    raise OutboxFull(destination)
            nonce = secrets.token_hex(4)
            row = conn.execute("INSERT INTO outbox_packets (destination, nonce, received, expires, packet)"
                               " VALUES (%s, %s, %s, %s, %s) RETURNING seq",
                               (destination, nonce, received, expires, data)).fetchone()
            assert row is not None
            entry = Entry(destination, int(row[0]), received, expires, nonce)
            if dedup_key is not None:  # a conflicting row can only be an expired one
                conn.execute("INSERT INTO outbox_dedup (dedup_key, message_id, expires) VALUES (%s, %s, %s)"
                             " ON CONFLICT (dedup_key) DO UPDATE SET message_id = EXCLUDED.message_id,"
                             " expires = EXCLUDED.expires", (dedup_key, entry.id, expires))
            return entry, False

        return self._run("add", work)

    def remove(self, entry: Entry) -> None:
        self._run("remove", lambda conn: conn.execute("DELETE FROM outbox_packets WHERE seq = %s", (entry.seq,)))

    def sweep_dedup(self, now: int) -> int:
        return self._run("sweep_dedup", lambda conn: conn.execute(
            "DELETE FROM outbox_dedup WHERE expires <= %s", (now,)).rowcount)

    # -- backoff state and reclaiming ---------------------------------------------

    def load_backoff(self, destination: str) -> BackoffState:
        row = self._run("load_backoff", lambda conn: conn.execute(
            "SELECT attempts, next_attempt, last_error FROM outbox_destinations WHERE destination = %s",
            (destination.lower(),)).fetchone())
        return BackoffState() if row is None else _backoff(row)

    def save_backoff(self, destination: str, state: BackoffState) -> None:
        self._run("save_backoff", lambda conn: conn.execute(
            "INSERT INTO outbox_destinations (destination, attempts, next_attempt, last_error)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (destination) DO UPDATE SET attempts = EXCLUDED.attempts,"
            " next_attempt = EXCLUDED.next_attempt, last_error = EXCLUDED.last_error",
            (destination.lower(), state.attempts, state.next_attempt, state.last_error)))

    def clear_backoff(self, destination: str) -> None:
        self._run("clear_backoff", lambda conn: conn.execute(
            "UPDATE outbox_destinations SET attempts = 0, next_attempt = NULL, last_error = NULL"
            " WHERE destination = %s", (destination.lower(),)))

    def remove_destination(self, destination: str) -> bool:
        """Delete the row of an empty queue nobody else is sending to; the packets' foreign
        key refuses it if a packet arrived meanwhile."""

        def work(conn: psycopg.Connection) -> bool:
            deleted = conn.execute(
                "DELETE FROM outbox_destinations WHERE destination = %s"
                " AND (lease_owner IS NULL OR lease_owner = %s)", (destination.lower(), self.owner)).rowcount
            return deleted == 1 or conn.execute("SELECT 1 FROM outbox_destinations WHERE destination = %s",
                                                (destination.lower(),)).fetchone() is None

        try:
            return self._run("remove_destination", work)
        except pgerrors.ForeignKeyViolation:
            return False

    # -- claims -------------------------------------------------------------------

    def claim(self, destination: str, now: float) -> Claim:
        destination = destination.lower()
        params = {"d": destination, "me": self.owner, "now": now, "until": now + self.lease}

        def work(conn: psycopg.Connection) -> Claim:
            row = conn.execute(
                f"UPDATE outbox_destinations SET lease_owner = %(me)s, lease_until = %(until)s"
                f" WHERE destination = %(d)s AND {_FREE} AND {_DUE}"
                f" RETURNING attempts, next_attempt, last_error", params).fetchone()
            if row is not None:
                return Claim(True, _backoff(row), self._entries(conn, destination))
            row = conn.execute("SELECT attempts, next_attempt, last_error, lease_owner, lease_until"
                               " FROM outbox_destinations WHERE destination = %(d)s", params).fetchone()
            if row is None:
                return Claim(False)
            holder = row[3] if row[3] is not None and row[4] is not None and row[4] > now else None
            return Claim(False, _backoff(row), self._entries(conn, destination), holder)

        return self._run("claim", work)

    def renew(self, destination: str, now: float) -> bool:
        row = self._run("renew", lambda conn: conn.execute(
            "UPDATE outbox_destinations SET lease_until = %s WHERE destination = %s AND lease_owner = %s"
            " RETURNING 1", (now + self.lease, destination.lower(), self.owner)).fetchone())
        return row is not None

    def release(self, destination: str, now: float) -> bool:
        """Two transactions on purpose: a packet another process queued while we held the
        claim (its own claim failed) is seen by the second, which starts after the release
        is committed; one queued after that release is claimed by that process itself."""
        params = {"d": destination.lower(), "me": self.owner, "now": now}
        self._run("release", lambda conn: conn.execute(
            "UPDATE outbox_destinations SET lease_owner = NULL, lease_until = NULL"
            " WHERE destination = %(d)s AND lease_owner = %(me)s", params))
        row = self._run("release", lambda conn: conn.execute(
            f"SELECT 1 FROM outbox_destinations d WHERE destination = %(d)s AND {_FREE} AND {_DUE}"
            " AND EXISTS (SELECT 1 FROM outbox_packets p WHERE p.destination = d.destination)", params).fetchone())
        return row is not None

    def pending(self, now: float) -> dict[str, bool]:
        params = {"me": self.owner, "now": now}
        rows = self._run("pending", lambda conn: conn.execute(
            f"SELECT destination, {_FREE} AND {_DUE} FROM outbox_destinations d"
            " WHERE EXISTS (SELECT 1 FROM outbox_packets p WHERE p.destination = d.destination)",
            params).fetchall())
        return {r[0]: bool(r[1]) for r in rows}

    def summary(self, now: float) -> list[QueueSummary]:
        rows = self._run("summary", lambda conn: conn.execute(
            "SELECT d.destination, count(p.seq), count(p.seq) FILTER (WHERE p.expires <= %(now)s),"
            " min(p.received), d.attempts, d.next_attempt, d.last_error,"
            " CASE WHEN d.lease_until > %(now)s THEN d.lease_owner END"
            " FROM outbox_destinations d LEFT JOIN outbox_packets p ON p.destination = d.destination"
            " GROUP BY d.destination ORDER BY d.destination", {"now": now}).fetchall())
        return [QueueSummary(r[0], int(r[1]), int(r[2]), None if r[3] is None else int(r[3]),
                             _backoff(r[4:7]), r[7]) for r in rows]
