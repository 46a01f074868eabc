"""docs/protocol.md revision 2 over real sockets: valid Unicode, whole-string patterns and canonical
base64 packet fields (issue 9 items 3 and 7), against the real service tree."""

from __future__ import annotations

import json

import pytest_twisted

from apiclient import request
from msgrelay.wire.envelope import seal

ensure = pytest_twisted.ensureDeferred
SURROGATE = "\ud800"


async def _ready(relay, user):
    await relay.client.register(user)
    return await relay.client.mint(user)


def _assert_refused(answer, errno, field=None):
    assert isinstance(answer.body, dict), answer.body
    assert (answer.status, answer.errno) == (400, errno), answer.body
    if field is not None:
        assert field in answer.body["message"], answer.body


@ensure
async def test_lone_surrogate_in_any_packet_field_is_104_never_500(relay, users):
    client, alice = relay.client, users[0]
    token = await _ready(relay, alice)
    for field in ("token", "data", "password", "signature", "id", "user_id"):
        packet = {"id": "p-1", "user_id": alice.user_id, "token": token, **seal(alice.key.public_key(), b"{}")}
        packet[field] = "x" + SURROGATE
        answer = await client.call("POST", "/api/v1/message", seal(client.server_key, json.dumps(packet).encode()))
        _assert_refused(answer, 104, "Unicode")
    _, messages = await client.fetch(alice)
    assert messages == []


@ensure
async def test_lone_surrogate_in_bodies_and_queries_is_100(relay, users):
    client, alice = relay.client, users[0]
    await _ready(relay, alice)
    raw = json.dumps({"key": alice.pem, "registration_token": SURROGATE}).encode()
    _assert_refused(await client.call("POST", "/api/v1/user", raw=raw), 100, "Unicode")
    label = client.signed_params(alice, "POST", "/api/v1/token")
    label["label"] = SURROGATE  # unsigned, so the parser must refuse it before the signature check
    _assert_refused(await client.call("POST", "/api/v1/token", raw=json.dumps(label).encode()), 100, "Unicode")
    envelope = {"algorithm": "AES-256-GCM", "password": SURROGATE, "data": "AAAA"}
    _assert_refused(await client.call("POST", "/api/v1/message", raw=json.dumps(envelope).encode()), 100)
    query = client.target("/api/v1/message") + "?user_id=%ED%A0%80&date=x&validity=1&signature=s"
    _assert_refused(await request("GET", query), 100)


@ensure
async def test_lone_surrogate_registration_token_is_100_in_token_mode(start_relay, users, tmp_path):
    config = tmp_path / "token.toml"
    config.write_text('[registration]\nmode = "token"\ntokens = ["let-me-in"]\n')
    relay = await start_relay("--config", str(config))
    raw = json.dumps({"key": users[0].pem, "registration_token": "let" + SURROGATE}).encode()
    _assert_refused(await relay.client.call("POST", "/api/v1/user", raw=raw), 100, "Unicode")


@ensure
async def test_packet_binary_fields_must_be_canonical_base64(relay, users):
    client, alice = relay.client, users[0]
    token = await _ready(relay, alice)
    for field in ("data", "password", "signature"):
        for bad in ("not base64", "ZGF0YR==", "ZGF0YQ", "ZGF0\nYQ=="):
            _assert_refused(await client.send(alice, token, **{field: bad}), 104, field)
    assert (await client.send(alice, token, signature="c2ln")).status == 200


@ensure
async def test_whole_string_patterns_in_paths_queries_and_addresses(relay, users):
    client, alice = relay.client, users[0]
    token = await _ready(relay, alice)
    _assert_refused(await client.call("GET", f"/api/v1/user/{alice.user_id}%0A"), 106)
    _assert_refused(await client.call("GET", f"/api/v1/user/{alice.user_id[:-1]}%D9%A3"), 106)
    assert (await client.call("GET", f"/api/v1/user/{alice.user_id}")).status == 200
    params = client.signed_params(alice, "GET", "/api/v1/message")
    params["validity"] = f"{params['validity']}\n"
    _assert_refused(await client.call("GET", "/api/v1/message", query=params), 100, "validity")
    limit = client.signed_params(alice, "GET", "/api/v1/message", limit=5)
    limit["limit"] = "\u0665"  # an Arabic-Indic five
    _assert_refused(await client.call("GET", "/api/v1/message", query=limit), 100, "limit")
    future_date = client.signed_params(alice, "GET", "/api/v1/message")
    future_date["date"] += "\n"
    _assert_refused(await client.call("GET", "/api/v1/message", query=future_date), 105)
    for address in (alice.user_id + "\n", alice.user_id + "@relay.test\n", alice.user_id + "@elsewhere.example\n"):
        answer = await client.send(alice, token, user_id=address)
        _assert_refused(answer, 106)
    packet_id = await client.send(alice, token, packet_id="p-1\n")
    _assert_refused(packet_id, 104, "id")


@ensure
async def test_non_utf8_paths_get_a_json_error_and_no_traceback(relay):
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for path in ("/api/v1/user/%ff%fe", "/api/v1/%ff", "/api/v1/user/%ED%A0%80", "/%C0%AF"):
            for method in ("GET", "POST", "OPTIONS"):
                answer = await request(method, relay.url + path)
                assert isinstance(answer.body, dict), (method, path, answer.body)
                assert (answer.status, answer.errno) == (400, 100), (method, path, answer.body)
                assert "UTF-8" in answer.body["message"]
                assert answer.headers.getRawHeaders("Content-Type") == ["application/json; charset=utf-8"]
                assert answer.headers.getRawHeaders("Access-Control-Allow-Origin") == ["*"]
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not [e for e in events if "log_failure" in e or "Traceback" in str(e.get("log_format", ""))]
    access = [e for e in events if e.get("log_namespace") == "msgrelay.access"]
    assert len(access) == 12 and all(e["errno"] == 100 for e in access)


@ensure
async def test_access_log_truncates_long_paths(relay):
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        answer = await request("GET", relay.url + "/api/v1/user/" + "a" * 16000)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert answer.errno == 106
    [line] = [e for e in events if e.get("log_namespace") == "msgrelay.access"]
    assert len(line["path"]) <= 240 and line["path"].startswith("/api/v1/user/aaaa")
    assert "16013 bytes" in line["path"]
    assert len(answer.body["message"]) < 400
