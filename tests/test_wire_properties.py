"""Property-based tests of the wire parsers (issue 9): round trips, and "never raises anything
but ProtocolError" on arbitrary input. CI runs the `ci` profile (a few hundred cases per
property); `HYPOTHESIS_PROFILE=long` runs the long fuzz documented in docs/testing.md.
"""

from __future__ import annotations

import base64
import json
import os
import string

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msgrelay.store.interface import MessageRecord
from msgrelay.wire.addresses import Address, parse_address
from msgrelay.wire.canonical import MAX_SAFE_INTEGER, canonical_json, parse_json, parse_json_object
from msgrelay.wire.dates import format_date, parse_date
from msgrelay.wire.envelope import AES_GCM, open_envelope, seal
from msgrelay.wire.errors import ProtocolError
from msgrelay.wire.fetchanswer import bounded_encoded_list, json_string
from msgrelay.wire.keys import is_user_id
from msgrelay.wire.packet import parse_packet
from msgrelay.wire.signing import (
    parse_signed_body, parse_signed_query, signature_base, sign_params, verify_signature,
)

settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)

# Any str, lone surrogates included and often (what a JSON \u escape can produce).
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
any_text = st.text(st.characters(exclude_categories=()) | surrogates, max_size=40)
valid_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
json_scalars = st.none() | st.booleans() | st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER) | valid_text
signable = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(string.printable, max_size=8), inner, max_size=5),
    max_leaves=20,
)
wild_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=15,
)
b32 = "abcdefghijklmnopqrstuvwxyz234567"
user_ids = st.text(st.sampled_from(b32), min_size=32, max_size=32)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
server_names = st.builds(
    lambda parts, port: ".".join(parts) + (f":{port}" if port else ""),
    st.lists(labels, min_size=1, max_size=4), st.none() | st.integers(1, 65535),
)


def only_protocol_errors(call, *args, errnos=None):
    """Run `call`; anything raised must be a ProtocolError (with one of `errnos`)."""
    try:
        return call(*args)
    except ProtocolError as e:
        assert errnos is None or e.errno in errnos, (e.errno, e.message)
        json.dumps(e.body("http://r/errors"), ensure_ascii=False).encode("utf-8")  # always printable
        return None


# -- canonical JSON and strict parsing ---------------------------------------------------------


@given(signable)
def test_canonical_json_round_trips_and_is_a_fixed_point(value):
    encoded = canonical_json(value)
    assert parse_json(encoded) == value
    assert canonical_json(parse_json(encoded)) == encoded


@given(st.binary(max_size=200) | any_text.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_parse_json_object_raises_only_protocol_errors_on_bytes(raw):
    result = only_protocol_errors(parse_json_object, raw, errnos={100})
    assert result is None or isinstance(result, dict)


@given(any_text | wild_json)
def test_parse_json_never_returns_a_lone_surrogate(value):
    raw = json.dumps(value).encode("ascii")  # ensure_ascii: surrogates travel as \u escapes
    result = only_protocol_errors(parse_json, raw, errnos={100})
    if result is not None:
        json.dumps(result, ensure_ascii=False).encode("utf-8")  # every string is valid Unicode


# -- envelopes ----------------------------------------------------------------------------------


@settings(max_examples=40)
@given(st.binary(max_size=2000))
def test_envelope_round_trip(plaintext):
    assert open_envelope([KEY], seal(KEY.public_key(), plaintext, AES_GCM)) == plaintext


@settings(max_examples=60)
@given(st.dictionaries(st.sampled_from(["algorithm", "password", "data", "x"]), wild_json, max_size=4))
def test_open_envelope_raises_only_protocol_errors(envelope):
    only_protocol_errors(open_envelope, [KEY], envelope, errnos={100, 102, 103})


# -- packets ------------------------------------------------------------------------------------

b64 = st.binary(min_size=1, max_size=60).map(lambda raw: base64.b64encode(raw).decode("ascii"))
packets = st.fixed_dictionaries(
    {"id": st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True),
     "user_id": st.builds(lambda u, s: u if s is None else f"{u}@{s}", user_ids, st.none() | server_names),
     "token": st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=50),
     "data": b64, "algorithm": st.sampled_from(["AES-256-GCM", "aes-256-gcm"]), "password": b64},
    optional={"ttl": st.integers(1, 10**9), "signature": b64},
)


@given(packets)
def test_packet_round_trip(obj):
    packet = parse_packet(obj)
    assert parse_packet(packet.to_json()) == packet
    assert packet.algorithm == "AES-256-GCM"


near_base64 = st.text(string.ascii_letters + string.digits + "+/=\n-_", max_size=12)


@given(packets, st.sampled_from(["id", "user_id", "token", "data", "password", "signature", "ttl", "algorithm",
                                 "extra"]), near_base64 | any_text | wild_json)
def test_parse_packet_raises_only_protocol_errors(obj, field, value):
    broken = {**obj, field: value}
    packet = only_protocol_errors(parse_packet, broken, errnos={102, 104, 106})
    if packet is not None:  # whatever was accepted is canonical base64 and a valid address
        for text in (packet.data, packet.password, packet.signature or "QQ=="):
            assert base64.b64encode(base64.b64decode(text, validate=True)).decode() == text
        assert is_user_id(packet.address.user_id)


