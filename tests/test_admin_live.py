"""`msgrelay-admin` beside a running relay, and on a PostgreSQL store."""

from __future__ import annotations

import json
import os
import secrets
import time

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from apiclient import SyncClient
from cryptography.hazmat.primitives.asymmetric import rsa
from msgrelay.serverkey import write_private_key
from msgrelay.store.postgres import PostgresCore
from relayproc import RelayProcess
from test_admin import BIG, admin, admin_json, message, token_for

DSN = os.environ.get("MSGRELAY_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.mark.slow
def test_commands_beside_a_running_relay(tmp_path, users):
    """fsck finds nothing to do while the relay works, and user delete takes effect at once."""
    state = tmp_path / "state"
    relay = RelayProcess(state).start()
    try:
        client = SyncClient.connect(relay.url)
        alice, bob, carol = users[:3]
        for u in (alice, bob, carol):
            assert client.call("POST", "/api/v1/user", {"key": u.pem}).status == 200
        token = client.mint(alice)
        for _ in range(5):
            assert client.call("POST", "/api/v1/message", client.packet_envelope(alice, token)).status == 200
        fsck = admin("fsck", "-d", str(state))
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert admin_json("stats", "-d", str(state))["messages"] == 5
        assert len(client.fetch(alice)[1]) == 5
        for u in (bob, carol):
            assert client.fetch(u)[0].status == 200  # the relay now knows their keys
            assert admin("user", "delete", u.user_id, "--yes", "-d", str(state)).returncode == 0
        assert client.call("GET", f"/api/v1/user/{bob.user_id}").errno == 130
        # Another process erased them while the relay knew their keys: a fetch with a bad
        # signature is 130 (unknown user before signature, docs/protocol.md section 4), and so
        # is one signed with the known key, every time.
        forged = client.signed_params(alice, "GET", "/api/v1/message")
        forged["user_id"] = bob.user_id
        assert client.call("GET", "/api/v1/message", query=forged).errno == 130
        assert client.fetch(bob)[0].errno == 130
        assert client.fetch(carol)[0].errno == 130
        assert client.fetch(carol)[0].errno == 130
        # An acknowledgement takes the same one-store-call path: 130 too, forged or not.
        assert client.signed(bob, "DELETE", "/api/v1/message", ids=[]).errno == 130
        forged = client.signed_params(alice, "DELETE", "/api/v1/message", ids=[])
        forged["user_id"] = carol.user_id
        assert client.call("DELETE", "/api/v1/message", forged).errno == 130
        # Alice, whose key the relay knows too: a bad signature is 110, her own fetch works.
        forged = client.signed_params(bob, "GET", "/api/v1/message")
        forged["user_id"] = alice.user_id
        assert client.call("GET", "/api/v1/message", query=forged).errno == 110
        forged = client.signed_params(bob, "DELETE", "/api/v1/message", ids=[])
        forged["user_id"] = alice.user_id
        assert client.call("DELETE", "/api/v1/message", forged).errno == 110
        received = client.fetch(alice)[1]
        assert len(received) == 5
        ack = client.signed_params(alice, "DELETE", "/api/v1/message", ids=[m["id"] for m in received[:2]])
        assert client.call("DELETE", "/api/v1/message", ack).body == {"deleted": 2}
        assert client.call("DELETE", "/api/v1/message", ack).errno == 112  # the same request again
        assert len(client.fetch(alice)[1]) == 3
    finally:
        relay.stop()
    assert "Traceback" not in relay.log()


@pytest.fixture
def pg_config(tmp_path):
    """A relay config on a fresh schema of the test database (search_path in the DSN)."""
    schema = f"msgrelay_admin_{secrets.token_hex(6)}"
    with psycopg.connect(DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    dsn = make_conninfo(DSN, options=f"-csearch_path={schema}")
    (tmp_path / "state").mkdir()
    write_private_key(tmp_path / "state" / "server_key.pem",
                      rsa.generate_private_key(public_exponent=65537, key_size=2048))
    config = tmp_path / "relay.toml"
    config.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[store]\nbackend = "postgresql"\npostgres_dsn = {json.dumps(dsn)}\n')
    yield config, dsn
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def stock(dsn: str, alice, now: int, ttls: tuple[int, ...]) -> None:
    """`alice` registered on the store, with a token labelled "pal" and a message per ttl."""
    from msgrelay.store.interface import UserRecord

    core = PostgresCore(dsn)
    core.open()
    try:
        core.add_user(UserRecord(alice.user_id, alice.pem, None, now))
        token = token_for("s", now, label="pal")
        core.add_token(alice.user_id, token)
        for ttl in ttls:
            core.deliver(alice.user_id, secrets.token_hex(4), message(token, now, ttl), BIG, now)
    finally:
        core.close()


def test_postgres_store(pg_config, users):
    config, dsn = pg_config
    alice = users[0]
    stock(dsn, alice, int(time.time()), (3600, 3600, -5))
    stats = admin_json("stats", "-c", str(config))
    assert (stats["backend"], stats["users"], stats["messages"]) == ("postgresql", 1, 2)
    assert "password" not in stats["store"]
    shown = admin_json("user", "show", alice.user_id, "-c", str(config))
    assert shown["messages"] == 2 and shown["tokens"][0]["label"] == "pal"
    fsck = admin("fsck", "-c", str(config), "--json")
    assert fsck.returncode == 0, fsck.stderr
    report = json.loads(fsck.stdout)
    assert report["checked"]["schema_version"] >= 1
    assert [f["path"] for f in report["findings"]] == ["postgresql:messages", "postgresql:dedup"]
    assert not any(f["damage"] for f in report["findings"])
    assert admin_json("expire", "-c", str(config))["expired"] == {"messages": 1, "dedup": 1, "tokens": 0, "replay": 0}
    assert admin("user", "delete", alice.user_id, "--yes", "-c", str(config)).returncode == 0
    assert admin_json("stats", "-c", str(config))["users"] == 0


def test_postgres_fsck_checks_and_recounts_the_quota_counters(pg_config, users):
    config, dsn = pg_config
    alice = users[0]
    stock(dsn, alice, int(time.time()), (3600, 3600, 3600))
    assert admin("fsck", "-c", str(config)).returncode == 0
    with psycopg.connect(dsn, autocommit=True) as conn:  # a drift, as a relay of schema 2 beside one of 3 makes
        conn.execute("UPDATE users SET pending_messages = 1, pending_bytes = 5")
    dry = admin("fsck", "--dry-run", "-c", str(config))
    assert dry.returncode == 1 and f"postgresql:users/{alice.user_id}: counters say 1 message(s), 5 bytes" in dry.stdout
    assert "left as is (--dry-run)" in dry.stdout
    repaired = admin("fsck", "-c", str(config), "--json")
    assert repaired.returncode == 1
    [finding] = [f for f in json.loads(repaired.stdout)["findings"] if f["path"].startswith("postgresql:users/")]
    assert finding["damage"] and finding["action"] == "recounted from the rows"
    assert admin("fsck", "-c", str(config)).returncode == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT pending_messages FROM users").fetchall() == [(3,)]


def test_postgres_unreachable_is_one_line(tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text('[store]\nbackend = "postgresql"\n'
                      'postgres_dsn = "postgresql://nobody:hunter2@127.0.0.1:1/none?connect_timeout=2"\n')
    result = admin("stats", "-c", str(config))
    assert result.returncode == 1
    assert result.stderr.startswith("msgrelay-admin: error: PostgreSQL") and "hunter2" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
