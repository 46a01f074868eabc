"""RelayClient over real sockets against a scripted HTTP server: what it sends, and how it reads answers."""

from __future__ import annotations

import json
import time
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.web import resource, server

from msgrelay.client.api import RelayClient
from msgrelay.client.errors import RelayError, RelayUnreachable, TrustError
from msgrelay.client.identity import Identity
from msgrelay.wire.envelope import seal
from msgrelay.wire.keys import fingerprint, public_key_pem
from msgrelay.wire.signing import parse_signed_body, parse_signed_query, verify_signature

ensure = pytest_twisted.ensureDeferred
SERVER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
USER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
AHEAD = 1000  # the scripted relay's clock runs this many seconds ahead of ours


class Scripted(resource.Resource):
    """Answers each path with a handler; remembers the requests it saw."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.handlers: dict[str, Callable[[Any], Any]] = {"/api/v1/server": self.server_info}
        self.seen: list[Any] = []

    def server_info(self, request):
        pem = public_key_pem(SERVER_KEY.public_key())
        fp = fingerprint(SERVER_KEY.public_key())
        return 200, {"name": "relay.test", "key": pem, "fingerprint": fp, "algorithms": ["AES-256-GCM"],
                     "max_validity": 300, "previous_keys": [{"key": pem, "fingerprint": "e" * 64,
                                                             "until": "2026-12-01T00:00:00Z"}]}

    def render(self, request):
        path = request.path.decode()
        body = request.content.read()
        self.seen.append((request.method.decode(), request.uri.decode(), body))
        handler = self.handlers.get(path)
        if handler is None:
            return self.respond(request, 404, {"code": 404, "errno": 132, "error": "Not Found", "message": path})
        answer = handler(request)
        if answer is server.NOT_DONE_YET:
            return answer
        status, payload = answer[:2]
        return self.respond(request, status, payload, *answer[2:])

    @staticmethod
    def respond(request, status, payload, headers=None):
        request.setResponseCode(status)
        request.setHeader(b"Timestamp", str(int(time.time()) + AHEAD).encode())
        for name, value in (headers or {}).items():
            request.setHeader(name.encode(), value.encode())
        if isinstance(payload, bytes):
            return payload
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(payload).encode()


@pytest.fixture
def scripted():
    from twisted.internet import reactor

    root = Scripted()
    port = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")
    root.url = f"http://127.0.0.1:{port.getHost().port}"
    yield root
    pytest_twisted.blockon(port.stopListening())


def api_for(url: str, **kwargs) -> RelayClient:
    return RelayClient(url, identity=Identity(USER_KEY, "relay.test"), **kwargs)


@ensure
async def test_signed_get_is_what_a_relay_verifies(scripted):
    sealed = seal(USER_KEY.public_key(), b"[]")
    scripted.handlers["/api/v1/message"] = lambda request: (200, {**sealed, "count": 0, "remaining": 0})
    api = api_for(scripted.url)
    try:
        result = await api.fetch(limit=5)
    finally:
        await api.close()
    assert result.messages == [] and result.remaining == 0
    method, uri, _ = scripted.seen[-1]
    query = parse_qs(urlsplit(uri).query, keep_blank_values=True)
    signed = parse_signed_query(query, {"limit": ("integer", False)})
    assert signed.params["limit"] == 5 and signed.validity == 60
    verify_signature(USER_KEY.public_key(), signed.signature, signed.base("GET", "/api/v1/message", "relay.test"))
    # `date` follows the relay's Timestamp header, not our clock.
    assert abs(signed.date - (time.time() + AHEAD)) < 5


@ensure
async def test_signed_body_and_fresh_signatures(scripted):
    scripted.handlers["/api/v1/token"] = lambda request: (200, {"token": "t" * 22, "id": "0" * 16, "expires": None})
    api = api_for(scripted.url)
    try:
        await api.create_token(label="Zoë", expires_in=0)
        await api.create_token(label="Zoë", expires_in=0)
    finally:
        await api.close()
    bodies = [json.loads(body) for method, uri, body in scripted.seen if uri == "/api/v1/token"]
    assert len(bodies) == 2 and bodies[0]["signature"] != bodies[1]["signature"]
    for body in bodies:
        signed = parse_signed_body(body, {"label": ("string", False), "expires_in": ("integer", False)})
        verify_signature(USER_KEY.public_key(), signed.signature, signed.base("POST", "/api/v1/token", "relay.test"))


@ensure
async def test_error_body_becomes_one_line_with_errno(scripted):
    body = {"code": 429, "errno": 150, "error": "Too Many Requests", "message": "slow down",
            "info": "http://relay.test/errors#errno-150"}
    scripted.handlers["/api/v1/token"] = lambda request: (429, body, {"Retry-After": "7"})
    api = api_for(scripted.url, label="relay relay.test")
    try:
        with pytest.raises(RelayError) as caught:
            await api.list_tokens()
    finally:
        await api.close()
    error = caught.value
    assert (error.errno, error.status, error.retry_after, error.transient) == (150, 429, 7, True)
    assert str(error) == ("relay relay.test refused the request (errno 150, HTTP 429): slow down; "
                          "retry after 7 s [http://relay.test/errors#errno-150]")


@pytest.mark.parametrize("status, payload, headers, match", [
    (502, b"<html>Bad Gateway</html>", {}, "HTTP 502 Bad Gateway without a msgrelay error body"),
    (200, b"<html>hello</html>", {}, "not a msgrelay relay"),
    (301, b"", {"Location": "https://elsewhere.test/"}, "HTTP 301"),
])
@ensure
async def test_answers_that_are_not_a_relay(scripted, status, payload, headers, match):
    scripted.handlers["/api/v1/health"] = lambda request: (status, payload, headers)
    api = api_for(scripted.url)
    try:
        with pytest.raises(RelayUnreachable, match=match):
            await api.health()
    finally:
        await api.close()


@ensure
async def test_timeout_covers_a_relay_that_never_answers(scripted):
    scripted.handlers["/api/v1/health"] = lambda request: server.NOT_DONE_YET
    api = api_for(scripted.url, timeout=0.5)
    try:  # the relay never answers: only the client's own timeout can end this, with this message
        with pytest.raises(RelayUnreachable, match="no answer within 0.5 s"):
            await api.health()
    finally:
        await api.close()


@ensure
async def test_connection_refused():
    from relayproc import free_port

    api = api_for(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RelayUnreachable, match="connection refused"):
        await api.server_info()


@ensure
async def test_pinned_relay_key_mismatch_is_refused_before_sealing(scripted):
    api = api_for(scripted.url, pinned_fingerprint="e" * 64)
    try:
        with pytest.raises(TrustError, match="KEY HAS CHANGED") as caught:
            await api.send_packet({"id": "p"})
    finally:
        await api.close()
    assert "rotated out (valid until 2026-12-01T00:00:00Z)" in str(caught.value)
    assert [uri for _, uri, _ in scripted.seen] == ["/api/v1/server"]


@ensure
async def test_lookup_refuses_a_key_that_is_not_the_users(scripted):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    me = Identity(USER_KEY, "relay.test")
    scripted.handlers[f"/api/v1/user/{me.user_id}"] = lambda request: (
        200, {"user_id": me.user_id, "key": public_key_pem(other.public_key())})
    api = api_for(scripted.url)
    try:
        with pytest.raises(TrustError, match="does not belong to"):
            await api.lookup_user(me.user_id)
    finally:
        await api.close()


@ensure
async def test_sent_packet_is_sealed_to_the_relay_key(scripted):
    from msgrelay.wire.envelope import open_envelope

    scripted.handlers["/api/v1/message"] = lambda request: (200, {"message_id": "m1", "expires": "2026-12-01T00:00:00Z"})
    api = api_for(scripted.url)
    try:
        answer = await api.send_packet({"id": "p1", "user_id": "x", "token": "t"})
    finally:
        await api.close()
    assert answer["message_id"] == "m1"
    _, _, body = scripted.seen[-1]
    assert json.loads(open_envelope([SERVER_KEY], json.loads(body))) == {"id": "p1", "user_id": "x", "token": "t"}
