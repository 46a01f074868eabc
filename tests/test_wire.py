"""Unit tests of the pure wire-format layer: canonical JSON, dates, keys, envelopes, signing, packets."""

import base64
import json
from http import HTTPStatus

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from msgrelay.wire.addresses import parse_address
from msgrelay.wire.canonical import canonical_json, parse_json_object
from msgrelay.wire.dates import format_date, parse_date
from msgrelay.wire.envelope import open_envelope, seal
from msgrelay.wire.errors import ProtocolError
from msgrelay.wire.keys import fingerprint, load_public_key, public_key_pem, user_id_for_key
from msgrelay.wire.packet import parse_packet
from msgrelay.wire.signing import (
    check_time_window, parse_signed_body, parse_signed_query, sign_params, signature_base, verify_signature,
)


@pytest.fixture(scope="module")
def key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def errno_of(call, *args, **kwargs):
    with pytest.raises(ProtocolError) as info:
        call(*args, **kwargs)
    return info.value.errno


def test_canonical_json_sorts_and_escapes_like_rfc8785():
    obj = {"b": "é\u0001\n\"\\", "a": [1, True, None], "c": {"z": 1, "y": 2}}
    assert canonical_json(obj) == '{"a":[1,true,null],"b":"é\\u0001\\n\\"\\\\","c":{"y":2,"z":1}}'.encode()


@pytest.mark.parametrize("bad", [{"x": 1.5}, {"x": 2**53}, {"x": "\ud800"}, {"é": 1}])
def test_canonical_json_refuses_what_cannot_be_signed(bad):
    with pytest.raises(ValueError):
        canonical_json(bad)


def test_parse_json_object_refuses_duplicates_non_objects_and_constants():
    assert parse_json_object(b'{"a":1}') == {"a": 1}
    assert errno_of(parse_json_object, b'{"a":1,"a":2}') == 100
    assert errno_of(parse_json_object, b"[1]") == 100
    assert errno_of(parse_json_object, b'{"a":NaN}') == 100
    assert errno_of(parse_json_object, b"\xff") == 100
    assert errno_of(parse_json_object, b"[]", errno=104) == 104


def test_dates_accept_z_offset_and_fractions_and_refuse_other_offsets():
    assert parse_date("2026-11-22T10:15:00Z") == 1795342500
    assert parse_date("2026-11-22T10:15:00+00:00") == 1795342500
    assert parse_date("2026-11-22T10:15:00.5Z") == 1795342500.5
    assert errno_of(parse_date, "2026-11-22T10:15:00+01:00") == 105
    assert errno_of(parse_date, "2026-13-22T10:15:00Z") == 105
    assert errno_of(parse_date, "yesterday") == 105
    assert format_date(1795342500.9) == "2026-11-22T10:15:00Z"


def test_user_id_is_base32_of_sha256_prefix(key):
    public = key.public_key()
    user_id = user_id_for_key(public)
    assert len(user_id) == 32 and user_id.islower()
    assert len(fingerprint(public)) == 64
    assert load_public_key(public_key_pem(public)).public_numbers() == public.public_numbers()


def test_keys_outside_the_accepted_range_are_errno_101():
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    odd_exponent = rsa.generate_private_key(public_exponent=3, key_size=2048).public_key()
    assert errno_of(load_public_key, public_key_pem(small)) == 101
    assert errno_of(load_public_key, public_key_pem(odd_exponent)) == 101
    assert errno_of(load_public_key, "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n") == 101
    assert errno_of(load_public_key, "not a key") == 101


@pytest.mark.parametrize("algorithm", ["AES-256-GCM", "chacha20-poly1305"])
def test_envelope_round_trip(key, algorithm):
    envelope = seal(key.public_key(), b'{"hello":"world"}', algorithm)
    assert envelope["algorithm"] == algorithm.upper()
    assert open_envelope([key], envelope) == b'{"hello":"world"}'


def test_envelope_failures_have_their_errnos(key):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    envelope = seal(key.public_key(), b"{}")
    assert errno_of(open_envelope, [other], envelope) == 103
    assert errno_of(open_envelope, [key], {**envelope, "algorithm": "DES"}) == 102
    assert errno_of(open_envelope, [key], {**envelope, "data": "!!"}) == 103
    tampered = bytearray(base64.b64decode(envelope["data"]))
    tampered[-1] ^= 1
    assert errno_of(open_envelope, [key], {**envelope, "data": base64.b64encode(tampered).decode()}) == 103
    assert errno_of(open_envelope, [key], {"algorithm": "AES-256-GCM", "data": "x"}) == 100
    assert open_envelope([other, key], envelope) == b"{}"  # a previous key still opens it


