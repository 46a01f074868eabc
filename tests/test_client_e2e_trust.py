"""The real `msgrelay-client` against a real `twistd msgrelay`: what the client refuses.

Forged, replayed and hostile messages, changed keys (a contact's, the relay's), a token used
by the wrong key, and a relay behind a private CA. The people, the relay fixture and the
helpers are test_client_e2e.py's; the tests are in a file of their own so that the parallel
workers share the long end-to-end runs (pytest.ini).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from relayproc import RelayProcess, free_port
from test_client_e2e import (  # noqa: F401  (`relay`, `person`: the fixtures)
    Person, introduce, person, relay, start_relay, stored_messages, tamper_stored,
)

pytestmark = pytest.mark.slow


LIBRARY_PRELUDE = """
import json, sys
from cryptography.hazmat.primitives import serialization
from twisted.internet.task import react
from msgrelay.client.api import RelayClient
from msgrelay.client.errors import RelayError
from msgrelay.client.identity import Identity
from msgrelay.client.messages import RAW_MESSAGE, build_message, seal_message, text_data
from msgrelay.wire.dates import format_date
from msgrelay.wire.keys import load_public_key
from msgrelay.wire.signing import sign_params

alice_dir, url = sys.argv[1], sys.argv[2]
config = json.load(open(alice_dir + "/config.json"))
bob = json.load(open(alice_dir + "/contacts.json"))["contacts"]["bob"]
key = serialization.load_pem_private_key(open(alice_dir + "/key.pem", "rb").read(), None)
me = Identity(key, config["server_name"])

def packet(packet_id, message):
    return {"id": packet_id, "user_id": bob["address"], "token": bob["token"],
            **seal_message(load_public_key(bob["key_pem"]), message)}
"""


def run_as_alice(alice: Person, relay: RelayProcess, body: str) -> str:
    done = subprocess.run([sys.executable, "-c", LIBRARY_PRELUDE + body, str(alice.path), relay.url],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_forged_signature_is_reported_not_shown(person, relay):
    """A message that decrypts fine but whose signed content was altered before sealing."""
    alice, bob = person("alice"), person("bob")
    introduce(alice, bob)
    run_as_alice(alice, relay, """
message = build_message(me, bob["address"], RAW_MESSAGE, text_data("pay 10 EUR", None))
message["data"]["content"] = "pay 10000 EUR"

async def main(reactor):
    api = RelayClient(url, reactor=reactor)
    await api.send_packet(packet("forged-1", message))
    await api.close()

react(main)
""")
    shown = bob.run("fetch", expect=6)
    assert "10000" not in shown.out and "REJECTED" in shown.err
    assert "signature does not verify" in shown.err


def test_second_copy_of_a_signed_message_is_shown_once(person, relay):
    """Two packets (two relay ids) carrying the same signed message: shown and stored once."""
    alice, bob = person("alice"), person("bob")
    introduce(alice, bob)
    run_as_alice(alice, relay, """
message = build_message(me, bob["address"], RAW_MESSAGE, text_data("only once", None))

async def main(reactor):
    api = RelayClient(url, reactor=reactor)
    await api.send_packet(packet("copy-1", message))
    await api.send_packet(packet("copy-2", message))
    await api.close()

react(main)
""")
    records, _ = bob.fetch()
    assert [r["text"] for r in records] == ["only once"]
    assert bob.run("fetch").out.strip() == "no new messages"


def test_a_replayed_signed_request_is_refused(person, relay):
    """The client signs every request afresh; the same signature twice is errno 112."""
    alice, bob = person("alice"), person("bob")
    introduce(alice, bob)
    out = run_as_alice(alice, relay, """
async def main(reactor):
    api = RelayClient(url, reactor=reactor, identity=me)
    info = await api.server_info()
    params = {"user_id": me.user_id, "date": format_date(__import__("time").time()), "validity": 60, "ids": []}
    signed = sign_params(key, params, "DELETE", "/api/v1/message", info.name)
    await api._call("DELETE", "/api/v1/message", body=signed)
    try:
        await api._call("DELETE", "/api/v1/message", body=signed)
    except RelayError as e:
        print(e.errno, e)
    await api.acknowledge([])
    await api.acknowledge([])
    await api.close()

