"""A relay killed with SIGKILL mid-stream loses nothing it answered 200 for, and shows no partial file."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from apiclient import SyncClient
from msgrelay.wire.envelope import open_envelope
from relayproc import RelayProcess

pytestmark = pytest.mark.slow


def sender(client: SyncClient, alice, token: str, worker: int, accepted: dict, stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        body = json.dumps({"worker": worker, "n": n, "pad": uuid.uuid4().hex * 20}).encode()
        try:
            answer = client.call("POST", "/api/v1/message", client.packet_envelope(alice, token, body=body), timeout=5)
        except OSError:
            return  # the relay died under us: this message's fate is unknown, which is allowed
        if answer.status == 200:
            accepted[answer.body["message_id"]] = body
        n += 1


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
    stop = threading.Event()
    threads = [threading.Thread(target=sender, args=(client, alice, token, w, accepted, stop)) for w in range(4)]
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
        ack = client.signed(alice, "DELETE", "/api/v1/message", ids=list(by_id))
        assert ack.body == {"deleted": len(by_id)}
        assert fetch_all(client, alice) == []
    finally:
        relay.kill()
    relay = RelayProcess(state, port=relay.port).start()  # acknowledgements survive a crash too
    try:
        assert fetch_all(client, alice) == []
    finally:
        relay.stop()
    print(f"accepted before SIGKILL: {len(accepted)}; stored after restart: {len(messages)}")
