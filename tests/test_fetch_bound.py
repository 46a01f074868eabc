"""Fetch answers bounded by limits.max_fetch_bytes, big ones sealed off the reactor thread (issue 9
item 2), over real sockets against the real service tree."""

from __future__ import annotations

import base64
import json
import os
import threading

import pytest_twisted

ensure = pytest_twisted.ensureDeferred


@ensure
async def test_fetch_answer_stops_before_max_fetch_bytes(start_relay, users, tmp_path):
    config = tmp_path / "fetch.toml"
    config.write_text("[limits]\nmax_body_bytes = 65536\nmax_fetch_bytes = 100000\n")
    relay = await start_relay("--config", str(config))
    client, alice = relay.client, users[0]
    await client.register(alice)
    token = await client.mint(alice)
    body = json.dumps({"blob": base64.b64encode(os.urandom(20000)).decode()}).encode()  # ~36 KB stored
    sent = [await client.send(alice, token, body=body) for _ in range(5)]
    assert all(s.status == 200 for s in sent), [s.body for s in sent]
    answer, messages = await client.fetch(alice, limit=100)
    assert answer.status == 200
    plaintext_size = len(json.dumps(messages, separators=(",", ":")))
    assert plaintext_size <= 100000
    assert len(messages) == answer.body["count"] == 2 and answer.body["remaining"] == 3
    assert [m["id"] for m in messages] == [s.body["message_id"] for s in sent[:2]]
    await client.signed(alice, "DELETE", "/api/v1/message", ids=[m["id"] for m in messages])
    rest, _ = await client.fetch(alice, limit=1)
    assert (rest.body["count"], rest.body["remaining"]) == (1, 2)
    info = await client.call("GET", "/api/v1/server")
    assert info.body["max_fetch_bytes"] == 100000


def _big_body() -> bytes:
    """A message whose payload is well over relay.SEAL_INLINE_BYTES."""
    from msgrelay.relay import SEAL_INLINE_BYTES

    return json.dumps({"blob": base64.b64encode(os.urandom(SEAL_INLINE_BYTES)).decode()}).encode()


@ensure
async def test_big_answers_are_sealed_off_the_reactor_thread_small_ones_on_it(relay, users, monkeypatch):
    import msgrelay.relay

    threads = []
    original = msgrelay.relay.seal_fetch_answer

    def recording(*args):
        threads.append(threading.current_thread())
        return original(*args)

    monkeypatch.setattr(msgrelay.relay, "seal_fetch_answer", recording)
    client, alice = relay.client, users[0]
    await client.register(alice)
    token = await client.mint(alice)
    await client.send(alice, token)
    answer, messages = await client.fetch(alice)
    assert answer.status == 200 and len(messages) == 1
    assert threads == [threading.main_thread()]  # one small message: cheaper than two thread hand-offs
    await client.signed(alice, "DELETE", "/api/v1/message", ids=[messages[0]["id"]])
    assert (await client.send(alice, token, body=_big_body())).status == 200
    answer, messages = await client.fetch(alice)
    assert answer.status == 200 and len(messages) == 1
    assert len(threads) == 2 and threads[1] is not threading.main_thread()
    # The signature counts too: a small message with a big signature is a big answer.
    await client.signed(alice, "DELETE", "/api/v1/message", ids=[messages[0]["id"]])
    from msgrelay.relay import SEAL_INLINE_BYTES

    signature = base64.b64encode(os.urandom(SEAL_INLINE_BYTES)).decode()
    assert (await client.send(alice, token, signature=signature)).status == 200
    answer, messages = await client.fetch(alice)
    assert answer.status == 200 and messages[0]["signature"] == signature
    assert len(threads) == 3 and threads[2] is not threading.main_thread()


@ensure
async def test_the_relay_seals_in_its_crypto_pool_and_stopping_stops_it(tmp_path, users):
    from conftest import LiveRelay

    relay = await LiveRelay(tmp_path / "state", []).start()
    pool = relay.service.relay.pools.crypto
    try:
        client, alice = relay.client, users[0]
        await client.register(alice)
        token = await client.mint(alice)
        assert (await client.send(alice, token, body=_big_body())).status == 200
        assert (await client.fetch(alice))[0].status == 200
        assert pool.started and pool.threads  # the sealing (and the packet's opening) ran there
        assert relay.core._own_pool is None  # the core's fallback pool was never needed
    finally:
        await relay.stop()
    assert not pool.started


def test_the_encoded_answer_is_the_json_of_the_sealed_answer(users):
    """seal_fetch_answer writes the answer's JSON itself (no escaping scan of the base64): it is
    byte for byte what json.dumps writes, and opens to the messages that fit."""
    from msgrelay.relay import seal_fetch_answer
    from msgrelay.store.interface import MessageRecord
    from msgrelay.wire.envelope import open_envelope

    key = users[0].key
    messages = [MessageRecord(f"m{i}", "t", base64.b64encode(os.urandom(3000)).decode(), "AES-256-GCM",
                              base64.b64encode(b"p").decode(), None, 1_700_000_000, 1_700_086_400) for i in range(3)]
    answer = seal_fetch_answer(key.public_key(), messages, 9000, 7)
    parsed = json.loads(answer)
    assert bytes(answer) == json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert list(parsed) == ["algorithm", "password", "data", "count", "remaining"]
    assert (parsed["count"], parsed["remaining"]) == (2, 8)  # two fit in 9,000 bytes; 7 + the one left out
    opened = json.loads(open_envelope([key], parsed))
    assert [m["id"] for m in opened] == ["m0", "m1"]
