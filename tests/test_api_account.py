"""docs/protocol.md revision 2 accounts over real sockets: push_endpoint only through the signed
PUT /user, the signed GET /user, per-user rate limits on every signed endpoint and the
per-user token cap (issue 9 items 4 and 9)."""

from __future__ import annotations

import pytest_twisted

from msgrelay.wire.dates import parse_date

ensure = pytest_twisted.ensureDeferred


@ensure
async def test_post_user_refuses_push_endpoint(relay, users):
    client, alice = relay.client, users[0]
    answer = await client.call("POST", "/api/v1/user", {"key": alice.pem, "push_endpoint": "https://push.example/a"})
    assert (answer.status, answer.errno) == (400, 100) and "push_endpoint" in answer.body["message"]
    assert (await client.call("GET", f"/api/v1/user/{alice.user_id}")).errno == 130  # nothing was registered
    assert (await client.register(alice)).status == 200
    again = await client.call("POST", "/api/v1/user", {"key": alice.pem, "push_endpoint": "https://push.example/a"})
    assert again.errno == 100
    account = await client.signed(alice, "GET", "/api/v1/user")
    assert account.body["push_endpoint"] is None


@ensure
async def test_get_user_describes_the_callers_own_account(start_relay, users, tmp_path):
    config = tmp_path / "quota.toml"
    config.write_text("[limits]\nquota_messages = 50\nquota_bytes = 1000000\n")
    relay = await start_relay("--config", str(config))
    client, alice, bob = relay.client, users[0], users[1]
    await client.register(alice)
    await client.register(bob)
    empty = await client.signed(alice, "GET", "/api/v1/user")
    assert empty.status == 200, empty.body
    assert set(empty.body) == {"user_id", "created", "push_endpoint", "pending", "pending_bytes", "tokens",
                               "quota_messages", "quota_bytes"}
    assert empty.body["user_id"] == alice.user_id
    assert abs(parse_date(empty.body["created"]) - client.now()) < 60
    assert (empty.body["push_endpoint"], empty.body["pending"], empty.body["pending_bytes"], empty.body["tokens"]) == (
        None, 0, 0, 0)
    assert (empty.body["quota_messages"], empty.body["quota_bytes"]) == (50, 1000000)
    token = await client.mint(alice)
    await client.mint(alice)
    sent = [await client.send(alice, token) for _ in range(3)]
    assert all(s.status == 200 for s in sent)
    _, messages = await client.fetch(alice)
    stored = sum(len(m["data"]) + len(m["password"]) + len(m.get("signature", "")) for m in messages)
    assert (await client.signed(alice, "PUT", "/api/v1/user", push_endpoint="https://push.example/a")).body == {}
    full = await client.signed(alice, "GET", "/api/v1/user")
    assert (full.body["pending"], full.body["pending_bytes"], full.body["tokens"]) == (3, stored, 2)
    assert full.body["push_endpoint"] == "https://push.example/a"
    await client.signed(alice, "DELETE", "/api/v1/message", ids=[messages[0]["id"]])
    assert (await client.signed(alice, "GET", "/api/v1/user")).body["pending"] == 2
    bobs = await client.signed(bob, "GET", "/api/v1/user")
    assert (bobs.body["user_id"], bobs.body["pending"], bobs.body["tokens"]) == (bob.user_id, 0, 0)
    wrong = client.signed_params(alice, "GET", "/api/v1/user")
    wrong["user_id"] = bob.user_id
    assert (await client.call("GET", "/api/v1/user", query=wrong)).errno == 110
    assert (await client.call("GET", "/api/v1/user")).errno == 100


