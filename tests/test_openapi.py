"""docs/openapi.yaml against a real relay: every endpoint's real answers, success and errors.

The relay is the service tree of `twistd msgrelay` (tests/conftest.py) on a loopback port;
requests go over real sockets, and each answer's status, headers and body are validated
against the spec (tests/openapi_check.py).
"""

from __future__ import annotations

import json
import re

import pytest
import pytest_twisted
from openapi_spec_validator import validate

from apiclient import Answer, request
from msgrelay.web.api import RelayAPI
from msgrelay.wire.dates import format_date
from msgrelay.wire.envelope import open_envelope, seal
from openapi_check import problems, schema_problems, section9_problems, spec

ensure = pytest_twisted.ensureDeferred
ALL_ERRNOS = {100, 101, 102, 103, 104, 105, 106, 110, 111, 112, 120, 121, 122, 130, 131, 132, 133,
              140, 150, 160, 180, 999}


def conforms(answer: Answer, method: str, path: str, status: int, errno: int | None = None) -> None:
    """The answer has the expected status (and errno) and matches the spec in every respect."""
    assert answer.status == status, (method, path, answer.status, answer.body)
    if errno is not None:
        assert answer.errno == errno, answer.body

    def header(name: str):
        values = answer.headers.getRawHeaders(name)
        return values[0] if values else None

    body = answer.body.decode("utf-8") if isinstance(answer.body, bytes) else answer.body
    found = problems(method, path, answer.status, header, header("Content-Type"), body)
    found += section9_problems(answer.status, header("Content-Type"), body)
    assert not found, "\n".join(found)


async def registered(client, user) -> str:
    """Register `user` and mint one token for writing to it."""
    await client.register(user)
    return await client.mint(user)


# -- the document itself ---------------------------------------------------------------


def test_spec_is_valid_openapi_3_1():
    assert spec()["openapi"].startswith("3.1")
    validate(spec())


def test_every_route_is_described():
    described = {(m.upper(), p) for p, item in spec()["paths"].items() for m in item
                 if m in ("get", "put", "post", "delete")}
    for rule in RelayAPI.app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            assert (method, path) in described, f"{method} {path} is routed but not in docs/openapi.yaml"
        assert "options" in spec()["paths"][path], f"{path} has no preflight in docs/openapi.yaml"


def test_error_enums_are_section_9():
    from msgrelay.wire.errors import ERRNOS

    assert set(spec()["components"]["schemas"]["Error"]["properties"]["errno"]["enum"]) == set(ERRNOS) == ALL_ERRNOS


# -- unauthenticated endpoints -----------------------------------------------------------


@ensure
async def test_server_info(relay):
    conforms(await request("GET", relay.url + "/api/v1/server"), "GET", "/api/v1/server", 200)


@ensure
async def test_health_errors_page_preflight_unknown_and_wrong_method(relay):
    conforms(await request("GET", relay.url + "/api/v1/health"), "GET", "/api/v1/health", 200)
    conforms(await request("GET", relay.url + "/errors"), "GET", "/errors", 200)
    conforms(await request("GET", relay.url + "/errors.md"), "GET", "/errors.md", 200)
    for path in spec()["paths"]:
        if path == "/metrics":
            continue
        concrete = path.replace("{user_id}", "a" * 32)
        conforms(await request("OPTIONS", relay.url + concrete), "OPTIONS", concrete, 204)
    conforms(await request("OPTIONS", relay.url + "/api/v1/nothing"), "OPTIONS", "/api/v1/nothing", 404, 132)
    conforms(await request("GET", relay.url + "/api/v1/nothing"), "GET", "/api/v1/nothing", 404, 132)
    conforms(await request("PATCH", relay.url + "/api/v1/token"), "PATCH", "/api/v1/token", 405, 133)
    conforms(await request("POST", relay.url + "/api/v1/health"), "POST", "/api/v1/health", 405, 133)


