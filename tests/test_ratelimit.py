"""Rate limits: token buckets on a Clock, client addresses behind proxies, and 429 errno 150
with Retry-After over real sockets (per address before decryption, per user after the signature)."""

from __future__ import annotations

import ipaddress

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from apiclient import request
from msgrelay.ratelimit import Rate, RateLimits, TokenBuckets, client_host, parse_networks
from msgrelay.settings import SettingError, resolve
from msgrelay.wire.errors import ProtocolError

ensure = pytest_twisted.ensureDeferred


def settings(**values):
    return resolve({}, {f"rate_limits.{k}": v for k, v in values.items()})


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return str(path)


# -- units -----------------------------------------------------------------------


def test_rate_parsing_and_setting_errors():
    assert Rate.parse("20/3600") == Rate(20, 3600)
    assert Rate.parse(" 5 / 1 ") == Rate(5, 1)
    assert Rate.parse("off") is None
    for bad in ("20", "0/60", "5/0", "x/y", "-1/5", "1.5/60"):
        with pytest.raises(ValueError):
            Rate.parse(bad)
    with pytest.raises(SettingError) as info:
        settings(send_per_address="lots")
    assert str(info.value).startswith("rate_limits.send_per_address")
    with pytest.raises(SettingError) as info:
        resolve({}, {"server.trusted_proxies": ["10.0.0.0/8", "proxy.example"]})
    assert str(info.value).startswith("server.trusted_proxies")


def test_bucket_trips_and_recovers_after_the_window():
    clock = task.Clock()
    buckets = TokenBuckets(clock)
    rate = Rate(3, 60)
    assert [buckets.take("a", rate, 100) for _ in range(3)] == [0, 0, 0]
    assert buckets.take("a", rate, 100) == pytest.approx(20.0)  # one token refills in 60/3 s
    assert buckets.take("b", rate, 100) == 0  # other keys are independent
    clock.advance(20)
    assert buckets.take("a", rate, 100) == 0
    assert buckets.take("a", rate, 100) > 0
    clock.advance(60)  # a whole window: the whole allowance is back, and no more
    assert [buckets.take("a", rate, 100) for _ in range(4)][:3] == [0, 0, 0]
    assert buckets.take("a", rate, 100) > 0


def test_bucket_memory_is_bounded():
    clock = task.Clock()
    buckets = TokenBuckets(clock)
    for i in range(1000):
        buckets.take(f"k{i}", Rate(1, 60), 50)
    assert len(buckets) == 50
    # The most recent keys are remembered (still limited), the oldest were forgotten.
    assert buckets.take("k999", Rate(1, 60), 50) > 0
    assert buckets.take("k0", Rate(1, 60), 50) == 0


def test_rate_limits_raise_150_with_retry_after_and_follow_settings():
    clock = task.Clock()
    s = settings(fetch_per_user="2/10", register_per_address="off")
    limits = RateLimits(s, clock)
    refused = []
    limits.observers.append(refused.append)
    limits.check_user("fetch", "alice")
    limits.check_user("fetch", "alice")
    with pytest.raises(ProtocolError) as info:
        limits.check_user("fetch", "alice")
    assert info.value.errno == 150 and info.value.status == 429
    assert info.value.retry_after == 5
    assert "rate_limits.fetch_per_user" in info.value.message
    assert refused == ["fetch"]
    limits.check_user("fetch", "bob")
    for _ in range(100):
        limits.check_address("register", "192.0.2.1")  # "off"
    # A reload that raises the limit applies to the next check.
    limits.reconfigure(s.reload_to(settings(fetch_per_user="100/10", register_per_address="off")))
    limits.check_user("fetch", "alice")


def test_ipv6_clients_share_a_prefix_and_exempt_networks_pass():
    clock = task.Clock()
    s = settings(send_per_address="1/60", exempt=["192.0.2.0/24"])
    limits = RateLimits(s, clock)
    limits.check_address("send", "2001:db8:1:2::1")
    with pytest.raises(ProtocolError):
        limits.check_address("send", "2001:db8:1:2:ffff::9")  # same /64
    limits.check_address("send", "2001:db8:1:3::1")  # another /64
    for _ in range(5):
        limits.check_address("send", "192.0.2.77")
    assert limits.address_key("::ffff:198.51.100.1") == "198.51.100.1"


def test_client_address_from_forwarded_for_only_behind_trusted_proxies():
    trusted = parse_networks(["127.0.0.1", "10.0.0.0/8"])
    # No trusted proxy: the header is ignored, whatever it says.
    assert client_host("198.51.100.7", ["203.0.113.1"], ()) == "198.51.100.7"
    # The peer is not a trusted proxy: ignored too.
    assert client_host("198.51.100.7", ["203.0.113.1"], trusted) == "198.51.100.7"
    # From a trusted proxy: the right-most untrusted hop; what the client wrote on the left is ignored.
    assert client_host("127.0.0.1", ["6.6.6.6, 203.0.113.1"], trusted) == "203.0.113.1"
    assert client_host("127.0.0.1", ["203.0.113.1", "10.1.2.3"], trusted) == "203.0.113.1"
    assert client_host("127.0.0.1", ["[2001:db8::5]:4431, 10.0.0.2"], trusted) == "2001:db8::5"
    # Only proxies in the chain, or no header: the left-most proxy, or the peer.
    assert client_host("127.0.0.1", ["10.0.0.9"], trusted) == "10.0.0.9"
    assert client_host("127.0.0.1", [], trusted) == "127.0.0.1"
    assert str(ipaddress.ip_address(client_host("127.0.0.1", ["192.0.2.1:5555"], trusted))) == "192.0.2.1"


