"""Two real `twistd msgrelay` processes serving relay a.test from one PostgreSQL database,
forwarding over verified TLS to a real relay b.test that comes and goes: their shared outbox
delivers every packet exactly once, in order, and a process killed with packets queued
leaves them to the other. Deadlines are polled, never slept."""

from __future__ import annotations

import json
import re
import signal
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any, Optional

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from apiclient import SyncClient
from relayproc import RelayProcess
from test_federation_e2e import admin, texts, wait_for
from test_federation_fakes import tls_listener
from test_postgres_relay import database  # noqa: F401 (fixture: a fresh database per test)

pytestmark = pytest.mark.slow


class Setup:
    """Relay b.test (maildir, TLS under a test CA) and two processes of a.test on one database."""

    def __init__(self, tmp_path: Path, dsn: str):
        from msgrelay.serverkey import write_private_key

        self.tmp = tmp_path
        self.b_port, self.b_listen, ca = tls_listener(tmp_path / "tls", "localhost")
        (tmp_path / "ca.pem").write_bytes(ca)
        key_file = tmp_path / "a_key.pem"
        write_private_key(key_file, rsa.generate_private_key(public_exponent=65537, key_size=2048))
        self.config = tmp_path / "a.toml"
        self.config.write_text(
            f'[server]\nkey_file = "{key_file}"\n'
            f'[store]\nbackend = "postgresql"\npostgres_dsn = "{dsn}"\n'
            f'[federation]\nmode = "allowlist"\nca_file = "{tmp_path / "ca.pem"}"\n'
            f'peers = ["b.test=https://localhost:{self.b_port}"]\n'
            "backoff_min = 1\nbackoff_max = 2\ntimeout = 2\npoll_interval = 1\n")
        self.started: list[RelayProcess] = []
        self.b_http_port: Optional[int] = None

    def b(self) -> RelayProcess:
        relay = RelayProcess(self.tmp / "b", "b.test", port=self.b_http_port,  # plain http for the test client
                             extra_args=["--listen", self.b_listen])
        self.b_http_port = relay.port
        self.started.append(relay)
        return relay.start()

    def b_with_user(self, user: Any) -> tuple[RelayProcess, SyncClient, Any, str]:
        """Relay b started, with `user` registered there and a token for sending to them."""
        b = self.b()
        client = SyncClient.connect(b.url)
        assert client.call("POST", "/api/v1/user", {"key": user.pem}).status == 200
        return b, client, user, client.mint(user)

    def a(self, name: str, config: Optional[Path] = None) -> RelayProcess:
        relay = RelayProcess(self.tmp / name, "a.test", extra_args=["--config", str(config or self.config)])
        self.started.append(relay)
        return relay.start()

    def queue_list(self, state_dir: str) -> dict[str, Any]:
        result = admin("queue", "list", "--json", "--config", str(self.config), "--state-dir",
                       str(self.tmp / state_dir))
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    def __enter__(self) -> "Setup":
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        """Stop every relay started; after a test that passed, none may have logged a traceback."""
        for relay in self.started:
            relay.stop()
        if kind is None:
            for relay in self.started:
                assert "Traceback" not in relay.log()


def sender(relay: RelayProcess, user: Any, token: Any):
    client = SyncClient.connect(relay.url)

    def send(text: str) -> None:
        envelope = client.packet_envelope(user, token, body=json.dumps({"text": text}).encode(),
                                          user_id=f"{user.user_id}@b.test")
        answer = client.call("POST", "/api/v1/message", envelope)
        assert answer.status == 200, answer.body
    return send


def delivered(*relays: RelayProcess) -> int:
    return sum(line.count("federation: delivered") for relay in relays for line in relay.log().splitlines())


def posts_accepted(b: RelayProcess) -> int:
    return sum("POST /api/v1/message 200" in line for line in b.log().splitlines())


def test_two_processes_share_the_queue_while_the_peer_comes_and_goes(tmp_path, users, database):  # noqa: F811
    with Setup(tmp_path, database) as setup:
        b, client_b, bob, token = setup.b_with_user(users[1])
        one, two = setup.a("one"), setup.a("two")
        via_one, via_two = sender(one, bob, token), sender(two, bob, token)

        via_one("m0")
        via_two("m1")
        wait_for(lambda: texts(client_b, bob) == ["m0", "m1"], timeout=30)

        b.stop()
        for n in range(2, 10):  # alternately through each process: one queue, in this order
            (via_one if n % 2 else via_two)(f"m{n}")
        listed = wait_for(lambda: (lambda rows: rows if rows and rows[0]["queued"] == 8
                                   and rows[0]["failures"] else None)(setup.queue_list("one")["destinations"]),
                          timeout=30)
        assert listed[0]["destination"] == "b.test" and "refused" in listed[0]["last_error"].lower()
        document = setup.queue_list("two")
        assert document["source"] == "database" and document["running"] is True
        assert document["pid"] == two.proc.pid

        b = setup.b()
        expected = [f"m{n}" for n in range(10)]
        wait_for(lambda: texts(client_b, bob) == expected, timeout=60)
        wait_for(lambda: setup.queue_list("one")["destinations"][0]["queued"] == 0, timeout=30)
        assert delivered(one, two) == 10  # across both processes, each packet sent once
        assert posts_accepted(b) == 10  # ... and b took each once (both of its runs log to one file)
        assert setup.queue_list("one")["destinations"][0]["failures"] == 0