# -- addresses and dates ------------------------------------------------------------------------


@given(user_ids, st.none() | server_names)
def test_address_round_trip(user_id, server):
    text = user_id if server is None else f"{user_id}@{server}"
    address = parse_address(text)
    assert address == Address(user_id, None if server is None else server.lower())
    assert parse_address(str(address)) == address


endings = st.sampled_from(["", "\n", "\r\n", " ", "\x00", "\u0663", ":\u0668\u0660"])


@given(any_text | st.builds(lambda u, s: f"{u}@{s}", user_ids, any_text)
       | st.builds(lambda u, s, e: (u if s is None else f"{u}@{s}") + e, user_ids, st.none() | server_names, endings))
def test_parse_address_raises_only_errno_106(text):
    address = only_protocol_errors(parse_address, text, errnos={106})
    if address is not None:
        assert str(address).isascii() and "\n" not in str(address)


@given(st.integers(0, 253402300799))
def test_date_round_trip(seconds):
    assert parse_date(format_date(seconds)) == seconds


dates = st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})",
                      fullmatch=True)


@given(any_text | st.builds(lambda d, e: d + e, dates, endings))
def test_parse_date_raises_only_errno_105(text):
    if only_protocol_errors(parse_date, text, errnos={105}) is not None:
        assert text.isascii() and text[-1] in "Zz0123456789"


# -- signed requests ----------------------------------------------------------------------------

SPEC = {"limit": ("integer", False), "label": ("string", False), "ids": ("list of strings", False)}


@given(st.dictionaries(st.sampled_from(["user_id", "date", "validity", "signature", "limit", "label", "ids",
                                        "method", "x"]), wild_json, max_size=8))
def test_parse_signed_body_raises_only_protocol_errors(body):
    only_protocol_errors(parse_signed_body, body, SPEC, errnos={100, 105, 106})


@given(st.dictionaries(st.sampled_from(["user_id", "date", "validity", "signature", "limit", "label", "x"]),
                       st.lists(any_text, min_size=1, max_size=2), max_size=7))
def test_parse_signed_query_raises_only_protocol_errors(query):
    only_protocol_errors(parse_signed_query, query, SPEC, errnos={100, 105, 106})


@settings(max_examples=30)
@given(user_ids, st.integers(1, 300), valid_text, st.lists(valid_text, max_size=3))
def test_signed_request_round_trip(user_id, validity, label, ids):
    params = {"user_id": user_id, "date": "2026-11-22T10:15:00Z", "validity": validity, "label": label, "ids": ids}
    signed = sign_params(KEY, params, "DELETE", "/api/v1/message", "relay.test")
    request = parse_signed_body(signed, SPEC)
    assert request.own == {"label": label, "ids": ids}
    verify_signature(KEY.public_key(), request.signature, request.base("DELETE", "/api/v1/message", "relay.test"))
    assert request.base("DELETE", "/api/v1/message", "relay.test") == signature_base(
        params, "DELETE", "/api/v1/message", "relay.test")


# -- fetch answers ------------------------------------------------------------------------------


@given(st.lists(st.dictionaries(st.text(string.ascii_letters, max_size=5), valid_text, max_size=3), max_size=8),
       st.integers(1, 400))
def test_fetch_plaintext_bound(items, max_bytes):
    def bounded(items, max_bytes):
        return bounded_encoded_list((json.dumps(item, separators=(",", ":")).encode() for item in items), max_bytes)

    raw, count = bounded(items, max_bytes)
    assert json.loads(raw) == items[:count]
    assert len(raw) <= max_bytes or count <= 1
    assert count == len(items) or len(bounded(items[:count + 1], 10**9)[0]) > max_bytes
    assert count >= 1 or not items


# Strings near the fast path's edges: every ASCII character (control characters, DEL, quote
# and backslash among them), base64, and any text at all, lone surrogates included.
edge_text = (st.text(st.characters(max_codepoint=0x7F), max_size=40)
             | st.text(string.ascii_letters + string.digits + "+/=", max_size=60) | any_text)


@given(edge_text)
def test_json_string_is_what_json_dumps_writes(value):
    assert json_string(value) == json.dumps(value).encode("ascii")


@given(st.builds(MessageRecord, edge_text, edge_text, edge_text, edge_text, edge_text,
                 st.none() | edge_text, st.integers(0, 2**33), st.integers(0, 2**33)))
def test_a_server_message_encodes_as_json_dumps_writes_it(message):
    expected = {"id": message.message_id, "token": message.token_id, "data": message.data,
                "algorithm": message.algorithm, "password": message.password,
                "received": format_date(message.received), "expires": format_date(message.expires)}
    if message.signature is not None:
        expected["signature"] = message.signature
    assert message.encoded() == json.dumps(expected, separators=(",", ":")).encode("ascii")


@pytest.mark.parametrize("errno_field", ["token", "data"])
def test_a_surrogate_in_a_decrypted_packet_is_104(errno_field):
    raw = json.dumps({"id": "a", "user_id": "a" * 32, "token": "t", "data": "QQ==", "algorithm": AES_GCM,
                      "password": "QQ==", errno_field: "\ud800"}).encode()
    assert only_protocol_errors(parse_json_object, raw, 104, "packet", errnos={104}) is None