react(main)
""")
    assert out.startswith("112 ") and "errno 112" in out


def test_changed_contact_key_is_refused(person, tmp_path):
    alice, bob = person("alice"), person("bob")
    introduce(alice, bob)
    pinned = alice.contacts()["bob"]["fingerprint"]
    # Bob starts over with a new key, and his new invite reaches Alice.
    bob2 = Person(tmp_path / "elsewhere", "bob").init(alice.info["server_url"])
    refused = alice.run("contact", "add", "bob", bob2.run("invite").out.strip(), expect=5)
    assert "CONTACT KEY CHANGED" in refused.err and pinned in refused.err
    assert alice.contacts()["bob"]["fingerprint"] == pinned
    replaced = alice.run("contact", "add", "--replace", "bob", bob2.run("invite").out.strip())
    assert bob2.info["fingerprint"] in replaced.out


def test_token_given_to_a_contact_used_by_another_key_is_refused(person):
    alice, bob, mallory = person("alice"), person("bob"), person("mallory")
    introduce(alice, bob)
    alice.run("send", "bob", "hi")
    bob.fetch()
    stolen = bob.contacts()["alice"]["token"]  # the token Alice minted for Bob
    mallory.run("contact", "add", "alice", f"msgrelay:{alice.address}?token={stolen}")
    mallory.run("send", "alice", "it is me, Bob, on a new phone")
    shown = alice.run("fetch", expect=6)
    assert "new phone" not in shown.out
    assert shown.err.count("KEY MISMATCH") == 2 and "token you gave bob" in shown.err
    assert set(alice.contacts()) == {"bob"}


def test_relay_key_change_is_refused_until_trusted(tmp_path):
    port = free_port()
    state = tmp_path / "state"
    relay = start_relay(state, port=port)
    try:
        alice = Person(tmp_path / "config", "alice").init(relay.url)
        old = alice.info["server_fingerprint"]
    finally:
        relay.stop()
    (state / "server_key.pem").unlink()  # the relay makes a new key at start
    relay = start_relay(state, port=port)
    try:
        refused = alice.run("fetch", expect=5)
        assert "THE RELAY'S KEY HAS CHANGED" in refused.err and old in refused.err
        new = refused.err.split("--trust-fingerprint ")[1].split()[0]
        assert new != old
        alice.run("--trust-fingerprint", "ab" * 32, "fetch", expect=5)
        alice.run("--trust-fingerprint", new, "fetch")
        assert alice.info["server_fingerprint"] == new
        alice.run("fetch")  # pinned now
    finally:
        relay.stop()


def test_https_with_a_private_ca(tmp_path):
    from tlsfiles import make_ca_and_server_cert

    _, key_path, cert_path = make_ca_and_server_cert(tmp_path, "relay.test")
    port = free_port()
    relay = start_relay(
        tmp_path / "state", port=port, scheme="https",
        listen=f"ssl:{port}:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}",
    )
    try:
        alice, bob = Person(tmp_path / "config", "alice"), Person(tmp_path / "config", "bob")
        untrusted = alice.run("init", "--server", relay.url, expect=3)
        assert "cannot reach the relay" in untrusted.err and "certificate verify failed" in untrusted.err
        assert not (alice.path / "config.json").exists()
        wrong_host = alice.run("--ca", str(tmp_path / "ca.pem"), "init", "--server", f"https://localhost:{port}", expect=3)
        assert "TLS" in wrong_host.err
        alice.run("--ca", str(tmp_path / "ca.pem"), "init", "--server", relay.url)
        bob.run("--ca", str(tmp_path / "ca.pem"), "init", "--server", relay.url)
        introduce(alice, bob)  # the CA file is remembered by the profile
        alice.run("send", "bob", "over TLS")
        records, _ = bob.fetch()
        assert records[-1]["text"] == "over TLS"
    finally:
        relay.stop()


def test_one_bad_message_never_blocks_the_mailbox(person, relay):
    """Issue 9: whatever one message holds, fetch sets it aside with one line, stores and
    acknowledges the rest, and acknowledges the bad one too. Bad messages reach the store
    as a relay before revision 2 (or a hostile one) would keep them, and from a hostile sender."""
    alice, bob = person("alice"), person("bob")
    introduce(alice, bob)
    for text in ("one", "two", "three", "four", "five"):
        alice.run("send", "bob", text)
    run_as_alice(alice, relay, """
from msgrelay.wire.envelope import seal
async def main(reactor):
    api = RelayClient(url, reactor=reactor)
    bob_key = load_public_key(bob["key_pem"])
    for n, plaintext in enumerate([b"\\xff\\xfe not UTF-8", b'{"to": "\\\\ud800"}', b"[" * 900 + b"]" * 900]):
        await api.send_packet({"id": f"hostile-{n}", "user_id": bob["address"], "token": bob["token"],
                               **seal(bob_key, plaintext)})
    await api.close()

react(main)
""")
    intro, one, two, three, four, five, *hostile = stored_messages(relay, bob.user_id)
    assert len(hostile) == 3
    for path, field in ((two, "data"), (three, "password"), (four, "token_id")):
        stored = json.loads(path.read_text())
        stored[field] = stored[field][:8] + "\ud800" + stored[field][8:]
        tamper_stored(path, json.dumps(stored))  # ensure_ascii: the lone surrogate as \ud800

    shown = bob.run("fetch", expect=6)
    rejected_lines = [line for line in shown.err.splitlines() if "REJECTED" in line]
    assert len(rejected_lines) == 6, shown.err
    assert all(f"set aside in {bob.path / 'rejected'}" in line for line in rejected_lines), shown.err
    assert "new contact alice" in shown.out
    texts = [line.split(": ", 1)[1] for line in shown.out.splitlines()[1:]]
    assert texts == ["one", "five [follows a message you have not received]"], shown.out
    assert len(list((bob.path / "rejected").glob("*.json"))) == 6
    assert bob.run("fetch").out.strip() == "no new messages"  # every one acknowledged
    for path in (two, three, four, *hostile):
        assert not path.exists()
