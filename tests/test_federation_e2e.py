"""Three real `twistd msgrelay` processes on one machine, federating over verified TLS
(test CAs made with cryptography at test time), with the real `msgrelay-admin queue`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from apiclient import SyncClient, sync_request
from msgrelay.wire.envelope import open_envelope
from relayproc import RelayProcess, free_port
from test_federation_fakes import tls_listener

pytestmark = pytest.mark.slow


def admin(*args: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("msgrelay-admin")), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def queues(state_dir: Path) -> dict[str, Any]:
    result = admin("queue", "list", "--json", "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.1)


class Network:
    """TLS listeners for relays b and c under one private test CA, which a trusts; the config files.

    (One CA for the whole network: tlsfiles gives every CA the same subject name, so two of
    them in one bundle would make OpenSSL pick an issuer by name and fail.)
    """

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.tls: dict[str, tuple[int, str]] = {}
        port, listen, ca = tls_listener(tmp_path / "tls", "localhost")
        self.tls["b"] = (port, listen)
        other = free_port()
        self.tls["c"] = (other, listen.replace(f"ssl:{port}:", f"ssl:{other}:"))
        (tmp_path / "peers-ca.pem").write_bytes(ca)
        (tmp_path / "a.toml").write_text(
            f'[federation]\nmode = "allowlist"\nca_file = "{tmp_path / "peers-ca.pem"}"\n'
            "backoff_min = 1\nbackoff_max = 2\n")

    def relay(self, name: str, port: int = 0) -> RelayProcess:
        extra = ["--listen", self.tls[name][1]] if name in self.tls else []
        return RelayProcess(self.tmp / name, f"{name}.test", port=port or None, extra_args=extra)

    def a(self, c_pin: str, port: int = 0) -> RelayProcess:
        return RelayProcess(self.tmp / "a", "a.test", port=port or None, extra_args=[
            "--config", str(self.tmp / "a.toml"),
            "--peer", f"b.test=https://localhost:{self.tls['b'][0]}",
            "--peer", f"c.test=https://localhost:{self.tls['c'][0]}#{c_pin}",
        ])


def texts(client: SyncClient, user: Any) -> list[str]:
    answer, messages = client.fetch(user, limit=1000)
    assert answer.status == 200, answer.body
    return [json.loads(open_envelope([user.key], m))["text"] for m in messages]


def test_three_relays_queue_survive_restarts_and_deliver_in_order_exactly_once(tmp_path, users):
    net = Network(tmp_path)
    b, c = net.relay("b").start(), net.relay("c").start()
    c_pin = sync_request("GET", c.url + "/api/v1/server").body["fingerprint"]
    a = net.a(c_pin).start()
    started = [a, b, c]
    try:
        client_a, client_b, client_c = SyncClient.connect(a.url), SyncClient.connect(b.url), SyncClient.connect(c.url)
        bob, carol = users[1], users[2]
        assert client_b.call("POST", "/api/v1/user", {"key": bob.pem}).status == 200
        assert client_c.call("POST", "/api/v1/user", {"key": carol.pem}).status == 200
        to_bob, to_carol = client_b.mint(bob), client_c.mint(carol)

        def send(user: Any, server: str, token: str, text: str) -> None:
            envelope = client_a.packet_envelope(user, token, body=json.dumps({"text": text}).encode(),
                                                user_id=f"{user.user_id}@{server}")
            answer = client_a.call("POST", "/api/v1/message", envelope)
            assert answer.status == 200, answer.body

        # A forwards to B and to C.
        send(bob, "b.test", to_bob, "b0")
        send(bob, "b.test", to_bob, "b1")
        send(carol, "c.test", to_carol, "c0")
        assert wait_for(lambda: texts(client_b, bob) == ["b0", "b1"])
        assert wait_for(lambda: texts(client_c, carol) == ["c0"])

        # B stores a packet before A hears B's answer and dequeues it: wait for A's queues to
        # empty, so that exactly the five packets below are queued while B is down.
        assert wait_for(lambda: all(r["queued"] == 0 for r in queues(tmp_path / "a")["destinations"]))
        # B is stopped: A keeps queuing for B, and C still receives at once.
        b.stop()
        for n in range(2, 7):
            send(bob, "b.test", to_bob, f"b{n}")
        send(carol, "c.test", to_carol, "c1")
        wait_for(lambda: texts(client_c, carol) == ["c0", "c1"])
        def b_row() -> dict[str, Any]:
            listed = queues(tmp_path / "a")
            assert listed["running"] is True and listed["pid"] == a.proc.pid
            return next(r for r in listed["destinations"] if r["destination"] == "b.test")

        row = wait_for(lambda: (lambda r: r if r.get("failures") else None)(b_row()), timeout=5)
        assert row["queued"] == 5 and row["state"] in ("backing-off", "sending") and row["pinned_ok"] is True
        assert "refused" in row["last_error"].lower()

        # A is killed with packets queued, and restarted: nothing is lost.
        a.kill()
        stopped = queues(tmp_path / "a")
        assert stopped["running"] is False
        assert [(r["destination"], r["queued"]) for r in stopped["destinations"]] == [("b.test", 5), ("c.test", 0)]
        a = net.a(c_pin, port=a.port).start()
        started[0] = a
        send(bob, "b.test", to_bob, "b7")
        retry = admin("queue", "retry-now", "b.test", "--state-dir", str(tmp_path / "a"))
        assert retry.returncode == 0 and "running relay is retrying b.test now (6 queued)" in retry.stdout, \
            retry.stdout + retry.stderr

        # B comes back and receives everything, in order, exactly once.
        b = net.relay("b", port=b.port).start()
        started[1] = b
        expected = [f"b{n}" for n in range(8)]
        wait_for(lambda: texts(client_b, bob) == expected)
        _, messages = client_b.fetch(bob, limit=1000)
        acked = client_b.signed(bob, "DELETE", "/api/v1/message", ids=[m["id"] for m in messages])
        assert acked.body == {"deleted": 8}
        wait_for(lambda: all(r["queued"] == 0 for r in queues(tmp_path / "a")["destinations"]))
        # One more packet: B's queue is delivered in order, one request at a time, so a resend
        # of any earlier packet would arrive before this one.
        send(bob, "b.test", to_bob, "b8")
        wait_for(lambda: texts(client_b, bob) == ["b8"])
        def delivered_to_b() -> int:  # both runs of A, same log file
            return sum("federation: delivered" in x and "to b.test" in x for x in a.log().splitlines())

        wait_for(lambda: delivered_to_b() >= 9)  # A logs once B has answered
        assert delivered_to_b() == 9  # B was sent each packet once, never again
        log = a.log()
        assert "resuming 5 queued packets" in log
        assert to_bob not in log and "BEGIN PUBLIC KEY" not in log
    finally:
        for relay in started:
            relay.stop()


def test_retry_now_on_a_stopped_relay_delivers_from_the_command(tmp_path, users):
    net = Network(tmp_path)
    b = net.relay("b").start()
    c = net.relay("c").start()
    c_pin = sync_request("GET", c.url + "/api/v1/server").body["fingerprint"]
    c.stop()
    a = net.a(c_pin).start()
    try:
        client_a, client_b = SyncClient.connect(a.url), SyncClient.connect(b.url)
        bob = users[1]
        client_b.call("POST", "/api/v1/user", {"key": bob.pem})
        token = client_b.mint(bob)
        b.stop()
        envelope = client_a.packet_envelope(bob, token, body=b'{"text": "late"}', user_id=f"{bob.user_id}@b.test")
        assert client_a.call("POST", "/api/v1/message", envelope).status == 200
    finally:
        a.stop()
    b = net.relay("b", port=b.port).start()
    try:
        result = admin("queue", "retry-now", "b.test", "--state-dir", str(tmp_path / "a"), "--config",
                       str(tmp_path / "a.toml"), "--peer", f"b.test=https://localhost:{net.tls['b'][0]}")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "relay not running: delivered 1" in result.stdout
        assert texts(SyncClient.connect(b.url), bob) == ["late"]
        assert admin("queue", "retry-now", "b.test", "--state-dir", str(tmp_path / "a")).stdout.startswith(
            "nothing is queued for b.test")
    finally:
        b.stop()
