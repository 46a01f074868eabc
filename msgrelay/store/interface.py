"""The store interface every backend implements, and the records it speaks in.

Every method returns a Deferred and does its blocking work off the reactor thread.
A record is live while `now < expires` (or `now < until`); at `expires` it has expired.
`deliver` and `add_token` for a user that does not exist fail with a LookupError.
A Deferred from a writing method fires only once the write is durable (fsync or commit).
OS and database failures surface as `StoreUnavailable` (errno 180 for the client).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from zope.interface import Attribute, Interface

from ..wire.dates import format_date
from ..wire.fetchanswer import json_string


class StoreUnavailable(Exception):
    """The store cannot read or write now (disk full, read-only, database down)."""


class QuotaExceeded(Exception):
    """The recipient's mailbox holds as many messages or bytes as its quota allows."""


class TokenRefused(Exception):
    """The access token is not one of the recipient's, or it expired (errno 120)."""


@dataclass(frozen=True)
class UserRecord:
    user_id: str
    key_pem: str
    push_endpoint: Optional[str]
    created: int  # POSIX seconds


@dataclass(frozen=True)
class TokenRecord:
    id: str  # first 16 hex characters of SHA-256(token)
    digest: str  # full hex SHA-256(token); the secret itself is never stored
    label: Optional[str]
    created: int
    expires: Optional[int]  # None: never expires

    def is_valid(self, now: float) -> bool:
        return self.expires is None or now < self.expires

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "created": format_date(self.created),
            "expires": None if self.expires is None else format_date(self.expires),
        }


@dataclass(frozen=True)
class NewMessage:
    """A message about to be stored; the store assigns its id."""

    token_id: str
    data: str
    algorithm: str
    password: str
    signature: Optional[str]
    received: int
    expires: int
    #: Bytes counted against the byte quota: the UTF-8 length of the opaque payload the relay
    #: keeps (docs/protocol.md section 6), computed once here so that every store counts alike.
    size: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        payload = (self.data, self.password, self.signature or "")
        object.__setattr__(self, "size", sum(len(text.encode("utf-8")) for text in payload))


@dataclass(frozen=True)
class MessageRecord:
    message_id: str
    token_id: str
    data: str
    algorithm: str
    password: str
    signature: Optional[str]
    received: int
    expires: int

    def encoded(self) -> bytes:
        """The server message object of docs/protocol.md section 6, as compact JSON, byte for
        byte as `json.dumps` writes it, from a fixed template: a fetch answer encodes up to
        hundreds of these holding the GIL."""
        signature = b"" if self.signature is None else b',"signature":' + json_string(self.signature)
        return b'{"id":%b,"token":%b,"data":%b,"algorithm":%b,"password":%b,"received":"%b","expires":"%b"%b}' % (
            json_string(self.message_id), json_string(self.token_id), json_string(self.data),
            json_string(self.algorithm), json_string(self.password),
            format_date(self.received).encode("ascii"), format_date(self.expires).encode("ascii"), signature)


@dataclass(frozen=True)
class Quota:
    max_messages: int
    max_bytes: int


@dataclass(frozen=True)
class Delivery:
    message_id: str
    expires: int
    duplicate: bool  # True: an earlier packet with the same key was stored; nothing new was


@dataclass(frozen=True)
class Accepted:
    """What `deliver_checked` found and did: the recipient (for push) and the delivery."""

    user: UserRecord
    delivery: Delivery


