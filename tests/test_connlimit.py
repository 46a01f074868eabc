"""Connection caps (issue 9 item 6).

Unit tests drive the limiter with string transports; the rest use real sockets: one address
(127.0.0.2) holding many idle keep-alive connections does not lock out another client, also
when the relay's open-file limit is low (the real twistd relay)."""

from __future__ import annotations

import json
import os
import resource
import socket
import time
import urllib.request

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread

from relayproc import RelayProcess, free_port
from msgrelay.web.connlimit import ConnectionLimiter, connection_capacity

ensure = pytest_twisted.ensureDeferred


# -- units ---------------------------------------------------------------------------


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


def limiter(per_address=2, total=3, clock=None):
    return ConnectionLimiter(Factory.forProtocol(Echo), clock or task.Clock(), lambda: per_address, lambda: total,
                             key=lambda host: None if host == "192.0.2.99" else host)


def connect(factory, host):
    protocol = factory.buildProtocol(IPv4Address("TCP", host, 40000))
    transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
                                peerAddress=IPv4Address("TCP", host, 40000))
    protocol.makeConnection(transport)
    return protocol, transport


def refused(transport) -> dict:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 5" in head, head
    return json.loads(body)


def test_per_address_and_total_caps_and_release():
    clock = task.Clock()
    factory = limiter(clock=clock)
    a1, _ = connect(factory, "192.0.2.1")
    a2, _ = connect(factory, "192.0.2.1")
    _, t3 = connect(factory, "192.0.2.1")
    body = refused(t3)
    assert body["errno"] == 180 and "connections.per_address" in body["message"]
    assert body["info"] == "http://127.0.0.1:8080/errors#errno-180"
    b1, tb = connect(factory, "192.0.2.2")  # another address is served
    tb.clear()
    b1.dataReceived(b"ping")
    assert tb.value() == b"ping"
    _, t5 = connect(factory, "192.0.2.3")  # but the total is 3
    assert "connections.max_total" in refused(t5)["message"]
    a1.connectionLost(None)
    assert factory.open == 2 and factory.by_key == {"192.0.2.1": 1, "192.0.2.2": 1}
    p, t = connect(factory, "192.0.2.3")
    assert t.value() == b"" and factory.open == 3
    assert factory.refused == 2
    clock.advance(2)  # refused connections linger briefly, then close
    assert t3.disconnecting and t5.disconnecting


def test_unlimited_addresses_count_only_towards_the_total():
    factory = limiter(per_address=1, total=3)
    for _ in range(3):
        _, t = connect(factory, "192.0.2.99")
        assert t.value() == b""
    _, t = connect(factory, "192.0.2.99")
    assert "max_total" in refused(t)["message"]


def test_refusals_beyond_a_bound_are_closed_without_an_answer():
    from msgrelay.web.connlimit import MAX_REFUSING

    factory = limiter(per_address=1, total=1000)
    connect(factory, "192.0.2.1")
    for _ in range(MAX_REFUSING):
        refused(connect(factory, "192.0.2.1")[1])
    _, transport = connect(factory, "192.0.2.1")
    assert transport.value() == b"" and transport.disconnecting


def test_capacity_keeps_descriptors_in_reserve():
    assert connection_capacity(2048, 1048576, 256) == 2048
    assert connection_capacity(2048, 1024, 256) == 768
    assert connection_capacity(2048, 512, 256) == 256
    assert connection_capacity(2048, 256, 256) == 128  # never below half the limit


# -- real sockets ----------------------------------------------------------------------


def open_keep_alive(port: int, count: int, source: str) -> tuple[list[socket.socket], int, int]:
    """`count` connections from `source`, each sending one keep-alive request; (sockets, served, refused)."""
    sockets, served, refused_count = [], 0, 0
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0))
        s.sendall(b"GET /api/v1/server HTTP/1.1\r\nHost: x\r\n\r\n")
        head = s.recv(65536)
        if head.startswith(b"HTTP/1.1 200"):
            served += 1
            sockets.append(s)  # kept open and idle
        else:
            assert head.startswith(b"HTTP/1.1 503") and b'"errno":180' in head.replace(b" ", b""), head[:200]
            refused_count += 1
            s.close()
    return sockets, served, refused_count


