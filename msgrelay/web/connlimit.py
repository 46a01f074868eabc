"""Connection caps per client address and in total, and the lingering close.

Caps (issue 9 item 6). A relay whose open-file limit is reached can accept nobody: one
address holding hundreds of idle keep-alive connections locked every other client out. The
listeners therefore serve the site through `ConnectionLimiter`, which counts connections per
client address (as the rate limits count them: IPv6 per network of `rate_limits.ipv6_prefix`,
`rate_limits.exempt` and `server.trusted_proxies` not counted per address) and in total. The
total is `connections.max_total`, lowered when the open-file limit minus
`connections.reserve_fds` (descriptors kept for the store, the logs, outgoing connections and
DNS) is smaller. A connection over a cap is answered `503` errno 180 with `Retry-After` and
closed; if many are being refused at once, further ones are closed without an answer, so
refusing costs nothing that grows.

Lingering close (docs/protocol.md section 1, issue 9 item 10). A server that answers before it has
read the whole request (413 from Content-Length, or the 503 above) and closes at once makes
the kernel reset the connection while the client is still sending, and the client loses the
answer. `Linger` instead shuts down only the sending side (plain TCP), then reads and discards
what the client sends, up to a bound in bytes and in time, and closes.
"""

from __future__ import annotations

import ipaddress
import resource
from typing import Any, Callable, ClassVar, Optional, cast

from twisted.internet.interfaces import IProtocolNegotiationFactory, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from ..ratelimit import parse_networks
from ..wire.errors import ProtocolError
from .responses import JSON_TYPE, encode_json

log = Logger(namespace="msgrelay.connections")

#: Connections refused over a cap that are still being answered; beyond it, refused ones are
#: closed at once (each answered one holds a descriptor for up to REFUSED_LINGER seconds).
MAX_REFUSING = 64
REFUSED_LINGER_BYTES = 65536
REFUSED_LINGER_SECONDS = 2.0
RETRY_AFTER = 5
#: After a 413: bytes and seconds of the client's body read and discarded before closing.
LINGER_BYTES = 16 * 1024 * 1024
LINGER_SECONDS = 10.0