@ensure
async def test_every_signed_endpoint_has_a_per_user_rate_limit(start_relay, users, tmp_path):
    config = tmp_path / "limits.toml"
    config.write_text('[rate_limits]\naccount_per_user = "2/3600"\ntoken_manage_per_user = "2/3600"\n'
                      'ack_per_user = "2/3600"\n')
    relay = await start_relay("--config", str(config))
    client, alice, bob = relay.client, users[0], users[1]
    await client.register(alice)
    await client.register(bob)
    token = await client.mint(alice)
    buckets = [  # each limit: two calls within the allowance of 2, then one refused
        [("GET", "/api/v1/user", {}), ("PUT", "/api/v1/user", {"push_endpoint": ""}), ("DELETE", "/api/v1/user", {})],
        [("GET", "/api/v1/token", {}), ("DELETE", "/api/v1/token", {"id": "0000000000000000"}),
         ("GET", "/api/v1/token", {})],
        [("DELETE", "/api/v1/message", {"ids": []})] * 3,
    ]
    for calls in buckets:
        for method, path, params in calls[:2]:
            answer = await client.signed(alice, method, path, **params)
            assert answer.errno in (None, 131), (method, path, answer.body)
        method, path, params = calls[2]
        refused = client.signed_params(alice, method, path, **params)
        def send(params: dict, method: str = method, path: str = path):
            return client.call(method, path, query=params) if method == "GET" else client.call(method, path, params)

        answer = await send(refused)
        assert (answer.status, answer.errno) == (429, 150), (method, path, answer.body)
        assert int(answer.headers.getRawHeaders("Retry-After")[0]) >= 1
        assert "rate_limits." in answer.body["message"]
        # Refused before the replay cache: the same signed request is refused as rate
        # limited again, not as a replay (the refusal cost no durable write).
        assert (await send(refused)).errno == 150
    # Per user: bob still has his whole allowance.
    assert (await client.signed(bob, "GET", "/api/v1/user")).status == 200
    assert (await client.send(alice, token)).status == 200  # sending is per address, untouched


@ensure
async def test_token_cap_per_user(start_relay, users, tmp_path):
    config = tmp_path / "cap.toml"
    config.write_text("[limits]\nmax_tokens_per_user = 2\n")
    relay = await start_relay("--config", str(config))
    client, alice = relay.client, users[0]
    await client.register(alice)
    first = await client.signed(alice, "POST", "/api/v1/token")
    await client.mint(alice)
    capped = await client.signed(alice, "POST", "/api/v1/token")
    assert (capped.status, capped.errno) == (507, 160)
    assert "limits.max_tokens_per_user" in capped.body["message"] and "2" in capped.body["message"]
    assert (await client.signed(alice, "DELETE", "/api/v1/token", id=first.body["id"])).body == {"revoked": 1}
    assert (await client.signed(alice, "POST", "/api/v1/token")).status == 200


@ensure
async def test_server_info_lists_max_fetch_bytes(relay):
    info = await relay.client.call("GET", "/api/v1/server")
    assert info.body["max_fetch_bytes"] == 4 * 1024 * 1024 >= info.body["max_body_bytes"]


def test_max_fetch_bytes_below_max_body_bytes_stops_start_up():
    import pytest

    from msgrelay.settings import SettingError, resolve

    with pytest.raises(SettingError, match="limits.max_fetch_bytes"):
        resolve({"limits.max_fetch_bytes": 1000}, {"server.name": "relay.test"})
    assert resolve({"limits.max_fetch_bytes": 1048576}, {"server.name": "relay.test"}).limits.max_fetch_bytes == 1048576


@ensure
async def test_client_library_sets_push_only_through_put_and_reads_its_account(relay, users):
    from twisted.internet import reactor

    from msgrelay.client.api import RelayClient
    from msgrelay.client.identity import Identity

    alice = users[0]
    api = RelayClient(relay.url, reactor=reactor, identity=Identity(alice.key, "relay.test"))
    try:
        assert await api.register(alice.pem) == alice.user_id
        await api.set_push_endpoint("https://push.example/alice")
        account = await api.account()
        assert (account["user_id"], account["push_endpoint"], account["pending"]) == (
            alice.user_id, "https://push.example/alice", 0)
        await api.set_push_endpoint("")
        assert (await api.account())["push_endpoint"] is None
    finally:
        await api.close()


@ensure
async def test_put_user_checks_the_push_endpoints_shape_before_the_signature(relay, users):
    """docs/protocol.md section 4.5: shape (100) comes before the unknown user (130)."""
    client, stranger = relay.client, users[3]  # never registered
    answer = await client.signed(stranger, "PUT", "/api/v1/user", push_endpoint="http://push.example/a")
    assert (answer.status, answer.errno) == (400, 100) and "push_endpoint" in answer.body["message"]
    unknown = await client.signed(stranger, "PUT", "/api/v1/user", push_endpoint="https://push.example/a")
    assert unknown.errno == 130
    body = client.signed_params(stranger, "PUT", "/api/v1/user", push_endpoint="https://push.example/a")
    body["validity"] = "60"
    wrong_type = await client.call("PUT", "/api/v1/user", body)
    assert wrong_type.errno == 100 and wrong_type.body["message"] == "validity must be an integer"