def health(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=20) as response:
        return response.status


@ensure
async def test_one_address_with_many_idle_connections_does_not_lock_out_another(start_relay, tmp_path):
    config = tmp_path / "caps.toml"
    config.write_text("[connections]\nper_address = 8\n")
    relay = await start_relay("--config", str(config))
    held, served, refused_count = await deferToThread(open_keep_alive, relay.port, 30, "127.0.0.2")
    try:
        assert (served, refused_count) == (8, 22)
        assert relay.service.connections.by_key.get("127.0.0.2") == 8
        assert relay.service.metrics.registry.get_sample_value(
            "msgrelay_connections_refused_total", {"cap": "per_address"}) == 22
        assert await deferToThread(health, relay.port) == 200  # from 127.0.0.1
        held.pop().close()
        deadline = time.monotonic() + 10
        while relay.service.connections.by_key.get("127.0.0.2") != 7 and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.02, lambda: None)
        more, served, _ = await deferToThread(open_keep_alive, relay.port, 1, "127.0.0.2")
        assert served == 1
        held += more
    finally:
        for s in held:
            s.close()


def test_a_low_open_file_limit_does_not_let_one_address_lock_out_others(tmp_path):
    """Issue 9 item 6 as reproduced: the real relay with 512 descriptors, one address opening
    600 idle connections, another client still served."""
    port = free_port()

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))

    relay = RelayProcess(tmp_path / "state", port=port, listen=f"tcp:{port}:interface=127.0.0.1:backlog=1024",
                         preexec_fn=low_limit).start()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    attacker: list[socket.socket] = []
    try:
        for _ in range(600):
            s = socket.socket()
            s.settimeout(20)
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", port))
            attacker.append(s)
        assert health(port) == 200
        open_fds = len(os.listdir(f"/proc/{relay.proc.pid}/fd"))
        assert open_fds < 256, f"the relay holds {open_fds} descriptors"
        assert "connection limits: 64 per client address, 256 in total" in relay.log()
    finally:
        for s in attacker:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        relay.stop()


def read_answer(s) -> tuple[bytes, dict]:
    """One HTTP answer read by its Content-Length: (status line, JSON body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "closed in the middle of an answer"
        body += chunk
    return head.split(b"\r\n", 1)[0], json.loads(body)


@ensure
async def test_caps_and_the_lingering_close_over_tls(start_relay, tmp_path):
    import ssl

    from tlsfiles import make_ca_and_server_cert

    ca_pem, key_path, cert_path = make_ca_and_server_cert(tmp_path, "localhost")
    config = tmp_path / "caps.toml"
    config.write_text("[connections]\nper_address = 2\n")
    port = free_port()
    await start_relay("--config", str(config),
                      "--listen", f"ssl:{port}:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}")
    context = ssl.create_default_context(cadata=ca_pem.decode())

    def tls(source: str):
        raw = socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0))
        return context.wrap_socket(raw, server_hostname="localhost")

    def scenario() -> None:
        held = []
        for _ in range(2):
            s = tls("127.0.0.2")
            s.sendall(b"GET /api/v1/server HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert read_answer(s)[0].startswith(b"HTTP/1.1 200")
            held.append(s)
        try:
            with tls("127.0.0.2") as s:
                status, body = read_answer(s)
                assert status.startswith(b"HTTP/1.1 503") and body["errno"] == 180
            with tls("127.0.0.1") as s:  # another address: served, and it can send a whole oversized body
                body = b'{"pad":"' + b"x" * (3 * 1024 * 1024) + b'"}'
                s.sendall(b"POST /api/v1/message HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % len(body)
                          + body)
                status, error = read_answer(s)
                assert status.startswith(b"HTTP/1.1 413") and error["errno"] == 140
        finally:
            for s in held:
                s.close()

    await deferToThread(scenario)