def test_signature_base_binds_method_path_and_server():
    base = signature_base({"user_id": "u", "validity": 60, "signature": "x"}, "get", "/api/v1/message", "r.example")
    assert base == b'{"method":"GET","path":"/api/v1/message","server":"r.example","user_id":"u","validity":60}'


def test_sign_and_verify(key):
    params = {"user_id": "a" * 32, "date": "2026-11-22T10:15:00Z", "validity": 60, "label": "ünï"}
    signed = sign_params(key, params, "POST", "/api/v1/token", "relay.test")
    base = signature_base(signed, "POST", "/api/v1/token", "relay.test")
    verify_signature(key.public_key(), signed["signature"], base)
    other_base = signature_base(signed, "POST", "/api/v1/token", "other.test")
    assert errno_of(verify_signature, key.public_key(), signed["signature"], other_base) == 110
    raw = base64.b64decode(signed["signature"])
    assert errno_of(verify_signature, key.public_key(), base64.b64encode(raw[1:]).decode(), base) == 110
    assert errno_of(verify_signature, key.public_key(), signed["signature"].rstrip("="), base) == 110


def test_signed_params_shape_order():
    good = {"user_id": "a" * 32, "date": "2026-11-22T10:15:00Z", "validity": 60, "signature": "s"}
    request = parse_signed_body(good, {"limit": ("integer", False)})
    assert request.validity == 60 and "signature" not in request.params
    assert errno_of(parse_signed_body, {**good, "validity": "60"}, {}) == 100
    assert errno_of(parse_signed_body, {**good, "validity": True}, {}) == 100
    assert errno_of(parse_signed_body, {**good, "path": "/x"}, {}) == 100
    assert errno_of(parse_signed_body, {**good, "extra": 1}, {}) == 100
    assert errno_of(parse_signed_body, {**good, "user_id": "A" * 32}, {}) == 106
    assert errno_of(parse_signed_body, {**good, "user_id": "A" * 32, "date": "x"}, {}) == 106
    assert errno_of(parse_signed_body, {**good, "date": "x"}, {}) == 105
    query = {k: [str(v)] for k, v in good.items()}
    assert parse_signed_query({**query, "limit": ["5"]}, {"limit": ("integer", False)}).own == {"limit": 5}
    assert errno_of(parse_signed_query, {**query, "limit": ["5", "6"]}, {"limit": ("integer", False)}) == 100
    assert errno_of(parse_signed_query, {**query, "validity": ["1.5"]}, {}) == 100


def test_time_window():
    check_time_window(date=1000, validity=60, now=1000, skew=120, max_validity=300)
    check_time_window(date=1100, validity=60, now=1000, skew=120, max_validity=300)
    assert errno_of(check_time_window, 1121, 60, 1000, 120, 300) == 105
    assert errno_of(check_time_window, 1000, 0, 1000, 120, 300) == 105
    assert errno_of(check_time_window, 1000, 301, 1000, 120, 300) == 105
    assert errno_of(check_time_window, 1000, 60, 1061, 120, 300) == 111


def test_packets():
    good = {"id": "m-1", "user_id": "a" * 32 + "@Relay.Example:8443", "token": "t",
            "data": "ZA==", "algorithm": "aes-256-gcm", "password": "cA==", "ttl": 60}
    packet = parse_packet(good)
    assert packet.algorithm == "AES-256-GCM" and packet.address.server_name == "relay.example:8443"
    assert parse_packet(packet.to_json()) == packet
    assert errno_of(parse_packet, {**good, "algorithm": "CHACHA20-POLY1305"}) == 102
    assert errno_of(parse_packet, {**good, "ttl": 0}) == 104
    assert errno_of(parse_packet, {**good, "id": "no spaces"}) == 104
    assert errno_of(parse_packet, {**good, "user_id": "bob"}) == 106
    assert errno_of(parse_packet, {k: v for k, v in good.items() if k != "token"}) == 104
    assert errno_of(parse_packet, {**good, "extra": 1}) == 104


def test_addresses():
    assert parse_address("a" * 32).is_local_to("x")
    assert parse_address("a" * 32 + "@X.example").is_local_to("x.EXAMPLE")
    assert not parse_address("a" * 32 + "@y.example").is_local_to("x.example")
    assert errno_of(parse_address, "a" * 32 + "@bad_name") == 106
    assert errno_of(parse_address, "a" * 32 + "@host:99999") == 106


def test_error_body_shape():
    body = ProtocolError(140, "too big").body("http://r/errors")
    assert body == {"code": 413, "errno": 140, "error": HTTPStatus(413).phrase, "message": "too big",
                    "info": "http://r/errors#errno-140"}
    json.dumps(body)
