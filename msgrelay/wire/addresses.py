"""Qualified addresses `<user_id>@<server_name>` (docs/protocol.md section 2)."""

from __future__ import annotations

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
