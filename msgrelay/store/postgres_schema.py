"""Tables of the PostgreSQL store and the migrations that build them.

Kept apart from the query code so that a later schema change is one new entry in
`MIGRATIONS`, applied once per database under an advisory lock, whichever relay
process opens the store first.
"""

from __future__ import annotations

import re
import time
from typing import Optional

import psycopg
from psycopg import sql

# Unquoted-identifier syntax, so the name is safe in search_path and logs.
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

# Each entry: (version, statements). Statements are idempotent where PostgreSQL
# allows it, so a database whose schema_version row was lost still opens.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE IF NOT EXISTS users (
                user_id text PRIMARY KEY,
                key_pem text NOT NULL,
                push_endpoint text,
                created bigint NOT NULL
            )""",
            # label is bytea: free text may hold NUL or lone surrogates, which text refuses.
            # seq breaks ties between tokens created in the same second ("oldest first").
            """CREATE TABLE IF NOT EXISTS tokens (
                user_id text NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
                token_id text NOT NULL,
                digest text NOT NULL,
                label bytea,
                created bigint NOT NULL,
                expires bigint,
                seq bigint GENERATED ALWAYS AS IDENTITY,
                PRIMARY KEY (user_id, token_id)
            )""",
            "CREATE INDEX IF NOT EXISTS tokens_expires ON tokens (expires) WHERE expires IS NOT NULL",
            # id comes from one sequence with CACHE 1, so ids taken under the per-user
            # row lock grow in commit order whichever process takes them. The opaque
            # payload fields are bytea for the same reason as tokens.label.
            """CREATE TABLE IF NOT EXISTS messages (
                id bigint GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
                user_id text NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
                token_id text NOT NULL,
                data bytea NOT NULL,
                algorithm text NOT NULL,
                password bytea NOT NULL,
                signature bytea,
                received bigint NOT NULL,
                expires bigint NOT NULL,
                size bigint NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS messages_user ON messages (user_id, id)",
            "CREATE INDEX IF NOT EXISTS messages_expires ON messages (expires)",
            """CREATE TABLE IF NOT EXISTS dedup (
                user_id text NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
                dedup_key text NOT NULL,
                message_id text NOT NULL,
                expires bigint NOT NULL,
                PRIMARY KEY (user_id, dedup_key)
            )""",
            "CREATE INDEX IF NOT EXISTS dedup_expires ON dedup (expires)",
            """CREATE TABLE IF NOT EXISTS replay (
                digest bytea PRIMARY KEY,
                until bigint NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS replay_until ON replay (until)",
            """CREATE TABLE IF NOT EXISTS health (
                id text PRIMARY KEY,
                written bigint NOT NULL
            )""",
        ],
    ),
    (
        2,
        [
            # The federation outbox (msgrelay/federation/pgoutbox.py), shared by every relay
            # process on the database. One row per destination: its backoff, shared by all,
            # and the lease of the one process sending to it now.
            """CREATE TABLE IF NOT EXISTS outbox_destinations (
                destination text PRIMARY KEY,
                attempts integer NOT NULL DEFAULT 0,
                next_attempt double precision,
                last_error text,
                lease_owner text,
                lease_until double precision
            )""",
            # seq comes from one sequence, taken under the destination row's lock, so a
            # queue's packets sort in commit order whichever process accepted them.
            """CREATE TABLE IF NOT EXISTS outbox_packets (
                seq bigint GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
                destination text NOT NULL REFERENCES outbox_destinations (destination),
                nonce text NOT NULL,
                received bigint NOT NULL,
                expires bigint NOT NULL,
                packet bytea NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS outbox_packets_queue ON outbox_packets (destination, seq)",
            # Idempotency records outlive delivery, until the packet's expiry (as the file outbox).
            """CREATE TABLE IF NOT EXISTS outbox_dedup (
                dedup_key text PRIMARY KEY,
                message_id text NOT NULL,
                expires bigint NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS outbox_dedup_expires ON outbox_dedup (expires)",
        ],
    ),
    (
        3,
        [
            # Per-user counters of the user's rows in messages (expired ones included until
            # the sweep deletes them), kept in the transaction that inserts or deletes the
            # rows, so the quota check reads one row instead of counting the mailbox.
            "ALTER TABLE users ADD COLUMN IF NOT EXISTS pending_messages bigint NOT NULL DEFAULT 0",
            "ALTER TABLE users ADD COLUMN IF NOT EXISTS pending_bytes bigint NOT NULL DEFAULT 0",
            # Backfilled from the rows already there (also zeroes users with none).
            """UPDATE users u SET pending_messages = coalesce(c.n, 0), pending_bytes = coalesce(c.b, 0)
               FROM users v LEFT JOIN (SELECT user_id, count(*) AS n, sum(size) AS b
                                       FROM messages GROUP BY user_id) c ON c.user_id = v.user_id
               WHERE u.user_id = v.user_id""",
        ],
    ),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]


def check_schema_name(schema: Optional[str]) -> Optional[str]:
    """Refuse names that would need quoting: they end up in search_path and in logs."""
    if schema is not None and not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError("schema must match [A-Za-z_][A-Za-z0-9_]{0,62}")
    return schema


def search_path(schema: str) -> sql.Composed:
    """SET statement pinning a session to one schema (and nothing else, so no table
    of another schema on the default path can be picked up by mistake)."""
    return sql.SQL("SET search_path TO {}").format(sql.Identifier(schema))


class SchemaTooNew(Exception):
    """The database was migrated by newer software than this one."""


def migrate(conn: psycopg.Connection, schema: Optional[str]) -> tuple[int, list[int]]:
    """Create or upgrade the tables in one transaction; returns (version, applied).

    The transaction-scoped advisory lock serialises relay processes that open a
    fresh database at the same moment: CREATE ... IF NOT EXISTS alone can still
    collide on the system catalogues.
    """
    applied: list[int] = []
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s))",
            (f"msgrelay.schema:{schema or ''}",),
        )
        if schema is not None:
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))
            )
            conn.execute(
                sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema))
            )
        conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_version (
                version integer PRIMARY KEY,
                applied bigint NOT NULL
            )"""
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        current = int(row[0]) if row else 0
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"database schema version {current} is newer than this software"
                f" supports ({SCHEMA_VERSION})"
            )
        for version, statements in MIGRATIONS:
            if version <= current:
                continue
            for statement in statements:
                conn.execute(statement)  # constant DDL
            conn.execute(
                "INSERT INTO schema_version (version, applied) VALUES (%s, %s)"
                " ON CONFLICT (version) DO NOTHING",
                (version, int(time.time())),
            )
            applied.append(version)
            current = version
    return current, applied
