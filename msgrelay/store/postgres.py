"""PostgreSQL storage backend, for several relay processes or hosts sharing one store.

`PostgresCore` is the synchronous, blocking implementation (also used directly by
admin commands on a stopped relay); `PostgresStore` is the IStore the relay uses,
running every core call in a thread pool so the reactor never waits on the database.

Cross-process correctness rests on PostgreSQL itself: `deliver` locks the recipient's
users row for the whole transaction, dedup and replay records are unique keys, and a
write's Deferred fires only after COMMIT returned.

The users row carries counters of the user's rows in messages (`pending_messages`,
`pending_bytes`, schema version 3), changed in the same transaction as every insert and
delete of those rows, so the quota check reads them under the row lock instead of counting
the mailbox. Deletes (acknowledge, expiry) subtract what they removed rather than setting a
value, so they compose with concurrent deliveries; `recount` repairs a drift (fsck).
"""

from __future__ import annotations

import hmac
import re
import select
import socket
import uuid
from typing import Any, Callable, Optional, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from .interface import (
    Accepted,
    Delivery,
    IStore,
    MessageRecord,
    NewMessage,
    Quota,
    QuotaExceeded,
    StoreUnavailable,
    TokenRecord,
    TokenRefused,
    UserRecord,
)
from .postgres_schema import SchemaTooNew, check_schema_name, migrate, search_path

T = TypeVar("T")

_ID_DIGITS = 20  # zero-padded so ids sort as strings exactly as the bigint sequence does
_MESSAGE_ID = re.compile(r"[0-9]{%d}" % _ID_DIGITS)
_RETRIES = 3  # for deadlocks and serialization failures, which PostgreSQL asks us to retry
_UNAVAILABLE_CLASSES = ("08", "53", "57", "58", "XX")  # connection, resources, operator, system


#: A user's pending unexpired messages and bytes: the counters on the users row (kept in the
#: same transaction as every insert and delete) less the expired rows not yet swept, which the
#: expiry index finds without reading the mailbox. Costs the same for 10 or 100,000 messages.
_USAGE = (
    "SELECT u.pending_messages - coalesce(x.n, 0), u.pending_bytes - coalesce(x.b, 0) FROM users u"
    " LEFT JOIN (SELECT count(*) AS n, sum(size) AS b FROM messages WHERE user_id = %(user)s AND expires <= %(now)s) x"
    " ON true WHERE u.user_id = %(user)s"
)
#: A fetch page in one statement (one snapshot): a first row with the replay outcome
#: (`{replay}`: the `_REPLAY` CTE, or `_NO_REPLAY` for a plain fetch) and the user's pending count,
#: then the page's rows: the oldest live messages, as many as `limit` allows and whose running
#: size fits `max` (the first always). A replay leaves only the first row.
#:
#: The oldest messages are read through `messages_user (user_id, id)` whatever the planner
#: guesses. Written as `user_id = X ... ORDER BY id`, the planner may walk the primary
#: key in id order and filter on the user, expecting the user's rows spread evenly; a user whose
#: messages are all recent then costs a walk over every older message of every user (5 ms at
#: 20,000 rows here, growing with the table). A range on `user_id` (the same rows: text is
#: compared bytewise for equality under the deterministic default collation) keeps `user_id`
#: in the sort order, which only `messages_user` provides.
_PAGE = (
    "WITH {replay} page AS ("
    " SELECT id, row_number() OVER (ORDER BY id) AS n, sum(size) OVER (ORDER BY id) AS running"
    " FROM (SELECT id, size FROM messages WHERE user_id >= %(user)s AND user_id <= %(user)s"
    " AND expires > %(now)s ORDER BY user_id, id LIMIT %(limit)s) AS oldest)"
    " SELECT 0 AS part, (SELECT count(*) FROM fresh),"
    " (SELECT u.pending_messages - (SELECT count(*) FROM messages WHERE user_id = %(user)s AND expires <= %(now)s)"
    " FROM users u WHERE u.user_id = %(user)s),"
    " NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL"
    " UNION ALL"
    " SELECT 1, NULL, NULL, m.id, m.token_id, m.data, m.algorithm, m.password, m.signature, m.received, m.expires"
    " FROM page p JOIN messages m ON m.id = p.id AND m.user_id = %(user)s"
    " WHERE (p.n = 1 OR p.running <= %(max)s) AND EXISTS (SELECT 1 FROM fresh)"
    " ORDER BY part, 4"
)
#: The replay entry of a signed fetch, as `remember_signature` writes it: `fresh` has a row
#: for a first use (or a lapsed entry revived), none for a replay.
_REPLAY = (
    "fresh AS (INSERT INTO replay (digest, until) VALUES (%(digest)s, %(until)s)"
    " ON CONFLICT (digest) DO UPDATE SET until = EXCLUDED.until WHERE replay.until <= %(now)s RETURNING 1),"
)
_NO_REPLAY = "fresh AS (SELECT 1),"
#: An acknowledgement in one statement (`{replay}` as in `_PAGE`): the messages go, on a first
#: use only, with the counters in step. One row: first use, how many went, whether the user
#: exists.
_ACKNOWLEDGE = (
    "WITH {replay} gone AS (DELETE FROM messages WHERE user_id = %(user)s AND id = ANY(%(ids)s::bigint[])"
    " AND EXISTS (SELECT 1 FROM fresh) RETURNING size),"
    " total AS (SELECT count(*) AS n, coalesce(sum(size), 0) AS b FROM gone),"
    " counted AS (UPDATE users SET pending_messages = pending_messages - total.n,"
    " pending_bytes = pending_bytes - total.b FROM total WHERE users.user_id = %(user)s AND total.n > 0)"
    " SELECT (SELECT count(*) FROM fresh), (SELECT n FROM total), EXISTS (SELECT 1 FROM users WHERE user_id = %(user)s)"
)


