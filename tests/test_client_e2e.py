"""The real `msgrelay-client` command against a real `twistd msgrelay` on loopback.

Each command runs in a process of its own, forked from one that has imported the client
already (tests/clientfork.py: the same entry point as the console script, its own argv,
environment and streams, real sockets); the watch test runs the installed script itself.
Every CLI run is checked for the absence of a traceback: each failure here is an expected one.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

import clientfork
from msgrelay.store import maildir_log
from relayproc import RelayProcess, free_port, interruptible

pytestmark = pytest.mark.slow

CLIENT = str(Path(sys.executable).with_name("msgrelay-client"))
SERVER_NAME = "relay.test"


def start_relay(state: Path, port: Optional[int] = None, config_text: str = "", **kwargs) -> RelayProcess:
    """A relay subprocess (`config_text`: more of its TOML file), or a test failure that says why (never a hang)."""
    try:
        import msgrelay.service  # noqa: F401
    except ImportError as e:
        pytest.fail(f"the relay is not available (import msgrelay.service failed: {e})")
    if not Path(CLIENT).exists():
        pytest.fail(f"{CLIENT} is not installed: pip install -e . in the venv")
    config = state.parent / f"{state.name}.toml"
    # Many people register from 127.0.0.1 here: exempt loopback from the per-address limits.
    config.write_text('[rate_limits]\nexempt = ["127.0.0.1"]\n' + config_text)
    relay = RelayProcess(state, server_name=SERVER_NAME, port=port, extra_args=["--config", str(config)], **kwargs)
    try:
        return relay.start(timeout=30)
    except RuntimeError as e:
        pytest.fail(f"the relay did not start: {e}")


@dataclass
class Run:
    code: int
    out: str
    err: str

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


class Person:
    """One profile, driven only through the command line."""

    def __init__(self, root: Path, name: str):
        self.root = root
        self.name = name
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MSGRELAY_")}
        self.env["XDG_CONFIG_HOME"] = str(root)

    @property
    def path(self) -> Path:
        return self.root / "msgrelay" / self.name

    def run(self, *args: str, expect: Optional[int] = 0, stdin: Optional[str] = None,
            env: Optional[dict] = None, timeout: float = 90) -> Run:
        command = [CLIENT, "--profile", self.name, *args]
        done = clientfork.run(command[1:], env={**self.env, **(env or {})}, stdin=stdin, timeout=timeout)
        result = Run(done.returncode, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr + done.stdout, f"{command}\n{done.stderr}"
        if expect is not None:
            assert done.returncode == expect, (
                f"{command} exited {done.returncode}, expected {expect}\nstdout: {done.stdout}\nstderr: {done.stderr}"
            )
        return result

    def init(self, url: str, *extra: str) -> "Person":
        self.run("init", "--server", url, *extra)
        return self

    @property
    def info(self) -> dict:
        return json.loads(self.run("whoami", "--json").out)

    @property
    def address(self) -> str:
        return self.info["address"]

    @property
    def user_id(self) -> str:
        return self.info["user_id"]

    def contacts(self) -> dict:
        return json.loads((self.path / "contacts.json").read_text())["contacts"]

    def fetch(self, expect: int = 0) -> tuple[list[dict], Run]:
        run = self.run("fetch", "--json", expect=expect)
        return run.records(), run


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    process = start_relay(tmp_path_factory.mktemp("relay") / "state")
    yield process
    process.stop()


@pytest.fixture
def person(tmp_path, relay):
    def make(name: str, url: Optional[str] = None, *extra: str) -> Person:
        return Person(tmp_path / "config", name).init(url or relay.url, *extra)

    return make


def introduce(alice: Person, bob: Person) -> str:
    """Bob invites Alice, Alice adds Bob: the only out-of-band step. Returns the invite."""
    invite = bob.run("invite", "--for", alice.name).out.strip()
    info = bob.info
    assert invite.startswith(f"msgrelay:{info['address']}?token=") and "\n" not in invite
    added = alice.run("contact", "add", bob.name, invite)
    assert info["fingerprint"] in added.out
    return invite


@dataclass
class StoredMessage:
    """One message record in a user's maildir log (store/maildir_log.py), as stored."""

    segment: Path
    name: str

    def read_text(self) -> str:
        data, entry = self._record()
        _, offset, length = entry.location
        decoded = maildir_log.decode_message(data[offset:offset + length])
        assert decoded is not None
        return decoded[1].decode("utf-8")

    def _record(self) -> tuple[bytes, maildir_log.MessageEntry]:
        """The segment's bytes, and this record as a scan finds it there."""
        data = self.segment.read_bytes()
        for entry in maildir_log.scan(data, 0).messages:
            if str(entry.name) == self.name:
                return data, entry
        raise AssertionError(f"no record {self.name} in {self.segment}")

    def exists(self) -> bool:
        """Still pending: its record is in the log and no acknowledgement names it."""
        found = maildir_log.Scan()
        for segment in self.segment.parent.glob("*.log"):
            maildir_log.scan(segment.read_bytes(), 0, found)
        return self.name in {str(e.name) for e in found.messages} - found.acknowledged

    def rewrite(self, content: str) -> None:
        """Replace the record by one holding `content` (a valid record: as a disk that keeps
        its checksums, or whoever holds the disk, could leave it)."""
        data, entry = self._record()
        _, offset, length = entry.location
        record = maildir_log.message_record(self.name, entry.dedup.hex(), content.encode("utf-8"))
        self.segment.write_bytes(data[:offset] + record + data[offset + length:])


