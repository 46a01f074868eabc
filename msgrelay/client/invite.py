"""Invites: one pasteable line, `msgrelay:<user_id>@<server_name>?token=<access token>`.

An invite is everything a person needs to write to someone: where (the qualified address)
and the capability (an access token the inviter minted). The key is not in the invite; it
is looked up from the inviter's relay and must hash to the user id, so a mangled or forged
relay answer cannot substitute another key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, quote

from ..wire.addresses import Address, parse_address
from ..wire.errors import ProtocolError
from .errors import InviteError

SCHEME = "msgrelay:"
TOKEN_RE = re.compile(r"[A-Za-z0-9._~-]{16,1024}")
EXAMPLE = "msgrelay:<32-character user id>@<relay name>?token=<token>"


@dataclass(frozen=True)
class Invite:
    address: Address  # always qualified
    token: str

    @property
    def user_id(self) -> str:
        return self.address.user_id

    @property
    def server_name(self) -> str:
        assert self.address.server_name is not None
        return self.address.server_name

    def __str__(self) -> str:
        return format_invite(str(self.address), self.token)


def format_invite(address: str, token: str) -> str:
    return f"{SCHEME}{address}?token={quote(token, safe='')}"


def parse_invite(text: str) -> Invite:
    """Parse an invite line; InviteError says what is wrong and what one looks like."""
    line = text.strip()
    if not line.lower().startswith(SCHEME):
        raise InviteError(f"bad invite: not an invite (it must start with {SCHEME!r}); an invite looks like {EXAMPLE}")
    rest = line[len(SCHEME):]
    address_text, sep, query = rest.partition("?")
    if not sep:
        raise InviteError(f"bad invite: no ?token=...; an invite looks like {EXAMPLE}")
    try:
        address = parse_address(address_text, field="invite address")
    except ProtocolError as e:
        raise InviteError(f"bad invite: {e.message}")
    if address.server_name is None:
        raise InviteError(f"bad invite: {address_text!r} names no relay; an invite looks like {EXAMPLE}")
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as e:
        raise InviteError(f"bad invite: the query {query!r} does not parse: {e}")
    tokens = params.get("token", [])
    if len(tokens) != 1:
        raise InviteError("bad invite: it must carry exactly one token=")
    if not TOKEN_RE.fullmatch(tokens[0]):
        raise InviteError("bad invite: the token must be 16 or more URL-safe characters")
    return Invite(address, tokens[0])