@ensure
async def test_register_and_lookup(relay, users):
    client, alice = relay.client, users[0]
    path = "/api/v1/user"
    conforms(await client.register(alice), "POST", path, 200)
    conforms(await client.register(alice), "POST", path, 200)  # idempotent
    conforms(await client.call("POST", path, {"key": alice.pem, "colour": "red"}), "POST", path, 400, 100)
    conforms(await client.call("POST", path, raw=b"[1]"), "POST", path, 400, 100)
    conforms(await client.call("POST", path, raw=b'{"key": "a", "key": "b"}'), "POST", path, 400, 100)
    conforms(await client.call("POST", path, {"key": "-----BEGIN PUBLIC KEY-----\nxx"}), "POST", path, 400, 101)
    lookup = f"/api/v1/user/{alice.user_id}"
    answer = await client.call("GET", lookup)
    conforms(answer, "GET", lookup, 200)
    assert answer.body == {"user_id": alice.user_id, "key": alice.pem}
    conforms(await client.call("GET", "/api/v1/user/nope"), "GET", "/api/v1/user/nope", 400, 106)
    qualified = f"/api/v1/user/{alice.user_id}@relay.test"
    conforms(await client.call("GET", qualified), "GET", qualified, 400, 106)
    unknown = f"/api/v1/user/{users[1].user_id}"
    conforms(await client.call("GET", unknown), "GET", unknown, 404, 130)


@ensure
async def test_registration_closed_and_rate_limited(start_relay, users, tmp_path):
    config = tmp_path / "closed.toml"
    config.write_text('[registration]\nmode = "closed"\n[rate_limits]\nregister_per_address = "1/3600"\n')
    relay = await start_relay("--config", str(config))
    conforms(await relay.client.register(users[0]), "POST", "/api/v1/user", 403, 121)
    limited = await relay.client.register(users[0])
    conforms(limited, "POST", "/api/v1/user", 429, 150)
    assert int(limited.headers.getRawHeaders("Retry-After")[0]) >= 1


@ensure
async def test_registration_refuses_push_endpoint(relay, users):
    body = {"key": users[0].pem, "push_endpoint": "https://push.example/x"}
    conforms(await relay.client.call("POST", "/api/v1/user", body), "POST", "/api/v1/user", 400, 100)


@ensure
async def test_non_utf8_path_is_a_json_error(relay):
    path = "/api/v1/user/%ff%fe"
    conforms(await request("GET", relay.url + path), "GET", "/api/v1/user/x", 400, 100)


@ensure
async def test_oversized_body(relay):
    answer = await request("POST", relay.url + "/api/v1/message", b"{" + b" " * (1024 * 1024 + 10) + b"}")
    conforms(answer, "POST", "/api/v1/message", 413, 140)


# -- signed endpoints ----------------------------------------------------------------


@ensure
async def test_signed_request_errors(relay, users):
    client, alice, stranger = relay.client, users[0], users[1]
    await client.register(alice)
    path = "/api/v1/token"
    conforms(await client.call("GET", path, query={"user_id": alice.user_id}), "GET", path, 400, 100)
    reserved = dict(client.signed_params(alice, "GET", path), method="GET")
    conforms(await client.call("GET", path, query=reserved), "GET", path, 400, 100)
    conforms(await client.signed(alice, "GET", path, validity=301), "GET", path, 400, 105)
    conforms(await client.signed(alice, "GET", path, date="2020-01-01T00:00:00Z"), "GET", path, 401, 111)
    conforms(await client.signed(stranger, "GET", path), "GET", path, 404, 130)
    forged = client.signed_params(alice, "GET", "/api/v1/message")  # signed for another endpoint
    conforms(await client.call("GET", path, query=forged), "GET", path, 401, 110)
    bad_id = dict(client.signed_params(alice, "GET", path), user_id="UPPER")
    conforms(await client.call("GET", path, query=bad_id), "GET", path, 400, 106)
    replayed = client.signed_params(alice, "GET", path)
    conforms(await client.call("GET", path, query=replayed), "GET", path, 200)
    conforms(await client.call("GET", path, query=replayed), "GET", path, 401, 112)


