"""Every endpoint of docs/protocol.md section 5 and the errnos of section 9.

The endpoints run in memory (tests/memrelay.py: StubTreq over the Klein resource of a relay
from build_relay, on a Clock), with the default maildir store. What belongs to the HTTP
site (CORS and Timestamp headers, preflights, form bodies read as JSON), and the
capabilities no other file tests over sockets (registration modes, quota), run over real
sockets against the service tree of `twistd msgrelay` (makeService)."""

from __future__ import annotations

import json

import pytest_twisted

from apiclient import request
from msgrelay.wire.dates import format_date

ensure = pytest_twisted.ensureDeferred


@ensure
async def test_server_info_headers_and_cors(relay):
    answer = await request("GET", relay.url + "/api/v1/server")
    assert answer.status == 200
    body = answer.body
    assert set(body) == {"name", "key", "fingerprint", "algorithms", "max_body_bytes", "max_fetch_bytes", "default_ttl",
                         "max_ttl", "max_validity", "version", "previous_keys", "key_transitions"}
    assert body["name"] == "relay.test" and body["previous_keys"] == [] and body["key_transitions"] == []
    assert body["algorithms"] == ["AES-256-GCM", "CHACHA20-POLY1305"]
    assert len(body["fingerprint"]) == 64
    assert answer.headers.getRawHeaders("Content-Type") == ["application/json; charset=utf-8"]
    assert int(answer.headers.getRawHeaders("Timestamp")[0]) > 1_700_000_000
    assert answer.headers.getRawHeaders("Access-Control-Allow-Origin") == ["*"]
    assert answer.headers.getRawHeaders("Access-Control-Expose-Headers") == ["Timestamp, Retry-After"]


@ensure
async def test_preflight_unknown_endpoint_and_wrong_method(relay):
    preflight = await request("OPTIONS", relay.url + "/api/v1/message")
    assert preflight.status == 204
    assert preflight.headers.getRawHeaders("Access-Control-Allow-Methods") == ["DELETE, GET, HEAD, OPTIONS, POST"]
    assert preflight.headers.getRawHeaders("Access-Control-Allow-Headers") == ["Content-Type"]
    unknown = await request("GET", relay.url + "/api/v1/nothing")
    assert (unknown.status, unknown.errno) == (404, 132)
    assert unknown.body["info"].endswith("/errors#errno-132")
    assert unknown.headers.getRawHeaders("Timestamp")
    wrong = await request("PATCH", relay.url + "/api/v1/server")
    assert (wrong.status, wrong.errno) == (405, 133)
    assert "GET" in wrong.headers.getRawHeaders("Allow")[0]
    page = await request("GET", unknown.body["info"].split("#")[0])
    assert page.status == 200 and b'id="errno-132"' in page.body


@ensure
async def test_register_lookup_and_key_errors(memory_relay, users):
    relay = memory_relay
    client = relay.client
    first = await client.register(users[0])
    assert first.status == 200 and first.body == {"user_id": users[0].user_id}
    again = await client.register(users[0])
    assert again.body == first.body
    lookup = await client.call("GET", f"/api/v1/user/{users[0].user_id}")
    assert lookup.body == {"user_id": users[0].user_id, "key": users[0].pem}
    assert (await client.call("GET", f"/api/v1/user/{users[1].user_id}")).errno == 130
    assert (await client.call("GET", "/api/v1/user/NOTANID")).errno == 106
    assert (await client.call("GET", f"/api/v1/user/{users[0].user_id}@relay.test")).errno == 106
    assert (await client.call("POST", "/api/v1/user", {"key": "nope"})).errno == 101
    assert (await client.call("POST", "/api/v1/user", {})).errno == 100
    assert (await client.call("POST", "/api/v1/user", {"key": users[1].pem, "extra": 1})).errno == 100
    assert (await client.call("POST", "/api/v1/user", raw=b"not json")).errno == 100
    duplicate = json.dumps({"key": users[1].pem})[:-1] + ', "key": "x"}'
    assert (await client.call("POST", "/api/v1/user", raw=duplicate.encode())).errno == 100
    on_query = await client.call("POST", "/api/v1/user", {"key": users[1].pem}, query={"x": "1"})
    assert on_query.errno == 100 and "query" in on_query.body["message"]
    bad_push = await client.call("POST", "/api/v1/user", {"key": users[1].pem, "push_endpoint": "https://x"})
    assert bad_push.errno == 100 and "push_endpoint" in bad_push.body["message"]


