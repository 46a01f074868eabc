"""A raw HTTP client for server tests: builds requests by hand from docs/protocol.md, over real sockets."""

from __future__ import annotations

import json
import ssl
import uuid
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlencode

import treq
from cryptography.hazmat.primitives.asymmetric import rsa

from msgrelay.wire.dates import format_date
from msgrelay.wire.envelope import open_envelope, seal
from msgrelay.wire.keys import load_public_key, public_key_pem, user_id_for_key
from msgrelay.wire.signing import sign_params


@dataclass
class Answer:
    status: int
    body: Any
    headers: Any

    @property
    def errno(self) -> Optional[int]:
        return self.body.get("errno") if isinstance(self.body, dict) else None


class User:
    def __init__(self, key: rsa.RSAPrivateKey):
        self.key = key
        self.user_id = user_id_for_key(key.public_key())
        self.pem = public_key_pem(key.public_key())


class RequestBuilder:
    """Builds signed parameters and sealed packets for one relay; no I/O."""

    def __init__(self, url: str, server_name: str, server_key_pem: str, clock=None):
        self.url = url
        self.server_name = server_name
        self.server_key = load_public_key(server_key_pem)
        self.clock = clock

    def now(self) -> float:
        import time
        return self.clock.seconds() if self.clock else time.time()

    def signed_params(self, user: User, method: str, path: str, validity: int = 60,
                      date: Optional[str] = None, **params: Any) -> dict[str, Any]:
        base = {"user_id": user.user_id, "date": date or format_date(self.now()), "validity": validity, **params}
        return sign_params(user.key, base, method, path, self.server_name)

    def packet_envelope(self, recipient: User, token: str, body: bytes = b'{"text":"hi"}',
                        packet_id: Optional[str] = None, **extra: Any) -> dict[str, str]:
        inner = seal(recipient.key.public_key(), body)
        packet = {"id": packet_id or uuid.uuid4().hex, "user_id": recipient.user_id, "token": token, **inner, **extra}
        return seal(self.server_key, json.dumps(packet).encode())

    def target(self, path: str, query: Optional[dict] = None) -> str:
        return self.url + path + ("?" + urlencode(query) if query else "")


class ApiClient(RequestBuilder):
    """Speaks to one relay at `url`; `clock` gives the `date` of signed requests, `http` makes
    the requests (`request` below, over sockets; or memrelay.InMemoryHTTP, without)."""

    def __init__(self, url: str, server_name: str, server_key_pem: str, clock=None, http=None):
        super().__init__(url, server_name, server_key_pem, clock)
        self.http = http or request

    @classmethod
    async def connect(cls, url: str, clock=None, http=None) -> "ApiClient":
        info = await (http or request)("GET", url + "/api/v1/server")
        return cls(url, info.body["name"], info.body["key"], clock, http)

    async def call(self, method: str, path: str, body: Any = None, query: Optional[dict] = None,
                   headers: Optional[dict] = None, raw: Optional[bytes] = None) -> Answer:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        return await self.http(method, self.target(path, query), data, headers)

    async def signed(self, user: User, method: str, path: str, **params: Any) -> Answer:
        params = self.signed_params(user, method, path, **params)
        if method == "GET":
            return await self.call(method, path, query=params)
        return await self.call(method, path, params)

    async def register(self, user: User) -> Answer:
        return await self.call("POST", "/api/v1/user", {"key": user.pem})

    async def mint(self, user: User, **params: Any) -> str:
        answer = await self.signed(user, "POST", "/api/v1/token", **params)
        assert answer.status == 200, answer.body
        return answer.body["token"]

    async def send(self, recipient: User, token: str, **kwargs: Any) -> Answer:
        return await self.call("POST", "/api/v1/message", self.packet_envelope(recipient, token, **kwargs))

    async def fetch(self, user: User, **params: Any) -> tuple[Answer, list[dict[str, Any]]]:
        answer = await self.signed(user, "GET", "/api/v1/message", **params)
        if answer.status != 200:
            return answer, []
        return answer, json.loads(open_envelope([user.key], answer.body))


async def request(method: str, url: str, data: Optional[bytes] = None, headers: Optional[dict] = None) -> Answer:
    response = await treq.request(method, url, data=data, headers=headers, persistent=False)
    content = await response.content()
    try:
        body = json.loads(content) if content else None
    except ValueError:
        body = content
    return Answer(response.code, body, response.headers)


class SyncClient(RequestBuilder):
    """The same requests with urllib, for tests that drive subprocess relays without a reactor;
    `tls` verifies an https relay (e.g. against a test CA)."""

    tls: Optional[ssl.SSLContext] = None

    @classmethod
    def connect(cls, url: str, tls: Optional[ssl.SSLContext] = None) -> "SyncClient":
        info = sync_request("GET", url + "/api/v1/server", tls=tls)
        client = cls(url, info.body["name"], info.body["key"])
        client.tls = tls
        return client

    def call(self, method: str, path: str, body: Any = None, query: Optional[dict] = None, timeout: float = 10) -> Answer:
        data = None if body is None else json.dumps(body).encode()
        return sync_request(method, self.target(path, query), data, timeout, self.tls)

    def signed(self, user: User, method: str, path: str, **params: Any) -> Answer:
        params = self.signed_params(user, method, path, **params)
        if method == "GET":
            return self.call(method, path, query=params)
        return self.call(method, path, params)

    def mint(self, user: User, **params: Any) -> str:
        answer = self.signed(user, "POST", "/api/v1/token", **params)
        assert answer.status == 200, answer.body
        return answer.body["token"]

    def fetch(self, user: User, **params: Any) -> tuple[Answer, list[dict[str, Any]]]:
        answer = self.signed(user, "GET", "/api/v1/message", **params)
        if answer.status != 200:
            return answer, []
        return answer, json.loads(open_envelope([user.key], answer.body))


def sync_request(method: str, url: str, data: Optional[bytes] = None, timeout: float = 10,
                 tls: Optional[ssl.SSLContext] = None) -> Answer:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=tls) as response:
            content, status, headers = response.read(), response.status, response.headers
    except urllib.error.HTTPError as e:
        content, status, headers = e.read(), e.code, e.headers
    try:
        body = json.loads(content) if content else None
    except ValueError:
        body = content
    return Answer(status, body, headers)