class IStore(Interface):
    """Users, tokens, messages and the replay cache of one relay."""

    name = Attribute("Short backend name for logs and metrics, e.g. 'maildir'.")

    def add_user(user: UserRecord):
        """Store a new user. Fires True if added, False if the id existed (left unchanged)."""

    def get_user(user_id: str):
        """Fires the UserRecord, or None."""

    def set_push_endpoint(user_id: str, endpoint: Optional[str]):
        """Change or clear (None) the push endpoint. Fires True, or False for an unknown user."""

    def delete_user(user_id: str):
        """Erase key, tokens, messages and dedup records at once. Fires True if the user existed."""

    def add_token(user_id: str, token: TokenRecord):
        """Store a token record for an existing user. Fires None."""

    def get_token(user_id: str, token_id: str):
        """Fires the user's TokenRecord with that id (expired or not), or None."""

    def list_tokens(user_id: str):
        """Fires the user's TokenRecords, oldest first."""

    def revoke_token(user_id: str, token_id: str):
        """Delete a token record. Fires True if it existed."""

    def deliver(user_id: str, dedup_key: str, message: NewMessage, quota: Quota, now: int):
        """Store a message for an existing user, idempotently and durably.

        If an unexpired dedup record for `dedup_key` exists (even after its message was
        acknowledged), fire its Delivery with duplicate=True and store nothing. Else check
        that the user's pending unexpired messages plus this one fit `quota` (fail with
        QuotaExceeded), store the message and a dedup record lasting until message.expires,
        and fire Delivery(duplicate=False) once both are durable. Message ids sort in
        arrival order and match [A-Za-z0-9._-]{1,128}.
        """

    def deliver_checked(user_id: str, token_digest: str, dedup_key: str, message: NewMessage,
                        quota: Quota, now: int):
        """`get_user`, the token check and `deliver` in one store call (one thread hop, one
        transaction): the accept path of every packet.

        Fails with LookupError for an unknown user, then TokenRefused unless the user holds
        a token whose full digest equals `token_digest` (compared in constant time) and
        that is valid at `now`; else behaves as `deliver`. Fires an Accepted.
        """

    def fetch(user_id: str, now: int, limit: int, max_bytes: Optional[int] = None):
        """Fires (messages, remaining): up to `limit` pending unexpired MessageRecords,
        oldest first, and how many more pending unexpired ones there are. With `max_bytes`,
        stops before the message whose size (NewMessage.size) would take the total past
        it, but always returns the first: the relay's memory for one fetch stays bounded."""

    def usage(user_id: str, now: int):
        """Fires (messages, bytes) of the user's pending unexpired messages, counted as the
        quota counts them; (0, 0) for an unknown user. Must not read message bodies."""

    def acknowledge(user_id: str, message_ids: list[str]):
        """Delete these pending messages; unknown or malformed ids are ignored. Fires the count deleted."""

    def expire(now: int):
        """Reclaim expired messages, dedup records, tokens and replay entries.
        Fires the number of messages reclaimed. Must not read message bodies."""

    def remember_signature(digest: bytes, until: int, now: int):
        """Record a used signature digest until `until`. Fires True on first use,
        False when already recorded and not yet past its `until` (a replay).
        Atomic across every process sharing the store."""

    def remember_and_fetch(digest: bytes, until: int, now: int, user_id: str, limit: int,
                           max_bytes: Optional[int] = None):
        """`remember_signature`, then, on first use only, `fetch` (same arguments): a signed
        fetch's store work in one round trip. Fires None for a replay (nothing read), else
        what `fetch` fires; fails with a LookupError if the user does not exist (the replay
        entry may or may not have been recorded), which lets the relay skip looking the user
        up before a fetch whose key it already knows."""

    def remember_and_acknowledge(digest: bytes, until: int, now: int, user_id: str, message_ids: list[str]):
        """`remember_signature`, then, on first use only, `acknowledge` (same arguments): a
        signed acknowledgement's store work in one round trip. Fires None for a replay
        (nothing deleted), else how many messages were deleted; fails with a LookupError if
        the user does not exist, as `remember_and_fetch` does."""

    def check_writable():
        """Fires None after a real durable write and removal, or fails with StoreUnavailable."""

    def stats(now: int):
        """Fires a dict: users, messages, bytes, oldest_received (POSIX seconds or None)."""