@ensure
async def test_registration_modes(start_relay, users, tmp_path):
    """Over real sockets, with the modes from a config file: the capability's socket test."""
    config = tmp_path / "token.toml"
    config.write_text('[registration]\nmode = "token"\ntokens = ["let-me-in"]\n')
    relay = await start_relay("--config", str(config))
    client = relay.client
    assert (await client.register(users[0])).errno == 121
    wrong = await client.call("POST", "/api/v1/user", {"key": users[0].pem, "registration_token": "nope"})
    assert wrong.errno == 121
    ok = await client.call("POST", "/api/v1/user", {"key": users[0].pem, "registration_token": "let-me-in"})
    assert ok.status == 200
    closed = tmp_path / "closed.toml"
    closed.write_text('[registration]\nmode = "closed"\n')
    relay2 = await start_relay("--config", str(closed))
    answer = await relay2.client.register(users[1])
    assert (answer.status, answer.errno) == (403, 121)


@ensure
async def test_signed_request_checks_in_order(memory_relay, users):
    relay = memory_relay
    client = relay.client
    alice = users[0]
    await client.register(alice)
    path = "/api/v1/token"

    async def post(params):
        return await client.call("POST", path, params)

    good = client.signed_params(alice, "POST", path)
    assert (await post({**good, "validity": "60"})).errno == 100
    assert (await post({**good, "path": path})).errno == 100
    assert (await post({**good, "user_id": "X" * 32})).errno == 106
    assert (await post(client.signed_params(alice, "POST", path, validity=301))).errno == 105
    assert (await post(client.signed_params(alice, "POST", path, validity=0))).errno == 105
    future = format_date(client.now() + 600)
    assert (await post(client.signed_params(alice, "POST", path, date=future))).errno == 105
    assert (await post(client.signed_params(alice, "POST", path, date="2026-11-22T10:00:00+01:00"))).errno == 105
    past = format_date(client.now() - 120)
    expired = await post(client.signed_params(alice, "POST", path, date=past, validity=60))
    assert (expired.status, expired.errno) == (401, 111)
    stranger = client.signed_params(users[1], "POST", path)
    assert (await post(stranger)).errno == 130
    tampered = {**good, "label": "added after signing"}
    assert (await post(tampered)).errno == 110
    other_endpoint = client.signed_params(alice, "GET", path)
    assert (await post(other_endpoint)).errno == 110
    first = await post(good)
    assert first.status == 200
    replay = await post(good)
    assert (replay.status, replay.errno) == (401, 112)


@ensure
async def test_tokens_mint_list_revoke(memory_relay, users):
    relay = memory_relay
    client = relay.client
    alice = users[0]
    await client.register(alice)
    minted = await client.signed(alice, "POST", "/api/v1/token", label="bob")
    assert minted.status == 200 and len(minted.body["token"]) >= 22 and len(minted.body["id"]) == 16
    assert minted.body["expires"].endswith("Z")
    forever = await client.signed(alice, "POST", "/api/v1/token", expires_in=0)
    assert forever.body["expires"] is None
    assert (await client.signed(alice, "POST", "/api/v1/token", expires_in=-1)).errno == 100
    listed = await client.signed(alice, "GET", "/api/v1/token")
    by_id = {t["id"]: t for t in listed.body["tokens"]}
    assert set(by_id) == {minted.body["id"], forever.body["id"]}  # minted in the same second: no order
    assert by_id[minted.body["id"]]["label"] == "bob" and by_id[forever.body["id"]]["label"] is None
    assert by_id[forever.body["id"]]["expires"] is None
    assert minted.body["token"] not in json.dumps(listed.body)
    assert (await client.signed(alice, "DELETE", "/api/v1/token", id=minted.body["id"])).body == {"revoked": 1}
    assert (await client.signed(alice, "DELETE", "/api/v1/token", token=forever.body["token"])).body == {"revoked": 1}
    assert (await client.signed(alice, "DELETE", "/api/v1/token", id=minted.body["id"])).errno == 131
    both = await client.signed(alice, "DELETE", "/api/v1/token", id="x", token="y")
    assert both.errno == 100
    assert (await client.signed(alice, "DELETE", "/api/v1/token")).errno == 100


