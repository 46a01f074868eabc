"""The client's crypto pieces against fixed vectors checked in under tests/vectors/.

tests/make_vectors.py made them; the keys there are test-only keys.
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from msgrelay.client.errors import MessageRejected
from msgrelay.client.identity import Identity
from msgrelay.client.messages import RAW_DATA, RAW_MESSAGE, TOKEN_REQUEST, message_ref, open_message, verify_message
from msgrelay.wire.canonical import canonical_json
from msgrelay.wire.envelope import b64encode, open_envelope
from msgrelay.wire.errors import ProtocolError
from msgrelay.wire.keys import fingerprint, load_public_key, user_id_for_key
from msgrelay.wire.signing import parse_signed_query, sign_base, signature_base, verify_signature

VECTORS = Path(__file__).resolve().parent / "vectors"


def load(name: str):
    return json.loads((VECTORS / f"{name}.json").read_text(encoding="utf-8"))


KEYS = load("keys")


def private(name: str):
    return serialization.load_pem_private_key(KEYS[name]["private_key"].encode("ascii"), None)


@pytest.mark.parametrize("name", sorted(KEYS))
def test_user_id_and_fingerprint_from_key(name):
    entry = KEYS[name]
    key = load_public_key(entry["public_key"])
    assert key.key_size == entry["bits"]
    assert user_id_for_key(key) == entry["user_id"]
    assert fingerprint(key) == entry["fingerprint"]
    assert len(entry["user_id"]) == 32 and set(entry["user_id"]) <= set("abcdefghijklmnopqrstuvwxyz234567")
    identity = Identity(private(name), "relay.example.org")
    assert identity.user_id == entry["user_id"]
    assert identity.address == f"{entry['user_id']}@relay.example.org"
    assert identity.public_pem == entry["public_key"]


@pytest.mark.parametrize("vector", load("envelopes"), ids=lambda v: f"{v['envelope']['algorithm']}-{v['recipient']}")
def test_envelope_opens_with_checked_in_key(vector):
    key = private(vector["recipient"])
    assert open_envelope([key], vector["envelope"]).decode("utf-8") == vector["plaintext"]


@pytest.mark.parametrize("vector", load("envelopes")[:2], ids=lambda v: v["recipient"])
def test_envelope_refuses_tampering_and_the_wrong_key(vector):
    key = private(vector["recipient"])
    other = private("bob" if vector["recipient"] == "alice" else "alice")
    sealed = bytearray(base64.b64decode(vector["envelope"]["data"]))
    sealed[-1] ^= 0x01
    tampered = {**vector["envelope"], "data": b64encode(bytes(sealed))}
    with pytest.raises(ProtocolError) as e:
        open_envelope([key], tampered)
    assert e.value.errno == 103
    with pytest.raises(ProtocolError) as e:
        open_envelope([other], vector["envelope"])
    assert e.value.errno == 103


@pytest.mark.parametrize("vector", load("signature_bases"), ids=lambda v: v["comment"][:40])
def test_signature_base_bytes(vector):
    base = signature_base(vector["params"], vector["method"], vector["path"], vector["server"])
    assert base == vector["base"].encode("utf-8")
    assert base.hex() == vector["base_hex"]
    signer = load_public_key(KEYS[vector["signer"]]["public_key"])
    verify_signature(signer, vector["signature"], base)
    with pytest.raises(ProtocolError):
        verify_signature(signer, vector["signature"], base.replace(b'"validity":', b'"validity": '))


def test_query_string_parameters_type_like_the_vector():
    """What a relay parses from our GET query string gives the same base as the vector."""
    vector = load("signature_bases")[0]
    query = {k: [str(v)] for k, v in {**vector["params"], "signature": vector["signature"]}.items()}
    parsed = parse_signed_query(query, {"limit": ("integer", False)})
    assert parsed.base("GET", vector["path"], vector["server"]) == vector["base"].encode("utf-8")


MESSAGES = load("messages")


def recipient(vector) -> Identity:
    return Identity(private(vector["recipient"]), vector["recipient_server"])


@pytest.mark.parametrize("vector", MESSAGES, ids=lambda v: f"type{v['message']['data_type']}")
def test_message_object_verifies(vector):
    me = recipient(vector)
    verified = verify_message(vector["message"], me)
    sender = "alice" if vector["recipient"] == "bob" else "bob"
    assert verified.sender_user_id == KEYS[sender]["user_id"]
    assert verified.fingerprint == KEYS[sender]["fingerprint"]
    assert verified.ref == vector["ref"] == message_ref(vector["message"])
    unsigned = {k: v for k, v in vector["message"].items() if k != "signature"}
    verify_signature(verified.key, vector["message"]["signature"], canonical_json(unsigned))
    opened = open_message(vector["sealed"], me)
    assert opened.obj == vector["message"]


def test_message_contents_and_chain():
    text, data, request, reply = (v["message"] for v in MESSAGES)
    assert text["data_type"] == RAW_MESSAGE and text["data"]["last_id"] is None
    assert base64.b64decode(data["data"]) == bytes(range(256)) and data["data_type"] == RAW_DATA
    assert request["data_type"] == TOKEN_REQUEST and request["data"]["user_id"] == request["from"]
    assert reply["data"]["last_id"] == MESSAGES[0]["ref"]


def _rejected(obj, vector, match):
    with pytest.raises(MessageRejected, match=match):
        verify_message(obj, recipient(vector))


def test_message_tampering_is_rejected():
    vector = MESSAGES[0]
    obj = copy.deepcopy(vector["message"])
    obj["data"]["content"] = "Hello Bob, send money"
    _rejected(obj, vector, "signature does not verify")
    obj = copy.deepcopy(vector["message"])
    obj["date"] = "2026-11-22T10:15:01Z"
    _rejected(obj, vector, "signature does not verify")


def test_message_for_someone_else_is_rejected():
    """Bob cannot pass Alice's signed message on to a third person as if written to them."""
    vector = MESSAGES[0]
    carol = Identity(private("alice"), "relay-b.example.org:8443")  # any identity that is not `to`
    with pytest.raises(MessageRejected, match="addressed to"):
        verify_message(vector["message"], carol)
    wrong_server = Identity(private("bob"), "elsewhere.example.org")
    with pytest.raises(MessageRejected, match="addressed to"):
        verify_message(vector["message"], wrong_server)


def test_from_must_hash_to_key():
    """Alice, signing properly, still cannot claim to be someone else."""
    vector = MESSAGES[0]
    obj = copy.deepcopy(vector["message"])
    obj["from"] = f"{KEYS['bob']['user_id']}@relay-a.example.org"
    _rejected(obj, vector, "signature does not verify")
    del obj["signature"]
    obj["signature"] = sign_base(private("alice"), canonical_json(obj))
    _rejected(obj, vector, "claims to be from")


def test_sealed_message_bit_flip_is_reported():
    vector = MESSAGES[1]
    sealed = bytearray(base64.b64decode(vector["sealed"]["data"]))
    sealed[len(sealed) // 2] ^= 0x80
    with pytest.raises(MessageRejected, match="tampered"):
        open_message({**vector["sealed"], "data": b64encode(bytes(sealed))}, recipient(vector))