@ensure
async def test_tokens(relay, users):
    client, alice = relay.client, users[0]
    await client.register(alice)
    path = "/api/v1/token"
    minted = await client.signed(alice, "POST", path, label="bob", expires_in=3600)
    conforms(minted, "POST", path, 200)
    never = await client.signed(alice, "POST", path, expires_in=0)
    conforms(never, "POST", path, 200)
    assert never.body["expires"] is None
    conforms(await client.signed(alice, "POST", path, expires_in=-1), "POST", path, 400, 100)
    conforms(await client.signed(alice, "POST", path, label="x" * 201), "POST", path, 400, 100)
    listed = await client.signed(alice, "GET", path)
    conforms(listed, "GET", path, 200)
    assert {t["id"] for t in listed.body["tokens"]} == {minted.body["id"], never.body["id"]}
    conforms(await client.signed(alice, "DELETE", path, id=minted.body["id"]), "DELETE", path, 200)
    conforms(await client.signed(alice, "DELETE", path, token=never.body["token"]), "DELETE", path, 200)
    conforms(await client.signed(alice, "DELETE", path, id=minted.body["id"]), "DELETE", path, 404, 131)
    conforms(await client.signed(alice, "DELETE", path, id="a", token="b"), "DELETE", path, 400, 100)
    conforms(await client.call("DELETE", path, {"id": "a"}, query={"x": "1"}), "DELETE", path, 400, 100)


@ensure
async def test_send_fetch_acknowledge(relay, users):
    client, alice, bob = relay.client, users[0], users[1]
    token = await registered(client, alice)
    path = "/api/v1/message"
    sent = await client.send(alice, token, signature=client.signed_params(bob, "POST", "/x")["signature"])
    conforms(sent, "POST", path, 200)
    again = await client.send(alice, token, packet_id="p1", ttl=60)
    conforms(again, "POST", path, 200)
    answer = await client.signed(alice, "GET", path, limit=10)
    conforms(answer, "GET", path, 200)
    messages = json.loads(open_envelope([alice.key], answer.body))
    assert answer.body["count"] == len(messages) == 2 and answer.body["remaining"] == 0
    for message in messages:
        assert not schema_problems("ServerMessage", message), schema_problems("ServerMessage", message)
    conforms(await client.signed(alice, "GET", path, limit=0), "GET", path, 400, 100)
    acked = await client.signed(alice, "DELETE", path, ids=[m["id"] for m in messages] + ["unknown"])
    conforms(acked, "DELETE", path, 200)
    assert acked.body == {"deleted": 2}
    conforms(await client.signed(alice, "DELETE", path, ids="notalist"), "DELETE", path, 400, 100)


@ensure
async def test_send_errors(relay, users):
    client, alice, bob = relay.client, users[0], users[1]
    token = await registered(client, alice)
    path = "/api/v1/message"
    conforms(await client.call("POST", path, {"algorithm": "AES-256-GCM"}), "POST", path, 400, 100)
    envelope = client.packet_envelope(alice, token)
    conforms(await client.call("POST", path, dict(envelope, algorithm="ROT13")), "POST", path, 400, 102)
    conforms(await client.call("POST", path, dict(envelope, password="AAAA")), "POST", path, 400, 103)
    not_packet = seal(client.server_key, b"[1, 2]")
    conforms(await client.call("POST", path, not_packet), "POST", path, 400, 104)
    chacha_inside = client.packet_envelope(alice, token, algorithm="CHACHA20-POLY1305")
    conforms(await client.call("POST", path, chacha_inside), "POST", path, 400, 102)
    conforms(await client.call("POST", path, client.packet_envelope(alice, token, user_id="x")), "POST", path, 400, 106)
    conforms(await client.send(alice, "not-a-token"), "POST", path, 403, 120)
    remote = client.packet_envelope(alice, token, user_id=f"{alice.user_id}@elsewhere.example")
    conforms(await client.call("POST", path, remote), "POST", path, 403, 122)
    conforms(await client.send(bob, token), "POST", path, 404, 130)


