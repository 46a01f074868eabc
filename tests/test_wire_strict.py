"""docs/protocol.md revision 2 strictness in the wire layer: valid Unicode everywhere, whole-string
ASCII patterns, canonical base64 packet fields (issue 9 items 3 and 7)."""

import pytest

from msgrelay.wire.addresses import is_server_name, parse_address
from msgrelay.wire.canonical import parse_json, parse_json_object
from msgrelay.wire.dates import parse_date
from msgrelay.wire.errors import ProtocolError
from msgrelay.wire.keys import is_user_id
from msgrelay.wire.packet import parse_packet
from msgrelay.wire.signing import parse_signed_query

UID = "a" * 32
B64 = "ZGF0YQ=="


def errno_of(call, *args, **kwargs):
    with pytest.raises(ProtocolError) as info:
        call(*args, **kwargs)
    return info.value.errno


@pytest.mark.parametrize("raw", [
    b'{"token": "\\ud800"}',
    b'{"a": ["x", {"b": "\\udfff"}]}',
    b'{"\\ud800": 1}',
    b'{"a": "\\ud83d"}',  # a high surrogate with no low one after it
    b'{"a": "\\ude00\\ud83d"}',  # the pair in the wrong order
    b'{"a": "\\uD800"}',  # upper-case hex
])
def test_lone_surrogates_are_refused_with_the_callers_errno(raw):
    assert errno_of(parse_json_object, raw) == 100
    assert errno_of(parse_json_object, raw, errno=104, what="packet") == 104
    with pytest.raises(ProtocolError) as info:
        parse_json_object(raw)
    assert "Unicode" in info.value.message


def test_valid_surrogate_pairs_and_escaped_backslashes_pass():
    assert parse_json_object(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001F600"}
    assert parse_json_object(b'{"a": "\\\\ud800"}') == {"a": "\\ud800"}
    assert parse_json(b'["\\u00e9"]') == ["é"]


def test_surrogates_can_be_allowed_for_per_item_handling():
    assert parse_json(b'[{"data": "\\ud800"}]', allow_surrogates=True) == [{"data": "\ud800"}]


@pytest.mark.parametrize("text", [UID + "\n", UID + "\r\n", "\n" + UID, UID[:-1] + "\u0663"])
def test_user_ids_match_the_whole_ascii_string(text):
    assert not is_user_id(text)
    assert errno_of(parse_address, text) == 106


@pytest.mark.parametrize("name", ["relay.example\n", "relay.example:80\n", "relay.example:\u0668\u0660",
                                  "relay.example:8\u0660", "r\u0435lay.example"])
def test_server_names_match_the_whole_ascii_string(name):
    assert not is_server_name(name)
    assert errno_of(parse_address, f"{UID}@{name}") == 106


@pytest.mark.parametrize("date", ["2026-11-22T10:15:00Z\n", "\u0662026-11-22T10:15:00Z", "2026-11-22T10:15:00.\u0665Z",
                                  "2026-11-22T10:15:00+00:00\n"])
def test_dates_match_the_whole_ascii_string(date):
    assert errno_of(parse_date, date) == 105


@pytest.mark.parametrize("value", ["300\n", "\u0663\u0660\u0660", "300 ", "+300", " 300"])
def test_query_integers_are_plain_ascii_decimals(value):
    query = {"user_id": [UID], "date": ["2026-11-22T10:15:00Z"], "validity": [value], "signature": ["s"]}
    assert errno_of(parse_signed_query, query, {}) == 100
    limit = {**query, "validity": ["60"], "limit": [value]}
    assert errno_of(parse_signed_query, limit, {"limit": ("integer", False)}) == 100


def _packet(**changes):
    good = {"id": "m-1", "user_id": UID, "token": "t", "data": B64, "algorithm": "AES-256-GCM",
            "password": "cGFzcw==", "signature": "c2ln"}
    good.update(changes)
    return {k: v for k, v in good.items() if v is not None}


def test_packet_with_canonical_base64_passes():
    packet = parse_packet(_packet())
    assert (packet.data, packet.password, packet.signature) == (B64, "cGFzcw==", "c2ln")
    assert parse_packet(_packet(signature=None)).signature is None


@pytest.mark.parametrize("field", ["data", "password", "signature"])
@pytest.mark.parametrize("bad", [
    "not base64!", "ZGF0YQ", "ZGF0YQ=", "ZGF0YR==", "ZGF0\nYQ==", "ZGF0YQ==\n", "ZGF0YQ-_", "", "é",
    "\ud800", "ZGF0YQ==ZGF0YQ==",
])
def test_packet_fields_must_be_canonical_base64(field, bad):
    with pytest.raises(ProtocolError) as info:
        parse_packet(_packet(**{field: bad}))
    assert info.value.errno == 104 and field in info.value.message


@pytest.mark.parametrize("packet_id", ["m-1\n", "m\u0661", "\n"])
def test_packet_ids_match_the_whole_ascii_string(packet_id):
    assert errno_of(parse_packet, _packet(id=packet_id)) == 104


def test_address_ending_in_a_newline_is_not_remote():
    assert errno_of(parse_packet, _packet(user_id=UID + "\n")) == 106
    assert errno_of(parse_packet, _packet(user_id=UID + "@relay.example\n")) == 106


def test_patterns_outside_the_wire_layer_match_whole_ascii_strings():
    from msgrelay.client.errors import UsageError
    from msgrelay.client.profile import check_contact_name
    from msgrelay.ratelimit import Rate
    from msgrelay.store.maildir_layout import SAFE_NAME, MessageName

    name = "00000000000000000001-0123abcd-r1800000000-e1800003600-s12"
    assert MessageName.parse(name) is not None
    assert MessageName.parse(name + "\n") is None
    assert MessageName.parse(name[:-1] + "\u0662") is None  # an Arabic-Indic digit
    assert not SAFE_NAME.fullmatch("0123456789abcdef\n")
    with pytest.raises(UsageError):
        check_contact_name("bob\n")
    with pytest.raises(ValueError):
        Rate.parse("20/3600\n")


def test_fetch_plaintext_is_bounded_and_always_holds_the_first_item():
    import json

    from msgrelay.wire.fetchanswer import bounded_encoded_list

    def bounded_json_list(items, max_bytes):
        return bounded_encoded_list((json.dumps(i, separators=(",", ":")).encode() for i in items), max_bytes)

    items = [{"id": str(i), "data": "x" * 40} for i in range(5)]
    one = len(json.dumps(items[0], separators=(",", ":")))
    everything, count = bounded_json_list(items, 10_000)
    assert json.loads(everything) == items and count == 5
    three, count = bounded_json_list(items, 3 * one + 4)  # brackets and two commas
    assert json.loads(three) == items[:3] and count == 3 and len(three) == 3 * one + 4
    two, count = bounded_json_list(items, 3 * one + 3)
    assert json.loads(two) == items[:2] and count == 2
    first, count = bounded_json_list(items, 1)
    assert json.loads(first) == items[:1] and count == 1
    assert bounded_json_list([], 1) == (b"[]", 0)


def test_packet_signature_null_is_no_signature():
    """Found by the long hypothesis run: a null signature reached the base64 check (a 500)."""
    assert parse_packet({**_packet(), "signature": None}).signature is None
