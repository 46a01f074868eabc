"""PostgreSQL store: the shared contract plus what only a shared database can show.

Runs against a real server (MSGRELAY_TEST_POSTGRES_DSN, default the local test
database). An unreachable server fails these tests; it never skips them.
Each test gets its own schema, dropped afterwards.
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import Any, Callable, Iterator

import psycopg
import pytest
import pytest_twisted
from psycopg import sql
from psycopg.conninfo import make_conninfo
from store_contract import BIG, StoreContract
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.portforward import ProxyFactory
from zope.interface.verify import verifyObject

from msgrelay.store.interface import (
    IStore,
    NewMessage,
    Quota,
    QuotaExceeded,
    StoreUnavailable,
    TokenRecord,
    UserRecord,
)
from msgrelay.store.postgres import _PAGE, _REPLAY, PostgresCore, PostgresStore, _page_params
from msgrelay.store.postgres_schema import MIGRATIONS, SCHEMA_VERSION

DSN = os.environ.get("MSGRELAY_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
NOW = 1_800_000_000


def admin_connect() -> psycopg.Connection:
    """A plain connection for setup and inspection; a dead server fails the test."""
    try:
        return psycopg.connect(DSN, autocommit=True, connect_timeout=5)
    except psycopg.Error as e:
        pytest.fail(
            f"PostgreSQL test server unreachable ({type(e).__name__}); start it or set"
            " MSGRELAY_TEST_POSTGRES_DSN",
            pytrace=False,
        )


@pytest.fixture
def pg_schema() -> Iterator[str]:
    admin_connect().close()
    name = f"msgrelay_test_{secrets.token_hex(6)}"
    yield name
    with admin_connect() as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def make_store(pg_schema: str) -> Iterator[Callable[..., PostgresStore]]:
    """Unopened PostgresStores on the test schema; each is one 'relay process'."""
    stores: list[PostgresStore] = []

    def make(dsn: str = DSN, **kwargs: Any) -> PostgresStore:
        kwargs.setdefault("schema", pg_schema)
        store = PostgresStore(dsn, **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        pytest_twisted.blockon(store.close())


def opened(store: PostgresStore) -> PostgresStore:
    pytest_twisted.blockon(store.open())
    return store


async def started(store: PostgresStore) -> PostgresStore:
    await store.open()
    return store


def query(schema: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Inspect the tables from outside the store, as a separate session would."""
    with admin_connect() as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        return conn.execute(statement, params).fetchall()  # type: ignore[arg-type]


def message(n: int = 0, expires: int = NOW + 3600, data: str = "payload") -> NewMessage:
    return NewMessage("tok1", f"{data}{n}", "aes-256-gcm", "pw", None, NOW, expires)


def user(user_id: str = "alice") -> UserRecord:
    return UserRecord(user_id, "-----BEGIN PUBLIC KEY-----\n...", None, NOW)


class TestPostgresStore(StoreContract):
    """The backend-neutral contract, on a fresh schema per test."""

    @pytest.fixture
    def store(self, make_store: Callable[..., PostgresStore]) -> PostgresStore:
        return opened(make_store())


# -- schema ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_provides_istore_and_records_schema_version(make_store, pg_schema):
    store = make_store()
    assert await store.open() == SCHEMA_VERSION
    assert verifyObject(IStore, store)
    assert store.name == "postgresql"
    assert query(pg_schema, "SELECT version FROM schema_version ORDER BY version") == [
        (v,) for v in range(1, SCHEMA_VERSION + 1)]
    tables = {r[0] for r in query(
        pg_schema, "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
        (pg_schema,),
    )}
    assert {"users", "tokens", "messages", "dedup", "replay", "health", "schema_version",
            "outbox_destinations", "outbox_packets", "outbox_dedup"} <= tables


