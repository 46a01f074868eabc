"""Test doubles for federation tests (no tests here): a scripted fake peer relay and a push sink.

`FakePeer` is a twisted.web resource, so the same object serves `treq.testing.StubTreq` in
clock-driven unit tests and a real listening port in socket tests.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.web import server
from twisted.web.resource import Resource

from msgrelay.wire.envelope import open_envelope
from msgrelay.wire.keys import fingerprint, public_key_pem

_KEYS: list[rsa.RSAPrivateKey] = []


def peer_key(index: int = 0) -> rsa.RSAPrivateKey:
    while len(_KEYS) <= index:
        _KEYS.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _KEYS[index]


class FakePeer(Resource):
    """A relay that answers `/api/v1/server` and takes `POST /api/v1/message` as scripted.

    `script` holds (status, body, headers) answers used in turn; when it is empty, 200.
    Every POST is decrypted with `key` and recorded with its headers in `received`.
    """

    isLeaf = True

    def __init__(self, name: str, key: Optional[rsa.RSAPrivateKey] = None, advertised_name: Optional[str] = None):
        super().__init__()
        self.name = name
        self.key = key or peer_key(0)
        self.advertised_key = self.key
        self.advertised_name = advertised_name or name
        self.script: list[tuple[int, dict[str, Any], dict[str, str]]] = []
        self.received: list[tuple[dict[str, Any], dict[str, list[str]]]] = []
        self.key_fetches = 0
        self.posts = 0
        self.hang = False
        self.pending: list[Any] = []

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.advertised_key.public_key())

    def packets(self) -> list[dict[str, Any]]:
        return [p for p, _ in self.received]

    def render_GET(self, request: Any) -> bytes:
        if request.path != b"/api/v1/server":
            request.setResponseCode(404)
            return b"{}"
        self.key_fetches += 1
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"name": self.advertised_name, "key": public_key_pem(self.advertised_key.public_key()),
                           "fingerprint": self.fingerprint}).encode()

    def render_POST(self, request: Any) -> Any:
        self.posts += 1
        if self.hang:
            self.pending.append(request)
            return server.NOT_DONE_YET
        request.setHeader(b"Content-Type", b"application/json")
        envelope = json.loads(request.content.read())
        if self.script:
            status, body, headers = self.script.pop(0)
            if status != 200:
                request.setResponseCode(status)
                for name, value in headers.items():
                    request.setHeader(name.encode(), value.encode())
                return json.dumps(body).encode()
        try:
            packet = json.loads(open_envelope([self.key], envelope))
        except Exception:
            request.setResponseCode(400)
            return json.dumps({"code": 400, "errno": 103, "message": "does not decrypt"}).encode()
        headers = {k.decode().lower(): [v.decode() for v in vs] for k, vs in request.requestHeaders.getAllRawHeaders()}
        self.received.append((packet, headers))
        return json.dumps({"message_id": f"m{len(self.received)}", "expires": "2030-01-01T00:00:00Z"}).encode()


class PushSink(Resource):
    """A push endpoint: records each POSTed JSON body and its Host header; answers from `script`."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []
        self.hosts: list[str] = []
        self.script: list[int] = []
        self.waiters: list[Any] = []

    def render_POST(self, request: Any) -> bytes:
        self.hosts.append((request.getHeader(b"host") or b"").decode())
        status = self.script.pop(0) if self.script else 200
        request.setResponseCode(status)
        if status == 200:
            self.bodies.append(json.loads(request.content.read()))
            waiters, self.waiters = self.waiters, []
            for d in waiters:
                d.callback(None)
        return b"{}"


# -- helpers for real-socket tests ------------------------------------------------------

import pytest  # noqa: E402
from twisted.logger import formatEvent, globalLogPublisher  # noqa: E402


@pytest.fixture
def logs():
    """Every log line emitted during the test, formatted."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [formatEvent(e) for e in events]
    globalLogPublisher.removeObserver(events.append)


async def eventually(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy; fail after `timeout`."""
    import inspect
    import time

    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await deferLater(reactor, interval, lambda: None)


def tls_listener(directory: Any, *hostnames: str) -> tuple[int, str, bytes]:
    """(port, `--listen` ssl endpoint string, CA PEM) for a relay serving HTTPS with a fresh test CA."""
    from relayproc import free_port
    from tlsfiles import make_ca_and_server_cert

    directory.mkdir(parents=True, exist_ok=True)
    ca_pem, key, cert = make_ca_and_server_cert(directory, *(hostnames or ("localhost",)))
    port = free_port()
    return port, f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}", ca_pem


def config_file(path: Any, text: str) -> str:
    path.write_text(text)
    return str(path)
