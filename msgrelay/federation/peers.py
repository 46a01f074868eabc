"""The peer table and federation policy (docs/protocol.md section 7).

A peer entry is `NAME=URL[#fingerprint]`: the server name used in addresses, the base URL
its API lives under, and optionally the pinned SHA-256 fingerprint of its key. Plain
`http` is allowed only when an entry spells it out (local networks, tests); a destination
reached without an entry is always `https://<server_name>`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable, Optional
from urllib.parse import urlsplit

from ..wire.addresses import is_server_name
from ..wire.errors import ProtocolError

MODES = ("off", "allowlist", "open")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


class PeerError(ValueError):
    """A peer entry that cannot be used; str() says which part is wrong."""


@dataclass(frozen=True)
class Peer:
    name: str  # lower case, as addresses are compared
    url: str  # base URL without a trailing slash
    pin: Optional[str] = None  # lowercase hex SHA-256 of the DER SubjectPublicKeyInfo
    listed: bool = True  # False: reached in "open" mode without a table entry

    def endpoint(self, path: str) -> str:
        return self.url + path


def parse_peer(entry: str) -> Peer:
    """Parse one `NAME=URL[#fingerprint]` entry (PeerError naming the bad part)."""
    name, sep, rest = entry.partition("=")
    name = name.strip().lower()
    if not sep or not name:
        raise PeerError(f"{entry!r} is not NAME=URL[#fingerprint]")
    if not is_server_name(name):
        raise PeerError(f"{name!r} is not a server name (DNS name with an optional :port)")
    url, _, pin = rest.strip().partition("#")
    if pin:
        pin = pin.strip().lower().replace(":", "")
        if not _FINGERPRINT.fullmatch(pin):
            raise PeerError(f"{name}: the pinned fingerprint must be 64 hex digits (SHA-256 of the key)")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http"):
        raise PeerError(f"{name}: URL {url!r} must start with https:// (or http:// on purpose)")
    if not parts.hostname or parts.query or parts.username or parts.password:
        raise PeerError(f"{name}: URL {url!r} needs a host and no query or credentials")
    try:
        _ = parts.port  # raises for a bad port
    except ValueError:
        raise PeerError(f"{name}: URL {url!r} has an invalid port")
    return Peer(name, url.rstrip("/"), pin or None)


def parse_peer_table(entries: Iterable[str]) -> dict[str, Peer]:
    """Every entry parsed; a name listed twice is an error."""
    table: dict[str, Peer] = {}
    for entry in entries:
        peer = parse_peer(entry)
        if peer.name in table:
            raise PeerError(f"{peer.name} is listed twice")
        table[peer.name] = peer
    return table


def _private_literal(host: str) -> bool:
    """A destination written as an IP literal that is not a public address."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not address.is_global


class FederationPolicy:
    """Which destinations a relay forwards to, and where each one lives."""

    def __init__(self, mode: str, peers: dict[str, Peer], own_name: str):
        if mode not in MODES:
            raise ValueError(f"federation mode {mode!r}")
        self.mode = mode
        self.peers = peers
        self.own_name = own_name.lower()

    def check(self, destination: str) -> Peer:
        """The peer to deliver to, or ProtocolError(122) when policy refuses the destination."""
        destination = destination.lower()
        if self.mode == "off":
            raise ProtocolError(122, f"federation is off on this relay; {destination} is not this relay")
        peer = self.peers.get(destination)
        if peer is not None:
            return peer
        if self.mode == "allowlist":
            raise ProtocolError(122, f"{destination} is not a peer of this relay (federation allowlist)")
        if _private_literal(destination.rsplit(":", 1)[0]):  # server names never hold IPv6 literals
            raise ProtocolError(122, f"{destination} is not a public address; list it as a peer to reach it")
        return Peer(destination, f"https://{destination}", None, listed=False)

    def trusted_hosts(self) -> frozenset[tuple[str, int]]:
        """(host, port) of every listed peer: the operator's choice, reached without the address guard."""
        hosts = set()
        for peer in self.peers.values():
            parts = urlsplit(peer.url)
            hosts.add(((parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)))
        return frozenset(hosts)

    def peer_for_delivery(self, destination: str) -> tuple[Optional[Peer], Optional[str]]:
        """(peer, None) when a queued packet may go now, else (None, why not)."""
        try:
            return self.check(destination), None
        except ProtocolError as e:
            return None, e.message