@pytest_twisted.ensureDeferred
async def test_open_is_idempotent_and_concurrent_opens_agree(make_store, pg_schema):
    first, second = make_store(), make_store()
    versions = await defer.gatherResults([first.open(), second.open()])
    assert versions == [SCHEMA_VERSION, SCHEMA_VERSION]
    assert first.core.applied_migrations + second.core.applied_migrations == list(range(1, SCHEMA_VERSION + 1))
    assert await make_store().open() == SCHEMA_VERSION
    assert query(pg_schema, "SELECT count(*) FROM schema_version") == [(SCHEMA_VERSION,)]


@pytest_twisted.ensureDeferred
async def test_newer_schema_is_refused(make_store, pg_schema):
    await make_store().open()
    query(pg_schema, "INSERT INTO schema_version VALUES (%s, 0) RETURNING 1", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreUnavailable, match="newer than this software"):
        await make_store().open()


def test_schema_name_must_be_a_plain_identifier():
    with pytest.raises(ValueError):
        PostgresStore(DSN, schema='x"; DROP TABLE users; --')


# -- per-user counters (schema version 3): the quota reads them, not the mailbox ------


def counters(schema: str) -> dict[str, tuple[int, int]]:
    """Each user's (pending_messages, pending_bytes) columns."""
    return {r[0]: (int(r[1]), int(r[2])) for r in query(
        schema, "SELECT user_id, pending_messages, pending_bytes FROM users ORDER BY user_id")}


def rows(schema: str) -> dict[str, tuple[int, int]]:
    """Each user's (count, bytes) of rows in messages, counted."""
    return {r[0]: (int(r[1]), int(r[2])) for r in query(
        schema, "SELECT u.user_id, count(m.id), coalesce(sum(m.size), 0) FROM users u"
                " LEFT JOIN messages m ON m.user_id = u.user_id GROUP BY u.user_id ORDER BY u.user_id")}


def schema_at_version_2(schema: str) -> None:
    """The tables as a relay of schema version 2 left them."""
    with admin_connect() as conn, conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
        conn.execute("CREATE TABLE schema_version (version integer PRIMARY KEY, applied bigint NOT NULL)")
        for version, statements in MIGRATIONS[:2]:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]
            conn.execute("INSERT INTO schema_version VALUES (%s, 0)", (version,))


@pytest_twisted.ensureDeferred
async def test_migration_3_backfills_the_counters_of_a_version_2_database(make_store, pg_schema):
    schema_at_version_2(pg_schema)
    for user_id, sizes in (("alice", [10, 20, 30]), ("bob", [7]), ("carol", [])):
        query(pg_schema, "INSERT INTO users VALUES (%s, 'pem', NULL, 0) RETURNING 1", (user_id,))
        for size in sizes:
            query(pg_schema, "INSERT INTO messages (user_id, token_id, data, algorithm, password, received,"
                             " expires, size) VALUES (%s, 't', 'x', 'a', 'p', 0, %s, %s) RETURNING 1",
                  (user_id, NOW + 10, size))
    assert "pending_messages" not in str(query(pg_schema, "SELECT * FROM users LIMIT 0"))
    store = make_store()
    assert await store.open() == SCHEMA_VERSION and store.core.applied_migrations == [3]
    assert counters(pg_schema) == {"alice": (3, 60), "bob": (1, 7), "carol": (0, 0)}
    # The migrated counters are what the quota reads: alice's mailbox is full at 3 messages.
    with pytest.raises(QuotaExceeded, match="holds 3 messages, 60 bytes"):
        await store.deliver("alice", "k", message(), Quota(3, 10**9), NOW)
    assert (await store.deliver("bob", "k", message(), Quota(3, 10**9), NOW)).duplicate is False
    assert counters(pg_schema) == rows(pg_schema)


