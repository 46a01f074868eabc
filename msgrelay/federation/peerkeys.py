"""Peers' server keys: fetched from `/api/v1/server`, cached, checked against pins.

A cached key is used for at most `refresh_seconds`; after that, or after the peer says it
cannot decrypt what we sealed (errno 103, e.g. it rotated its key), the next delivery
fetches it again. The key's fingerprint is computed here from the key itself, never taken
from the peer's `fingerprint` field, and the peer must call itself by the name we deliver to:
otherwise it would see the packet as remote and refuse it (or worse, be the wrong relay).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from ..wire.errors import ProtocolError
from ..wire.keys import fingerprint, load_public_key
from .netguard import read_body
from .peers import Peer


class PeerKeyError(Exception):
    """The key could not be fetched or is unusable now; delivery retries later."""


class PinMismatch(PeerKeyError):
    """The peer's key is not the pinned one: no delivery until it is."""


@dataclass(frozen=True)
class PeerKey:
    key: rsa.RSAPublicKey
    fingerprint: str
    fetched: float


class PeerKeys:
    def __init__(self, http: Any, clock: Any, refresh_seconds: int, timeout: float):
        self.http = http
        self.clock = clock
        self.refresh_seconds = refresh_seconds
        self.timeout = timeout
        self._cache: dict[str, PeerKey] = {}

    def invalidate(self, name: str) -> None:
        self._cache.pop(name, None)

    async def get(self, peer: Peer) -> PeerKey:
        """The cached key while fresh, else a freshly fetched and checked one."""
        cached = self._cache.get(peer.name)
        if cached is not None and self.clock.seconds() - cached.fetched < self.refresh_seconds:
            return cached
        self._cache.pop(peer.name, None)
        key = await self.fetch(peer)
        self._cache[peer.name] = key
        return key

    async def fetch(self, peer: Peer) -> PeerKey:
        url = peer.endpoint("/api/v1/server")
        response = await self.http.get(url, reactor=self.clock, allow_redirects=False, unbuffered=True)
        body = await read_body(response)
        if response.code != 200:
            raise PeerKeyError(f"GET /api/v1/server answered HTTP {response.code}")
        try:
            info = json.loads(body)
            name, pem = info["name"], info["key"]
            if not isinstance(name, str) or not isinstance(pem, str):
                raise TypeError("name and key must be strings")
        except (ValueError, KeyError, TypeError) as e:
            raise PeerKeyError(f"/api/v1/server is not a relay's server info: {e}")
        if name.lower() != peer.name:
            raise PeerKeyError(f"the relay at {peer.url} calls itself {name!r}, not {peer.name!r}")
        try:
            key = load_public_key(pem)
        except ProtocolError as e:
            raise PeerKeyError(f"unusable server key: {e.message}")
        found = fingerprint(key)
        if peer.pin is not None and found != peer.pin:
            raise PinMismatch(f"key fingerprint {found} is not the pinned {peer.pin}")
        return PeerKey(key, found, self.clock.seconds())
