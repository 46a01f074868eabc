"""Two real relay processes serving one relay from one PostgreSQL database."""

from __future__ import annotations

import os
import uuid

import psycopg
import pytest

from apiclient import SyncClient
from relayproc import RelayProcess

pytestmark = pytest.mark.slow

BASE_DSN = os.environ.get("MSGRELAY_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def database():
    """A fresh database for this test, dropped afterwards."""
    name = f"msgrelay_e2e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(BASE_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield psycopg.conninfo.make_conninfo(BASE_DSN, dbname=name)
    with psycopg.connect(BASE_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_two_processes_share_users_messages_and_the_replay_cache(tmp_path, users, database):
    from cryptography.hazmat.primitives.asymmetric import rsa
    from msgrelay.serverkey import write_private_key

    key_file = tmp_path / "server_key.pem"
    write_private_key(key_file, rsa.generate_private_key(public_exponent=65537, key_size=3072))
    config = tmp_path / "msgrelay.toml"
    config.write_text(
        f'[server]\nkey_file = "{key_file}"\n[store]\nbackend = "postgresql"\npostgres_dsn = "{database}"\n'
    )
    first = RelayProcess(tmp_path / "one", extra_args=["--config", str(config)]).start()
    second = RelayProcess(tmp_path / "two", extra_args=["--config", str(config)]).start()
    try:
        one, two = SyncClient.connect(first.url), SyncClient.connect(second.url)
        assert one.server_key.public_numbers() == two.server_key.public_numbers()
        alice = users[0]
        assert one.call("POST", "/api/v1/user", {"key": alice.pem}).status == 200
        token = two.mint(alice)
        sent = one.call("POST", "/api/v1/message", one.packet_envelope(alice, token, packet_id="p1"))
        again = two.call("POST", "/api/v1/message", two.packet_envelope(alice, token, packet_id="p1"))
        assert sent.status == 200 and again.body == sent.body  # dedup across processes

        params = two.signed_params(alice, "GET", "/api/v1/message")
        fetched = two.call("GET", "/api/v1/message", query=params)
        assert fetched.status == 200 and fetched.body["count"] == 1
        replayed = one.call("GET", "/api/v1/message", query=params)
        assert (replayed.status, replayed.errno) == (401, 112)

        _, messages = one.fetch(alice)
        assert [m["id"] for m in messages] == [sent.body["message_id"]]
        assert two.signed(alice, "DELETE", "/api/v1/message", ids=[messages[0]["id"]]).body == {"deleted": 1}
        assert one.fetch(alice)[1] == []
        assert one.call("GET", "/api/v1/health").body == {"status": "ok"}

        # Both processes know alice's key now, the first bob's too; they erase their accounts
        # through the second. The first, which skips the user lookup for a known key, still
        # answers 130, for a bad signature too (the user is checked first).
        bob = users[1]
        assert one.call("POST", "/api/v1/user", {"key": bob.pem}).status == 200
        assert one.fetch(bob)[0].status == 200
        for user in (alice, bob):
            assert two.signed(user, "DELETE", "/api/v1/user").status == 200
        assert one.fetch(bob)[0].errno == 130
        forged = one.signed_params(bob, "GET", "/api/v1/message")
        forged["user_id"] = alice.user_id
        assert one.call("GET", "/api/v1/message", query=forged).errno == 130
        assert two.fetch(alice)[0].errno == 130  # the process that erased her forgot her key
        assert one.fetch(alice)[0].errno == 130
    finally:
        first.stop()
        second.stop()
    for relay in (first, second):
        assert "Traceback" not in relay.log()
        assert "postgres://" not in relay.log() and "postgresql://" not in relay.log()


def test_unreachable_database_stops_startup_with_one_line(tmp_path):
    import subprocess
    from relayproc import free_port, twistd_path

    config = tmp_path / "msgrelay.toml"
    config.write_text(f'[store]\nbackend = "postgresql"\npostgres_dsn = "postgresql://postgres:secret@127.0.0.1:{free_port()}/x"\n')
    result = subprocess.run(
        [twistd_path(), "--nodaemon", "--pidfile=", "msgrelay", "--config", str(config), "--state-dir", str(tmp_path / "s")],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1, output
    assert len(output.splitlines()) == 1 and "PostgreSQL" in output and "Traceback" not in output
    assert "secret" not in output
