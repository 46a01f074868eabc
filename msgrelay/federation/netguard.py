"""Outgoing HTTP for federation and push: TLS verification and address checks.

Every HTTPS connection verifies the certificate chain and the host name (service-identity,
through `BrowserLikePolicyForHTTPS`), against the platform's roots or a private CA bundle.
Hosts a user or a stranger chose (push endpoints, unlisted peers in "open" mode) are
resolved once, every address is checked, and the connection goes to the address that was
checked, with the original name still used for SNI and certificate verification: a DNS
answer cannot change between the check and the connection (no rebinding). Every name,
the operator's peers included, is resolved by the asynchronous, bounded, caching resolver
of `resolver.py`, never by getaddrinfo in a thread pool.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Awaitable, Callable, Iterable, Optional, Sequence

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.web.client import BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

import treq
from treq.client import HTTPClient

from ..net import http as net_http
from ..net.http import tls_policy
from ..net.trust import load_trust_root
from ..wire.addresses import is_ip_literal

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class AddressRefused(ConnectionError):
    """The host resolves to an address outgoing requests may not reach."""


#: Special-purpose ranges (IANA registries) that `ipaddress` counts as global, or that wrap
#: an IPv4 address a gateway would reach for us (6to4, NAT64, Teredo, IPv4-compatible).
NON_PUBLIC_RANGES: tuple[tuple[str, Any], ...] = tuple(
    (name, ipaddress.ip_network(network)) for name, network in (
        ("6to4", "2002::/16"),
        ("site-local", "fec0::/10"),
        ("NAT64", "64:ff9b::/96"),
        ("local-use NAT64", "64:ff9b:1::/48"),
        ("Teredo", "2001::/32"),
        ("documentation", "2001:db8::/32"),
        ("documentation", "3fff::/20"),
        ("discard-only", "100::/64"),
        ("IPv4-compatible", "::/96"),
        ("shared address space", "100.64.0.0/10"),
        ("benchmarking", "198.18.0.0/15"),
        ("IETF protocol assignments", "192.0.0.0/24"),
        ("documentation", "192.0.2.0/24"),
        ("documentation", "198.51.100.0/24"),
        ("documentation", "203.0.113.0/24"),
        ("6to4 relay anycast", "192.88.99.0/24"),
        ("reserved", "240.0.0.0/4"),
        ("this network", "0.0.0.0/8"),
    )
)


def address_problem(text: str) -> Optional[str]:
    """Why an IP address is not a public unicast address, or None if it is one."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for name, network in NON_PUBLIC_RANGES:
        if address.version == network.version and address in network:
            return f"{address} is in a {name} range ({network})"
    for problem, flag in (("loopback", address.is_loopback), ("private", address.is_private),
                          ("link-local", address.is_link_local), ("unspecified", address.is_unspecified),
                          ("multicast", address.is_multicast), ("reserved", address.is_reserved)):
        if flag:
            return f"{address} is a {problem} address"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


async def checked_addresses(host: str, port: int, resolve: Resolver, allow_private: bool) -> list[str]:
    """The addresses to connect to; AddressRefused if any of them is off limits."""
    addresses = [host] if is_ip_literal(host) else list(await resolve(host, port))
    if not addresses:
        raise AddressRefused(f"{host} has no address")
    if not allow_private:
        for address in addresses:
            problem = address_problem(address)
            if problem:
                raise AddressRefused(f"{host}: {problem}; refused (allow_private is off)")
    return addresses


class CheckedAddressEndpoint:
    """Connect to the checked address of `host` (see the module docstring)."""

    def __init__(self, reactor: Any, host: str, port: int, resolve: Resolver, allow_private: bool,
                 timeout: float = 30):
        self.reactor = reactor
        self.host = host
        self.port = port
        self.resolve = resolve
        self.allow_private = allow_private
        self.timeout = timeout

    def connect(self, factory: Any) -> Deferred:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        addresses = await checked_addresses(self.host, self.port, self.resolve, self.allow_private)
        last: Optional[BaseException] = None
        for address in addresses:
            kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            try:
                return await kind(self.reactor, address, self.port, timeout=self.timeout).connect(factory)
            except CancelledError:
                raise
            except Exception as e:  # twisted's ConnectError family: try the next address
                last = e
        assert last is not None
        raise last


@implementer(IAgentEndpointFactory)
class GuardedEndpointFactory:
    """Endpoints for an Agent: trusted hosts directly, every other host through the address check."""

    def __init__(self, reactor: Any, tls_policy: BrowserLikePolicyForHTTPS, resolve: Resolver,
                 allow_private: bool, trusted: Iterable[tuple[str, int]] = (), timeout: float = 30):
        self.reactor = reactor
        self.tls_policy = tls_policy
        self.resolve = resolve
        self.allow_private = allow_private
        self.trusted: frozenset[tuple[str, int]] = frozenset()
        self.set_trusted(trusted)
        self.timeout = timeout

    def set_trusted(self, hosts: Iterable[tuple[str, int]]) -> None:
        """(host, port) pairs the operator configured, reached without the address check.

        Replaced whole (a reloaded peer table), never shared with another object."""
        self.trusted = frozenset((host.lower(), port) for host, port in hosts)

    def endpointForURI(self, uri: Any) -> Any:
        host = uri.host.decode("ascii")
        # Trusted hosts skip only the address check: they are resolved the same way.
        trusted = (host.lower(), uri.port) in self.trusted
        endpoint: Any = CheckedAddressEndpoint(self.reactor, host, uri.port, self.resolve,
                                               self.allow_private or trusted, self.timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self.tls_policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


def make_http_client(reactor: Any, ca_file: str, resolve: Resolver, allow_private: bool,
                     trusted: Iterable[tuple[str, int]] = (), persistent: bool = True,
                     timeout: float = 30) -> tuple[HTTPClient, Optional[HTTPConnectionPool]]:
    """A treq client with verified TLS and the address guard, and its pool (to close at stop)."""
    endpoints = GuardedEndpointFactory(reactor, tls_policy(load_trust_root(ca_file)), resolve, allow_private,
                                       trusted, timeout)
    return guarded_http_client(reactor, endpoints, persistent)


def guarded_http_client(reactor: Any, endpoints: "GuardedEndpointFactory",
                        persistent: bool = True) -> tuple[HTTPClient, Optional[HTTPConnectionPool]]:
    """The shared treq client factory over these guarded endpoints (their owner keeps them)."""
    return net_http.make_http_client(reactor, endpoints=endpoints, persistent=persistent)


class BodyTooLarge(Exception):
    """A response body over the limit we are willing to read."""


async def read_body(response: Any, limit: int = 256 * 1024) -> bytes:
    """The response body, refusing to buffer more than `limit` bytes."""
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise BodyTooLarge(f"response body over {limit} bytes")
        chunks.append(data)

    await treq.collect(response, collect)
    return b"".join(chunks)
