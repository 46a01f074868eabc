"""Federation over real sockets: relays built by makeService in this process, peers over
verified TLS (a test CA made at test time) or scripted fake peers over explicit plain http."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.web.server import Site

from apiclient import request
from msgrelay.wire.envelope import open_envelope
from test_federation_fakes import FakePeer, config_file, eventually, logs, peer_key, tls_listener  # noqa: F401

ensure = pytest_twisted.ensureDeferred


def listen_fake(peer) -> int:
    port = reactor.listenTCP(0, Site(peer), interface="127.0.0.1")
    listen_fake.ports.append(port)
    return port.getHost().port


listen_fake.ports = []


@pytest.fixture(autouse=True)
def close_fakes():
    yield
    for port in listen_fake.ports:
        pytest_twisted.blockon(port.stopListening())
    listen_fake.ports.clear()


async def recipient_at(relay, user) -> str:
    """Register `user` on `relay` and mint a token a sender may use."""
    assert (await relay.client.register(user)).status == 200
    return await relay.client.mint(user)


async def send_via(relay, user, server_name: str, token: str, text: str, **kw) -> dict:
    answer = await relay.client.send(user, token, body=json.dumps({"text": text}).encode(),
                                     user_id=f"{user.user_id}@{server_name}", **kw)
    assert answer.status == 200, answer.body
    return answer.body


async def texts(relay, user) -> list[str]:
    _, messages = await relay.client.fetch(user)
    return [json.loads(open_envelope([user.key], m))["text"] for m in messages]


def fed_config(tmp_path, name: str, mode: str = "allowlist", ca: bytes = b"", **extra: int) -> str:
    lines = ["[federation]", f'mode = "{mode}"', "backoff_min = 1", "backoff_max = 2"]
    if ca:
        (tmp_path / f"{name}-ca.pem").write_bytes(ca)
        lines.append(f'ca_file = "{tmp_path / f"{name}-ca.pem"}"')
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return config_file(tmp_path / f"{name}.toml", "\n".join(lines) + "\n")


@ensure
async def test_forward_over_verified_tls_with_a_matching_pin(start_relay, users, tmp_path):
    port, listen, ca = tls_listener(tmp_path / "tls-b", "localhost")
    b = await start_relay("--server-name", "b.test", "--listen", listen)
    token = await recipient_at(b, users[1])
    pin = b.core.keyring.fingerprint
    a = await start_relay("--server-name", "a.test", "--config", fed_config(tmp_path, "a", ca=ca),
                          "--peer", f"b.test=https://localhost:{port}#{pin}")
    sent = await send_via(a, users[1], "b.test", token, "over tls")
    assert sent["message_id"] and sent["expires"].endswith("Z")
    assert await eventually(lambda: texts(b, users[1])) == ["over tls"]
    # B stores the message before A hears B's answer and dequeues it: poll for the dequeue.
    await eventually(lambda: a.service.federation.queue_status()[0]["queued"] == 0)
    status = a.service.federation.queue_status()
    assert status == [{"destination": "b.test", "queued": 0, "oldest_age_seconds": 0.0, "backoff_seconds": 0.0,
                       "failures": 0, "next_attempt": None, "pinned_ok": True}]


@ensure
async def test_pinned_fingerprint_mismatch_stops_delivery(start_relay, users, tmp_path, logs):
    port, listen, ca = tls_listener(tmp_path / "tls-b", "localhost")
    b = await start_relay("--server-name", "b.test", "--listen", listen)
    token = await recipient_at(b, users[1])
    a = await start_relay("--server-name", "a.test", "--config", fed_config(tmp_path, "a", ca=ca),
                          "--peer", f"b.test=https://localhost:{port}#{'0' * 64}")
    await send_via(a, users[1], "b.test", token, "never")
    mismatch = [line for line in await eventually(
        lambda: [x for x in logs() if "NOT delivering to b.test" in x] if len(
            [x for x in logs() if "NOT delivering to b.test" in x]) >= 2 else None, timeout=8)]
    assert b.core.keyring.fingerprint in mismatch[0] and "0" * 64 in mismatch[0]
    assert await texts(b, users[1]) == []
    status = a.service.federation.queue_status()[0]
    assert status["queued"] == 1 and status["pinned_ok"] is False


@ensure
async def test_certificate_for_another_host_is_not_trusted(start_relay, users, tmp_path, logs):
    port, listen, ca = tls_listener(tmp_path / "tls-b", "other.example")
    b = await start_relay("--server-name", "b.test", "--listen", listen)
    token = await recipient_at(b, users[1])
    a = await start_relay("--server-name", "a.test", "--config", fed_config(tmp_path, "a", ca=ca),
                          "--peer", f"b.test=https://localhost:{port}")
    await send_via(a, users[1], "b.test", token, "never")
    await eventually(lambda: a.service.federation.queues["b.test"].failures >= 1)
    assert await texts(b, users[1]) == []
    problem = a.service.federation.queues["b.test"].last_error
    assert "server key" in problem and "VerificationError" in problem and "DNSMismatch" in problem


@ensure
async def test_allowlist_and_off_refuse_with_errno_122(start_relay, users, tmp_path):
    a = await start_relay("--server-name", "a.test", "--config", fed_config(tmp_path, "a"),
                          "--peer", "b.test=https://localhost:1")
    refused = await a.client.send(users[1], "tok", user_id=f"{users[1].user_id}@c.test")
    assert (refused.status, refused.errno) == (403, 122) and "c.test" in refused.body["message"]
    assert (await a.client.send(users[1], "tok", user_id=f"{users[1].user_id}@b.test")).status == 200
    off = await start_relay("--server-name", "o.test")
    assert (await off.client.send(users[1], "tok", user_id=f"{users[1].user_id}@b.test")).errno == 122


@ensure
async def test_peer_answering_400_drops_the_packet_with_a_log_line(start_relay, users, tmp_path, logs):
    fake = FakePeer("b.test", peer_key(0))
    fake.script = [(400, {"code": 400, "errno": 120, "message": "access token invalid"}, {})]
    a = await start_relay("--server-name", "a.test", "--config", fed_config(tmp_path, "a"),
                          "--peer", f"b.test=http://127.0.0.1:{listen_fake(fake)}")
    await send_via(a, users[1], "b.test", "tok", "refused")
    await send_via(a, users[1], "b.test", "tok", "taken")
    await eventually(lambda: len(fake.received) == 1)
    assert fake.posts == 2
    inner = json.loads(open_envelope([users[1].key], fake.received[0][0]))
    assert inner == {"text": "taken"}
    assert any("b.test refused" in x and "HTTP 400 errno 120" in x and "dropped" in x for x in logs())
    await eventually(lambda: a.service.federation.queue_status()[0]["queued"] == 0)


@ensure
async def test_peer_answering_503_then_200_is_retried(start_relay, users, tmp_path):
    fake = FakePeer("b.test", peer_key(0))
    fake.script = [(503, {"code": 503, "errno": 180}, {}), (503, {"code": 503, "errno": 180}, {})]
    a = await start_relay("--server-name", "a.test", "--config", fed_config(tmp_path, "a"),
                          "--peer", f"b.test=http://127.0.0.1:{listen_fake(fake)}")
    await send_via(a, users[1], "b.test", "tok", "eventually", ttl=3600)
    await eventually(lambda: fake.received)
    assert fake.posts == 3  # the backoff between attempts is timed on a Clock in test_federation_units.py
    packet, headers = fake.received[0]
    assert headers["msgrelay-forwarded-by"] == ["a.test"]
    assert packet["user_id"] == f"{users[1].user_id}@b.test" and 3590 <= packet["ttl"] <= 3600


@ensure
async def test_a_forwarded_packet_naming_a_third_relay_is_refused(start_relay, users, tmp_path):
    b = await start_relay("--server-name", "b.test", "--config", fed_config(tmp_path, "b", mode="open"))
    envelope = b.client.packet_envelope(users[1], "tok", user_id=f"{users[1].user_id}@c.test")
    answer = await b.client.call("POST", "/api/v1/message", envelope, headers={"MsgRelay-Forwarded-By": "a.test"})
    assert (answer.status, answer.errno) == (403, 122)
    assert b.service.federation.queue_status() == []


@ensure
async def test_a_silent_peer_never_delays_another(start_relay, users, tmp_path):
    class Silent(Protocol):
        def dataReceived(self, data: bytes) -> None:
            pass  # accept the connection, never answer

    silent = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    listen_fake.ports.append(silent)
    fake = FakePeer("c.test", peer_key(0))
    # b.test's requests time out only after 60 s: c.test's packet arriving well before shows
    # that it never waited behind them.
    a = await start_relay("--server-name", "a.test", "--config", fed_config(tmp_path, "a", timeout=60),
                          "--peer", f"b.test=http://127.0.0.1:{silent.getHost().port}",
                          "--peer", f"c.test=http://127.0.0.1:{listen_fake(fake)}")
    await send_via(a, users[1], "b.test", "tok", "stuck")
    await send_via(a, users[2], "c.test", "tok", "fast")
    await eventually(lambda: fake.received, timeout=30)
    b_status = next(s for s in a.service.federation.queue_status() if s["destination"] == "b.test")
    assert b_status["queued"] == 1


@ensure
async def test_open_mode_refuses_private_address_destinations(start_relay, users, tmp_path):
    a = await start_relay("--server-name", "a.test", "--config", fed_config(tmp_path, "a", mode="open"))
    for dest in ("127.0.0.1:8080", "10.1.2.3", "169.254.0.1"):
        answer = await a.client.send(users[1], "tok", user_id=f"{users[1].user_id}@{dest}")
        assert answer.errno == 122, dest


@ensure
async def test_server_info_of_a_peer_is_fetched_with_the_right_name(start_relay, users, tmp_path):
    """A peer table entry pointing at a relay that calls itself otherwise delivers nothing."""
    fake = FakePeer("b.test", peer_key(0), advertised_name="elsewhere.test")
    a = await start_relay("--server-name", "a.test", "--config", fed_config(tmp_path, "a"),
                          "--peer", f"b.test=http://127.0.0.1:{listen_fake(fake)}")
    await send_via(a, users[1], "b.test", "tok", "x")
    await eventually(lambda: a.service.federation.queues["b.test"].failures >= 1)
    assert fake.posts == 0 and "calls itself" in a.service.federation.queues["b.test"].last_error
    assert (await request("GET", a.url + "/api/v1/server")).body["name"] == "a.test"


@ensure
async def test_a_second_relay_on_the_same_state_dir_is_refused(tmp_path, capsys):
    from msgrelay.service import Options, makeService

    options = Options()
    options.parseOptions(["--state-dir", str(tmp_path / "s"), "--server-name", "a.test",
                          "--listen", "tcp:0:interface=127.0.0.1"])
    first = makeService(options, reactor)
    first.startService()
    try:
        with pytest.raises(SystemExit) as info:
            makeService(options, reactor)
        assert info.value.code == 1
        assert "in use by a running relay" in capsys.readouterr().err
    finally:
        await maybeDeferred(first.stopService)