def _page_params(user_id: str, now: int, limit: int, max_bytes: Optional[int]) -> dict[str, Any]:
    return {"user": user_id, "now": now, "limit": max(0, int(limit)),
            "max": max_bytes if max_bytes is not None else 2**62}


def _check_session(conn: psycopg.Connection) -> None:
    """The pool's check of a session before each use: raises for one the server ended.

    The server writes to an idle session's socket unasked only when it ends the session (a
    restart, `pg_terminate_backend`), or for a NOTIFY or a changed setting, which this store
    never causes. So only a readable socket costs the round trip of
    `ConnectionPool.check_connection`, which on every checkout cost each store call 130 µs of
    the relay's CPU and 170 µs of time. `poll`, unlike `select`, takes any descriptor number.
    """
    poller = select.poll()
    poller.register(conn.pgconn.socket, select.POLLIN)
    if poller.poll(0):
        ConnectionPool.check_connection(conn)


def _page_rows(conn: psycopg.Connection, replay: str, params: dict[str, Any]) -> list[Any]:
    """The rows of `_PAGE` run with `replay`, in binary: the bodies come as their bytes rather
    than as hex text, which the server spends CPU writing and the client parsing (10 messages:
    0.2 ms of the relay's CPU instead of 0.3; 100 messages: 0.5-0.8 instead of 1.2-1.3)."""
    return conn.execute(_PAGE.format(replay=replay), params, binary=True).fetchall()


def _page(rows: list[Any]) -> tuple[bool, list[MessageRecord], int]:
    """(first use, messages, remaining) from the rows of `_PAGE`."""
    head, body = rows[0], rows[1:]
    messages = [
        MessageRecord(
            message_id=format_message_id(int(r[3])), token_id=r[4], data=_dec(r[5]) or "", algorithm=r[6],
            password=_dec(r[7]) or "", signature=_dec(r[8]), received=int(r[9]), expires=int(r[10]),
        )
        for r in body
    ]
    total = int(head[2]) if head[2] is not None else 0
    return bool(head[1]), messages, max(0, total - len(messages))


#: Counters against rows, per user: (user_id, counted messages, bytes, real messages, bytes).
_COUNTERS = (
    "SELECT u.user_id, u.pending_messages, u.pending_bytes, coalesce(c.n, 0), coalesce(c.b, 0)"
    " FROM users u LEFT JOIN (SELECT user_id, count(*) AS n, sum(size) AS b FROM messages"
    " GROUP BY user_id) c ON c.user_id = u.user_id"
)


def _enc(text: Optional[str]) -> Optional[bytes]:
    """Opaque strings go to bytea: text columns refuse NUL and lone surrogates."""
    return None if text is None else text.encode("utf-8", "surrogatepass")


def _dec(data: Optional[bytes]) -> Optional[str]:
    return None if data is None else bytes(data).decode("utf-8", "surrogatepass")


def format_message_id(seq: int) -> str:
    return f"{seq:0{_ID_DIGITS}d}"


def parse_message_id(message_id: Any) -> Optional[int]:
    """The sequence number behind an id we issued, or None for anything else."""
    if not isinstance(message_id, str) or not _MESSAGE_ID.fullmatch(message_id):
        return None
    seq = int(message_id)
    return seq if seq < 2**63 else None


def _is_unavailable(error: psycopg.Error) -> bool:
    """Whether an error means the database cannot serve now (not a bug in a query)."""
    if isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)):
        return True
    state = getattr(error, "sqlstate", None) or ""
    return state == "25006" or state[:2] in _UNAVAILABLE_CLASSES  # 25006: read-only