@pytest_twisted.ensureDeferred
async def test_counters_follow_every_insert_and_delete(make_store, pg_schema):
    store = await started(make_store())
    await store.add_user(user("alice"))
    await store.add_user(user("bob"))
    sent = [await store.deliver("alice", f"k{i}", message(i, expires=NOW + 10 * (i + 1)), BIG, NOW) for i in range(5)]
    await store.deliver("bob", "k", message(), BIG, NOW)
    assert counters(pg_schema) == rows(pg_schema) and counters(pg_schema)["alice"][0] == 5
    await store.deliver("alice", "k0", message(0), BIG, NOW)  # a duplicate counts nothing
    assert await store.acknowledge("alice", [sent[0].message_id, sent[1].message_id, "00000000000000000009"]) == 2
    assert await store.acknowledge("alice", [sent[0].message_id]) == 0
    assert counters(pg_schema) == rows(pg_schema) and counters(pg_schema)["alice"][0] == 3
    await store.expire(NOW + 30)  # k2 (NOW + 30) has expired at its instant; k3, k4 stay
    assert counters(pg_schema) == rows(pg_schema) and counters(pg_schema)["alice"][0] == 2
    assert await store.delete_user("bob")
    assert counters(pg_schema) == rows(pg_schema) == {"alice": counters(pg_schema)["alice"]}


@pytest_twisted.ensureDeferred
async def test_expired_messages_not_yet_swept_leave_room_in_the_quota(make_store, pg_schema):
    store = await started(make_store())
    await store.add_user(user())
    quota = Quota(2, 10**9)
    for i in range(2):
        await store.deliver("alice", f"k{i}", message(i, expires=NOW + 10), quota, NOW)
    with pytest.raises(QuotaExceeded):
        await store.deliver("alice", "k2", message(2), quota, NOW + 9)
    # At NOW + 10 both have expired: the counters still hold them until the sweep, the quota does not.
    await store.deliver("alice", "k2", message(2), quota, NOW + 10)
    await store.deliver("alice", "k3", message(3), quota, NOW + 10)
    with pytest.raises(QuotaExceeded, match="holds 2 messages"):
        await store.deliver("alice", "k4", message(4), quota, NOW + 10)
    assert counters(pg_schema)["alice"][0] == 4
    await store.expire(NOW + 10)
    assert counters(pg_schema) == rows(pg_schema) and counters(pg_schema)["alice"][0] == 2


def test_recount_repairs_drifted_counters(pg_schema):
    core = PostgresCore(DSN, pg_schema)
    core.open()
    try:
        for user_id in ("alice", "bob"):
            core.add_user(user(user_id))
            core.deliver(user_id, "k", message(), BIG, NOW)
        assert core.counter_mismatches() == []
        query(pg_schema, "UPDATE users SET pending_messages = 7, pending_bytes = 1 WHERE user_id = 'bob' RETURNING 1")
        size = message().size
        assert core.counter_mismatches() == [("bob", 7, 1, 1, size)]
        assert core.recount(["bob"]) == 1
        assert core.counter_mismatches() == [] and counters(pg_schema) == rows(pg_schema)
    finally:
        core.close()


# -- concurrency across two stores (two pools, like two relay processes) ----------


@pytest.mark.parametrize("quota, stored", [(Quota(5, 10**9), 5), (Quota(100, 3 * message().size), 3)])
@pytest_twisted.ensureDeferred
async def test_concurrent_deliveries_respect_quota_exactly(make_store, pg_schema, quota, stored):
    a, b = await started(make_store()), await started(make_store())
    await a.add_user(user())
    calls = [
        (a if i % 2 else b).deliver("alice", f"key{i}", message(i % 10), quota, NOW)
        for i in range(20)
    ]
    results = await defer.DeferredList(calls, consumeErrors=True)
    delivered = [r for ok, r in results if ok]
    refused = [r for ok, r in results if not ok]
    assert len(delivered) == stored
    assert all(f.check(QuotaExceeded) for f in refused)
    assert query(pg_schema, "SELECT count(*) FROM messages") == [(stored,)]
    assert counters(pg_schema) == rows(pg_schema) and counters(pg_schema)["alice"][0] == stored
    messages, remaining = await b.fetch("alice", NOW, 100)
    assert (len(messages), remaining) == (stored, 0)