# -- over real sockets -----------------------------------------------------------


@ensure
async def test_registration_limit_per_address_429_then_recovers(start_relay, users, tmp_path):
    """The integration test with real time: trips with 429 errno 150 and Retry-After, and
    answers again once Retry-After has passed."""
    config = write_config(tmp_path, '[rate_limits]\nregister_per_address = "2/2"\n')
    relay = await start_relay("--config", config)
    client = relay.client
    assert (await client.register(users[0])).status == 200
    assert (await client.register(users[1])).status == 200
    refused = await client.register(users[2])
    assert refused.status == 429 and refused.errno == 150
    retry_after = int(refused.headers.getRawHeaders("Retry-After")[0])
    assert retry_after == 1
    assert "register_per_address" in refused.body["message"]
    await task.deferLater(reactor, retry_after + 0.1, lambda: None)
    assert (await client.register(users[2])).status == 200


@ensure
async def test_send_limit_is_checked_before_decryption(start_relay, users, tmp_path):
    config = write_config(tmp_path, '[rate_limits]\nsend_per_address = "3/3600"\n')
    relay = await start_relay("--config", config)
    client = relay.client
    garbage = {"algorithm": "RSA-OAEP-256+AES-256-GCM", "password": "AAAA", "data": "AAAA"}
    answers = [await client.call("POST", "/api/v1/message", garbage) for _ in range(4)]
    assert [a.status for a in answers[:3]] == [400, 400, 400]  # decrypted (and refused) ...
    assert answers[3].status == 429 and answers[3].errno == 150  # ... until the limit, checked first
    # Registration has its own allowance.
    assert (await client.register(users[0])).status == 200


@ensure
async def test_fetch_and_token_limits_are_per_user_after_the_signature(start_relay, users, tmp_path):
    config = write_config(tmp_path, '[rate_limits]\nfetch_per_user = "2/3600"\ntoken_per_user = "1/3600"\n')
    relay = await start_relay("--config", config)
    client = relay.client
    alice, bob, mallory = users[0], users[1], users[2]
    for user in (alice, bob, mallory):
        await client.register(user)
    # Requests naming alice but signed by someone else fail authentication and use none of her allowance.
    for _ in range(5):
        forged = client.signed_params(mallory, "GET", "/api/v1/message")
        forged["user_id"] = alice.user_id
        assert (await client.call("GET", "/api/v1/message", query=forged)).errno == 110
    assert (await client.fetch(alice))[0].status == 200
    assert (await client.fetch(alice))[0].status == 200
    limited, _ = await client.fetch(alice)
    assert limited.status == 429 and limited.errno == 150
    assert int(limited.headers.getRawHeaders("Retry-After")[0]) > 1000
    assert (await client.fetch(bob))[0].status == 200  # per user
    await client.mint(alice)
    second = await client.signed(alice, "POST", "/api/v1/token")
    assert second.status == 429 and second.errno == 150
    await client.mint(bob)


@ensure
async def test_forwarded_for_counts_clients_behind_a_trusted_proxy(start_relay, users, tmp_path):
    config = write_config(tmp_path, '[server]\ntrusted_proxies = ["127.0.0.1"]\n'
                                    '[rate_limits]\nregister_per_address = "1/3600"\n')
    relay = await start_relay("--config", config)
    url = relay.url + "/api/v1/user"

    async def register(user, forwarded):
        headers = {"X-Forwarded-For": forwarded} if forwarded else None
        import json
        return await request("POST", url, json.dumps({"key": user.pem}).encode(), headers)

    assert (await register(users[0], "203.0.113.1")).status == 200
    assert (await register(users[1], "203.0.113.2")).status == 200  # another client behind the proxy
    assert (await register(users[2], "6.6.6.6, 203.0.113.1")).errno == 150  # spoofed left hop ignored
    assert (await register(users[3], None)).status == 200  # the proxy itself


@ensure
async def test_forwarded_for_is_ignored_without_trusted_proxies(start_relay, users, tmp_path):
    config = write_config(tmp_path, '[rate_limits]\nregister_per_address = "1/3600"\n')
    relay = await start_relay("--config", config)
    import json
    url = relay.url + "/api/v1/user"
    first = await request("POST", url, json.dumps({"key": users[0].pem}).encode(), {"X-Forwarded-For": "203.0.113.1"})
    second = await request("POST", url, json.dumps({"key": users[1].pem}).encode(), {"X-Forwarded-For": "203.0.113.2"})
    assert first.status == 200 and second.errno == 150