def stored_messages(relay: RelayProcess, user_id: str) -> list[StoredMessage]:
    """The maildir store's messages of one user, in arrival order (their names sort so)."""
    found = []
    for segment in sorted(relay.state_dir.glob(f"**/users/{user_id}/log/*.log")):
        found.extend(StoredMessage(segment, str(entry.name))
                     for entry in maildir_log.scan(segment.read_bytes(), 0).messages)
    assert found, f"no stored messages for {user_id} under {relay.state_dir}"
    return sorted(found, key=lambda m: m.name)


def tamper_stored(stored: StoredMessage, content: str) -> None:
    """Rewrite a stored message behind the running relay, then append to the mailbox's
    `generation` file as every process that changes a mailbox does (store/maildir_index.py):
    the relay then reads the mailbox from its files again, not from its message cache."""
    stored.rewrite(content)
    with open(stored.segment.parent.parent / "generation", "ab") as generation:
        generation.write(b".")


# -- the walk through the issue -----------------------------------------------------------


def test_two_people_exchange_text_and_files_both_ways_using_only_invites(person, tmp_path):
    alice, bob = person("alice"), person("bob")
    assert alice.address.endswith(f"@{SERVER_NAME}")
    introduce(alice, bob)

    sent = alice.run("send", "bob", "Hello Bob, grüße 🙂")
    assert "sent token request to bob" in sent.out and "sent text to bob" in sent.out

    records, _ = bob.fetch()
    intro, hello = records
    assert intro["type"] == "token_request" and intro["new_contact"] and intro["contact"] == "alice"
    assert intro["fingerprint"] == alice.info["fingerprint"]
    assert hello["type"] == "text" and hello["text"] == "Hello Bob, grüße 🙂" and hello["contact"] == "alice"
    assert hello["from"] == alice.address and hello["last_id"] is None
    assert bob.contacts()["alice"]["address"] == alice.address

    reply = bob.run("send", "alice", "Hi Alice")
    assert "token request" not in reply.out  # Alice can already write to Bob
    (answer,), _ = alice.fetch()
    assert answer["text"] == "Hi Alice" and answer["contact"] == "bob" and answer["last_id"] == hello["ref"]
    assert not answer["gap"]

    to_bob, to_alice = tmp_path / "to_bob.bin", tmp_path / "to_alice.bin"
    to_bob.write_bytes(os.urandom(20000))
    to_alice.write_bytes(bytes(range(256)) * 3)
    alice.run("send", "bob", "--file", str(to_bob))
    bob.run("send", "alice", "--file", str(to_alice))
    for receiver, original in ((bob, to_bob), (alice, to_alice)):
        (record,), _ = receiver.fetch()
        assert record["type"] == "file" and record["size"] == len(original.read_bytes())
        assert Path(record["file"]).read_bytes() == original.read_bytes()
        assert stat.S_IMODE(Path(record["file"]).stat().st_mode) == 0o600

    # Human output, and nothing left over.
    alice.run("send", "bob", "one more")
    shown = bob.run("fetch")
    assert "alice: one more" in shown.out
    assert bob.run("fetch").out.strip() == "no new messages"
    assert alice.run("outbox", "list").out.strip() == "outbox is empty"