class PostgresCore:
    """Blocking implementation of every IStore operation; thread-safe once open."""

    def __init__(
        self,
        dsn: str,
        schema: Optional[str] = None,
        *,
        min_size: int = 1,
        max_size: int = 8,
        connect_timeout: Optional[float] = None,
        pool_timeout: float = 10.0,
    ) -> None:
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.Error:
            raise ValueError("malformed PostgreSQL DSN (not shown: it may hold a password)") from None
        self._dsn = dsn
        self._password = str(params.get("password") or "")
        self.schema = check_schema_name(schema)
        self.target = self._describe(params)
        self._min_size = min_size
        self._max_size = max(max_size, min_size, 1)
        self._pool_timeout = pool_timeout
        self._kwargs: dict[str, Any] = {"autocommit": True}
        if connect_timeout is not None or "connect_timeout" not in params:
            # An unreachable host must fail, not hang: libpq has no timeout by default.
            self._kwargs["connect_timeout"] = max(2, int(connect_timeout or 5))
        if "application_name" not in params:
            self._kwargs["application_name"] = "msgrelay"
        self._pool: Optional[ConnectionPool] = None
        self.version: Optional[int] = None
        self.applied_migrations: list[int] = []

    @staticmethod
    def _describe(params: dict[str, Any]) -> str:
        """user@host:port/dbname for messages and logs; never the password."""
        host = params.get("host") or params.get("hostaddr") or "localhost"
        port = params.get("port") or "5432"
        user = f"{params['user']}@" if params.get("user") else ""
        return f"{user}{host}:{port}/{params.get('dbname') or ''}"

    def _unavailable(self, operation: str, error: BaseException) -> StoreUnavailable:
        """StoreUnavailable naming the operation and cause, scrubbed of DSN and password."""
        detail = " ".join(str(error).split()) or type(error).__name__
        detail = detail.replace(self._dsn, self.target)
        if self._password:
            detail = detail.replace(self._password, "***")
        state = getattr(error, "sqlstate", None)
        code = f" [{state}]" if state else ""
        return StoreUnavailable(
            f"PostgreSQL {self.target}: {operation} failed{code}: {detail[:300]}"
        )

    # -- lifecycle ---------------------------------------------------------------

    def open(self) -> int:
        """Create or migrate the schema, then fill the pool. Returns the schema version.

        The schema step uses its own short-lived connection so an unreachable server
        fails at once with the driver's reason rather than after a pool timeout.
        """
        if self._pool is not None:
            return self.version or 0
        try:
            with psycopg.connect(self._dsn, **self._kwargs) as conn:
                self.version, self.applied_migrations = migrate(conn, self.schema)
            pool = ConnectionPool(
                self._dsn,
                kwargs=self._kwargs,
                min_size=self._min_size,
                max_size=self._max_size,
                open=False,
                configure=self._configure,
                check=_check_session,  # drop sessions a restart killed
                timeout=self._pool_timeout,
                name=f"msgrelay-{self.schema or 'default'}",
            )
            try:
                pool.open(wait=True, timeout=self._pool_timeout)
            except BaseException:
                pool.close(timeout=0)
                raise
        except SchemaTooNew as e:
            raise StoreUnavailable(f"PostgreSQL {self.target}: {e}") from None
        except psycopg.Error as e:
            raise self._unavailable("open", e) from None
        self._pool = pool
        return self.version

    def _configure(self, conn: psycopg.Connection) -> None:
        if self.schema is not None:
            conn.execute(search_path(self.schema))

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=self._pool_timeout)

    def __enter__(self) -> "PostgresCore":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, operation: str, work: Callable[[psycopg.Connection], T], transaction: bool = True) -> T:
        """Run `work` in one transaction and commit; map outages to StoreUnavailable.

        Deadlocks and serialization failures are retried: PostgreSQL rolled the whole
        transaction back, so running it again cannot apply anything twice.
        """
        pool = self._pool
        if pool is None:
            raise StoreUnavailable(f"PostgreSQL {self.target}: {operation}: store is not open")
        for attempt in range(_RETRIES):
            try:
                with pool.connection(timeout=self._pool_timeout) as conn:
                    if not transaction:
                        return work(conn)
                    with conn.transaction():
                        return work(conn)
            except (pgerrors.DeadlockDetected, pgerrors.SerializationFailure) as e:
                if attempt + 1 == _RETRIES:
                    raise self._unavailable(operation, e) from None
            except psycopg.Error as e:
                if _is_unavailable(e):
                    raise self._unavailable(operation, e) from None
                raise
        raise AssertionError("unreachable")

    def _run_statement(self, operation: str, work: Callable[[psycopg.Connection], T]) -> T:
        """`_run` for work of one statement: it is its own transaction (autocommit), so it
        costs one round trip to the server instead of three (BEGIN and COMMIT)."""
        return self._run(operation, work, transaction=False)

    def transact(self, operation: str, work: Callable[[psycopg.Connection], T]) -> T:
        """`work` in one committed transaction on this pool, for other tables on the same
        database (the federation outbox); errors as for the store's own calls."""
        return self._run(operation, work)

    # -- users -------------------------------------------------------------------

    def add_user(self, user: UserRecord) -> bool:
        def work(conn: psycopg.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO users (user_id, key_pem, push_endpoint, created)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (user_id) DO NOTHING",
                (user.user_id, user.key_pem, user.push_endpoint, user.created),
            )
            return cur.rowcount == 1

        return self._run("add_user", work)

    def get_user(self, user_id: str) -> Optional[UserRecord]:
        def work(conn: psycopg.Connection) -> Optional[UserRecord]:
            row = conn.execute(
                "SELECT user_id, key_pem, push_endpoint, created FROM users WHERE user_id = %s",
                (user_id,),
            ).fetchone()
            return None if row is None else UserRecord(row[0], row[1], row[2], int(row[3]))

        return self._run_statement("get_user", work)

    def set_push_endpoint(self, user_id: str, endpoint: Optional[str]) -> bool:
        def work(conn: psycopg.Connection) -> bool:
            cur = conn.execute(
                "UPDATE users SET push_endpoint = %s WHERE user_id = %s", (endpoint, user_id)
            )
            return cur.rowcount == 1

        return self._run("set_push_endpoint", work)

    def delete_user(self, user_id: str) -> bool:
        """Tokens, messages and dedup records go with the row (ON DELETE CASCADE)."""

        def work(conn: psycopg.Connection) -> bool:
            return conn.execute("DELETE FROM users WHERE user_id = %s", (user_id,)).rowcount == 1

        return self._run("delete_user", work)

    # -- tokens ------------------------------------------------------------------

    def add_token(self, user_id: str, token: TokenRecord) -> None:
        """Raises KeyError for an unknown user (e.g. deleted a moment ago)."""

        def work(conn: psycopg.Connection) -> None:
            conn.execute(
                "INSERT INTO tokens (user_id, token_id, digest, label, created, expires)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (user_id, token_id) DO NOTHING",
                (user_id, token.id, token.digest, _enc(token.label), token.created, token.expires),
            )

        try:
            self._run("add_token", work)
        except pgerrors.ForeignKeyViolation:
            raise KeyError(user_id) from None

    @staticmethod
    def _token(row: tuple[Any, ...]) -> TokenRecord:
        return TokenRecord(
            id=row[0],
            digest=row[1],
            label=_dec(row[2]),
            created=int(row[3]),
            expires=None if row[4] is None else int(row[4]),
        )

    def get_token(self, user_id: str, token_id: str) -> Optional[TokenRecord]:
        def work(conn: psycopg.Connection) -> Optional[TokenRecord]:
            row = conn.execute(
                "SELECT token_id, digest, label, created, expires FROM tokens"
                " WHERE user_id = %s AND token_id = %s",
                (user_id, token_id),
            ).fetchone()
            return None if row is None else self._token(row)

        return self._run("get_token", work)

    def list_tokens(self, user_id: str) -> list[TokenRecord]:
        def work(conn: psycopg.Connection) -> list[TokenRecord]:
            rows = conn.execute(
                "SELECT token_id, digest, label, created, expires FROM tokens"
                " WHERE user_id = %s ORDER BY created, seq",
                (user_id,),
            ).fetchall()
            return [self._token(row) for row in rows]

        return self._run("list_tokens", work)

    def revoke_token(self, user_id: str, token_id: str) -> bool:
        def work(conn: psycopg.Connection) -> bool:
            cur = conn.execute(
                "DELETE FROM tokens WHERE user_id = %s AND token_id = %s", (user_id, token_id)
            )
            return cur.rowcount == 1

        return self._run("revoke_token", work)

    # -- messages ----------------------------------------------------------------

    def deliver(
        self, user_id: str, dedup_key: str, message: NewMessage, quota: Quota, now: int
    ) -> Delivery:
        """Dedup check, quota check and insert under the recipient's row lock.

        FOR NO KEY UPDATE serialises deliveries to one user across every process
        (so the quota holds exactly and ids follow commit order) without blocking
        foreign-key checks of unrelated writes such as add_token.
        Raises KeyError for an unknown user, QuotaExceeded when it does not fit.
        """

        def work(conn: psycopg.Connection) -> Delivery:
            row = conn.execute(
                "SELECT pending_messages, pending_bytes FROM users WHERE user_id = %s FOR NO KEY UPDATE",
                (user_id,),
            ).fetchone()
            if row is None:
                raise KeyError(user_id)
            return self._deliver_locked(conn, user_id, dedup_key, message, quota, now, (int(row[0]), int(row[1])))

        return self._run("deliver", work)

    def _deliver_locked(
        self, conn: psycopg.Connection, user_id: str, dedup_key: str, message: NewMessage, quota: Quota, now: int,
        held: tuple[int, int],
    ) -> Delivery:
        """`deliver` once the recipient's row is locked, `held` its counters: dedup, quota,
        insert, counters. When the counters leave room (the common case), the dedup check,
        the message, its dedup record and the counters are one statement, run after the lock
        so that it sees every delivery committed before. The counters include expired rows
        the sweep has not deleted yet; only when they say "full" are this user's expired rows
        counted and left out, after the dedup check (a duplicate is answered even when full)."""
        count, used = held
        size = message.size
        if count + 1 > quota.max_messages or used + size > quota.max_bytes:
            seen = conn.execute(
                "SELECT message_id, expires FROM dedup WHERE user_id = %s AND dedup_key = %s AND expires > %s",
                (user_id, dedup_key, now),
            ).fetchone()
            if seen is not None:
                return Delivery(seen[0], int(seen[1]), duplicate=True)
            expired = conn.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM messages WHERE user_id = %s AND expires <= %s",
                (user_id, now),
            ).fetchone() or (0, 0)
            count, used = count - int(expired[0]), used - int(expired[1])
        if count + 1 > quota.max_messages or used + size > quota.max_bytes:
            raise QuotaExceeded(
                f"mailbox holds {count} messages, {used} bytes;"
                f" quota {quota.max_messages} messages, {quota.max_bytes} bytes"
            )
        # A conflicting dedup row can only be an expired record: a live one is `seen`.
        row = conn.execute(
            "WITH seen AS (SELECT message_id, expires FROM dedup"
            " WHERE user_id = %(user)s AND dedup_key = %(key)s AND expires > %(now)s),"
            " m AS (INSERT INTO messages (user_id, token_id, data, algorithm, password,"
            " signature, received, expires, size)"
            " SELECT %(user)s, %(token)s, %(data)s, %(algorithm)s, %(password)s, %(signature)s, %(received)s,"
            " %(expires)s, %(size)s WHERE NOT EXISTS (SELECT 1 FROM seen) RETURNING id),"
            " d AS (INSERT INTO dedup (user_id, dedup_key, message_id, expires)"
            " SELECT %(user)s, %(key)s, lpad(m.id::text, %(digits)s, '0'), %(expires)s FROM m"
            " ON CONFLICT (user_id, dedup_key) DO UPDATE"
            " SET message_id = EXCLUDED.message_id, expires = EXCLUDED.expires),"
            " c AS (UPDATE users SET pending_messages = pending_messages + 1,"
            " pending_bytes = pending_bytes + %(size)s WHERE user_id = %(user)s AND EXISTS (SELECT 1 FROM m))"
            " SELECT (SELECT id FROM m), (SELECT message_id FROM seen), (SELECT expires FROM seen)",
            {
                "user": user_id, "token": message.token_id, "data": _enc(message.data),
                "algorithm": message.algorithm, "password": _enc(message.password),
                "signature": _enc(message.signature), "received": message.received, "expires": message.expires,
                "size": size, "key": dedup_key, "now": now, "digits": _ID_DIGITS,
            },
        ).fetchone()
        assert row is not None
        if row[0] is None:
            return Delivery(row[1], int(row[2]), duplicate=True)
        message_id = format_message_id(int(row[0]))
        return Delivery(message_id, message.expires, duplicate=False)

    def deliver_checked(
        self, user_id: str, token_digest: str, dedup_key: str, message: NewMessage, quota: Quota, now: int
    ) -> Accepted:
        """User, token and delivery in one transaction: the accept path's one round trip."""

        def work(conn: psycopg.Connection) -> Accepted:
            row = conn.execute(
                "SELECT u.user_id, u.key_pem, u.push_endpoint, u.created, t.digest, t.expires,"
                " u.pending_messages, u.pending_bytes"
                " FROM users u LEFT JOIN tokens t ON t.user_id = u.user_id AND t.token_id = %s"
                " WHERE u.user_id = %s FOR NO KEY UPDATE OF u",
                (token_digest[:16], user_id),
            ).fetchone()
            if row is None:
                raise KeyError(user_id)
            digest, expires = row[4], row[5]
            if digest is None or not hmac.compare_digest(digest, token_digest) or (
                expires is not None and now >= int(expires)
            ):
                raise TokenRefused(token_digest[:16])
            user = UserRecord(row[0], row[1], row[2], int(row[3]))
            held = (int(row[6]), int(row[7]))
            return Accepted(user, self._deliver_locked(conn, user_id, dedup_key, message, quota, now, held))

        return self._run("deliver_checked", work)

    def fetch(
        self, user_id: str, now: int, limit: int, max_bytes: Optional[int] = None
    ) -> tuple[list[MessageRecord], int]:
        """One statement (`_PAGE`), so one snapshot: `remaining` agrees with the page, and
        the sizes cut the page at `max_bytes` before any body is read (the first row always)."""

        def work(conn: psycopg.Connection) -> tuple[list[MessageRecord], int]:
            return _page(_page_rows(conn, _NO_REPLAY, _page_params(user_id, now, limit, max_bytes)))[1:]

        return self._run_statement("fetch", work)

    def usage(self, user_id: str, now: int) -> tuple[int, int]:
        """From the counters on the users row, as the quota in `deliver` counts, less the
        expired rows not yet swept."""

        def work(conn: psycopg.Connection) -> tuple[int, int]:
            row = conn.execute(_USAGE, {"user": user_id, "now": now}).fetchone()
            return (max(0, int(row[0])), max(0, int(row[1]))) if row else (0, 0)

        return self._run("usage", work)

    def acknowledge(self, user_id: str, message_ids: list[str]) -> int:
        row = self._acknowledge("acknowledge", _NO_REPLAY, {"user": user_id}, message_ids)
        return int(row[1])

    def remember_and_acknowledge(self, digest: bytes, until: int, now: int, user_id: str,
                                 message_ids: list[str]) -> Optional[int]:
        """A signed acknowledgement in one statement, as `remember_and_fetch`: None for a
        replay; KeyError if the user does not exist."""
        params = {"user": user_id, "digest": bytes(digest), "until": until, "now": now}
        fresh, deleted, exists = self._acknowledge("remember_and_acknowledge", _REPLAY, params, message_ids)
        if not exists:
            raise KeyError(user_id)
        return int(deleted) if fresh else None

    def _acknowledge(self, operation: str, replay: str, params: dict[str, Any],
                     message_ids: list[str]) -> tuple[Any, ...]:
        params = {**params, "ids": sorted({s for s in map(parse_message_id, message_ids) if s is not None})}

        def work(conn: psycopg.Connection) -> tuple[Any, ...]:
            row = conn.execute(_ACKNOWLEDGE.format(replay=replay), params).fetchone()
            assert row is not None
            return tuple(row)

        return self._run_statement(operation, work)

    # -- housekeeping ------------------------------------------------------------

    def expire_counts(self, now: int) -> dict[str, int]:
        """Rows reclaimed per table; DELETE by the expiry columns only, no body is read.

        At its `expires` (or `until`) instant a row has already expired, as
        TokenRecord.is_valid has it.
        """

        def work(conn: psycopg.Connection) -> dict[str, int]:
            return {
                "messages": self._expire_messages(conn, now),
                "dedup": conn.execute("DELETE FROM dedup WHERE expires <= %s", (now,)).rowcount,
                "tokens": conn.execute(
                    "DELETE FROM tokens WHERE expires IS NOT NULL AND expires <= %s", (now,)
                ).rowcount,
                "replay": conn.execute("DELETE FROM replay WHERE until <= %s", (now,)).rowcount,
            }

        return self._run("expire", work)

    @staticmethod
    def _expire_messages(conn: psycopg.Connection, now: int) -> int:
        """Delete expired messages and subtract them from their users' counters."""
        row = conn.execute(
            "WITH gone AS (DELETE FROM messages WHERE expires <= %s RETURNING user_id, size),"
            " per AS (SELECT user_id, count(*) AS n, sum(size) AS b FROM gone GROUP BY user_id),"
            " counted AS (UPDATE users u SET pending_messages = u.pending_messages - per.n,"
            " pending_bytes = u.pending_bytes - per.b FROM per WHERE u.user_id = per.user_id)"
            " SELECT count(*) FROM gone",
            (now,),
        ).fetchone()
        return int(row[0]) if row else 0

    def expire(self, now: int) -> int:
        return self.expire_counts(now)["messages"]

    def counter_mismatches(self) -> list[tuple[str, int, int, int, int]]:
        """Users whose counters disagree with their rows: (user_id, counted messages,
        counted bytes, real messages, real bytes). One statement, so one consistent snapshot:
        every writer changes rows and counters in the same transaction."""

        def work(conn: psycopg.Connection) -> list[tuple[str, int, int, int, int]]:
            rows = conn.execute(
                _COUNTERS + " WHERE (u.pending_messages, u.pending_bytes)"
                " IS DISTINCT FROM (coalesce(c.n, 0), coalesce(c.b, 0)) ORDER BY u.user_id"
            ).fetchall()
            return [(r[0], int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows]

        return self._run("counter check", work)

    def recount(self, user_ids: list[str]) -> int:
        """Set these users' counters from their rows; safe beside running relays: the rows
        are locked first (deliveries wait), then counted by a statement that sees every
        committed change, and deletes still in flight subtract from the value set here."""

        def work(conn: psycopg.Connection) -> int:
            conn.execute(
                "SELECT 1 FROM users WHERE user_id = ANY(%s) ORDER BY user_id FOR NO KEY UPDATE", (user_ids,)
            )
            return conn.execute(
                "UPDATE users u SET pending_messages = c.n, pending_bytes = c.b"
                " FROM (SELECT v.user_id, count(m.id) AS n, coalesce(sum(m.size), 0) AS b FROM users v"
                " LEFT JOIN messages m ON m.user_id = v.user_id WHERE v.user_id = ANY(%s)"
                " GROUP BY v.user_id) c WHERE u.user_id = c.user_id",
                (user_ids,),
            ).rowcount

        return self._run("recount", work)

    def remember_signature(self, digest: bytes, until: int, now: int) -> bool:
        """One statement: the unique key decides between concurrent first uses, and the
        conditional update revives an entry that lapsed (now >= until) but was not yet
        reclaimed."""

        def work(conn: psycopg.Connection) -> bool:
            row = conn.execute(
                "INSERT INTO replay (digest, until) VALUES (%s, %s)"
                " ON CONFLICT (digest) DO UPDATE SET until = EXCLUDED.until"
                " WHERE replay.until <= %s RETURNING 1",
                (bytes(digest), until, now),
            ).fetchone()
            return row is not None

        return self._run("remember_signature", work)

    def remember_and_fetch(self, digest: bytes, until: int, now: int, user_id: str, limit: int,
                           max_bytes: Optional[int] = None) -> Optional[tuple[list[MessageRecord], int]]:
        """A signed fetch's store work in one statement, so one round trip: the replay entry
        (as `remember_signature`) and the page (as `fetch`) commit together before the answer
        leaves, and a replay reads no message. None for a replay; KeyError if the user does
        not exist (its users row is what the page's count comes from)."""

        def work(conn: psycopg.Connection) -> Optional[tuple[list[MessageRecord], int]]:
            params = _page_params(user_id, now, limit, max_bytes)
            params.update(digest=bytes(digest), until=until)
            rows = _page_rows(conn, _REPLAY, params)
            if rows[0][2] is None:
                raise KeyError(user_id)
            fresh, messages, remaining = _page(rows)
            return (messages, remaining) if fresh else None

        return self._run_statement("remember_and_fetch", work)

    def check_writable(self) -> None:
        """Insert and delete a row in one committed transaction: a real WAL flush."""
        marker = f"{socket.gethostname()}:{uuid.uuid4().hex}"

        def work(conn: psycopg.Connection) -> None:
            conn.execute(
                "INSERT INTO health (id, written)"
                " VALUES (%s, extract(epoch FROM now())::bigint)",
                (marker,),
            )
            conn.execute("DELETE FROM health WHERE id = %s", (marker,))

        self._run("check_writable", work)

    def stats(self, now: int) -> dict[str, Any]:
        """Counts pending unexpired messages, as the quota does."""

        def work(conn: psycopg.Connection) -> dict[str, Any]:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM users), count(*), coalesce(sum(size), 0),"
                " min(received) FROM messages WHERE expires > %s",
                (now,),
            ).fetchone()
            assert row is not None
            return {
                "users": int(row[0]),
                "messages": int(row[1]),
                "bytes": int(row[2]),
                "oldest_received": None if row[3] is None else int(row[3]),
            }

        return self._run("stats", work)


