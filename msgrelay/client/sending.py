"""Sending: queue signed, sealed packets in the outbox, then hand them to our own relay.

The first message to a contact who has never written to us is preceded by a type 3 access
token request carrying a token minted for that contact, so that they can answer without
another invite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from twisted.internet.task import deferLater

from .api import ServerInfo, packet_bytes, returns_deferred
from .errors import ClientError, RelayError, RelayUnreachable, UsageError
from .messages import RAW_DATA, RAW_MESSAGE, TOKEN_REQUEST, build_message, file_data, message_ref
from .messages import seal_message, text_data, token_request_data
from .outbox import OutboxEntry, content_digest, new_packet_id
from .profile import Contact
from .session import Session

#: Pauses before each in-run retry of a packet after a network error (same packet id).
RETRY_DELAYS = (0.5, 2.0)


@dataclass(frozen=True)
class Delivery:
    entry: OutboxEntry
    status: str  # "sent", "failed" (refused for good, moved to outbox-failed/) or "pending"
    message_id: Optional[str] = None
    expires: Optional[str] = None
    error: Optional[ClientError] = None


def require_token(contact: Contact) -> str:
    if not contact.token:
        raise UsageError(
            f"you have no access token for {contact.name}: they must invite you "
            f"(msgrelay-client contact add {contact.name} INVITE) or write to you first"
        )
    return contact.token


def build_packet(session: Session, contact: Contact, message: dict[str, Any], ttl: Optional[int]) -> dict[str, Any]:
    """The packet for our relay: recipient, their token, and the message sealed to their key."""
    packet: dict[str, Any] = {"id": new_packet_id(), "user_id": contact.address, "token": require_token(contact)}
    packet.update(seal_message(contact.public_key(), message))
    if ttl is not None:
        packet["ttl"] = ttl
    return packet


def check_size(info: ServerInfo, packet: dict[str, Any]) -> None:
    """Refuse now, not at every retry, a packet whose request body the relay would refuse (413)."""
    if not info.max_body_bytes:
        return
    size = info.sealed_body_size(len(packet_bytes(packet)))
    if size > info.max_body_bytes:
        raise UsageError(
            f"too large for relay {info.name}: the request would be {size} bytes and it accepts "
            f"at most {info.max_body_bytes} (files travel base64-encoded three times)"
        )


async def _introduce(session: Session, info: ServerInfo, name: str, ttl: Optional[int]) -> None:
    """Queue a type 3 with a token minted for `name`, unless they can already write to us."""
    contact = session.profile.contact(name)
    if contact.intro_sent or contact.has_written:
        return
    if contact.my_token and contact.my_token_id:
        minted = {"token": contact.my_token, "id": contact.my_token_id}  # a refused intro, sent again
    else:
        minted = await _mint_for(session, name)
    with session.profile.editing_contacts() as contacts:
        contact = contacts[name]
        data = token_request_data(session.address, minted["token"])
        message = build_message(session.identity, contact.address, TOKEN_REQUEST, data)
        packet = build_packet(session, contact, message, ttl)
        check_size(info, packet)
        session.outbox.add(name, "token_request", packet, f"token request to {name}")
        contact.my_token_id, contact.my_token = minted["id"], minted["token"]
        contact.intro_sent = True


async def _mint_for(session: Session, name: str) -> dict[str, Any]:
    """A token for one contact, never expiring when the relay allows it (revoke it to cut them off)."""
    label = f"contact {name}"
    try:
        return await session.api.create_token(label=label, expires_in=0)
    except RelayError as e:
        if e.errno != 100:
            raise
        return await session.api.create_token(label=label)  # the relay's default lifetime


async def _queue(session: Session, name: str, kind: str, content: bytes, ttl: Optional[int]) -> OutboxEntry:
    """Put the message in the outbox (or find it there from an earlier, failed attempt).

    With the relay unreachable the message is still queued, unless a token must first be
    minted for a type 3 introduction; the size check then waits for the flush.
    """
    contact = session.profile.contact(name)  # UsageError for an unknown name, before anything is minted
    require_token(contact)
    digest = content_digest(name, kind, content)
    retry = session.outbox.find(digest)
    if retry is not None:
        return retry
    info: Optional[ServerInfo]
    try:
        info = await session.connect()
    except RelayUnreachable:
        if not (contact.intro_sent or contact.has_written):
            raise
        info = None
    if kind == "text":
        data: Any = text_data(content.decode("utf-8"), contact.last_id, session.config.get("display_name", ""))
        message = build_message(session.identity, contact.address, RAW_MESSAGE, data)
    else:
        message = build_message(session.identity, contact.address, RAW_DATA, file_data(content))
    packet = build_packet(session, contact, message, ttl)
    if info is not None:
        check_size(info, packet)  # before a token request is queued for a message that cannot go
        await _introduce(session, info, name, ttl)
    ref = message_ref(message)
    with session.profile.editing_contacts() as contacts:
        entry = session.outbox.add(name, kind, packet, f"{kind} to {name} ({len(content)} bytes)", digest=digest, ref=ref)
        contacts[name].remember(ref)
    return entry


@dataclass(frozen=True)
class SendOutcome:
    entry: OutboxEntry  # the message this send queued (or found queued: a retry)
    deliveries: list[Delivery]  # everything the outbox flush did, earlier packets included

    @property
    def delivery(self) -> Optional[Delivery]:
        """None when another process sent it meanwhile."""
        return next((d for d in self.deliveries if d.entry.packet_id == self.entry.packet_id), None)


@returns_deferred
async def send_text(session: Session, name: str, text: str, ttl: Optional[int] = None) -> SendOutcome:
    """Queue a type 2 message to contact `name` and flush the outbox."""
    entry = await _queue(session, name, "text", text.encode("utf-8"), ttl)
    return SendOutcome(entry, await flush(session))


@returns_deferred
async def send_file(session: Session, name: str, raw: bytes, ttl: Optional[int] = None) -> SendOutcome:
    """Queue a type 1 message (the file's bytes) to contact `name` and flush the outbox."""
    entry = await _queue(session, name, "file", raw, ttl)
    return SendOutcome(entry, await flush(session))


async def _post(session: Session, packet: dict[str, Any]) -> dict[str, Any]:
    """POST one packet, retrying network failures a little with the same packet id."""
    for delay in (*RETRY_DELAYS, None):
        try:
            return await session.api.send_packet(packet)
        except RelayUnreachable:
            if delay is None:
                raise
            await deferLater(session.reactor, delay, lambda: None)
    raise AssertionError("unreachable")


@returns_deferred
async def flush(session: Session) -> list[Delivery]:
    """Send every queued packet in order; keep what can be retried, set aside what cannot.

    A network failure stops the run (the relay is gone for all). A rate limit, quota or
    server error holds back that contact's later packets, preserving their order. Any
    other refusal is final for that packet: it moves to outbox-failed/ with the reason.
    """
    pending = session.outbox.pending()
    try:
        info = await session.connect()
    except RelayUnreachable as e:
        return [Delivery(entry, "pending", error=e) for entry in pending]
    deliveries: list[Delivery] = []
    held: set[str] = set()
    for index, entry in enumerate(pending):
        if entry.contact in held:
            deliveries.append(Delivery(entry, "pending"))
            continue
        try:
            check_size(info, entry.packet)  # queued while the relay was unreachable
        except UsageError as e:
            session.outbox.fail(entry, str(e))
            deliveries.append(Delivery(entry, "failed", error=e))
            continue
        try:
            answer = await _post(session, entry.packet)
        except RelayUnreachable as e:
            deliveries.append(Delivery(entry, "pending", error=e))
            deliveries.extend(Delivery(rest, "pending") for rest in pending[index + 1:])
            break
        except RelayError as e:
            if e.transient:
                held.add(entry.contact)
                deliveries.append(Delivery(entry, "pending", error=e))
            else:
                session.outbox.fail(entry, str(e))
                deliveries.append(Delivery(entry, "failed", error=e))
            continue
        session.outbox.done(entry)
        deliveries.append(Delivery(entry, "sent", str(answer["message_id"]), answer.get("expires")))
    return deliveries
