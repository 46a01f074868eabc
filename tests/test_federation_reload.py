"""A reload (SIGHUP) applies a new federation mode and peer table to a running relay."""

from __future__ import annotations

import json

import pytest_twisted

from msgrelay.federation.queue import QueueState
from msgrelay.wire.envelope import open_envelope
from msgrelay.wire.keys import fingerprint
from test_federation import listen_fake, close_fakes  # noqa: F401  (fixture)
from test_federation_fakes import FakePeer, eventually, peer_key

ensure = pytest_twisted.ensureDeferred


OTHER = "c.test=https://localhost:1"  # an allowlist needs one peer; this one is never used


def write_config(path, peers: list[str]) -> None:
    # Long backoff: within the test only the reload itself can make a blocked packet move.
    path.write_text('[federation]\nmode = "allowlist"\nbackoff_min = 30\nbackoff_max = 60\n'
                    f"peers = {json.dumps([OTHER] + peers)}\n")


@ensure
async def test_reload_adds_a_peer_and_corrects_a_pin(start_relay, users, tmp_path):
    fake = FakePeer("b.test", peer_key(0))
    url = f"http://127.0.0.1:{listen_fake(fake)}"
    config = tmp_path / "a.toml"
    write_config(config, [])
    a = await start_relay("--server-name", "a.test", "--config", str(config))
    bob = users[1]
    address = f"{bob.user_id}@b.test"
    assert (await a.client.send(bob, "tok", user_id=address)).errno == 122

    write_config(config, [f"b.test={url}#{'0' * 64}"])  # listed, with a wrong pin
    applied, _ = a.service.reloader.reload()
    assert "federation.peers" in applied
    queued = await a.client.send(bob, "tok", user_id=address, body=b'{"text":"held"}')
    assert queued.status == 200
    await eventually(lambda: a.service.federation.queues["b.test"].state is QueueState.HELD_KEY_MISMATCH)
    assert fake.received == []

    right_pin = fingerprint(peer_key(0).public_key())
    write_config(config, [f"b.test={url}#{right_pin}"])
    a.service.reloader.reload()
    await eventually(lambda: len(fake.received) == 1, timeout=10)
    assert json.loads(open_envelope([bob.key], fake.received[0][0])) == {"text": "held"}

    write_config(config, [])  # unlisted again: refused at once
    a.service.reloader.reload()
    assert (await a.client.send(bob, "tok", user_id=address)).errno == 122
