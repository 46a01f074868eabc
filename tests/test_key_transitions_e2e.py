"""Key rotation that locks nobody out (issue 11): real relays, the real client and admin commands.

A client pinned to an old relay key follows the chain of key transitions the relay lists;
a forged transition is refused loudly, exactly like a key change without any transition.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from msgrelay.serverkey import read_private_key, write_private_key
from msgrelay.wire.keys import fingerprint, public_key_pem
from msgrelay.wire.transitions import Transition, sign_transition
from relayproc import free_port
from test_client_e2e import Person, introduce, start_relay

pytestmark = pytest.mark.slow
ADMIN = str(Path(sys.executable).with_name("msgrelay-admin"))


def server_info(url: str) -> dict:
    with urllib.request.urlopen(url + "/api/v1/server", timeout=10) as response:
        return json.load(response)


def wait_for_key(url: str, wanted: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = server_info(url)
        if info["fingerprint"] == wanted:
            return info
        time.sleep(0.2)
    raise AssertionError(f"the relay did not switch to key {wanted} in time")


def rotate(state: Path) -> dict:
    done = subprocess.run([ADMIN, "rotate-key", "--state-dir", str(state), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_rotate_twice_and_a_client_pinned_to_the_first_key_follows_both_steps(tmp_path):
    port = free_port()
    state = tmp_path / "state"
    relay = start_relay(state, port=port)
    try:
        alice = Person(tmp_path / "config", "alice").init(relay.url)
        bob = Person(tmp_path / "config", "bob").init(relay.url)
        introduce(alice, bob)
        first = alice.info["server_fingerprint"]
        one, two = rotate(state), rotate(state)
        assert one["previous"]["fingerprint"] == first
        info = wait_for_key(relay.url, two["fingerprint"])  # key_check_interval: 5 s by default
        assert [(t["from"], t["to"]) for t in info["key_transitions"]] == [
            (first, one["fingerprint"]), (one["fingerprint"], two["fingerprint"])]

        sent = alice.run("send", "bob", "after two rotations")
        lines = [line for line in sent.err.splitlines() if "rotated its key" in line]
        assert len(lines) == 1 and first in lines[0] and two["fingerprint"] in lines[0], sent.err
        assert "2 key transitions" in lines[0]
        assert alice.info["server_fingerprint"] == two["fingerprint"]
        records, fetched = bob.fetch()
        assert records[-1]["text"] == "after two rotations"
        assert bob.info["server_fingerprint"] == two["fingerprint"] and "rotated its key" in fetched.err
        again = alice.run("fetch")  # pinned to the current key now: nothing more to say
        assert "rotated its key" not in again.err
    finally:
        relay.stop()
    # The transitions outlive the process (and the retired private keys).
    relay = start_relay(state, port=port)
    try:
        assert [t["to"] for t in server_info(relay.url)["key_transitions"]] == [one["fingerprint"], two["fingerprint"]]
    finally:
        relay.stop()


def test_forged_transition_is_refused_and_trust_fingerprint_confirms(tmp_path):
    port = free_port()
    state = tmp_path / "state"
    relay = start_relay(state, port=port)
    try:
        alice = Person(tmp_path / "config", "alice").init(relay.url)
    finally:
        relay.stop()
    pinned = alice.info["server_fingerprint"]
    old_pem = public_key_pem(read_private_key(state / "server_key.pem").public_key())
    # An attacker who does not hold the pinned key installs its own key and "transitions" to it.
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    write_private_key(state / "server_key.pem", attacker)
    new = fingerprint(attacker.public_key())
    signed = sign_transition(attacker, attacker.public_key(), "relay.test", time.time())
    forged = [
        Transition(pinned, new, signed.from_key, signed.date, signed.signature),  # someone else's from_key
        Transition(pinned, new, old_pem, signed.date, signed.signature),  # the pinned key, a signature by another
    ]
    (state / "key_transitions.json").write_text(json.dumps({"transitions": [t.to_json() for t in forged]}))
    relay = start_relay(state, port=port)
    try:
        assert len(server_info(relay.url)["key_transitions"]) == 2
        refused = alice.run("fetch", expect=5)
        assert "THE RELAY'S KEY HAS CHANGED" in refused.err and "no valid chain of key transitions" in refused.err
        assert alice.info["server_fingerprint"] == pinned
        trusted = alice.run("--trust-fingerprint", new, "fetch")
        assert f"--trust-fingerprint: now pinned the relay key {new}" in trusted.err and pinned in trusted.err
        same = alice.run("--trust-fingerprint", new, "fetch")
        assert "already pinned; nothing changed" in same.err
    finally:
        relay.stop()


def test_a_peer_pinned_to_the_old_key_keeps_delivering_after_the_rotation(tmp_path, users):
    """Real TLS federation: a pins c's key; c rotates (old key refused at once); a follows the chain."""
    from apiclient import SyncClient
    from test_federation_e2e import Network, texts, wait_for  # a delivers to c over verified TLS only

    net = Network(tmp_path)
    c = net.relay("c").start()
    old_pin = server_info(c.url)["fingerprint"]  # c also listens on plain loopback http for the test
    a = net.a(old_pin).start()
    try:
        client_a, client_c = SyncClient.connect(a.url), SyncClient.connect(c.url)
        carol = users[2]
        assert client_c.call("POST", "/api/v1/user", {"key": carol.pem}).status == 200
        token = client_c.mint(carol)

        def send(text: str) -> None:
            envelope = client_a.packet_envelope(carol, token, body=json.dumps({"text": text}).encode(),
                                                user_id=f"{carol.user_id}@c.test")
            answer = client_a.call("POST", "/api/v1/message", envelope)
            assert answer.status == 200, answer.body

        send("before")
        wait_for(lambda: texts(client_c, carol) == ["before"])
        rotated = subprocess.run([ADMIN, "rotate-key", "--state-dir", str(tmp_path / "c"), "--grace-period", "0",
                                  "--json"], capture_output=True, text=True, timeout=120)
        assert rotated.returncode == 0, rotated.stderr
        new = json.loads(rotated.stdout)["fingerprint"]
        wait_for_key(c.url, new)
        send("after")  # a's cached key is c's old one: c answers 103, a fetches again and follows
        wait_for(lambda: texts(client_c, carol) == ["before", "after"], timeout=30)
    finally:
        a.stop()
        c.stop()
    log = a.log()
    assert "c.test rotated its key: the pin follows 1 verified key transition(s)" in log
    assert old_pin in log and new in log and "NOT delivering" not in log
