"""Issue 9 item 11: one errno-103 message, special-purpose address ranges, and the start-up
warning for a server name that does not look public."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from msgrelay.federation.netguard import address_problem
from msgrelay.wire.envelope import open_envelope, seal
from msgrelay.wire.errors import ProtocolError


def test_rsa_and_tag_failures_answer_the_same_message():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    envelope = seal(key.public_key(), b"{}")
    tampered = bytearray(base64.b64decode(envelope["data"]))
    tampered[-1] ^= 1
    short = base64.b64encode(bytes(20)).decode()
    messages = set()
    for private, env in ((other, envelope), (key, {**envelope, "data": base64.b64encode(tampered).decode()}),
                         (key, {**envelope, "data": short})):
        with pytest.raises(ProtocolError) as info:
            open_envelope([private], env)
        assert info.value.errno == 103
        messages.add(info.value.message)
    assert len(messages) == 1, messages


@pytest.mark.parametrize("address", [
    "2002:7f00:1::1",  # 6to4 wrapping 127.0.0.1
    "2002:0808:0808::1",  # 6to4 of a public address: still relayed through unknown gateways
    "fec0::1",  # site-local (deprecated, still routed inside some networks)
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b:1::1",  # local-use NAT64
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "2001:db8::1", "3fff::1",  # documentation
    "100::1",  # discard-only
    "::7f00:1",  # IPv4-compatible 127.0.0.1
    "198.18.0.1", "192.0.0.8", "192.0.2.1", "198.51.100.1", "203.0.113.1", "192.88.99.1",
    "255.255.255.255", "0.1.2.3",
])
def test_special_purpose_ranges_are_not_public(address):
    assert address_problem(address), address


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700:4700::1111", "2a00:1450:4001::1"])
def test_public_addresses_stay_public(address):
    assert address_problem(address) is None


@pytest.mark.parametrize("name,public", [
    ("relay.example.org", True), ("relay.example.org:8443", True), ("localhost", False), ("buildbox", False),
    ("host.local", False), ("box.lan", False), ("relay.internal", False), ("host.localdomain", False),
    ("10.0.0.1", False), ("127.0.0.1:8080", False), ("relay.test", False), ("relay.invalid", False),
    ("1.2.3.4", False),
])
def test_server_name_public_look(name, public):
    from msgrelay.settings import looks_public

    assert looks_public(name) is public


@pytest.mark.parametrize("hostname,warned", [("buildbox", True), ("relay.example.org", False)])
def test_start_up_warns_once_when_the_host_name_is_not_a_public_name(tmp_path, monkeypatch, hostname, warned):
    import socket

    from twisted.logger import globalLogPublisher

    from msgrelay.service import Options, makeService

    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        options = Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--state-dir", str(tmp_path / "state")])
        makeService(options)
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if "does not look like a public DNS name" in e.get("log_format", "")]
    assert len(warnings) == (1 if warned else 0)
    if warned:
        assert warnings[0]["name"] == hostname
    named = Options()
    named.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--server-name", "localhost",
                        "--state-dir", str(tmp_path / "state2")])
    assert named.settings.name_from_host is False  # set on purpose: no warning
