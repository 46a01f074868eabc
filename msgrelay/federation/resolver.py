"""Asynchronous, bounded, caching DNS for outgoing connections (push endpoints, peers).

Names chosen by users or strangers (push endpoints, relays in open federation) are looked up
with `twisted.names` over UDP on the reactor thread, never with `getaddrinfo` in a thread
pool: a name server that never answers then costs one UDP socket and one timer per pending
query, and cannot hold a thread the store needs (issue 9, item 1).

- One attempt per name server, A and AAAA together, under one deadline (`dns.timeout`); no
  repeated retries.
- At most `dns.max_concurrent` distinct names are looked up at once; beyond that a lookup
  fails at once (its caller retries on its own backoff). Concurrent lookups of one name
  share one query.
- Answers are cached for their TTL, at most `dns.cache_ttl`; failures (no such name, no
  address, no answer in time, server failure) for `dns.negative_ttl`, so a hostile name
  server cannot make the relay ask again and again. At most `dns.cache_size` names are kept.
- The hosts file (`/etc/hosts`) is read once, at start, and wins over DNS; name servers are
  `dns.servers`, or those of `/etc/resolv.conf`, read once at start.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, cast

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import Logger
from twisted.names import client, dns, error
from twisted.python.failure import Failure

from ..wire.addresses import is_ip_literal, parse_server

log = Logger(namespace="msgrelay.dns")

MAX_CNAME_HOPS = 4


class LookupFailed(ConnectionError):
    """A name could not be resolved (this answer may come from the negative cache)."""


def servers_from_resolv_conf(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The `nameserver` lines of resolv.conf; 127.0.0.1 when it names none (as libc does)."""
    servers: list[tuple[str, int]] = []
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver" and is_ip_literal(fields[1].split("%", 1)[0]):
            servers.append((fields[1].split("%", 1)[0], 53))
    return servers or [("127.0.0.1", 53)]


def read_hosts_file(path: str = "/etc/hosts") -> dict[str, list[str]]:
    """Name (lower case) to addresses, in file order; empty if the file is unreadable."""
    names: dict[str, list[str]] = {}
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return names
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or not is_ip_literal(fields[0].split("%", 1)[0]):
            continue
        for name in fields[1:]:
            addresses = names.setdefault(name.lower().rstrip("."), [])
            if fields[0] not in addresses:
                addresses.append(fields[0])
    return names


@dataclass(frozen=True)
class DnsConfig:
    timeout: float = 5
    max_concurrent: int = 64
    cache_ttl: int = 300
    negative_ttl: int = 60
    cache_size: int = 10000

    @classmethod
    def from_settings(cls, settings: Any) -> "DnsConfig":
        section = settings.dns
        return cls(timeout=section.timeout, max_concurrent=section.max_concurrent, cache_ttl=section.cache_ttl,
                   negative_ttl=section.negative_ttl, cache_size=section.cache_size)


@dataclass(frozen=True)
class _Entry:
    expires: float
    addresses: tuple[str, ...]
    problem: Optional[str]  # set for a cached failure


def _describe(reason: Failure, timeout: float) -> str:
    if reason.check(error.DNSNameError):
        return "no such name"
    if reason.check(defer.TimeoutError, dns.DNSQueryTimeoutError):
        return f"no answer from the name servers within {timeout:g}s (dns.timeout)"
    if reason.check(error.DNSServerError):
        return "name server failure"
    if reason.check(error.DNSQueryRefusedError):
        return "the name server refused the query"
    return f"lookup failed: {getattr(reason.type, '__name__', reason.type)}"


