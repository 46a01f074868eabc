"""Outgoing HTTP for federation and push: TLS verification and address checks.

Every HTTPS connection verifies the certificate chain and the host name (service-identity,
through `BrowserLikePolicyForHTTPS`), against the platform's roots or a private CA bundle.
Hosts a user or a stranger chose (push endpoints, unlisted peers in "open" mode) are
resolved once, every address is checked, and the connection goes to the address that was
checked, with the original name still used for SNI and certificate verification: a DNS
answer cannot change between the check and the connection (no rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import AbstractSet, Any, Awaitable, Callable, Optional, Sequence

from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.threads import deferToThreadPool
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

import treq
from treq.client import HTTPClient

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class AddressRefused(ConnectionError):
    """The host resolves to an address outgoing requests may not reach."""


def address_problem(text: str) -> Optional[str]:
    """Why an IP address is not a public unicast address, or None if it is one."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for problem, flag in (("loopback", address.is_loopback), ("private", address.is_private),
                          ("link-local", address.is_link_local), ("unspecified", address.is_unspecified),
                          ("multicast", address.is_multicast), ("reserved", address.is_reserved)):
        if flag:
            return f"{address} is a {problem} address"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def thread_resolver(reactor: Any, pool: Any = None) -> Resolver:
    """getaddrinfo (it blocks) in `pool`, the relay's DNS pool (msgrelay/pools.py); the
    reactor's default pool only where none is given (the client)."""

    async def resolve(host: str, port: int) -> Sequence[str]:
        infos = await deferToThreadPool(reactor, pool or reactor.getThreadPool(), socket.getaddrinfo,
                                        host, port, 0, socket.SOCK_STREAM)
        seen: list[str] = []
        for info in infos:
            address = str(info[4][0])
            if address not in seen:
                seen.append(address)
        return seen

    return resolve


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
                 allow_private: bool, trusted: AbstractSet[tuple[str, int]] = frozenset(), timeout: float = 30):
        self.reactor = reactor
        self.tls_policy = tls_policy
        self.resolve = resolve
        self.allow_private = allow_private
        # (host, port) pairs the operator configured, reached without the address check; the
        # owner may pass a set and update it in place when the peer table is reloaded.
        self.trusted = trusted
        self.timeout = timeout

    def endpointForURI(self, uri: Any) -> Any:
        host = uri.host.decode("ascii")
        endpoint: Any
        if (host.lower(), uri.port) in self.trusted:
            endpoint = HostnameEndpoint(self.reactor, uri.host, uri.port, timeout=self.timeout)
        else:
            endpoint = CheckedAddressEndpoint(self.reactor, host, uri.port, self.resolve, self.allow_private,
                                              self.timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self.tls_policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


def load_trust_root(ca_file: str) -> Any:
    """The platform's roots, or every certificate in a PEM bundle (ValueError if none)."""
    if not ca_file:
        return ssl.platformTrust()
    with open(ca_file, "rb") as f:
        pem = f.read()
    marker = b"-----END CERTIFICATE-----"
    certificates = [ssl.Certificate.loadPEM(block + marker) for block in pem.split(marker) if b"-----BEGIN" in block]
    if not certificates:
        raise ValueError(f"{ca_file} holds no PEM certificate")
    return ssl.trustRootFromCertificates(certificates)


def make_http_client(reactor: Any, ca_file: str, resolve: Resolver, allow_private: bool,
                     trusted: AbstractSet[tuple[str, int]] = frozenset(), persistent: bool = True,
                     timeout: float = 30) -> tuple[HTTPClient, Optional[HTTPConnectionPool]]:
    """A treq client with verified TLS and the address guard, and its pool (to close at stop)."""
    policy = BrowserLikePolicyForHTTPS(trustRoot=load_trust_root(ca_file))
    pool = HTTPConnectionPool(reactor, persistent=persistent) if persistent else None
    if pool is not None:
        pool.maxPersistentPerHost = 2
        pool.retryAutomatically = False  # a POST /message is retried by our own queue, never blindly
    factory = GuardedEndpointFactory(reactor, policy, resolve, allow_private, trusted, timeout)
    agent = Agent.usingEndpointFactory(reactor, factory, pool=pool)
    return HTTPClient(agent), pool


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
