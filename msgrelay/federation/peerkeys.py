"""Peers' server keys: fetched from `/api/v1/server`, cached, checked against pins.

A cached key is used for at most `refresh_seconds`; after that, or after the peer says it
cannot decrypt what we sealed (errno 103, e.g. it rotated its key), the next delivery
fetches it again. The key's fingerprint is computed here from the key itself, never taken
from the peer's `fingerprint` field, and the peer must call itself by the name we deliver to:
otherwise it would see the packet as remote and refuse it (or worse, be the wrong relay).

A pinned peer that rotated its key lists key transitions signed by each old key (docs/protocol.md
section 5). When the fetched key is not the pin but a verified chain leads from the pin to it,
the pin follows (in memory, with a log line asking the operator to update the entry);
otherwise the key is refused and the queue held. The URL is the configured one or
https://<name>, verified, so a chain is never taken from anyone else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.logger import Logger

from ..wire.errors import ProtocolError
from ..wire.keys import fingerprint, load_public_key
from ..wire.transitions import TransitionError, follow_chain, parse_transitions
from .netguard import read_body
from .peers import Peer


log = Logger(namespace="msgrelay.federation")


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
        #: peer name -> (pin in the peer table, key it led to along verified transitions)
        self._followed: dict[str, tuple[str, str]] = {}

    def pin_for(self, peer: Peer) -> Optional[str]:
        """The pin in force: the table's, or where its chain of transitions led."""
        followed = self._followed.get(peer.name)
        if peer.pin is not None and followed is not None and followed[0] == peer.pin:
            return followed[1]
        return peer.pin

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
        pin = self.pin_for(peer)
        if pin is not None and found != pin:
            try:
                steps = follow_chain(pin, found, parse_transitions(info.get("key_transitions")), peer.name)
            except TransitionError as e:
                raise PinMismatch(f"key fingerprint {found} is not the pinned {pin} ({e})")
            assert peer.pin is not None
            self._followed[peer.name] = (peer.pin, found)
            log.warn("federation: {peer} rotated its key: the pin follows {steps} verified key transition(s) "
                     "from {old} to {new}; update its peer entry to #{new}",
                     peer=peer.name, steps=len(steps), old=pin, new=found)
        return PeerKey(key, found, self.clock.seconds())
