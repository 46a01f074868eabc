"""Both federation outboxes against one contract, and what only the shared PostgreSQL outbox
shows: claims between processes, leases that run out, concurrent writers, the migration.

PostgreSQL tests run against a real server (MSGRELAY_TEST_POSTGRES_DSN), each on its own
schema; an unreachable server fails them.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional

import psycopg
import pytest
from outbox_contract import NOW, OutboxContract, packet
from psycopg import sql
from test_store_postgres import DSN, admin_connect, pg_schema, query  # noqa: F401 (fixture)

from msgrelay.federation.outbox import BackoffState, FederationOutbox
from msgrelay.federation.outbox_interface import OutboxFull
from msgrelay.federation.pgoutbox import PostgresOutbox
from msgrelay.store import postgres_schema
from msgrelay.store.postgres_schema import SCHEMA_VERSION, migrate

B = "b.test"
LEASE = 30.0


class TestFileOutbox(OutboxContract):
    @pytest.fixture
    def outbox(self, tmp_path):
        return FederationOutbox.open(tmp_path / "outbox")


@pytest.fixture
def make_outbox(pg_schema: str) -> Iterator[Callable[..., PostgresOutbox]]:  # noqa: F811
    """PostgresOutboxes on one fresh schema; each stands for one relay process."""
    made: list[PostgresOutbox] = []

    def make(owner: str = "") -> PostgresOutbox:
        outbox = PostgresOutbox.open(DSN, LEASE, schema=pg_schema, owner=owner or f"process-{len(made)}")
        made.append(outbox)
        return outbox

    yield make
    for outbox in made:
        outbox.core.close()


class TestPostgresOutbox(OutboxContract):
    @pytest.fixture
    def outbox(self, make_outbox):
        return make_outbox()


def test_one_process_at_a_time_sends_to_a_destination(make_outbox):
    one, two = make_outbox("one"), make_outbox("two")
    assert one.shared and not one.is_locked()
    entry, _ = two.add(B, packet(0), NOW, NOW + 600)
    assert one.claim(B, NOW).granted
    denied = two.claim(B, NOW + 1)
    assert not denied.granted and denied.holder == "one" and denied.entries == [entry]
    assert two.pending(NOW + 1) == {B: False}  # held by one
    assert two.renew(B, NOW + 1) is False
    assert one.claim(B, NOW + 2).granted  # its own claim again
    assert one.release(B, NOW + 3) is True  # the packet still waits
    assert two.claim(B, NOW + 3).granted and not one.claim(B, NOW + 4).granted
    two.close()  # stopping gives up its claims at once
    assert one.claim(B, NOW + 5).granted


def test_a_dead_process_claim_runs_out(make_outbox):
    dead, alive = make_outbox("dead"), make_outbox("alive")
    dead.add(B, packet(0), NOW, NOW + 600)
    assert dead.claim(B, NOW).granted and dead.renew(B, NOW + 10)  # held until NOW + 10 + LEASE
    assert not alive.claim(B, NOW + 10 + LEASE - 1).granted
    assert alive.pending(NOW + 10 + LEASE) == {B: True}
    assert alive.claim(B, NOW + 10 + LEASE).granted
    assert dead.renew(B, NOW + 10 + LEASE) is False  # the old holder learns it lost the claim
    (row,) = alive.summary(NOW + 10 + LEASE)
    assert row.holder == "alive"


def test_backoff_is_one_row_every_process_obeys(make_outbox, pg_schema):  # noqa: F811
    one, two = make_outbox("one"), make_outbox("two")
    one.add(B, packet(0), NOW, NOW + 600)
    two.add(B, packet(1), NOW, NOW + 600)
    one.save_backoff(B, BackoffState(2, NOW + 20, "HTTP 503"))
    assert two.load_backoff(B) == BackoffState(2, NOW + 20, "HTTP 503")
    assert not two.claim(B, NOW + 19).granted
    assert query(pg_schema, "SELECT count(*) FROM outbox_destinations") == [(1,)]
    two.clear_backoff(B)  # msgrelay-admin queue retry-now
    assert one.claim(B, NOW + 1).granted


def test_concurrent_writers_keep_commit_order_and_store_a_duplicate_once(make_outbox):
    outboxes = [make_outbox(f"p{n}") for n in range(4)]
    barrier = threading.Barrier(8)

    def add(n: int) -> tuple:
        barrier.wait()
        return outboxes[n % 4].add(B, packet(n % 2), NOW, NOW + 600, f"{n % 2:064d}")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(add, range(8)))
    firsts = {entry for entry, duplicate in results if not duplicate}
    assert len(firsts) == 2 and {entry for entry, _ in results} == firsts
    queued = outboxes[0].entries(B)
    assert set(queued) == firsts and [e.seq for e in queued] == sorted(e.seq for e in queued)


def test_of_processes_claiming_at_the_same_moment_exactly_one_wins(make_outbox):
    outboxes = [make_outbox(f"p{n}") for n in range(4)]
    outboxes[0].add(B, packet(0), NOW, NOW + 600)
    barrier = threading.Barrier(8)

    def claim(n: int) -> Optional[str]:
        barrier.wait()
        outbox = outboxes[n % 4]  # two threads per process
        return outbox.owner if outbox.claim(B, NOW).granted else None

    with ThreadPoolExecutor(8) as pool:
        winners = {owner for owner in pool.map(claim, range(8)) if owner is not None}
    assert len(winners) == 1
    assert [row.holder for row in outboxes[0].summary(NOW)] == list(winners)
    assert [o.owner for o in outboxes if o.renew(B, NOW)] == list(winners)


def test_max_queue_is_counted_in_the_database(make_outbox):
    one, two = make_outbox(), make_outbox()
    one.add(B, packet(0), NOW, NOW + 600, max_queue=2)
    two.add(B, packet(1), NOW, NOW + 600, max_queue=2)
    with pytest.raises(OutboxFull):
        one.add(B, packet(2), NOW, NOW + 600, max_queue=2)


def test_a_queue_held_by_another_process_is_not_removed(make_outbox):
    one, two = make_outbox("one"), make_outbox("two")
    entry, _ = one.add(B, packet(0), NOW, NOW + 600)
    assert two.claim(B, NOW).granted
    one.remove(entry)
    assert one.remove_destination(B) is False
    assert two.remove_destination(B) is True


def test_a_version_1_database_is_migrated_to_the_outbox_tables(pg_schema, monkeypatch):  # noqa: F811
    with psycopg.connect(DSN, autocommit=True) as conn:
        monkeypatch.setattr(postgres_schema, "MIGRATIONS", postgres_schema.MIGRATIONS[:1])
        monkeypatch.setattr(postgres_schema, "SCHEMA_VERSION", 1)
        assert migrate(conn, pg_schema) == (1, [1])
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(pg_schema)))
        conn.execute("INSERT INTO users VALUES ('alice', 'k', NULL, 1)")
        monkeypatch.undo()
        assert migrate(conn, pg_schema) == (SCHEMA_VERSION, list(range(2, SCHEMA_VERSION + 1)))
    assert query(pg_schema, "SELECT user_id FROM users") == [("alice",)]
    assert query(pg_schema, "SELECT count(*) FROM outbox_packets") == [(0,)]
