"""Push notifications (docs/protocol.md section 8) over real sockets: a local HTTPS endpoint with a
test CA, the private-address refusal, retries, the connection going to the checked address,
and the signed change and clearing of the endpoint."""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.web.server import Site

from msgrelay.federation.backoff import Backoff
from msgrelay.federation.netguard import AddressRefused, address_problem, checked_addresses, make_http_client
from test_federation_fakes import PushSink, config_file, eventually, logs  # noqa: F401 (fixture)
from tlsfiles import make_ca_and_server_cert

ensure = pytest_twisted.ensureDeferred


@pytest.fixture
def sink(tmp_path):
    """A push endpoint over HTTPS on 127.0.0.1 with a certificate for push.test (and 127.0.0.1)."""
    ca_pem, key, cert = make_ca_and_server_cert(tmp_path, "push.test")
    context = ssl.DefaultOpenSSLContextFactory(str(key), str(cert))
    endpoint = PushSink()
    port = reactor.listenSSL(0, Site(endpoint), context, interface="127.0.0.1")
    endpoint.port = port.getHost().port
    endpoint.ca_file = str(tmp_path / "ca.pem")
    yield endpoint
    pytest_twisted.blockon(port.stopListening())


def push_config(tmp_path, sink, allow_private: bool) -> str:
    return config_file(tmp_path / "push.toml", f'[push]\nallow_private = {str(allow_private).lower()}\n'
                                               f'ca_file = "{sink.ca_file}"\nretries = 2\n')


async def register_with_push(relay, user, endpoint: str) -> str:
    answer = await relay.client.register(user)
    assert answer.status == 200, answer.body
    changed = await relay.client.signed(user, "PUT", "/api/v1/user", push_endpoint=endpoint)
    assert changed.body == {}, changed.body
    return await relay.client.mint(user)


@ensure
async def test_push_reaches_a_local_endpoint_when_allowed(start_relay, users, tmp_path, sink):
    relay = await start_relay("--config", push_config(tmp_path, sink, allow_private=True))
    alice = users[0]
    token = await register_with_push(relay, alice, f"https://127.0.0.1:{sink.port}/hook/secret-path")
    sent = await relay.client.send(alice, token, body=b'{"text":"private words"}')
    assert sent.status == 200
    await eventually(lambda: sink.bodies)
    assert sink.bodies == [{"user_id": alice.user_id, "pending": 1}]
    await relay.client.send(alice, token)
    await eventually(lambda: len(sink.bodies) == 2)
    assert sink.bodies[1] == {"user_id": alice.user_id, "pending": 2}


@ensure
async def test_push_to_a_private_address_is_refused_by_default(start_relay, users, tmp_path, sink, logs):
    relay = await start_relay("--config", push_config(tmp_path, sink, allow_private=False))
    alice = users[0]
    token = await register_with_push(relay, alice, f"https://127.0.0.1:{sink.port}/hook/secret-path")
    assert (await relay.client.send(alice, token)).status == 200
    line = await eventually(lambda: next((x for x in logs() if x.startswith("push to 127.0.0.1 refused")), None))
    assert "loopback" in line and "secret-path" not in line
    assert sink.hosts == []  # nothing ever connected


@ensure
async def test_push_connects_to_the_address_it_checked(start_relay, users, tmp_path, sink):
    """A name resolved once: the request goes to that address, with the name kept for TLS and Host."""
    relay = await start_relay("--config", push_config(tmp_path, sink, allow_private=True))
    lookups: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]

    relay.service.push.http, _ = make_http_client(reactor, sink.ca_file, resolve, allow_private=True, persistent=False)
    token = await register_with_push(relay, users[0], f"https://push.test:{sink.port}/hook")
    await relay.client.send(users[0], token)
    await eventually(lambda: sink.bodies)
    assert lookups == ["push.test"] and sink.hosts == [f"push.test:{sink.port}"]


@ensure
async def test_push_name_resolving_to_a_private_address_is_refused(start_relay, users, tmp_path, sink, logs):
    relay = await start_relay("--config", push_config(tmp_path, sink, allow_private=False))

    async def resolve(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.0.0.7"]  # one private answer is enough to refuse

    relay.service.push.http, _ = make_http_client(reactor, sink.ca_file, resolve, allow_private=False,
                                                  persistent=False)
    token = await register_with_push(relay, users[0], f"https://push.test:{sink.port}/hook")
    await relay.client.send(users[0], token)
    line = await eventually(lambda: next((x for x in logs() if x.startswith("push to push.test refused")), None))
    assert "10.0.0.7 is a private address" in line and sink.hosts == []


@ensure
async def test_push_is_retried_and_never_delays_the_sender(start_relay, users, tmp_path, sink):
    relay = await start_relay("--config", push_config(tmp_path, sink, allow_private=True))
    relay.service.push.backoff = Backoff(0.2, 1)
    sink.script = [503]
    token = await register_with_push(relay, users[0], f"https://127.0.0.1:{sink.port}/hook")
    assert (await relay.client.send(users[0], token)).status == 200
    assert sink.bodies == []  # the sender had its answer before any notification was accepted
    await eventually(lambda: sink.bodies)
    assert len(sink.hosts) == 2  # the first attempt was answered 503 and retried


@ensure
async def test_endpoint_is_changed_and_cleared_by_a_signed_request(start_relay, users, tmp_path, sink):
    relay = await start_relay("--config", push_config(tmp_path, sink, allow_private=True))
    alice = users[0]
    token = await register_with_push(relay, alice, "https://push.invalid/old")
    changed = await relay.client.signed(alice, "PUT", "/api/v1/user", push_endpoint=f"https://127.0.0.1:{sink.port}/n")
    assert changed.body == {}
    await relay.client.send(alice, token)
    await eventually(lambda: sink.bodies)
    assert (await relay.client.signed(alice, "PUT", "/api/v1/user", push_endpoint="")).body == {}
    await relay.client.send(alice, token)
    await relay.client.send(alice, token)
    await eventually(lambda: relay.core.store.fetch(alice.user_id, int(time.time()), 0).addCallback(
        lambda r: r[1] == 3))
    assert len(sink.bodies) == 1 and relay.service.push.sent == 1


def test_address_classification():
    refused = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "224.0.0.1",
               "100.64.0.1", "::1", "fe80::1", "fc00::1", "::", "ff02::1", "::ffff:127.0.0.1", "240.0.0.1"]
    for address in refused:
        assert address_problem(address), address
    for address in ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"]:
        assert address_problem(address) is None, address


@ensure
async def test_checked_addresses_refuses_any_private_answer():
    async def resolve(host: str, port: int) -> list[str]:
        return ["8.8.8.8", "192.168.0.2"]

    with pytest.raises(AddressRefused, match="192.168.0.2 is a private address"):
        await checked_addresses("push.example", 443, resolve, allow_private=False)
    assert await checked_addresses("push.example", 443, resolve, allow_private=True) == ["8.8.8.8", "192.168.0.2"]
    with pytest.raises(AddressRefused, match="loopback"):
        await checked_addresses("127.0.0.1", 443, resolve, allow_private=False)