def test_same_file_twice_is_two_files_never_overwritten(person, tmp_path):
    alice, bob = person("alice"), person("bob")
    introduce(alice, bob)
    payload = tmp_path / "p.bin"
    payload.write_bytes(b"same bytes")
    out_dir = tmp_path / "downloads"
    alice.run("send", "bob", "--file", str(payload))
    bob.run("fetch", "--output-dir", str(out_dir))
    alice.run("outbox", "list")
    alice.run("send", "bob", "--file", str(payload))  # a new send once the first was delivered
    bob.run("fetch", "--output-dir", str(out_dir))
    files = sorted(out_dir.iterdir())
    assert len(files) == 2 and all(f.read_bytes() == b"same bytes" for f in files)


def test_file_too_large_for_the_relay_is_refused_before_queueing(person, tmp_path, relay):
    alice, bob = person("alice"), person("bob")
    introduce(alice, bob)
    limit = json.loads(urllib.request.urlopen(relay.url + "/api/v1/server").read())["max_body_bytes"]
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(limit // 2))  # base64 three times makes it well over the limit
    refused = alice.run("send", "bob", "--file", str(big), expect=2)
    assert "too large" in refused.err and str(limit) in refused.err
    assert not list((alice.path / "outbox").glob("*.json"))


def test_revoked_token_stops_delivery_with_a_clear_message(person):
    alice, bob = person("alice"), person("bob")
    invite = introduce(alice, bob)
    bob.run("token", "revoke", invite)
    refused = alice.run("send", "bob", "are you there?", expect=4)
    assert "NOT DELIVERED" in refused.err and "errno 120" in refused.err
    assert "contact add bob INVITE" in refused.err
    assert alice.run("outbox", "list").out.strip() == "outbox is empty"
    failed = list((alice.path / "outbox-failed").glob("*.json"))
    assert len(failed) == 2 and all("errno 120" in f.read_text() for f in failed)
    # A fresh invite mends it, and the type 3 goes out again with the same minted token.
    alice.run("contact", "add", "bob", bob.run("invite").out.strip())
    alice.run("send", "bob", "now?")
    records, _ = bob.fetch()
    assert [r["type"] for r in records] == ["token_request", "text"] and records[1]["text"] == "now?"


def test_expired_token_is_refused(person):
    alice, bob = person("alice"), person("bob")
    invite = bob.run("invite", "--expires", "1s").out.strip()
    alice.run("contact", "add", "bob", invite)
    deadline = time.monotonic() + 30
    while True:  # until the one-second token has expired on the relay's clock
        refused = alice.run("send", "bob", "late", expect=None)
        if refused.code != 0 or time.monotonic() > deadline:
            break
    assert refused.code == 4 and "errno 120" in refused.err, refused.err


def test_tampered_message_in_storage_is_reported_not_shown(person, relay):
    alice, bob = person("alice"), person("bob")
    introduce(alice, bob)
    alice.run("send", "bob", "the secret plan")
    intro_file, text_file = stored_messages(relay, bob.user_id)
    stored = json.loads(text_file.read_text())
    sealed = bytearray(base64.b64decode(stored["data"]))
    sealed[len(sealed) // 2] ^= 0x04  # one bit of ciphertext
    stored["data"] = base64.b64encode(bytes(sealed)).decode()
    tamper_stored(text_file, json.dumps(stored))

    shown = bob.run("fetch", expect=6)
    assert "secret plan" not in shown.out + shown.err
    assert "REJECTED" in shown.err and "tampered" in shown.err
    assert "new contact alice" in shown.out  # the untouched message still arrives
    assert len(list((bob.path / "rejected").glob("*.json"))) == 1
    assert bob.run("fetch").out.strip() == "no new messages"  # acknowledged after being set aside


# A script run with the library, as Alice (her profile folder is argv[1], the relay URL argv[2]),
# for what the command line never does on purpose.
def test_relay_down_then_retry_never_duplicates(tmp_path):
    port = free_port()
    state = tmp_path / "state"
    relay = start_relay(state, port=port)
    alice = Person(tmp_path / "config", "alice").init(relay.url)
    bob = Person(tmp_path / "config", "bob").init(relay.url)
    introduce(alice, bob)
    alice.run("send", "bob", "first")
    relay.stop()
    try:
        down = alice.run("send", "bob", "while down", expect=3)
        assert "cannot reach the relay" in down.err and "queued, not yet sent" in down.err
        again = alice.run("send", "bob", "while down", expect=3)  # the same send, retried
        queued = list((alice.path / "outbox").glob("*.json"))
        assert len(queued) == 1
        packet_id = json.loads(queued[0].read_text())["packet"]["id"]
        assert packet_id in down.err and packet_id in again.err
        relay = start_relay(state, port=port)
        kept = queued[0].read_bytes()
        first = alice.run("outbox", "flush")
        # The relay's answer "was lost": the client still has the packet and sends it again.
        queued[0].write_bytes(kept)
        second = alice.run("outbox", "flush")
        message_id = first.out.split("message id ")[1].split(",")[0]
        assert message_id in second.out
        records, _ = bob.fetch()
        assert [r.get("text") for r in records if r["type"] == "text"] == ["first", "while down"]
    finally:
        relay.stop()


def test_passphrase_protected_profile(tmp_path, relay):
    alice = Person(tmp_path / "config", "alice")
    alice.run("init", "--server", relay.url, "--passphrase", env={"MSGRELAY_PASSPHRASE": "s3cret words"})
    key = alice.path / "key.pem"
    assert key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(alice.path.stat().st_mode) == 0o700
    assert alice.info["address"].endswith("@relay.test")  # whoami needs no passphrase
    missing = alice.run("invite", expect=7)
    assert "MSGRELAY_PASSPHRASE" in missing.err
    wrong = alice.run("invite", expect=7, env={"MSGRELAY_PASSPHRASE": "guess"})
    assert "wrong passphrase" in wrong.err
    alice.run("invite", env={"MSGRELAY_PASSPHRASE": "s3cret words"})


def test_tokens_and_contacts_commands(person):
    alice, bob = person("alice"), person("bob")
    minted = alice.run("token", "new", "--label", "for the blog", "--expires", "30d").out
    token_id = minted.split("id:")[1].split()[0]
    listed = alice.run("token", "list", "--json").records()
    assert [(t["id"], t["label"]) for t in listed] == [(token_id, "for the blog")]
    alice.run("token", "revoke", token_id)
    assert alice.run("token", "list").out.strip() == "no tokens"
    unknown = alice.run("token", "revoke", token_id, expect=4)
    assert "errno 131" in unknown.err
    introduce(alice, bob)
    assert [c["name"] for c in alice.run("contact", "list", "--json").records()] == ["bob"]
    alice.run("contact", "remove", "bob")
    assert alice.run("contact", "list").out.strip() == "no contacts"
    bad = alice.run("contact", "add", "bob", "msgrelay:nonsense", expect=2)
    assert "bad invite" in bad.err
    nobody = alice.run("send", "carol", "hi", expect=2)
    assert "no contact named 'carol'" in nobody.err


def test_delete_account(person):
    alice, bob = person("alice"), person("bob")
    introduce(alice, bob)
    declined = bob.run("delete-account", stdin="n\n", expect=1)
    assert "nothing was done" in declined.err and bob.path.exists()
    deleted = bob.run("delete-account", "--yes")
    assert "deleted" in deleted.out and not bob.path.exists()
    gone = alice.run("send", "bob", "hello?", expect=4)
    assert "errno 130" in gone.err


def test_watch_prints_new_messages_and_stops_cleanly(person):
    alice, bob = person("alice"), person("bob")
    introduce(alice, bob)
    watcher = subprocess.Popen(
        [CLIENT, "--profile", "bob", "fetch", "--watch", "--json", "--interval", "0.2", "--max-interval", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=bob.env, stdin=subprocess.DEVNULL,
        preexec_fn=interruptible,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(watcher.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        alice.run("send", "bob", "watched")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("watched" in line for line in lines):
            time.sleep(0.1)
        assert any(json.loads(line).get("text") == "watched" for line in lines), lines
    finally:
        watcher.send_signal(signal.SIGINT)
        code = watcher.wait(timeout=20)
        err = watcher.stderr.read()
    assert code == 0 and "Traceback" not in err


def test_relay_down_is_one_line(tmp_path):
    alice = Person(tmp_path / "config", "alice")
    down = alice.run("init", "--server", f"http://127.0.0.1:{free_port()}", expect=3)
    assert down.err.strip().count("\n") == 0 and "connection refused" in down.err
