"""A pinned federation peer's key transitions, driven with StubTreq and a task.Clock.

The real-process, real-TLS case is in test_key_transitions_e2e.py; here the refusals.
"""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import rsa
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from msgrelay.federation.peerkeys import PeerKeys, PinMismatch
from msgrelay.federation.peers import Peer
from msgrelay.wire.keys import fingerprint, public_key_pem
from msgrelay.wire.transitions import Transition, sign_transition

ensure = pytest_twisted.ensureDeferred


def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class ServerInfo(Resource):
    isLeaf = True

    def __init__(self, name: str, current: rsa.RSAPrivateKey, transitions: list[Transition]):
        super().__init__()
        self.body = json.dumps({"name": name, "key": public_key_pem(current.public_key()),
                                "fingerprint": fingerprint(current.public_key()),
                                "key_transitions": [t.to_json() for t in transitions]}).encode()

    def render_GET(self, request: Any) -> bytes:
        return self.body


async def fetch(resource: Resource, pin: str) -> tuple[PeerKeys, Any]:
    keys = PeerKeys(StubTreq(resource), Clock(), refresh_seconds=3600, timeout=10)
    return keys, await keys.fetch(Peer("b.test", "https://b.test", pin))


@ensure
async def test_a_verified_chain_moves_the_pin():
    k0, k1, k2 = key(), key(), key()
    chain = [sign_transition(k0, k1.public_key(), "b.test", 1), sign_transition(k1, k2.public_key(), "b.test", 2)]
    keys, got = await fetch(ServerInfo("b.test", k2, chain), fingerprint(k0.public_key()))
    assert got.fingerprint == fingerprint(k2.public_key())
    assert keys.pin_for(Peer("b.test", "https://b.test", fingerprint(k0.public_key()))) == got.fingerprint
    # An operator who puts another pin in the table is obeyed, not the followed one.
    assert keys.pin_for(Peer("b.test", "https://b.test", "ab" * 32)) == "ab" * 32


@ensure
async def test_a_forged_or_foreign_chain_holds_the_queue():
    k0, k1, attacker = key(), key(), key()
    pin = fingerprint(k0.public_key())
    forged = sign_transition(attacker, attacker.public_key(), "b.test", 1)
    claims = Transition(pin, forged.to_fp, public_key_pem(k0.public_key()), forged.date, forged.signature)
    for resource, why in [
        (ServerInfo("b.test", attacker, [claims]), "no valid chain"),
        # a genuine transition, but signed for another relay's name
        (ServerInfo("b.test", k1, [sign_transition(k0, k1.public_key(), "c.test", 1)]), "does not verify"),
    ]:
        try:
            await fetch(resource, pin)
        except PinMismatch as e:
            assert why in str(e) and "is not the pinned" in str(e)
        else:
            raise AssertionError("a broken chain must hold the queue")
