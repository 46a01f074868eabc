"""RSA decryption of the accept path, and sealing of big fetch answers, run in the crypto pool,
never on the reactor thread, over real sockets against the real service tree; one packet costs
one store call, one signed fetch two."""

from __future__ import annotations

import base64
import json
import os
import threading

import pytest_twisted

from msgrelay import relay as relay_module


@pytest_twisted.ensureDeferred
async def test_open_and_seal_run_in_the_crypto_pool_and_accept_is_one_store_call(relay, users, monkeypatch):
    core = relay.core
    assert core.run_crypto is not None
    threads: dict[str, list[threading.Thread]] = {"open": [], "seal": []}
    real_open, real_seal = core.open_packet, relay_module.seal_fetch_answer

    def open_packet(envelope):
        threads["open"].append(threading.current_thread())
        return real_open(envelope)

    def seal_messages(key, messages, max_bytes, remaining):
        threads["seal"].append(threading.current_thread())
        return real_seal(key, messages, max_bytes, remaining)

    monkeypatch.setattr(core, "open_packet", open_packet)
    monkeypatch.setattr(relay_module, "seal_fetch_answer", seal_messages)
    client = relay.client
    alice = users[0]
    await client.register(alice)
    token = await client.mint(alice)
    store_calls: list[str] = []
    for name in ("get_user", "get_token", "deliver", "deliver_checked", "fetch", "remember_signature",
                 "remember_and_fetch", "acknowledge", "remember_and_acknowledge"):
        method = getattr(core.store, name)
        monkeypatch.setattr(core.store, name, lambda *a, _m=method, _n=name: (store_calls.append(_n), _m(*a))[1])
    # Over relay.SEAL_INLINE_BYTES of payload: the answer is sealed in the crypto pool.
    big = json.dumps({"blob": base64.b64encode(os.urandom(relay_module.SEAL_INLINE_BYTES)).decode()}).encode()
    sent = await client.send(alice, token, packet_id="p-1", body=big)
    assert sent.status == 200, sent.body
    assert store_calls == ["deliver_checked"]
    del store_calls[:]
    _, messages = await client.fetch(alice)
    assert [m["id"] for m in messages] == [sent.body["message_id"]]
    assert store_calls == ["get_user", "remember_and_fetch"]  # a signed fetch is two store calls
    del store_calls[:]
    acked = await client.signed(alice, "DELETE", "/api/v1/message", ids=[sent.body["message_id"]])
    assert acked.body == {"deleted": 1}
    assert store_calls == ["remember_and_acknowledge"]  # the relay knows alice's key since her fetch
    assert len(threads["open"]) == 1 and len(threads["seal"]) == 1
    for thread in threads["open"] + threads["seal"]:
        assert thread is not threading.main_thread()
        assert "msgrelay-crypto" in thread.name  # the relay's crypto pool (msgrelay/pools.py)