@pytest_twisted.ensureDeferred
async def test_concurrent_same_packet_is_stored_once(make_store, pg_schema):
    a, b = await started(make_store()), await started(make_store())
    await a.add_user(user())
    calls = [
        (a if i % 2 else b).deliver("alice", "same-key", message(i), Quota(100, 10**9), NOW)
        for i in range(20)
    ]
    deliveries = await defer.gatherResults(calls)
    assert sum(not d.duplicate for d in deliveries) == 1
    assert len({d.message_id for d in deliveries}) == 1
    assert query(pg_schema, "SELECT count(*) FROM messages") == [(1,)]


@pytest_twisted.ensureDeferred
async def test_concurrent_signature_is_accepted_exactly_once(make_store):
    a, b = await started(make_store()), await started(make_store())
    digest = secrets.token_bytes(32)
    calls = [(a if i % 2 else b).remember_signature(digest, NOW + 300, NOW) for i in range(20)]
    assert sorted(await defer.gatherResults(calls)) == [False] * 19 + [True]
    # A lapsed entry counts as absent, exactly once again, even before expire() runs.
    later = [(a if i % 2 else b).remember_signature(digest, NOW + 900, NOW + 301) for i in range(10)]
    assert sorted(await defer.gatherResults(later)) == [False] * 9 + [True]


@pytest_twisted.ensureDeferred
async def test_ids_from_two_stores_sort_in_arrival_order(make_store):
    a, b = await started(make_store()), await started(make_store())
    await a.add_user(user())
    ids = []
    for i in range(10):  # strictly alternating, each one committed before the next
        delivery = await (a if i % 2 else b).deliver("alice", f"k{i}", message(i), Quota(999, 10**9), NOW)
        ids.append(delivery.message_id)
    assert ids == sorted(ids) and len(set(ids)) == 10
    messages, _ = await a.fetch("alice", NOW, 100)
    assert [m.message_id for m in messages] == ids
    assert [m.data for m in messages] == [f"payload{i}" for i in range(10)]


@pytest_twisted.ensureDeferred
async def test_concurrent_ids_never_appear_behind_visible_ones(make_store):
    """A reader must never see a later commit slot in below an id it already saw,
    or a client acknowledging what it fetched would skip it in arrival order."""
    a, b, reader = await started(make_store()), await started(make_store()), await started(make_store())
    await a.add_user(user())
    calls = [
        (a if i % 2 else b).deliver("alice", f"k{i}", message(i), Quota(999, 10**9), NOW)
        for i in range(60)
    ]
    done = defer.gatherResults(calls)
    seen: list[str] = []
    while True:
        finished = done.called
        messages, _ = await reader.fetch("alice", NOW, 1000)
        ids = [m.message_id for m in messages]
        assert ids == sorted(ids)
        assert ids[: len(seen)] == seen, "a message appeared below one already visible"
        seen = ids
        if finished:
            break
    deliveries = await done
    assert sorted(d.message_id for d in deliveries) == seen and len(seen) == 60


# -- durability, erasure, housekeeping ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_delivery_is_committed_when_it_fires(make_store, pg_schema):
    store = await started(make_store())
    await store.add_user(user())
    delivery = await store.deliver("alice", "k", message(), Quota(9, 10**9), NOW)
    assert query(pg_schema, "SELECT lpad(id::text, 20, '0') FROM messages") == [(delivery.message_id,)]
    assert query(pg_schema, "SELECT message_id FROM dedup") == [(delivery.message_id,)]


@pytest_twisted.ensureDeferred
async def test_delete_user_erases_every_row_of_the_user(make_store, pg_schema):
    store = await started(make_store())
    for name in ("alice", "bob"):
        await store.add_user(user(name))
        await store.add_token(name, TokenRecord("0123456789abcdef", "ab" * 32, "l", NOW, None))
        await store.deliver(name, "k", message(), Quota(9, 10**9), NOW)
    assert await store.delete_user("alice") is True
    for table in ("users", "tokens", "messages", "dedup"):
        rows = query(pg_schema, f"SELECT DISTINCT user_id FROM {table}")
        assert rows == [("bob",)], table


