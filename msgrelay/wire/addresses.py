"""Qualified addresses `<user_id>@<server_name>` (docs/protocol.md section 2)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional

from .errors import ProtocolError
from .keys import is_user_id

_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
#: Matched with fullmatch: ASCII only, never a trailing newline (docs/protocol.md section 1).
_SERVER_NAME = re.compile(rf"(?:{_LABEL})(?:\.{_LABEL})*(?::([0-9]{{1,5}}))?")


@dataclass(frozen=True)
class Address:
    user_id: str
    server_name: Optional[str]  # None for a bare user id

    def is_local_to(self, own_name: str) -> bool:
        """Bare, or qualified with `own_name` (case-insensitive)."""
        return self.server_name is None or self.server_name.lower() == own_name.lower()

    def __str__(self) -> str:
        return self.user_id if self.server_name is None else f"{self.user_id}@{self.server_name}"


def is_server_name(text: str) -> bool:
    """A DNS name (or address) with an optional :port in 1..65535."""
    match = _SERVER_NAME.fullmatch(text)
    if not match or len(text) > 261:
        return False
    port = match.group(1)
    return port is None or 1 <= int(port) <= 65535


def parse_address(text: str, field: str = "user_id") -> Address:
    """Split a bare or qualified address, checking both halves (errno 106)."""
    user_id, sep, server = text.partition("@")
    if not is_user_id(user_id):
        raise ProtocolError(106, f"{field} does not start with a 32-character user id of [a-z2-7]")
    if not sep:
        return Address(user_id, None)
    if not is_server_name(server):
        raise ProtocolError(106, f"{field} has an invalid server name {server!r}")
    return Address(user_id, server.lower())


def is_ip_literal(host: str) -> bool:
    """Whether `host` is an IPv4 or IPv6 address as written, not a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_server(entry: str) -> tuple[str, int]:
    """A name server as configured: `"192.0.2.53"`, `"192.0.2.53:5353"`, `"2001:db8::53"` or
    `"[2001:db8::53]:5353"` as (address, port); ValueError if it is not an IP address with an
    optional port. Here, not beside the resolver, so that checking a config file needs no
    networking code."""
    text = entry.strip()
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"{entry!r}: expected [ADDRESS]:PORT")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, number = text.partition(":")
        if not number.isdigit():
            raise ValueError(f"{entry!r}: the port must be a number")
        port = int(number)
    if not is_ip_literal(host) or not 0 < port < 65536:
        raise ValueError(f"{entry!r} is not a name server address (an IP address with an optional :port)")
    return host, port
