"""Rate limits: token buckets per client address or per user, with an injected clock.

Each limit is "COUNT/SECONDS": a key may make COUNT requests at once, and its allowance
refills steadily at COUNT per SECONDS (so after SECONDS of quiet it is whole again).
A refused request is errno 150 (429) with `Retry-After`: the whole seconds until one
more request is allowed.

Memory is bounded: each limit remembers at most `rate_limits.max_tracked` keys, dropping
the least recently seen first (a key idle that long has almost always refilled anyway).

Client addresses come from the connection, or from `X-Forwarded-For` when the connection
comes from a trusted proxy (`server.trusted_proxies`). IPv6 clients are counted per
network prefix (`rate_limits.ipv6_prefix`, /64 by default), since one host usually holds
a whole /64.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Optional, Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .wire.errors import ProtocolError

if TYPE_CHECKING:
    from .settings import Reload, Settings

log = Logger()

_RATE = re.compile(r"[ \t]*([0-9]+)[ \t]*/[ \t]*([0-9]+)[ \t]*")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Rate:
    count: int
    period: float

    @staticmethod
    def parse(text: str) -> Optional["Rate"]:
        """'COUNT/SECONDS' -> Rate, 'off' -> None; ValueError naming the problem otherwise."""
        if text.strip().lower() == "off":
            return None
        match = _RATE.fullmatch(text)
        if not match:
            raise ValueError(f"{text!r} is not COUNT/SECONDS (e.g. \"20/3600\") or \"off\"")
        count, period = int(match.group(1)), int(match.group(2))
        if count < 1 or period < 1:
            raise ValueError(f"{text!r}: COUNT and SECONDS must both be at least 1")
        return Rate(count, period)


class TokenBuckets:
    """One token bucket per key, at most `max_keys` of them (least recently used dropped)."""

    def __init__(self, clock: IReactorTime):
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, rate: Rate, max_keys: int) -> float:
        """Take one token for `key`: 0.0 if allowed, else the seconds until one is available."""
        # Kept as the allowance *used* (draining at COUNT per PERIOD) rather than tokens left,
        # so a reload that raises COUNT gives the new room at once.
        now = self.clock.seconds()
        used, stamp = self._buckets.pop(key, (0.0, now))
        used = max(0.0, used - max(0.0, now - stamp) * rate.count / rate.period)
        wait = 0.0
        if used + 1.0 <= rate.count + 1e-9:
            used += 1.0
        else:
            wait = (used + 1.0 - rate.count) * rate.period / rate.count
        self._buckets[key] = (used, now)
        while len(self._buckets) > max_keys:
            self._buckets.popitem(last=False)
        return wait


def parse_networks(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parsed address/network list (cached: settings lists are read on every request)."""
    return _networks(tuple(entries))


@lru_cache(maxsize=32)
def _networks(entries: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(e, strict=False) for e in entries)


def _parse_address(text: str) -> Optional[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:443"
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _in(address: Any, networks: Sequence[IPNetwork]) -> bool:
    return address is not None and any(address in n for n in networks if n.version == address.version)


def client_host(peer: Optional[str], forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]) -> str:
    """The client's address: the peer's, unless the peer is a trusted proxy.

    Behind trusted proxies, `X-Forwarded-For` is read right to left and the first address
    that is not itself a trusted proxy is the client: entries to its left were written by
    the client and prove nothing. With no usable header, the peer is the client.
    """
    peer = peer or "unknown"
    if not trusted or not _in(_parse_address(peer), trusted):
        return peer
    hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
    client = peer
    for hop in reversed(hops):
        address = _parse_address(hop)
        if address is None:
            return hop[:64]  # a garbled hop written by a trusted proxy: still the best key
        client = str(address)
        if not _in(address, trusted):
            return client
    return client


class RateLimits:
    """The relay's limits, read from `settings` on every check (so SIGHUP applies)."""

    #: limit name -> (settings key, what the key is, what is limited)
    LIMITS = {
        "register": ("register_per_address", "address", "registrations"),
        "send": ("send_per_address", "address", "messages sent"),
        "fetch": ("fetch_per_user", "user", "fetches"),
        "token": ("token_per_user", "user", "token mints"),
        "account": ("account_per_user", "user", "account requests (GET, PUT, DELETE /user)"),
        "token_manage": ("token_manage_per_user", "user", "token list and revoke requests"),
        "ack": ("ack_per_user", "user", "acknowledgements"),
    }

    settings_sections: ClassVar[frozenset[str]] = frozenset({"rate_limits"})

    def __init__(self, settings: Settings, clock: IReactorTime, observers: Sequence[Callable[[str], None]] = ()):
        self.settings = settings
        self.clock = clock
        self.buckets = {name: TokenBuckets(clock) for name in self.LIMITS}
        self.observers = list(observers)  # told the limit's name on each refusal
        self._parsed: dict[str, tuple[str, Optional[Rate]]] = {}

    def reconfigure(self, reload: Reload) -> None:
        self.settings = reload.running

    def _rate(self, name: str) -> Optional[Rate]:
        text = getattr(self.settings.rate_limits, self.LIMITS[name][0])
        cached = self._parsed.get(name)
        if cached is None or cached[0] != text:
            cached = (text, Rate.parse(text))
            self._parsed[name] = cached
        return cached[1]

    def address_key(self, host: str) -> Optional[str]:
        """The bucket key for a client address, or None when it is exempt."""
        limits = self.settings.rate_limits
        address = _parse_address(host)
        if address is None:
            return host
        if limits.exempt and _in(address, parse_networks(limits.exempt)):
            return None
        if address.version == 6:
            return str(ipaddress.ip_network(f"{address}/{limits.ipv6_prefix}", strict=False))
        return str(address)

    def check_address(self, name: str, host: str) -> None:
        """Per-address limit (`register`, `send`): call before any expensive work."""
        key = self.address_key(host)
        if key is not None:
            self._check(name, key)

    def check_user(self, name: str, user_id: str) -> None:
        """Per-user limit (every signed endpoint): call once the signature verified, so
        nobody can use up someone else's allowance by naming their user id."""
        self._check(name, user_id)

    def _check(self, name: str, key: str) -> None:
        rate = self._rate(name)
        if rate is None:
            return
        wait = self.buckets[name].take(key, rate, self.settings.rate_limits.max_tracked)
        if wait > 0:
            retry_after = max(1, math.ceil(wait))
            for observer in self.observers:
                observer(name)
            setting, per, what = self.LIMITS[name]
            log.debug("rate limit {limit} refused {key}", limit=name, key=key)
            raise ProtocolError(
                150,
                f"too many {what} from this {per}: at most {rate.count} per {int(rate.period)} seconds "
                f"(rate_limits.{setting}); retry in {retry_after} seconds",
                retry_after=retry_after,
            )