def connection_capacity(max_total: int, open_file_limit: int, reserve: int) -> int:
    """Connections allowed in total: `max_total`, lowered to fit the open-file limit with
    `reserve` descriptors kept for everything else (never below half the limit)."""
    return max(1, min(max_total, max(open_file_limit - reserve, open_file_limit // 2)))


class Linger:
    """Discard what a client still sends after its final answer, then close (bounded)."""

    def __init__(self, transport: Any, clock: Any, max_bytes: int, seconds: float):
        self.transport = transport
        self.left = max_bytes
        self.closed = False
        if ITCPTransport.providedBy(transport) and not ISSLTransport.providedBy(transport):
            transport.loseWriteConnection()  # FIN after the answer; reading goes on
        self._timer = clock.callLater(seconds, self.close)
        # The HTTP channel may pause reading while it handles a request: resume after it.
        self._resume = clock.callLater(0, self._read_on)

    def _read_on(self) -> None:
        if not self.closed:
            self.transport.resumeProducing()

    def discard(self, data: bytes) -> None:
        self.left -= len(data)
        if self.left < 0:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.loseConnection()
        self.cancel()

    def cancel(self) -> None:
        for call in (self._timer, self._resume):
            if call.active():
                call.cancel()


def linger_close(transport: Any, max_bytes: int, seconds: float) -> None:
    """Close a connection whose answer is written, lingering if it is a limited one
    (`LimitedConnection`); other transports (tests without a limiter) close at once."""
    linger = getattr(type(transport), "linger", None)
    if linger is not None:
        linger(transport, max_bytes, seconds)
    else:
        transport.loseConnection()


class LimitedConnection(ProtocolWrapper):
    """One accepted connection: counted while open; can linger before closing."""

    factory: "ConnectionLimiter"
    key: Optional[str] = None
    _linger: Optional[Linger] = None
    _host: Any = None

    def getHost(self) -> Any:
        """The local address, asked of the socket once: every request on the connection reads it."""
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def linger(self, max_bytes: int, seconds: float) -> None:
        if self._linger is None:
            self.disconnecting = 1
            self._linger = Linger(self.transport, self.factory.clock, max_bytes, seconds)

    def dataReceived(self, data: bytes) -> None:
        if self._linger is not None:
            self._linger.discard(data)
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._linger is not None:
            self._linger.cancel()
        super().connectionLost(reason)


class RefusedConnection(Protocol):
    """Over a cap: a short 503 errno 180, then a brief linger and close."""

    def __init__(self, limiter: "ConnectionLimiter", message: str):
        self.limiter = limiter
        self.message = message
        self._linger: Optional[Linger] = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.limiter.refusing += 1
        self.transport.write(self.limiter.refusal(self.transport, self.message))
        self._linger = Linger(self.transport, self.limiter.clock, REFUSED_LINGER_BYTES, REFUSED_LINGER_SECONDS)

    def dataReceived(self, data: bytes) -> None:
        if self._linger is not None:
            self._linger.discard(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.limiter.refusing -= 1
        if self._linger is not None:
            self._linger.cancel()


class DroppedConnection(Protocol):
    """Over a cap while many refusals are in progress: closed at once, without an answer.
    (A protocol rather than None, which a TLS wrapper around the limiter cannot take.)"""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


@implementer(IProtocolNegotiationFactory)
class ConnectionLimiter(WrappingFactory):
    """Wraps the HTTP site for its listeners (see the module docstring).

    On a TLS listener, the limiter is the factory TLS asks which protocols it may agree to
    over ALPN: without an answer, every client that offers ALPN (browsers, curl, Python's
    http.client) had its handshake refused with an internal-error alert.

    The limits are callables read for each new connection, so a reload applies at once.
    `key(host)` is the per-address counting key, or None for an address not limited.
    """

    protocol = LimitedConnection
    noisy = False  # no "Starting factory <ConnectionLimiter ...>": "listening on" says it

    def __init__(self, site: Any, clock: Any, per_address: Callable[[], int], total: Callable[[], int],
                 key: Callable[[str], Optional[str]], errors_url: Callable[[], str] = lambda: ""):
        super().__init__(site)
        self.clock = clock
        self.per_address = per_address
        self.total = total
        self.key = key
        self.errors_url = errors_url
        self.open = 0
        self.by_key: dict[str, int] = {}
        self.refusing = 0
        self.refused = 0
        #: Told which cap ("per_address" or "total") refused each connection (metrics).
        self.refusal_observers: list[Callable[[str], None]] = []

    def acceptableProtocols(self) -> list[bytes]:
        """ALPN: HTTP/1.1 only (the relay's channel speaks nothing else)."""
        return [b"http/1.1"]

    def buildProtocol(self, addr: Any) -> Any:
        host = getattr(addr, "host", None)
        key = self.key(host) if isinstance(host, str) else None
        cap = None
        if self.open >= self.total():
            cap = "total"
            message = f"the relay is at its limit of {self.total()} connections (connections.max_total)"
        elif key is not None and self.by_key.get(key, 0) >= self.per_address():
            cap = "per_address"
            message = (f"too many connections from this address: at most {self.per_address()} "
                       "(connections.per_address)")
        if cap is None:
            connection = cast(LimitedConnection, super().buildProtocol(addr))
            connection.key = key
            return connection
        self.refused += 1
        for observer in self.refusal_observers:
            observer(cap)
        log.debug("refused a connection from {host}: {cap} cap", host=host, cap=cap)
        if self.refusing >= MAX_REFUSING:
            return DroppedConnection()
        return RefusedConnection(self, message)

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.open += 1
        if p.key is not None:
            self.by_key[p.key] = self.by_key.get(p.key, 0) + 1

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        self.open -= 1
        if p.key is not None:
            left = self.by_key[p.key] - 1
            if left:
                self.by_key[p.key] = left
            else:
                del self.by_key[p.key]

    def refusal(self, transport: Any, message: str) -> bytes:
        """The whole 503 answer, as bytes."""
        info = self.errors_url()
        if not info:
            address = transport.getHost()
            scheme = "https" if ISSLTransport.providedBy(transport) else "http"
            info = f"{scheme}://{getattr(address, 'host', 'localhost')}:{getattr(address, 'port', 80)}/errors"
        body = encode_json(ProtocolError(180, message).body(info))
        head = (
            "HTTP/1.1 503 Service Unavailable\r\n"
            f"Content-Type: {JSON_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Retry-After: {RETRY_AFTER}\r\n"
            f"Timestamp: {int(self.clock.seconds())}\r\n"
            "Access-Control-Allow-Origin: *\r\n"
            "Access-Control-Expose-Headers: Timestamp, Retry-After\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode() + body


def open_file_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


class RelayConnectionLimiter(ConnectionLimiter):
    """The limiter of the relay's listeners: its caps come from the running settings, read per
    connection, and a reload of `connections.*` or `server.*` applies at once (Reconfigurable)."""

    settings_sections: ClassVar[frozenset[str]] = frozenset({"connections", "server"})

    def __init__(self, site: Any, settings: Any, limits: Any, clock: Any, nofile: int):
        super().__init__(site, clock, self._per_address, self._total, self._key, self._errors_url)
        self.settings = settings
        self.limits = limits
        self.nofile = nofile

    def reconfigure(self, reload: Any) -> None:
        self.settings = reload.running

    def _per_address(self) -> int:
        return int(self.settings.connections.per_address)

    def _total(self) -> int:
        section = self.settings.connections
        return connection_capacity(section.max_total, self.nofile, section.reserve_fds)

    def _errors_url(self) -> str:
        return str(self.settings.server.errors_url)

    def _key(self, host: str) -> Optional[str]:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return self.limits.address_key(host)
        if any(address in network for network in parse_networks(self.settings.server.trusted_proxies)):
            return None  # a reverse proxy: its clients are counted by the rate limits instead
        return self.limits.address_key(host)


def connection_limiter(site: Any, settings: Any, limits: Any, clock: Any) -> RelayConnectionLimiter:
    """The limiter for the relay's listeners. Call after the open-file limit was raised."""
    nofile = open_file_limit()
    limiter = RelayConnectionLimiter(site, settings, limits, clock, nofile)
    log.info("connection limits: {per_address} per client address, {total} in total (open-file limit {nofile}, "
             "{reserve} kept in reserve)", per_address=settings.connections.per_address, total=limiter.total(),
             nofile=nofile, reserve=settings.connections.reserve_fds)
    return limiter