def test_packets_of_a_killed_process_are_delivered_by_the_other(tmp_path, users, database):  # noqa: F811
    with Setup(tmp_path, database) as setup:
        b, client_b, bob, token = setup.b_with_user(users[1])
        b.stop()
        one, two = setup.a("one"), setup.a("two")
        send = sender(one, bob, token)
        for n in range(4):
            send(f"k{n}")
        wait_for(lambda: setup.queue_list("one")["destinations"][0]["failures"], timeout=30)
        one.stop(signal.SIGKILL)
        retry = admin("queue", "retry-now", "b.test", "--config", str(setup.config), "--state-dir",
                      str(tmp_path / "two"))
        assert retry.returncode == 0 and "running relay is retrying b.test now (4 queued" in retry.stdout, \
            retry.stdout + retry.stderr
        b = setup.b()
        # (if "one" died in the middle of an attempt, its claim runs out first: 2 * timeout + 10 s)
        wait_for(lambda: delivered(two) >= 4, timeout=60)
        assert texts(client_b, bob) == ["k0", "k1", "k2", "k3"]
        assert delivered(two) == 4 and delivered(one) == 0
        assert posts_accepted(b) == 4  # its second run; the first took none
        wait_for(lambda: setup.queue_list("two")["destinations"][0]["queued"] == 0, timeout=30)


def queue_gauges(relay: RelayProcess, token: str) -> dict[str, float]:
    """The relay's /metrics federation samples for b.test: {metric name: value}."""
    request = urllib.request.Request(relay.url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    return {m[0]: float(m[1]) for m in re.findall(r'^(msgrelay_federation_\w+)\{destination="b.test"\} (\S+)$',
                                                   text, re.MULTILINE)}


def failing(relay: RelayProcess, token: str) -> Optional[dict[str, float]]:
    """The gauges once they show a failed attempt."""
    gauges = queue_gauges(relay, token)
    return gauges if gauges.get("msgrelay_federation_queue_failures") else None


def test_both_processes_report_the_shared_queue_in_their_metrics(tmp_path, users, database):  # noqa: F811
    setup = Setup(tmp_path, database)
    token = "scrape-token"
    with setup.config.open("a") as config:
        config.write(f'[metrics]\ntoken = "{token}"\n')
    # "two" never polls the shared outbox: what it knows of the queue is only what /metrics reads.
    deaf = tmp_path / "a-deaf.toml"
    deaf.write_text(setup.config.read_text().replace("poll_interval = 1", "poll_interval = 3600"))
    with setup:
        b, client_b, bob, token_b = setup.b_with_user(users[1])
        b.stop()
        one, two = setup.a("one"), setup.a("two", deaf)
        send = sender(one, bob, token_b)
        for n in range(3):
            send(f"q{n}")
        for relay in (one, two):
            gauges = wait_for(partial(failing, relay, token), timeout=30)
            assert gauges["msgrelay_federation_queue_messages"] == 3
            assert gauges["msgrelay_federation_queue_oldest_age_seconds"] >= 0
            assert "msgrelay_federation_backoff_seconds" in gauges
        assert "POST /api/v1/message" not in two.log()  # two accepted nothing itself
        setup.b()
        wait_for(lambda: texts(client_b, bob) == ["q0", "q1", "q2"], timeout=60)
        for relay in (one, two):
            wait_for(lambda: queue_gauges(relay, token) == {  # noqa: B023
                "msgrelay_federation_queue_messages": 0, "msgrelay_federation_queue_oldest_age_seconds": 0,
                "msgrelay_federation_backoff_seconds": 0, "msgrelay_federation_queue_failures": 0}, timeout=30)


def test_retry_now_without_a_running_relay_sends_from_the_command(tmp_path, users, database):  # noqa: F811
    with Setup(tmp_path, database) as setup:
        b, client_b, bob, token = setup.b_with_user(users[1])
        b.stop()
        one = setup.a("one")
        send = sender(one, bob, token)
        send("r0")
        send("r1")
        one.stop()
        listed = setup.queue_list("one")
        assert listed["running"] is False and listed["destinations"][0]["queued"] == 2
        assert listed["destinations"][0]["holder"] is None  # a stopped relay gave its claims up
        b = setup.b()
        result = admin("queue", "retry-now", "b.test", "--config", str(setup.config), "--state-dir",
                       str(tmp_path / "one"))
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("no relay answers on this host's control socket: delivered 2")
        assert texts(client_b, bob) == ["r0", "r1"]
        assert setup.queue_list("one")["destinations"][0]["queued"] == 0