class CachingResolver(Service):
    """`resolve(host, port)` for `netguard` (see the module docstring).

    `upstream` is any `twisted.names` IResolver (tests pass their own); by default a
    `client.Resolver` for `servers` with one attempt per server.
    """

    def __init__(self, clock: Any, config: DnsConfig = DnsConfig(), servers: Sequence[tuple[str, int]] = (),
                 hosts: Optional[dict[str, list[str]]] = None, upstream: Any = None):
        self.clock = clock
        self.config = config
        self.hosts = read_hosts_file() if hosts is None else hosts
        self.servers = list(servers) or servers_from_resolv_conf()
        self.upstream = upstream or client.Resolver(servers=self.servers, timeout=(config.timeout,),
                                                    reactor=clock)
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._lookups: dict[str, Deferred] = {}
        self._waiters: dict[str, list[Deferred]] = {}
        #: Counters for tests and metrics.
        self.queries = 0  # distinct lookups sent upstream
        self.cache_hits = 0
        self.refused = 0  # refused because max_concurrent lookups were in progress

    @property
    def pending(self) -> int:
        """Names being looked up right now."""
        return len(self._lookups)

    def resolve(self, host: str, port: int) -> Deferred:
        """The addresses of `host` (IPv4 first); LookupFailed if it has none or cannot be resolved."""
        name = host.lower().rstrip(".")
        if is_ip_literal(name):
            return defer.succeed([name])
        if name in self.hosts:
            return defer.succeed(list(self.hosts[name]))
        entry = self._cache.get(name)
        if entry is not None:
            if entry.expires > self.clock.seconds():
                self.cache_hits += 1
                self._cache.move_to_end(name)
                if entry.problem is not None:
                    return defer.fail(LookupFailed(f"{name}: {entry.problem}"))
                return defer.succeed(list(entry.addresses))
            del self._cache[name]
        if name not in self._lookups:
            if len(self._lookups) >= self.config.max_concurrent:
                self.refused += 1
                return defer.fail(LookupFailed(
                    f"{name}: {self.config.max_concurrent} DNS lookups already in progress (dns.max_concurrent)"))
            self._start(name)
        waiter: Deferred = Deferred()
        self._waiters[name].append(waiter)
        return waiter

    def stopService(self) -> Any:
        """Cancel the lookups in progress (their callers get LookupFailed)."""
        super().stopService()
        for lookup in list(self._lookups.values()):
            lookup.cancel()

    # -- one lookup ---------------------------------------------------------------------

    def _start(self, name: str) -> None:
        self.queries += 1
        self._waiters[name] = []
        lookup = Deferred.fromCoroutine(self._addresses(name))
        self._lookups[name] = lookup
        lookup.addTimeout(self.config.timeout, self.clock)
        lookup.addBoth(self._finished, name)

    def _finished(self, result: Any, name: str) -> None:
        del self._lookups[name]
        waiters = self._waiters.pop(name)
        now = self.clock.seconds()
        if isinstance(result, Failure):
            if result.check(CancelledError):
                problem = "lookup cancelled (the relay is stopping)"
            else:
                problem = _describe(result, self.config.timeout)
                self._remember(name, _Entry(now + self.config.negative_ttl, (), problem))
                log.debug("DNS lookup of {name} failed: {problem}", name=name, problem=problem)
            for waiter in waiters:
                waiter.errback(LookupFailed(f"{name}: {problem}"))
            return
        addresses, ttl = result
        if not addresses:
            self._remember(name, _Entry(now + self.config.negative_ttl, (), "the name has no address"))
        elif ttl > 0:
            self._remember(name, _Entry(now + min(ttl, self.config.cache_ttl), tuple(addresses), None))
        for waiter in waiters:
            if addresses:
                waiter.callback(list(addresses))
            else:
                waiter.errback(LookupFailed(f"{name}: the name has no address"))

    def _remember(self, name: str, entry: _Entry) -> None:
        if entry.expires <= self.clock.seconds():
            return
        self._cache[name] = entry
        self._cache.move_to_end(name)
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)

    async def _addresses(self, name: str) -> tuple[list[str], int]:
        """(addresses, smallest TTL) from A and AAAA queries made together."""
        results = await DeferredList(
            [Deferred.fromCoroutine(self._records(name, dns.A)), Deferred.fromCoroutine(self._records(name, dns.AAAA))],
            consumeErrors=True,
        )
        addresses: list[str] = []
        ttls: list[int] = []
        failures: list[Failure] = []
        for ok, value in results:
            if ok:
                addresses.extend(a for a in value[0] if a not in addresses)
                ttls.extend(value[1])
            else:
                failures.append(cast(Failure, value))
        if not addresses and failures:
            # Prefer the most telling failure: a timeout or server failure over "no such name".
            failures.sort(key=lambda f: 0 if f.check(error.DNSNameError) else 1)
            failures[-1].raiseException()
        return addresses, min(ttls) if ttls else 0

    async def _records(self, name: str, kind: int) -> tuple[list[str], list[int]]:
        """Addresses of one type, following a CNAME chain the server did not resolve itself."""
        lookup = self.upstream.lookupAddress if kind == dns.A else self.upstream.lookupIPV6Address
        target = name
        for _ in range(MAX_CNAME_HOPS):
            answers, _authority, _additional = await lookup(target, timeout=(self.config.timeout,))
            addresses: list[str] = []
            ttls: list[int] = []
            alias: Optional[str] = None
            for record in answers:
                if record.type == kind and record.type == dns.A:
                    addresses.append(record.payload.dottedQuad())
                elif record.type == kind and record.type == dns.AAAA:
                    addresses.append(ipaddress.ip_address(record.payload.address).compressed)
                elif record.type == dns.CNAME:
                    alias = record.payload.name.name.decode("ascii", "replace")
                    ttls.append(record.ttl)
                    continue
                else:
                    continue
                ttls.append(record.ttl)
            if addresses or alias is None:
                return addresses, ttls
            target = alias
        return [], []


def build_resolver(settings: Any, reactor: Any) -> CachingResolver:
    """The relay's resolver for these settings (ValueError for a bad `dns.servers` entry)."""
    servers = [parse_server(entry) for entry in settings.dns.servers]
    return CachingResolver(reactor, DnsConfig.from_settings(settings), servers)