@implementer(IStore)
class PostgresStore:
    """The relay's IStore on PostgreSQL: PostgresCore calls run in a thread pool.

    Without a `threadpool` argument the store runs its own, sized to the connection
    pool (more threads would only queue for connections), started by `open()` and
    stopped by `close()` or at reactor shutdown.
    """

    name = "postgresql"
    log = Logger(namespace="msgrelay.store.postgres")

    def __init__(
        self,
        dsn: str,
        reactor: Any = None,
        threadpool: Optional[ThreadPool] = None,
        schema: Optional[str] = None,
        *,
        min_size: int = 1,
        max_size: int = 8,
        connect_timeout: Optional[float] = None,
        pool_timeout: float = 10.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.core = PostgresCore(
            dsn,
            schema,
            min_size=min_size,
            max_size=max_size,
            connect_timeout=connect_timeout,
            pool_timeout=pool_timeout,
        )
        self._reactor = reactor
        self._given_threadpool = threadpool
        self._threadpool: Optional[ThreadPool] = threadpool
        self._max_threads = max(max_size, 1)
        self._shutdown_trigger: Any = None
        self._open = False

    def open(self) -> "Deferred[int]":
        """Create/migrate the schema and fill the pool; fires the schema version."""
        threadpool = self._start_threadpool()
        d: Deferred[int] = deferToThreadPool(self._reactor, threadpool, self.core.open)
        return d.addCallbacks(self._opened, self._open_failed)

    def open_blocking(self) -> int:
        """Open in the calling thread, for start-up before the reactor runs: a relay
        whose database is down should refuse to start, with the reason, at once."""
        self._start_threadpool()
        try:
            version = self.core.open()
        except BaseException:
            self._open_failed(Failure())
            raise
        return self._opened(version)

    def _start_threadpool(self) -> ThreadPool:
        if self._given_threadpool is None and self._threadpool is None:
            self._threadpool = ThreadPool(0, self._max_threads, name="msgrelay-postgres")
            self._threadpool.start()
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self._on_shutdown
            )
        assert self._threadpool is not None
        return self._threadpool

    def _opened(self, version: int) -> int:
        self._open = True
        self.log.info(
            "PostgreSQL store {target} open (schema {schema}, version {version},"
            " migrations applied {applied})",
            target=self.core.target,
            schema=self.core.schema or "default",
            version=version,
            applied=self.core.applied_migrations,
        )
        return version

    def _open_failed(self, f: Failure) -> Failure:
        self.log.error(
            "PostgreSQL store {target} failed to open: {error}",
            target=self.core.target,
            error=f.getErrorMessage(),
        )
        self._stop_threadpool()
        return f

    def close(self) -> "Deferred[None]":
        """Close the pool (waiting for running queries), then our own thread pool."""
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        if self._threadpool is None:
            return succeed(None)
        self._open = False
        d: Deferred[None] = deferToThreadPool(self._reactor, self._threadpool, self.core.close)

        def done(result: Any) -> Any:
            self._stop_threadpool()
            self.log.info("PostgreSQL store {target} closed", target=self.core.target)
            return result

        return d.addBoth(done)

    def _on_shutdown(self) -> "Deferred[None]":
        self._shutdown_trigger = None
        return self.close()

    def _stop_threadpool(self) -> None:
        if self._given_threadpool is None and self._threadpool is not None:
            pool, self._threadpool = self._threadpool, None
            pool.stop()
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None

    def _call(self, operation: str, fn: Callable[..., T], *args: Any) -> "Deferred[T]":
        """Run a core call off the reactor thread; log outages here, in the reactor."""
        if not self._open or self._threadpool is None:
            return fail(
                StoreUnavailable(f"PostgreSQL {self.core.target}: {operation}: store is not open")
            )
        d: Deferred[T] = deferToThreadPool(self._reactor, self._threadpool, fn, *args)

        def unavailable(f: Failure) -> Failure:
            if f.check(StoreUnavailable):
                self.log.warn(
                    "PostgreSQL store unavailable during {operation}: {error}",
                    operation=operation,
                    error=f.getErrorMessage(),
                    target=self.core.target,
                )
            return f

        return d.addErrback(unavailable)

    def add_user(self, user: UserRecord) -> "Deferred[bool]":
        return self._call("add_user", self.core.add_user, user)

    def get_user(self, user_id: str) -> "Deferred[Optional[UserRecord]]":
        return self._call("get_user", self.core.get_user, user_id)

    def set_push_endpoint(self, user_id: str, endpoint: Optional[str]) -> "Deferred[bool]":
        return self._call("set_push_endpoint", self.core.set_push_endpoint, user_id, endpoint)

    def delete_user(self, user_id: str) -> "Deferred[bool]":
        return self._call("delete_user", self.core.delete_user, user_id)

    def add_token(self, user_id: str, token: TokenRecord) -> "Deferred[None]":
        return self._call("add_token", self.core.add_token, user_id, token)

    def get_token(self, user_id: str, token_id: str) -> "Deferred[Optional[TokenRecord]]":
        return self._call("get_token", self.core.get_token, user_id, token_id)

    def list_tokens(self, user_id: str) -> "Deferred[list[TokenRecord]]":
        return self._call("list_tokens", self.core.list_tokens, user_id)

    def revoke_token(self, user_id: str, token_id: str) -> "Deferred[bool]":
        return self._call("revoke_token", self.core.revoke_token, user_id, token_id)

    def deliver(
        self, user_id: str, dedup_key: str, message: NewMessage, quota: Quota, now: int
    ) -> "Deferred[Delivery]":
        return self._call("deliver", self.core.deliver, user_id, dedup_key, message, quota, now)

    def deliver_checked(
        self, user_id: str, token_digest: str, dedup_key: str, message: NewMessage, quota: Quota, now: int
    ) -> "Deferred[Accepted]":
        return self._call(
            "deliver_checked", self.core.deliver_checked, user_id, token_digest, dedup_key, message, quota, now
        )

    def fetch(
        self, user_id: str, now: int, limit: int, max_bytes: Optional[int] = None
    ) -> "Deferred[tuple[list[MessageRecord], int]]":
        return self._call("fetch", self.core.fetch, user_id, now, limit, max_bytes)

    def usage(self, user_id: str, now: int) -> "Deferred[tuple[int, int]]":
        return self._call("usage", self.core.usage, user_id, now)

    def acknowledge(self, user_id: str, message_ids: list[str]) -> "Deferred[int]":
        return self._call("acknowledge", self.core.acknowledge, user_id, list(message_ids))

    def expire(self, now: int) -> "Deferred[int]":
        d = self._call("expire", self.core.expire_counts, now)

        def report(counts: dict[str, int]) -> int:
            if any(counts.values()):
                self.log.info(
                    "PostgreSQL expiry reclaimed {messages} messages, {dedup} dedup records,"
                    " {tokens} tokens, {replay} replay entries",
                    **counts,
                )
            return counts["messages"]

        return d.addCallback(report)

    def remember_signature(self, digest: bytes, until: int, now: int) -> "Deferred[bool]":
        return self._call("remember_signature", self.core.remember_signature, digest, until, now)

    def remember_and_fetch(self, digest: bytes, until: int, now: int, user_id: str, limit: int,
                           max_bytes: Optional[int] = None) -> "Deferred[Optional[tuple[list[MessageRecord], int]]]":
        return self._call("remember_and_fetch", self.core.remember_and_fetch, digest, until, now, user_id, limit,
                          max_bytes)

    def remember_and_acknowledge(self, digest: bytes, until: int, now: int, user_id: str,
                                 message_ids: list[str]) -> "Deferred[Optional[int]]":
        return self._call("remember_and_acknowledge", self.core.remember_and_acknowledge, digest, until, now,
                          user_id, list(message_ids))

    def check_writable(self) -> "Deferred[None]":
        return self._call("check_writable", self.core.check_writable)

    def stats(self, now: int) -> "Deferred[dict[str, Any]]":
        return self._call("stats", self.core.stats, now)
