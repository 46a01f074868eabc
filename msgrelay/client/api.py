"""RelayClient: one Deferred-returning call per endpoint of docs/protocol.md section 5, over treq.

Requests that act for the user are signed afresh on every call (section 4) with the relay's
`name` as `server`, a `date` of now corrected by the relay's `Timestamp` header, and a short
validity. Error bodies become `RelayError`; anything that is not a relay's answer becomes
`RelayUnreachable`. Pinning of the relay's key is enforced here, before any envelope is
sealed to it.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Mapping, Optional, ParamSpec, TypeVar
from urllib.parse import quote, urlsplit

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.defer import Deferred
from twisted.web.http import RESPONSES

import treq.client

from ..net import http as net_http
from ..net.http import describe_failure
from ..net.trust import TrustRootError, load_trust_root
from ..wire.addresses import is_server_name
from ..wire.canonical import parse_json, parse_json_object
from ..wire.dates import format_date
from ..wire.envelope import AES_GCM, NONCE_BYTES, TAG_BYTES, open_envelope, seal
from ..wire.errors import ProtocolError
from ..wire.keys import fingerprint, is_user_id, load_public_key, user_id_for_key
from ..wire.signing import sign_params
from ..wire.transitions import TransitionError, follow_chain, parse_transitions
from .errors import RelayError, RelayUnreachable, TrustError, UsageError
from .identity import Identity

API = "/api/v1"
DEFAULT_TIMEOUT = 30.0
#: Seconds a signed request stays valid: short, since every request is signed afresh.
SIGNATURE_VALIDITY = 60

P = ParamSpec("P")
T = TypeVar("T")


def returns_deferred(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Deferred[T]]:
    """Write the library as coroutines but hand callers Deferreds, as Twisted code expects."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return Deferred.fromCoroutine(fn(*args, **kwargs))

    return wrapper


def normalise_url(url: str) -> str:
    """`https://host[:port][/prefix]` without a trailing slash; a bare host means https."""
    if "://" not in url:
        url = "https://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"relay URL {url!r} must be http:// or https:// followed by a host")
    if parts.query or parts.fragment:
        raise UsageError(f"relay URL {url!r} must not have a query or fragment")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def make_http_client(reactor: Any, ca_file: Optional[str] = None) -> tuple[treq.client.HTTPClient, Any]:
    """A treq client verifying certificates and host names, with keep-alive connections."""
    try:
        trust_root = load_trust_root(ca_file) if ca_file else None
    except TrustRootError as e:
        raise UsageError(str(e))
    return net_http.make_http_client(reactor, trust_root=trust_root, persistent=True)