@pytest_twisted.ensureDeferred
async def test_tokens_table_keeps_only_the_digest_record(make_store, pg_schema):
    store = await started(make_store())
    await store.add_user(user())
    token = TokenRecord("0123456789abcdef", "cd" * 32, "phone\x00\ud800", NOW, NOW + 60)
    await store.add_token("alice", token)
    assert await store.get_token("alice", token.id) == token  # even odd label text survives
    columns = {r[0] for r in query(
        pg_schema,
        "SELECT column_name FROM information_schema.columns WHERE table_schema = %s"
        " AND table_name = 'tokens'",
        (pg_schema,),
    )}
    assert columns == {"user_id", "token_id", "digest", "label", "created", "expires", "seq"}


@pytest_twisted.ensureDeferred
async def test_add_token_and_deliver_for_unknown_user_raise_keyerror(make_store):
    store = await started(make_store())
    with pytest.raises(KeyError):
        await store.add_token("ghost", TokenRecord("0123456789abcdef", "ab" * 32, None, NOW, None))
    with pytest.raises(KeyError):
        await store.deliver("ghost", "k", message(), Quota(9, 10**9), NOW)


@pytest_twisted.ensureDeferred
async def test_expire_reclaims_dedup_tokens_and_replay_rows(make_store, pg_schema):
    store = await started(make_store())
    await store.add_user(user())
    await store.add_token("alice", TokenRecord("0000000000000001", "a" * 64, None, NOW, NOW + 10))
    await store.add_token("alice", TokenRecord("0000000000000002", "b" * 64, None, NOW, None))
    await store.deliver("alice", "old", message(1, expires=NOW + 10), Quota(9, 10**9), NOW)
    await store.deliver("alice", "new", message(2, expires=NOW + 99), Quota(9, 10**9), NOW)
    await store.remember_signature(b"old", NOW + 10, NOW)
    await store.remember_signature(b"new", NOW + 99, NOW)
    assert await store.expire(NOW + 20) == 1
    assert query(pg_schema, "SELECT dedup_key FROM dedup") == [("new",)]
    assert query(pg_schema, "SELECT token_id FROM tokens") == [("0000000000000002",)]
    assert query(pg_schema, "SELECT digest FROM replay") == [(b"new",)]
    assert query(pg_schema, "SELECT count(*) FROM messages") == [(1,)]


@pytest_twisted.ensureDeferred
async def test_check_writable_leaves_no_row_behind(make_store, pg_schema):
    store = await started(make_store())
    assert await store.check_writable() is None
    assert query(pg_schema, "SELECT count(*) FROM health") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_acknowledge_ignores_malformed_and_foreign_ids(make_store):
    store = await started(make_store())
    await store.add_user(user("alice"))
    await store.add_user(user("bob"))
    mine = await store.deliver("alice", "k", message(), Quota(9, 10**9), NOW)
    theirs = await store.deliver("bob", "k", message(), Quota(9, 10**9), NOW)
    junk = ["", "1", "x" * 20, "9" * 20, "٣" * 20, theirs.message_id, mine.message_id, mine.message_id]
    assert await store.acknowledge("alice", junk) == 1
    assert (await store.fetch("bob", NOW, 10))[0][0].message_id == theirs.message_id


def scan_rows(plan: dict[str, Any]) -> int:
    """Rows every scan node of an EXPLAIN ANALYZE plan read, kept or filtered out."""
    own = 0
    if "Scan" in plan["Node Type"]:
        own = (plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)) * plan["Actual Loops"]
    return own + sum(scan_rows(child) for child in plan.get("Plans", []))


