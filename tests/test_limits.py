"""Body limit (413 errno 140, answered from the headers, with a lingering close) and a full
disk (503 errno 180)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.threads import deferToThread

ensure = pytest_twisted.ensureDeferred


class RawHTTP(protocol.Protocol):
    """Sends bytes, collects the answer until the server closes the connection."""

    def __init__(self):
        self.received = b""
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(self.received)


async def raw_exchange(port: int, data: bytes) -> bytes:
    proto = RawHTTP()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    proto.transport.write(data)
    return await proto.closed.addTimeout(10, reactor)


def split(answer: bytes) -> tuple[bytes, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, json.loads(body)


@ensure
async def test_oversized_content_length_is_refused_before_the_body(relay):
    # Announce 50 MB and send none of it: the relay must answer and close at once.
    head, body = split(await raw_exchange(
        relay.port,
        b"POST /api/v1/message HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 50000000\r\n\r\n",
    ))
    assert head.startswith(b"HTTP/1.1 413")
    assert b"Access-Control-Allow-Origin: *" in head and b"Timestamp: " in head
    assert body["errno"] == 140 and "1048576" in body["message"]


@ensure
async def test_oversized_chunked_body_is_cut_off(relay):
    chunk = b"x" * 65536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(20))
    head, body = split(await raw_exchange(
        relay.port,
        b"POST /api/v1/user HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks,
    ))
    assert head.startswith(b"HTTP/1.1 413") and body["errno"] == 140


def send_whole_body(port: int, head: bytes, body: bytes) -> bytes:
    """An ordinary client: default buffers, writes everything, then reads the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + body)
        received = b""
        while True:
            data = s.recv(65536)
            if not data:
                return received
            received += data


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@ensure
async def test_a_client_sending_a_whole_oversized_body_reads_the_413(relay, framing):
    body = b'{"pad":"' + b"x" * (6 * 1024 * 1024) + b'"}'
    if framing == "chunked":
        head = b"POST /api/v1/message HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                        for part in (body[i:i + 65536] for i in range(0, len(body), 65536))) + b"0\r\n\r\n"
    else:
        head = b"POST /api/v1/message HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    answer = await deferToThread(send_whole_body, relay.port, head, body)
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 413 Request Entity Too Large"
    error = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert error["errno"] == 140 and "max_body_bytes" in error["message"]


@ensure
async def test_body_within_limit_chunked_is_accepted(relay, users):
    payload = json.dumps({"key": users[0].pem}).encode()
    answer = await raw_exchange(
        relay.port,
        b"POST /api/v1/user HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload),
    )
    head, body = split(answer)
    assert head.startswith(b"HTTP/1.1 200") and body == {"user_id": users[0].user_id}


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB tmpfs, so the disk really fills up (needs root, as CI has)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@ensure
async def test_disk_full_answers_180_and_loses_nothing(start_relay, users, small_disk):
    relay = await start_relay(state_dir=small_disk / "state")
    client = relay.client
    alice = users[0]
    await client.register(alice)
    token = await client.mint(alice)
    stored = await client.send(alice, token)
    assert stored.status == 200
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(os.urandom(65536))
        except OSError:
            pass
    full = await client.send(alice, token, body=b'{"big":"' + b"y" * 200_000 + b'"}')
    assert (full.status, full.errno) == (503, 180)
    health = await client.call("GET", "/api/v1/health")
    assert (health.status, health.errno) == (503, 180)
    # A signed request needs a durable replay-cache entry: refused when it cannot be written;
    # answered when its line fits in the journal's block already allocated.
    answer, during = await client.fetch(alice)
    assert (answer.status, answer.errno) in ((503, 180), (200, None)), answer
    if answer.status == 200:
        assert [m["id"] for m in during] == [stored.body["message_id"]]
    filler.unlink()
    assert (await client.call("GET", "/api/v1/health")).status == 200
    _, messages = await client.fetch(alice)
    assert [m["id"] for m in messages] == [stored.body["message_id"]]
    assert (await client.send(alice, token)).status == 200
    assert not any(name for name in _tmp_files(small_disk / "state")), "a half-written file was left behind"


def _tmp_files(state):
    for dirpath, _dirnames, filenames in os.walk(state):
        if os.path.basename(dirpath) == "tmp":
            yield from filenames


@ensure
async def test_keep_alive_serves_several_requests_on_one_connection(relay, users):
    body = json.dumps({"key": users[0].pem}).encode()
    requests = (
        b"GET /api/v1/server HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"POST /api/v1/user HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        + b"GET /api/v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    answer = await raw_exchange(relay.port, requests)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert statuses == [b"200", b"200", b"404", b"200"]