def packet_bytes(packet: Mapping[str, Any]) -> bytes:
    """The plaintext of a POST /message envelope."""
    return json.dumps(packet, ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class ServerInfo:
    """The parts of GET /api/v1/server a client relies on."""

    name: str
    key: rsa.RSAPublicKey
    fingerprint: str
    algorithms: tuple[str, ...]
    max_body_bytes: Optional[int]
    max_validity: int
    default_ttl: Optional[int]
    max_ttl: Optional[int]
    version: str
    previous_keys: tuple[Mapping[str, Any], ...] = ()
    clock_offset: float = 0.0  # relay clock minus ours, from the Timestamp header
    raw: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], clock_offset: float = 0.0) -> "ServerInfo":
        name, pem = obj.get("name"), obj.get("key")
        if not isinstance(name, str) or not is_server_name(name):
            raise ValueError("server info has no valid `name`")
        if not isinstance(pem, str):
            raise ValueError("server info has no `key`")
        key = load_public_key(pem)
        actual = fingerprint(key)
        if obj.get("fingerprint") != actual:
            raise ValueError("server info `fingerprint` is not the fingerprint of its `key`")

        def integer(name: str) -> Optional[int]:
            value = obj.get(name)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        algorithms = obj.get("algorithms")
        previous = obj.get("previous_keys")
        return cls(
            name=name.lower(),
            key=key,
            fingerprint=actual,
            algorithms=tuple(a.upper() for a in algorithms if isinstance(a, str)) if isinstance(algorithms, list) else (AES_GCM,),
            max_body_bytes=integer("max_body_bytes"),
            max_validity=integer("max_validity") or 300,
            default_ttl=integer("default_ttl"),
            max_ttl=integer("max_ttl"),
            version=str(obj.get("version", "")),
            previous_keys=tuple(p for p in previous if isinstance(p, dict)) if isinstance(previous, list) else (),
            clock_offset=clock_offset,
            raw=dict(obj),
        )

    @property
    def outer_algorithm(self) -> str:
        """What envelopes to this relay use: AES-256-GCM unless the relay does not list it."""
        return AES_GCM if AES_GCM in self.algorithms or not self.algorithms else self.algorithms[0]

    def sealed_body_size(self, plaintext_bytes: int) -> int:
        """Exact size of the request body `send_packet` makes from a plaintext of this size."""
        data = 4 * -(-(NONCE_BYTES + plaintext_bytes + TAG_BYTES) // 3)
        password = 4 * -(-((self.key.key_size + 7) // 8) // 3)
        return len(json.dumps({"algorithm": self.outer_algorithm, "password": "p" * password, "data": "d" * data}))

    def previous_key_until(self, pinned: str) -> Optional[str]:
        """When `pinned` is a key the relay rotated away from, the end of its grace period."""
        for entry in self.previous_keys:
            if entry.get("fingerprint") == pinned:
                return str(entry.get("until"))
        return None


@dataclass(frozen=True)
class FetchResult:
    messages: list[dict[str, Any]]
    remaining: int


class RelayClient:
    """Talks to one relay. `identity` is needed only for signed calls."""

    def __init__(
        self,
        url: str,
        *,
        reactor: Any = None,
        identity: Optional[Identity] = None,
        ca_file: Optional[str] = None,
        pinned_fingerprint: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.time,
        label: str = "the relay",
        follow_transitions: bool = False,
    ):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.url = normalise_url(url)
        self.identity = identity
        self.pinned_fingerprint = pinned_fingerprint
        # Follow key transitions only where the URL itself is trusted: the relay URL a person
        # configured (https is verified by the agent; plain http only because they wrote it).
        self.follow_transitions = follow_transitions
        #: (old pin, new fingerprint, steps) once a chain of key transitions was followed.
        self.followed: Optional[tuple[str, str, int]] = None
        self.timeout = timeout
        self.label = label
        self._clock = clock
        self._reactor = reactor
        self._prefix = urlsplit(self.url).path
        self._http, self._pool = make_http_client(reactor, ca_file)
        self._info: Optional[ServerInfo] = None

    # -- transport -------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, *, query: str = "", body: Optional[Mapping[str, Any]] = None
    ) -> tuple[dict[str, Any], Any]:
        url = self.url + path + (f"?{query}" if query else "")
        headers: dict[bytes | str, list[bytes | str]] = {b"Accept": [b"application/json"]}
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            headers[b"Content-Type"] = [b"application/json; charset=utf-8"]
        async def exchange() -> tuple[Any, bytes]:
            # Redirects are not followed: they would change the signed path, or leave https.
            response = await self._http.request(
                method, url, data=data, headers=headers, allow_redirects=False, reactor=self._reactor
            )
            return response, await response.content()

        attempt = Deferred.fromCoroutine(exchange())
        # One deadline for the whole exchange, body included (treq's covers only the headers).
        timer = self._reactor.callLater(self.timeout, attempt.cancel)
        try:
            response, raw = await attempt
        except Exception as e:  # every transport failure, whatever Twisted calls it
            reason = f"no answer within {self.timeout:g} s" if not timer.active() else describe_failure(e)
            raise RelayUnreachable(self.url, reason + self._hint(reason)) from e
        finally:
            if timer.active():
                timer.cancel()
        status = response.code
        try:
            obj = parse_json_object(raw, what="response body")
        except ProtocolError:
            obj = None
        if 200 <= status < 300:
            if obj is None:
                raise RelayUnreachable(self.url, f"{method} {path} answered {status} without a JSON object: not a msgrelay relay?")
            return obj, response.headers
        if obj is None or not isinstance(obj.get("errno"), int):
            phrase = RESPONSES.get(status, b"").decode("ascii", "replace")
            raise RelayUnreachable(
                self.url, f"{method} {path} answered HTTP {status} {phrase} without a msgrelay error body: "
                "not a msgrelay relay (check the URL and port)"
            )
        retry = response.headers.getRawHeaders(b"retry-after")
        raise RelayError(
            obj["errno"],
            status,
            str(obj.get("message") or obj.get("error") or "no message"),
            info=obj.get("info") if isinstance(obj.get("info"), str) else None,
            retry_after=int(retry[0]) if retry and retry[0].strip().isdigit() else None,
            where=self.label,
        )

    def _hint(self, reason: str) -> str:
        """What to try, for the failures people cause by giving the wrong URL."""
        low = reason.lower()
        parts = urlsplit(self.url)
        if parts.scheme == "https" and ("wrong version number" in low or "http request" in low):
            return (f"; is this an http:// relay? It does not speak TLS: try "
                    f"http://{parts.netloc}{parts.path}")
        if "closed cleanly" in low or "was lost" in low:
            return "; the server hung up without an HTTP answer: is it a msgrelay relay? (check the URL and port)"
        return ""

    def _now(self) -> float:
        return self._clock() + (self._info.clock_offset if self._info else 0.0)

    async def _signed(self, method: str, path: str, own: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """Sign `own` plus the auth fields for `method path` on this relay and send it."""
        if self.identity is None:
            raise UsageError("this call needs a profile identity")
        info = await self.server_info()
        params: dict[str, Any] = dict(own or {})
        params.update(
            user_id=self.identity.user_id,
            date=format_date(self._now()),
            validity=min(SIGNATURE_VALIDITY, info.max_validity),
        )
        signed = sign_params(self.identity.private_key, params, method, self._prefix + path, info.name)
        if method == "GET":
            query = "&".join(f"{quote(k, safe='')}={quote(str(v), safe='')}" for k, v in signed.items())
            obj, _ = await self._call(method, path, query=query)
        else:
            obj, _ = await self._call(method, path, body=signed)
        return obj

    # -- unsigned endpoints ----------------------------------------------------------

    @returns_deferred
    async def server_info(self, refresh: bool = False) -> ServerInfo:
        """GET /server, cached; refuses a key other than the pinned one (TrustError)."""
        if self._info is not None and not refresh:
            return self._info
        obj, headers = await self._call("GET", f"{API}/server")
        stamps = headers.getRawHeaders(b"timestamp") or []
        offset = 0.0
        if stamps and stamps[0].strip().isdigit():
            offset = int(stamps[0]) - self._clock()
        try:
            info = ServerInfo.from_json(obj, clock_offset=offset)
        except (ValueError, ProtocolError) as e:
            raise RelayUnreachable(self.url, f"server info is unusable: {e}")
        if self.pinned_fingerprint and info.fingerprint != self.pinned_fingerprint:
            self._follow_or_refuse(info)
        self._info = info
        return info

    def _follow_or_refuse(self, info: ServerInfo) -> None:
        """Re-pin along a verified chain of key transitions, else the loud TrustError."""
        assert self.pinned_fingerprint is not None
        broken = ""
        if self.follow_transitions:
            try:
                steps = follow_chain(self.pinned_fingerprint, info.fingerprint,
                                     parse_transitions(info.raw.get("key_transitions")), info.name)
            except TransitionError as e:
                broken = f" The relay shows no valid chain of key transitions from the pinned key ({e})."
            else:
                self.followed = (self.pinned_fingerprint, info.fingerprint, len(steps))
                self.pinned_fingerprint = info.fingerprint
                return
        until = info.previous_key_until(self.pinned_fingerprint)
        rotated = f" The relay lists the pinned key as rotated out (valid until {until})." if until else ""
        raise TrustError(
            f"THE RELAY'S KEY HAS CHANGED: {self.url} ({info.name}) now has key fingerprint "
            f"{info.fingerprint}, but this profile pinned {self.pinned_fingerprint}.{rotated}{broken} "
            "Nothing was sent. If you verified the new fingerprint with the relay's operator, "
            f"run again with --trust-fingerprint {info.fingerprint}"
        )

    @returns_deferred
    async def health(self) -> dict[str, Any]:
        obj, _ = await self._call("GET", f"{API}/health")
        return obj

    @returns_deferred
    async def register(self, key_pem: str, registration_token: Optional[str] = None) -> str:
        body: dict[str, Any] = {"key": key_pem}
        if registration_token:
            body["registration_token"] = registration_token
        obj, _ = await self._call("POST", f"{API}/user", body=body)
        user_id = obj.get("user_id")
        if not isinstance(user_id, str) or not is_user_id(user_id):
            raise RelayUnreachable(self.url, "registration answered without a valid user_id")
        return user_id

    @returns_deferred
    async def lookup_user(self, user_id: str) -> rsa.RSAPublicKey:
        """The public key of a user of this relay, checked against the user id it must hash to."""
        if not is_user_id(user_id):
            raise UsageError(f"{user_id!r} is not a user id")
        obj, _ = await self._call("GET", f"{API}/user/{user_id}")
        pem = obj.get("key")
        try:
            key = load_public_key(pem if isinstance(pem, str) else "")
        except ProtocolError as e:
            raise TrustError(f"{self.label} returned an unusable key for {user_id}: {e.message}")
        if user_id_for_key(key) != user_id or obj.get("user_id") != user_id:
            raise TrustError(
                f"{self.label} returned a key that does not belong to {user_id} "
                f"(it hashes to {user_id_for_key(key)}): refusing it"
            )
        return key

    @returns_deferred
    async def send_packet(self, packet: Mapping[str, Any]) -> dict[str, Any]:
        """POST /message: the packet sealed to the relay's (pinned) key -> {message_id, expires}."""
        info = await self.server_info()
        body = seal(info.key, packet_bytes(packet), info.outer_algorithm)
        obj, _ = await self._call("POST", f"{API}/message", body=body)
        if not isinstance(obj.get("message_id"), str):
            raise RelayUnreachable(self.url, "POST /message answered without a message_id")
        return obj

    # -- signed endpoints ------------------------------------------------------------

    @returns_deferred
    async def create_token(self, label: Optional[str] = None, expires_in: Optional[int] = None) -> dict[str, Any]:
        """POST /token -> {token, id, expires}."""
        own: dict[str, Any] = {}
        if label is not None:
            own["label"] = label
        if expires_in is not None:
            own["expires_in"] = expires_in
        obj = await self._signed("POST", f"{API}/token", own)
        if not isinstance(obj.get("token"), str) or not isinstance(obj.get("id"), str):
            raise RelayUnreachable(self.url, "POST /token answered without token and id")
        return obj

    @returns_deferred
    async def list_tokens(self) -> list[dict[str, Any]]:
        obj = await self._signed("GET", f"{API}/token")
        tokens = obj.get("tokens")
        if not isinstance(tokens, list):
            raise RelayUnreachable(self.url, "GET /token answered without a tokens list")
        return [t for t in tokens if isinstance(t, dict)]

    @returns_deferred
    async def revoke_token(self, *, token_id: Optional[str] = None, token: Optional[str] = None) -> int:
        if (token_id is None) == (token is None):
            raise UsageError("revoke exactly one of a token id or a token")
        own = {"id": token_id} if token_id is not None else {"token": token}
        obj = await self._signed("DELETE", f"{API}/token", own)
        return int(obj.get("revoked", 0))

    @returns_deferred
    async def fetch(self, limit: Optional[int] = None) -> FetchResult:
        """GET /message, its envelope opened with our key -> the server message objects."""
        assert self.identity is not None
        obj = await self._signed("GET", f"{API}/message", {"limit": limit} if limit else None)
        try:
            plaintext = open_envelope([self.identity.private_key], obj, allowed=(AES_GCM,))
            # Lone surrogates are judged message by message (receiving.py), so that one bad
            # message is set aside instead of making the whole mailbox unreadable.
            messages = parse_json(plaintext, errno=103, what="fetch response plaintext", allow_surrogates=True)
        except ProtocolError as e:
            raise RelayUnreachable(self.url, f"the fetch response cannot be opened with this profile's key: {e.message}")
        if not isinstance(messages, list):
            raise RelayUnreachable(self.url, "the fetch response plaintext is not a JSON list")
        remaining = obj.get("remaining")
        return FetchResult(
            [m for m in messages if isinstance(m, dict)],
            remaining if isinstance(remaining, int) and not isinstance(remaining, bool) else 0,
        )

    @returns_deferred
    async def acknowledge(self, ids: list[str]) -> int:
        obj = await self._signed("DELETE", f"{API}/message", {"ids": list(ids)})
        return int(obj.get("deleted", 0))

    @returns_deferred
    async def set_push_endpoint(self, endpoint: str) -> None:
        """PUT /user: the only way to set (or, with "", clear) the push endpoint (revision 2)."""
        await self._signed("PUT", f"{API}/user", {"push_endpoint": endpoint})

    @returns_deferred
    async def account(self) -> dict[str, Any]:
        """GET /user: our own account as the relay keeps it (push endpoint, pending, tokens, quota)."""
        obj = await self._signed("GET", f"{API}/user")
        if obj.get("user_id") != (self.identity.user_id if self.identity else None):
            raise RelayUnreachable(self.url, "GET /user answered for another user id")
        return obj

    @returns_deferred
    async def delete_user(self) -> None:
        await self._signed("DELETE", f"{API}/user")

    def close(self) -> "Deferred[None]":
        """Close kept-alive connections (tests need a clean reactor)."""
        return self._pool.closeCachedConnections()