@pytest_twisted.ensureDeferred
async def test_a_page_reads_the_users_rows_only_whoever_came_first(make_store, pg_schema):
    """A user whose messages all came after everyone else's: the page statement reads its
    page, never every older message of the table (a walk of the primary key filtering on the
    user, which the planner picks for `user_id = X ORDER BY id`)."""
    store = await started(make_store())
    for name in ("bob", "alice"):
        await store.add_user(user(name))
    with admin_connect() as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(pg_schema)))
        for name in ("bob", "alice"):
            conn.execute("INSERT INTO messages (user_id, token_id, data, algorithm, password, received, expires, size)"
                         " SELECT %s, 'tok1', '\\x00', 'aes-256-gcm', '\\x00', %s, %s, 1"
                         " FROM generate_series(1, 3000)", (name, NOW, NOW + 3600))
            conn.execute("UPDATE users SET pending_messages = 3000, pending_bytes = 3000 WHERE user_id = %s", (name,))
        conn.execute("ANALYZE messages")
        params = {**_page_params("alice", NOW, 10, None), "digest": b"d" * 32, "until": NOW + 60}
        row = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + _PAGE.format(replay=_REPLAY), params).fetchone()
    assert row is not None
    plan = row[0][0]
    assert scan_rows(plan["Plan"]) < 100, plan
    page, remaining = await store.fetch("alice", NOW, 10)
    first = query(pg_schema, "SELECT min(id) FROM messages WHERE user_id = 'alice'")[0][0]
    assert [int(m.message_id) for m in page] == list(range(first, first + 10)) and remaining == 2990


def test_sync_core_works_without_a_reactor(pg_schema):
    """What an admin command does on a stopped relay."""
    with PostgresCore(DSN, pg_schema) as core:
        assert core.add_user(user()) is True
        core.deliver("alice", "k", message(expires=NOW + 5), Quota(9, 10**9), NOW)
        assert core.stats(NOW) == {"users": 1, "messages": 1, "bytes": message().size,
                                   "oldest_received": NOW}
        assert core.expire_counts(NOW + 5) == {"messages": 1, "dedup": 1, "tokens": 0, "replay": 0}
    with pytest.raises(StoreUnavailable, match="not open"):
        core.stats(NOW)


# -- failures ------------------------------------------------------------------------

# A hang guard, not a speed bound: each call below is set to give up after 2 s, so only a
# call that never returns (no connect or query timeout at all) reaches this deadline.
HANG_DEADLINE = 60


async def within(d: defer.Deferred, what: str) -> Any:
    """`d`'s result, or a test failure naming `what` if it is still pending at the deadline."""
    try:
        return await d.addTimeout(HANG_DEADLINE, reactor)
    except defer.TimeoutError:
        pytest.fail(f"{what} hung: no answer within {HANG_DEADLINE} s despite its 2 s timeout")


async def until_gone(application_name: str) -> None:
    """Poll until the server has ended every session of `application_name` (deadline-bound)."""
    for _ in range(HANG_DEADLINE * 20):
        with admin_connect() as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                               (application_name,)).fetchone()
        if row and row[0] == 0:
            return
        await deferLater(reactor, 0.05, lambda: None)
    pytest.fail(f"sessions of {application_name} still open after {HANG_DEADLINE} s")


async def until_waiting_on_a_lock(blocker: psycopg.Connection) -> None:
    """Poll until another session is waiting on a row lock that `blocker` holds."""
    me = blocker.info.backend_pid
    for _ in range(HANG_DEADLINE * 20):
        with admin_connect() as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                               (me,)).fetchone()
        if row and row[0] > 0:
            return
        await deferLater(reactor, 0.05, lambda: None)
    pytest.fail(f"no session waited on the lock within {HANG_DEADLINE} s")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_twisted.ensureDeferred
async def test_closed_port_is_store_unavailable_without_password(make_store):
    password = "pw-must-not-leak-7781"
    dsn = make_conninfo(DSN, host="127.0.0.1", port=str(closed_port()), password=password)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await within(make_store(dsn, connect_timeout=2).open(), "opening on a closed port")
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = str(caught.value)
    assert "open failed" in text and "127.0.0.1" in text
    assert password not in text
    logged = " ".join(f"{formatEvent(e)} {e!r}" for e in events)
    assert "failed to open" in logged and password not in logged