@ensure
async def test_send_fetch_acknowledge_cycle(memory_relay, users):
    relay = memory_relay
    client = relay.client
    alice = users[0]
    await client.register(alice)
    token = await client.mint(alice)
    sent = [await client.send(alice, token, body=json.dumps({"n": n}).encode(), signature="c2ln") for n in range(3)]
    assert all(a.status == 200 for a in sent)
    answer, messages = await client.fetch(alice, limit=2)
    assert answer.body["algorithm"] == "AES-256-GCM"
    assert (answer.body["count"], answer.body["remaining"]) == (2, 1)
    assert [m["id"] for m in messages] == [a.body["message_id"] for a in sent[:2]]
    token_id = (await client.signed(alice, "GET", "/api/v1/token")).body["tokens"][0]["id"]
    assert set(messages[0]) == {"id", "token", "data", "algorithm", "password", "received", "expires", "signature"}
    assert messages[0]["token"] == token_id and messages[0]["signature"] == "c2ln"
    from msgrelay.wire.envelope import open_envelope
    assert json.loads(open_envelope([alice.key], messages[1])) == {"n": 1}
    again, refetched = await client.fetch(alice)
    assert len(refetched) == 3  # at-least-once: nothing acknowledged yet
    ack = await client.signed(alice, "DELETE", "/api/v1/message", ids=[m["id"] for m in messages] + ["nope", "../x"])
    assert ack.body == {"deleted": 2}
    _, rest = await client.fetch(alice)
    assert [m["id"] for m in rest] == [sent[2].body["message_id"]]
    assert (await client.signed(alice, "GET", "/api/v1/message", limit=0)).errno == 100
    assert (await client.signed(alice, "GET", "/api/v1/message", limit=1001)).errno == 100


@ensure
async def test_idempotent_delivery_keyed_on_token(memory_relay, users):
    relay = memory_relay
    client = relay.client
    alice = users[0]
    await client.register(alice)
    token, other_token = await client.mint(alice), await client.mint(alice)
    first = await client.send(alice, token, packet_id="p-1")
    again = await client.send(alice, token, packet_id="p-1", body=b'{"different":1}')
    assert again.body == first.body
    _, messages = await client.fetch(alice)
    assert len(messages) == 1
    await client.signed(alice, "DELETE", "/api/v1/message", ids=[messages[0]["id"]])
    after_ack = await client.send(alice, token, packet_id="p-1")
    assert after_ack.body == first.body
    assert (await client.fetch(alice))[1] == []
    other = await client.send(alice, other_token, packet_id="p-1")
    assert other.body["message_id"] != first.body["message_id"]
    await client.signed(alice, "DELETE", "/api/v1/token", token=token)
    revoked = await client.send(alice, token, packet_id="p-1")
    assert (revoked.status, revoked.errno) == (403, 120)


@ensure
async def test_message_errors(memory_relay, users):
    relay = memory_relay
    from msgrelay.wire.envelope import seal
    client = relay.client
    alice, bob = users[0], users[1]
    await client.register(alice)
    token = await client.mint(alice)
    assert (await client.send(alice, "not-a-token")).errno == 120
    assert (await client.send(bob, token)).errno == 130
    ttl = await client.send(alice, token, ttl=10**9)
    max_ttl = relay.core.settings.limits.max_ttl
    assert abs(_parse(ttl.body["expires"]) - (client.now() + max_ttl)) < 5
    assert (await client.send(alice, token, ttl=0)).errno == 104
    remote = client.packet_envelope(alice, token)
    packet = {"id": "x", "user_id": alice.user_id + "@elsewhere.example", "token": token,
              **seal(alice.key.public_key(), b"{}")}
    remote = seal(client.server_key, json.dumps(packet).encode())
    assert (await client.call("POST", "/api/v1/message", remote)).errno == 122
    bad_address = seal(client.server_key, json.dumps({**packet, "user_id": "bob"}).encode())
    assert (await client.call("POST", "/api/v1/message", bad_address)).errno == 106
    chacha_inner = {**packet, "user_id": alice.user_id, **seal(alice.key.public_key(), b"{}", "CHACHA20-POLY1305")}
    assert (await client.call("POST", "/api/v1/message", seal(client.server_key, json.dumps(chacha_inner).encode()))).errno == 102
    chacha_outer = seal(client.server_key, json.dumps({**packet, "user_id": alice.user_id}).encode(), "CHACHA20-POLY1305")
    assert (await client.call("POST", "/api/v1/message", chacha_outer)).status == 200
    envelope = client.packet_envelope(alice, token)
    assert (await client.call("POST", "/api/v1/message", {**envelope, "algorithm": "ROT13"})).errno == 102
    assert (await client.call("POST", "/api/v1/message", {**envelope, "password": "AAAA"})).errno == 103
    assert (await client.call("POST", "/api/v1/message", {"data": "x"})).errno == 100
    not_object = seal(client.server_key, b"[1, 2]")
    assert (await client.call("POST", "/api/v1/message", not_object)).errno == 104


def _parse(text):
    from msgrelay.wire.dates import parse_date
    return parse_date(text)


