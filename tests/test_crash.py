"""A relay killed with SIGKILL mid-stream loses nothing it answered 200 for, and shows no partial file."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Optional

import pytest

from apiclient import SyncClient
from msgrelay.wire.envelope import open_envelope
from relayproc import RelayProcess
from test_postgres_relay import database  # noqa: F401 (fixture: a fresh PostgreSQL database)

pytestmark = pytest.mark.slow


def sender(client: SyncClient, alice, token: str, worker: int, accepted: dict, stop: threading.Event,
           packets: Optional[dict] = None) -> None:
    """Send until stopped; `accepted` maps each message id answered 200 to its body, and
    `packets` (if given) to the envelope sent, for resending."""
    n = 0
    while not stop.is_set():
        body = json.dumps({"worker": worker, "n": n, "pad": uuid.uuid4().hex * 20}).encode()
        envelope = client.packet_envelope(alice, token, body=body)
        try:
            answer = client.call("POST", "/api/v1/message", envelope, timeout=5)
        except OSError:
            return  # the relay died under us: this message's fate is unknown, which is allowed
        if answer.status == 200:
            accepted[answer.body["message_id"]] = body
            if packets is not None:
                packets[answer.body["message_id"]] = envelope
        n += 1


def assert_resends_are_duplicates(client: SyncClient, packets: dict) -> None:
    """Every packet answered 200 before a crash, sent again, is answered with its first id."""
    for message_id, envelope in packets.items():
        answer = client.call("POST", "/api/v1/message", envelope, timeout=10)
        assert answer.status == 200 and answer.body["message_id"] == message_id, answer.body


def fetch_all(client: SyncClient, alice) -> list[dict]:
    answer, messages = client.fetch(alice, limit=1000)
    assert answer.status == 200, answer.body
    while answer.body["remaining"]:
        pytest.fail("more than 1000 messages; raise the limit of the test")
    return messages


def test_sigkill_mid_stream_loses_nothing_answered(tmp_path, users):
    state = tmp_path / "state"
    relay = RelayProcess(state).start()
    client = SyncClient.connect(relay.url)
    alice = users[0]
    client.call("POST", "/api/v1/user", {"key": alice.pem})
    token = client.mint(alice, expires_in=0)

    accepted: dict[str, bytes] = {}
    packets: dict[str, dict] = {}
    stop = threading.Event()
    threads = [threading.Thread(target=sender, args=(client, alice, token, w, accepted, stop, packets))
               for w in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(accepted) < 150 and time.monotonic() < deadline:
        time.sleep(0.02)
    relay.kill()  # SIGKILL with requests in flight
    stop.set()
    for t in threads:
        t.join(10)
    assert len(accepted) >= 150, "the relay accepted too few messages before the kill"

    relay = RelayProcess(state, port=relay.port).start()
    try:
        messages = fetch_all(client, alice)
        by_id = {m["id"]: m for m in messages}
        assert len(by_id) == len(messages), "a message was returned twice"
        missing = set(accepted) - set(by_id)
        assert not missing, f"{len(missing)} messages answered 200 were lost"
        for message in messages:  # every stored message is whole, answered or not
            body = open_envelope([alice.key], message)
            json.loads(body)
            if message["id"] in accepted:
                assert body == accepted[message["id"]]
        assert_resends_are_duplicates(client, packets)  # dedup records survive the crash
        assert len(fetch_all(client, alice)) == len(messages)
        ack = client.signed(alice, "DELETE", "/api/v1/message", ids=list(by_id))
        assert ack.body == {"deleted": len(by_id)}
        assert fetch_all(client, alice) == []
    finally:
        relay.kill()
    relay = RelayProcess(state, port=relay.port).start()  # acknowledgements survive a crash too
    try:
        assert fetch_all(client, alice) == []
        assert_resends_are_duplicates(client, packets)  # and the records outlive the acknowledgement
        assert fetch_all(client, alice) == []
    finally:
        relay.stop()
    print(f"accepted before SIGKILL: {len(accepted)}; stored after restart: {len(messages)}")


# -- repeated SIGKILL under load (issue 9): MSGRELAY_CRASH_KILLS=100 for the long run ------------


class CrashLoad:
    """Senders, one fetcher that acknowledges what it fetched, and a ledger of what happened."""

    def __init__(self, client: SyncClient, recipient, token: str, senders: int):
        self.client = client
        self.recipient = recipient
        self.token = token
        self.senders = senders
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.accepted: dict[str, bytes] = {}  # answered 200
        self.received: dict[str, bytes] = {}  # fetched at least once
        self.acknowledged: set[str] = set()  # acknowledgement answered 200
        self.came_back: list[str] = []  # fetched again after an acknowledged DELETE
        self.corrupt: list[str] = []
        self.fetches = 0
        self.errors = 0  # requests cut off by a kill (connection refused or reset)

    def send_loop(self, worker: int) -> None:
        n = 0
        while not self.stop.is_set():
            body = json.dumps({"worker": worker, "n": n, "pad": uuid.uuid4().hex * 8}).encode()
            n += 1
            try:
                answer = self.client.call("POST", "/api/v1/message",
                                          self.client.packet_envelope(self.recipient, self.token, body=body), timeout=10)
            except OSError:
                self.errors += 1
                time.sleep(0.05)
                continue
            if answer.status == 200:
                with self.lock:
                    self.accepted[answer.body["message_id"]] = body

    def fetch_once(self) -> int:
        """One fetch and its acknowledgement; the number of messages fetched."""
        answer, messages = self.client.fetch(self.recipient, limit=200)
        if answer.status != 200:
            return 0
        self.fetches += 1
        for message in messages:
            try:
                body = open_envelope([self.recipient.key], message)
                json.loads(body)
            except Exception:
                self.corrupt.append(message["id"])
                continue
            with self.lock:
                if message["id"] in self.acknowledged:
                    self.came_back.append(message["id"])
                self.received[message["id"]] = body
        if messages:
            ids = [m["id"] for m in messages]
            ack = self.client.signed(self.recipient, "DELETE", "/api/v1/message", ids=ids)
            if ack.status == 200:
                with self.lock:
                    self.acknowledged.update(ids)
        return len(messages)

    def fetch_loop(self) -> None:
        while not self.stop.is_set():
            try:
                if not self.fetch_once():
                    time.sleep(0.05)
            except OSError:
                self.errors += 1
                time.sleep(0.05)

    def run(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.send_loop, args=(w,), daemon=True) for w in range(self.senders)]
        threads.append(threading.Thread(target=self.fetch_loop, daemon=True))
        for t in threads:
            t.start()
        return threads


def crash_config(tmp_path, store_dsn: str = "") -> list[str]:
    # One client address and one recipient, far faster than the default limits allow.
    config = tmp_path / "crash.toml"
    # The expiry sweep every second: on maildir it compacts the message logs, under the kills too.
    text = '[rate_limits]\nexempt = ["127.0.0.1"]\nfetch_per_user = "off"\n[store]\nexpire_interval = 1\n'
    if store_dsn:
        text += f'backend = "postgresql"\npostgres_dsn = "{store_dsn}"\n'
    config.write_text(text)
    return ["--config", str(config)]


@pytest.mark.parametrize("store", ["maildir", "postgresql"])
def test_repeated_sigkill_under_senders_fetcher_and_acknowledgements(tmp_path, users, store, request):
    """SIGKILL the real relay at random moments (MSGRELAY_CRASH_KILLS times, 15 by default),
    restarting it each time, while senders, a fetcher and acknowledgements run: every message
    answered 200 reaches the recipient, and no acknowledged message comes back. With each store
    (the PostgreSQL one in a fresh database)."""
    import os
    import random

    kills = int(os.environ.get("MSGRELAY_CRASH_KILLS", "15"))
    seed = int(os.environ.get("MSGRELAY_CRASH_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    state = tmp_path / "state"
    args = crash_config(tmp_path, request.getfixturevalue("database") if store == "postgresql" else "")
    relay = RelayProcess(state, extra_args=args).start()
    client = SyncClient.connect(relay.url)
    alice = users[0]
    client.call("POST", "/api/v1/user", {"key": alice.pem})
    load = CrashLoad(client, alice, client.mint(alice, expires_in=0), senders=3)
    threads = load.run()
    started = time.monotonic()
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.05, 1.0))  # a random moment of the load
            relay.kill()
            relay = RelayProcess(state, port=relay.port, extra_args=args).start(timeout=60)
        time.sleep(1.0)
    finally:
        load.stop.set()
        for t in threads:
            t.join(30)
    try:
        while load.fetch_once():  # drain what is left, acknowledging it
            pass
        assert load.fetches and load.accepted
    finally:
        relay.kill()
    relay = RelayProcess(state, port=relay.port, extra_args=args).start(timeout=60)
    try:
        answer, left = client.fetch(alice, limit=1000)  # acknowledgements survived the last kill too
        assert answer.status == 200 and left == []
    finally:
        relay.stop()
    lost = set(load.accepted) - set(load.received)
    changed = [i for i, body in load.accepted.items() if i in load.received and load.received[i] != body]
    print(f"\ncrash run ({store}, seed {seed}): {kills} SIGKILLs in {time.monotonic() - started:.0f}s; "
          f"{len(load.accepted)} messages answered 200, {len(load.received)} fetched, "
          f"{len(load.acknowledged)} acknowledged, {len(lost)} lost, {len(load.came_back)} came back "
          f"after acknowledgement, {len(load.corrupt)} corrupt; {load.errors} requests cut off by kills")
    assert not lost, f"{len(lost)} messages answered 200 never reached the recipient (seed {seed})"
    assert not changed, f"{len(changed)} messages reached the recipient altered (seed {seed})"
    assert not load.came_back, f"{len(load.came_back)} acknowledged messages came back (seed {seed})"
    assert not load.corrupt, f"{len(load.corrupt)} stored messages do not decrypt (seed {seed})"
    assert len(load.accepted) >= kills, "too few messages were accepted for the test to mean anything"