@ensure
async def test_packet_fields_must_be_canonical_base64(relay, users):
    client, alice = relay.client, users[0]
    token = await registered(client, alice)
    envelope = client.packet_envelope(alice, token, data="not base64!")
    conforms(await client.call("POST", "/api/v1/message", envelope), "POST", "/api/v1/message", 400, 104)


@pytest.mark.parametrize("field", ["id", "token", "data", "password"])
@ensure
async def test_lone_surrogate_in_a_packet_is_104(relay, users, field):
    """schemathesis only sends valid Unicode; a lone surrogate (JSON `\\ud800`) is tried here."""
    client, alice = relay.client, users[0]
    token = await registered(client, alice)
    packet = {"id": "p", "user_id": alice.user_id, "token": token, **seal(alice.key.public_key(), b"{}")}
    packet[field] = "LONE"
    plaintext = json.dumps(packet).replace('"LONE"', '"\\ud800"').encode()
    conforms(await client.call("POST", "/api/v1/message", seal(client.server_key, plaintext)),
             "POST", "/api/v1/message", 400, 104)


@ensure
async def test_quota(start_relay, users, tmp_path):
    config = tmp_path / "quota.toml"
    config.write_text("[limits]\nquota_messages = 1\n")
    relay = await start_relay("--config", str(config))
    client, alice = relay.client, users[0]
    token = await registered(client, alice)
    conforms(await client.send(alice, token), "POST", "/api/v1/message", 200)
    conforms(await client.send(alice, token), "POST", "/api/v1/message", 507, 160)


@ensure
async def test_push_endpoint_and_erasure(relay, users):
    client, alice = relay.client, users[0]
    await client.register(alice)
    path = "/api/v1/user"
    conforms(await client.signed(alice, "PUT", path, push_endpoint="https://127.0.0.1:9/push"), "PUT", path, 200)
    conforms(await client.signed(alice, "PUT", path, push_endpoint=""), "PUT", path, 200)
    conforms(await client.signed(alice, "PUT", path, push_endpoint="http://plain.example"), "PUT", path, 400, 100)
    conforms(await client.signed(alice, "PUT", path), "PUT", path, 400, 100)
    conforms(await client.signed(alice, "DELETE", path), "DELETE", path, 200)
    conforms(await client.signed(alice, "DELETE", path), "DELETE", path, 404, 130)


@ensure
async def test_account(relay, users):
    client, alice = relay.client, users[0]
    token = await registered(client, alice)
    await client.send(alice, token)
    answer = await client.signed(alice, "GET", "/api/v1/user")
    conforms(answer, "GET", "/api/v1/user", 200)
    assert answer.body["pending"] == 1 and answer.body["tokens"] == 1 and answer.body["push_endpoint"] is None


@ensure
async def test_metrics(start_relay, tmp_path):
    absent = await start_relay()
    conforms(await request("GET", absent.url + "/metrics"), "GET", "/metrics", 404, 132)
    config = tmp_path / "metrics.toml"
    config.write_text('[metrics]\ntoken = "s3cret-metrics-token"\n')
    relay = await start_relay("--config", str(config))
    conforms(await request("GET", relay.url + "/metrics"), "GET", "/metrics", 401, 110)
    ok = await request("GET", relay.url + "/metrics", headers={"Authorization": "Bearer s3cret-metrics-token"})
    conforms(ok, "GET", "/metrics", 200)


def test_format_date_matches_the_time_schema():
    assert not schema_problems("Time", format_date(1796201245))