@ensure
async def test_quota(start_relay, users, tmp_path):
    """Over real sockets, with the quota from a config file: the capability's socket test."""
    config = tmp_path / "quota.toml"
    config.write_text("[limits]\nquota_messages = 2\n")
    relay = await start_relay("--config", str(config))
    client = relay.client
    alice = users[0]
    await client.register(alice)
    token = await client.mint(alice)
    assert (await client.send(alice, token)).status == 200
    assert (await client.send(alice, token, packet_id="same")).status == 200
    full = await client.send(alice, token)
    assert (full.status, full.errno) == (507, 160)
    assert (await client.send(alice, token, packet_id="same")).status == 200  # a duplicate stores nothing


@ensure
async def test_push_endpoint_and_account_erasure(memory_relay, users):
    relay = memory_relay
    client = relay.client
    alice = users[0]
    await client.register(alice)
    token = await client.mint(alice)
    await client.send(alice, token)
    assert (await client.signed(alice, "PUT", "/api/v1/user", push_endpoint="https://push.example/x")).body == {}
    assert (await client.signed(alice, "PUT", "/api/v1/user", push_endpoint="")).body == {}
    assert (await client.signed(alice, "PUT", "/api/v1/user", push_endpoint="ftp://x")).errno == 100
    assert (await client.signed(alice, "PUT", "/api/v1/user")).errno == 100
    assert (await client.signed(alice, "DELETE", "/api/v1/user")).body == {}
    assert (await client.call("GET", f"/api/v1/user/{alice.user_id}")).errno == 130
    assert (await client.send(alice, token)).errno == 130
    assert (await client.signed(alice, "GET", "/api/v1/message")).errno == 130
    assert (await client.register(alice)).status == 200  # the key may register afresh
    assert (await client.fetch(alice))[1] == []


@ensure
async def test_health(memory_relay):
    relay = memory_relay
    answer = await relay.client.call("GET", "/api/v1/health")
    assert (answer.status, answer.body) == (200, {"status": "ok"})


@ensure
async def test_message_expiry_is_enforced_on_fetch(memory_relay, users):
    relay = memory_relay
    client = relay.client
    alice = users[0]
    await client.register(alice)
    token = await client.mint(alice)
    await client.send(alice, token, ttl=1)
    keep = await client.send(alice, token, ttl=600)
    relay.clock.advance(2)
    _, messages = await client.fetch(alice)
    assert [m["id"] for m in messages] == [keep.body["message_id"]]
    assert await relay.core.expire() == 1


@ensure
async def test_json_body_whatever_its_content_type(relay, users):
    form = {b"Content-Type": [b"application/x-www-form-urlencoded"]}
    answer = await relay.client.call("POST", "/api/v1/user", {"key": users[0].pem}, headers=form)
    assert answer.status == 200 and answer.body == {"user_id": users[0].user_id}


GARBAGE_BODIES = [
    b"", b"\xff\xfe", b"null", b"[]", b'"x"', b"{", b'{"a":1,"a":2}', b"[" * 5000 + b"]" * 5000,
    b'{"user_id": 5, "date": [], "validity": {}, "signature": null}',
    b'{"key": "-----BEGIN PUBLIC KEY-----\\nZm9v\\n-----END PUBLIC KEY-----"}',
    b'{"algorithm": "AES-256-GCM", "password": "", "data": ""}',
    b'{"algorithm": "AES-256-GCM", "password": "====", "data": "AAAA"}',
    b'{"ids": "not a list", "user_id": "a", "date": "x", "validity": 1, "signature": "s"}',
    b'{"validity": 1e400}', b'{"validity": NaN}', b'{"\\ud800": 1}',
]
GARBAGE_QUERIES = ["", "?limit=1&limit=2", "?validity=abc", "?user_id=%FF", "?x=1", "?signature=&date=&validity=1&user_id="]


@ensure
async def test_garbage_never_gets_a_traceback_or_a_500(memory_relay):
    relay = memory_relay
    endpoints = ["/api/v1/user", "/api/v1/token", "/api/v1/message", "/api/v1/user/abc", "/api/v1/health"]
    for path in endpoints:
        for method in ("POST", "PUT", "DELETE"):
            for body in GARBAGE_BODIES:
                answer = await relay.http(method, relay.url + path, body)
                assert isinstance(answer.body, dict) and answer.body.get("errno") in range(100, 200), (method, path, body[:40], answer.body)
                assert answer.status < 500
        for query in GARBAGE_QUERIES:
            answer = await relay.http("GET", relay.url + path + query)
            assert isinstance(answer.body, dict), (path, query, answer.body)
            assert answer.status < 500 and (answer.status == 200 or answer.errno in range(100, 200)), (path, query, answer.body)
