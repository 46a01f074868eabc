"""Receiving: fetch, open and verify each message, store it, and only then acknowledge it.

Who wrote a message is decided by its signing key alone. Contacts are pinned by key (their
user id is the key's hash); a message that arrives with the token we gave one contact but is
signed by another key is refused as a key change. A type 3 token request from someone new
adds them as a contact (trust on first use), so that they can be answered.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from twisted.internet.task import deferLater

from ..wire.addresses import parse_address
from ..wire.canonical import holds_lone_surrogate, is_valid_unicode
from .api import returns_deferred
from .errors import MessageRejected, ProfileError, RelayError, RelayUnreachable
from .inbox import Inbox, compact_date, write_received_file
from .messages import RAW_DATA, RAW_MESSAGE, TOKEN_REQUEST, VerifiedMessage, open_message
from .profile import CONTACT_NAME_RE, Contact, find_by_user_id, new_contact
from .session import Session

#: Fetch rounds per `fetch` when the relay says more are waiting (limit x rounds messages).
MAX_ROUNDS = 50


def _inbox(session: Session) -> Inbox:
    return Inbox(session.profile.folder("inbox"), session.profile.folder("rejected"))


def _pick_name(session: Session, contacts: dict[str, Contact], token_id: Any, user_id: str) -> str:
    """The name given at `invite --for NAME` for the token they used, else `user-<id prefix>`."""
    invites = session.profile.load_config().get("invites", {})
    wanted = invites.get(token_id, {}).get("for") if isinstance(token_id, str) else None
    candidates = [wanted] if isinstance(wanted, str) and CONTACT_NAME_RE.fullmatch(wanted) else []
    candidates.append(f"user-{user_id[:8]}")
    candidates += [f"user-{user_id[:8]}-{n}" for n in range(2, 100)]
    return next(c for c in candidates if c not in contacts)


def _check_sender(contacts: dict[str, Contact], token_id: Any, v: VerifiedMessage) -> Optional[Contact]:
    """The contact who wrote `v`, or None for someone new; MessageRejected on a key change."""
    owner = next((c for c in contacts.values() if token_id and c.my_token_id == token_id), None)
    if owner is not None and owner.user_id != v.sender_user_id:
        raise MessageRejected(
            f"KEY MISMATCH: this message came with the token you gave {owner.name}, but it is signed by "
            f"another key (fingerprint {v.fingerprint}); {owner.name} is pinned to fingerprint "
            f"{owner.fingerprint}. It is not shown as coming from {owner.name}. If {owner.name} really has "
            f"a new key, check its fingerprint with them and run: contact add --replace {owner.name} INVITE"
        )
    known = find_by_user_id(contacts, v.sender_user_id)
    if known is not None and known.fingerprint != v.fingerprint:
        raise MessageRejected(
            f"KEY CHANGED for {known.name}: pinned fingerprint {known.fingerprint}, message signed by {v.fingerprint}"
        )
    return known


def _accept(
    session: Session, contacts: dict[str, Contact], sm: Mapping[str, Any], v: VerifiedMessage, output: Path
) -> dict[str, Any]:
    """Apply a verified message to the contacts and describe it (the record is what --json prints)."""
    token_id = sm.get("token")
    contact = _check_sender(contacts, token_id, v)
    new = False
    if v.data_type == TOKEN_REQUEST:
        answer_to = str(parse_address(v.data["user_id"]))
        if contact is None:
            name = _pick_name(session, contacts, token_id, v.sender_user_id)
            contacts[name] = contact = new_contact(name, answer_to, v.key, intro_sent=True)
            new = True
        if contact.address != answer_to:  # they moved: look them up where they are now
            contact.address, contact.relay_url = answer_to, None
        contact.token = v.data["token"]
    if contact is not None:
        contact.has_written = True
    record: dict[str, Any] = {
        "id": sm["id"],
        "status": "ok",
        "type": v.type_name,
        "from": v.sender_address or v.sender_user_id,
        "contact": contact.name if contact else None,
        "new_contact": new,
        "fingerprint": v.fingerprint,
        "date": v.date,
        "received": sm.get("received"),
        "token_id": token_id,
        "ref": v.ref,
    }
    if v.data_type == RAW_MESSAGE:
        last_id = v.data.get("last_id")
        record.update(text=v.data["content"], name=v.data.get("name", ""), last_id=last_id)
        record["gap"] = bool(contact and last_id and last_id not in contact.recent_refs)
    elif v.data_type == RAW_DATA:
        raw = base64.b64decode(v.data)
        stem = f"{contact.name if contact else v.sender_user_id[:8]}-{compact_date(v.date)}"
        path = write_received_file(output, stem, raw)
        record.update(file=str(path), size=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    if contact is not None and v.data_type != TOKEN_REQUEST:
        contact.remember(v.ref)
    return record


def process(session: Session, inbox: Inbox, sm: Mapping[str, Any], output: Path) -> Optional[dict[str, Any]]:
    """Handle one server message durably; None when it was already handled by an earlier fetch.

    Whatever the message holds, it is either accepted or set aside in rejected/: only a
    local failure (OSError: disk full, permissions) escapes, so one hostile contact or a
    damaged copy can never stop the rest of the mailbox from being stored and acknowledged.
    """
    message_id = sm["id"]
    if inbox.has(message_id):
        return None
    try:
        if holds_lone_surrogate(dict(sm)):
            raise MessageRejected("the relay's copy holds text that is not valid Unicode (damaged or forged)")
        verified = open_message(sm, session.identity)
        if inbox.has_content(verified.ref):
            return None
        with session.profile.editing_contacts() as contacts:
            record = _accept(session, contacts, sm, verified, output)
            inbox.store(record)
    except OSError:
        raise
    except Exception as e:  # MessageRejected, or anything a malformed message provokes
        reason = str(e) if isinstance(e, MessageRejected) else f"cannot be read ({type(e).__name__}: {e})"
        record = {"id": message_id, "status": "rejected", "error": _printable(reason),
                  "token_id": _printable(sm.get("token")), "received": _printable(sm.get("received"))}
        record["kept"] = str(inbox.reject(sm, record))
    return record


def _printable(value: Any) -> Any:
    """A string that can be printed and stored as UTF-8 (lone surrogates escaped); other values as they are."""
    if isinstance(value, str) and not is_valid_unicode(value):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


@returns_deferred
async def fetch(session: Session, output: Optional[Path] = None, limit: Optional[int] = None) -> list[dict[str, Any]]:
    """Fetch everything pending; returns the records of new messages, accepted and rejected.

    Each message is stored (fsynced) before its id is acknowledged; if acknowledging fails,
    the relay hands it out again and the stored copy makes it a silent duplicate.
    """
    await session.connect()
    output = output or session.profile.folder("files")
    inbox = _inbox(session)
    records: list[dict[str, Any]] = []
    for _ in range(MAX_ROUNDS):
        batch = await session.api.fetch(limit)
        handled: list[Any] = []
        for sm in batch.messages:
            if not isinstance(sm.get("id"), str) or not is_valid_unicode(sm["id"]):
                records.append({"id": None, "status": "rejected", "error": "the relay sent a message without a usable id"})
                continue
            try:
                record = process(session, inbox, sm, output)
            except OSError as e:  # disk full, permissions: keep it at the relay, say why
                if handled:
                    await session.api.acknowledge(handled)
                raise ProfileError(f"cannot store message {sm['id']} locally, left at the relay: {e}")
            if record is not None:
                records.append(record)
            handled.append(sm["id"])
        if handled:
            await session.api.acknowledge(handled)
        if not handled or batch.remaining <= 0:
            break
    return records


@returns_deferred
async def watch(
    session: Session,
    on_records: Callable[[list[dict[str, Any]]], Any],
    on_error: Callable[[Exception, float], None],
    output: Optional[Path] = None,
    interval: float = 2.0,
    max_interval: float = 60.0,
) -> None:
    """Fetch forever: back to `interval` after news, doubling up to `max_interval` when quiet.

    Network trouble and transient relay errors are reported and waited out; anything else
    (a changed key, a deleted account) ends the watch.
    """
    delay = interval
    while True:
        try:
            records = await fetch(session, output)
        except (RelayUnreachable, RelayError) as e:
            if isinstance(e, RelayError) and not e.transient:
                raise
            wait = max(delay, float(getattr(e, "retry_after", None) or 0))
            on_error(e, wait)
            delay = min(max_interval, delay * 2)
            await deferLater(session.reactor, wait, lambda: None)
            continue
        if records:
            on_records(records)
            delay = interval
        await deferLater(session.reactor, delay, lambda: None)
        if not records:
            delay = min(max_interval, delay * 2)