@pytest_twisted.ensureDeferred
async def test_silent_server_times_out_instead_of_hanging(make_store):
    """A host that accepts TCP but never answers (a hung or half-dead server)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        dsn = make_conninfo(DSN, host="127.0.0.1", port=str(silent.getsockname()[1]))
        with pytest.raises(StoreUnavailable, match="open failed"):
            await within(make_store(dsn, connect_timeout=2).open(), "opening on a silent server")


@pytest_twisted.ensureDeferred
async def test_outage_after_open_is_store_unavailable_then_recovers(make_store):
    """Route the store through a TCP proxy on the reactor, then cut it. This also shows
    the queries run off the reactor thread: the proxy could not forward otherwise."""
    target = psycopg.conninfo.conninfo_to_dict(DSN)
    proxies: list[Any] = []

    class Factory(ProxyFactory):
        def buildProtocol(self, addr):
            proto = super().buildProtocol(addr)
            proxies.append(proto)
            return proto

    factory = Factory(str(target.get("host") or "127.0.0.1"), int(target.get("port") or 5432))
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    port = listening.getHost().port
    store = await started(make_store(make_conninfo(DSN, host="127.0.0.1", port=str(port)),
                              connect_timeout=2, pool_timeout=2))
    await store.add_user(user())

    await listening.stopListening()
    for proto in proxies:
        proto.transport.abortConnection()
    with pytest.raises(StoreUnavailable, match="get_user failed"):
        await within(store.get_user("alice"), "a query during the outage")

    listening = reactor.listenTCP(port, factory, interface="127.0.0.1")
    try:
        for _ in range(20):
            try:
                assert (await store.get_user("alice")).user_id == "alice"
                break
            except StoreUnavailable:
                await deferLater(reactor, 0.5, lambda: None)
        else:
            pytest.fail("store did not recover after the server came back")
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_sessions_killed_by_a_server_restart_are_replaced(make_store):
    name = f"msgrelay-test-{secrets.token_hex(4)}"
    store = await started(make_store(make_conninfo(DSN, application_name=name)))
    await store.add_user(user())
    with admin_connect() as conn:
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
            (name,),
        ).fetchone()
    assert killed and killed[0] >= 1
    await until_gone(name)
    assert (await store.get_user("alice")).user_id == "alice"


@pytest_twisted.ensureDeferred
async def test_read_only_database_is_store_unavailable(make_store):
    await make_store().open()
    read_only = make_store(make_conninfo(DSN, options="-c default_transaction_read_only=on"))
    with pytest.raises(StoreUnavailable, match="25006"):
        await read_only.open()


@pytest_twisted.ensureDeferred
async def test_calls_before_open_or_after_close_fail_cleanly(make_store):
    store = make_store()
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.get_user("alice")
    await store.open()
    await store.close()
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.get_user("alice")


@pytest_twisted.ensureDeferred
async def test_blocked_query_leaves_the_reactor_running(make_store, pg_schema):
    """Hold alice's row lock from outside: deliver waits in its thread while the
    reactor keeps serving timers and other store calls."""
    store = await started(make_store())
    await store.add_user(user())
    with admin_connect() as blocker:
        blocker.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(pg_schema)))
        with blocker.transaction():
            blocker.execute("SELECT 1 FROM users WHERE user_id = 'alice' FOR UPDATE")
            pending = store.deliver("alice", "k", message(), Quota(9, 10**9), NOW)
            await until_waiting_on_a_lock(blocker)
            assert not pending.called
            assert (await store.get_user("alice")).user_id == "alice"
            assert not pending.called
        delivery = await pending
    assert delivery.duplicate is False


@pytest_twisted.ensureDeferred
async def test_open_blocking_for_start_up(make_store):
    """What the store factory does before the reactor runs."""
    store = make_store()
    assert store.open_blocking() == SCHEMA_VERSION
    assert await store.add_user(user()) is True
    down = make_store(make_conninfo(DSN, host="127.0.0.1", port=str(closed_port())), connect_timeout=2)
    with pytest.raises(StoreUnavailable, match="open failed"):
        down.open_blocking()
